//! Writeout throttling: a budget of resource units, divided into shares,
//! and guards that hold units until a reply has been sent.
//!
//! One unit is one byte of buffer memory. A request's units come from its
//! layer's cost model ([`crate::device::BlockDevice::cost`]); they are
//! acquired after the request header is read and before a write's payload
//! is read, and they return when the [`ThrottleGuard`] drops, after the
//! reply has been written to the socket.
//!
//! # Shares
//! The capacity is divided into shares, each with a guaranteed minimum
//! (`reserved`): the foreground pool (connections nobody registered), the
//! background pool (rebuild, resync, scrub), and one share per grant an
//! upstream holds. Reservations never add up to more than the capacity,
//! and no share is smaller than the cost of the largest request the layer
//! accepts, so every request is admissible in its own share.
//!
//! A request of `u` units in share `s` is admitted when the capacity has
//! room and either
//! - it fits in what `s` has not used of its own reservation, or
//! - it borrows: the room left after it still covers the unused
//!   reservations of every *other share that has requests waiting*.
//!
//! So an idle share's reservation can be borrowed, but as soon as that
//! share has a waiter, nobody else may borrow into it; borrowed units come
//! back as admitted requests complete (they never wait again), so the
//! share gets its minimum within the time of one round of requests.
//!
//! # Invariants
//! - `used <= capacity` at all times (`available` never goes below zero),
//!   unless the throttle is disabled (then it only counts).
//! - Within a share, waiters are served first come, first served: a large
//!   request at the head is not overtaken by a stream of small ones of the
//!   same share. Across shares, releases wake shares round-robin.
//! - A request whose cost exceeds its share's reservation could wait
//!   forever, so it is refused at once with an error (never a silent hang);
//!   configuration and grants keep that from happening to valid requests.
//!
//! Rule (as in Crucible's io_limits): never wait for units from the task
//! that must send the replies returning them. The node waits in a
//! connection's reader; replies go out from a separate writer task.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbdraid_proto::ByteSize;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Identifies a share of a throttle.
pub type ShareId = u64;

/// The foreground pool: connections that hold no grant.
pub const FOREGROUND: ShareId = 0;
/// The background pool: rebuild, resync and scrub traffic without a grant.
pub const BACKGROUND: ShareId = 1;

struct Waiter {
    id: u64,
    units: u64,
    tx: oneshot::Sender<()>,
}

struct Share {
    name: String,
    reserved: u64,
    used: u64,
    queue: VecDeque<Waiter>,
    /// Share the reservation was carved from (returned to it on removal).
    parent: Option<ShareId>,
    gauge_in_flight: metrics::Gauge,
    waits: metrics::Counter,
    wait_seconds: metrics::Histogram,
}

impl Share {
    fn unmet(&self) -> u64 {
        self.reserved.saturating_sub(self.used)
    }
}

struct State {
    used: u64,
    shares: BTreeMap<ShareId, Share>,
    next_share: ShareId,
    next_waiter: u64,
    /// Where the round-robin wake-up starts next time.
    rr: ShareId,
    /// Removed shares and the share that took over their accounting.
    retired: BTreeMap<ShareId, ShareId>,
}

impl State {
    /// Returns the live share that accounts for `id`.
    fn resolve(&self, mut id: ShareId) -> ShareId {
        while !self.shares.contains_key(&id) {
            match self.retired.get(&id) {
                Some(p) => id = *p,
                None => return FOREGROUND,
            }
        }
        id
    }
}

/// A snapshot of one share, for the control plane and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareInfo {
    /// Share id.
    pub id: ShareId,
    /// Name (metrics label).
    pub name: String,
    /// Guaranteed minimum.
    pub reserved: u64,
    /// Units in use.
    pub used: u64,
    /// Requests waiting.
    pub waiting: usize,
}

