//! Background work on an array's rows: resync (make parity and copies
//! agree after an unclean shutdown), recovery (bring a re-added member up
//! to date) and check (count disagreements, change nothing).
//!
//! All three go through the array a unit at a time (a stripe for RAID
//! 5/6, a chunk for RAID 10, 1 MiB for RAID 1), each under that unit's
//! write lock, so a foreground write to the same unit waits for it (and
//! vice versa) and parity is never computed from half of a write.
//!
//! - Resync reads every copy or the whole stripe; it writes only what
//!   differs (a crash leaves few regions wrong), parity recomputed from
//!   the data, mirrors copied from the first in-sync copy.
//! - Recovery writes the re-added member's part of each unit: the copy
//!   from an in-sync member, or its chunk reconstructed from the others.
//! - Check reads like resync and reports the units that disagree.
//!
//! A rate limit (bytes of member data per second) keeps them from
//! crowding out foreground I/O.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbdraid_engine::Error as IoError;

use crate::array::ArrayInner;
use crate::layout::Level;
use crate::parity::{self, Redundancy};

/// RAID 1 unit of work.
const MIRROR_UNIT: u64 = 1 << 20;

/// What to do with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Make parity and copies agree (write what differs).
    Resync,
    /// Write member `slot`'s part.
    Recover(usize),
    /// Count disagreements.
    Check,
    /// Count disagreements and fix them: RAID 1/10 from the copy most
    /// copies agree on (the first in-sync copy when none has a majority),
    /// RAID 5 by rewriting parity, RAID 6 by rewriting the one chunk the P
    /// and Q syndromes point at (P and Q when they point at none). A unit
    /// found inconsistent is read again before it is repaired.
    Repair,
}

/// The running count of a pass, readable while it runs.
#[derive(Debug)]
pub struct Tally {
    /// What runs.
    pub kind: &'static str,
    /// Bytes of member data covered so far.
    pub done: AtomicU64,
    /// Bytes of member data to cover.
    pub total: AtomicU64,
    /// Bytes written to members.
    pub written: AtomicU64,
    /// Units that disagreed (check and resync).
    pub mismatches: AtomicU64,
    /// Units repaired (repair).
    pub repaired: AtomicU64,
    /// The first mismatching units.
    pub first: std::sync::Mutex<Vec<u64>>,
    /// When it started.
    pub started: Instant,
    /// Whether it finished.
    pub finished: std::sync::atomic::AtomicBool,
}

impl Tally {
    /// Returns a tally of `kind` over `total` bytes.
    pub fn new(kind: &'static str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            kind,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            written: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            first: std::sync::Mutex::new(Vec::new()),
            started: Instant::now(),
            finished: Default::default(),
        })
    }

    fn mismatch(&self, unit: u64) {
        self.mismatches.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.len() < 16 {
            first.push(unit);
        }
    }

    /// Returns the progress as the API reports it.
    pub fn progress(&self) -> crate::api::Progress {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = (rate > 0.0 && done < total)
            .then(|| Duration::from_secs_f64((total - done) as f64 / rate));
        crate::api::Progress {
            kind: self.kind.to_string(),
            done,
            total,
            rate,
            eta,
        }
    }
}

/// Paces a pass to a rate in bytes per second (0: unpaced) that can be
/// changed while it runs (`nbdraid array set-rate`): a change restarts the
/// accounting, so the new rate holds from then on.
pub struct Pacer {
    rate: Arc<AtomicU64>,
    /// How many pacers share the rate (each keeps to its share).
    share: u64,
    /// The rate the accounting below was made at.
    at: u64,
    /// tokio's clock, so that tests can pause it.
    start: tokio::time::Instant,
    bytes: u64,
}

impl Pacer {
    /// Returns a pacer following `rate`.
    pub fn new(rate: Arc<AtomicU64>) -> Self {
        Self::shared(rate, 1)
    }

    /// Returns one of `share` pacers that together follow `rate` (work
    /// run `share` units at a time, each with its own pacer).
    pub fn shared(rate: Arc<AtomicU64>, share: u64) -> Self {
        let at = rate.load(Ordering::Relaxed);
        Self {
            rate,
            share: share.max(1),
            at,
            start: tokio::time::Instant::now(),
            bytes: 0,
        }
    }

