//! RAID 5/6 writes: each stripe's part of a request, under the stripe's
//! lock, by one of four plans.
//!
//! - **Full stripe**: parity from the new data alone, no reads.
//! - **Read-modify-write**: read the old data being replaced and the old
//!   parity over the changed range; update parity by the delta
//!   (P ^= old ^ new, Q ^= g^i·(old ^ new)).
//! - **Reconstruct-write**: read the untouched data over the changed
//!   range; compute parity from the whole new column. Chosen when it
//!   needs fewer member reads than RMW, and always in a region not yet
//!   resynced after an unclean shutdown (RMW against stale parity would
//!   carry the error forward).
//! - **Degraded**: some chunk's member is out of sync: read every
//!   available chunk over the changed range, reconstruct the missing ones,
//!   lay the new data over the old column, recompute parity, and write
//!   what the writable members hold.
//!
//! Changed ranges are byte-exact (`StripeSpan::parity_ranges`), so an
//! unaligned write updates exactly the parity bytes it changes. A member
//! that fails while the old column is read is failed and the stripe is
//! planned again; one that fails while the new one is written is failed
//! before the write is acknowledged (its data is implied by parity).

use bytes::Bytes;
use nbdraid_engine::Error as IoError;
use nbdraid_engine::buffer::IoBuf;

use super::{ArrayInner, log};
use crate::layout::StripeSpan;
use crate::member::MemberError;
use crate::meta::log::EntryKind;
use crate::parity::{self, Redundancy};

/// How a stripe's part of a write is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Full,
    ReadModifyWrite,
    ReconstructWrite,
    Degraded,
}

/// Why a plan did not finish.
enum Interrupted {
    /// A member failed while the old column was read: plan again.
    Replan,
    /// The request fails with this error.
    Fail(IoError),
}

impl From<IoError> for Interrupted {
    fn from(e: IoError) -> Self {
        Interrupted::Fail(e)
    }
}

/// One member write of a plan: member slot, member offset, bytes.
type MemberWrite = (usize, u64, Bytes);

/// A plan's new parity over one in-chunk range: the range, P, and Q.
type ParityRange = (std::ops::Range<u64>, Bytes, Option<Bytes>);

/// What a plan writes: every member write, and the new parity by range.
struct Prepared {
    writes: Vec<MemberWrite>,
    parity: Vec<ParityRange>,
}

fn parity_err(name: &str, e: parity::ParityError) -> IoError {
    IoError::eio("parity", name, e.to_string())
}

impl ArrayInner {
    pub(super) fn redundancy(&self) -> Result<Redundancy, IoError> {
        self.layout
            .level()
            .redundancy()
            .ok_or_else(|| IoError::Invalid(format!("{}: not a parity level", self.name)))
    }

    /// Writes `data` at `offset` on a RAID 5/6 array, stripes in parallel.
    pub(crate) async fn write_parity(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), IoError> {
        let spans: Vec<StripeSpan> = self
            .layout
            .stripes(offset, data.len() as u64)
            .map_err(|e| IoError::Invalid(format!("{}: {e}", self.name)))?
            .collect();
        let writes = spans.into_iter().map(|span| {
            let start = span.buf_offset as usize;
            let bytes = data.slice(start..start + span.len as usize);
            self.write_span(span, bytes, fua)
        });
        for r in futures::future::join_all(writes).await {
            r?;
        }
        Ok(())
    }

    /// Writes one stripe's part (`data` holds exactly its bytes).
    async fn write_span(&self, span: StripeSpan, data: Bytes, fua: bool) -> Result<(), IoError> {
        let _lock = self.locks.lock(span.stripe.number()).await;
        loop {
            if self.is_failed() {
                return Err(self.failed_error("write"));
            }
            let plan = self.plan(&span);
            let prepared = match self.prepare(plan, &span, &data).await {
                Ok(w) => w,
                Err(Interrupted::Replan) => continue,
                Err(Interrupted::Fail(e)) => return Err(e),
            };
            let _logged = match &self.log {
                Some(log) => Some(
                    log.write(
                        self,
                        span.stripe.number()..span.stripe.number() + 1,
                        Some(&span),
                        self.log_entries(plan, &span, &data, &prepared.parity),
                    )
                    .await?,
                ),
                None => None,
            };
            return self.commit(prepared.writes, fua).await;
        }
    }

