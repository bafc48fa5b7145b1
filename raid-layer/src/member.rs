//! One member of an array: a volume on a storage node, reached through the
//! client library over one or more NBD connections.
//!
//! A member is addressed in two ways: its *data area* (member offset 0 is
//! the array's first byte on it, at `data_offset` in the volume) for array
//! I/O, and raw volume offsets for the metadata in front of the data area
//! (superblocks, bitmap). Every operation reports either success, a
//! failure of the member (EIO, a lost connection, no progress within the
//! liveness timeout: the array then fails the member), or the caller's
//! mistake (EINVAL, ENOSPC...: a bug in the array's mapping, never a
//! reason to fail the member).
//!
//! State: `Active` (in sync: read and written), `Recovering` (written, not
//! yet read: it is being resynced or rebuilt), `Faulty` (neither), and
//! `Missing` (not found at assembly). The state is an atomic read on every
//! request; only the array changes it, after recording the change in the
//! superblocks when that matters.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use nbdraid_client::{Client, ClientConfig, ClientError, Extent, IoBuf, Request};
use nbdraid_engine::cost::CostModel;

tokio::task_local! {
    /// Set around background work (resync, recovery, check): member I/O
    /// then goes over the member's background connection, which draws from
    /// the member's background share.
    static BACKGROUND: ();
}

/// Runs `fut` as background work (see [`Member`]'s background connection).
pub async fn in_background<F: std::future::Future>(fut: F) -> F::Output {
    BACKGROUND.scope((), fut).await
}

fn is_background() -> bool {
    BACKGROUND.try_with(|_| ()).is_ok()
}

/// The cost model charged for a member that has not published one (or
/// cannot be asked): twice a plain node's, to stay on the safe side.
pub fn fallback_model() -> CostModel {
    use nbdraid_engine::cost::{OpCost, PER_BYTE_ONE};
    use nbdraid_engine::device::OpKind;
    let node = CostModel::buffers("member (default)");
    OpKind::ALL.into_iter().fold(node.clone(), |m, op| {
        let c = node.op(op);
        m.with_op(
            op,
            OpCost {
                base: c.base * 2,
                per_byte: (c.per_byte * 2).max(if op.has_data() { PER_BYTE_ONE } else { 0 }),
            },
        )
    })
}

/// What a member is to its array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemberState {
    /// In sync: read and written.
    Active = 0,
    /// Written but not read: being resynced or rebuilt.
    Recovering = 1,
    /// Failed: neither read nor written until re-added.
    Faulty = 2,
    /// Not present (unreachable or refused at assembly).
    Missing = 3,
}

impl MemberState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => MemberState::Active,
            1 => MemberState::Recovering,
            2 => MemberState::Faulty,
            _ => MemberState::Missing,
        }
    }

    /// Returns the lower-case name used in status and metrics.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Recovering => "recovering",
            MemberState::Faulty => "faulty",
            MemberState::Missing => "missing",
        }
    }
}

/// How a member operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MemberError {
    /// The member failed (I/O error, lost connection, no progress): the
    /// array must stop using it. A write that failed so may have been applied.
    #[error("member {member} ({uri}) failed: {reason}")]
    Failed {
        /// The member's slot.
        member: usize,
        /// Its URI.
        uri: String,
        /// What happened.
        reason: String,
    },
    /// The request itself was refused (a bug in the array's mapping, or an
    /// error the caller must see); the member is fine.
    #[error("member {member} refused a request: {error}")]
    Refused {
        /// The member's slot.
        member: usize,
        /// The client's error.
        error: ClientError,
    },
    /// The member is not connected (faulty or missing).
    #[error("member {member} ({uri}) is not available")]
    Unavailable {
        /// The member's slot.
        member: usize,
        /// Its URI.
        uri: String,
    },
}

impl MemberError {
    /// Reports whether the member must be failed because of this error.
    pub fn is_failure(&self) -> bool {
        matches!(self, MemberError::Failed { .. })
    }

    /// Returns the failed or unavailable member's slot.
    pub fn member(&self) -> usize {
        match self {
            MemberError::Failed { member, .. }
            | MemberError::Refused { member, .. }
            | MemberError::Unavailable { member, .. } => *member,
        }
    }
}

/// Counters shown in status and metrics.
#[derive(Debug, Default)]
pub struct MemberStats {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Failed operations.
    pub errors: AtomicU64,
    /// Sum of completed operations' latencies, in microseconds.
    pub latency_us: AtomicU64,
}

