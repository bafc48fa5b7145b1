//! A volume stored in a sparse file.
//!
//! FLUSH is fdatasync, FUA is a `RWF_DSYNC` write, TRIM punches a hole,
//! WRITE_ZEROES punches a hole or zeroes a range with fallocate (allocating
//! when NO_HOLE asks for it), BLOCK_STATUS comes from SEEK_DATA/SEEK_HOLE.
//! Ranges of any size are done completely, a bounded piece at a time.
//!
//! Where I/O runs (see `ARCHITECTURE.md` for the measurements behind it):
//! - On a memory-backed file system (tmpfs) nothing ever waits for a
//!   device, so reads and writes run inline on the connection's task: no
//!   thread hand-off, which is most of the cost of a 4 KiB request.
//! - Elsewhere a read first tries `preadv2(RWF_NOWAIT)`, which succeeds
//!   inline when the page cache holds the data, and falls back to the
//!   blocking pool for the rest.
//! - A buffered write there (no FUA, at most [`INLINE_WRITE_MAX`]) is a copy
//!   into the page cache, normally done in microseconds, but the kernel
//!   offers no non-blocking form of it (ext4 refuses `RWF_NOWAIT` writes).
//!   So it runs inline while such writes stay fast ([`WritePlacement`]),
//!   and after one that took over [`SLOW_WRITE`] (writeback throttling, a
//!   journal wait, a read-modify-write from disk) writes go to the blocking
//!   pool for [`POOL_AFTER_SLOW`]; then one probe write tries inline, and
//!   only a fast probe brings the others back.
//! - FUA writes, syncs and fallocate wait for the device: always the pool.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use memmap2::{Mmap, MmapOptions};

use nbdraid_engine::buffer::{IoBuf, MappedSlice};
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::device::{
    BlockDevice, BlockSizes, DeviceInfo, Extent, IoContext, IoFuture, OpKind, ZeroFlags,
};
use nbdraid_engine::{Error, Result};

use crate::store::sys::{self, NoWait};
use nbdraid_proto::consts::allocation;

/// Largest range handed to one fallocate call, so huge TRIM/WRITE_ZEROES
/// requests progress in pieces.
const FALLOCATE_PIECE: u64 = 1 << 30;
/// Size of the zero buffer used when a file system cannot zero by fallocate.
const ZERO_PIECE: usize = 1 << 20;

/// Largest buffered write that may run inline on a disk-backed volume.
pub const INLINE_WRITE_MAX: usize = 1 << 20;
/// An inline write slower than this is taken as having waited for the device.
pub const SLOW_WRITE: Duration = Duration::from_millis(2);
/// How long writes stay on the blocking pool after a slow inline write.
pub const POOL_AFTER_SLOW: Duration = Duration::from_secs(1);

/// Where buffered writes to a disk-backed volume run: inline (no thread
/// hand-off, which costs more than the copy itself for small writes) until
/// one turns out slow, then on the blocking pool for a while, so a
/// device that stalls writers stalls a pool thread, not the runtime. When
/// that while is over, a single probe write goes inline (the others stay
/// on the pool) and only a fast probe brings every write back inline, so
/// a device that is still slow blocks at most one runtime worker per
/// period.
#[derive(Debug)]
pub struct WritePlacement {
    epoch: quanta::Instant,
    /// Nanoseconds after `epoch` until which writes go to the pool; 0 = inline.
    pool_until: AtomicU64,
    /// A probe write is in progress.
    probing: AtomicBool,
    /// Times a slow write moved writes to the pool.
    pub slow_writes: AtomicU64,
    counter: metrics::Counter,
}

/// Where one write runs, from [`WritePlacement::place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inline: writes have been fast.
    Inline,
    /// Inline, as the one write testing whether the device is fast again.
    Probe,
    /// On the blocking pool.
    Pool,
}

impl Default for WritePlacement {
    fn default() -> Self {
        Self::new(metrics::Counter::noop())
    }
}

