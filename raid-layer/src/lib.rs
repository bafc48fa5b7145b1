//! The RAID layer of nbdraid: arrays (RAID 0/1/5/6/10) built from volumes on
//! several storage nodes, served as NBD exports through the node's engine
//! (`nbd_server::engine`) and talking to members through `nbdraid-client`.
//!
//! Not built yet: this crate holds its place in the workspace. See
//! `ARCHITECTURE.md` for the design it will follow.
//!
//! The pure math is here already, free of I/O:
//!
//! - [`gf`]: GF(2^8) with md's field, and the vector slice kernels.
//! - [`parity`]: P/Q generation, delta updates, reconstruction, scrub checks.
//! - [`layout`]: md-compatible geometry, array bytes to member bytes.
//! - [`grpc`]: the `Array` admin service; [`config`], [`store`] and
//!   [`daemon`]: the array daemon `nbdraid-array` around the manager.

pub mod config;
pub mod daemon;
pub mod gf;
pub mod grpc;
pub mod layout;
pub mod parity;
pub mod store;
