//! The watchdog task: request deadlines and stall detection.
//!
//! Time is counted in ticks (a quarter of the shortest timeout, at least
//! 5 ms): the watchdog bumps [`Shared::ticks`] once per tick and a piece
//! records the tick it was submitted at, so the hot path never reads a
//! clock. A piece older than the request timeout fails the connection
//! with [`ClientError::Timeout`]; so do requests outstanding while
//! [`Shared::progress`] (bumped by every reply) stands still for the stall
//! timeout. Either limit fires up to one tick late, never early.
//!
//! The watchdog holds the shared state weakly, so it never keeps a dropped
//! connection alive; it ends when the connection fails or goes away.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Shared, Timeouts};
use crate::error::ClientError;

/// Ticks, and fails the connection when a request outlives the request
/// timeout or the server stalls for the stall timeout.
pub(super) async fn watchdog(shared: Weak<Shared>, t: Timeouts) {
    let shortest = [t.request, t.stall]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(1));
    let tick = (shortest / 4).max(Duration::from_millis(5));
    // Whole ticks that must pass: a piece born just before a tick sees one
    // tick less of real time, so add one (deadlines fire up to a tick late).
    let ticks_for = |d: Duration| (d.as_nanos().div_ceil(tick.as_nanos()) as u64) + 1;
    let request_ticks = t.request.map(ticks_for);
    let stall_ticks = t.stall.map(ticks_for);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut still) = (u64::MAX, 0u64);
    loop {
        interval.tick().await;
        let Some(s) = shared.upgrade() else { return };
        if s.failed.load(Ordering::Acquire) {
            return;
        }
        let now = s.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let (busy, expired) = {
            let tb = s.table();
            let expired = request_ticks
                .is_some_and(|limit| tb.iter().any(|(_, p)| now.saturating_sub(p.born) >= limit));
            (!tb.is_empty(), expired)
        };
        if expired {
            s.fail(ClientError::Timeout(t.request.unwrap_or_default()));
            return;
        }
        let progress = s.progress.load(Ordering::Relaxed);
        if !busy || progress != seen {
            (seen, still) = (progress, 0);
            continue;
        }
        still += 1;
        if stall_ticks.is_some_and(|limit| still >= limit) {
            s.fail(ClientError::Timeout(t.stall.unwrap_or_default()));
            return;
        }
    }
}
