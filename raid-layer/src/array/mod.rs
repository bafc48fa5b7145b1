//! An array: members, a layout, and the data path that serves the array
//! as a block device through the engine.
//!
//! - [`read`](self::read): reads, from the least loaded copy (RAID 1/10)
//!   or the data chunk (RAID 0/5/6), reconstructing from mirrors or parity
//!   when a member is missing or fails mid-read.
//! - [`write`](self::write): RAID 0/1/10 writes and the commands without
//!   parity; [`parity_write`](self::parity_write): RAID 5/6 writes
//!   (full-stripe, read-modify-write, reconstruct-write, degraded).
//! - [`locks`]: stripe/region locks that order writes to the same stripe.
//! - [`meta`]: the metadata the data path depends on (write-intent
//!   bitmap, member failures recorded in the superblocks).
//!
//! # Failures
//! A member that fails (EIO, lost connection, no progress within the
//! liveness timeout) is failed *before* any write it missed is
//! acknowledged: [`ArrayInner::fail_member`] records it in the surviving
//! members' superblocks and only then returns. Reads then reconstruct,
//! writes go to the survivors (the bitmap remembers what the failed member
//! missed). A caller's mistake never fails a member. With more members
//! lost than the level tolerates, the array is failed and every request
//! gets EIO at once.

pub mod cost;
mod grants;
mod locks;
pub mod log;
pub mod meta;
mod parity_write;
mod read;
mod write;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use nbdraid_engine::Error as IoError;
use nbdraid_engine::buffer::{BufferPool, IoBuf};
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::device::{
    BlockDevice, BlockSizes, DeviceInfo, Extent, IoClass, IoContext, IoFuture, OpKind, Reservation,
    ZeroFlags,
};
use nbdraid_engine::throttle::Throttle;

pub use grants::{GrantGuard, Grants, Needs};
pub use locks::{KeyGuard, KeyLocks};

use crate::layout::{Layout, Level};
use crate::member::{Member, MemberError, MemberState};
use meta::ArrayMeta;

/// How an array is set up, beyond its geometry.
#[derive(Clone)]
pub struct ArrayParams {
    /// The array's (and its export's) name.
    pub name: String,
    /// Largest READ/WRITE payload the array accepts.
    pub max_payload: u32,
    /// Units the array accounts against at each member (the grant it asks
    /// each member for) for foreground requests.
    pub member_grant: u64,
    /// The same for background work.
    pub background_grant: u64,
    /// Whether admission waits for member grants (off: measurements only).
    pub accounting: bool,
    /// The daemon's own throttle, for the units a request needs beyond
    /// its admission (reconstruction after a member fails under it) and
    /// for background work.
    pub throttle: Option<Arc<Throttle>>,
    /// Whether RAID 5/6 writes go through the partial-parity log (off:
    /// measurements only; a dirty, degraded array then needs forcing).
    pub write_log: bool,
    /// The most background passes do per second while clients are being
    /// served (0: no yielding).
    pub sync_rate_busy: u64,
}

impl ArrayParams {
    /// Returns the parameters of array `name` with the defaults: a 64 MiB
    /// grant at each member, accounting on, no own throttle.
    pub fn new(name: &str, max_payload: u32) -> Self {
        Self {
            name: name.to_string(),
            max_payload,
            member_grant: 64 << 20,
            background_grant: 16 << 20,
            accounting: true,
            throttle: None,
            write_log: true,
            sync_rate_busy: 64 << 20,
        }
    }
}

/// The array's shared state; the [`Array`] handle clones an `Arc` of it
/// into every request's future.
pub struct ArrayInner {
    /// The array's name.
    pub name: String,
    /// Its geometry.
    pub layout: Layout,
    /// Its members, by slot.
    pub members: Vec<Arc<Member>>,
    /// Buffers for parity and reads the array makes on its own account.
    pub pool: Arc<BufferPool>,
    /// Stripe (RAID 5/6) or region (RAID 1/10) locks ordering writes.
    pub locks: Arc<KeyLocks>,
    /// Metadata: bitmap, superblocks.
    pub meta: Arc<ArrayMeta>,
    /// This array's own cost model (its buffers per request, for its
    /// level and geometry): what the daemon's throttle charges its
    /// requests. Named after the daemon's layer.
    pub model: SharedCostModel,
    /// More members lost than the level tolerates: everything gets EIO.
    failed: AtomicBool,
    max_payload: u32,
    /// Units held at each member by foreground requests.
    pub grants: Arc<Grants>,
    /// Units held at each member by background work.
    pub bg_grants: Arc<Grants>,
    /// A second-level reserve at each member (an eighth of the grant) for
    /// requests that learn mid-flight that a member failed and must read
    /// the rest of a stripe to reconstruct: they hold their admission and
    /// wait here, and nothing that holds units here waits for anything,
    /// so this cannot deadlock.
    pub recon: Arc<Grants>,
    /// The daemon's own throttle (see [`ArrayParams::throttle`]).
    pub throttle: Option<Arc<Throttle>>,
    /// Bumped whenever a member's state changes (the published model
    /// follows it).
    pub state_changed: tokio::sync::watch::Sender<u64>,
    /// The partial-parity log (RAID 5/6 with persistent metadata).
    pub log: Option<log::WriteLog>,
    /// When clients were last served, for background passes to yield.
    foreground: Foreground,
    /// The most background passes do per second while clients are
    /// served (0: no yielding).
    pub sync_rate_busy: u64,
}

