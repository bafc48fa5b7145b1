//! Fault injection for tests: make a volume's storage slow or broken.
//!
//! Compiled into the store only with the `fault-injection` cargo feature;
//! set from the config (`[[fault]]`, testing only) or over gRPC (the
//! `Fault` service, served only by such builds). Delays are asynchronous
//! sleeps, so a slow volume holds requests (and their throttle units), not
//! threads; the bandwidth limit paces operations one after another, like a
//! device with that throughput.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nbdraid_proto::ByteSize;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// A fault declared in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FaultSpec {
    /// The volume it applies to.
    pub volume: String,
    /// Added to every storage operation, in microseconds.
    pub delay_us: u64,
    /// Storage throughput limit in bytes per second (0 = none).
    pub bandwidth: ByteSize,
    /// Reads fail with EIO.
    pub fail_reads: bool,
    /// Writes (and trim/zero) fail with EIO.
    pub fail_writes: bool,
    /// Flushes fail with EIO.
    pub fail_flush: bool,
}

/// Which kind of operation a fault check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads, cache, block status.
    Read,
    /// Writes, trim, write zeroes.
    Write,
    /// Flush.
    Flush,
}

/// The live fault settings of one volume.
#[derive(Debug, Default)]
pub struct FaultState {
    active: AtomicBool,
    delay_us: AtomicU64,
    bandwidth: AtomicU64,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_flush: AtomicBool,
    next_free: Mutex<Option<Instant>>,
}

impl FaultState {
    /// Replaces the settings.
    pub fn set(&self, f: &FaultSpec) {
        self.delay_us.store(f.delay_us, Ordering::Relaxed);
        self.bandwidth.store(f.bandwidth.0, Ordering::Relaxed);
        self.fail_reads.store(f.fail_reads, Ordering::Relaxed);
        self.fail_writes.store(f.fail_writes, Ordering::Relaxed);
        self.fail_flush.store(f.fail_flush, Ordering::Relaxed);
        let active =
            f.delay_us > 0 || f.bandwidth.0 > 0 || f.fail_reads || f.fail_writes || f.fail_flush;
        self.active.store(active, Ordering::Release);
    }

    /// Reports whether any fault is set.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Applies the faults to one operation of `len` bytes on `volume`:
    /// fails it, or delays it, or lets it through.
    pub async fn apply(&self, volume: &str, op: FaultOp, len: u64) -> Result<()> {
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let fail = match op {
            FaultOp::Read => self.fail_reads.load(Ordering::Relaxed),
            FaultOp::Write => self.fail_writes.load(Ordering::Relaxed),
            FaultOp::Flush => self.fail_flush.load(Ordering::Relaxed),
        };
        if fail {
            return Err(Error::io(
                "injected fault",
                volume,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let delay = self.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let bw = self.bandwidth.load(Ordering::Relaxed);
        if bw > 0 && len > 0 {
            let cost = Duration::from_secs_f64(len as f64 / bw as f64);
            let done_at = {
                let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
                let start = next.map_or(Instant::now(), |n| n.max(Instant::now()));
                *next = Some(start + cost);
                start + cost
            };
            tokio::time::sleep_until(done_at).await;
        }
        Ok(())
    }
}