/// A budget of units shared by the requests of one layer.
pub struct Throttle {
    layer: String,
    capacity: u64,
    /// Cost of the largest request the layer accepts (the smallest share).
    min_share: u64,
    enabled: bool,
    state: Mutex<State>,
    peak: AtomicU64,
    gauge_available: metrics::Gauge,
    gauge_in_flight: metrics::Gauge,
    gauge_peak: metrics::Gauge,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("layer", &self.layer)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// How a throttle is divided.
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    /// Total units.
    pub capacity: u64,
    /// Units reserved for background traffic.
    pub background_reserve: u64,
    /// Cost of the largest request; every share is at least this.
    pub largest_request: u64,
    /// Whether admission is limited (a disabled throttle only counts).
    pub enabled: bool,
}

/// A daemon's writeout throttle configuration (its `[throttle]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ThrottleConfig {
    /// Memory budget for request buffers, in bytes (`256M`).
    pub capacity: ByteSize,
    /// Part of the capacity reserved for background traffic (rebuild,
    /// resync, scrub); default a quarter, at least one largest request,
    /// and two (its own and one upstream's background grant) where the
    /// foreground pool keeps two.
    pub background_reserve: Option<ByteSize>,
    /// Seconds a grant's lease lives without a renewal.
    pub lease_ttl_secs: u64,
    /// Turn the throttle off (for measurements only: memory is then unbounded).
    pub enabled: bool,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            capacity: ByteSize(256 << 20),
            background_reserve: None,
            lease_ttl_secs: 10,
            enabled: true,
        }
    }
}

impl ThrottleConfig {
    /// Returns the division this configuration asks for, given the cost of
    /// the largest request the layer accepts (every share holds at least one).
    pub fn settings(&self, largest_request: u64) -> ThrottleSettings {
        let capacity = self.capacity.0;
        // By default a quarter of the capacity and at least the largest
        // request; and room for a second one (a background grant to an
        // upstream next to the pool's own) where the foreground pool still
        // keeps two, so small budgets keep their foreground concurrency.
        let background_reserve = match self.background_reserve {
            Some(b) => b.0,
            None => {
                let two = largest_request.saturating_mul(2);
                let quarter = (capacity / 4).max(largest_request);
                if quarter < two && capacity.saturating_sub(two) >= two {
                    two
                } else {
                    quarter
                }
            }
        };
        ThrottleSettings {
            capacity,
            background_reserve,
            largest_request,
            enabled: self.enabled,
        }
    }
}

impl ThrottleSettings {
    /// Checks that both pools can hold the largest request, so every
    /// request is admissible.
    pub fn check(&self) -> Result<()> {
        let fg = self.capacity.saturating_sub(self.background_reserve);
        if self.enabled
            && (fg < self.largest_request || self.background_reserve < self.largest_request)
        {
            return Err(Error::Throttle(format!(
                "throttle capacity {} with background reserve {} leaves a pool below the largest request ({} units): raise throttle.capacity or lower max-payload",
                self.capacity, self.background_reserve, self.largest_request
            )));
        }
        Ok(())
    }
}

impl Throttle {
    /// Returns a throttle for `layer` (a metrics label). Fails if the
    /// division leaves a share smaller than the largest request.
    pub fn new(layer: impl Into<String>, s: ThrottleSettings) -> Result<Arc<Self>> {
        s.check()?;
        let fg = s.capacity.saturating_sub(s.background_reserve);
        let layer = layer.into();
        let t = Arc::new(Self {
            gauge_available: metrics::gauge!("nbdraid_throttle_available_units", "layer" => layer.clone()),
            gauge_in_flight: metrics::gauge!("nbdraid_throttle_in_flight_units", "layer" => layer.clone()),
            gauge_peak: metrics::gauge!("nbdraid_throttle_peak_in_flight_units", "layer" => layer.clone()),
            layer,
            capacity: s.capacity,
            min_share: s.largest_request,
            enabled: s.enabled,
            state: Mutex::new(State {
                used: 0,
                shares: BTreeMap::new(),
                next_share: 2,
                next_waiter: 0,
                rr: 0,
                retired: BTreeMap::new(),
            }),
            peak: AtomicU64::new(0),
        });
        {
            let mut st = t.lock();
            st.shares
                .insert(FOREGROUND, t.new_share("foreground", fg, None));
            st.shares.insert(
                BACKGROUND,
                t.new_share("background", s.background_reserve, None),
            );
        }
        let weak = Arc::downgrade(&t);
        crate::metrics::on_render(move || match weak.upgrade() {
            Some(t) => {
                t.publish();
                true
            }
            None => false,
        });
        t.publish();
        Ok(t)
    }

