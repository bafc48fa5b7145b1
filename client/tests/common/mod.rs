//! Shared harness for the client's integration tests.
//!
//! - [`servers`]: real NBD servers (`nbdraid-node`, `nbdkit memory`,
//!   `qemu-nbd`) started on 127.0.0.1, waited for with a bounded wait, and
//!   killed by the PID we started (never by name) when dropped.
//! - [`fake`]: an in-process NBD server speaking the real codec from
//!   `nbdraid_proto`, for what real servers cannot be made to do (answer in
//!   reverse order, stall, send EIO or malformed replies).
//! - Here: hang detectors and data helpers.
//!
//! Every timeout in these tests is a hang detector (generous), never a
//! performance assertion.

#![allow(dead_code)]

pub mod fake;
pub mod servers;

use std::future::Future;
use std::time::Duration;

use nbdraid_client::{Client, ClientConfig};
use rand::{RngCore, SeedableRng};

/// A hang detector: far longer than anything here should take.
pub const HANG: Duration = Duration::from_secs(30);

/// Awaits `fut`, panicking with `what` if it takes longer than [`HANG`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(HANG, what, fut).await
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hang detector: {what} did not finish within {limit:?}"),
    }
}

/// Returns `len` reproducible pseudo-random bytes for `seed`.
///
/// Beyond 1 MiB (slow to generate in debug builds) a random 1 MiB base
/// repeats, with every 4 KiB block stamped with its index, so data that
/// lands at the wrong offset still differs.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    const BASE: usize = 1 << 20;
    let mut base = vec![0u8; len.min(BASE)];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut base);
    if len <= BASE {
        return base;
    }
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(BASE);
        v.extend_from_slice(&base[..n]);
    }
    for (i, block) in v.chunks_mut(4096).enumerate() {
        let stamp = (seed ^ i as u64).to_le_bytes();
        let n = block.len().min(8);
        block[..n].copy_from_slice(&stamp[..n]);
    }
    v
}

/// Returns the first index where `a` and `b` differ, for readable failures.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts two buffers are equal, naming the first differing byte (never
/// dumping megabytes).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: data differs at byte {i} (len {} vs {}): got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// A config with short deadlines, for fake-server tests.
pub fn quick_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// Connects to `addr`/`export` or panics with the error.
pub async fn connect(addr: &str, export: &str, config: ClientConfig) -> Client {
    within("connect", Client::connect(addr, export, config))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}/{export}: {e}"))
}