impl MemberStats {
    /// Sets every counter back to zero (a new volume in the slot).
    fn reset(&self) {
        let Self {
            reads,
            writes,
            errors,
            latency_us,
        } = self;
        for c in [reads, writes, errors, latency_us] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The `?grpc=` of a member URI.
fn grpc_of(uri: &str) -> Option<String> {
    nbdraid_client::uri::parse_full(uri)
        .ok()
        .and_then(|u| u.grpc)
}

/// One member of an array.
pub struct Member {
    /// The member's slot (role) in the array.
    pub slot: usize,
    /// Where it is: `nbd://host:port/export` (changes when the slot is
    /// given to a replacement).
    uri: ArcSwap<String>,
    /// Offset of the data area in the member volume.
    pub data_offset: u64,
    /// The member layer's gRPC control plane (`?grpc=` in its URI), for
    /// its cost model and grants.
    grpc: ArcSwap<Option<String>>,
    client: RwLock<Option<Arc<Client>>>,
    /// A connection for background work, drawing from the member's
    /// background share (falls back to the foreground client).
    bg_client: RwLock<Option<Arc<Client>>>,
    /// The member's published cost model (or [`fallback_model`]).
    model: ArcSwap<CostModel>,
    state: AtomicU8,
    outstanding: AtomicUsize,
    /// The rebuild frontier of a recovering member (member data offset).
    recovered: AtomicU64,
    /// Member blocks being read-modify-written for an unaligned write.
    partial_blocks: Arc<crate::array::KeyLocks>,
    /// Operation counters.
    pub stats: MemberStats,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("slot", &self.slot)
            .field("uri", &self.uri())
            .field("state", &self.state())
            .finish()
    }
}

/// Decrements the outstanding count when an operation ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Returns the member data offset below which every one of `members` is
/// in sync: 0 while one is failed or missing, the lowest rebuild frontier
/// while members are recovering, `u64::MAX` when all are active.
pub fn in_sync_below(members: &[Arc<Member>]) -> u64 {
    members
        .iter()
        .map(|m| match m.state() {
            MemberState::Active => u64::MAX,
            MemberState::Recovering => m.recovered(),
            MemberState::Faulty | MemberState::Missing => 0,
        })
        .min()
        .unwrap_or(u64::MAX)
}

/// The client settings for a member: several connections, no per-request
/// deadline (a slow member is throttled, not failed), and the liveness
/// timeout as the stall detector (a member with work outstanding that
/// completes nothing for that long is failed).
pub fn member_client_config(connections: usize, liveness: Duration) -> ClientConfig {
    ClientConfig {
        connections,
        request_timeout: None,
        stall_timeout: Some(liveness),
        connect_timeout: liveness.max(Duration::from_secs(1)),
        ..ClientConfig::default()
    }
}

impl Member {
    /// Returns a member in `state` reached through `client` (none when it
    /// could not be connected).
    pub fn new(
        slot: usize,
        uri: &str,
        data_offset: u64,
        client: Option<Arc<Client>>,
        state: MemberState,
    ) -> Arc<Self> {
        Arc::new(Self {
            slot,
            uri: ArcSwap::from_pointee(uri.to_string()),
            data_offset,
            grpc: ArcSwap::from_pointee(grpc_of(uri)),
            client: RwLock::new(client),
            bg_client: RwLock::new(None),
            model: ArcSwap::from_pointee(fallback_model()),
            state: AtomicU8::new(state as u8),
            outstanding: AtomicUsize::new(0),
            recovered: AtomicU64::new(0),
            partial_blocks: crate::array::KeyLocks::new(),
            stats: MemberStats::default(),
        })
    }

    /// Returns where the member is: `nbd://host:port/export`.
    pub fn uri(&self) -> Arc<String> {
        self.uri.load_full()
    }

    /// Returns the member layer's gRPC control plane, if its URI names one.
    pub fn grpc(&self) -> Option<String> {
        self.grpc.load().as_ref().clone()
    }

    /// Gives the slot to the volume at `uri` (a replacement): callers set
    /// its client and state next. The slot's counters start again from
    /// zero, so the old member's errors are not shown as the new one's.
    pub fn set_uri(&self, uri: &str) {
        self.grpc.store(Arc::new(grpc_of(uri)));
        self.uri.store(Arc::new(uri.to_string()));
        self.stats.reset();
    }

