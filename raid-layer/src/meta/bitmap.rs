//! The write-intent bitmap: which regions of member data may differ
//! between members, so that a crash or a returning member costs a resync of
//! those regions instead of the whole array (md's `md-bitmap.c`).
//!
//! # What is on disk
//!
//! One bit per region: region `r` covers member data bytes
//! `r·region .. (r+1)·region` of every member (the same rows on every
//! member; the array maps a write to the member byte range it touches,
//! [`BitmapGeometry::regions_for`]). Bit `r` is bit `r % 8` (least
//! significant first) of byte `r / 8`; the bytes are written in 4 KiB
//! pages at [`BITMAP_OFFSET`](super::BITMAP_OFFSET), page `p` holding
//! regions `p·32768 .. (p+1)·32768`. Every live member holds the same
//! bitmap; at assembly the array ORs the bitmaps it reads ([`Bitmap::load`]).
//!
//! # Set before write
//!
//! [`Bitmap::start_write`] counts the write as pending on each region it
//! touches and returns only once each region's bit is *durable*: carried
//! by a page write (FUA, through [`PersistPages`]) that has completed. The
//! data write may only be issued then; the returned [`WriteGuard`] is
//! dropped when it has completed on the members. The fast path, every bit
//! durable already, is one atomic add per region: no lock, no allocation.
//!
//! Page writes are serialized: at most one write per page is in flight,
//! and it carries a snapshot of the page taken when it is issued. Two
//! overlapping writes of one page could otherwise land in either order,
//! and an older snapshot landing last would clear on disk a bit that a
//! newer writer was told is durable. Writers that need a page already being
//! written wait for that write: if its snapshot carries their bits they
//! are done (or get its error), else the first of them to wake writes the
//! page once more for all of them. A page is therefore written once per
//! batch of 0→1 transitions, not once per writer.
//!
//! # Clear lazily, and the sweep race
//!
//! [`Bitmap::sweep`] clears, in memory, the bits of regions with no
//! pending write, not awaiting resync and idle for a while, and returns the
//! pages to write (no FUA needed: a bit left set on disk costs only a
//! needless resync). They must be written after a flush of every member,
//! though: the data of a cleared region must be on stable media before its
//! bit goes, or a crash could lose a cached write on one member with no bit
//! left to say so (md writes bitmap pages with a preflush). It never clears
//! while the array is degraded: the bits are then what the failed member
//! missed.
//!
//! The race: a write to a just-cleared region may start after `sweep()`
//! and before the array has written the swept page. The writer sees its
//! bit not durable and must write the page with its bit set; if that FUA
//! write landed *before* the lazy sweep write of the same page, the sweep
//! write would clear the bit on disk while the data write is in flight,
//! and a crash would skip that region's resync. Hence [`SweepBatch`]:
//! the pages it returns stay claimed, as if being written, until the batch
//! is dropped, and a writer needing a claimed page waits for the drop,
//! then writes the page itself, so its write lands after the sweep's.
//! Writers whose bits stay durable are never delayed. The array must write
//! the batch promptly and must not hold it while waiting for data writes.
//!
//! A region's pending counter, its in-memory bit and its durability share
//! one atomic word, so a writer's increment and the sweep's clear cannot
//! interleave: the sweep clears with a compare-and-swap that fails if a
//! writer has arrived, and a writer that arrives after the clear sees its
//! bit not durable.
//!
//! # Resync
//!
//! The regions to resync (the dirty bits at assembly, [`Bitmap::resync_dirty`])
//! are kept in the same words, so that [`ResyncSet::is_pending`], asked on
//! every write to choose reconstruct-write over read-modify-write, is one
//! atomic load. Their bits are not cleared until they are resynced.
//!
//! # How the array uses it
//!
//! 1. Assembly: [`Bitmap::new`] with the superblock's geometry, then
//!    [`Bitmap::load`] the [`BitmapGeometry::bytes`] read at the bitmap
//!    offset of each live member (a returning member's survivors hold
//!    what it missed); [`Bitmap::resync_dirty`] if the array was not
//!    clean or a member returns; [`Bitmap::persist_all`] so that every
//!    live member holds the union.
//! 2. Each write: [`Bitmap::start_write`] on the regions of the member
//!    bytes it touches, the data write, then drop the guard.
//! 3. Every few seconds (md's `daemon_sleep` is 5 s): [`Bitmap::sweep`],
//!    flush every live member, write the batch's pages to them, drop the
//!    batch.
//! 4. Resync: for each region of [`ResyncSet::next_pending`], hold a
//!    `start_write` guard while making the members agree, then
//!    [`ResyncSet::done`].
//!
//! Time is tokio's [`Instant`], so tests can pause it. Memory: 12 bytes
//! per region (65,536 regions by default).

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BITMAP_PAGE_SIZE, BITS_PER_PAGE, MetaError};
/// The bitmap's geometry, defined beside the reserved region's layout.
pub use super::{BitmapGeometry, geometry_for};

