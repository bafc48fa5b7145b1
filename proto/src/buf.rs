//! Request buffers from a bounded pool.
//!
//! Every per-request data buffer (a WRITE's payload, a READ's reply data,
//! a member read in the RAID layer) is an [`IoBuf`] taken from a
//! [`BufferPool`]. The pool keeps freed buffers for reuse, keyed by exact
//! size (workloads use a handful of sizes: 4 KiB, 64 KiB, 1 MiB, 32 MiB),
//! so the hot path neither allocates nor faults in fresh pages.
//!
//! Invariant: the bytes the pool keeps plus the bytes in use never exceed
//! its limit while the bytes in use stay within it, and the throttle,
//! whose capacity is the pool's limit, guarantees they do. A new buffer is
//! allocated only after kept buffers of other sizes have been freed to
//! make room. So the process's buffer memory is bounded by the capacity:
//! freed memory the pool does not keep goes back to the allocator (the
//! daemons pin glibc's mmap threshold at start-up so large buffers are
//! unmapped on free instead of lingering in an arena).
//!
//! The type lives in the wire crate because both sides of a connection use
//! it: the server engine reads WRITE payloads into it, and the client reads
//! READ replies straight into the buffer its caller (for example the RAID
//! layer, serving a READ) will send from.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::Mutex;

/// A pool of reusable byte buffers with a bound on what it keeps.
#[derive(Debug)]
pub struct BufferPool {
    inner: Mutex<PoolInner>,
    limit: u64,
}

#[derive(Debug, Default)]
struct PoolInner {
    // A BTreeMap: a handful of sizes, and no hashing on the hot path.
    free: BTreeMap<usize, Vec<Vec<u8>>>,
    kept_bytes: u64,
    used_bytes: u64,
}

impl PoolInner {
    /// Frees kept buffers of sizes other than `keep` until `need` more
    /// bytes fit under `limit` (or nothing else can be freed).
    fn make_room(&mut self, keep: usize, need: u64, limit: u64) {
        while self.kept_bytes + self.used_bytes + need > limit {
            let Some(victim) = self
                .free
                .iter()
                .find(|(k, v)| **k != keep && !v.is_empty())
                .map(|(k, _)| *k)
            else {
                return;
            };
            if let Some(list) = self.free.get_mut(&victim) {
                list.pop();
            }
            self.kept_bytes -= victim as u64;
        }
    }
}

impl BufferPool {
    /// Returns a pool that keeps at most `limit` bytes of free buffers.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(PoolInner::default()),
            limit,
        })
    }

    /// Returns a buffer of exactly `len` bytes. Its contents are unspecified
    /// (zeroes, or whatever a previous user left): callers overwrite all of it.
    pub fn get(self: &Arc<Self>, len: usize) -> IoBuf {
        let reused = {
            let mut inner = self.lock();
            let v = inner.free.get_mut(&len).and_then(|list| list.pop());
            if v.is_some() {
                inner.kept_bytes -= len as u64;
            } else {
                inner.make_room(len, len as u64, self.limit);
            }
            inner.used_bytes += len as u64;
            v
        };
        let data = reused.unwrap_or_else(|| vec![0u8; len]);
        IoBuf {
            data,
            pool: Some(self.clone()),
        }
    }

    /// Returns the number of bytes the pool currently keeps for reuse.
    pub fn kept_bytes(&self) -> u64 {
        self.lock().kept_bytes
    }

    /// Returns the number of bytes in buffers handed out and not yet returned.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    /// Stops counting `len` bytes handed out (their buffer left the pool's care).
    fn forget(&self, len: usize) {
        let mut inner = self.lock();
        inner.used_bytes -= (len as u64).min(inner.used_bytes);
    }

    fn put(&self, data: Vec<u8>) {
        let len = data.len();
        let mut inner = self.lock();
        inner.used_bytes -= (len as u64).min(inner.used_bytes);
        if len == 0 {
            return;
        }
        // Keep it only if it fits, dropping buffers of other sizes first:
        // the size just returned is the one in demand.
        inner.make_room(len, len as u64, self.limit);
        if inner.kept_bytes + inner.used_bytes + len as u64 > self.limit {
            return;
        }
        inner.kept_bytes += len as u64;
        inner.free.entry(len).or_default().push(data);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A poisoned lock only means another thread panicked while holding
        // it; the free lists are still consistent (no invariant spans an
        // unwind point), so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request data buffer; returns to its pool when dropped.
#[derive(Debug)]
pub struct IoBuf {
    data: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

impl IoBuf {
    /// Returns an unpooled buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            data: vec![0u8; len],
            pool: None,
        }
    }

    /// Wraps an existing vector (unpooled).
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self { data, pool: None }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

impl IoBuf {
    /// Takes the bytes out as a plain vector; the pool stops counting them
    /// (they are the caller's now).
    pub fn into_vec(mut self) -> Vec<u8> {
        let data = std::mem::take(&mut self.data);
        if let Some(pool) = self.pool.take() {
            pool.forget(data.len());
        }
        data
    }

    /// Reports whether the buffer came from a pool (and returns to it).
    pub fn is_pooled(&self) -> bool {
        self.pool.is_some()
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(data: Vec<u8>) -> Self {
        Self::from_vec(data)
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds_kept_bytes() {
        let pool = BufferPool::new(3 * 4096);
        let a = pool.get(4096);
        let b = pool.get(4096);
        drop(a);
        drop(b);
        assert_eq!(pool.kept_bytes(), 8192);
        assert_eq!(pool.used_bytes(), 0);
        // A reused buffer moves from kept to used.
        let a = pool.get(4096);
        assert_eq!((pool.kept_bytes(), pool.used_bytes()), (4096, 4096));
        drop(a);
        // 8192 of a new size: a kept 4096 buffer is freed to make room.
        let c = pool.get(8192);
        assert_eq!(c.len(), 8192);
        assert_eq!((pool.kept_bytes(), pool.used_bytes()), (4096, 8192));
        drop(c);
        assert!(pool.kept_bytes() <= 3 * 4096);
    }

    #[test]
    fn kept_plus_used_stays_within_the_limit() {
        let pool = BufferPool::new(64 << 10);
        let small: Vec<_> = (0..16).map(|_| pool.get(4096)).collect();
        drop(small);
        assert_eq!(pool.kept_bytes(), 64 << 10);
        // A new size evicts kept buffers before allocating.
        let big = pool.get(32 << 10);
        assert!(pool.kept_bytes() + pool.used_bytes() <= 64 << 10);
        drop(big);
        assert!(pool.kept_bytes() <= 64 << 10);
        assert_eq!(pool.used_bytes(), 0);
    }

    #[test]
    fn never_keeps_buffers_larger_than_the_limit() {
        let pool = BufferPool::new(1024);
        drop(pool.get(4096));
        assert_eq!(pool.kept_bytes(), 0);
    }

    #[test]
    fn into_vec_leaves_the_pool() {
        let pool = BufferPool::new(64 << 10);
        let b = pool.get(4096);
        assert_eq!(pool.used_bytes(), 4096);
        let v = b.into_vec();
        assert_eq!(v.len(), 4096);
        assert_eq!((pool.used_bytes(), pool.kept_bytes()), (0, 0));
    }
}
