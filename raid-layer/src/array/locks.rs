//! Keyed asynchronous locks: one lock per stripe (RAID 5/6) or per region
//! (RAID 1/10), created on first use and gone when released.
//!
//! Writes that touch the same stripe take its lock, so parity is always
//! computed from the data of the writes already acknowledged; writes to
//! different stripes never wait for each other. A request that needs
//! several keys takes them in ascending order, and no holder ever waits
//! for a key while holding a higher one, so no cycle (deadlock) can form.
//!
//! Waiters are served first come, first served. A waiter that is dropped
//! after the lock was handed to it passes the lock on, so a cancelled
//! request never leaves a stripe locked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

const SHARDS: usize = 64;

#[derive(Default)]
struct Entry {
    waiters: VecDeque<oneshot::Sender<()>>,
}

/// A set of locks identified by `u64` keys.
pub struct KeyLocks {
    shards: Vec<Mutex<HashMap<u64, Entry>>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// Holds the lock of one key until dropped.
pub struct KeyGuard {
    locks: Arc<KeyLocks>,
    key: u64,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.locks.release(self.key);
    }
}

/// A waiter that passes the lock on if it is dropped after being granted it.
struct Waiting {
    locks: Arc<KeyLocks>,
    key: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take()
            && rx.try_recv().is_ok()
        {
            self.locks.release(self.key);
        }
    }
}

impl KeyLocks {
    /// Returns an empty set of locks.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Keys of neighbouring stripes land in different shards.
        let i = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the lock of `key`.
    pub async fn lock(self: &Arc<Self>, key: u64) -> KeyGuard {
        let rx = {
            let mut shard = self.shard(key);
            match shard.get_mut(&key) {
                None => {
                    shard.insert(key, Entry::default());
                    return KeyGuard {
                        locks: self.clone(),
                        key,
                    };
                }
                Some(entry) => {
                    let (tx, rx) = oneshot::channel();
                    entry.waiters.push_back(tx);
                    rx
                }
            }
        };
        let mut waiting = Waiting {
            locks: self.clone(),
            key,
            rx: Some(rx),
        };
        if let Some(rx) = waiting.rx.as_mut() {
            // The sender is only dropped unsent if the whole set is dropped.
            let _ = rx.await;
        }
        waiting.rx = None;
        KeyGuard {
            locks: self.clone(),
            key,
        }
    }

    /// Takes the locks of `keys` (ascending, deduplicated) one after another.
    pub async fn lock_all(self: &Arc<Self>, keys: impl IntoIterator<Item = u64>) -> Vec<KeyGuard> {
        let mut keys: Vec<u64> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut guards = Vec::with_capacity(keys.len());
        for k in keys {
            guards.push(self.lock(k).await);
        }
        guards
    }

    /// Hands the lock of `key` to the next live waiter, or frees it.
    fn release(&self, key: u64) {
        let mut shard = self.shard(key);
        let Some(entry) = shard.get_mut(&key) else {
            return;
        };
        while let Some(tx) = entry.waiters.pop_front() {
            if tx.send(()).is_ok() {
                return;
            }
        }
        shard.remove(&key);
    }

    /// Returns the number of keys locked now (for tests and metrics).
    pub fn held(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_key_and_fifo() {
        let locks = KeyLocks::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(7).await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (locks, inside, order) = (locks.clone(), inside.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(7).await;
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
            // Let each task queue up before the next.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Another key is free meanwhile.
        drop(locks.lock(8).await);
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(locks.held(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_passes_the_lock_on() {
        let locks = KeyLocks::new();
        let g = locks.lock(1).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(1).await;
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let l3 = locks.clone();
        let third = tokio::spawn(async move { drop(l3.lock(1).await) });
        drop(g);
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiter.abort();
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("the lock was lost with the cancelled holder")
            .unwrap();
        assert_eq!(locks.held(), 0);
    }

    #[tokio::test]
    async fn lock_all_sorts_and_dedups() {
        let locks = KeyLocks::new();
        let gs = locks.lock_all([5, 1, 5, 3]).await;
        assert_eq!(gs.len(), 3);
        assert_eq!(locks.held(), 3);
        drop(gs);
        assert_eq!(locks.held(), 0);
    }
}