    /// Returns a pacer at a fixed `rate`.
    pub fn fixed(rate: u64) -> Self {
        Self::new(Arc::new(AtomicU64::new(rate)))
    }

    /// Accounts `n` bytes and sleeps while ahead of the rate (in slices,
    /// so that a changed rate takes effect within 200 ms).
    pub async fn pace(&mut self, n: u64) {
        self.pace_capped(n, || 0).await
    }

    /// Like [`Pacer::pace`], at most at `cap()` bytes per second when that
    /// is not 0 (the array is busy with clients: yield to them).
    pub async fn pace_capped(&mut self, n: u64, cap: impl Fn() -> u64) {
        self.bytes += n;
        loop {
            let rate = match (self.rate.load(Ordering::Relaxed), cap()) {
                (r, 0) => r,
                (0, c) => c,
                (r, c) => r.min(c),
            };
            if rate != self.at {
                self.at = rate;
                self.start = tokio::time::Instant::now();
                self.bytes = n;
            }
            if rate == 0 {
                return;
            }
            let due = Duration::from_secs_f64(self.bytes as f64 * self.share as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due <= elapsed {
                return;
            }
            tokio::time::sleep((due - elapsed).min(Duration::from_millis(200))).await;
        }
    }
}

/// What one unit of background work holds while it runs: its own units in
/// the background share of the array's throttle, and its units of the
/// background grants at the members.
pub struct BackgroundAdmission {
    _own: Option<nbdraid_engine::throttle::ThrottleGuard>,
    _members: crate::array::GrantGuard,
}

impl ArrayInner {
    /// Admits one unit of background work touching `per_member` bytes of
    /// each member (a read and a write at most), in the background class
    /// of this layer and of every member; waits while foreground work
    /// holds the budget (and never takes the foreground's share).
    pub async fn admit_background(&self, per_member: u64) -> Result<BackgroundAdmission, IoError> {
        let n = self.members.len() as u64;
        let own = match &self.throttle {
            Some(t) => {
                // The column, P and Q, and a copy: at most n + 3 buffers.
                let units = per_member.saturating_mul(n + 3) + nbdraid_engine::cost::BASE_COST;
                Some(
                    t.acquire(nbdraid_engine::throttle::BACKGROUND, units)
                        .await?
                        .0,
                )
            }
            None => None,
        };
        let needs = self
            .members
            .iter()
            .filter(|m| m.writable())
            .map(|m| {
                let model = m.model_guard();
                let units = model
                    .cost(nbdraid_engine::device::OpKind::Read, per_member)
                    .saturating_add(model.cost(nbdraid_engine::device::OpKind::Write, per_member));
                (m.slot, units)
            })
            .collect();
        Ok(BackgroundAdmission {
            _own: own,
            _members: self.bg_grants.acquire(needs).await,
        })
    }

    /// Runs `pass` over member rows `rows` (member data offsets), counting
    /// into `tally`, in the background class.
    pub async fn sync_rows(
        &self,
        rows: Range<u64>,
        pass: Pass,
        tally: &Tally,
        pacer: &mut Pacer,
    ) -> Result<(), IoError> {
        crate::member::in_background(self.sync_rows_inner(rows, pass, tally, pacer)).await
    }

