//! Fault injection for tests: a wrapper that makes any device slow or broken.
//!
//! [`FaultyDevice`] wraps a [`BlockDevice`] and consults a shared
//! [`FaultControl`] before every operation: it can hang the operation until
//! released, fail it with EIO (per operation kind), delay it, and pace it
//! to a bandwidth. The settings change at run time (a test flips them while
//! I/O is in flight). With nothing set, an operation costs one atomic load
//! and goes straight to the inner device.
//!
//! Delays are asynchronous sleeps taken *before* the inner operation is
//! issued, so a slow device holds requests (and their throttle units), not
//! threads; the bandwidth limit paces operations one after another, like a
//! device with that throughput. A daemon decides whether to wrap its
//! devices at all (the node only in builds with its `fault-injection`
//! feature).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::buffer::{IoBuf, MappedSlice};
use crate::device::{BlockDevice, DeviceInfo, Extent, IoContext, IoFuture, OpKind, ZeroFlags};
use crate::error::{Error, Result};

/// A set of operation kinds (a bit per [`OpKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpSet(u8);

impl OpSet {
    /// No operation.
    pub const NONE: OpSet = OpSet(0);

    /// Returns the set holding `ops`.
    pub fn of(ops: &[OpKind]) -> Self {
        OpSet(ops.iter().fold(0, |m, op| m | 1 << op.index()))
    }

    /// Reads and the read-like advisory operations: READ, CACHE, BLOCK_STATUS.
    pub fn reads() -> Self {
        Self::of(&[OpKind::Read, OpKind::Cache, OpKind::BlockStatus])
    }

    /// Everything that modifies data: WRITE, TRIM, WRITE_ZEROES.
    pub fn writes() -> Self {
        Self::of(&[OpKind::Write, OpKind::Trim, OpKind::WriteZeroes])
    }

    /// Returns the union of two sets.
    pub fn union(self, other: OpSet) -> Self {
        OpSet(self.0 | other.0)
    }

    /// Reports whether `op` is in the set.
    pub fn contains(self, op: OpKind) -> bool {
        self.0 & (1 << op.index()) != 0
    }

    /// Reports whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One complete fault setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Added to every operation.
    pub delay: Duration,
    /// Throughput limit in bytes per second (0 = none).
    pub bandwidth: u64,
    /// Operations that fail with EIO.
    pub fail: OpSet,
    /// Every operation waits until this is cleared (a stopped device).
    pub hang: bool,
}

impl Faults {
    /// Reports whether any fault is set.
    pub fn any(&self) -> bool {
        !self.delay.is_zero() || self.bandwidth > 0 || !self.fail.is_empty() || self.hang
    }
}

/// The live fault settings of one device, shared with whoever changes them.
#[derive(Debug)]
pub struct FaultControl {
    active: AtomicBool,
    delay_us: AtomicU64,
    bandwidth: AtomicU64,
    fail: AtomicU8,
    hang: watch::Sender<bool>,
    next_free: Mutex<Option<Instant>>,
}

impl Default for FaultControl {
    fn default() -> Self {
        Self {
            active: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            fail: AtomicU8::new(0),
            hang: watch::Sender::new(false),
            next_free: Mutex::new(None),
        }
    }
}

impl FaultControl {
    /// Returns a control with no fault set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the settings; clearing `hang` releases every waiting operation.
    pub fn set(&self, f: Faults) {
        self.delay_us
            .store(f.delay.as_micros() as u64, Ordering::Relaxed);
        self.bandwidth.store(f.bandwidth, Ordering::Relaxed);
        self.fail.store(f.fail.0, Ordering::Relaxed);
        self.hang.send_replace(f.hang);
        self.active.store(f.any(), Ordering::Release);
    }

    /// Returns the current settings.
    pub fn get(&self) -> Faults {
        Faults {
            delay: Duration::from_micros(self.delay_us.load(Ordering::Relaxed)),
            bandwidth: self.bandwidth.load(Ordering::Relaxed),
            fail: OpSet(self.fail.load(Ordering::Relaxed)),
            hang: *self.hang.borrow(),
        }
    }

