//! The nbdraid storage node: an NBD server engine generic over a block
//! device, the sparse-file volume store, the sled catalog, the writeout
//! throttle, configuration and metrics.
//!
//! Layers, from the socket down:
//! - [`engine`]: handshake and transmission, generic over [`device::BlockDevice`];
//! - [`throttle`] and [`buffer`]: admission by units and bounded buffers;
//! - [`volumes`] and [`store`]: volumes as sparse files;
//! - [`catalog`]: the node's identity and volume records in sled;
//! - [`node`]: the daemon's wiring; [`config`]: its configuration.

pub mod buffer;
pub mod catalog;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod fault;
pub mod grpc;
pub mod metrics;
pub mod node;
pub mod store;
pub mod throttle;
pub mod upstream;
pub mod volumes;

pub use error::{Error, Result};