const PAGE: usize = BITMAP_PAGE_SIZE as usize;

/// How the array writes bitmap pages: with FUA, to every live member,
/// completing only when they are durable.
pub trait PersistPages<E>: Send + Sync {
    /// Writes `pages`, each (page index, 4 KiB of bytes) at
    /// `BITMAP_OFFSET + index · 4096` on every live member.
    fn persist(&self, pages: Vec<(u64, Vec<u8>)>) -> BoxFuture<'_, Result<(), E>>;
}

// A region's word: pending writes in the low 28 bits (the array bounds
// its writes in flight far below 2^28), then three flags.
const PENDING: u32 = (1 << 28) - 1;
/// The region awaits resync.
const RESYNC: u32 = 1 << 28;
/// The bit is set in memory: the next write of its page carries it.
const SET: u32 = 1 << 29;
/// A completed page write carried the bit (implies SET).
const DURABLE: u32 = 1 << 30;

/// Per-region state, shared with guards and resync handles.
struct Regions {
    words: Box<[AtomicU32]>,
    /// Nanoseconds from `base` to the end of the region's last write.
    last: Box<[AtomicU64]>,
    base: Instant,
    set: AtomicU64,
    resync: AtomicU64,
}

impl Regions {
    fn word(&self, region: u64) -> &AtomicU32 {
        &self.words[region as usize]
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn flag(&self, region: u64, flag: u32) -> bool {
        self.words
            .get(region as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & flag != 0)
    }
}

enum Busy {
    Idle,
    /// A `start_write` leader is writing a snapshot taken at `snap_gen`.
    Writing {
        seq: u64,
        snap_gen: u64,
    },
    /// A live [`SweepBatch`] holds the page.
    Sweeping,
}

struct PageState<E> {
    /// Bumped on every change of the page's in-memory bits.
    generation: u64,
    busy: Busy,
    /// The number of the last write issued.
    seq: u64,
    /// The last failed write: its number and error.
    failure: Option<(u64, E)>,
}

struct Page<E> {
    state: Mutex<PageState<E>>,
    /// Woken when the page stops being busy.
    idle: Notify,
}

impl<E> Page<E> {
    fn lock(&self) -> MutexGuard<'_, PageState<E>> {
        // Nothing can panic while the lock is held; take it even if poisoned.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self) {
        self.lock().busy = Busy::Idle;
        self.idle.notify_waiters();
    }
}

/// The in-memory write-intent bitmap of an array: region counters, the
/// bits, their durability and the resync set. `E` is the error of the
/// array's [`PersistPages`]; `start_write` needs it `Clone` (one failed
/// page write fails every writer waiting for it) and `From<MetaError>`
/// (regions out of range). Share it by reference or in an `Arc`; the
/// guards and batches it returns own what they need (`'static`).
pub struct Bitmap<E> {
    geometry: BitmapGeometry,
    regions: Arc<Regions>,
    pages: Arc<[Page<E>]>,
}

impl<E> fmt::Debug for Bitmap<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("geometry", &self.geometry)
            .field("set_bits", &self.set_bits())
            .field("resync", &self.regions.resync.load(Ordering::Relaxed))
            .finish()
    }
}