    /// Reports whether any fault is set.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Applies the faults to one operation of `len` bytes on `what`: waits
    /// out a hang, fails it, or delays it, or lets it through.
    pub async fn apply(&self, what: &str, op: OpKind, len: u64) -> Result<()> {
        if !self.active() {
            return Ok(());
        }
        if *self.hang.borrow() {
            let mut rx = self.hang.subscribe();
            // The sender lives as long as `self`: this ends when hang is cleared.
            let _ = rx.wait_for(|hung| !*hung).await;
        }
        if OpSet(self.fail.load(Ordering::Relaxed)).contains(op) {
            return Err(Error::io(
                "injected fault",
                what,
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

/// A device whose operations pass through a [`FaultControl`] first.
pub struct FaultyDevice<D> {
    inner: Arc<D>,
    name: String,
    control: Arc<FaultControl>,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner` (named `name` in injected errors) with no fault set.
    pub fn new(inner: Arc<D>, name: impl Into<String>) -> Self {
        Self {
            inner,
            name: name.into(),
            control: FaultControl::new(),
        }
    }

    /// Returns the control that changes this device's faults.
    pub fn control(&self) -> &Arc<FaultControl> {
        &self.control
    }

    /// Returns the wrapped device.
    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }

    /// Runs `f` on the inner device once the faults let `op` through.
    fn gated<T: Send + 'static>(
        &self,
        op: OpKind,
        len: u64,
        f: impl FnOnce(&D) -> IoFuture<T> + Send + 'static,
    ) -> IoFuture<T> {
        if !self.control.active() {
            return f(&self.inner);
        }
        let (inner, control, name) = (self.inner.clone(), self.control.clone(), self.name.clone());
        Box::pin(async move {
            control.apply(&name, op, len).await?;
            f(&inner).await
        })
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn read(&self, ctx: IoContext, offset: u64, buf: IoBuf) -> IoFuture<IoBuf> {
        let len = buf.len() as u64;
        self.gated(OpKind::Read, len, move |d| d.read(ctx, offset, buf))
    }

    fn read_zero_copy(&self, ctx: IoContext, offset: u64, len: usize) -> Option<MappedSlice> {
        // Faulted reads must take the path that applies the faults.
        if self.control.active() {
            return None;
        }
        self.inner.read_zero_copy(ctx, offset, len)
    }

    fn write(&self, ctx: IoContext, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<()> {
        let len = buf.len() as u64;
        self.gated(OpKind::Write, len, move |d| d.write(ctx, offset, buf, fua))
    }

    fn flush(&self, ctx: IoContext) -> IoFuture<()> {
        self.gated(OpKind::Flush, 0, move |d| d.flush(ctx))
    }

    fn trim(&self, ctx: IoContext, offset: u64, len: u64, fua: bool) -> IoFuture<()> {
        self.gated(OpKind::Trim, 0, move |d| d.trim(ctx, offset, len, fua))
    }

    fn write_zeroes(
        &self,
        ctx: IoContext,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> IoFuture<()> {
        self.gated(OpKind::WriteZeroes, 0, move |d| {
            d.write_zeroes(ctx, offset, len, flags)
        })
    }

    fn cache(&self, ctx: IoContext, offset: u64, len: u64) -> IoFuture<()> {
        self.gated(OpKind::Cache, 0, move |d| d.cache(ctx, offset, len))
    }

    fn block_status(
        &self,
        ctx: IoContext,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> IoFuture<Vec<Extent>> {
        self.gated(OpKind::BlockStatus, 0, move |d| {
            d.block_status(ctx, offset, len, max_extents)
        })
    }

    fn cost(&self, op: OpKind, len: u64) -> u64 {
        self.inner.cost(op, len)
    }
}
