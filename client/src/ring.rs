//! The syslet-style completion ring.
//!
//! A [`CompletionRing`] has `elements` slots (a power of two). The engine
//! fills the slot at `kernel_head` as operations complete; the application
//! consumes the slot at `user_tail`. The ring is empty when the two are
//! equal.
//!
//! - [`CompletionRing::indirect`] submits an operation. If it can finish
//!   without waiting (a validation error, a zero-length operation, a dead
//!   connection) the final status comes back at once as
//!   [`Indirect::Done`]; otherwise [`Indirect::Pending`], and on
//!   completion the status lands in the ring and the ring's notification
//!   function runs.
//! - [`CompletionRing::ring_wait`] returns once a completion lies past the
//!   `user_tail` the caller passes. The waiter registers before it checks
//!   `kernel_head`, so a completion landing between the check and the wait
//!   cannot be missed.
//! - The ring never overflows: every pending operation holds a reservation
//!   of one slot from submission until the application consumes its entry,
//!   and a submission that finds no slot free is refused with
//!   [`ClientError::RingFull`] (or, with [`CompletionRing::indirect_wait`],
//!   waits for one), unless it finishes at once: such an entry never
//!   enters the ring, so it needs no slot.
//!
//! Read buffers are the caller's [`IoBuf`]s: handed in with the request
//! and handed back in the entry, filled in place by the engine.
//!
//! The ring's shared state takes completions through the engine's
//! completion-sink trait (in `op.rs`): only [`CompletionRing`]'s
//! submission methods know the [`Client`], and the engine never names the
//! ring, so the modules do not import each other in a cycle.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbdraid_proto::buf::IoBuf;
use tokio::sync::Notify;

use crate::client::{Client, Request, Started};
use crate::error::ClientError;
use crate::op::{Completer, CompletionSink, Done, Extent};

/// The final status of an operation: success, or why it failed.
pub type Status = Result<(), ClientError>;

/// One completion.
#[derive(Debug)]
pub struct RingEntry {
    /// Final status.
    pub status: Status,
    /// The value the caller attached at submission.
    pub caller_data: u64,
    /// For READ: the caller's buffer, filled.
    pub buffer: Option<IoBuf>,
    /// For BLOCK_STATUS: the extents.
    pub extents: Vec<Extent>,
}

impl RingEntry {
    fn new(caller_data: u64, done: Done) -> Self {
        Self {
            status: done.result,
            caller_data,
            buffer: done.buffer,
            extents: done.extents,
        }
    }
}

/// What [`CompletionRing::indirect`] led to.
#[derive(Debug)]
pub enum Indirect {
    /// Finished without blocking; this is its entry (it does not enter the ring).
    Done(RingEntry),
    /// In flight; its entry will land in the ring (ESYSLETPENDING).
    Pending,
}

/// A submission the ring refused, with the request handed back.
#[derive(Debug)]
pub struct Refused {
    /// Why ([`ClientError::RingFull`]).
    pub error: ClientError,
    /// The request, untouched.
    pub request: Request,
}

/// Called with `(caller_data, &status)` each time an entry lands in the ring.
pub type NotifyFn = Box<dyn Fn(u64, &Status) + Send + Sync>;

struct RingShared {
    mask: u64,
    elements: usize,
    slots: Mutex<Vec<Option<RingEntry>>>,
    kernel_head: AtomicU64,
    user_tail: AtomicU64,
    /// Pending operations plus unconsumed entries; never above `elements`.
    reserved: AtomicUsize,
    arrived: Notify,
    /// Tasks inside `ring_wait`; a push wakes `arrived` only if any.
    async_waiters: AtomicUsize,
    space: Notify,
    blocking_waiters: AtomicUsize,
    cv_lock: Mutex<()>,
    cv: Condvar,
    notify_fn: Option<NotifyFn>,
}

