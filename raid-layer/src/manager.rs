//! The array daemon's arrays: assembled or created from specs, served as
//! exports, with their background work, and the admin operations of
//! [`ArrayAdmin`].
//!
//! Per array, one housekeeping task: marks the array clean when idle
//! (md's safe mode), clears idle bitmap regions, and re-adds a failed
//! member that comes back when its superblock shows it only missed what
//! the bitmap covers (its own events are at most one behind the event
//! that recorded its failure; the bitmap is never cleared while degraded,
//! so every region written since is marked). A resync of the dirty regions
//! after an unclean shutdown, a recovery of a re-added member, and a check
//! run as their own tasks; status shows their progress.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use nbdraid_client::{Client, IoBuf};
use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::server::Exports;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::{
    AdminError, ArrayAdmin, ArraySpec, ArrayState, ArrayStatus, CheckReport, MemberStatus, Removal,
};
use crate::array::{Array, ArrayInner};
use crate::assemble::assemble;
use crate::member::{MemberState, member_client_config};
use crate::meta::{SB_SLOT_SIZE, SbRead, read_copies, superblock};
use crate::sync::{Pacer, Pass, Tally};
use nbdraid_engine::device::OpKind;
use nbdraid_engine::lease::{Lease, LeaseConfig, ModelWatch};

/// Tunables every array of a daemon shares.
#[derive(Clone)]
pub struct ManagerSettings {
    /// NBD connections to each member.
    pub member_connections: usize,
    /// A member with work outstanding that completes nothing for this long
    /// is failed (a slow member is not).
    pub liveness_timeout: Duration,
    /// An array idle for this long is marked clean (md's safe mode).
    pub safe_mode_delay: Duration,
    /// A bitmap region idle for this long has its bit cleared.
    pub bitmap_idle: Duration,
    /// Largest READ/WRITE payload the arrays accept.
    pub max_payload: u32,
    /// Resync/recovery/check rate limit in bytes per second (0: none).
    pub sync_rate: u64,
    /// Their rate while clients are being served (0: no yielding).
    pub sync_rate_busy: u64,
    /// Scrub every array this often (zero: never).
    pub scrub_interval: Duration,
    /// Scheduled scrubs repair (when the array is not degraded).
    pub scrub_repair: bool,
    /// RAID 5/6 writes go through the partial-parity log.
    pub write_log: bool,
    /// Units the array asks each member to grant it (foreground and
    /// background each) and accounts its requests against.
    pub member_grant: u64,
    /// Units asked of each member's background share.
    pub background_grant: u64,
    /// Whether admission waits for member grants (off: measurements only).
    pub accounting: bool,
    /// The daemon's own throttle.
    pub throttle: Option<Arc<nbdraid_engine::throttle::Throttle>>,
}

impl std::fmt::Debug for ManagerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerSettings")
            .field("member_connections", &self.member_connections)
            .field("liveness_timeout", &self.liveness_timeout)
            .field("safe_mode_delay", &self.safe_mode_delay)
            .field("bitmap_idle", &self.bitmap_idle)
            .field("max_payload", &self.max_payload)
            .field("sync_rate", &self.sync_rate)
            .field("sync_rate_busy", &self.sync_rate_busy)
            .field("scrub_interval", &self.scrub_interval)
            .field("scrub_repair", &self.scrub_repair)
            .field("write_log", &self.write_log)
            .field("member_grant", &self.member_grant)
            .field("background_grant", &self.background_grant)
            .field("accounting", &self.accounting)
            .finish()
    }
}

impl ManagerSettings {
    /// Returns the parameters of array `name` under these settings.
    pub fn array_params(&self, name: &str) -> crate::array::ArrayParams {
        crate::array::ArrayParams {
            member_grant: self.member_grant,
            background_grant: self.background_grant,
            accounting: self.accounting,
            throttle: self.throttle.clone(),
            write_log: self.write_log,
            sync_rate_busy: self.sync_rate_busy,
            ..crate::array::ArrayParams::new(name, self.max_payload)
        }
    }
}

impl Default for ManagerSettings {
    fn default() -> Self {
        Self {
            member_connections: 2,
            liveness_timeout: Duration::from_secs(10),
            safe_mode_delay: Duration::from_millis(500),
            bitmap_idle: Duration::from_secs(5),
            max_payload: 32 << 20,
            sync_rate: 0,
            sync_rate_busy: 64 << 20,
            scrub_interval: Duration::ZERO,
            scrub_repair: false,
            write_log: true,
            member_grant: 64 << 20,
            background_grant: 16 << 20,
            accounting: true,
            throttle: None,
        }
    }
}

/// What the daemon remembers of an array between starts (the members'
/// superblocks are authoritative over it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayRecord {
    /// How it was specified (members as they are now: a replacement's URI
    /// in its slot; the spares added since).
    pub spec: ArraySpec,
    /// Its uuid, once created.
    pub uuid: String,
    /// Slots given to replacements: slot -> (the URI it had, the
    /// replacement's), so that a configuration still naming the old volume
    /// assembles the new one (and says so).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replaced: BTreeMap<usize, (String, String)>,
}

/// Where the daemon keeps its [`ArrayRecord`]s (sled in the daemon).
pub trait ArrayStore: Send + Sync + 'static {
    /// Returns every record.
    fn list(&self) -> Result<Vec<ArrayRecord>, AdminError>;
    /// Inserts or replaces the record of `record.spec.name`, durably.
    fn put(&self, record: &ArrayRecord) -> Result<(), AdminError>;
    /// Removes the record of `name`, durably.
    fn remove(&self, name: &str) -> Result<(), AdminError>;
}

/// One served array and its background work.
struct Entry {
    array: Array,
    /// How it is specified now (members after replacements, spares).
    spec: Mutex<ArraySpec>,
    stop: CancellationToken,
    /// The running (or last) resync or recovery.
    sync: Mutex<Option<Arc<Tally>>>,
    /// The running (or last) check.
    check: Mutex<Option<Arc<Tally>>>,
    /// Slots being recovered (no second recovery of the same slot).
    recovering: Mutex<Vec<usize>>,
    /// When an automatic re-add of a slot last failed (back off).
    readd_backoff: Mutex<BTreeMap<usize, Instant>>,
    /// Per member: the grants held there and its model followed (replaced
    /// with the member).
    links: Vec<ArcSwap<MemberLinks>>,
    /// Resync, rebuild and check rate in bytes per second (0: unpaced),
    /// settable while they run.
    rate: Arc<std::sync::atomic::AtomicU64>,
    /// Hot spares: volumes that take a failed member's slot.
    spares: Mutex<Vec<String>>,
}

/// What the array holds at one member's control plane.
#[derive(Default)]
struct MemberLinks {
    /// The foreground grant.
    fg: Option<Lease>,
    /// The background grant (resync, recovery, check).
    bg: Option<Lease>,
    /// The member's published cost model.
    model: Option<ModelWatch>,
}

