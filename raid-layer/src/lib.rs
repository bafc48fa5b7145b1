//! The RAID layer of nbdraid: arrays (RAID 0/1/5/6/10) built from volumes on
//! several storage nodes, served as NBD exports through the serving stack
//! (`nbdraid-engine`) and talking to members through `nbdraid-client`.
//!
//! - [`gf`], [`parity`], [`layout`]: the math, free of I/O: GF(2^8) with
//!   md's field, P/Q, md-compatible geometry.
//! - [`meta`]: the metadata on every member, free of I/O: superblocks (two
//!   ping-pong copies), the write-intent bitmap, and assembly's verdicts.
//! - [`member`]: one member volume, through the client library.
//! - [`array`]: the data path (reads, writes, reconstruction, failures).
//! - [`manager`]: the daemon's arrays, assembled and served; [`api`]: what
//!   the admin surfaces ask of them.
//! - [`grpc`]: the `Array` admin service; [`config`], [`store`] and
//!   [`daemon`]: the array daemon `nbdraid-array` around the manager.

pub mod api;
pub mod array;
pub mod assemble;
pub mod config;
pub mod daemon;
pub mod gf;
pub mod grpc;
pub mod layout;
pub mod manager;
pub mod member;
pub mod meta;
pub mod parity;
pub mod store;
pub mod sync;