impl WritePlacement {
    /// Returns a placement that starts inline and counts slow writes in `counter` too.
    pub fn new(counter: metrics::Counter) -> Self {
        Self {
            epoch: quanta::Instant::now(),
            pool_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            slow_writes: AtomicU64::new(0),
            counter,
        }
    }

    fn nanos(&self, t: quanta::Instant) -> u64 {
        u64::try_from(t.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Decides where a write starting at `now` runs. A [`Placement::Probe`]
    /// must be followed by [`WritePlacement::record`], error or not.
    pub fn place(&self, now: quanta::Instant) -> Placement {
        let until = self.pool_until.load(Ordering::Relaxed);
        if until == 0 {
            return Placement::Inline;
        }
        if self.nanos(now) < until {
            return Placement::Pool;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => Placement::Probe,
            Err(_) => Placement::Pool,
        }
    }

    /// Records an inline write placed `how` that ran from `start` to `end`;
    /// returns true if it was slow and writes now go to the pool.
    pub fn record(&self, how: Placement, start: quanta::Instant, end: quanta::Instant) -> bool {
        let slow = end.duration_since(start) > SLOW_WRITE;
        if slow {
            let until = self
                .nanos(end)
                .saturating_add(POOL_AFTER_SLOW.as_nanos() as u64)
                .max(1);
            self.pool_until.fetch_max(until, Ordering::Relaxed);
            self.slow_writes.fetch_add(1, Ordering::Relaxed);
            self.counter.increment(1);
        } else if how == Placement::Probe {
            // Fast again: everything inline, unless a slow write since then
            // started a new period.
            let now = self.nanos(end);
            let _ = self
                .pool_until
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    (u != 0 && now >= u).then_some(0)
                });
        }
        if how == Placement::Probe {
            self.probing.store(false, Ordering::Release);
        }
        slow
    }
}

/// How the store issues file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// Inline on memory-backed file systems; elsewhere non-blocking reads
    /// and buffered writes inline while they do not wait (see the module
    /// documentation), and everything else on the blocking pool.
    #[default]
    Auto,
    /// Always inline (for page-cache-friendly disks where latency matters more
    /// than isolation from a stalled device).
    Inline,
    /// Always on the blocking pool.
    Blocking,
}

/// A volume backed by a sparse file.
#[derive(Debug, Clone)]
pub struct FileVolume {
    inner: Arc<Inner>,
    model: SharedCostModel,
}

#[derive(Debug)]
struct Inner {
    name: String,
    file: File,
    size: AtomicU64,
    read_only: bool,
    inline: bool,
    nowait_reads: AtomicBool,
    /// Set in auto mode on disk-backed storage: buffered writes inline while fast.
    adaptive_writes: Option<WritePlacement>,
    block_sizes: BlockSizes,
    /// Read-only mapping of the whole volume, on memory-backed storage only.
    map: Option<RwLock<Arc<Mmap>>>,
}

/// Maps `len` bytes of `file` read-only.
fn map_file(file: &File, len: u64) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is shared with the file, which this process also
    // writes (pwrite) and punches holes in; it is never truncated below
    // `len` (volumes only grow). The bytes are only ever handed to the
    // kernel in a vectored write of a READ reply, never inspected by Rust
    // code; a WRITE that changes them concurrently is a request concurrent
    // with that READ, whose result NBD leaves undefined. Memory-backed
    // files have no I/O errors to raise SIGBUS, and reading a hole maps the
    // zero page without allocating.
    unsafe { MmapOptions::new().len(len as usize).map(file) }
}

impl Inner {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn err(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(op, &self.name, e)
    }
}