impl Entry {
    fn inner(&self) -> &Arc<ArrayInner> {
        self.array.inner()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The daemon's arrays.
pub struct Manager {
    settings: ManagerSettings,
    exports: Arc<Exports<Array>>,
    pool: Arc<BufferPool>,
    model: SharedCostModel,
    store: Arc<dyn ArrayStore>,
    arrays: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Creates and assemblies one at a time (member-conflict checks).
    creating: tokio::sync::Mutex<()>,
    stop: CancellationToken,
    /// This manager, for the tasks it spawns.
    me: std::sync::Weak<Manager>,
    /// What the daemon publishes: its own costs plus, for the array whose
    /// members cost the most, what a request costs them (see
    /// `array::cost`). The own model (`model`) is what requests are charged
    /// in this daemon's throttle.
    published: SharedCostModel,
}

impl Manager {
    /// Returns a manager serving its arrays in `exports`, with buffers from
    /// `pool`, charging by `model`, remembering arrays in `store`.
    pub fn new(
        settings: ManagerSettings,
        exports: Arc<Exports<Array>>,
        pool: Arc<BufferPool>,
        model: SharedCostModel,
        store: Arc<dyn ArrayStore>,
    ) -> Arc<Self> {
        describe_metrics();
        Arc::new_cyclic(|me| Self {
            settings,
            exports,
            pool,
            store,
            arrays: Mutex::new(BTreeMap::new()),
            creating: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            me: me.clone(),
            published: SharedCostModel::new(model.load().as_ref().clone()),
            model,
        })
    }

    /// Returns the model the daemon publishes (its `Throttle` service).
    pub fn published_model(&self) -> SharedCostModel {
        self.published.clone()
    }

    /// Returns what every array holds at its members, foreground and
    /// background (for the `Throttle` service and `nbdraid throttle show`).
    pub fn member_grants(&self) -> Vec<nbdraid_proto::grpc::MemberGrant> {
        let entries: Vec<Arc<Entry>> = lock(&self.arrays).values().cloned().collect();
        let mut out = Vec::new();
        for e in entries {
            let inner = e.inner();
            for (background, grants) in [(false, &inner.grants), (true, &inner.bg_grants)] {
                for (m, (grant, held, peak)) in inner.members.iter().zip(grants.snapshot()) {
                    let links = e.links.get(m.slot).map(ArcSwap::load_full);
                    let lease = links.as_ref().and_then(|l| {
                        if background {
                            l.bg.as_ref()
                        } else {
                            l.fg.as_ref()
                        }
                    });
                    out.push(nbdraid_proto::grpc::MemberGrant {
                        name: format!("{}/{}", inner.name, m.slot),
                        uri: m.uri().to_string(),
                        grant,
                        held,
                        peak,
                        background,
                        lease_held: lease.is_some_and(Lease::held),
                        model_live: links
                            .as_ref()
                            .and_then(|l| l.model.as_ref())
                            .is_some_and(ModelWatch::is_live),
                    });
                }
            }
        }
        out
    }

    /// Recomputes the published model from every array's composition.
    fn republish(&self) {
        let base = self.model.load();
        let entries: Vec<Arc<Entry>> = lock(&self.arrays).values().cloned().collect();
        let composed = entries
            .iter()
            .map(|e| {
                let inner = e.inner();
                inner.composed_model(&inner.model.load())
            })
            .fold(base.as_ref().clone(), |acc, m| {
                acc.max_with(&m, base.layer())
            });
        if *self.published.load() != composed {
            tracing::debug!(layer = base.layer(), "published cost model updated");
            self.published.set(composed);
        }
    }

    /// Opens the array's links to its members' control planes: a
    /// foreground and a background grant, and the member's cost model.
    fn link_members(&self, inner: &ArrayInner) -> Vec<ArcSwap<MemberLinks>> {
        inner
            .members
            .iter()
            .map(|m| ArcSwap::from_pointee(self.link_member(&inner.name, m)))
            .collect()
    }

    /// Opens the links to member `m`'s control plane (none without `?grpc=`).
    fn link_member(&self, array: &str, m: &crate::member::Member) -> MemberLinks {
        let Some(grpc) = m.grpc() else {
            return MemberLinks::default();
        };
        let lease = |background: bool| {
            Lease::start(
                &grpc,
                LeaseConfig {
                    upstream: format!(
                        "array {array} member {}{}",
                        m.slot,
                        if background { " (background)" } else { "" }
                    ),
                    units: if background {
                        self.settings.background_grant
                    } else {
                        self.settings.member_grant
                    },
                    background,
                    ..LeaseConfig::default()
                },
            )
        };
        MemberLinks {
            fg: Some(lease(false)),
            bg: Some(lease(true)),
            model: Some(ModelWatch::start(&grpc, crate::member::fallback_model())),
        }
    }

    /// Brings the array's view of its members' control planes up to date:
    /// models, grants in force, and the connections registered under each
    /// grant (again after every reconnect).
    async fn sync_links(&self, e: &Entry) {
        let inner = e.inner();
        for (m, links) in inner.members.iter().zip(&e.links) {
            let links = links.load_full();
            if let Some(watch) = &links.model {
                let model = watch.model();
                if *m.model() != model {
                    m.set_model(model);
                }
            }
            let grant = |l: &Option<Lease>, asked: u64| {
                l.as_ref()
                    .filter(|l| l.held())
                    .map_or(asked, Lease::granted)
            };
            inner
                .grants
                .set_grant(m.slot, grant(&links.fg, self.settings.member_grant));
            inner
                .bg_grants
                .set_grant(m.slot, grant(&links.bg, self.settings.background_grant));
            if let (Some(l), Some(c)) = (&links.fg, m.client()) {
                l.set_connections(c.local_addrs());
            }
            if let Some(l) = &links.bg {
                if m.bg_client().is_none_or(|c| !c.is_ready()) && m.writable() {
                    // One connection for background work, registered under
                    // the background grant.
                    let config = member_client_config(1, self.settings.liveness_timeout);
                    if let Ok(c) = Client::connect_uri(&m.uri(), config).await {
                        m.set_bg_client(Some(Arc::new(c)));
                    }
                }
                if let Some(c) = m.bg_client() {
                    l.set_connections(c.local_addrs());
                }
            }
        }
    }

    /// Assembles every array in the state store and every configured one
    /// (creating those whose members are blank). An array that cannot be
    /// assembled is logged with the reason and left out; the others serve.
    /// Errors name the arrays left out and why.
    pub async fn start(&self, configured: Vec<ArraySpec>) -> Result<(), AdminError> {
        let records = match self.store.list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the array state store");
                Vec::new()
            }
        };
        let mut specs: BTreeMap<String, ArraySpec> = records
            .iter()
            .map(|r| (r.spec.name.clone(), r.spec.clone()))
            .collect();
        for mut s in configured {
            if let Some(r) = records.iter().find(|r| r.spec.name == s.name) {
                for (slot, (old, new)) in &r.replaced {
                    if s.members.get(*slot) == Some(old) {
                        tracing::warn!(
                            array = %s.name,
                            member = slot,
                            configured = %old,
                            replacement = %new,
                            "the configuration names a member that was replaced; assembling the replacement (update the configuration)"
                        );
                        s.members[*slot] = new.clone();
                    }
                }
                for spare in &r.spec.spares {
                    if !s.spares.contains(spare) {
                        s.spares.push(spare.clone());
                    }
                }
            }
            specs.insert(s.name.clone(), s);
        }
        let mut errors = Vec::new();
        for spec in specs.into_values() {
            let name = spec.name.clone();
            if let Err(e) = self.add(spec).await {
                tracing::error!(array = %name, error = %e, "array not started");
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AdminError::Refused(errors.join("; ")))
        }
    }