    /// Picks the plan with the fewest member reads (md's
    /// `handle_stripe_dirtying`).
    fn plan(&self, span: &StripeSpan) -> Plan {
        if span.is_full() {
            return Plan::Full;
        }
        let s = span.stripe;
        if s.members().any(|m| !self.members[m].readable()) {
            return Plan::Degraded;
        }
        if self.meta.resync_pending(s.member_offset(0)) {
            return Plan::ReconstructWrite;
        }
        let k = s.data_chunks();
        let parity = self.layout.level().parity_chunks();
        let ranges: Vec<_> = span.parity_ranges().collect();
        let rmw = span.chunks().len() + parity * ranges.len();
        let rcw: usize = ranges
            .iter()
            .map(|r| {
                (0..k)
                    .filter(|&j| {
                        !span.chunks().any(|c| {
                            c.index == j && c.in_chunk <= r.start && c.in_chunk + c.len >= r.end
                        })
                    })
                    .count()
            })
            .sum();
        if rmw < rcw {
            Plan::ReadModifyWrite
        } else {
            Plan::ReconstructWrite
        }
    }

    /// Reads what the plan needs and returns the member writes to issue.
    async fn prepare(
        &self,
        plan: Plan,
        span: &StripeSpan,
        data: &Bytes,
    ) -> Result<Prepared, Interrupted> {
        let s = span.stripe;
        let redundancy = self.redundancy()?;
        let k = s.data_chunks();
        let chunk = self.layout.chunk();
        // New data of every touched chunk, zero-copy slices of the payload.
        let mut writes: Vec<MemberWrite> = span
            .chunks()
            .map(|c| {
                let rel = (c.buf_offset - span.buf_offset) as usize;
                (
                    c.member,
                    c.member_offset,
                    data.slice(rel..rel + c.len as usize),
                )
            })
            .collect();
        let mut parity: Vec<ParityRange> = Vec::with_capacity(2);
        let mut parity_out = |range: std::ops::Range<u64>, p: IoBuf, q: Option<IoBuf>| {
            parity.push((range, Bytes::from_owner(p), q.map(Bytes::from_owner)));
        };
        match plan {
            Plan::Full => {
                let cols: Vec<Bytes> = (0..k)
                    .map(|i| data.slice(i * chunk as usize..(i + 1) * chunk as usize))
                    .collect();
                let (p, q) = self.parity_of(redundancy, &cols, chunk as usize)?;
                parity_out(0..chunk, p, q);
            }
            Plan::ReadModifyWrite => {
                for range in span.parity_ranges() {
                    let (mut p, mut q) = self.read_parity(span, range.clone()).await?;
                    for c in span.chunks() {
                        if c.in_chunk < range.start || c.in_chunk + c.len > range.end {
                            continue;
                        }
                        let old = self.read_member(c.member, c.member_offset, c.len).await?;
                        let rel = (c.buf_offset - span.buf_offset) as usize;
                        let new = &data[rel..rel + c.len as usize];
                        let at = (c.in_chunk - range.start) as usize;
                        let n = c.len as usize;
                        match q.as_mut() {
                            None => parity::update_p(&mut p[at..at + n], &old, new),
                            Some(q) => parity::update_pq(
                                c.index,
                                &mut p[at..at + n],
                                &mut q[at..at + n],
                                &old,
                                new,
                            ),
                        }
                        .map_err(|e| parity_err(&self.name, e))?;
                    }
                    parity_out(range, p, q);
                }
            }
            Plan::ReconstructWrite | Plan::Degraded => {
                for range in span.parity_ranges() {
                    let mut cols = if plan == Plan::Degraded {
                        let mut all = self.read_column(s.number(), range.clone()).await?;
                        all.truncate(k);
                        all
                    } else {
                        self.read_data_column(span, range.clone()).await?
                    };
                    // Lay the new data over the old column.
                    for o in span.overlaps(range.clone()) {
                        cols[o.index][o.at..o.at + o.len]
                            .copy_from_slice(&data[o.data..o.data + o.len]);
                    }
                    let len = (range.end - range.start) as usize;
                    let (p, q) = self.parity_of(redundancy, &cols, len)?;
                    parity_out(range, p, q);
                }
            }
        }
        for (range, p, q) in &parity {
            let off = s.member_offset(range.start);
            writes.push((s.p_member(), off, p.clone()));
            if let (Some(qm), Some(q)) = (s.q_member(), q) {
                writes.push((qm, off, q.clone()));
            }
        }
        Ok(Prepared { writes, parity })
    }

