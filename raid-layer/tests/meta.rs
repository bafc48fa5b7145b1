//! The member metadata (`nbdraid_raid::meta`) through its public API:
//! the superblock's framing and copies, and the write-intent bitmap
//! against a model disk. Assembly's classification is tested beside it
//! (`src/meta/assembly.rs`).

#![allow(clippy::unwrap_used)]

#[path = "meta/bitmap.rs"]
mod bitmap;
#[path = "meta/superblock.rs"]
mod superblock;
