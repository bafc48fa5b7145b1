//! The array's metadata as the data path uses it: the write-intent bitmap
//! (set durably on every live member before a write reaches any of them),
//! the resync set, the clean/dirty mark, and member failures recorded in
//! the survivors' superblocks.
//!
//! # Superblock updates
//! One update at a time (an async mutex). An update bumps `events` and
//! writes each writable member's copy into the slot *not* holding its
//! newest valid copy (ping-pong, FUA), so a torn write never loses the
//! previous state. A member whose superblock write fails is failed and the
//! update is written again to the others with that recorded too.
//!
//! # Clean and dirty (md's safe mode)
//! The array is marked dirty (an update) before its first write after
//! being clean, and clean again after it has been idle for the safe-mode
//! delay, once every member has flushed ([`ArrayMeta::mark_clean_if_idle`]),
//! but never while regions still await their resync after an unclean
//! shutdown: the dirty mark is what makes the next start resync them if
//! the daemon dies again before the resync is done.
//! The race between a write starting and the clean mark is closed by
//! order: a write counts itself in flight *before* it reads the clean
//! flag; the clean mark sets the flag *before* it reads the in-flight
//! count, and backs off if a write is in flight. Either the mark sees the
//! write, or the write sees the mark (and waits for it, then marks dirty).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use nbdraid_engine::Error as IoError;

use super::ArrayInner;
use crate::member::{Member, MemberState};
use crate::meta::{
    BITMAP_OFFSET, BITMAP_PAGE_SIZE, Bitmap, MetaError, PersistPages, ResyncSet, Slot, Superblock,
    WriteGuard, encode, slot_for_next_write, superblock,
};

/// Why a bitmap update could not be made durable (cloneable, as every
/// writer waiting for the same page gets it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PersistError(String);

impl From<MetaError> for PersistError {
    fn from(e: MetaError) -> Self {
        PersistError(e.to_string())
    }
}

impl From<PersistError> for IoError {
    fn from(e: PersistError) -> Self {
        IoError::eio("bitmap", "array", e.0)
    }
}

/// Held while a write is in flight: its bitmap regions stay pending and
/// the array cannot be marked clean until it drops.
pub struct WriteIntent {
    _guard: Option<WriteGuard>,
    in_flight: Option<Arc<AtomicUsize>>,
}

