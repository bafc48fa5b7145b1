//! Writeout throttling: a budget of resource units and guards that hold them.
//!
//! One unit is one byte of buffer memory. A request's units come from its
//! layer's cost model ([`crate::device::BlockDevice::cost`]); they are
//! acquired after the request header is read and before a write's payload
//! is read, and they return when the guard drops, which is after the reply
//! has been written to the socket.
//!
//! Invariants:
//! - `available` never goes below zero: units are only handed out when they
//!   are there (the underlying semaphore enforces it).
//! - Waiters are served first come, first served: a large request at the
//!   head of the queue is not overtaken by a stream of small ones.
//! - A request costing more than the capacity could never be admitted; the
//!   engine keeps every admissible request's cost within capacity by
//!   bounding its maximum payload (checked at start-up), so this is an
//!   error, never a silent hang.
//!
//! Rule (as in Crucible's io_limits): never wait for units from the task
//! that must send the replies returning them. The node waits in the
//! connection's reader; replies go out from a separate writer task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// A budget of units shared by the requests of one layer.
pub struct Throttle {
    name: String,
    capacity: u64,
    sem: Arc<Semaphore>,
    enabled: bool,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    gauge_available: metrics::Gauge,
    gauge_in_flight: metrics::Gauge,
    waits: metrics::Counter,
    wait_seconds: metrics::Histogram,
}

impl Throttle {
    /// Returns a throttle named `name` (for metrics) with `capacity` units.
    /// A disabled throttle admits everything at once but still counts units.
    pub fn new(name: impl Into<String>, capacity: u64, enabled: bool) -> Arc<Self> {
        let permits = capacity.min(Semaphore::MAX_PERMITS as u64) as usize;
        let name = name.into();
        let t = Arc::new(Self {
            gauge_available: metrics::gauge!("nbdraid_throttle_available_units", "layer" => name.clone()),
            gauge_in_flight: metrics::gauge!("nbdraid_throttle_in_flight_units", "layer" => name.clone()),
            waits: metrics::counter!("nbdraid_throttle_waits_total", "layer" => name.clone()),
            wait_seconds: metrics::histogram!("nbdraid_throttle_wait_seconds", "layer" => name.clone()),
            name,
            capacity,
            sem: Arc::new(Semaphore::new(permits)),
            enabled,
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        });
        t.publish();
        t
    }

    /// Returns the capacity in units.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Returns the units not currently held.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64
    }

    /// Returns the units currently held by admitted requests.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Returns the largest number of units ever held at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Reports whether the throttle limits admission.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Waits until `units` are available and returns a guard holding them.
    pub async fn acquire(self: &Arc<Self>, units: u64) -> Result<ThrottleGuard> {
        if units > self.capacity && self.enabled {
            return Err(Error::Invalid(format!(
                "request needs {units} units, more than the throttle capacity {}",
                self.capacity
            )));
        }
        let permit = if self.enabled {
            let n = u32::try_from(units)
                .map_err(|_| Error::Invalid(format!("request needs {units} units")))?;
            let permit = match self.sem.clone().try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => {
                    let start = Instant::now();
                    self.waits.increment(1);
                    let p = self
                        .sem
                        .clone()
                        .acquire_many_owned(n)
                        .await
                        .map_err(|_| Error::ShuttingDown)?;
                    self.wait_seconds.record(start.elapsed().as_secs_f64());
                    p
                }
            };
            Some(permit)
        } else {
            None
        };
        let now = self.in_flight.fetch_add(units, Ordering::Relaxed) + units;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        self.publish();
        Ok(ThrottleGuard {
            throttle: self.clone(),
            units,
            _permit: permit,
        })
    }

    fn publish(&self) {
        self.gauge_available.set(self.available() as f64);
        self.gauge_in_flight.set(self.in_flight() as f64);
    }
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("available", &self.available())
            .finish()
    }
}

/// Units held by one admitted request; returned when dropped.
#[derive(Debug)]
pub struct ThrottleGuard {
    throttle: Arc<Throttle>,
    units: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl ThrottleGuard {
    /// Returns the units this guard holds.
    pub fn units(&self) -> u64 {
        self.units
    }
}

impl Drop for ThrottleGuard {
    fn drop(&mut self) {
        self.throttle
            .in_flight
            .fetch_sub(self.units, Ordering::Relaxed);
        // The permit is released after this body; publish the gauge as it will be.
        let t = &self.throttle;
        t.gauge_in_flight.set(t.in_flight() as f64);
        t.gauge_available.set(
            (t.available() + self._permit.as_ref().map_or(0, |p| p.num_permits()) as u64) as f64,
        );
    }
}