    /// The log entries of a stripe write (see [`super::log`]): partial
    /// parity for the P member (and the Q member), or, for a full-stripe
    /// write, "recompute from the data". Members that are not written get
    /// none.
    fn log_entries(
        &self,
        plan: Plan,
        span: &StripeSpan,
        data: &[u8],
        parity: &[ParityRange],
    ) -> Vec<log::Entry> {
        let s = span.stripe;
        let mut out = Vec::with_capacity(2);
        let targets = [(Some(s.p_member()), false), (s.q_member(), true)];
        for (member, q) in targets {
            let Some(slot) = member.filter(|&m| self.members[m].writable()) else {
                continue;
            };
            if plan == Plan::Full {
                out.push(log::Entry::new(slot, EntryKind::Recompute, 0));
                continue;
            }
            let kind = if q {
                EntryKind::PartialQ
            } else {
                EntryKind::PartialP
            };
            let len = parity
                .iter()
                .map(|(r, ..)| (r.end - r.start) as usize)
                .sum();
            let mut entry = log::Entry::new(slot, kind, len);
            for (range, p, qb) in parity {
                let Some(par) = (if q { qb.as_ref() } else { Some(p) }) else {
                    continue;
                };
                log::take_out_new_data(entry.append(par), span, data, range, q);
            }
            out.push(entry);
        }
        out
    }

    /// Computes P (and Q) of `cols` into pooled buffers of `len` bytes.
    pub(super) fn parity_of<D: AsRef<[u8]>>(
        &self,
        redundancy: Redundancy,
        cols: &[D],
        len: usize,
    ) -> Result<(IoBuf, Option<IoBuf>), IoError> {
        let mut p = self.buffer(len);
        match redundancy {
            Redundancy::P => {
                parity::gen_p(cols, &mut p).map_err(|e| parity_err(&self.name, e))?;
                Ok((p, None))
            }
            Redundancy::PQ => {
                let mut q = self.buffer(len);
                parity::gen_pq(cols, &mut p, &mut q).map_err(|e| parity_err(&self.name, e))?;
                Ok((p, Some(q)))
            }
        }
    }

    /// Reads `len` bytes at member offset `offset` of member `slot` for a
    /// plan; a member failure asks for a new plan.
    async fn read_member(&self, slot: usize, offset: u64, len: u64) -> Result<IoBuf, Interrupted> {
        let buf = self.buffer(len as usize);
        match self.members[slot].read(offset, buf).await {
            Ok(b) => Ok(b),
            Err((e, _)) => Err(self.interrupted(e).await),
        }
    }

    async fn interrupted(&self, e: MemberError) -> Interrupted {
        if self.handle(&e).await {
            Interrupted::Replan
        } else {
            Interrupted::Fail(self.io_error("write", &e))
        }
    }

    /// Reads P (and Q) of `span`'s stripe over `range`.
    async fn read_parity(
        &self,
        span: &StripeSpan,
        range: std::ops::Range<u64>,
    ) -> Result<(IoBuf, Option<IoBuf>), Interrupted> {
        let s = span.stripe;
        let off = s.member_offset(range.start);
        let len = range.end - range.start;
        let p = self.read_member(s.p_member(), off, len);
        match s.q_member() {
            None => Ok((p.await?, None)),
            Some(qm) => {
                let q = self.read_member(qm, off, len);
                let (p, q) = futures::join!(p, q);
                Ok((p?, Some(q?)))
            }
        }
    }

