//! The nbdraid storage node: volumes in sparse files, a sled catalog, and
//! the node's admin API, served through the shared serving stack
//! ([`nbdraid_engine`]: engine, throttle, buffers, metrics, daemon wiring).
//!
//! - [`volumes`] and [`store`]: volumes as sparse files, one export each;
//! - [`catalog`]: the node's identity and volume records in sled;
//! - [`admin`]: the `Node` gRPC service (and `Fault` in testing builds);
//! - [`node`]: the daemon's wiring; [`config`]: its configuration.

pub mod admin;
pub mod catalog;
pub mod config;
pub mod error;
pub mod node;
pub mod store;
pub mod volumes;

pub use error::{Error, Result};