    /// Stops the background work, then marks every array clean (flushing
    /// members first); called at graceful shutdown, after the engine has
    /// stopped taking requests.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let entries: Vec<Arc<Entry>> = lock(&self.arrays).values().cloned().collect();
        for e in entries {
            let inner = e.inner();
            // A rebuild resumes where it stopped.
            for m in inner
                .members
                .iter()
                .filter(|m| m.state() == MemberState::Recovering)
            {
                record_frontier(inner, m).await;
            }
            if inner.meta.mark_clean_if_idle(inner, Duration::ZERO).await {
                tracing::info!(array = %inner.name, "array marked clean");
            } else if !inner.meta.is_clean() {
                tracing::warn!(array = %inner.name, "array left dirty (writes in flight, resync unfinished, failed, or a member could not flush)");
            }
        }
    }

    fn record_of(&self, name: &str) -> Option<ArrayRecord> {
        self.store
            .list()
            .ok()?
            .into_iter()
            .find(|r| r.spec.name == name)
    }

    /// Records `e`'s spec as it is now (members, spares), keeping the
    /// record's replacements plus `replaced`.
    fn persist_spec(
        &self,
        e: &Entry,
        replaced: Option<(usize, String, String)>,
    ) -> Result<(), AdminError> {
        let mut spec = lock(&e.spec).clone();
        spec.spares = lock(&e.spares).clone();
        spec.force = false;
        spec.overwrite = false;
        let mut record = self.record_of(&spec.name).unwrap_or_else(|| ArrayRecord {
            spec: spec.clone(),
            uuid: e
                .inner()
                .meta
                .snapshot()
                .map(|sb| sb.array_uuid.to_string())
                .unwrap_or_default(),
            replaced: BTreeMap::new(),
        });
        if let Some((slot, old, new)) = replaced {
            // A slot replaced twice remembers the URI first configured.
            let first = record
                .replaced
                .get(&slot)
                .map_or(old, |(first, _)| first.clone());
            record.replaced.insert(slot, (first, new));
        }
        record.spec = spec;
        self.store.put(&record)
    }

    fn expected_uuid(&self, name: &str) -> Option<Uuid> {
        self.store
            .list()
            .ok()?
            .into_iter()
            .find(|r| r.spec.name == name)
            .and_then(|r| r.uuid.parse().ok())
    }

    /// Assembles or creates `spec` and starts serving it.
    async fn add(&self, spec: ArraySpec) -> Result<ArrayStatus, AdminError> {
        crate::config::validate_spec(&spec)?;
        let _one = self.creating.lock().await;
        {
            let arrays = lock(&self.arrays);
            if arrays.contains_key(&spec.name) {
                return Err(AdminError::Exists(spec.name.clone()));
            }
            for (other, e) in arrays.iter() {
                let theirs = lock(&e.spec);
                if let Some(m) = spec
                    .members
                    .iter()
                    .chain(&spec.spares)
                    .find(|m| theirs.members.contains(m) || theirs.spares.contains(m))
                {
                    return Err(AdminError::Invalid(format!(
                        "array {:?}: member {m} already belongs to array {other:?}",
                        spec.name
                    )));
                }
            }
        }
        let expected = self.expected_uuid(&spec.name);
        let (array, notes) = assemble(
            &spec,
            expected,
            &self.settings,
            self.pool.clone(),
            self.model.clone(),
        )
        .await?;
        if let Some(t) = &self.settings.throttle {
            let own = array.inner().model.load();
            let max = u64::from(self.settings.max_payload);
            let largest = own
                .cost(OpKind::Read, max)
                .max(own.cost(OpKind::Write, max));
            if t.enabled() && largest > t.min_share() {
                return Err(AdminError::Invalid(format!(
                    "array {:?}: its largest request needs {} of the daemon's buffers, more than a share of its \
                     throttle holds ({}); raise throttle.capacity (and background-reserve) or lower max-payload",
                    spec.name,
                    nbdraid_proto::ByteSize(largest),
                    nbdraid_proto::ByteSize(t.min_share())
                )));
            }
        }
        let uuid = array
            .inner()
            .meta
            .snapshot()
            .map(|sb| sb.array_uuid.to_string())
            .unwrap_or_default();
        let mut recorded = spec.clone();
        recorded.force = false;
        recorded.overwrite = false;
        let replaced = self
            .record_of(&spec.name)
            .map(|r| r.replaced)
            .unwrap_or_default()
            .into_iter()
            .filter(|(slot, (_, new))| spec.members.get(*slot) == Some(new))
            .collect();
        self.store.put(&ArrayRecord {
            spec: recorded,
            uuid,
            replaced,
        })?;
        let entry = Arc::new(Entry {
            array: array.clone(),
            spec: Mutex::new(spec.clone()),
            rate: Arc::new(std::sync::atomic::AtomicU64::new(self.settings.sync_rate)),
            spares: Mutex::new(spec.spares.clone()),
            stop: self.stop.child_token(),
            sync: Mutex::new(None),
            check: Mutex::new(None),
            recovering: Mutex::new(Vec::new()),
            readd_backoff: Mutex::new(BTreeMap::new()),
            links: self.link_members(array.inner()),
        });
        self.exports.insert(&spec.name, Arc::new(array));
        lock(&self.arrays).insert(spec.name.clone(), entry.clone());
        tracing::info!(
            array = %spec.name,
            created = notes.created,
            degraded = entry.inner().is_degraded(),
            resync_regions = notes.resync_regions,
            "array serving"
        );
        if notes.resync_regions > 0 {
            self.spawn_resync(&entry);
        }
        // A recovery the daemon was stopped in resumes from its last
        // recorded frontier (what it had done before that is in sync, and
        // stays so: writes go to a recovering member).
        for m in &entry.inner().members {
            if m.state() == MemberState::Recovering {
                tracing::info!(array = %spec.name, member = m.slot, from = m.recovered(), "resuming the recovery of a member");
                self.spawn_recovery(&entry, m.slot, Recovery::From(m.recovered()));
            }
        }
        self.spawn_housekeeping(&entry);
        register_metrics(&entry);
        self.republish();
        self.status_of(&entry)
    }

    fn entry(&self, name: &str) -> Result<Arc<Entry>, AdminError> {
        lock(&self.arrays)
            .get(name)
            .cloned()
            .ok_or_else(|| AdminError::UnknownArray(name.to_string()))
    }

    fn spawn_resync(&self, entry: &Arc<Entry>) {
        let e = entry.clone();
        let rate = e.rate.clone();
        tokio::spawn(async move {
            let inner = e.inner().clone();
            let (Some(set), Some(bitmap)) = (inner.meta.resync_set(), inner.meta.bitmap()) else {
                return;
            };
            let region = bitmap.geometry().region;
            let tally = Tally::new("resync", set.pending_count() * region);
            *lock(&e.sync) = Some(tally.clone());
            let mut pacer = Pacer::new(rate);
            let mut next = set.next_pending(0);
            while let Some(r) = next {
                if e.stop.is_cancelled() {
                    return;
                }
                let rows = r * region..(r + 1) * region;
                if let Err(err) = inner
                    .sync_rows(rows, Pass::Resync, &tally, &mut pacer)
                    .await
                {
                    tracing::error!(array = %inner.name, error = %err, "resync stopped");
                    return;
                }
                set.done(r);
                next = set.next_pending(r + 1);
            }
            tally.finished.store(true, Ordering::Release);
            tracing::info!(
                array = %inner.name,
                bytes = tally.done.load(Ordering::Relaxed),
                written = tally.written.load(Ordering::Relaxed),
                mismatches = tally.mismatches.load(Ordering::Relaxed),
                secs = tally.started.elapsed().as_secs_f64(),
                "resync finished"
            );
        });
    }

    fn spawn_housekeeping(&self, entry: &Arc<Entry>) {
        let e = entry.clone();
        let settings = self.settings.clone();
        let manager = self.me.clone();
        tokio::spawn(async move {
            let inner = e.inner().clone();
            let tick = (settings.safe_mode_delay / 2)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let mut last_sweep = Instant::now();
            let mut last_readd = Instant::now();
            let mut last_scrub = Instant::now();
            let mut states = inner.state_changed.subscribe();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    // A member's state changed: publish the new costs at once.
                    _ = states.changed() => {}
                    _ = e.stop.cancelled() => return,
                }
                if let Some(m) = manager.upgrade() {
                    m.sync_links(&e).await;
                    states.mark_unchanged();
                    // Cheap when nothing changed (compared before it is set).
                    m.republish();
                }
                inner
                    .meta
                    .mark_clean_if_idle(&inner, settings.safe_mode_delay)
                    .await;
                if last_sweep.elapsed() >= settings.bitmap_idle / 2 {
                    last_sweep = Instant::now();
                    inner.meta.sweep_bitmap(&inner, settings.bitmap_idle).await;
                }
                inner.fail_disconnected().await;
                if last_readd.elapsed() >= Duration::from_secs(2) {
                    last_readd = Instant::now();
                    let Some(m) = manager.upgrade() else { return };
                    m.try_readd_all(&e).await;
                    m.use_spares(&e).await;
                }
                if !settings.scrub_interval.is_zero()
                    && last_scrub.elapsed() >= settings.scrub_interval
                {
                    last_scrub = Instant::now();
                    let Some(m) = manager.upgrade() else { return };
                    // Nothing to scrub on a failed array; a degraded one is
                    // only checked; a running check or repair is left alone.
                    let busy = lock(&e.check)
                        .as_ref()
                        .is_some_and(|t| !t.finished.load(Ordering::Acquire));
                    if !inner.is_failed() && !busy {
                        let repair = settings.scrub_repair && !inner.is_degraded();
                        tracing::info!(array = %inner.name, repair, "scheduled scrub");
                        if let Err(err) = m.check(&inner.name, repair) {
                            tracing::warn!(array = %inner.name, error = %err, "scheduled scrub not started");
                        }
                    }
                }
            }
        });
    }

    /// Re-adds every failed member that came back, if the bitmap covers
    /// what it missed.
    async fn try_readd_all(&self, e: &Arc<Entry>) {
        let inner = e.inner();
        if inner.is_failed() {
            return;
        }
        let slots: Vec<usize> = inner
            .members
            .iter()
            .filter(|m| matches!(m.state(), MemberState::Faulty | MemberState::Missing))
            .map(|m| m.slot)
            .collect();
        for slot in slots {
            if lock(&e.readd_backoff)
                .get(&slot)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            {
                continue;
            }
            match self.readd(e, slot, true).await {
                Ok(()) => {}
                Err(err) => {
                    tracing::debug!(array = %inner.name, member = slot, error = %err, "no automatic re-add");
                    if !matches!(err, AdminError::Unavailable(_)) {
                        lock(&e.readd_backoff).insert(slot, Instant::now());
                    }
                }
            }
        }
    }

    /// Re-adds member `slot`: reconnects, checks its superblock, and
    /// recovers it in the background, from the bitmap when that covers
    /// what it missed, else in full (`automatic` refuses the full case).
    async fn readd(&self, e: &Arc<Entry>, slot: usize, automatic: bool) -> Result<(), AdminError> {
        let inner = e.inner().clone();
        let name = inner.name.clone();
        let Some(member) = inner.members.get(slot).cloned() else {
            return Err(AdminError::Invalid(format!(
                "array {name:?} has no member slot {slot}"
            )));
        };
        if !matches!(member.state(), MemberState::Faulty | MemberState::Missing) {
            return Err(AdminError::Refused(format!(
                "array {name:?}: member {slot} ({}) is {}, not failed",
                member.uri(),
                member.state().name()
            )));
        }
        if lock(&e.recovering).contains(&slot) {
            return Err(AdminError::Refused(format!(
                "array {name:?}: member {slot} is being recovered already"
            )));
        }
        let config = member_client_config(
            self.settings.member_connections,
            self.settings.liveness_timeout,
        );
        let client = Client::connect_uri(&member.uri(), config)
            .await
            .map_err(|err| {
                AdminError::Unavailable(format!(
                    "array {name:?}: member {slot} ({}) is unreachable: {err}",
                    member.uri()
                ))
            })?;
        let area = client
            .read(0, IoBuf::zeroed(2 * SB_SLOT_SIZE as usize))
            .await
            .map_err(|err| {
                AdminError::Unavailable(format!(
                    "array {name:?}: cannot read member {slot}'s superblocks: {err}"
                ))
            })?;
        let (a, b) = area.split_at(SB_SLOT_SIZE as usize);
        let Some(array_sb) = inner.meta.snapshot() else {
            return Err(AdminError::Refused(format!(
                "array {name:?} keeps no superblocks"
            )));
        };
        let own = match read_copies(a, b) {
            SbRead::Valid { sb, .. } => *sb,
            other => {
                return Err(AdminError::Refused(format!(
                    "array {name:?}: member {slot} ({}) holds no valid superblock of this array ({other:?}); \
                     it needs a replacement and a rebuild",
                    member.uri()
                )));
            }
        };
        if own.array_uuid != array_sb.array_uuid || own.role != slot {
            return Err(AdminError::Refused(format!(
                "array {name:?}: member {slot} ({}) holds slot {} of array {:?} ({}), expected slot {slot} of {}",
                member.uri(),
                own.role,
                own.array_name,
                own.array_uuid,
                array_sb.array_uuid
            )));
        }
        let failed_at = match array_sb.roles.get(slot).map(|r| r.state) {
            Some(superblock::MemberState::Faulty { at_event }) => at_event,
            _ => array_sb.events,
        };
        let covered = own.events.saturating_add(1) >= failed_at;
        if !covered && automatic {
            return Err(AdminError::Refused(format!(
                "array {name:?}: member {slot} ({}) is back but missed more than the bitmap covers \
                 (its events {}, failed at {failed_at}); re-add it by hand for a full recovery",
                member.uri(),
                own.events
            )));
        }
        if let Some(old) = member.set_client(Some(Arc::new(client))) {
            old.close(Duration::from_millis(10)).await;
        }
        member.set_recovered(0);
        clear_log(&inner, slot).await?;
        member.set_state(MemberState::Recovering);
        inner.update_failed();
        if let Err(err) = inner.meta.record_recovering(&inner, slot, 0).await {
            member.set_state(MemberState::Faulty);
            return Err(AdminError::Internal(format!(
                "array {name:?}: cannot record member {slot} as recovering: {err}"
            )));
        }
        tracing::info!(
            array = %name,
            member = slot,
            uri = %member.uri(),
            full = !covered,
            "member re-added; recovering"
        );
        // A member that failed in the middle of its own rebuild misses,
        // beyond its recorded frontier, everything (no bit says so).
        let frontier = match own.roles.get(slot).map(|r| r.state) {
            Some(superblock::MemberState::Recovering { done }) => done,
            Some(superblock::MemberState::Spare) => 0,
            _ => u64::MAX,
        };
        let plan = if !covered {
            Recovery::From(0)
        } else if frontier < u64::MAX {
            Recovery::DirtyThenFrom(frontier)
        } else {
            Recovery::Dirty
        };
        self.spawn_recovery(e, slot, plan);
        Ok(())
    }

    /// Gives slot `slot` of `e` to the volume at `uri` and rebuilds it there
    /// while the array serves (`why`: "replace" or "spare", for the logs).
    /// A member still in the slot is failed out first, if the array
    /// survives that; the new volume must be large enough and must not
    /// hold this or another array's superblock.
    async fn replace_member(
        &self,
        e: &Arc<Entry>,
        slot: usize,
        uri: &str,
        why: &str,
    ) -> Result<(), AdminError> {
        let inner = e.inner().clone();
        let name = inner.name.clone();
        let Some(member) = inner.members.get(slot).cloned() else {
            return Err(AdminError::Invalid(format!(
                "array {name:?} has no member slot {slot} (it has {})",
                inner.members.len()
            )));
        };
        if inner.layout.level() == crate::layout::Level::Raid0 {
            return Err(AdminError::Refused(format!(
                "array {name:?} is RAID 0: a member's data exists nowhere else, so it cannot be rebuilt"
            )));
        }
        if inner.is_failed() {
            return Err(AdminError::Refused(format!(
                "array {name:?} has failed (lost more members than {} tolerates): nothing to rebuild from",
                inner.layout.level()
            )));
        }
        if *member.uri() == uri {
            return Err(AdminError::Invalid(format!(
                "array {name:?}: member {slot} is {uri} already (re-add it instead)"
            )));
        }
        if let Some(other) = self.owner_of(uri) {
            return Err(AdminError::Invalid(format!(
                "array {name:?}: {uri} already belongs to array {other:?}"
            )));
        }
        if member.readable() && !inner.survives_without(slot) {
            return Err(AdminError::Refused(format!(
                "array {name:?}: member {slot} ({}) holds data no other member has right now (members {:?} are out); \
                 replacing it would lose that data: wait for the rebuilds to finish",
                member.uri(),
                inner.degraded_slots()
            )));
        }
        let client = self.probe_new_member(&inner, uri).await?;
        // Out with the old member: its rebuild stops, it is recorded
        // failed (writes it would miss are then covered), its clients go.
        let old_uri = member.uri().to_string();
        if member.writable() {
            member.set_state(MemberState::Faulty);
            inner.update_failed();
            inner.meta.record_failure(&inner, slot, why).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock(&e.recovering).contains(&slot) {
            if Instant::now() > deadline {
                return Err(AdminError::Internal(format!(
                    "array {name:?}: the rebuild of member {slot} did not stop"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let old_clients = [
            member.set_client(Some(Arc::new(client))),
            member.set_bg_client(None),
        ];
        for c in old_clients.into_iter().flatten() {
            c.close(Duration::from_millis(10)).await;
        }
        let before = announce_recovery(e, &inner);
        member.set_uri(uri);
        if let Err(err) = clear_log(&inner, slot).await {
            *lock(&e.sync) = before;
            return Err(err);
        }
        let member_uuid = Uuid::new_v4();
        if let Err(err) = inner
            .meta
            .adopt_member(&inner, &member, member_uuid, uri)
            .await
        {
            member.set_state(MemberState::Faulty);
            inner.update_failed();
            *lock(&e.sync) = before;
            return Err(AdminError::Unavailable(format!(
                "array {name:?}: cannot set up {uri} as member {slot}: {err}"
            )));
        }
        inner.update_failed();
        if let Some(l) = e.links.get(slot) {
            l.store(Arc::new(self.link_member(&name, &member)));
        }
        lock(&e.spec).members[slot] = uri.to_string();
        lock(&e.readd_backoff).remove(&slot);
        if let Err(err) = self.persist_spec(e, Some((slot, old_uri.clone(), uri.to_string()))) {
            tracing::error!(array = %name, error = %err, "cannot record the replacement in the state store");
        }
        tracing::info!(array = %name, member = slot, old = %old_uri, new = %uri, %why, "member replaced; rebuilding");
        self.spawn_recovery(e, slot, Recovery::From(0));
        Ok(())
    }

    /// Connects to the volume at `uri` and checks that it can become a
    /// member of `inner`: reachable, writable, large enough, blocks of at
    /// most 4 KiB, and no array's superblock on it.
    async fn probe_new_member(&self, inner: &ArrayInner, uri: &str) -> Result<Client, AdminError> {
        let name = &inner.name;
        let config = member_client_config(
            self.settings.member_connections,
            self.settings.liveness_timeout,
        );
        let client = Client::connect_uri(uri, config).await.map_err(|err| {
            AdminError::Unavailable(format!("array {name:?}: cannot reach {uri}: {err}"))
        })?;
        let info = client.info();
        let data_offset = inner.members.first().map_or(0, |m| m.data_offset);
        let need = data_offset + inner.layout.member_data_size();
        let problem = if info.read_only() {
            Some(format!("array {name:?}: {uri} is read-only"))
        } else if info.size < need {
            Some(format!(
                "array {name:?}: {uri} holds {} bytes, less than a member needs ({need})",
                info.size
            ))
        } else if info.min_block > 4096 {
            Some(format!(
                "array {name:?}: {uri} has a {}-byte minimum block; members may have at most 4096",
                info.min_block
            ))
        } else {
            match client
                .read(0, IoBuf::zeroed(2 * SB_SLOT_SIZE as usize))
                .await
            {
                Ok(area) => {
                    let (a, b) = area.split_at(SB_SLOT_SIZE as usize);
                    match read_copies(a, b) {
                        SbRead::Valid { sb, .. } => Some(format!(
                            "array {name:?}: {uri} holds slot {} of array {:?} ({}); clear it first if it is no longer needed",
                            sb.role, sb.array_name, sb.array_uuid
                        )),
                        _ => None,
                    }
                }
                Err(err) => Some(format!("array {name:?}: cannot read {uri}: {err}")),
            }
        };
        match problem {
            None => Ok(client),
            Some(msg) => {
                client.close(Duration::from_millis(10)).await;
                Err(AdminError::Invalid(msg))
            }
        }
    }

    /// Returns the array that has `uri` as a member or spare.
    fn owner_of(&self, uri: &str) -> Option<String> {
        lock(&self.arrays).iter().find_map(|(name, e)| {
            let in_use = e.inner().members.iter().any(|m| *m.uri() == uri)
                || lock(&e.spares).iter().any(|s| s == uri);
            in_use.then(|| name.clone())
        })
    }

    /// Gives a failed member's slot to the first spare that takes it.
    async fn use_spares(&self, e: &Arc<Entry>) {
        let inner = e.inner();
        if inner.is_failed() || lock(&e.spares).is_empty() {
            return;
        }
        let failed: Vec<usize> = inner
            .members
            .iter()
            .filter(|m| matches!(m.state(), MemberState::Faulty | MemberState::Missing))
            .map(|m| m.slot)
            .collect();
        for slot in failed {
            let spares = lock(&e.spares).clone();
            for spare in spares {
                // Taken off the list first: another array may not take it.
                lock(&e.spares).retain(|s| *s != spare);
                match self.replace_member(e, slot, &spare, "spare").await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::warn!(array = %inner.name, member = slot, %spare, error = %err, "the spare cannot take the slot; dropped from the spares");
                        if let Err(err) = self.persist_spec(e, None) {
                            tracing::error!(array = %inner.name, error = %err, "cannot record the spares");
                        }
                    }
                }
            }
        }
    }

    /// Recovers member `slot` (recovering: written, not read) in the
    /// background, and records it active when done: the bitmap's dirty
    /// regions ([`Recovery::Dirty`], a re-add the bitmap covers) or every
    /// region from an offset ([`Recovery::From`], a full rebuild or one
    /// resumed). Regions go in ascending order; the member's frontier
    /// follows them, is recorded in the superblocks every
    /// [`FRONTIER_INTERVAL`] (after a flush of the member, so what it
    /// claims is durable), and lets the bitmap sweep clear regions below it.
    fn spawn_recovery(&self, e: &Arc<Entry>, slot: usize, plan: Recovery) {
        let inner = e.inner().clone();
        let Some(member) = inner.members.get(slot).cloned() else {
            return;
        };
        {
            let mut recovering = lock(&e.recovering);
            if recovering.contains(&slot) {
                return;
            }
            recovering.push(slot);
        }
        let region = inner.meta.bitmap().map_or(1 << 20, |b| b.geometry().region);
        let size = inner.layout.member_data_size();
        let all = size.div_ceil(region);
        let dirty_below = |end: u64| -> Vec<u64> {
            inner.meta.bitmap().map_or_else(
                || (0..end).collect(),
                |b| b.dirty_regions().filter(|r| *r < end).collect(),
            )
        };
        let regions: Vec<u64> = match plan {
            Recovery::From(from) => (from / region..all).collect(),
            Recovery::Dirty => dirty_below(all),
            Recovery::DirtyThenFrom(from) => {
                let mut v = dirty_below(from / region);
                v.extend(from / region..all);
                v
            }
        };
        let tally = Tally::new("recovery", regions.len() as u64 * region);
        *lock(&e.sync) = Some(tally.clone());
        let entry = e.clone();
        let rate = e.rate.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut ok = true;
            let mut recorded = Instant::now();
            // REBUILD_WINDOW regions at a time, each at its share of the
            // rate; they complete in order (`buffered`), so the frontier
            // only ever moves over regions that are done.
            let (inner_ref, tally_ref, rate_ref) = (&inner, &tally, &rate);
            let mut done = futures::stream::iter(regions)
                .map(|r| async move {
                    let mut pacer = Pacer::shared(rate_ref.clone(), REBUILD_WINDOW as u64);
                    let rows = r * region..(r + 1) * region;
                    let res = inner_ref
                        .sync_rows(rows, Pass::Recover(slot), tally_ref, &mut pacer)
                        .await;
                    (r, res)
                })
                .buffered(REBUILD_WINDOW);
            while let Some((r, res)) = done.next().await {
                if entry.stop.is_cancelled() || member.state() != MemberState::Recovering {
                    ok = false;
                    break;
                }
                if let Err(err) = res {
                    tracing::error!(array = %inner.name, member = slot, error = %err, "recovery stopped");
                    ok = false;
                    break;
                }
                member.set_recovered(((r + 1) * region).min(size));
                if recorded.elapsed() >= FRONTIER_INTERVAL {
                    recorded = Instant::now();
                    record_frontier(&inner, &member).await;
                }
            }
            // Regions still in flight (after a stop or an error) let go of
            // their locks and grants now.
            drop(done);
            lock(&entry.recovering).retain(|s| *s != slot);
            if ok && member.state() == MemberState::Recovering {
                // What was rebuilt must be durable before the superblocks
                // say the member is in sync.
                if let Err(err) = member.flush().await {
                    tracing::error!(array = %inner.name, member = slot, error = %err, "cannot flush the rebuilt member");
                    inner.handle(&err).await;
                    lock(&entry.readd_backoff).insert(slot, Instant::now());
                    return;
                }
                member.set_recovered(size);
                member.set_state(MemberState::Active);
                if let Err(err) = inner.meta.record_active(&inner, slot).await {
                    tracing::error!(array = %inner.name, member = slot, error = %err, "cannot record the member in sync");
                }
                inner.update_failed();
                tally.finished.store(true, Ordering::Release);
                tracing::info!(
                    array = %inner.name,
                    member = slot,
                    copied = tally.written.load(Ordering::Relaxed),
                    member_size = size,
                    secs = tally.started.elapsed().as_secs_f64(),
                    "recovery finished: member in sync"
                );
            } else {
                if member.state() == MemberState::Recovering {
                    // Stopped (shutdown): keep the frontier for the next start.
                    record_frontier(&inner, &member).await;
                }
                lock(&entry.readd_backoff).insert(slot, Instant::now());
            }
        });
    }

    fn status_of(&self, e: &Entry) -> Result<ArrayStatus, AdminError> {
        let inner = e.inner();
        let sb = inner.meta.snapshot();
        let g = inner.layout.geometry();
        let state = if inner.is_failed() {
            ArrayState::Failed
        } else if inner.is_degraded() {
            ArrayState::Degraded
        } else if !inner.meta.is_clean() {
            ArrayState::Active
        } else {
            ArrayState::Clean
        };
        let members = inner
            .members
            .iter()
            .map(|m| {
                let s = &m.stats;
                let reads = s.reads.load(Ordering::Relaxed);
                let writes = s.writes.load(Ordering::Relaxed);
                let ops = (reads + writes).max(1);
                MemberStatus {
                    slot: m.slot,
                    uri: m.uri().to_string(),
                    uuid: sb
                        .as_ref()
                        .and_then(|sb| sb.roles.get(m.slot))
                        .map(|r| r.member_uuid.to_string())
                        .unwrap_or_default(),
                    state: m.state().name().to_string(),
                    errors: s.errors.load(Ordering::Relaxed),
                    reads,
                    writes,
                    latency_us: s.latency_us.load(Ordering::Relaxed) / ops,
                }
            })
            .collect();
        let sync = lock(&e.sync)
            .as_ref()
            .filter(|t| !t.finished.load(Ordering::Acquire))
            .map(|t| t.progress());
        let check = lock(&e.check).as_ref().map(|t| check_report(t));
        let bitmap = inner.meta.bitmap();
        Ok(ArrayStatus {
            name: inner.name.clone(),
            uuid: sb
                .as_ref()
                .map(|s| s.array_uuid.to_string())
                .unwrap_or_default(),
            level: g.level,
            layout: sb.as_ref().map(|s| s.layout.clone()).unwrap_or_default(),
            chunk: g.chunk,
            copies: g.copies,
            size: inner.layout.size(),
            member_size: inner.layout.member_data_size(),
            state,
            events: sb.as_ref().map_or(0, |s| s.events),
            bitmap_region: bitmap.map_or(0, |b| b.geometry().region),
            bitmap_dirty: bitmap.map_or(0, |b| b.set_bits()),
            members,
            sync,
            check,
            export: inner.name.clone(),
            spares: lock(&e.spares).clone(),
            sync_rate: e.rate.load(Ordering::Relaxed),
        })
    }
}

/// What a recovery covers.
#[derive(Debug, Clone, Copy)]
enum Recovery {
    /// The bitmap's dirty regions: a member back after a failure the bitmap
    /// covers.
    Dirty,
    /// Every region from this member data offset: a full rebuild, or one
    /// resumed after a restart.
    From(u64),
    /// The dirty regions below this member data offset and every region
    /// from it: a member back after failing in its own rebuild.
    DirtyThenFrom(u64),
}

/// How often a rebuild's frontier is recorded in the superblocks: what a
/// restart redoes is at most this much of the rebuild.
const FRONTIER_INTERVAL: Duration = Duration::from_secs(2);

/// Regions a rebuild works on at once: one stripe at a time leaves every
/// member idle while each stripe's reads and write make their round trips.
const REBUILD_WINDOW: usize = 4;

/// Puts up a recovery tally for `e` before a replaced member is seen in
/// its slot, so that the status never shows the new member with no
/// recovery running: `status --watch` would take it as done.
/// [`Manager::spawn_recovery`] puts up the real one (it always starts
/// there: a replace first waits for the slot's old rebuild to stop); the
/// previous tally is returned, to be put back if the replacement fails.
fn announce_recovery(e: &Entry, inner: &ArrayInner) -> Option<Arc<Tally>> {
    lock(&e.sync).replace(Tally::new("recovery", inner.layout.member_data_size()))
}

/// Clears the partial-parity log area of member `slot` before it is
/// written again (re-added, or a new volume in its place): entries it
/// holds from before are not this run's.
async fn clear_log(inner: &ArrayInner, slot: usize) -> Result<(), AdminError> {
    let Some(sb) = inner.meta.snapshot() else {
        return Ok(());
    };
    inner
        .clear_member_log(slot, sb.data_offset)
        .await
        .map_err(|e| {
            AdminError::Unavailable(format!(
                "array {:?}: cannot clear member {slot}'s partial-parity log: {e}",
                inner.name
            ))
        })
}

/// Records `member`'s rebuild frontier in the superblocks, after flushing
/// the member so that everything below it is durable there.
async fn record_frontier(inner: &ArrayInner, member: &crate::member::Member) {
    let done = member.recovered();
    if let Err(err) = member.flush().await {
        tracing::warn!(array = %inner.name, member = member.slot, error = %err, "cannot flush the member being rebuilt");
        return;
    }
    if let Err(err) = inner.meta.record_recovering(inner, member.slot, done).await {
        tracing::warn!(array = %inner.name, member = member.slot, error = %err, "cannot record the rebuild's progress");
    } else {
        tracing::debug!(array = %inner.name, member = member.slot, done, "rebuild progress recorded");
    }
}

/// Describes the array daemon's own metrics (the `# HELP` lines).
pub fn describe_metrics() {
    use nbdraid_engine::metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "nbdraid_array_state",
        "Array state: 0 clean, 1 active (dirty), 2 degraded, 3 failed."
    );
    describe_gauge!(
        "nbdraid_array_member_state",
        "Member state per slot: 0 active, 1 recovering, 2 faulty, 3 missing."
    );
    describe_gauge!(
        "nbdraid_array_events",
        "The array's superblock event counter."
    );
    describe_gauge!(
        "nbdraid_array_bitmap_dirty_regions",
        "Write-intent bitmap regions set (written recently, or missed by a member out of sync)."
    );
    describe_gauge!(
        "nbdraid_array_sync_done_bytes",
        "Bytes of member data a running resync or recovery has covered."
    );
    describe_gauge!(
        "nbdraid_array_sync_total_bytes",
        "Bytes of member data the running resync or recovery covers in all."
    );
    describe_gauge!(
        "nbdraid_array_sync_bytes_per_second",
        "Running resync or rebuild: bytes of member data per second so far."
    );
    describe_gauge!(
        "nbdraid_array_sync_eta_seconds",
        "Running resync or rebuild: estimated seconds left (0 when none runs)."
    );
    describe_gauge!(
        "nbdraid_array_check_done_bytes",
        "Running check or repair: bytes of member data covered."
    );
    describe_gauge!(
        "nbdraid_array_check_total_bytes",
        "Running check or repair: bytes of member data to cover (0 when none runs)."
    );
    describe_gauge!(
        "nbdraid_array_check_repaired",
        "Units the last repair rewrote."
    );
    describe_gauge!(
        "nbdraid_array_sync_rate_limit_bytes_per_second",
        "The resync, rebuild and check rate limit (0: none); nbdraid array set-rate changes it."
    );
    describe_gauge!(
        "nbdraid_array_check_mismatches",
        "Stripes or chunks the last check found inconsistent."
    );
    describe_gauge!(
        "nbdraid_array_member_grant_units",
        "Units the member granted this array (its lease), per class; the asked amount while no lease is held."
    );
    describe_gauge!(
        "nbdraid_array_member_held_units",
        "Units this array's admitted requests hold at the member, per class (never above the grant)."
    );
    describe_gauge!(
        "nbdraid_array_member_peak_held_units",
        "Highest units this array's requests held at once at the member, per class."
    );
    describe_gauge!(
        "nbdraid_array_member_model_live",
        "1 while the array follows the member's published cost model, 0 while it charges the conservative default (no ?grpc=, or its control plane unreachable)."
    );
    describe_gauge!(
        "nbdraid_array_member_lease_held",
        "1 while the member grants this array a share, per class; 0 while the array accounts against the grant it asked for."
    );
    describe_gauge!(
        "nbdraid_array_grant_waits",
        "Foreground requests that waited for member grants."
    );
    describe_gauge!(
        "nbdraid_array_grant_wait_seconds",
        "Total time foreground requests waited for member grants."
    );
    describe_counter!(
        "nbdraid_array_log_entries_total",
        "Stripe writes logged in the partial-parity log (RAID 5/6)."
    );
    describe_counter!(
        "nbdraid_array_log_waits_total",
        "Times a stripe write found no room in a member's partial-parity log ring and waited."
    );
    describe_counter!(
        "nbdraid_array_log_flushes_total",
        "Member flushes made to give partial-parity log space back (on a full or half-full ring)."
    );
    describe_counter!(
        "nbdraid_array_member_failures_total",
        "Members failed (EIO, lost connection, no progress within the liveness timeout)."
    );
}

