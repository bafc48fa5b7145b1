//! The write-intent bitmap through its public API, against a model disk:
//! geometry, page encoding, set-before-write ordering, concurrent writers,
//! persist failures and cancellation, the lazy sweep and its race with a
//! starting write, and the resync set. Time is paused (`start_paused`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nbdraid_raid::meta::{
    BITMAP_OFFSET, BITS_PER_PAGE, Bitmap, BitmapGeometry, MAX_BITS, MetaError, PersistPages,
    geometry_for,
};
use tokio::sync::Semaphore;
use tokio::time::{Instant, advance};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const IDLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
enum TestError {
    Io(String),
    Meta(MetaError),
}

impl From<MetaError> for TestError {
    fn from(e: MetaError) -> Self {
        TestError::Meta(e)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// A page write completed (FUA): page, bytes.
    Persist(u64, Vec<u8>),
    /// A lazy (sweep) page write completed.
    Lazy(u64, Vec<u8>),
    /// A data write was issued.
    Data(u64),
}

/// A model of the members' bitmap area that records every write, checks
/// that no two writes of one page overlap, and can hold or fail writes.
#[derive(Default)]
struct Disk {
    log: Mutex<Vec<Event>>,
    pages: Mutex<Vec<Vec<u8>>>,
    calls: AtomicUsize,
    /// Pages with a write in flight.
    busy: Mutex<Vec<u64>>,
    /// Calls still to fail.
    fail: AtomicUsize,
    /// When set, each write waits for a permit.
    gate: Option<Semaphore>,
    /// Data writes in flight, by region.
    inflight: Mutex<HashMap<u64, u32>>,
}

impl Disk {
    fn gated() -> Arc<Disk> {
        Arc::new(Disk {
            gate: Some(Semaphore::new(0)),
            ..Disk::default()
        })
    }

    fn open_gate(&self, writes: usize) {
        self.gate.as_ref().unwrap().add_permits(writes);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn persisted(&self) -> Vec<(u64, Vec<u8>)> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter_map(|e| match e {
                Event::Persist(p, b) => Some((*p, b.clone())),
                _ => None,
            })
            .collect()
    }

    /// Writes one page, checking the invariant: no data write in flight
    /// on a region whose bit the page clears.
    fn write(&self, page: u64, bytes: &[u8]) {
        let mut pages = self.pages.lock().unwrap();
        for (&r, _) in self
            .inflight
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 0)
        {
            let i = r.wrapping_sub(page * BITS_PER_PAGE);
            if i < BITS_PER_PAGE {
                assert!(
                    bytes[(i / 8) as usize] & (1 << (i % 8)) != 0,
                    "page {page} clears region {r} under a data write"
                );
            }
        }
        if pages.len() <= page as usize {
            pages.resize(page as usize + 1, vec![0; 4096]);
        }
        pages[page as usize] = bytes.to_vec();
    }

    /// Whether `region`'s bit is set on the model disk.
    fn bit(&self, region: u64) -> bool {
        bit_in(&self.pages.lock().unwrap(), region)
    }

    /// Writes a sweep batch's pages, as the array does lazily.
    fn write_lazy(&self, pages: &[(u64, Vec<u8>)]) {
        for (p, bytes) in pages {
            self.write(*p, bytes);
            self.log
                .lock()
                .unwrap()
                .push(Event::Lazy(*p, bytes.clone()));
        }
    }

    fn data(&self, region: u64) {
        self.log.lock().unwrap().push(Event::Data(region));
    }

    /// Issues a data write to `regions`: their bits must be on disk.
    fn begin_data(&self, regions: std::ops::Range<u64>) {
        let pages = self.pages.lock().unwrap();
        let mut inflight = self.inflight.lock().unwrap();
        for r in regions {
            assert!(bit_in(&pages, r), "data write to region {r} before its bit");
            *inflight.entry(r).or_default() += 1;
        }
    }

    /// Completes a data write to `regions`.
    fn end_data(&self, regions: std::ops::Range<u64>) {
        let mut inflight = self.inflight.lock().unwrap();
        for r in regions {
            *inflight.get_mut(&r).unwrap() -= 1;
        }
    }
}