impl CompletionSink for RingShared {
    fn complete(&self, caller_data: u64, done: Done) {
        self.push(caller_data, done);
    }
}

impl RingShared {
    /// Stores a completion at `kernel_head` and wakes waiters.
    fn push(&self, caller_data: u64, done: Done) {
        let entry = RingEntry::new(caller_data, done);
        let status_for_notify = self.notify_fn.as_ref().map(|_| entry.status.clone());
        {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let head = self.kernel_head.load(Ordering::Relaxed);
            // The reservation rule guarantees this slot was consumed.
            slots[(head & self.mask) as usize] = Some(entry);
            self.kernel_head.store(head + 1, Ordering::SeqCst);
        }
        // A waiter counts itself before it checks the head (both SeqCst),
        // so either it sees this push or this push sees it.
        if self.async_waiters.load(Ordering::SeqCst) > 0 {
            self.arrived.notify_waiters();
        }
        if self.blocking_waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.cv_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
        if let (Some(f), Some(s)) = (&self.notify_fn, status_for_notify) {
            f(caller_data, &s);
        }
    }

    fn reserve(&self) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < self.elements).then_some(r + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
        self.space.notify_one();
    }
}

/// A completion ring (see the module documentation).
#[derive(Clone)]
pub struct CompletionRing {
    shared: Arc<RingShared>,
}

impl std::fmt::Debug for CompletionRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionRing")
            .field("elements", &self.shared.elements)
            .field("kernel_head", &self.kernel_head())
            .field("user_tail", &self.user_tail())
            .finish()
    }
}

impl CompletionRing {
    /// Returns a ring of `elements` slots; `elements` must be a power of two.
    pub fn new(elements: usize) -> Result<Self, ClientError> {
        Self::build(elements, None)
    }

    /// Returns a ring whose `notify` runs (on the engine's task) for every
    /// completion that lands in it. Keep it short and non-blocking.
    pub fn with_notify(elements: usize, notify: NotifyFn) -> Result<Self, ClientError> {
        Self::build(elements, Some(notify))
    }

    fn build(elements: usize, notify_fn: Option<NotifyFn>) -> Result<Self, ClientError> {
        if elements == 0 || !elements.is_power_of_two() {
            return Err(ClientError::Invalid(format!(
                "ring size {elements} is not a power of two"
            )));
        }
        Ok(Self {
            shared: Arc::new(RingShared {
                mask: elements as u64 - 1,
                elements,
                slots: Mutex::new((0..elements).map(|_| None).collect()),
                kernel_head: AtomicU64::new(0),
                user_tail: AtomicU64::new(0),
                reserved: AtomicUsize::new(0),
                arrived: Notify::new(),
                async_waiters: AtomicUsize::new(0),
                space: Notify::new(),
                blocking_waiters: AtomicUsize::new(0),
                cv_lock: Mutex::new(()),
                cv: Condvar::new(),
                notify_fn,
            }),
        })
    }

    /// Returns the number of slots.
    pub fn elements(&self) -> usize {
        self.shared.elements
    }

    /// Returns the index of the next slot the engine fills (monotonic).
    pub fn kernel_head(&self) -> u64 {
        self.shared.kernel_head.load(Ordering::Acquire)
    }

    /// Returns the index of the next slot the application consumes (monotonic).
    pub fn user_tail(&self) -> u64 {
        self.shared.user_tail.load(Ordering::Acquire)
    }

    /// Returns `(kernel_head, user_tail)` read together, consistent with
    /// each other (reading the two accessors one after the other may see
    /// them at different moments).
    pub fn positions(&self) -> (u64, u64) {
        let s = &self.shared;
        let _slots = s.slots.lock().unwrap_or_else(|e| e.into_inner());
        (
            s.kernel_head.load(Ordering::Acquire),
            s.user_tail.load(Ordering::Acquire),
        )
    }

    /// Returns the number of operations pending plus entries not yet consumed.
    pub fn outstanding(&self) -> usize {
        self.shared.reserved.load(Ordering::Acquire)
    }