/// When a client request last came (milliseconds since `epoch`).
struct Foreground {
    epoch: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

/// How recently a client request must have come for the array to count
/// as busy (background passes then keep to `sync_rate_busy`).
const BUSY_WINDOW_MS: u64 = 100;

/// An array, served by the engine as a block device.
#[derive(Clone)]
pub struct Array {
    inner: Arc<ArrayInner>,
}

/// RAID 1 write-ordering region (RAID 1 has no chunks).
const MIRROR_LOCK_REGION: u64 = 1 << 20;

fn member_io_error(op: &'static str, array: &str, e: &MemberError) -> IoError {
    match e {
        MemberError::Refused { error, .. } => {
            use nbdraid_proto::consts::errno;
            match error.errno() {
                errno::EINVAL => IoError::Invalid(format!("{array}: {e}")),
                errno::ENOSPC => IoError::StorageFull {
                    op,
                    what: array.to_string(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                },
                errno::ENOTSUP => IoError::FastZeroUnsupported,
                _ => IoError::eio(op, array, e.to_string()),
            }
        }
        _ => IoError::eio(op, array, e.to_string()),
    }
}

impl Array {
    /// Returns an array over `members` (slot order) with `layout`.
    pub fn new(
        params: ArrayParams,
        layout: Layout,
        members: Vec<Arc<Member>>,
        pool: Arc<BufferPool>,
        meta: Arc<ArrayMeta>,
        model: SharedCostModel,
    ) -> Self {
        let grants = vec![params.member_grant; members.len()];
        let g = layout.geometry();
        let model = SharedCostModel::new(cost::own_cost_model(
            model.load().layer(),
            g.level,
            g.members as u64,
            g.chunk,
        ));
        let log = match (params.write_log, g.level.redundancy(), meta.snapshot()) {
            (true, Some(_), Some(sb)) => {
                let log = log::WriteLog::new(
                    &params.name,
                    sb.array_uuid,
                    members.len(),
                    sb.data_offset,
                    g.chunk,
                );
                if log.is_none() {
                    tracing::warn!(
                        array = %params.name,
                        chunk = g.chunk,
                        "no partial-parity log: the chunk is over 1 MiB or the journal area too small; \
                         a crash that leaves the array dirty and degraded will need --force-assemble"
                    );
                }
                log
            }
            _ => None,
        };
        let inner = Arc::new(ArrayInner {
            name: params.name,
            layout,
            members,
            pool,
            locks: KeyLocks::new(),
            meta,
            model,
            failed: AtomicBool::new(false),
            max_payload: params.max_payload,
            recon: Grants::new(grants.iter().map(|g| g / 8).collect(), params.accounting),
            grants: Grants::new(grants.clone(), params.accounting),
            bg_grants: Grants::new(
                vec![params.background_grant; grants.len()],
                params.accounting,
            ),
            throttle: params.throttle,
            state_changed: tokio::sync::watch::Sender::new(0),
            log,
            foreground: Foreground {
                epoch: std::time::Instant::now(),
                last_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
            },
            sync_rate_busy: params.sync_rate_busy,
        });
        inner.update_failed();
        Self { inner }
    }

    /// Returns the shared state.
    pub fn inner(&self) -> &Arc<ArrayInner> {
        &self.inner
    }
}

impl ArrayInner {
    /// Reports whether the array has lost more than its level tolerates.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Returns the slots of members that are not in sync (faulty, missing,
    /// or still recovering).
    pub fn degraded_slots(&self) -> Vec<usize> {
        self.members
            .iter()
            .filter(|m| !m.readable())
            .map(|m| m.slot)
            .collect()
    }

    /// Reports whether any member is not in sync.
    pub fn is_degraded(&self) -> bool {
        self.members.iter().any(|m| !m.readable())
    }

    /// Returns the member data offset below which every member is in sync
    /// ([`crate::member::in_sync_below`]).
    pub fn in_sync_below(&self) -> u64 {
        crate::member::in_sync_below(&self.members)
    }

    /// Recomputes whether the array can still serve every byte, and tells
    /// watchers that a member's state changed. A member being rebuilt
    /// counts as out (beyond its frontier it holds nothing yet): a RAID 5
    /// that loses a source in the middle of a rebuild fails, cleanly,
    /// instead of answering EIO for part of its data.
    pub(crate) fn update_failed(&self) {
        self.state_changed.send_modify(|v| *v = v.wrapping_add(1));
        let failed = self.lost_with(|_| false);
        if failed && !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                array = %self.name,
                lost = ?self.degraded_slots(),
                "array FAILED: more members lost than the level tolerates; every request gets EIO"
            );
        }
    }

