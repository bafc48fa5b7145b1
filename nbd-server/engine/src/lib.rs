//! nbdraid's serving stack: everything a daemon needs to serve block
//! devices over NBD, shared by the storage node and the array daemon.
//!
//! Layers, from the socket down:
//! - [`server`]: the NBD engine (handshake and transmission), generic over
//!   [`device::BlockDevice`] and an [`server::ExportRegistry`];
//! - [`throttle`], [`cost`] and [`buffer`]: admission by units, the layer's
//!   one cost model, and bounded buffers;
//! - [`upstream`] and [`grpc`]: which throttle share a connection draws
//!   from, and the `Throttle` gRPC service that publishes the model and
//!   grants leases; [`lease`]: the other side, holding a grant at a lower
//!   layer and following its model;
//! - [`metrics`]: per-export metrics and the Prometheus endpoint;
//! - [`daemon`]: listeners, ready file, signals and the process's `main`;
//! - [`mem`] and [`fault`]: a memory-backed device and a fault-injecting
//!   wrapper for any device, for tests.
//!
//! Nothing here knows about files, catalogs or arrays: the node and the
//! RAID layer bring their own devices, registries and admin services.

pub mod buffer;
pub mod cost;
pub mod daemon;
pub mod device;
pub mod error;
pub mod fault;
pub mod grpc;
pub mod lease;
pub mod mem;
pub mod metrics;
pub mod server;
pub mod throttle;
pub mod upstream;

pub use error::{Error, Result};