/// Sets the array's gauges whenever the metrics endpoint renders, until
/// the array is gone.
fn register_metrics(entry: &Arc<Entry>) {
    let weak = Arc::downgrade(entry);
    let name = entry.inner().name.clone();
    let g = |metric: &'static str| metrics::gauge!(metric, "array" => name.clone());
    let (state, events, dirty, done, total, mismatches) = (
        g("nbdraid_array_state"),
        g("nbdraid_array_events"),
        g("nbdraid_array_bitmap_dirty_regions"),
        g("nbdraid_array_sync_done_bytes"),
        g("nbdraid_array_sync_total_bytes"),
        g("nbdraid_array_check_mismatches"),
    );
    let (sync_rate, sync_eta, check_done, check_total, repaired, rate_limit) = (
        g("nbdraid_array_sync_bytes_per_second"),
        g("nbdraid_array_sync_eta_seconds"),
        g("nbdraid_array_check_done_bytes"),
        g("nbdraid_array_check_total_bytes"),
        g("nbdraid_array_check_repaired"),
        g("nbdraid_array_sync_rate_limit_bytes_per_second"),
    );
    let members: Vec<metrics::Gauge> = entry
        .inner()
        .members
        .iter()
        .map(|m| {
            metrics::gauge!("nbdraid_array_member_state", "array" => name.clone(), "slot" => m.slot.to_string())
        })
        .collect();
    let grant_gauges =
        |class: &'static str| -> Vec<(metrics::Gauge, metrics::Gauge, metrics::Gauge)> {
            entry
            .inner()
            .members
            .iter()
            .map(|m| {
                let l = |metric: &'static str| {
                    metrics::gauge!(metric, "array" => name.clone(), "slot" => m.slot.to_string(), "class" => class)
                };
                (
                    l("nbdraid_array_member_grant_units"),
                    l("nbdraid_array_member_held_units"),
                    l("nbdraid_array_member_peak_held_units"),
                )
            })
            .collect()
        };
    let (fg_gauges, bg_gauges) = (grant_gauges("foreground"), grant_gauges("background"));
    let link_gauges: Vec<(metrics::Gauge, metrics::Gauge, metrics::Gauge)> = entry
        .inner()
        .members
        .iter()
        .map(|m| {
            let slot = m.slot.to_string();
            (
                metrics::gauge!("nbdraid_array_member_model_live", "array" => name.clone(), "slot" => slot.clone()),
                metrics::gauge!("nbdraid_array_member_lease_held", "array" => name.clone(), "slot" => slot.clone(), "class" => "foreground"),
                metrics::gauge!("nbdraid_array_member_lease_held", "array" => name.clone(), "slot" => slot, "class" => "background"),
            )
        })
        .collect();
    let grant_waits = metrics::gauge!("nbdraid_array_grant_waits", "array" => name.clone());
    let grant_wait_seconds =
        metrics::gauge!("nbdraid_array_grant_wait_seconds", "array" => name.clone());
    nbdraid_engine::metrics::on_render(move || {
        let Some(e) = weak.upgrade() else {
            return false;
        };
        let inner = e.inner();
        state.set(if inner.is_failed() {
            3.0
        } else if inner.is_degraded() {
            2.0
        } else if !inner.meta.is_clean() {
            1.0
        } else {
            0.0
        });
        events.set(inner.meta.snapshot().map_or(0.0, |sb| sb.events as f64));
        dirty.set(inner.meta.bitmap().map_or(0.0, |b| b.set_bits() as f64));
        let running = |t: &Option<Arc<Tally>>| {
            t.clone()
                .filter(|t| !t.finished.load(Ordering::Acquire))
                .map(|t| t.progress())
        };
        let sync = running(&lock(&e.sync));
        done.set(sync.as_ref().map_or(0.0, |p| p.done as f64));
        total.set(sync.as_ref().map_or(0.0, |p| p.total as f64));
        sync_rate.set(sync.as_ref().map_or(0.0, |p| p.rate));
        sync_eta.set(
            sync.as_ref()
                .and_then(|p| p.eta)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let check = lock(&e.check).clone();
        let check_progress = running(&check);
        check_done.set(check_progress.as_ref().map_or(0.0, |p| p.done as f64));
        check_total.set(check_progress.as_ref().map_or(0.0, |p| p.total as f64));
        mismatches.set(
            check
                .as_ref()
                .map_or(0.0, |t| t.mismatches.load(Ordering::Relaxed) as f64),
        );
        repaired.set(
            check
                .as_ref()
                .map_or(0.0, |t| t.repaired.load(Ordering::Relaxed) as f64),
        );
        rate_limit.set(e.rate.load(Ordering::Relaxed) as f64);
        for (m, gauge) in inner.members.iter().zip(&members) {
            gauge.set(f64::from(m.state() as u8));
        }
        for (grants, gauges) in [(&inner.grants, &fg_gauges), (&inner.bg_grants, &bg_gauges)] {
            for ((grant, held, peak), (g, h, p)) in grants.snapshot().into_iter().zip(gauges) {
                g.set(grant as f64);
                h.set(held as f64);
                p.set(peak as f64);
            }
        }
        for (links, (live, fg, bg)) in e.links.iter().zip(&link_gauges) {
            let links = links.load();
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            live.set(flag(links.model.as_ref().is_some_and(ModelWatch::is_live)));
            fg.set(flag(links.fg.as_ref().is_some_and(Lease::held)));
            bg.set(flag(links.bg.as_ref().is_some_and(Lease::held)));
        }
        grant_waits.set(inner.grants.waits.load(Ordering::Relaxed) as f64);
        grant_wait_seconds.set(inner.grants.wait_us.load(Ordering::Relaxed) as f64 / 1e6);
        true
    });
}

