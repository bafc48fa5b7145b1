//! The RAID layer of nbdraid: arrays (RAID 0/1/5/6/10) built from volumes on
//! several storage nodes, served as NBD exports through the node's engine
//! (`nbd_server::engine`) and talking to members through `nbdraid-client`.
//!
//! Not built yet: this crate holds its place in the workspace. See
//! `ARCHITECTURE.md` for the design it will follow.