impl<E> Bitmap<E> {
    /// Returns an all-clear bitmap of `geometry` (checked: region and bits).
    pub fn new(geometry: BitmapGeometry) -> Result<Self, MetaError> {
        geometry.check_shape()?;
        let n = geometry.bits as usize;
        let pages = (0..geometry.pages())
            .map(|_| Page {
                state: Mutex::new(PageState {
                    generation: 0,
                    busy: Busy::Idle,
                    seq: 0,
                    failure: None,
                }),
                idle: Notify::new(),
            })
            .collect();
        Ok(Bitmap {
            geometry,
            regions: Arc::new(Regions {
                words: (0..n).map(|_| AtomicU32::new(0)).collect(),
                last: (0..n).map(|_| AtomicU64::new(0)).collect(),
                base: Instant::now(),
                set: AtomicU64::new(0),
                resync: AtomicU64::new(0),
            }),
            pages,
        })
    }

    /// Returns the geometry.
    pub fn geometry(&self) -> &BitmapGeometry {
        &self.geometry
    }

    /// Returns the number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.geometry.pages()
    }

    /// Returns whether `region`'s bit is set in memory.
    pub fn is_set(&self, region: u64) -> bool {
        self.regions.flag(region, SET)
    }

    /// Returns whether `region`'s bit is known to be set on disk.
    pub fn is_durable(&self, region: u64) -> bool {
        self.regions.flag(region, DURABLE)
    }

    /// Returns the writes pending on `region` (started, not yet dropped).
    pub fn pending_writes(&self, region: u64) -> u32 {
        self.regions
            .words
            .get(region as usize)
            .map_or(0, |w| w.load(Ordering::Acquire) & PENDING)
    }

    /// Returns the number of bits set in memory.
    pub fn set_bits(&self) -> u64 {
        self.regions.set.load(Ordering::Relaxed)
    }

    /// Returns the regions whose bit is set in memory, in order.
    pub fn dirty_regions(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.geometry.bits).filter(|&r| self.is_set(r))
    }

    /// Returns the current bytes of page `page` (zeroes past the end).
    pub fn page_bytes(&self, page: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; PAGE];
        let first = page.saturating_mul(BITS_PER_PAGE);
        let end = first.saturating_add(BITS_PER_PAGE).min(self.geometry.bits);
        for r in first..end {
            if self.regions.word(r).load(Ordering::Acquire) & SET != 0 {
                let i = (r - first) as usize;
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        bytes
    }

    /// ORs the bitmap bytes read from one member into memory (call it
    /// once per member to merge them). Bits past the last region are
    /// ignored. The loaded bits are not durable: the first write to each
    /// page rewrites it, so that every live member ends up with the union
    /// (or call [`Bitmap::persist_all`]). Returns the bits newly set.
    pub fn load(&self, bytes: &[u8]) -> Result<u64, MetaError> {
        let need = self.geometry.bits.div_ceil(8);
        if (bytes.len() as u64) < need {
            return Err(MetaError::BitmapTruncated {
                len: bytes.len(),
                need,
            });
        }
        Ok(self.set_where(|r| bytes[(r / 8) as usize] & (1 << (r % 8)) != 0))
    }

    /// Sets every bit (everything dirty: a new array over members whose
    /// contents differ). Returns the bits newly set.
    pub fn mark_all(&self) -> u64 {
        self.set_where(|_| true)
    }

    fn set_where(&self, want: impl Fn(u64) -> bool) -> u64 {
        let mut added = 0;
        for (p, page) in self.pages.iter().enumerate() {
            let mut st = page.lock();
            let first = p as u64 * BITS_PER_PAGE;
            for r in first..(first + BITS_PER_PAGE).min(self.geometry.bits) {
                if want(r) && self.regions.word(r).fetch_or(SET, Ordering::AcqRel) & SET == 0 {
                    st.generation += 1;
                    added += 1;
                }
            }
        }
        self.regions.set.fetch_add(added, Ordering::Relaxed);
        added
    }

    /// Returns a handle on the resync set (shared with the bitmap).
    pub fn resync(&self) -> ResyncSet {
        ResyncSet {
            regions: Arc::clone(&self.regions),
        }
    }

    /// Adds every region whose bit is set to the resync set (at
    /// assembly, after [`Bitmap::load`] or [`Bitmap::mark_all`]); returns
    /// the regions added.
    pub fn resync_dirty(&self) -> u64 {
        let mut added = 0;
        for w in self.regions.words.iter() {
            if w.load(Ordering::Acquire) & SET != 0
                && w.fetch_or(RESYNC, Ordering::AcqRel) & RESYNC == 0
            {
                added += 1;
            }
        }
        self.regions.resync.fetch_add(added, Ordering::Relaxed);
        added
    }

    /// Clears, in memory, the bits of regions with no pending write, not
    /// awaiting resync, and whose last write ended at least `idle` before
    /// `now`; returns the pages to write (no FUA needed, but after a flush
    /// of every member, so that the regions' data is durable). Clears
    /// nothing while `degraded`. Pages being written are skipped until
    /// the next sweep. See the module doc for why the batch must be held
    /// until its pages are written.
    ///
    /// Only regions below `clear_below` (a region index) are cleared: the
    /// regions where every member is in sync (0 while a member is failed
    /// or missing, a recovering member's frontier while it is rebuilt,
    /// `u64::MAX` when all are in sync).
    pub fn sweep(&self, now: Instant, idle: Duration, clear_below: u64) -> SweepBatch<E> {
        let mut batch = SweepBatch {
            pages: Arc::clone(&self.pages),
            writes: Vec::new(),
            claimed: Vec::new(),
            cleared: 0,
        };
        if clear_below == 0 || self.set_bits() == 0 {
            return batch;
        }
        let regions = &self.regions;
        let now = regions.stamp(now);
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        for (p, page) in self.pages.iter().enumerate() {
            let mut st = page.lock();
            if !matches!(st.busy, Busy::Idle) {
                continue;
            }
            let first = p as u64 * BITS_PER_PAGE;
            let mut cleared = 0;
            for r in first
                ..(first + BITS_PER_PAGE)
                    .min(self.geometry.bits)
                    .min(clear_below)
            {
                let word = regions.word(r);
                let w = word.load(Ordering::Acquire);
                if w & SET == 0 || w & (PENDING | RESYNC) != 0 {
                    continue;
                }
                // Acquire on the word made the last writer's stamp visible.
                if regions.last[r as usize]
                    .load(Ordering::Relaxed)
                    .saturating_add(idle)
                    > now
                {
                    continue;
                }
                // Fails if a writer arrived since the load: it keeps the bit.
                let clear = w & !(SET | DURABLE);
                if word
                    .compare_exchange(w, clear, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    cleared += 1;
                }
            }
            if cleared > 0 {
                st.generation += 1;
                st.busy = Busy::Sweeping;
                regions.set.fetch_sub(cleared, Ordering::Relaxed);
                batch.cleared += cleared;
                batch.claimed.push(p);
                batch.writes.push((p as u64, self.page_bytes(p as u64)));
            }
        }
        batch
    }
}