    /// Reports whether the array could still serve every byte without
    /// member `slot` (as well as the members already out).
    pub fn survives_without(&self, slot: usize) -> bool {
        !self.lost_with(|s| s == slot)
    }

    /// Reports whether some byte has no in-sync member left, with the
    /// members `out` says counted out as well.
    fn lost_with(&self, out: impl Fn(usize) -> bool) -> bool {
        let gone = |s: usize| out(s) || !self.members[s].readable();
        let n = self.members.len();
        match self.layout.level() {
            Level::Raid0 => (0..n).any(gone),
            Level::Raid1 => (0..n).all(gone),
            Level::Raid5 | Level::Raid6 => {
                (0..n).filter(|&s| gone(s)).count() > self.layout.level().parity_chunks()
            }
            Level::Raid10 => {
                // Chunk c's copies sit in slots c·copies.. (mod N); the
                // pattern repeats within N chunks.
                let copies = self.layout.geometry().copies;
                (0..n).any(|c| (0..copies).all(|k| gone((c * copies + k) % n)))
            }
        }
    }

    /// Fails member `slot` because of `e` (a member failure): records it in
    /// the surviving members' superblocks and returns once that is durable,
    /// so the caller may then acknowledge writes the member missed.
    pub async fn fail_member(&self, slot: usize, e: &MemberError) {
        let Some(m) = self.members.get(slot) else {
            return;
        };
        if matches!(m.state(), MemberState::Faulty | MemberState::Missing) {
            // Someone else failed it: make sure the record is durable
            // (returns at once when it already is).
            self.meta.record_failure(self, slot, &e.to_string()).await;
            return;
        }
        m.set_state(MemberState::Faulty);
        tracing::warn!(array = %self.name, member = slot, uri = %m.uri(), error = %e, "member failed");
        metrics::counter!("nbdraid_array_member_failures_total", "array" => self.name.clone())
            .increment(1);
        self.update_failed();
        self.meta.record_failure(self, slot, &e.to_string()).await;
    }

    /// Fails the members that a connection was lost to, without waiting
    /// for a request to find out: an idle array then records the failure
    /// at once, and a spare takes the slot before the next write needs it.
    pub async fn fail_disconnected(&self) {
        for m in &self.members {
            if matches!(m.state(), MemberState::Faulty | MemberState::Missing) {
                continue;
            }
            if let Some(why) = m.lost_connection() {
                let e = MemberError::Failed {
                    member: m.slot,
                    uri: m.uri().to_string(),
                    reason: format!("{why} (seen by the monitor, with no request outstanding)"),
                };
                self.fail_member(m.slot, &e).await;
            }
        }
    }

    /// Fails the member named by `e` if `e` is a member failure; returns
    /// whether it was one.
    pub async fn handle(&self, e: &MemberError) -> bool {
        if e.is_failure() || matches!(e, MemberError::Unavailable { .. }) {
            self.fail_member(e.member(), e).await;
            true
        } else {
            false
        }
    }

    /// Returns an EIO for a request the array cannot serve any more.
    pub fn failed_error(&self, op: &'static str) -> IoError {
        IoError::eio(
            op,
            &self.name,
            format!(
                "the array has lost more members than {} tolerates ({:?} not in sync)",
                self.layout.level(),
                self.degraded_slots()
            ),
        )
    }

    /// Maps a member error to the error the client sees.
    pub fn io_error(&self, op: &'static str, e: &MemberError) -> IoError {
        member_io_error(op, &self.name, e)
    }