impl FileVolume {
    /// Wraps an open file holding the volume `name` of `size` bytes.
    pub fn new(
        name: &str,
        file: File,
        size: u64,
        read_only: bool,
        mode: IoMode,
        block_sizes: BlockSizes,
        model: SharedCostModel,
    ) -> Self {
        let memory = sys::is_memory_backed(file.as_raw_fd());
        let inline = match mode {
            IoMode::Auto => memory,
            IoMode::Inline => true,
            IoMode::Blocking => false,
        };
        // Auto mode on a disk: reads try RWF_NOWAIT, buffered writes adapt.
        let auto_on_disk = mode == IoMode::Auto && !memory;
        // Zero-copy reads only where a page fault can never block on a
        // device or raise SIGBUS on an I/O error.
        let map = (memory && mode != IoMode::Blocking)
            .then(|| map_file(&file, size))
            .and_then(|m| match m {
                Ok(m) => Some(RwLock::new(Arc::new(m))),
                Err(e) => {
                    tracing::warn!(volume = name, error = %e, "cannot map volume; reads will copy");
                    None
                }
            });
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                file,
                size: AtomicU64::new(size),
                read_only,
                inline,
                nowait_reads: AtomicBool::new(auto_on_disk),
                adaptive_writes: auto_on_disk.then(|| {
                    WritePlacement::new(metrics::counter!(
                        "nbdraid_slow_inline_writes_total",
                        "volume" => name.to_string()
                    ))
                }),
                block_sizes,
                map,
            }),
            model,
        }
    }

    /// Returns the volume's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Returns the current size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Grows the volume to `new_size` bytes (the new range reads as zeroes).
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let inner = &self.inner;
        inner
            .file
            .set_len(new_size)
            .and_then(|_| inner.file.sync_all())
            .map_err(|e| inner.err("resize", e))?;
        if let Some(lock) = &inner.map {
            let m = map_file(&inner.file, new_size).map_err(|e| inner.err("map", e))?;
            // Views of the old mapping stay valid until their replies are sent.
            *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
        }
        inner.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Reports whether reads and writes run inline (memory-backed storage or
    /// `io-mode = "inline"`).
    pub fn inline_io(&self) -> bool {
        self.inner.inline
    }

    /// The adaptive placement of buffered writes (auto mode on disk-backed
    /// storage only).
    pub fn write_placement(&self) -> Option<&WritePlacement> {
        self.inner.adaptive_writes.as_ref()
    }
}

async fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    op: &'static str,
    f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
) -> Result<T> {
    let inner2 = inner.clone();
    tokio::task::spawn_blocking(move || f(&inner2))
        .await
        .map_err(|e| inner.err(op, std::io::Error::other(e)))?
}

fn punch(inner: &Inner, offset: u64, len: u64) -> std::io::Result<()> {
    for_pieces(offset, len, FALLOCATE_PIECE, |off, n| {
        sys::fallocate(
            inner.fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    })
}

fn for_pieces(
    offset: u64,
    len: u64,
    piece: u64,
    mut f: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut off = offset;
    let end = offset + len;
    while off < end {
        let n = (end - off).min(piece);
        f(off, n)?;
        off += n;
    }
    Ok(())
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Zeroes `[offset, offset+len)` so that it reads as zeroes, honouring NO_HOLE
/// and FAST_ZERO, trying the cheapest method first.
fn zero_range(inner: &Inner, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    let fd = inner.fd();
    let zero_mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    if !flags.no_hole {
        match punch(inner, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(inner.err("punch hole", e)),
        }
    }
    match for_pieces(offset, len, FALLOCATE_PIECE, |o, n| {
        sys::fallocate(fd, zero_mode, o, n)
    }) {
        Ok(()) => return Ok(()),
        Err(e) if unsupported(&e) => {}
        Err(e) => return Err(inner.err("zero range", e)),
    }
    // No ZERO_RANGE (tmpfs): punch, then allocate the range again.
    if punch(inner, offset, len).is_ok() {
        match for_pieces(offset, len, FALLOCATE_PIECE, |o, n| {
            sys::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, o, n)
        }) {
            Ok(()) => return Ok(()),
            // The hole already reads as zeroes; allocation failing for lack of
            // support still leaves correct contents.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(inner.err("allocate", e)),
        }
    }
    if flags.fast {
        return Err(Error::FastZeroUnsupported);
    }
    let zeroes = vec![0u8; ZERO_PIECE.min(len as usize)];
    for_pieces(offset, len, ZERO_PIECE as u64, |o, n| {
        sys::write_at(fd, &zeroes[..n as usize], o, false)
    })
    .map_err(|e| inner.err("write zeroes", e))
}

fn block_status(inner: &Inner, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
    let fd = inner.fd();
    let end = offset + len;
    let size = inner.size.load(Ordering::Acquire);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    let hole = allocation::HOLE | allocation::ZERO;
    while pos < end && out.len() < max {
        let data = sys::seek(fd, pos, libc::SEEK_DATA).map_err(|e| inner.err("seek data", e))?;
        let (next, flags) = match data {
            None => (end, hole),
            Some(d) if d > pos => (d.min(end), hole),
            Some(_) => {
                let h = sys::seek(fd, pos, libc::SEEK_HOLE)
                    .map_err(|e| inner.err("seek hole", e))?
                    .unwrap_or(size);
                (h.min(end).max(pos + 1), 0)
            }
        };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += next - pos,
            _ => out.push(Extent {
                len: next - pos,
                flags,
            }),
        }
        pos = next;
    }
    Ok(out)
}