impl<E: Clone + From<MetaError>> Bitmap<E> {
    /// Counts a write as pending on `regions` and returns once each of
    /// their bits is durably set on the members (written through
    /// `persist` if it was not). Issue the data write only then, and drop
    /// the guard when it has completed. An empty range returns at once.
    ///
    /// If a page write fails, every caller whose bits it carried gets its
    /// error, the bits stay set but not durable, and a later call writes
    /// them again. Cancelling the call is safe: a page write it led is
    /// handed over to the other waiters.
    pub async fn start_write(
        &self,
        regions: RangeInclusive<u64>,
        persist: &dyn PersistPages<E>,
    ) -> Result<WriteGuard, E> {
        let (start, end) = (*regions.start(), *regions.end());
        if regions.is_empty() {
            return Ok(WriteGuard {
                regions: Arc::clone(&self.regions),
                range: start..start,
            });
        }
        if end >= self.geometry.bits {
            return Err(MetaError::RegionOutOfRange {
                start,
                end,
                bits: self.geometry.bits,
            }
            .into());
        }
        let mut durable = true;
        for r in start..=end {
            durable &= self.regions.word(r).fetch_add(1, Ordering::AcqRel) & DURABLE != 0;
        }
        // From here on the guard undoes the counts, on error or cancellation too.
        let guard = WriteGuard {
            regions: Arc::clone(&self.regions),
            range: start..end + 1,
        };
        if durable {
            return Ok(guard);
        }
        for p in start / BITS_PER_PAGE..=end / BITS_PER_PAGE {
            let lo = start.max(p * BITS_PER_PAGE);
            let hi = end.min((p + 1) * BITS_PER_PAGE - 1);
            self.make_durable(p, lo, hi, persist).await?;
        }
        Ok(guard)
    }

