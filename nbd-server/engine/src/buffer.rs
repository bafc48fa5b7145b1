//! Buffers the engine serves from: pooled [`IoBuf`]s (from the wire
//! crate, shared with the client) and read-only views of a mapping.
//!
//! [`pin_malloc_behaviour`] keeps freed buffers from lingering in glibc's
//! arenas, which the throttle's memory bound relies on.

use std::ops::Deref;
use std::sync::Arc;

pub use nbdraid_proto::buf::{BufferPool, IoBuf};

/// A read-only view into a file mapping, kept alive while held: read data
/// served straight from a memory-backed volume, with no copy in user space.
#[derive(Debug, Clone)]
pub struct MappedSlice {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl MappedSlice {
    /// Returns the view of `len` bytes at `start`, if the mapping holds them.
    pub fn new(map: Arc<memmap2::Mmap>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= map.len()).then_some(Self { map, start, len })
    }
}

impl Deref for MappedSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// The data of a READ reply: a buffer the device filled, or a view of its memory.
#[derive(Debug)]
pub enum ReadData {
    /// A pooled buffer.
    Buf(IoBuf),
    /// A view into a mapping.
    Mapped(MappedSlice),
}

impl Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Buf(b) => b,
            ReadData::Mapped(m) => m,
        }
    }
}

/// Pins glibc's allocator behaviour so freed request buffers leave the
/// process: a fixed mmap threshold (which also turns off glibc's dynamic
/// raising of it, up to 32 MiB, after large frees) and a small number of
/// arenas. Call once at daemon start-up, before threads exist.
pub fn pin_malloc_behaviour() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before
    // other threads start, as glibc requires for predictable effect.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