    /// Notes that a client request came.
    fn served(&self) {
        let ms = self.foreground.epoch.elapsed().as_millis() as u64;
        self.foreground.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The rate background passes keep to now: `sync_rate_busy` when a
    /// client request came in the last 100 ms, else 0 (no cap).
    pub fn background_cap(&self) -> u64 {
        let last = self.foreground.last_ms.load(Ordering::Relaxed);
        let now = self.foreground.epoch.elapsed().as_millis() as u64;
        if last != u64::MAX && now.saturating_sub(last) < BUSY_WINDOW_MS {
            self.sync_rate_busy
        } else {
            0
        }
    }

    /// Returns a pooled buffer of `len` bytes.
    pub fn buffer(&self, len: usize) -> IoBuf {
        self.pool.get(len)
    }

    /// Returns the write-ordering lock keys of member range `[offset, end)`
    /// for a mirrored level.
    fn mirror_lock_keys(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let region = match self.layout.level() {
            Level::Raid1 => MIRROR_LOCK_REGION,
            _ => self.layout.chunk(),
        };
        let last = offset + len.max(1) - 1;
        offset / region..=last / region
    }

    /// Flushes every member that must hold data; fails those that cannot.
    pub async fn flush_members(&self) -> Result<(), IoError> {
        let completed = self.log.as_ref().map(|l| l.completed_below());
        let writable: Vec<_> = self.members.iter().filter(|m| m.writable()).collect();
        let results = futures::future::join_all(writable.iter().map(|m| m.flush())).await;
        for r in results {
            if let Err(e) = r
                && !self.handle(&e).await
            {
                return Err(self.io_error("flush", &e));
            }
        }
        if self.is_failed() {
            return Err(self.failed_error("flush"));
        }
        if let (Some(log), Some(seq)) = (&self.log, completed) {
            log.durable(seq);
        }
        Ok(())
    }
}

fn boxed<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, IoError>> + Send + 'static,
) -> IoFuture<T> {
    Box::pin(f)
}

impl BlockDevice for Array {
    fn info(&self) -> DeviceInfo {
        let i = &self.inner;
        let g = i.layout.geometry();
        let description = match g.level {
            Level::Raid1 => format!("{} over {} members", g.level, g.members),
            Level::Raid10 => format!(
                "{} over {} members, {} copies, chunk {}",
                g.level,
                g.members,
                g.copies,
                nbdraid_proto::ByteSize(g.chunk)
            ),
            _ => format!(
                "{} over {} members, chunk {}",
                g.level,
                g.members,
                nbdraid_proto::ByteSize(g.chunk)
            ),
        };
        DeviceInfo {
            size: i.layout.size(),
            read_only: false,
            block_sizes: BlockSizes {
                min: 1,
                preferred: 4096,
                max: i.max_payload,
            },
            // A FLUSH on any connection flushes every member.
            multi_conn: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: false,
            can_cache: true,
            rotational: false,
            description,
        }
    }

    fn read(&self, _ctx: IoContext, offset: u64, buf: IoBuf) -> IoFuture<IoBuf> {
        self.inner.served();
        let inner = self.inner.clone();
        boxed(async move { inner.read(offset, buf).await })
    }

    fn write(&self, _ctx: IoContext, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<()> {
        self.inner.served();
        let inner = self.inner.clone();
        boxed(async move {
            let data = Bytes::from_owner(buf);
            inner.write(offset, data, fua).await
        })
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<()> {
        let inner = self.inner.clone();
        boxed(async move {
            if inner.is_failed() {
                return Err(inner.failed_error("flush"));
            }
            inner.flush_members().await
        })
    }

    fn trim(&self, _ctx: IoContext, offset: u64, len: u64, fua: bool) -> IoFuture<()> {
        let inner = self.inner.clone();
        boxed(async move { inner.discard(offset, len, false, fua, true).await })
    }

    fn write_zeroes(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> IoFuture<()> {
        let inner = self.inner.clone();
        boxed(async move {
            if flags.fast {
                return Err(IoError::FastZeroUnsupported);
            }
            inner
                .discard(offset, len, flags.no_hole, flags.fua, false)
                .await
        })
    }

    fn cache(&self, _ctx: IoContext, _offset: u64, _len: u64) -> IoFuture<()> {
        // Advisory; the members' page caches do their own read-ahead.
        boxed(async { Ok(()) })
    }

    fn block_status(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> IoFuture<Vec<Extent>> {
        let inner = self.inner.clone();
        boxed(async move { inner.block_status(offset, len, max_extents).await })
    }

    fn cost(&self, op: OpKind, len: u64) -> u64 {
        let inner = &self.inner;
        cost::own_cost(
            &inner.model.load(),
            inner.layout.level(),
            inner.members.len() as u64,
            inner.layout.chunk(),
            op,
            len,
        )
    }

    fn reserve(
        &self,
        ctx: IoContext,
        op: OpKind,
        offset: u64,
        len: u64,
    ) -> Option<IoFuture<Reservation>> {
        let inner = &self.inner;
        let needs = inner.member_needs(op, offset, len);
        if needs.is_empty() {
            return None;
        }
        let grants = if ctx.class == IoClass::Background {
            inner.bg_grants.clone()
        } else {
            inner.grants.clone()
        };
        Some(Box::pin(async move {
            Ok(Reservation::new(grants.acquire(needs).await))
        }))
    }
}