impl BlockDevice for FileVolume {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size(),
            read_only: self.inner.read_only,
            block_sizes: self.inner.block_sizes,
            multi_conn: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: true,
            rotational: false,
            description: format!(
                "nbdraid volume {} ({})",
                self.inner.name,
                nbdraid_proto::units::format_size(self.size())
            ),
        }
    }

    fn read(&self, _ctx: IoContext, offset: u64, mut buf: IoBuf) -> IoFuture<IoBuf> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut done = 0usize;
            if inner.inline {
                sys::read_at(inner.fd(), &mut buf, offset).map_err(|e| inner.err("read", e))?;
                return Ok(buf);
            }
            if inner.nowait_reads.load(Ordering::Relaxed) {
                match sys::read_at_nowait(inner.fd(), &mut buf, offset)
                    .map_err(|e| inner.err("read", e))?
                {
                    NoWait::Done => return Ok(buf),
                    NoWait::Partial(n) => done = n,
                    NoWait::Unsupported => inner.nowait_reads.store(false, Ordering::Relaxed),
                }
            }
            blocking(&inner, "read", move |i| {
                sys::read_at(i.fd(), &mut buf[done..], offset + done as u64)
                    .map_err(|e| i.err("read", e))?;
                Ok(buf)
            })
            .await
        })
    }

    fn read_zero_copy(&self, _ctx: IoContext, offset: u64, len: usize) -> Option<MappedSlice> {
        let map = self
            .inner
            .map
            .as_ref()?
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        MappedSlice::new(map, usize::try_from(offset).ok()?, len)
    }

    fn write(&self, _ctx: IoContext, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if inner.inline {
                sys::write_at(inner.fd(), &buf, offset, fua).map_err(|e| inner.err("write", e))?;
                return Ok(());
            }
            if let Some(place) = &inner.adaptive_writes
                && !fua
                && buf.len() <= INLINE_WRITE_MAX
            {
                let start = quanta::Instant::now();
                let how = place.place(start);
                if how != Placement::Pool {
                    let written = sys::write_at(inner.fd(), &buf, offset, false);
                    let end = quanta::Instant::now();
                    if place.record(how, start, end) {
                        tracing::debug!(
                            volume = %inner.name,
                            took = ?end.duration_since(start),
                            "slow inline write: writes go to the blocking pool for a while"
                        );
                    }
                    written.map_err(|e| inner.err("write", e))?;
                    return Ok(());
                }
            }
            blocking(&inner, "write", move |i| {
                sys::write_at(i.fd(), &buf, offset, fua).map_err(|e| i.err("write", e))?;
                Ok(())
            })
            .await
        })
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            blocking(&inner, "flush", |i| {
                sys::datasync(i.fd()).map_err(|e| i.err("flush", e))
            })
            .await
        })
    }

    fn trim(&self, _ctx: IoContext, offset: u64, len: u64, fua: bool) -> IoFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            blocking(&inner, "trim", move |i| {
                match punch(i, offset, len) {
                    Ok(()) => {}
                    // TRIM is advisory: a file system without hole punching ignores it.
                    Err(e) if unsupported(&e) => {}
                    Err(e) => return Err(i.err("trim", e)),
                }
                if fua {
                    sys::datasync(i.fd()).map_err(|e| i.err("flush", e))?;
                }
                Ok(())
            })
            .await
        })
    }

    fn write_zeroes(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> IoFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            blocking(&inner, "write zeroes", move |i| {
                zero_range(i, offset, len, flags)?;
                if flags.fua {
                    sys::datasync(i.fd()).map_err(|e| i.err("flush", e))?;
                }
                Ok(())
            })
            .await
        })
    }

    fn cache(&self, _ctx: IoContext, offset: u64, len: u64) -> IoFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // Advisory: a failure to prefetch is not an error of the request.
            if let Err(e) = sys::will_need(inner.fd(), offset, len) {
                tracing::debug!(volume = %inner.name, error = %e, "fadvise WILLNEED failed");
            }
            Ok(())
        })
    }

    fn block_status(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> IoFuture<Vec<Extent>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if inner.inline {
                return block_status(&inner, offset, len, max_extents);
            }
            blocking(&inner, "block status", move |i| {
                block_status(i, offset, len, max_extents)
            })
            .await
        })
    }

    fn cost(&self, op: OpKind, len: u64) -> u64 {
        self.model.cost(op, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dir: &tempfile::TempDir, size: u64) -> FileVolume {
        let path = dir.path().join("v.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let model = SharedCostModel::new(nbdraid_engine::cost::CostModel::buffers("node"));
        FileVolume::new(
            "v",
            f,
            size,
            false,
            IoMode::Auto,
            BlockSizes::default(),
            model,
        )
    }

    #[tokio::test]
    async fn zeroes_and_block_status() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 8 << 20);
        let ctx = IoContext::default();
        let data = IoBuf::from_vec(vec![0xabu8; 1 << 20]);
        v.write(ctx, 1 << 20, data, false).await.unwrap();
        let ext = v.block_status(ctx, 0, 8 << 20, 100).await.unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 8 << 20);
        assert_eq!(ext[0].flags, allocation::HOLE | allocation::ZERO);
        assert_eq!(ext[1].flags, 0);
        for no_hole in [false, true] {
            let flags = ZeroFlags {
                no_hole,
                ..Default::default()
            };
            v.write_zeroes(ctx, (1 << 20) + 4096, 8192, flags)
                .await
                .unwrap();
            let back = v.read(ctx, 1 << 20, IoBuf::zeroed(1 << 20)).await.unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0xab));
            assert!(back[4096..12288].iter().all(|&b| b == 0));
            assert!(back[12288..].iter().all(|&b| b == 0xab));
            v.write(ctx, 1 << 20, IoBuf::from_vec(vec![0xabu8; 1 << 20]), false)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn zero_copy_reads_see_writes_and_trims_on_tmpfs() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIP: no /dev/shm");
            return;
        };
        let v = volume(&dir, 1 << 20);
        let ctx = IoContext::default();
        assert!(v.inline_io());
        let view = v
            .read_zero_copy(ctx, 4096, 8192)
            .expect("tmpfs volumes map");
        assert!(view.iter().all(|&b| b == 0));
        drop(view);
        v.write(ctx, 4096, IoBuf::from_vec(vec![7u8; 8192]), false)
            .await
            .unwrap();
        let view = v.read_zero_copy(ctx, 4096, 8192).unwrap();
        assert!(view.iter().all(|&b| b == 7));
        v.trim(ctx, 0, 1 << 20, false).await.unwrap();
        assert!(
            v.read_zero_copy(ctx, 4096, 8192)
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        assert!(
            v.read_zero_copy(ctx, (1 << 20) - 4096, 8192).is_none(),
            "past the end"
        );
        v.grow(2 << 20).unwrap();
        assert!(
            v.read_zero_copy(ctx, (1 << 20) - 4096, 8192).is_some(),
            "after grow"
        );
    }

    #[test]
    fn write_placement_moves_to_the_pool_after_a_slow_write_and_probes_back() {
        use Placement::*;
        let p = WritePlacement::default();
        let ms = Duration::from_millis;
        let t0 = quanta::Instant::now();
        assert_eq!(p.place(t0), Inline);
        assert!(
            !p.record(Inline, t0, t0 + Duration::from_micros(900)),
            "fast"
        );
        assert_eq!(p.place(t0 + ms(1)), Inline);
        let end = t0 + SLOW_WRITE + ms(1);
        assert!(p.record(Inline, t0, end), "slow");
        assert_eq!(p.slow_writes.load(Ordering::Relaxed), 1);
        assert_eq!(p.place(end), Pool);
        assert_eq!(p.place(end + POOL_AFTER_SLOW - ms(1)), Pool);
        // The period is over: one probe at a time, the rest stay pooled.
        let t1 = end + POOL_AFTER_SLOW;
        assert_eq!(p.place(t1), Probe);
        assert_eq!(p.place(t1), Pool, "a second probe while one runs");
        // A slow probe: another period, and the probe slot is free again.
        assert!(p.record(Probe, t1, t1 + ms(3)));
        assert_eq!(p.place(t1 + ms(3)), Pool);
        let t2 = t1 + ms(3) + POOL_AFTER_SLOW;
        assert_eq!(p.place(t2), Probe);
        // A fast probe brings every write back inline.
        assert!(!p.record(Probe, t2, t2 + ms(1)));
        assert_eq!(p.place(t2 + ms(1)), Inline);
        assert_eq!(p.place(t2 + ms(1)), Inline);
        // An older slow write never shortens a later pool period.
        let t3 = t2 + ms(10);
        assert!(p.record(Inline, t3 - ms(3), t3 + ms(500)));
        assert!(p.record(Inline, t3 - ms(3), t3));
        assert_eq!(p.place(t3 + POOL_AFTER_SLOW), Pool);
        assert_eq!(p.place(t3 + ms(500) + POOL_AFTER_SLOW), Probe);
    }

    #[tokio::test]
    async fn disk_backed_writes_inline_then_pooled_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 8 << 20);
        let Some(place) = v.write_placement() else {
            eprintln!("SKIP: the temporary directory is memory-backed");
            return;
        };
        assert!(!v.inline_io());
        let ctx = IoContext::default();
        for (i, off) in [0u64, 4096, 1 << 20].into_iter().enumerate() {
            if i == 2 {
                // Pretend a write was slow: the next ones go to the pool.
                let t = quanta::Instant::now();
                assert!(place.record(Placement::Inline, t, t + SLOW_WRITE * 2));
                assert_eq!(place.place(quanta::Instant::now()), Placement::Pool);
            }
            let len = if i == 1 {
                INLINE_WRITE_MAX + 4096
            } else {
                4096
            };
            let data = vec![i as u8 + 1; len];
            v.write(ctx, off, IoBuf::from_vec(data.clone()), false)
                .await
                .unwrap();
            let back = v.read(ctx, off, IoBuf::zeroed(len)).await.unwrap();
            assert!(back[..] == data[..], "write {i} did not read back");
        }
        v.write(ctx, 4096, IoBuf::from_vec(vec![9u8; 4096]), true)
            .await
            .unwrap();
        let back = v.read(ctx, 4096, IoBuf::zeroed(4096)).await.unwrap();
        assert!(back.iter().all(|&b| b == 9), "FUA write");
    }

    #[tokio::test]
    async fn huge_zero_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let size = 300u64 << 20;
        let v = volume(&dir, size);
        let ctx = IoContext::default();
        for off in (0..size).step_by(64 << 20) {
            v.write(ctx, off, IoBuf::from_vec(vec![1u8; 4096]), false)
                .await
                .unwrap();
        }
        v.write_zeroes(ctx, 0, size, ZeroFlags::default())
            .await
            .unwrap();
        for off in (0..size).step_by(64 << 20) {
            let b = v.read(ctx, off, IoBuf::zeroed(4096)).await.unwrap();
            assert!(b.iter().all(|&x| x == 0), "offset {off} not zeroed");
        }
    }
}