    /// Submits `request` on `client`; see [`Indirect`]. When every slot is
    /// spoken for, a request that finishes at once still does (its entry
    /// never needs a slot); any other is refused.
    pub fn indirect(
        &self,
        client: &Client,
        request: Request,
        caller_data: u64,
    ) -> Result<Indirect, Refused> {
        if !self.shared.reserve() {
            return match client.finish_now(request) {
                Ok(done) => Ok(Indirect::Done(RingEntry::new(caller_data, done))),
                Err(request) => Err(Refused {
                    error: ClientError::RingFull(self.shared.elements),
                    request,
                }),
            };
        }
        Ok(self.start(client, request, caller_data))
    }

    /// Like [`CompletionRing::indirect`], but waits for a free slot instead
    /// of refusing. Slots free up only when entries are consumed, so the
    /// task that consumes the ring must not be the one waiting here once
    /// the ring is full (it would wait for itself).
    pub async fn indirect_wait(
        &self,
        client: &Client,
        request: Request,
        caller_data: u64,
    ) -> Indirect {
        let mut request = request;
        loop {
            let space = self.shared.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if self.shared.reserve() {
                return self.start(client, request, caller_data);
            }
            request = match client.finish_now(request) {
                Ok(done) => return Indirect::Done(RingEntry::new(caller_data, done)),
                Err(request) => request,
            };
            space.await;
        }
    }

    fn start(&self, client: &Client, request: Request, caller_data: u64) -> Indirect {
        let sink: Arc<dyn CompletionSink> = self.shared.clone();
        match client.start(request, Completer::Sink(sink, caller_data)) {
            Started::Pending => Indirect::Pending,
            Started::Done(done) => {
                self.shared.release();
                Indirect::Done(RingEntry::new(caller_data, done))
            }
        }
    }

    /// Takes the entry at `user_tail` and advances it; `None` when empty.
    pub fn pop(&self) -> Option<RingEntry> {
        let s = &self.shared;
        let entry = {
            let mut slots = s.slots.lock().unwrap_or_else(|e| e.into_inner());
            let tail = s.user_tail.load(Ordering::Relaxed);
            if tail == s.kernel_head.load(Ordering::Acquire) {
                return None;
            }
            let e = slots[(tail & s.mask) as usize].take();
            s.user_tail.store(tail + 1, Ordering::Release);
            e
        };
        s.release();
        entry
    }

    /// Waits until a completion lies past `user_tail` (the caller's view of
    /// the tail when it decided to wait).
    pub async fn ring_wait(&self, user_tail: u64) {
        /// Uncounts the waiter however the wait ends (also on cancellation).
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let s = &self.shared;
        s.async_waiters.fetch_add(1, Ordering::SeqCst);
        let _counted = Counted(&s.async_waiters);
        loop {
            let arrived = s.arrived.notified();
            tokio::pin!(arrived);
            // Registered before the check: a push after it wakes us.
            arrived.as_mut().enable();
            if s.kernel_head.load(Ordering::SeqCst) > user_tail {
                return;
            }
            arrived.await;
        }
    }

    /// Blocking form of [`CompletionRing::ring_wait`] for threads outside the
    /// runtime; returns false if `timeout` passed first.
    pub fn ring_wait_blocking(&self, user_tail: u64, timeout: Option<Duration>) -> bool {
        let s = &self.shared;
        s.blocking_waiters.fetch_add(1, Ordering::SeqCst);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut g = s.cv_lock.lock().unwrap_or_else(|e| e.into_inner());
        let ok = loop {
            if s.kernel_head.load(Ordering::SeqCst) > user_tail {
                break true;
            }
            match deadline {
                None => g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        break false;
                    }
                    g =
                        s.cv.wait_timeout(g, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                }
            }
        };
        drop(g);
        s.blocking_waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }
}