    /// Sets regions `lo..=hi` of page `p` in memory and waits until a
    /// completed write of the page carries them, writing it if nobody is.
    async fn make_durable(
        &self,
        p: u64,
        lo: u64,
        hi: u64,
        persist: &dyn PersistPages<E>,
    ) -> Result<(), E> {
        let page = &self.pages[p as usize];
        let mut needed = None;
        // The write waited for, and whether its snapshot carries our bits.
        let mut waited: Option<(u64, bool)> = None;
        loop {
            // Registered before looking at the state, so no wake-up is missed.
            let mut idle = pin!(page.idle.notified());
            idle.as_mut().enable();
            let lead = {
                let mut st = page.lock();
                if let (Some((seq, true)), Some((failed, error))) = (waited.take(), &st.failure)
                    && seq == *failed
                {
                    return Err(error.clone());
                }
                let needed = *needed.get_or_insert_with(|| self.set_locked(&mut st, lo, hi));
                if (lo..=hi).all(|r| self.is_durable(r)) {
                    return Ok(());
                }
                match st.busy {
                    Busy::Writing { seq, snap_gen } => {
                        waited = Some((seq, snap_gen >= needed));
                        None
                    }
                    Busy::Sweeping => None,
                    Busy::Idle => Some(self.claim_for_write(&mut st, p)),
                }
            };
            match lead {
                None => idle.await,
                Some((seq, bytes)) => self.lead(p, seq, bytes, persist).await?,
            }
        }
    }

    /// Sets regions `lo..=hi` in memory (page lock held); returns the
    /// page generation from which a snapshot carries them all.
    fn set_locked(&self, st: &mut PageState<E>, lo: u64, hi: u64) -> u64 {
        for r in lo..=hi {
            if self.regions.word(r).fetch_or(SET, Ordering::AcqRel) & SET == 0 {
                st.generation += 1;
                self.regions.set.fetch_add(1, Ordering::Relaxed);
            }
        }
        st.generation
    }

    /// Marks page `p` as being written (page lock held) and returns the
    /// write's number and snapshot.
    fn claim_for_write(&self, st: &mut PageState<E>, p: u64) -> (u64, Vec<u8>) {
        st.seq += 1;
        st.busy = Busy::Writing {
            seq: st.seq,
            snap_gen: st.generation,
        };
        (st.seq, self.page_bytes(p))
    }

    /// Writes snapshot `bytes` of page `p` as write `seq`, then marks the
    /// bits it carries durable, or records the failure, and wakes waiters.
    async fn lead(
        &self,
        p: u64,
        seq: u64,
        bytes: Vec<u8>,
        persist: &dyn PersistPages<E>,
    ) -> Result<(), E> {
        let page = &self.pages[p as usize];
        let mut release = ReleaseOnDrop(Some(page));
        let result = persist.persist(vec![(p, bytes.clone())]).await;
        release.0 = None;
        {
            let mut st = page.lock();
            match &result {
                Ok(()) => {
                    // No sweep runs on a busy page: every bit of the
                    // snapshot is still set.
                    let first = p * BITS_PER_PAGE;
                    for (i, byte) in bytes.iter().enumerate() {
                        for bit in (0..8).filter(|b| byte & (1 << b) != 0) {
                            let r = first + (i * 8 + bit) as u64;
                            if r < self.geometry.bits {
                                self.regions.word(r).fetch_or(DURABLE, Ordering::Release);
                            }
                        }
                    }
                }
                Err(e) => st.failure = Some((seq, e.clone())),
            }
            st.busy = Busy::Idle;
        }
        page.idle.notify_waiters();
        result
    }