impl PersistPages<TestError> for Disk {
    fn persist(&self, pages: Vec<(u64, Vec<u8>)>) -> BoxFuture<'_, Result<(), TestError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            {
                let mut busy = self.busy.lock().unwrap();
                for (p, _) in &pages {
                    assert!(!busy.contains(p), "two writes of page {p} overlap");
                    busy.push(*p);
                }
            }
            let _clear = ClearBusy(self, pages.iter().map(|(p, _)| *p).collect());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let fail = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(TestError::Io("member write failed".to_owned()));
            }
            for (p, bytes) in pages {
                self.write(p, &bytes);
                self.log.lock().unwrap().push(Event::Persist(p, bytes));
            }
            Ok(())
        })
    }
}

fn bit_in(pages: &[Vec<u8>], region: u64) -> bool {
    let (p, i) = (region / BITS_PER_PAGE, region % BITS_PER_PAGE);
    pages
        .get(p as usize)
        .is_some_and(|b| b[(i / 8) as usize] & (1 << (i % 8)) != 0)
}

/// Marks pages free again when a write ends or is dropped.
struct ClearBusy<'a>(&'a Disk, Vec<u64>);

impl Drop for ClearBusy<'_> {
    fn drop(&mut self) {
        self.0.busy.lock().unwrap().retain(|p| !self.1.contains(p));
    }
}

/// A bitmap for 256 MiB members with 1 MiB regions (256 bits, one page),
/// or `bits` regions of 64 KiB.
fn bitmap(bits: Option<u64>) -> Arc<Bitmap<TestError>> {
    let geometry = match bits {
        None => geometry_for(256 * MIB, None).unwrap(),
        Some(bits) => geometry_for(bits * 64 * 1024, Some(64 * 1024)).unwrap(),
    };
    Arc::new(Bitmap::new(geometry).unwrap())
}

/// Lets spawned tasks run until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never reached");
}

#[test]
fn default_geometry_scales_the_region_with_the_member() {
    let g = |size| geometry_for(size, None).unwrap();
    assert_eq!(
        g(256 * MIB),
        BitmapGeometry {
            offset: BITMAP_OFFSET,
            region: MIB,
            bits: 256
        }
    );
    assert_eq!(g(256 * MIB + 1).bits, 257);
    assert_eq!((g(64 * GIB).region, g(64 * GIB).bits), (MIB, 65_536));
    assert_eq!(g(64 * GIB + 1).region, 2 * MIB);
    assert_eq!(g(TIB).region, 16 * MIB);
    assert_eq!((g(4 * TIB).region, g(4 * TIB).bits), (64 * MIB, 65_536));
    assert_eq!(g(10 * TIB).region, 256 * MIB);
    assert_eq!(g(u64::MAX).bits, 65_536);
    for size in [1, 4096, 256 * MIB, 3 * TIB + 7, u64::MAX] {
        let geo = g(size);
        assert_eq!(geo.validate(size), Ok(()));
        assert!(geo.pages() <= 2, "{geo:?}");
    }
    assert_eq!(g(256 * MIB).pages(), 1);
    assert_eq!(g(256 * MIB).bytes(), 4096);
}

