//! The block-device trait the NBD engine serves.
//!
//! The node's file store implements it for volumes, the RAID layer for
//! arrays, and [`crate::mem::MemDevice`] for in-process tests, so all are
//! served by the same engine.
//!
//! Conventions:
//! - Operations return `'static` boxed futures, so the engine can poll one
//!   once inline and only spawn it when it has to wait (a page-cache hit
//!   completes on that first poll with no task hand-off).
//! - Buffers are owned [`IoBuf`]s from the engine's pool: a write hands its
//!   payload over (it returns to the pool when the device drops it), a read
//!   fills the buffer it is given and hands it back.
//! - The engine validates ranges, flags and read-only state against
//!   [`DeviceInfo`] before calling; devices may rely on that.
//! - [`BlockDevice::cost`] is this layer's cost model in throttle units
//!   (bytes of buffer memory), a conservative upper bound per request.

use futures::future::BoxFuture;
use nbdraid_proto::transmission::Extent as WireExtent;

use crate::buffer::{IoBuf, MappedSlice};
use crate::error::Result;

/// A future returned by a device operation.
pub type IoFuture<T> = BoxFuture<'static, Result<T>>;

/// The operations a device serves, as the throttle's cost model names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
}

impl OpKind {
    /// Every operation, in a stable order.
    pub const ALL: [OpKind; 7] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Trim,
        OpKind::WriteZeroes,
        OpKind::Cache,
        OpKind::BlockStatus,
    ];

    /// Returns the lower-case name used in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Cache => "cache",
            OpKind::BlockStatus => "block_status",
        }
    }

    /// Returns the index of this operation in [`OpKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Returns the operation named `name` (as [`OpKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Reports whether the request carries or returns a data buffer of its length.
    pub fn has_data(self) -> bool {
        matches!(self, OpKind::Read | OpKind::Write)
    }
}

/// Which traffic class a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IoClass {
    /// Application I/O.
    #[default]
    Foreground,
    /// Rebuild, resync and scrub traffic.
    Background,
}

/// Per-request context: who sent it and in which class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoContext {
    /// The upstream (registered grant holder) the request came from, 0 if none.
    pub upstream: u64,
    /// Foreground or background.
    pub class: IoClass,
}

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size (a power of two, at most 64 KiB).
    pub min: u32,
    /// Preferred block size (a power of two, at least 512).
    pub preferred: u32,
    /// Maximum payload of one READ or WRITE.
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        }
    }
}

/// What a device is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
    /// FLUSH/FUA on one connection are visible on every connection.
    pub multi_conn: bool,
    /// TRIM is meaningful.
    pub can_trim: bool,
    /// WRITE_ZEROES is supported.
    pub can_zero: bool,
    /// WRITE_ZEROES with FAST_ZERO is supported.
    pub can_fast_zero: bool,
    /// CACHE is supported.
    pub can_cache: bool,
    /// The medium is rotational (a hint).
    pub rotational: bool,
    /// Free-text description for NBD_INFO_DESCRIPTION and LIST.
    pub description: String,
}

/// Flags of WRITE_ZEROES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// Durable before completion.
    pub fua: bool,
    /// The range must stay allocated (no hole punching).
    pub no_hole: bool,
    /// Fail with [`crate::Error::FastZeroUnsupported`] rather than be slow.
    pub fast: bool,
}

/// One block status extent: a length and `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// `base:allocation` flags (HOLE, ZERO).
    pub flags: u32,
}

impl Extent {
    /// Splits this extent into wire extents (each at most `u32::MAX` bytes,
    /// aligned down to 4 KiB when split).
    pub fn to_wire(self, out: &mut Vec<WireExtent>) {
        const MAX: u64 = (u32::MAX as u64) & !4095;
        let mut left = self.len;
        while left > 0 {
            let n = left.min(MAX);
            out.push(WireExtent {
                length: n as u32,
                flags: self.flags,
            });
            left -= n;
        }
    }
}

/// What a request holds beneath its layer while it runs (for an array: its
/// units of the grants at the members it touches). Dropped when the
/// request completes.
#[derive(Default)]
pub struct Reservation(
    #[allow(dead_code, reason = "held for its drop")] Option<Box<dyn Send + Sync>>,
);

impl Reservation {
    /// Returns a reservation holding nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// Returns a reservation holding `guard` until it is dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }
}

/// A block device served over NBD.
pub trait BlockDevice: Send + Sync + 'static {
    /// Returns what the device is and can do, as of now.
    fn info(&self) -> DeviceInfo;

    /// Fills `buf` (its length is the request's) from `offset`.
    fn read(&self, ctx: IoContext, offset: u64, buf: IoBuf) -> IoFuture<IoBuf>;

    /// Returns the data of `[offset, offset+len)` without copying it, when
    /// the device can (a memory-backed volume serves a view of its
    /// mapping); `None` sends the engine to [`BlockDevice::read`].
    fn read_zero_copy(&self, _ctx: IoContext, _offset: u64, _len: usize) -> Option<MappedSlice> {
        None
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable on completion.
    /// The buffer returns to its pool when the device drops it.
    fn write(&self, ctx: IoContext, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<()>;

    /// Makes every completed write durable.
    fn flush(&self, ctx: IoContext) -> IoFuture<()>;

    /// Discards a range (advisory: contents afterwards are unspecified).
    fn trim(&self, ctx: IoContext, offset: u64, len: u64, fua: bool) -> IoFuture<()>;

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, ctx: IoContext, offset: u64, len: u64, flags: ZeroFlags)
    -> IoFuture<()>;

    /// Hints that a range will be read soon.
    fn cache(&self, ctx: IoContext, offset: u64, len: u64) -> IoFuture<()>;

    /// Describes the allocation of `[offset, offset+len)` in at most
    /// `max_extents` extents starting at `offset`, covering at least one byte.
    fn block_status(
        &self,
        ctx: IoContext,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> IoFuture<Vec<Extent>>;

    /// Returns the units (bytes of buffer memory) a request of this kind and
    /// length may use in this layer and every layer beneath it; an upper
    /// bound, read from the same [`crate::cost::SharedCostModel`] the layer
    /// publishes, so the two cannot drift apart.
    fn cost(&self, op: OpKind, len: u64) -> u64;

    /// Reserves what the request will need beneath this layer, after its
    /// own units ([`BlockDevice::cost`]) and before a write's payload is
    /// read: the engine awaits it in the connection's reader, so waiting
    /// here pushes back on the client like waiting for the throttle. The
    /// reservation is held until the request completes. Devices with
    /// nothing beneath them return `None` (the default).
    fn reserve(
        &self,
        _ctx: IoContext,
        _op: OpKind,
        _offset: u64,
        _len: u64,
    ) -> Option<IoFuture<Reservation>> {
        None
    }
}
