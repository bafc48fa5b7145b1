//! What the array holds at its members: per member, the units of the
//! grant the member gave this array (its `Throttle.Lease`), and the units
//! the array's admitted requests hold against it.
//!
//! A request is admitted against its members in **one atomic step**: it
//! takes the units it needs at every member it will touch at once, or
//! waits (first come, first served) until it can; it never holds some of
//! them while waiting for others. Its own units (the array's throttle) are
//! taken before, by the engine, always in that order: own units, then
//! members. An admitted request never waits for memory again (except to
//! re-admit at the degraded cost when a member fails under it), and units
//! return when it completes, so a waiting request only ever waits for
//! requests that are certain to finish: no cycle, no deadlock.
//!
//! So the units the array holds at a member never exceed what that member
//! granted, and the member never has to make the array's connections wait
//! (its own share accounting stays a safety net). A member without a held
//! lease is accounted against the grant the array asked for. A single
//! request needing more than a member's whole grant is admitted alone
//! (with nothing else held there), so it cannot wait forever.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

/// The units a request needs at each member (slot, units).
pub type Needs = Vec<(usize, u64)>;

struct Pool {
    /// The member's grant in force (units).
    grant: u64,
    /// Units held by admitted requests.
    held: u64,
    /// Highest `held` seen.
    peak: u64,
}

struct Waiter {
    needs: Needs,
    tx: oneshot::Sender<()>,
}

struct State {
    pools: Vec<Pool>,
    queue: VecDeque<Waiter>,
}

/// The array's accounting of its grants at its members.
pub struct Grants {
    state: Mutex<State>,
    /// Requests that waited, and their total wait.
    pub waits: std::sync::atomic::AtomicU64,
    /// Total wait in microseconds.
    pub wait_us: std::sync::atomic::AtomicU64,
    enabled: bool,
}

/// Units held at members by one admitted request; returned on drop.
pub struct GrantGuard {
    grants: Arc<Grants>,
    needs: Needs,
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        self.grants.release(&self.needs);
    }
}

impl Grants {
    /// Returns the accounting for members with `grants` units each; with
    /// `enabled` false it only counts (measurements: accounting off).
    pub fn new(grants: Vec<u64>, enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                pools: grants
                    .into_iter()
                    .map(|grant| Pool {
                        grant,
                        held: 0,
                        peak: 0,
                    })
                    .collect(),
                queue: VecDeque::new(),
            }),
            waits: Default::default(),
            wait_us: Default::default(),
            enabled,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets member `slot`'s grant (its lease was granted, lost or resized)
    /// and admits waiters that now fit.
    pub fn set_grant(&self, slot: usize, grant: u64) {
        let mut st = self.lock();
        if let Some(p) = st.pools.get_mut(slot) {
            p.grant = grant;
        }
        self.dispatch(&mut st);
    }

    /// Returns, per member, (grant, held, peak held).
    pub fn snapshot(&self) -> Vec<(u64, u64, u64)> {
        self.lock()
            .pools
            .iter()
            .map(|p| (p.grant, p.held, p.peak))
            .collect()
    }

    fn fits(&self, st: &State, needs: &Needs) -> bool {
        !self.enabled
            || needs.iter().all(|&(slot, units)| {
                st.pools.get(slot).is_none_or(|p| {
                    // A need above the whole grant is admitted alone.
                    p.held + units <= p.grant || (p.held == 0 && units > p.grant)
                })
            })
    }

    fn charge(st: &mut State, needs: &Needs) {
        for &(slot, units) in needs {
            if let Some(p) = st.pools.get_mut(slot) {
                p.held += units;
                p.peak = p.peak.max(p.held);
            }
        }
    }

    /// Admits the queue's head while it fits (first come, first served: a
    /// large request is not overtaken).
    fn dispatch(&self, st: &mut State) {
        while let Some(w) = st.queue.front() {
            if !self.fits(st, &w.needs) {
                return;
            }
            let Some(w) = st.queue.pop_front() else {
                return;
            };
            Self::charge(st, &w.needs);
            if w.tx.send(()).is_err() {
                // The waiter went away: give its units back.
                for &(slot, units) in &w.needs {
                    if let Some(p) = st.pools.get_mut(slot) {
                        p.held = p.held.saturating_sub(units);
                    }
                }
            }
        }
    }

    fn release(&self, needs: &Needs) {
        let mut st = self.lock();
        for &(slot, units) in needs {
            if let Some(p) = st.pools.get_mut(slot) {
                p.held = p.held.saturating_sub(units);
            }
        }
        self.dispatch(&mut st);
    }

    /// Takes `needs` at every member at once, waiting until they fit.
    pub async fn acquire(self: &Arc<Self>, needs: Needs) -> GrantGuard {
        let rx = {
            let mut st = self.lock();
            if st.queue.is_empty() && self.fits(&st, &needs) {
                Self::charge(&mut st, &needs);
                return GrantGuard {
                    grants: self.clone(),
                    needs,
                };
            }
            let (tx, rx) = oneshot::channel();
            st.queue.push_back(Waiter {
                needs: needs.clone(),
                tx,
            });
            rx
        };
        let start = Instant::now();
        let granted = rx.await.is_ok();
        self.waits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.wait_us.fetch_add(
            start.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if !granted {
            // Only when the accounting itself is gone; hold nothing.
            return GrantGuard {
                grants: self.clone(),
                needs: Vec::new(),
            };
        }
        GrantGuard {
            grants: self.clone(),
            needs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn atomic_fifo_admission_never_exceeds_a_grant() {
        let g = Grants::new(vec![100, 100], true);
        let a = g.acquire(vec![(0, 60), (1, 60)]).await;
        // Needs both members: waits while member 0 lacks room, holding nothing.
        let g2 = g.clone();
        let b = tokio::spawn(async move { g2.acquire(vec![(0, 60), (1, 10)]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!b.is_finished());
        assert_eq!(
            g.snapshot()[1].1,
            60,
            "a waiter held member 1 while waiting for member 0"
        );
        // A later small request does not overtake the waiting one.
        let g3 = g.clone();
        let c = tokio::spawn(async move { g3.acquire(vec![(1, 5)]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !c.is_finished(),
            "a later request overtook the head of the queue"
        );
        drop(a);
        let b = b.await.unwrap();
        let c = c.await.unwrap();
        let snap = g.snapshot();
        assert_eq!((snap[0].1, snap[1].1), (60, 15));
        assert!(snap.iter().all(|(grant, _, peak)| peak <= grant));
        drop((b, c));
        assert!(g.snapshot().iter().all(|(_, held, _)| *held == 0));
    }

    #[tokio::test]
    async fn a_need_above_the_grant_is_admitted_alone() {
        let g = Grants::new(vec![100], true);
        let big = g.acquire(vec![(0, 500)]).await;
        let g2 = g.clone();
        let small = tokio::spawn(async move { g2.acquire(vec![(0, 1)]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!small.is_finished());
        drop(big);
        drop(small.await.unwrap());
    }

    #[tokio::test]
    async fn a_new_grant_admits_waiters() {
        let g = Grants::new(vec![10], true);
        let first = g.acquire(vec![(0, 10)]).await;
        let g2 = g.clone();
        let second = tokio::spawn(async move { g2.acquire(vec![(0, 10)]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished());
        g.set_grant(0, 20);
        drop(second.await.unwrap());
        drop(first);
    }
}
