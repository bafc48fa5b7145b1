//! The client suite's adapters over the shared test harness
//! ([`nbdraid_harness`]), plus what only this suite needs.
//!
//! - [`servers`]: the real servers (`nbdraid-node`, `nbdkit memory`,
//!   `qemu-nbd`) behind one [`servers::Server`], each started by the
//!   harness's launcher for it.
//! - [`fake`]: an in-process NBD server speaking the real codec from
//!   `nbdraid_proto`, for what real servers cannot be made to do (answer in
//!   reverse order, stall, send EIO or malformed replies).
//! - Here: async hang detectors and connecting. Test data and its
//!   comparison are the harness's (`nbdraid_harness::{pattern, assert_same}`).
//!
//! Every timeout in these tests is a hang detector (generous, scaled by
//! `NBDRAID_TEST_HANG_SECS` like the rest of the harness), never a
//! performance assertion.

#![allow(dead_code)]

pub mod fake;
pub mod servers;

use std::future::Future;
use std::time::Duration;

use nbdraid_client::{Client, ClientConfig};
use nbdraid_harness::hang;

/// Awaits `fut`, panicking with `what` if it takes longer than the
/// harness's standard hang detector (`hang(30)`).
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(hang(30), what, fut).await
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hang detector: {what} did not finish within {limit:?}"),
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