    /// Reads the old data column over `range` for a reconstruct-write:
    /// every data chunk not entirely overwritten there.
    async fn read_data_column(
        &self,
        span: &StripeSpan,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<IoBuf>, Interrupted> {
        let s = span.stripe;
        let len = range.end - range.start;
        let off = s.member_offset(range.start);
        let reads = (0..s.data_chunks()).map(|j| {
            let covered = span.chunks().any(|c| {
                c.index == j && c.in_chunk <= range.start && c.in_chunk + c.len >= range.end
            });
            let member = s.data_member(j).unwrap_or(0);
            async move {
                if covered {
                    // Entirely replaced by new data below.
                    Ok(self.buffer(len as usize))
                } else {
                    self.read_member(member, off, len).await
                }
            }
        });
        let mut out = Vec::with_capacity(s.data_chunks());
        let mut replan = None;
        for r in futures::future::join_all(reads).await {
            match r {
                Ok(b) => out.push(b),
                Err(i) => {
                    replan.get_or_insert(i);
                }
            }
        }
        match replan {
            Some(i) => Err(i),
            None => Ok(out),
        }
    }

    /// Issues a plan's writes to the writable members; fails those that
    /// fail (recorded before returning), and succeeds while the level
    /// still holds every byte.
    async fn commit(&self, writes: Vec<MemberWrite>, fua: bool) -> Result<(), IoError> {
        let issued = writes
            .into_iter()
            .filter(|(m, _, _)| self.members[*m].writable())
            .map(|(m, off, bytes)| self.members[m].write(off, bytes, fua));
        let mut refused = None;
        for r in futures::future::join_all(issued).await {
            if let Err(e) = r
                && !self.handle(&e).await
            {
                refused.get_or_insert(e);
            }
        }
        if let Some(e) = refused {
            return Err(self.io_error("write", &e));
        }
        if self.is_failed() {
            return Err(self.failed_error("write"));
        }
        Ok(())
    }

    /// TRIM or WRITE_ZEROES on RAID 5/6 (see the `write` module docs).
    pub(crate) async fn discard_parity(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        trim: bool,
    ) -> Result<(), IoError> {
        let op = if trim { "trim" } else { "write_zeroes" };
        let Some(sd) = self.layout.stripe_data_bytes() else {
            return Err(IoError::Invalid(format!("{}: no stripes", self.name)));
        };
        let end = offset + len;
        let first_full = offset.div_ceil(sd);
        let end_full = end / sd;
        let _intent = self
            .meta
            .begin_write(self, self.rows_of(offset, len))
            .await?;
        if first_full >= end_full {
            // No whole stripe: a partial one (or two).
            return if trim {
                Ok(())
            } else {
                self.write_zero_data(offset, len, fua).await
            };
        }
        if !trim && offset < first_full * sd {
            self.write_zero_data(offset, first_full * sd - offset, fua)
                .await?;
        }
        let chunk = self.layout.chunk();
        // Whole stripes, a batch at a time under their locks.
        const BATCH: u64 = 256;
        let mut s = first_full;
        while s < end_full {
            let batch_end = (s + BATCH).min(end_full);
            let _locks = self.locks.lock_all(s..batch_end).await;
            let _logged = match &self.log {
                Some(log) => {
                    let entries = (0..self.members.len())
                        .filter(|&m| self.members[m].writable())
                        .map(|slot| log::Entry::new(slot, EntryKind::Recompute, 0))
                        .collect();
                    Some(log.write(self, s..batch_end, None, entries).await?)
                }
                None => None,
            };
            let (m_off, m_len) = (s * chunk, (batch_end - s) * chunk);
            let ops = self
                .members
                .iter()
                .filter(|m| m.writable())
                .map(|m| m.write_zeroes(m_off, m_len, no_hole, fua));
            for r in futures::future::join_all(ops).await {
                if let Err(e) = r
                    && !self.handle(&e).await
                {
                    return Err(self.io_error(op, &e));
                }
            }
            if self.is_failed() {
                return Err(self.failed_error(op));
            }
            s = batch_end;
        }
        if !trim && end > end_full * sd {
            self.write_zero_data(end_full * sd, end - end_full * sd, fua)
                .await?;
        }
        Ok(())
    }
}