    /// Returns the member's state.
    pub fn state(&self) -> MemberState {
        MemberState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the member's state (the array records it in the superblocks first
    /// where that matters).
    pub fn set_state(&self, s: MemberState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Returns the member data offset below which a `Recovering` member is
    /// in sync (its rebuild's frontier; meaningless in other states).
    pub fn recovered(&self) -> u64 {
        self.recovered.load(Ordering::Acquire)
    }

    /// Moves the rebuild frontier (see [`Member::recovered`]).
    pub fn set_recovered(&self, offset: u64) {
        self.recovered.store(offset, Ordering::Release);
    }

    /// Reports whether reads may go to this member.
    pub fn readable(&self) -> bool {
        self.state() == MemberState::Active
    }

    /// Reports whether writes must go to this member.
    pub fn writable(&self) -> bool {
        matches!(self.state(), MemberState::Active | MemberState::Recovering)
    }

    /// Returns the number of operations in flight (for least-loaded reads).
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Returns the client, if connected.
    pub fn client(&self) -> Option<Arc<Client>> {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Returns why a connection to the member was lost, if one was (its
    /// node killed or cut off), without sending it anything.
    pub fn lost_connection(&self) -> Option<String> {
        [self.client(), self.bg_client()]
            .into_iter()
            .flatten()
            .find_map(|c| {
                (0..c.connections()).find_map(|i| match c.state(i) {
                    Some(nbdraid_client::ConnState::Failed(why)) => Some(why),
                    _ => None,
                })
            })
    }

    /// Returns the background client, if one is connected.
    pub fn bg_client(&self) -> Option<Arc<Client>> {
        self.bg_client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the background client, returning the old one.
    pub fn set_bg_client(&self, client: Option<Arc<Client>>) -> Option<Arc<Client>> {
        std::mem::replace(
            &mut *self.bg_client.write().unwrap_or_else(|e| e.into_inner()),
            client,
        )
    }

    /// Returns the member's cost model in force.
    pub fn model(&self) -> Arc<CostModel> {
        self.model.load_full()
    }

    /// Returns a cheap view of the member's cost model, for the hot path.
    pub fn model_guard(&self) -> arc_swap::Guard<Arc<CostModel>> {
        self.model.load()
    }

    /// Sets the member's cost model (followed from its `Throttle` service).
    pub fn set_model(&self, model: CostModel) {
        self.model.store(Arc::new(model));
    }

    /// Replaces the client (after a reconnect), returning the old one.
    pub fn set_client(&self, client: Option<Arc<Client>>) -> Option<Arc<Client>> {
        std::mem::replace(
            &mut *self.client.write().unwrap_or_else(|e| e.into_inner()),
            client,
        )
    }

    /// Returns the member volume's size, if connected.
    pub fn volume_size(&self) -> Option<u64> {
        self.client().map(|c| c.info().size)
    }

    fn unavailable(&self) -> MemberError {
        MemberError::Unavailable {
            member: self.slot,
            uri: self.uri().to_string(),
        }
    }

    fn classify(&self, e: ClientError) -> MemberError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if e.is_member_failure() || matches!(e, ClientError::Closed) {
            MemberError::Failed {
                member: self.slot,
                uri: self.uri().to_string(),
                reason: e.to_string(),
            }
        } else {
            MemberError::Refused {
                member: self.slot,
                error: e,
            }
        }
    }

    /// Runs `req` on the member's client, counting it in flight.
    async fn submit(&self, req: Request) -> Result<nbdraid_client::Done, MemberError> {
        let bg = if is_background() {
            self.bg_client().filter(|c| c.is_ready())
        } else {
            None
        };
        let client = bg
            .or_else(|| self.client())
            .ok_or_else(|| self.unavailable())?;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.outstanding);
        let start = quanta::Instant::now();
        let done = client.submit(req).await;
        self.stats
            .latency_us
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// Reads `buf.len()` bytes at raw volume offset `offset` into `buf`.
    /// On failure the buffer is handed back with the error when the client
    /// still had it.
    pub async fn read_raw(
        &self,
        offset: u64,
        buf: IoBuf,
    ) -> Result<IoBuf, (MemberError, Option<IoBuf>)> {
        let done = self
            .submit(Request::Read { offset, buf })
            .await
            .map_err(|e| (e, None))?;
        match done.result {
            Ok(()) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                done.buffer
                    .ok_or_else(|| (self.classify(ClientError::Closed), None))
            }
            Err(e) => Err((self.classify(e), done.buffer)),
        }
    }

    /// Writes `data` at raw volume offset `offset`.
    pub async fn write_raw(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), MemberError> {
        let done = self.submit(Request::Write { offset, data, fua }).await?;
        done.result.map_err(|e| self.classify(e))?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns the member's minimum block size (1 when it has none).
    pub fn min_block(&self) -> u64 {
        self.client()
            .map_or(1, |c| u64::from(c.info().min_block.max(1)))
    }

    /// Returns the range `[offset, offset+len)` widened to the member's
    /// minimum block size, or `None` when it is aligned already.
    fn widen(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let m = self.min_block();
        if m <= 1 || (offset.is_multiple_of(m) && len.is_multiple_of(m)) {
            return None;
        }
        let lo = offset / m * m;
        let hi = (offset + len).div_ceil(m) * m;
        Some((lo, hi - lo))
    }

    /// Reads from the data area (see [`Member::read_raw`]). A range the
    /// member's minimum block size does not allow is read as the aligned
    /// range around it and the bytes asked for copied out (clients such
    /// as the Linux kernel ignore advertised block sizes, and the array
    /// serves any alignment).
    pub async fn read(
        &self,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf, (MemberError, Option<IoBuf>)> {
        let Some((lo, n)) = self.widen(offset, buf.len() as u64) else {
            return self.read_raw(self.data_offset + offset, buf).await;
        };
        let wide = self
            .read_raw(self.data_offset + lo, IoBuf::zeroed(n as usize))
            .await
            .map_err(|(e, _)| (e, None))?;
        let at = (offset - lo) as usize;
        let len = buf.len();
        buf.copy_from_slice(&wide[at..at + len]);
        Ok(buf)
    }

    /// Writes to the data area. A range the member's minimum block size
    /// does not allow is written as the aligned range around it, read
    /// first. The blocks are locked meanwhile: the array's stripe and
    /// region locks keep other requests out of them, but one RAID 5/6
    /// write may update two parity ranges inside one block at once. (An
    /// aligned write never shares a block with a concurrent unaligned one:
    /// their ranges are disjoint.)
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), MemberError> {
        let Some((lo, n)) = self.widen(offset, data.len() as u64) else {
            return self.write_raw(self.data_offset + offset, data, fua).await;
        };
        // Only the edge blocks are partly written; the ones between are
        // this write's alone.
        let m = self.min_block();
        let _blocks = self
            .partial_blocks
            .lock_all([lo / m, (lo + n) / m - 1])
            .await;
        let mut wide = self
            .read_raw(self.data_offset + lo, IoBuf::zeroed(n as usize))
            .await
            .map_err(|(e, _)| e)?;
        let at = (offset - lo) as usize;
        wide[at..at + data.len()].copy_from_slice(&data);
        self.write_raw(self.data_offset + lo, Bytes::from_owner(wide), fua)
            .await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), MemberError> {
        let done = self.submit(Request::Flush).await?;
        done.result.map_err(|e| self.classify(e))
    }

    /// Discards a range of the data area (advisory).
    /// Only the whole member blocks inside the range are trimmed.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), MemberError> {
        let m = self.min_block();
        let (lo, hi) = (offset.div_ceil(m) * m, (offset + len) / m * m);
        if lo >= hi {
            return Ok(());
        }
        let done = self
            .submit(Request::Trim {
                offset: self.data_offset + lo,
                len: hi - lo,
            })
            .await?;
        done.result.map_err(|e| self.classify(e))
    }

    /// Makes a range of the data area read as zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), MemberError> {
        // Partial member blocks at either end are written as zero data.
        let m = self.min_block();
        let end = offset + len;
        let (lo, hi) = (offset.div_ceil(m) * m, end / m * m);
        if lo >= hi {
            let zeros = Bytes::from(vec![0u8; len as usize]);
            return self.write(offset, zeros, fua).await;
        }
        if offset < lo {
            let zeros = Bytes::from(vec![0u8; (lo - offset) as usize]);
            self.write(offset, zeros, fua).await?;
        }
        if hi < end {
            let zeros = Bytes::from(vec![0u8; (end - hi) as usize]);
            self.write(hi, zeros, fua).await?;
        }
        let done = self
            .submit(Request::WriteZeroes {
                offset: self.data_offset + lo,
                len: hi - lo,
                no_hole,
                fast: false,
                fua,
            })
            .await?;
        done.result.map_err(|e| self.classify(e))
    }

    /// Returns the allocation extents of a range of the data area (offsets
    /// relative to the data area).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, MemberError> {
        let done = self
            .submit(Request::BlockStatus {
                offset: self.data_offset + offset,
                len,
            })
            .await?;
        done.result.map_err(|e| self.classify(e))?;
        Ok(done
            .extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset.saturating_sub(self.data_offset),
                ..e
            })
            .collect())
    }

    /// Reports whether the member's client negotiated `base:allocation`.
    pub fn has_block_status(&self) -> bool {
        self.client()
            .is_some_and(|c| c.info().allocation_context.is_some())
    }
}