    fn new_share(&self, name: &str, reserved: u64, parent: Option<ShareId>) -> Share {
        let labels = [("layer", self.layer.clone()), ("share", name.to_string())];
        Share {
            name: name.to_string(),
            reserved,
            used: 0,
            queue: VecDeque::new(),
            parent,
            gauge_in_flight: metrics::gauge!("nbdraid_throttle_share_in_flight_units", &labels),
            waits: metrics::counter!("nbdraid_throttle_waits_total", &labels),
            wait_seconds: metrics::histogram!("nbdraid_throttle_wait_seconds", &labels),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the accounting half
        // updated (no invariant spans an unwind point); keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the capacity in units.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Returns the units not currently held.
    pub fn available(&self) -> u64 {
        self.capacity.saturating_sub(self.lock().used)
    }

    /// Returns the units currently held by admitted requests.
    pub fn in_flight(&self) -> u64 {
        self.lock().used
    }

    /// Returns the largest number of units ever held at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Reports whether the throttle limits admission.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Returns the smallest share allowed (the cost of the largest request).
    pub fn min_share(&self) -> u64 {
        self.min_share
    }

    /// Returns a snapshot of every share.
    pub fn shares(&self) -> Vec<ShareInfo> {
        self.lock()
            .shares
            .iter()
            .map(|(id, s)| ShareInfo {
                id: *id,
                name: s.name.clone(),
                reserved: s.reserved,
                used: s.used,
                waiting: s.queue.len(),
            })
            .collect()
    }

    /// Carves a share for a grant out of `parent` (FOREGROUND or BACKGROUND)
    /// and returns its id and size. The lower layer grants what it can: the
    /// `wanted` units, raised to at least the largest request (a smaller
    /// share could never admit it) and cut to what the parent can spare
    /// while keeping one largest request for everyone else. Fails only when
    /// not even the largest request can be spared.
    pub fn add_share(&self, name: &str, wanted: u64, parent: ShareId) -> Result<(ShareId, u64)> {
        let mut st = self.lock();
        let p = st
            .shares
            .get_mut(&parent)
            .ok_or_else(|| Error::Throttle(format!("no share {parent}")))?;
        let spare = p.reserved.saturating_sub(self.min_share);
        let units = wanted.max(self.min_share).min(spare);
        if units < self.min_share {
            return Err(Error::Throttle(format!(
                "cannot grant {wanted} units: the {} pool has {} reserved and must keep {} (the largest request) for itself",
                p.name, p.reserved, self.min_share
            )));
        }
        p.reserved -= units;
        let id = st.next_share;
        st.next_share += 1;
        let share = self.new_share(name, units, Some(parent));
        st.shares.insert(id, share);
        Ok((id, units))
    }

    /// Removes a grant's share, returning its reservation to its parent.
    /// Units its requests still hold are accounted to the parent from now on;
    /// its waiters move to the parent's queue.
    pub fn remove_share(&self, id: ShareId) {
        if id == FOREGROUND || id == BACKGROUND {
            return;
        }
        let mut st = self.lock();
        let Some(mut s) = st.shares.remove(&id) else {
            return;
        };
        // Its usage is the parent's from now on.
        s.gauge_in_flight.set(0.0);
        let parent = s.parent.unwrap_or(FOREGROUND);
        st.retired.insert(id, parent);
        if let Some(p) = st.shares.get_mut(&parent) {
            p.reserved += s.reserved;
            p.used += s.used;
            p.queue.extend(s.queue.drain(..));
        }
        self.dispatch(&mut st);
    }

    fn admissible(&self, st: &State, share: ShareId, units: u64) -> bool {
        if !self.enabled {
            return true;
        }
        if st.used + units > self.capacity {
            return false;
        }
        let Some(s) = st.shares.get(&share) else {
            return false;
        };
        if s.used + units <= s.reserved {
            return true;
        }
        let room_after = self.capacity - st.used - units;
        let protected: u64 = st
            .shares
            .iter()
            .filter(|(id, o)| **id != share && !o.queue.is_empty())
            .map(|(_, o)| o.unmet())
            .sum();
        room_after >= protected
    }

    fn charge(&self, st: &mut State, share: ShareId, units: u64) {
        st.used += units;
        if let Some(s) = st.shares.get_mut(&share) {
            s.used += units;
        }
        self.peak.fetch_max(st.used, Ordering::Relaxed);
    }

    /// Sets the gauges from the current state. Called when the metrics
    /// endpoint renders (not per request: a gauge set is two atomic
    /// read-modify-writes, and nobody reads the values in between); the
    /// peak is tracked exactly in between.
    fn publish(&self) {
        let st = self.lock();
        for s in st.shares.values() {
            s.gauge_in_flight.set(s.used as f64);
        }
        self.gauge_in_flight.set(st.used as f64);
        self.gauge_available
            .set(self.capacity.saturating_sub(st.used) as f64);
        self.gauge_peak
            .set(self.peak.load(Ordering::Relaxed) as f64);
    }

    /// Admits waiters, visiting shares round-robin, until no head fits.
    fn dispatch(&self, st: &mut State) {
        loop {
            let ids: Vec<ShareId> = st
                .shares
                .iter()
                .filter(|(_, s)| !s.queue.is_empty())
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                return;
            }
            let start = ids.iter().position(|id| *id >= st.rr).unwrap_or(0);
            let mut admitted = false;
            for k in 0..ids.len() {
                let id = ids[(start + k) % ids.len()];
                let Some(units) = st
                    .shares
                    .get(&id)
                    .and_then(|s| s.queue.front())
                    .map(|w| w.units)
                else {
                    continue;
                };
                if !self.admissible(st, id, units) {
                    continue;
                }
                let Some(w) = st.shares.get_mut(&id).and_then(|s| s.queue.pop_front()) else {
                    continue;
                };
                self.charge(st, id, w.units);
                if w.tx.send(()).is_err() {
                    // The waiter went away between queueing and now.
                    self.uncharge(st, id, w.units);
                }
                st.rr = id + 1;
                admitted = true;
            }
            if !admitted {
                return;
            }
        }
    }

    fn uncharge(&self, st: &mut State, share: ShareId, units: u64) {
        st.used -= units.min(st.used);
        // The share may have been removed (its usage moved to the parent).
        let target = st.resolve(share);
        if let Some(s) = st.shares.get_mut(&target) {
            s.used -= units.min(s.used);
        }
    }

    fn release(&self, share: ShareId, units: u64) {
        let mut st = self.lock();
        self.uncharge(&mut st, share, units);
        self.dispatch(&mut st);
    }

    /// Waits until `units` can be admitted in `share` and returns a guard
    /// holding them, and how long it waited.
    pub async fn acquire(
        self: &Arc<Self>,
        share: ShareId,
        units: u64,
    ) -> Result<(ThrottleGuard, Duration)> {
        let rx = {
            let mut st = self.lock();
            let share = st.resolve(share);
            let reserved = st.shares.get(&share).map_or(0, |s| s.reserved);
            if self.enabled && units > reserved.max(self.min_share) {
                return Err(Error::Invalid(format!(
                    "request needs {units} units, more than its share of the throttle ({reserved})"
                )));
            }
            let queue_empty = st.shares.get(&share).is_none_or(|s| s.queue.is_empty());
            if queue_empty && self.admissible(&st, share, units) {
                self.charge(&mut st, share, units);
                return Ok((self.guard(share, units), Duration::ZERO));
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            if let Some(s) = st.shares.get_mut(&share) {
                s.queue.push_back(Waiter { id, units, tx });
                s.waits.increment(1);
            }
            Waiting {
                throttle: self.clone(),
                share,
                id,
                units,
                rx: Some(rx),
            }
        };
        let start = Instant::now();
        let mut waiting = rx;
        let granted = waiting.wait().await;
        let waited = start.elapsed();
        if let Some(s) = self.lock().shares.get(&share) {
            s.wait_seconds.record(waited.as_secs_f64());
        }
        if !granted {
            return Err(Error::ShuttingDown);
        }
        Ok((self.guard(share, units), waited))
    }

    fn guard(self: &Arc<Self>, share: ShareId, units: u64) -> ThrottleGuard {
        ThrottleGuard {
            throttle: self.clone(),
            share,
            units,
        }
    }
}

/// A queued acquisition; cleans up if the waiting task goes away.
struct Waiting {
    throttle: Arc<Throttle>,
    share: ShareId,
    id: u64,
    units: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Waiting {
    async fn wait(&mut self) -> bool {
        let Some(rx) = self.rx.as_mut() else {
            return false;
        };
        let ok = rx.await.is_ok();
        self.rx = None;
        ok
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut st = self.throttle.lock();
        let queued = st
            .shares
            .values_mut()
            .find_map(|s| s.queue.iter().position(|w| w.id == self.id).map(|i| (s, i)));
        if let Some((s, i)) = queued {
            s.queue.remove(i);
            drop(st);
            return;
        }
        // Already granted: the units were charged for us; give them back.
        if rx.try_recv().is_ok() {
            self.throttle.uncharge(&mut st, self.share, self.units);
            self.throttle.dispatch(&mut st);
        }
    }
}

/// Units held by one admitted request; returned when dropped.
#[derive(Debug)]
pub struct ThrottleGuard {
    throttle: Arc<Throttle>,
    share: ShareId,
    units: u64,
}

impl ThrottleGuard {
    /// Returns the units this guard holds.
    pub fn units(&self) -> u64 {
        self.units
    }
}

impl Drop for ThrottleGuard {
    fn drop(&mut self) {
        self.throttle.release(self.share, self.units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(capacity: u64, bg: u64, largest: u64) -> Arc<Throttle> {
        Throttle::new(
            "test",
            ThrottleSettings {
                capacity,
                background_reserve: bg,
                largest_request: largest,
                enabled: true,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn never_exceeds_capacity_and_returns_units() {
        let t = throttle(100, 20, 10);
        let (a, _) = t.acquire(FOREGROUND, 50).await.unwrap();
        let (b, _) = t.acquire(FOREGROUND, 30).await.unwrap();
        assert_eq!(t.available(), 20);
        // Borrowing the idle background reservation is allowed.
        let (c, _) = t.acquire(FOREGROUND, 20).await.unwrap();
        assert_eq!(t.available(), 0);
        let pending = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(FOREGROUND, 10).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished());
        drop(a);
        let d = pending.await.unwrap().unwrap();
        assert_eq!(t.in_flight(), 60);
        drop((b, c, d));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.peak_in_flight(), 100);
    }

    #[tokio::test]
    async fn large_request_is_not_starved_by_small_ones() {
        let t = throttle(200, 100, 100);
        let (bg, _) = t.acquire(BACKGROUND, 100).await.unwrap();
        let (small, _) = t.acquire(FOREGROUND, 30).await.unwrap();
        let big = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(FOREGROUND, 95).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        assert!(!big.is_finished());
        // A later small request that would fit queues behind the big one (FIFO in the share).
        let later = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(FOREGROUND, 10).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        assert!(!later.is_finished());
        drop(small);
        let big = big.await.unwrap().unwrap();
        tokio::task::yield_now().await;
        assert!(!later.is_finished());
        drop(big);
        later.await.unwrap().unwrap();
        drop(bg);
    }

    #[tokio::test]
    async fn waiting_share_keeps_its_reservation() {
        let t = throttle(100, 40, 40);
        // Foreground borrows everything while background is idle.
        let (fg1, _) = t.acquire(FOREGROUND, 60).await.unwrap();
        let (fg2, _) = t.acquire(FOREGROUND, 40).await.unwrap();
        let bg = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(BACKGROUND, 40).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        // Foreground may not borrow into background's reservation now.
        drop(fg2);
        let bg = bg.await.unwrap().unwrap();
        let fg3 = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(FOREGROUND, 10).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        assert!(
            !fg3.is_finished(),
            "foreground is at its reservation (60) with background active"
        );
        drop(fg1);
        fg3.await.unwrap().unwrap();
        drop(bg);
    }

    #[test]
    fn default_background_pool_can_grant_an_upstream() {
        // A node's defaults: 256 MiB, 32 MiB payloads. The background pool
        // used to hold exactly one largest request, so no upstream could
        // ever get a background grant (found with the quick start).
        let largest = (32 << 20) + 512;
        let config = ThrottleConfig {
            capacity: ByteSize(256 << 20),
            ..ThrottleConfig::default()
        };
        let t = Throttle::new("test", config.settings(largest)).unwrap();
        let (_, granted) = t.add_share("array", 16 << 20, BACKGROUND).unwrap();
        assert_eq!(granted, largest);
        // The smallest valid capacities keep passing the check.
        for capacity in [2 * largest, 3 * largest, 5 * largest] {
            let config = ThrottleConfig {
                capacity: ByteSize(capacity),
                ..ThrottleConfig::default()
            };
            config.settings(largest).check().unwrap();
        }
        // A small budget keeps its foreground concurrency (two 32 MiB
        // requests in 72 MiB): the second background request is not taken.
        let small = ThrottleConfig {
            capacity: ByteSize(72 << 20),
            ..ThrottleConfig::default()
        };
        assert_eq!(small.settings(largest).background_reserve, largest);
    }

    #[tokio::test]
    async fn grants_carve_and_return_reservations() {
        let t = throttle(100, 20, 10);
        let (g, units) = t.add_share("up1", 30, FOREGROUND).unwrap();
        assert_eq!(units, 30, "granted in full when it fits");
        let (g2, units) = t.add_share("up2", 45, FOREGROUND).unwrap();
        assert_eq!(units, 40, "cut to what the pool spares: it keeps 10");
        assert!(
            t.add_share("up3", 10, FOREGROUND).is_err(),
            "nothing left to spare"
        );
        t.remove_share(g2);
        let (g3, units) = t.add_share("tiny", 5, FOREGROUND).unwrap();
        assert_eq!(units, 10, "raised to the largest request");
        t.remove_share(g3);
        let fg = t.shares().into_iter().find(|s| s.id == FOREGROUND).unwrap();
        assert_eq!(fg.reserved, 50);
        let (held, _) = t.acquire(g, 30).await.unwrap();
        t.remove_share(g);
        let fg = t.shares().into_iter().find(|s| s.id == FOREGROUND).unwrap();
        assert_eq!((fg.reserved, fg.used), (80, 30));
        drop(held);
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_leaks_nothing() {
        let t = throttle(100, 10, 10);
        let (all, _) = t.acquire(FOREGROUND, 90).await.unwrap();
        let (rest, _) = t.acquire(BACKGROUND, 10).await.unwrap();
        let w = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(FOREGROUND, 50).await.map(|(g, _)| g) }
        });
        tokio::task::yield_now().await;
        w.abort();
        let _ = w.await;
        drop(all);
        drop(rest);
        assert_eq!(t.in_flight(), 0);
        assert!(t.shares().iter().all(|s| s.waiting == 0));
    }

    #[tokio::test]
    async fn oversized_request_is_refused_not_hung() {
        let t = throttle(100, 20, 10);
        assert!(t.acquire(BACKGROUND, 30).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stress_never_goes_negative() {
        let t = throttle(1000, 200, 100);
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..500u64 {
                    let share = if i % 4 == 0 { BACKGROUND } else { FOREGROUND };
                    let units = 1 + (i * 7 + k * 13) % 100;
                    let (g, _) = t.acquire(share, units).await.unwrap();
                    assert!(t.in_flight() <= 1000);
                    if k % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                    drop(g);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(t.in_flight(), 0);
        assert!(t.peak_in_flight() <= 1000);
    }
}