    /// Writes every page as it is in memory (through `persist`, one page
    /// write at a time per page, like `start_write`) and marks the set
    /// bits durable: after [`Bitmap::load`] so that every live member
    /// holds the union, or to initialise the bitmap of a new array or a
    /// new member.
    pub async fn persist_all(&self, persist: &dyn PersistPages<E>) -> Result<(), E> {
        for (p, page) in self.pages.iter().enumerate() {
            loop {
                let mut idle = pin!(page.idle.notified());
                idle.as_mut().enable();
                let lead = {
                    let mut st = page.lock();
                    match st.busy {
                        Busy::Idle => Some(self.claim_for_write(&mut st, p as u64)),
                        _ => None,
                    }
                };
                match lead {
                    None => idle.await,
                    Some((seq, bytes)) => {
                        self.lead(p as u64, seq, bytes, persist).await?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Releases a page claimed for a write if the leader is cancelled.
struct ReleaseOnDrop<'a, E>(Option<&'a Page<E>>);

impl<E> Drop for ReleaseOnDrop<'_, E> {
    fn drop(&mut self) {
        if let Some(page) = self.0.take() {
            page.release();
        }
    }
}

/// A write counted as pending on its regions. Drop it when the data write
/// has completed on the members: it stamps the regions' last-write time and
/// lets the sweep clear them once idle.
#[must_use = "dropping the guard ends the write"]
pub struct WriteGuard {
    regions: Arc<Regions>,
    range: Range<u64>,
}

impl WriteGuard {
    /// Returns the regions of the write.
    pub fn regions(&self) -> Range<u64> {
        self.range.clone()
    }
}

impl fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGuard")
            .field("regions", &self.range)
            .finish()
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let now = self.regions.stamp(Instant::now());
        for r in self.range.clone() {
            // The stamp is published by the Release decrement below.
            self.regions.last[r as usize].fetch_max(now, Ordering::Relaxed);
            self.regions.word(r).fetch_sub(1, Ordering::Release);
        }
    }
}

/// The pages a [`Bitmap::sweep`] cleared: flush every live member, write
/// the pages to them, then drop the batch. Until it is dropped, writers that need one
/// of its pages wait (see the module doc).
#[must_use = "the pages must be written before the batch is dropped"]
pub struct SweepBatch<E> {
    pages: Arc<[Page<E>]>,
    writes: Vec<(u64, Vec<u8>)>,
    /// The indices of the pages this batch holds.
    claimed: Vec<usize>,
    cleared: u64,
}

impl<E> SweepBatch<E> {
    /// Returns the pages to write: (page index, 4 KiB of bytes).
    pub fn pages(&self) -> &[(u64, Vec<u8>)] {
        &self.writes
    }

    /// Takes the pages to write, keeping them claimed until the batch is
    /// dropped.
    pub fn take_pages(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.writes)
    }

    /// Returns the number of bits cleared.
    pub fn cleared(&self) -> u64 {
        self.cleared
    }

    /// Returns whether nothing was cleared.
    pub fn is_empty(&self) -> bool {
        self.cleared == 0
    }
}

impl<E> fmt::Debug for SweepBatch<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pages: Vec<u64> = self.writes.iter().map(|(p, _)| *p).collect();
        f.debug_struct("SweepBatch")
            .field("pages", &pages)
            .field("cleared", &self.cleared)
            .finish()
    }
}

impl<E> Drop for SweepBatch<E> {
    fn drop(&mut self) {
        for &p in &self.claimed {
            self.pages[p].release();
        }
    }
}

/// The regions that must be resynced, shared with the [`Bitmap`] (whose
/// sweep keeps their bits set until they are done).
#[derive(Clone)]
pub struct ResyncSet {
    regions: Arc<Regions>,
}

impl ResyncSet {
    /// Returns whether `region` still awaits resync: one atomic load,
    /// cheap enough for every write.
    pub fn is_pending(&self, region: u64) -> bool {
        self.regions.flag(region, RESYNC)
    }

    /// Marks `region` resynced; returns whether it was pending.
    pub fn done(&self, region: u64) -> bool {
        let Some(w) = self.regions.words.get(region as usize) else {
            return false;
        };
        let was = w.fetch_and(!RESYNC, Ordering::AcqRel) & RESYNC != 0;
        if was {
            self.regions.resync.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    /// Returns the number of regions still awaiting resync.
    pub fn pending_count(&self) -> u64 {
        self.regions.resync.load(Ordering::Relaxed)
    }

    /// Returns the first region at or after `from` that awaits resync.
    pub fn next_pending(&self, from: u64) -> Option<u64> {
        (from..self.regions.words.len() as u64).find(|&r| self.is_pending(r))
    }
}

impl fmt::Debug for ResyncSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResyncSet")
            .field("pending", &self.pending_count())
            .finish()
    }
}