#[test]
fn explicit_regions_are_checked() {
    let geo = geometry_for(256 * MIB, Some(64 * 1024)).unwrap();
    assert_eq!((geo.bits, geo.pages()), (4096, 1));
    for bad in [0, 4096, 32 * 1024, 3 * MIB] {
        let err = geometry_for(256 * MIB, Some(bad)).unwrap_err();
        assert!(matches!(err, MetaError::BadRegion { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("power of two"), "{err}");
    }
    let err = geometry_for(TIB, Some(64 * 1024)).unwrap_err();
    assert_eq!(
        err,
        MetaError::BitmapTooLarge {
            bits: TIB / (64 * 1024),
            member_data_size: TIB,
            max: MAX_BITS,
            min_region: 256 * 1024
        }
    );
    assert!(err.to_string().contains("at least 262144"), "{err}");
    assert!(geometry_for(TIB, Some(256 * 1024)).is_ok());
    assert!(geometry_for(0, None).is_err());

    let geo = geometry_for(256 * MIB, None).unwrap();
    assert!(geo.validate(512 * MIB).is_err());
    assert!(
        BitmapGeometry { offset: 0, ..geo }
            .validate(256 * MIB)
            .is_err()
    );
    let huge = BitmapGeometry {
        bits: MAX_BITS + 1,
        ..geo
    };
    assert!(Bitmap::<TestError>::new(huge).is_err());
    assert!(Bitmap::<TestError>::new(BitmapGeometry { bits: 0, ..geo }).is_err());

    assert_eq!(geo.regions_for(0..1), Some(0..=0));
    assert_eq!(geo.regions_for(MIB - 1..MIB + 1), Some(0..=1));
    assert_eq!(geo.regions_for(5 * MIB..5 * MIB), None);
    assert_eq!(geo.region_of(3 * MIB + 5), 3);
}

#[test]
fn load_ors_members_and_pages_round_trip() {
    let b = bitmap(Some(BITS_PER_PAGE + 100));
    assert_eq!(b.pages(), 2);
    let mut one = vec![0u8; 2 * 4096];
    one[0] = 0b0000_0101; // regions 0 and 2
    let mut two = vec![0u8; 2 * 4096];
    two[0] = 0b0000_0100; // region 2
    two[4096] = 0b1000_0000; // region 32768 + 7
    two[4096 + 200] = 0xff; // past the last region: ignored
    assert_eq!(b.load(&one).unwrap(), 2);
    assert_eq!(b.load(&two).unwrap(), 1);
    assert_eq!(
        b.dirty_regions().collect::<Vec<_>>(),
        [0, 2, BITS_PER_PAGE + 7]
    );
    assert_eq!(b.set_bits(), 3);
    assert!(b.is_set(2) && !b.is_set(1) && !b.is_durable(2));
    assert_eq!(&b.page_bytes(0)[..], &one[..4096]);
    let mut page1 = vec![0u8; 4096];
    page1[0] = 0b1000_0000;
    assert_eq!(b.page_bytes(1), page1);
    assert_eq!(b.page_bytes(7), vec![0u8; 4096]);

    let reloaded = bitmap(Some(BITS_PER_PAGE + 100));
    let mut bytes = b.page_bytes(0);
    bytes.extend(b.page_bytes(1));
    reloaded.load(&bytes).unwrap();
    assert_eq!(
        reloaded.dirty_regions().collect::<Vec<_>>(),
        b.dirty_regions().collect::<Vec<_>>()
    );

    let err = b.load(&one[..100]).unwrap_err();
    assert_eq!(
        err,
        MetaError::BitmapTruncated {
            len: 100,
            need: (BITS_PER_PAGE + 100).div_ceil(8)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn bits_are_durable_before_the_data_write() {
    let b = bitmap(None);
    let disk = Arc::new(Disk::default());
    let guard = b.start_write(3..=4, &*disk).await.unwrap();
    assert!(disk.bit(3) && disk.bit(4) && !disk.bit(5));
    disk.data(3);
    assert!(b.is_durable(3) && b.is_durable(4));
    assert_eq!(b.pending_writes(3), 1);
    assert_eq!(guard.regions(), 3..5);

    // Already durable: no page write, whatever else is pending.
    let again = b.start_write(4..=4, &*disk).await.unwrap();
    disk.data(4);
    assert_eq!(b.pending_writes(4), 2);
    drop((guard, again));
    assert_eq!(b.pending_writes(4), 0);

    let log = disk.log.lock().unwrap().clone();
    assert!(matches!(
        &log[..],
        [Event::Persist(0, _), Event::Data(3), Event::Data(4)]
    ));

    let empty = b
        .start_write(std::ops::RangeInclusive::new(1, 0), &*disk)
        .await
        .unwrap();
    assert!(empty.regions().is_empty());
    let err = b.start_write(250..=256, &*disk).await.unwrap_err();
    assert!(matches!(
        err,
        TestError::Meta(MetaError::RegionOutOfRange { bits: 256, .. })
    ));
    assert_eq!(b.pending_writes(250), 0);
}

#[tokio::test(start_paused = true)]
async fn writes_spanning_pages_set_both() {
    let b = bitmap(Some(2 * BITS_PER_PAGE));
    let disk = Arc::new(Disk::default());
    let last = BITS_PER_PAGE - 1;
    let _g = b.start_write(last..=last + 1, &*disk).await.unwrap();
    assert!(disk.bit(last) && disk.bit(last + 1));
    let pages: Vec<u64> = disk.persisted().iter().map(|(p, _)| *p).collect();
    assert_eq!(pages, [0, 1]);
}

#[tokio::test(start_paused = true)]
async fn one_page_write_serves_every_writer_of_a_region() {
    let b = bitmap(None);
    let disk = Disk::gated();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (b, disk) = (b.clone(), disk.clone());
            tokio::spawn(async move {
                let g = b.start_write(7..=7, &*disk).await.unwrap();
                disk.data(7);
                drop(g);
            })
        })
        .collect();
    until(|| b.pending_writes(7) == 32 && disk.calls() == 1).await;
    assert!(
        disk.log.lock().unwrap().is_empty(),
        "no data before the bit"
    );
    disk.open_gate(1);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(disk.calls(), 1);
    let log = disk.log.lock().unwrap().clone();
    assert!(matches!(log[0], Event::Persist(0, _)));
    assert_eq!(log.len(), 33);
}

#[tokio::test(start_paused = true)]
async fn writers_arriving_during_a_page_write_share_the_next_one() {
    let b = bitmap(None);
    let disk = Disk::gated();
    let spawn = |region: u64| {
        let (b, disk) = (b.clone(), disk.clone());
        tokio::spawn(async move {
            let g = b.start_write(region..=region, &*disk).await.unwrap();
            disk.data(region);
            g
        })
    };
    let first = spawn(0);
    until(|| disk.calls() == 1).await;
    let others: Vec<_> = (1..20).map(spawn).collect();
    until(|| (1..20).all(|r| b.is_set(r))).await;
    assert_eq!(disk.calls(), 1, "they wait for the write in flight");
    disk.open_gate(2);
    let mut guards = vec![first.await.unwrap()];
    for t in others {
        guards.push(t.await.unwrap());
    }
    let persisted = disk.persisted();
    assert_eq!(persisted.len(), 2, "one write per batch of new bits");
    assert_eq!(persisted[0].1[0], 0b1);
    assert_eq!(&persisted[1].1[..3], &[0xff, 0xff, 0x0f]);
    // Every data write came after the page write carrying its bit.
    let log = disk.log.lock().unwrap().clone();
    let second = log
        .iter()
        .position(|e| *e == Event::Persist(0, persisted[1].1.clone()))
        .unwrap();
    for (i, e) in log.iter().enumerate() {
        if let Event::Data(r) = e {
            assert!(i > if *r == 0 { 0 } else { second }, "{log:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn different_pages_are_written_concurrently() {
    let b = bitmap(Some(2 * BITS_PER_PAGE));
    let disk = Disk::gated();
    let tasks: Vec<_> = [5, BITS_PER_PAGE + 5]
        .into_iter()
        .map(|r| {
            let (b, disk) = (b.clone(), disk.clone());
            tokio::spawn(async move { b.start_write(r..=r, &*disk).await.map(drop) })
        })
        .collect();
    until(|| disk.calls() == 2).await;
    disk.open_gate(2);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_page_write_fails_every_writer_it_carried() {
    let b = bitmap(None);
    let disk = Disk::gated();
    disk.fail.store(1, Ordering::SeqCst);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (b, disk) = (b.clone(), disk.clone());
            tokio::spawn(async move {
                let g = b.start_write(9..=9, &*disk).await?;
                disk.data(9);
                drop(g);
                Ok::<_, TestError>(())
            })
        })
        .collect();
    until(|| b.pending_writes(9) == 8).await;
    disk.open_gate(1);
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            Err(TestError::Io("member write failed".to_owned()))
        );
    }
    assert_eq!(disk.calls(), 1);
    assert!(disk.log.lock().unwrap().is_empty(), "no data write");
    assert!(b.is_set(9) && !b.is_durable(9));
    assert_eq!(b.pending_writes(9), 0);

    // A later write retries the page.
    disk.open_gate(1);
    let _g = b.start_write(9..=9, &*disk).await.unwrap();
    assert!(disk.bit(9) && b.is_durable(9));
    assert_eq!(disk.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_hands_the_page_over() {
    let b = bitmap(None);
    let disk = Disk::gated();
    let spawn = |b: Arc<Bitmap<TestError>>, disk: Arc<Disk>| {
        tokio::spawn(async move { b.start_write(3..=3, &*disk).await.map(drop) })
    };
    let leader = spawn(b.clone(), disk.clone());
    until(|| disk.calls() == 1).await;
    let follower = spawn(b.clone(), disk.clone());
    until(|| b.pending_writes(3) == 2).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    until(|| disk.calls() == 2).await;
    disk.open_gate(1);
    follower.await.unwrap().unwrap();
    assert!(disk.bit(3) && b.is_durable(3));
    assert_eq!(b.pending_writes(3), 0);
}

#[tokio::test(start_paused = true)]
async fn sweep_clears_only_idle_regions_and_never_while_degraded() {
    let b = bitmap(None);
    let disk = Arc::new(Disk::default());
    let held = b.start_write(1..=1, &*disk).await.unwrap();
    drop(b.start_write(2..=2, &*disk).await.unwrap());
    advance(Duration::from_secs(3)).await;
    drop(b.start_write(3..=3, &*disk).await.unwrap());

    assert!(
        b.sweep(Instant::now(), IDLE, u64::MAX).is_empty(),
        "too recent"
    );
    advance(Duration::from_secs(2)).await;
    assert!(b.sweep(Instant::now(), IDLE, 0).is_empty(), "degraded");
    assert!(
        b.sweep(Instant::now(), IDLE, 2).is_empty(),
        "region 2 is at a rebuild's frontier, not below it"
    );
    assert_eq!(b.set_bits(), 3);

    let mut batch = b.sweep(Instant::now(), IDLE, u64::MAX);
    assert_eq!(batch.cleared(), 1);
    assert!(!b.is_set(2) && b.is_set(1) && b.is_set(3));
    assert!(!b.is_durable(2));
    let pages = batch.take_pages();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].1[0], 0b1010);
    disk.write_lazy(&pages);
    drop(batch);
    assert!(!disk.bit(2) && disk.bit(1));

    // The pending write keeps its bit however long it takes.
    advance(Duration::from_secs(60)).await;
    let batch = b.sweep(Instant::now(), IDLE, u64::MAX);
    assert_eq!(batch.cleared(), 1);
    drop(batch);
    assert!(b.is_set(1) && !b.is_set(3));
    drop(held);
    assert!(
        b.sweep(Instant::now(), IDLE, u64::MAX).is_empty(),
        "just ended"
    );
    advance(IDLE).await;
    assert_eq!(b.sweep(Instant::now(), IDLE, u64::MAX).cleared(), 1);
    assert_eq!(b.set_bits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_write_racing_a_sweep_lands_after_the_swept_page() {
    let b = bitmap(None);
    let disk = Arc::new(Disk::default());
    drop(b.start_write(4..=4, &*disk).await.unwrap());
    drop(b.start_write(5..=5, &*disk).await.unwrap());
    let _busy = b.start_write(6..=6, &*disk).await.unwrap();
    advance(IDLE).await;

    // sweep() clears 4 and 5; before the array writes the page, a write
    // to region 4 starts.
    let mut batch = b.sweep(Instant::now(), IDLE, u64::MAX);
    assert_eq!(batch.cleared(), 2);
    let writer = {
        let (b, disk) = (b.clone(), disk.clone());
        tokio::spawn(async move {
            let g = b.start_write(4..=4, &*disk).await.unwrap();
            disk.data(4);
            g
        })
    };
    until(|| b.is_set(4)).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(disk.calls(), 3, "it waits for the swept page's write");
    // A write to a region still durable is not delayed.
    drop(b.start_write(6..=6, &*disk).await.unwrap());

    // The array writes the swept page (lazily) and drops the batch.
    let pages = batch.take_pages();
    disk.write_lazy(&pages);
    drop(batch);
    let _g = writer.await.unwrap();

    // On disk: region 4 set again, by a write after the swept page's.
    assert!(disk.bit(4) && !disk.bit(5) && disk.bit(6));
    let log = disk.log.lock().unwrap().clone();
    let n = log.len();
    assert!(matches!(
        &log[n - 3..],
        [Event::Lazy(0, _), Event::Persist(0, _), Event::Data(4)]
    ));
}

#[tokio::test(start_paused = true)]
async fn resync_regions_keep_their_bits_until_done() {
    let b = bitmap(None);
    let disk = Arc::new(Disk::default());
    let mut bytes = vec![0u8; 4096];
    bytes[1] = 0b11; // regions 8 and 9
    b.load(&bytes).unwrap();
    assert_eq!(b.resync_dirty(), 2);
    assert_eq!(b.resync_dirty(), 0);
    let resync = b.resync();
    assert!(resync.is_pending(8) && resync.is_pending(9) && !resync.is_pending(7));
    assert!(!resync.is_pending(1_000_000));
    assert_eq!(resync.pending_count(), 2);
    assert_eq!(resync.next_pending(0), Some(8));

    // Loaded bits are not durable: the first write rewrites the page.
    drop(b.start_write(8..=8, &*disk).await.unwrap());
    assert_eq!(disk.calls(), 1);
    assert!(disk.bit(8) && disk.bit(9));

    advance(IDLE * 2).await;
    assert!(b.sweep(Instant::now(), IDLE, u64::MAX).is_empty());
    assert!(resync.done(8));
    assert!(!resync.done(8));
    assert_eq!(resync.next_pending(0), Some(9));
    let batch = b.sweep(Instant::now(), IDLE, u64::MAX);
    assert_eq!(batch.cleared(), 1);
    drop(batch);
    assert!(!b.is_set(8) && b.is_set(9));
    assert!(resync.done(9));
    assert_eq!(resync.pending_count(), 0);
    assert_eq!(resync.next_pending(0), None);
}

#[tokio::test(start_paused = true)]
async fn mark_all_then_persist_all_makes_every_bit_durable() {
    let b = bitmap(Some(BITS_PER_PAGE + 10));
    let disk = Arc::new(Disk::default());
    assert_eq!(b.mark_all(), BITS_PER_PAGE + 10);
    assert_eq!(b.mark_all(), 0);
    b.persist_all(&*disk).await.unwrap();
    assert_eq!(disk.calls(), 2);
    assert!(disk.bit(0) && disk.bit(BITS_PER_PAGE + 9) && !disk.bit(BITS_PER_PAGE + 10));
    drop(b.start_write(0..=BITS_PER_PAGE + 9, &*disk).await.unwrap());
    assert_eq!(disk.calls(), 2, "all durable: no page write");
    assert_eq!(b.resync_dirty(), BITS_PER_PAGE + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_and_sweeps_never_leave_a_data_write_uncovered() {
    let b = bitmap(Some(BITS_PER_PAGE + 8));
    let disk = Arc::new(Disk::default());
    let stop = Arc::new(AtomicBool::new(false));
    let cleared = Arc::new(AtomicUsize::new(0));
    let sweeper = {
        let (b, disk, stop, cleared) = (b.clone(), disk.clone(), stop.clone(), cleared.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let mut batch = b.sweep(Instant::now(), Duration::ZERO, u64::MAX);
                cleared.fetch_add(batch.cleared() as usize, Ordering::SeqCst);
                let pages = batch.take_pages();
                tokio::task::yield_now().await;
                disk.write_lazy(&pages);
                drop(batch);
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..8u64)
        .map(|seed| {
            let (b, disk, cleared) = (b.clone(), disk.clone(), cleared.clone());
            tokio::spawn(async move {
                let mut x = seed * 0x9e37_79b9 + 1;
                // At least 300 writes each, and on until sweeps have
                // cleared bits under them a good many times.
                for i in 0..100_000 {
                    if i >= 300 && cleared.load(Ordering::SeqCst) >= 100 {
                        break;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A few hot regions at the end of page 0 and the start
                    // of page 1, one to three regions per write.
                    let start = BITS_PER_PAGE - 4 + x % 8;
                    let regions = start..=start + (x >> 8) % 3;
                    let g = b.start_write(regions, &*disk).await.unwrap();
                    disk.begin_data(g.regions());
                    tokio::task::yield_now().await;
                    disk.end_data(g.regions());
                    drop(g);
                }
            })
        })
        .collect();
    let all = async {
        for w in writers {
            w.await.unwrap();
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(60), all).await;
    stop.store(true, Ordering::SeqCst);
    done.expect("writers finished");
    sweeper.await.unwrap();
    assert!(
        cleared.load(Ordering::SeqCst) >= 100,
        "the sweep raced the writers"
    );
    assert!(disk.calls() > 2, "bits were set again after sweeps");
}