fn check_report(t: &Tally) -> CheckReport {
    CheckReport {
        running: !t.finished.load(Ordering::Acquire),
        progress: t.progress(),
        mismatches: t.mismatches.load(Ordering::Relaxed),
        first_mismatches: lock(&t.first).clone(),
        errors: 0,
        repaired: t.repaired.load(Ordering::Relaxed),
        repair: t.kind == "repair",
    }
}

impl ArrayAdmin for Manager {
    fn replace(
        &self,
        name: &str,
        slot: usize,
        uri: &str,
    ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
        let (name, uri) = (name.to_string(), uri.to_string());
        Box::pin(async move {
            let e = self.entry(&name)?;
            nbdraid_client::uri::parse_full(&uri).map_err(|err| {
                AdminError::Invalid(format!("array {name:?}: bad member URI {uri:?}: {err}"))
            })?;
            self.replace_member(&e, slot, &uri, "replace").await?;
            self.status_of(&e)
        })
    }

    fn add_spare(&self, name: &str, uri: &str) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
        let (name, uri) = (name.to_string(), uri.to_string());
        Box::pin(async move {
            let e = self.entry(&name)?;
            nbdraid_client::uri::parse_full(&uri).map_err(|err| {
                AdminError::Invalid(format!("array {name:?}: bad spare URI {uri:?}: {err}"))
            })?;
            if let Some(other) = self.owner_of(&uri) {
                return Err(AdminError::Invalid(format!(
                    "array {name:?}: {uri} already belongs to array {other:?}"
                )));
            }
            self.probe_new_member(e.inner(), &uri)
                .await?
                .close(Duration::from_millis(10))
                .await;
            lock(&e.spares).push(uri.clone());
            self.persist_spec(&e, None)?;
            tracing::info!(array = %name, spare = %uri, "spare added");
            // A member may be waiting for it.
            self.use_spares(&e).await;
            self.status_of(&e)
        })
    }

    fn remove(&self, name: &str, what: Removal) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
        let name = name.to_string();
        Box::pin(async move {
            let e = self.entry(&name)?;
            match what {
                Removal::Spare(uri) => {
                    let had = {
                        let mut spares = lock(&e.spares);
                        let before = spares.len();
                        spares.retain(|s| *s != uri);
                        spares.len() != before
                    };
                    if !had {
                        return Err(AdminError::Invalid(format!(
                            "array {name:?} has no spare {uri}"
                        )));
                    }
                    self.persist_spec(&e, None)?;
                    tracing::info!(array = %name, spare = %uri, "spare removed");
                }
                Removal::Member(slot) => {
                    let inner = e.inner().clone();
                    let Some(m) = inner.members.get(slot).cloned() else {
                        return Err(AdminError::Invalid(format!(
                            "array {name:?} has no member slot {slot}"
                        )));
                    };
                    if !m.writable() {
                        return Err(AdminError::Refused(format!(
                            "array {name:?}: member {slot} is {} already",
                            m.state().name()
                        )));
                    }
                    if m.readable() && !inner.survives_without(slot) {
                        return Err(AdminError::Refused(format!(
                            "array {name:?}: member {slot} ({}) holds data no other member has right now; \
                             removing it would lose that data",
                            m.uri()
                        )));
                    }
                    m.set_state(MemberState::Faulty);
                    inner.update_failed();
                    inner.meta.record_failure(&inner, slot, "removed").await;
                    // Not re-added on its own: it was taken out on purpose.
                    lock(&e.readd_backoff)
                        .insert(slot, Instant::now() + Duration::from_secs(365 * 86400));
                    let old = [m.set_client(None), m.set_bg_client(None)];
                    for c in old.into_iter().flatten() {
                        c.close(Duration::from_secs(1)).await;
                    }
                    tracing::warn!(array = %name, member = slot, uri = %m.uri(), "member removed from the array");
                }
            }
            self.status_of(&e)
        })
    }

    fn set_rate(&self, name: &str, rate: u64) -> Result<ArrayStatus, AdminError> {
        let e = self.entry(name)?;
        e.rate.store(rate, Ordering::Relaxed);
        tracing::info!(array = %name, rate, "resync, rebuild and check rate set");
        self.status_of(&e)
    }

    fn create(&self, spec: ArraySpec) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
        Box::pin(async move { self.add(spec).await })
    }

    fn list(&self) -> Vec<ArrayStatus> {
        let entries: Vec<Arc<Entry>> = lock(&self.arrays).values().cloned().collect();
        entries
            .iter()
            .filter_map(|e| self.status_of(e).ok())
            .collect()
    }

    fn status(&self, name: &str) -> Result<ArrayStatus, AdminError> {
        let e = self.entry(name)?;
        self.status_of(&e)
    }

    fn re_add(&self, name: &str, slot: usize) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
        let name = name.to_string();
        Box::pin(async move {
            let e = self.entry(&name)?;
            self.readd(&e, slot, false).await?;
            self.status_of(&e)
        })
    }

    fn check(&self, name: &str, repair: bool) -> Result<CheckReport, AdminError> {
        let e = self.entry(name)?;
        {
            let current = lock(&e.check);
            if let Some(t) = current.as_ref()
                && !t.finished.load(Ordering::Acquire)
            {
                if repair != (t.kind == "repair") {
                    return Err(AdminError::Refused(format!(
                        "array {name:?}: a {} is running; wait for it to finish",
                        t.kind
                    )));
                }
                return Ok(check_report(t));
            }
        }
        let inner = e.inner().clone();
        if repair && inner.is_degraded() {
            return Err(AdminError::Refused(format!(
                "array {name:?} is degraded (members {:?} are out): a repair needs every member in sync \
                 to tell which copy or chunk is right",
                inner.degraded_slots()
            )));
        }
        let kind = if repair { "repair" } else { "check" };
        let pass = if repair { Pass::Repair } else { Pass::Check };
        let tally = Tally::new(kind, inner.layout.member_data_size());
        *lock(&e.check) = Some(tally.clone());
        let rate = e.rate.clone();
        let entry = e.clone();
        let report = check_report(&tally);
        tokio::spawn(async move {
            let mut pacer = Pacer::new(rate);
            let size = inner.layout.member_data_size();
            let step = 64u64 << 20;
            let mut at = 0;
            while at < size {
                if entry.stop.is_cancelled() {
                    break;
                }
                let rows = at..(at + step).min(size);
                if let Err(err) = inner.sync_rows(rows, pass, &tally, &mut pacer).await {
                    tracing::error!(array = %inner.name, error = %err, "{kind} stopped");
                    break;
                }
                at += step;
            }
            tally.finished.store(true, Ordering::Release);
            tracing::info!(
                array = %inner.name,
                mismatches = tally.mismatches.load(Ordering::Relaxed),
                repaired = tally.repaired.load(Ordering::Relaxed),
                secs = tally.started.elapsed().as_secs_f64(),
                "{kind} finished"
            );
        });
        Ok(report)
    }
}