impl Drop for WriteIntent {
    fn drop(&mut self) {
        if let Some(n) = &self.in_flight {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The superblock state shared by updates.
struct SbState {
    /// The array's superblock (role fields are per member, see `for_role`).
    sb: Superblock,
    /// Per slot: where the member's newest valid copy is.
    slots: Vec<Option<Slot>>,
}

/// The persisted part: superblocks and bitmap.
struct Persisted {
    state: tokio::sync::Mutex<SbState>,
    /// A copy of the superblock as last written, for status readers that
    /// must not wait for an update in progress.
    snapshot: std::sync::Mutex<Superblock>,
    bitmap: Bitmap<PersistError>,
    resync: ResyncSet,
    /// Mirrors `state.sb.clean` for the write path's fast check.
    clean: AtomicBool,
}

/// The array's metadata.
pub struct ArrayMeta {
    persisted: Option<Persisted>,
    in_flight: Arc<AtomicUsize>,
    /// Milliseconds since `epoch` at the end of the last write.
    last_write_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ArrayMeta {
    fn with(persisted: Option<Persisted>) -> Arc<Self> {
        Arc::new(Self {
            persisted,
            in_flight: Arc::new(AtomicUsize::new(0)),
            last_write_ms: Default::default(),
            epoch: std::time::Instant::now(),
        })
    }

    /// Returns metadata that persists nothing (in-memory arrays, tests).
    pub fn volatile() -> Arc<Self> {
        Self::with(None)
    }

    /// Returns the metadata of an array whose superblock is `sb` (as
    /// assembled or created), with member `slots` (where each member's
    /// newest copy is) and `bitmap` (loaded, with its resync set taken).
    pub fn persistent(
        sb: Superblock,
        slots: Vec<Option<Slot>>,
        bitmap: Bitmap<PersistError>,
    ) -> Arc<Self> {
        let resync = bitmap.resync();
        let clean = AtomicBool::new(sb.clean);
        Self::with(Some(Persisted {
            snapshot: std::sync::Mutex::new(sb.clone()),
            state: tokio::sync::Mutex::new(SbState { sb, slots }),
            bitmap,
            resync,
            clean,
        }))
    }

    /// Returns the bitmap, if the array has one.
    pub fn bitmap(&self) -> Option<&Bitmap<PersistError>> {
        self.persisted.as_ref().map(|p| &p.bitmap)
    }

    /// Returns the regions awaiting resync, if the array has a bitmap.
    pub fn resync_set(&self) -> Option<&ResyncSet> {
        self.persisted.as_ref().map(|p| &p.resync)
    }

    /// Returns a copy of the superblock as last written (no waiting).
    pub fn snapshot(&self) -> Option<Superblock> {
        self.persisted
            .as_ref()
            .map(|p| p.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Reports whether the array is marked clean.
    pub fn is_clean(&self) -> bool {
        self.persisted
            .as_ref()
            .is_none_or(|p| p.clean.load(Ordering::SeqCst))
    }

    /// Makes the superblock of a dirty array say whether this run logs
    /// its writes (`array.log`; assembly: the previous run's answer is what
    /// a replay just relied on; from now on it must be this run's).
    pub async fn record_logging(&self, array: &ArrayInner) -> Result<(), IoError> {
        let Some(p) = &self.persisted else {
            return Ok(());
        };
        let on = array.log.is_some();
        let mut st = p.state.lock().await;
        if st.sb.clean || st.sb.write_log == on {
            return Ok(());
        }
        st.sb.write_log = on;
        self.write_superblocks(array, &mut st).await
    }

    /// Returns the number of writes in flight.
    pub fn writes_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Marks member rows `rows` (member data offsets) as being written:
    /// the array is marked dirty and the rows' bitmap bits are durably set
    /// on every live member before this returns.
    pub async fn begin_write(
        &self,
        array: &ArrayInner,
        rows: Range<u64>,
    ) -> Result<WriteIntent, IoError> {
        let Some(p) = &self.persisted else {
            return Ok(WriteIntent {
                _guard: None,
                in_flight: None,
            });
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let intent_counter = WriteIntent {
            _guard: None,
            in_flight: Some(self.in_flight.clone()),
        };
        if p.clean.load(Ordering::SeqCst) {
            let mut st = p.state.lock().await;
            if st.sb.clean {
                st.sb.clean = false;
                // Whether these writes go through the partial-parity log.
                st.sb.write_log = array.log.is_some();
                self.write_superblocks(array, &mut st).await?;
                p.clean.store(false, Ordering::SeqCst);
            }
        }
        let guard = match p.bitmap.geometry().regions_for(rows) {
            Some(regions) => Some(p.bitmap.start_write(regions, &Persist(array)).await?),
            None => None,
        };
        self.last_write_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut intent = intent_counter;
        intent._guard = guard;
        Ok(intent)
    }

    /// Reports whether the row at member offset `row` still awaits resync
    /// (writes there must not trust parity: reconstruct-write only).
    pub fn resync_pending(&self, row: u64) -> bool {
        self.persisted.as_ref().is_some_and(|p| {
            let r = p.bitmap.geometry().region_of(row);
            p.resync.is_pending(r)
        })
    }

    /// Writes the superblocks as they stand now (a new array's first write).
    pub async fn commit(&self, array: &ArrayInner) -> Result<(), IoError> {
        let Some(p) = &self.persisted else {
            return Ok(());
        };
        let mut st = p.state.lock().await;
        self.write_superblocks(array, &mut st).await
    }

    /// Records member `slot`'s failure in the surviving members'
    /// superblocks; returns once it is durable (at once if it already is).
    pub async fn record_failure(&self, array: &ArrayInner, slot: usize, reason: &str) {
        let Some(p) = &self.persisted else {
            return;
        };
        let mut st = p.state.lock().await;
        let at_event = st.sb.events + 1;
        let Some(role) = st.sb.roles.get_mut(slot) else {
            return;
        };
        if matches!(role.state, superblock::MemberState::Faulty { .. }) {
            return;
        }
        role.state = superblock::MemberState::Faulty { at_event };
        role.errors += 1;
        tracing::warn!(array = %array.name, member = slot, at_event, %reason, "recording member failure");
        if let Err(e) = self.write_superblocks(array, &mut st).await {
            tracing::error!(array = %array.name, error = %e, "could not record a member failure on any member");
        }
    }

    /// Records that member `slot` is in sync again (after a re-add or a rebuild).
    pub async fn record_active(&self, array: &ArrayInner, slot: usize) -> Result<(), IoError> {
        let Some(p) = &self.persisted else {
            return Ok(());
        };
        let mut st = p.state.lock().await;
        if let Some(role) = st.sb.roles.get_mut(slot) {
            role.state = superblock::MemberState::Active;
        }
        self.write_superblocks(array, &mut st).await
    }

    /// Records that member `slot` is being recovered (writes go to it,
    /// reads do not) with `done` bytes rebuilt.
    pub async fn record_recovering(
        &self,
        array: &ArrayInner,
        slot: usize,
        done: u64,
    ) -> Result<(), IoError> {
        let Some(p) = &self.persisted else {
            return Ok(());
        };
        let mut st = p.state.lock().await;
        if let Some(role) = st.sb.roles.get_mut(slot) {
            role.state = superblock::MemberState::Recovering { done };
        }
        self.write_superblocks(array, &mut st).await
    }

    /// Gives slot `slot` to a new member volume (a replacement or a spare):
    /// `member` already holds its client and URI and is not yet written.
    /// Zeroes its second superblock slot, writes it the bitmap, records the
    /// role as `member_uuid` at `uri`, recovering from 0, on every writable
    /// member including the new one (which becomes writable here), and
    /// writes the bitmap to every member again (pages changed meanwhile).
    pub async fn adopt_member(
        &self,
        array: &ArrayInner,
        member: &Member,
        member_uuid: uuid::Uuid,
        uri: &str,
    ) -> Result<(), IoError> {
        let Some(p) = &self.persisted else {
            member.set_recovered(0);
            member.set_state(MemberState::Recovering);
            return Ok(());
        };
        let eio = |e: crate::member::MemberError| IoError::eio("adopt", uri, e.to_string());
        member
            .write_raw(
                crate::meta::SB_B_OFFSET,
                Bytes::from(vec![0u8; crate::meta::SB_SLOT_SIZE as usize]),
                false,
            )
            .await
            .map_err(eio)?;
        for page in 0..p.bitmap.geometry().pages() {
            let bytes = Bytes::from(p.bitmap.page_bytes(page));
            member
                .write_raw(BITMAP_OFFSET + page * BITMAP_PAGE_SIZE, bytes, false)
                .await
                .map_err(eio)?;
        }
        member.flush().await.map_err(eio)?;
        {
            let mut st = p.state.lock().await;
            let Some(role) = st.sb.roles.get_mut(member.slot) else {
                return Err(IoError::Invalid(format!("no slot {}", member.slot)));
            };
            *role = superblock::RoleState {
                member_uuid,
                uri: uri.to_string(),
                state: superblock::MemberState::Recovering { done: 0 },
                errors: 0,
            };
            if let Some(slot) = st.slots.get_mut(member.slot) {
                // Its copy B is zeroes: the first copy goes to A.
                *slot = None;
            }
            member.set_recovered(0);
            member.set_state(MemberState::Recovering);
            self.write_superblocks(array, &mut st).await?;
        }
        p.bitmap
            .persist_all(&Persist(array))
            .await
            .map_err(|e| IoError::eio("bitmap", &array.name, e.0))?;
        Ok(())
    }

    /// Marks the array clean if no write is in flight, none has come for
    /// `idle`, and no region awaits its resync, after flushing every
    /// member. Returns whether it did.
    pub async fn mark_clean_if_idle(&self, array: &ArrayInner, idle: Duration) -> bool {
        let Some(p) = &self.persisted else {
            return false;
        };
        if p.clean.load(Ordering::SeqCst)
            || self.writes_in_flight() > 0
            || p.resync.pending_count() > 0
        {
            return false;
        }
        let last = self.last_write_ms.load(Ordering::Relaxed);
        if self.epoch.elapsed().as_millis() as u64 - last < idle.as_millis() as u64 {
            return false;
        }
        if array.flush_members().await.is_err() {
            return false;
        }
        let mut st = p.state.lock().await;
        // Flag first, then look for writes (see the module docs).
        p.clean.store(true, Ordering::SeqCst);
        if self.writes_in_flight() > 0 || array.is_failed() {
            p.clean.store(false, Ordering::SeqCst);
            return false;
        }
        st.sb.clean = true;
        if self.write_superblocks(array, &mut st).await.is_err() {
            st.sb.clean = false;
            p.clean.store(false, Ordering::SeqCst);
            return false;
        }
        tracing::debug!(array = %array.name, events = st.sb.events, "array marked clean");
        true
    }

    /// Clears idle bitmap regions where every member is in sync (none while
    /// a member is failed; below the frontier while one is rebuilt) and
    /// writes the pages, after a flush of every member.
    pub async fn sweep_bitmap(&self, array: &ArrayInner, idle: Duration) {
        let Some(p) = &self.persisted else {
            return;
        };
        let region = p.bitmap.geometry().region.max(1);
        let clear_below = match array.in_sync_below() {
            u64::MAX => u64::MAX,
            offset => offset / region,
        };
        let mut batch = p
            .bitmap
            .sweep(tokio::time::Instant::now(), idle, clear_below);
        if batch.is_empty() {
            return;
        }
        // The data of the cleared regions must be durable before the bits go.
        if array.flush_members().await.is_err() {
            return;
        }
        let pages = batch.take_pages();
        let _ = write_pages(array, pages, false).await;
        drop(batch);
    }

    /// Bumps the events and writes the superblock to every writable
    /// member; a member that fails is recorded faulty and the update
    /// written again to the rest. Errors if no member took it.
    async fn write_superblocks(&self, array: &ArrayInner, st: &mut SbState) -> Result<(), IoError> {
        loop {
            st.sb.bump(now_unix());
            let targets: Vec<&Arc<Member>> =
                array.members.iter().filter(|m| m.writable()).collect();
            if targets.is_empty() {
                return Err(IoError::eio(
                    "superblock",
                    &array.name,
                    "no member left to record the array's state on",
                ));
            }
            let writes = targets.iter().map(|m| {
                let slot = slot_for_next_write(st.slots.get(m.slot).copied().flatten());
                let copy = st.sb.for_role(m.slot).ok_or_else(|| {
                    MetaError::Invalid(format!("no role {} in the superblock", m.slot))
                });
                async move {
                    let copy = copy
                        .map_err(|e| IoError::eio("superblock", m.uri().as_str(), e.to_string()))?;
                    let bytes = encode(&copy)
                        .map_err(|e| IoError::eio("superblock", m.uri().as_str(), e.to_string()))?;
                    m.write_raw(slot.offset(), Bytes::from(bytes), true)
                        .await
                        .map(|()| slot)
                        .map_err(|e| IoError::eio("superblock", m.uri().as_str(), e.to_string()))
                }
            });
            let results = futures::future::join_all(writes).await;
            let mut failed = Vec::new();
            for (m, r) in targets.iter().zip(results) {
                match r {
                    Ok(slot) => {
                        if let Some(s) = st.slots.get_mut(m.slot) {
                            *s = Some(slot);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(array = %array.name, member = m.slot, error = %e, "superblock write failed; failing the member");
                        failed.push(m.slot);
                    }
                }
            }
            if failed.is_empty() {
                if let Some(p) = &self.persisted {
                    *p.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = st.sb.clone();
                }
                return Ok(());
            }
            for slot in failed {
                array.members[slot].set_state(MemberState::Faulty);
                // The update it missed is this one, not the next (which
                // records the failure): the member holds at least the
                // previous events, and everything written after this
                // update is in the bitmap, so a re-add from the bitmap
                // covers it (`record_failure`'s rule: own + 1 >= at_event).
                let at_event = st.sb.events;
                if let Some(role) = st.sb.roles.get_mut(slot) {
                    role.state = superblock::MemberState::Faulty { at_event };
                    role.errors += 1;
                }
            }
            array.update_failed();
        }
    }
}

/// Writes bitmap pages to every writable member; a member that fails is
/// failed. Errors only if no member took them.
async fn write_pages(
    array: &ArrayInner,
    pages: Vec<(u64, Vec<u8>)>,
    fua: bool,
) -> Result<(), IoError> {
    let pages: Vec<(u64, Bytes)> = pages
        .into_iter()
        .map(|(i, b)| (BITMAP_OFFSET + i * BITMAP_PAGE_SIZE, Bytes::from(b)))
        .collect();
    let targets: Vec<&Arc<Member>> = array.members.iter().filter(|m| m.writable()).collect();
    let writes = targets.iter().map(|m| {
        let pages = &pages;
        async move {
            for (off, bytes) in pages {
                m.write_raw(*off, bytes.clone(), fua).await?;
            }
            Ok::<(), crate::member::MemberError>(())
        }
    });
    let mut ok = 0;
    for r in futures::future::join_all(writes).await {
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                array.handle(&e).await;
            }
        }
    }
    if ok == 0 {
        return Err(IoError::eio(
            "bitmap",
            &array.name,
            "no member took the write-intent bitmap update",
        ));
    }
    Ok(())
}

/// Writes bitmap pages (FUA) for `Bitmap::start_write`.
struct Persist<'a>(&'a ArrayInner);

impl PersistPages<PersistError> for Persist<'_> {
    fn persist(&self, pages: Vec<(u64, Vec<u8>)>) -> BoxFuture<'_, Result<(), PersistError>> {
        Box::pin(async move {
            write_pages(self.0, pages, true)
                .await
                .map_err(|e| PersistError(e.to_string()))
        })
    }
}