    /// Runs `pass` over member rows `rows` (member data offsets), counting
    /// into `tally`.
    async fn sync_rows_inner(
        &self,
        rows: Range<u64>,
        pass: Pass,
        tally: &Tally,
        pacer: &mut Pacer,
    ) -> Result<(), IoError> {
        let g = self.layout.geometry();
        let rows = rows.start..rows.end.min(self.layout.member_data_size());
        match g.level {
            Level::Raid0 => {
                tally
                    .done
                    .fetch_add(rows.end - rows.start, Ordering::Relaxed);
                Ok(())
            }
            Level::Raid5 | Level::Raid6 => {
                for s in rows.start / g.chunk..rows.end.div_ceil(g.chunk) {
                    if s >= self.layout.rows() {
                        break;
                    }
                    self.sync_stripe(s, pass, tally).await?;
                    tally.done.fetch_add(g.chunk, Ordering::Relaxed);
                    pacer
                        .pace_capped(g.chunk * g.members as u64, || self.background_cap())
                        .await;
                }
                Ok(())
            }
            Level::Raid1 => {
                let mut at = rows.start;
                while at < rows.end {
                    let n = (rows.end - at).min(MIRROR_UNIT);
                    self.sync_copies(at, n, at / MIRROR_UNIT, pass, tally)
                        .await?;
                    tally.done.fetch_add(n, Ordering::Relaxed);
                    pacer
                        .pace_capped(n * g.members as u64, || self.background_cap())
                        .await;
                    at += n;
                }
                Ok(())
            }
            Level::Raid10 => {
                // Chunks with a copy in these rows.
                let n = g.members as u64;
                let copies = g.copies as u64;
                let (r0, r1) = (rows.start / g.chunk, rows.end.div_ceil(g.chunk));
                let first = (r0 * n) / copies;
                let last = ((r1 * n).div_ceil(copies)).min(self.layout.size() / g.chunk);
                for c in first..last {
                    self.sync_copies(c * g.chunk, g.chunk, c, pass, tally)
                        .await?;
                    pacer
                        .pace_capped(g.chunk * copies, || self.background_cap())
                        .await;
                }
                tally
                    .done
                    .fetch_add(rows.end - rows.start, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// One RAID 5/6 stripe.
    async fn sync_stripe(&self, s: u64, pass: Pass, tally: &Tally) -> Result<(), IoError> {
        let Some(stripe) = self.layout.stripe(s) else {
            return Ok(());
        };
        let redundancy = self.layout.level().redundancy().unwrap_or(Redundancy::P);
        let chunk = self.layout.chunk();
        let _admitted = self.admit_background(chunk).await?;
        let _lock = self.locks.lock(s).await;
        if self.is_failed() {
            return Err(self.failed_error("sync"));
        }
        // The whole column, reconstructing what members out of sync hold.
        let col = self.read_column(s, 0..chunk).await?;
        let k = stripe.data_chunks();
        let order: Vec<usize> = stripe.members().collect();
        match pass {
            Pass::Recover(slot) => {
                let Some(c) = order.iter().position(|&m| m == slot) else {
                    return Ok(());
                };
                let bytes = Bytes::copy_from_slice(&col[c]);
                self.write_unit(slot, stripe.member_offset(0), bytes, false, tally)
                    .await
            }
            Pass::Resync | Pass::Check | Pass::Repair => {
                let (mut p, mut q) = (self.buffer(chunk as usize), self.buffer(chunk as usize));
                if self.parity_agrees(redundancy, &col, k, &mut p, &mut q)? {
                    return Ok(());
                }
                let mut col = col;
                if pass == Pass::Repair {
                    // Read again before repairing: only what is still wrong
                    // is touched (under the stripe's lock nothing writes it,
                    // so this guards the lock-free paths, not the locked ones).
                    col = self.read_column(s, 0..chunk).await?;
                    if self.parity_agrees(redundancy, &col, k, &mut p, &mut q)? {
                        return Ok(());
                    }
                }
                tally.mismatch(s);
                if pass == Pass::Check {
                    return Ok(());
                }
                let off = stripe.member_offset(0);
                if pass == Pass::Repair && redundancy == Redundancy::PQ {
                    let located = parity::locate_single_error(&col[..k], &col[k], &col[k + 1])
                        .map_err(|e| IoError::eio("parity", &self.name, e.to_string()))?;
                    if let Some(parity::Located::Data(z)) = located
                        && let Some(member) = stripe.data_member(z)
                    {
                        // D_z = P xor the other data chunks.
                        let mut fixed = self.buffer(chunk as usize);
                        fixed.copy_from_slice(&col[k]);
                        for (i, d) in col[..k].iter().enumerate() {
                            if i != z {
                                for (f, b) in fixed.iter_mut().zip(d.iter()) {
                                    *f ^= *b;
                                }
                            }
                        }
                        tracing::warn!(array = %self.name, stripe = s, data_index = z, member, "repair: one data chunk was wrong; rewritten from P and the other data");
                        self.write_unit(member, off, Bytes::from_owner(fixed), true, tally)
                            .await?;
                        tally.repaired.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    if located.is_none() {
                        tracing::warn!(array = %self.name, stripe = s, "repair: more than one chunk disagrees; parity rewritten from the data");
                    }
                }
                if self.members[stripe.p_member()].writable() && p[..] != col[k][..] {
                    self.write_unit(
                        stripe.p_member(),
                        off,
                        Bytes::from_owner(p),
                        pass == Pass::Repair,
                        tally,
                    )
                    .await?;
                }
                if let Some(qm) = stripe.q_member()
                    && self.members[qm].writable()
                    && q[..] != col[k + 1][..]
                {
                    self.write_unit(qm, off, Bytes::from_owner(q), pass == Pass::Repair, tally)
                        .await?;
                }
                if pass == Pass::Repair {
                    tally.repaired.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// Computes P (and Q) of `col`'s data into `p` and `q`; reports whether
    /// the stripe's own parity agrees.
    fn parity_agrees<B: AsRef<[u8]>>(
        &self,
        redundancy: Redundancy,
        col: &[B],
        k: usize,
        p: &mut [u8],
        q: &mut [u8],
    ) -> Result<bool, IoError> {
        let err = |e: parity::ParityError| IoError::eio("parity", &self.name, e.to_string());
        Ok(match redundancy {
            Redundancy::P => {
                parity::gen_p(&col[..k], p).map_err(err)?;
                p[..] == col[k].as_ref()[..]
            }
            Redundancy::PQ => {
                parity::gen_pq(&col[..k], p, q).map_err(err)?;
                p[..] == col[k].as_ref()[..] && q[..] == col[k + 1].as_ref()[..]
            }
        })
    }

    /// One mirrored unit: array bytes `[offset, offset+len)` (RAID 1) or
    /// chunk `unit` (RAID 10).
    async fn sync_copies(
        &self,
        offset: u64,
        len: u64,
        unit: u64,
        pass: Pass,
        tally: &Tally,
    ) -> Result<(), IoError> {
        let Some(piece) = self
            .layout
            .map(offset, len)
            .map_err(|e| IoError::Invalid(e.to_string()))?
            .next()
        else {
            return Ok(());
        };
        let _admitted = self.admit_background(piece.len).await?;
        let _lock = self.locks.lock(unit).await;
        if self.is_failed() {
            return Err(self.failed_error("sync"));
        }
        let locs: Vec<_> = piece.locations.iter().collect();
        let Some(primary) = locs
            .iter()
            .find(|l| self.members[l.member].readable())
            .copied()
        else {
            return Err(self.failed_error("sync"));
        };
        let src = match self.members[primary.member]
            .read(primary.offset, self.buffer(piece.len as usize))
            .await
        {
            Ok(b) => b,
            Err((e, _)) => {
                self.handle(&e).await;
                return Err(self.io_error("sync", &e));
            }
        };
        let src = Bytes::from_owner(src);
        if pass == Pass::Repair {
            return self
                .repair_copies(piece.len, unit, &locs, primary, src, tally)
                .await;
        }
        // A unit whose copies disagree counts once, however many differ.
        let mut counted = false;
        for l in locs.iter().filter(|l| l.member != primary.member) {
            let m = &self.members[l.member];
            let write = match pass {
                Pass::Recover(slot) => l.member == slot,
                Pass::Check | Pass::Resync | Pass::Repair => {
                    if !m.readable() {
                        continue;
                    }
                    match m.read(l.offset, self.buffer(piece.len as usize)).await {
                        Ok(b) if b[..] == src[..] => false,
                        Ok(_) => {
                            if !counted {
                                counted = true;
                                tally.mismatch(unit);
                            }
                            pass == Pass::Resync
                        }
                        Err((e, _)) => {
                            self.handle(&e).await;
                            false
                        }
                    }
                }
            };
            if write && m.writable() {
                self.write_unit(l.member, l.offset, src.clone(), false, tally)
                    .await?;
            }
        }
        Ok(())
    }

    /// Repairs one mirrored unit: reads every in-sync copy, and if they
    /// differ (still, when read again) writes the content most copies hold
    /// (the primary's when no content has a majority) over the others.
    async fn repair_copies(
        &self,
        len: u64,
        unit: u64,
        locs: &[crate::layout::Location],
        primary: crate::layout::Location,
        first: Bytes,
        tally: &Tally,
    ) -> Result<(), IoError> {
        let mut copies: Vec<(crate::layout::Location, Bytes)> = vec![(primary, first)];
        for round in 0..2 {
            for l in locs.iter().filter(|l| l.member != primary.member) {
                if !self.members[l.member].readable() {
                    continue;
                }
                match self.members[l.member]
                    .read(l.offset, self.buffer(len as usize))
                    .await
                {
                    Ok(b) => copies.push((*l, Bytes::from_owner(b))),
                    Err((e, _)) => {
                        self.handle(&e).await;
                    }
                }
            }
            if copies.iter().all(|(_, b)| *b == copies[0].1) {
                return Ok(());
            }
            if round == 0 {
                // Read every copy again before repairing.
                copies.truncate(0);
                match self.members[primary.member]
                    .read(primary.offset, self.buffer(len as usize))
                    .await
                {
                    Ok(b) => copies.push((primary, Bytes::from_owner(b))),
                    Err((e, _)) => {
                        self.handle(&e).await;
                        return Err(self.io_error("repair", &e));
                    }
                }
            }
        }
        tally.mismatch(unit);
        // The content more than half the copies hold, else the primary's.
        let votes = |b: &Bytes| copies.iter().filter(|(_, c)| c == b).count();
        let majority = copies
            .iter()
            .map(|(_, b)| b)
            .find(|b| votes(b) * 2 > copies.len())
            .cloned();
        let truth = majority.clone().unwrap_or_else(|| copies[0].1.clone());
        let majority = majority.is_some();
        for (l, b) in &copies {
            if *b != truth && self.members[l.member].writable() {
                tracing::warn!(array = %self.name, unit, member = l.member, majority, "repair: copy rewritten");
                self.write_unit(l.member, l.offset, truth.clone(), true, tally)
                    .await?;
            }
        }
        tally.repaired.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a unit a pass fixed. A repair's write is FUA: nothing else
    /// records it (no bitmap bit, no log entry), and the next partial
    /// write of the stripe, once the lock is released, logs partial parity
    /// that counts on it; a rebuild's or resync's writes are made durable
    /// by the flush before their progress is recorded.
    async fn write_unit(
        &self,
        slot: usize,
        offset: u64,
        bytes: Bytes,
        fua: bool,
        tally: &Tally,
    ) -> Result<(), IoError> {
        let n = bytes.len() as u64;
        match self.members[slot].write(offset, bytes, fua).await {
            Ok(()) => {
                tally.written.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if self.handle(&e).await {
                    Ok(())
                } else {
                    Err(self.io_error("sync", &e))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Virtual seconds `pacer` takes over `n` steps of `step` bytes with
    /// `cap` (time is paused: sleeps advance it at once).
    async fn paced(pacer: &mut Pacer, n: u64, step: u64, cap: u64) -> f64 {
        let start = tokio::time::Instant::now();
        for _ in 0..n {
            pacer.pace_capped(step, || cap).await;
        }
        start.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_array_caps_background_passes() {
        let mib = 1u64 << 20;
        // No rate and not busy: no waiting at all.
        let mut free = Pacer::fixed(0);
        assert_eq!(paced(&mut free, 8, mib, 0).await, 0.0);
        // Busy (cap 4 MiB/s): 8 MiB take about 2 s.
        let mut busy = Pacer::fixed(0);
        let t = paced(&mut busy, 8, mib, 4 * mib).await;
        assert!((1.7..=2.1).contains(&t), "{t}");
        // The lower of the rate and the cap wins.
        let mut both = Pacer::fixed(2 * mib);
        let t = paced(&mut both, 8, mib, 4 * mib).await;
        assert!((3.4..=4.1).contains(&t), "{t}");
        // Four pacers sharing a cap each keep to a quarter of it: 2 MiB
        // at 1 MiB/s.
        let mut share = Pacer::shared(Arc::new(AtomicU64::new(0)), 4);
        let t = paced(&mut share, 2, mib, 4 * mib).await;
        assert!((1.9..=2.1).contains(&t), "{t}");
    }
}
