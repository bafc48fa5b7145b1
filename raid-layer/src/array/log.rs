//! The partial-parity log (RAID 5/6): what closes the write hole.
//!
//! Before a stripe write issues any data or parity write, it writes a log
//! entry (FUA) to the stripe's P member, and for RAID 6 another to its Q
//! member: the partial parity of the chunks the write leaves unchanged
//! (see [`crate::meta::log`] for the format and the algebra), or for a
//! full-stripe write and zeroed stripes an entry that says "recompute
//! from the data". After a crash, assembly replays the newest entry of
//! every stripe whose write may not have completed, on the surviving
//! members, so parity agrees with what the members hold *before* a
//! missing member's data is ever reconstructed from it: a dirty, degraded
//! RAID 5/6 array starts without being forced, and never returns wrong
//! data for a write that was acknowledged and flushed.
//!
//! # The rings
//! Each member's journal area is a ring of 4 KiB blocks. An entry's space
//! is taken (on every member it goes to, in one step under one lock, with
//! its sequence number) and given back only once every write numbered
//! below it is complete *and* flushed on every member (the durable
//! watermark, which every entry records): until then a crash or a power
//! loss may still need it. A writer that finds no space flushes the
//! members itself (one flush at a time) and waits. A writer waiting for
//! space holds no sequence number, so the watermark never waits for it,
//! and one holding space never waits for anything of the log's again:
//! this cannot deadlock.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;
use nbdraid_engine::Error as IoError;
use uuid::Uuid;

use super::ArrayInner;
use crate::gf;
use crate::layout::StripeSpan;
use crate::meta::journal_range;
use crate::meta::log::{self as fmt, EntryHeader, EntryKind, LOG_BLOCK, Restore};
use crate::parity;

/// The largest chunk the log serves: an entry (a chunk of partial parity
/// and its header) must leave room for others in a 3 MiB ring.
pub const MAX_LOGGED_CHUNK: u64 = 1 << 20;

/// One member's ring: block positions count up forever (modulo the ring's
/// size on the member).
#[derive(Default)]
struct Ring {
    head: u64,
    /// Live entries in ring order: (sequence number, first block, end).
    live: VecDeque<(u64, u64, u64)>,
}

struct State {
    next_seq: u64,
    in_flight: BTreeSet<u64>,
    durable_below: u64,
    rings: Vec<Ring>,
}

impl State {
    fn completed_below(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next_seq)
    }

    fn reclaim(&mut self) {
        let durable = self.durable_below;
        for r in &mut self.rings {
            while r.live.front().is_some_and(|e| e.0 < durable) {
                r.live.pop_front();
            }
        }
    }
}

/// The log of one array.
pub struct WriteLog {
    uuid: Uuid,
    /// The journal area's member (raw volume) offsets.
    area: Range<u64>,
    /// The ring's size in blocks.
    blocks: u64,
    state: Mutex<State>,
    space: tokio::sync::Notify,
    flushing: tokio::sync::Mutex<()>,
    /// Entries written, waits for ring space, flushes made for space.
    entries_total: metrics::Counter,
    waits_total: metrics::Counter,
    flushes_total: metrics::Counter,
}

/// Space taken for a write's entries.
struct Taken {
    seq: u64,
    durable_below: u64,
    /// Each entry's first block (a position counting up forever).
    at: Vec<u64>,
    /// A ring is over half full after this: time to flush.
    pressure: bool,
}

/// A stripe write's log entries, in flight: dropping it marks the write
/// complete (whether it succeeded or not: a failed write leaves its
/// members failed, or its parity for the resync to fix).
pub struct Logged<'a> {
    log: &'a WriteLog,
    seq: u64,
}

impl Drop for Logged<'_> {
    fn drop(&mut self) {
        let mut st = self.log.state.lock().unwrap_or_else(|e| e.into_inner());
        st.in_flight.remove(&self.seq);
    }
}

/// One entry to write: member slot, kind, and its bytes so far (a blank
/// header block, then the payload: see [`Entry::append`]).
pub struct Entry {
    /// The member it goes to.
    pub slot: usize,
    /// What recovery does with it.
    pub kind: EntryKind,
    /// A blank header block followed by the payload; sealed when written.
    bytes: Vec<u8>,
}

impl Entry {
    /// Returns an entry with no payload yet for member `slot`, with room
    /// for `payload` bytes.
    pub fn new(slot: usize, kind: EntryKind, payload: usize) -> Self {
        let mut bytes = Vec::with_capacity(LOG_BLOCK as usize + payload);
        bytes.resize(LOG_BLOCK as usize, 0);
        Self { slot, kind, bytes }
    }

    /// Appends `bytes` to the payload and returns them, in place, to be
    /// worked on there.
    pub fn append(&mut self, bytes: &[u8]) -> &mut [u8] {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        &mut self.bytes[at..]
    }

    fn payload_len(&self) -> usize {
        self.bytes.len() - LOG_BLOCK as usize
    }
}

/// What replaying the log did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Valid entries found on the members.
    pub entries: usize,
    /// Parity chunks rewritten from partial parity.
    pub partial: usize,
    /// Parity chunks recomputed from the data.
    pub recomputed: usize,
    /// Stripes left as they are because a chunk the entry needs is on a
    /// missing member (they held only the interrupted write's data).
    pub skipped: usize,
}

impl WriteLog {
    /// Returns the log of array `name` (`uuid`) over `members` members
    /// whose data starts at `data_offset`, `None` when there is no room for
    /// one (a journal area smaller than two of the largest entries).
    pub fn new(
        name: &str,
        uuid: Uuid,
        members: usize,
        data_offset: u64,
        chunk: u64,
    ) -> Option<Self> {
        let area = journal_range(data_offset);
        let blocks = (area.end - area.start) / LOG_BLOCK;
        if chunk > MAX_LOGGED_CHUNK || blocks < 2 * fmt::entry_blocks(chunk as usize) {
            return None;
        }
        // Sequence numbers go up across restarts too (microseconds since
        // the epoch), though assembly also clears the rings it has replayed.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .max(1);
        Some(Self {
            uuid,
            area,
            blocks,
            state: Mutex::new(State {
                next_seq: start,
                in_flight: BTreeSet::new(),
                durable_below: start,
                rings: (0..members).map(|_| Ring::default()).collect(),
            }),
            space: tokio::sync::Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            entries_total: metrics::counter!("nbdraid_array_log_entries_total", "array" => name.to_string()),
            waits_total: metrics::counter!("nbdraid_array_log_waits_total", "array" => name.to_string()),
            flushes_total: metrics::counter!("nbdraid_array_log_flushes_total", "array" => name.to_string()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the sequence number every write below which is complete,
    /// to be made durable by a flush of every member.
    pub fn completed_below(&self) -> u64 {
        self.lock().completed_below()
    }

    /// Records that every write below `seq` is durable (a flush of every
    /// member that started after [`WriteLog::completed_below`] returned
    /// it has completed), and gives their space back.
    pub fn durable(&self, seq: u64) {
        let mut st = self.lock();
        if seq > st.durable_below {
            st.durable_below = seq;
            st.reclaim();
            drop(st);
            self.space.notify_waiters();
        }
    }

    /// Takes space for `entries` (each `(slot, blocks)`) on every member at
    /// once, with a sequence number; `None` when they do not fit now.
    fn try_take(&self, entries: &[(usize, u64)]) -> Option<Taken> {
        // Space comes back in `durable`, the only place the watermark moves.
        let mut st = self.lock();
        let b = self.blocks;
        let mut at = Vec::with_capacity(entries.len());
        for &(slot, n) in entries {
            let r = st.rings.get(slot)?;
            let mut pos = r.head;
            if pos % b + n > b {
                pos = pos.div_ceil(b) * b;
            }
            let tail = r.live.front().map_or(r.head, |e| e.1);
            if pos + n - tail > b {
                return None;
            }
            at.push(pos);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.in_flight.insert(seq);
        let mut pressure = false;
        for (&(slot, n), &pos) in entries.iter().zip(&at) {
            if let Some(r) = st.rings.get_mut(slot) {
                r.head = pos + n;
                r.live.push_back((seq, pos, pos + n));
                let tail = r.live.front().map_or(r.head, |e| e.1);
                pressure |= 2 * (r.head - tail) > b;
            }
        }
        Some(Taken {
            seq,
            durable_below: st.durable_below,
            at,
            pressure,
        })
    }

    /// Writes `entries` for stripes `stripes` (a write's part `span`, or
    /// whole zeroed stripes), FUA, before the write issues anything else.
    /// A member whose entry write fails is failed (its parity is then not
    /// written either).
    pub async fn write<'a>(
        &'a self,
        array: &ArrayInner,
        stripes: Range<u64>,
        span: Option<&StripeSpan>,
        entries: Vec<Entry>,
    ) -> Result<Logged<'a>, IoError> {
        let sizes: Vec<(usize, u64)> = entries
            .iter()
            .map(|e| (e.slot, fmt::entry_blocks(e.payload_len())))
            .collect();
        let Taken {
            seq,
            durable_below,
            at,
            pressure,
        } = loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = self.try_take(&sizes) {
                break t;
            }
            self.waits_total.increment(1);
            match self.flushing.try_lock() {
                Ok(_flushing) => self.flush_for_space(array).await?,
                Err(_) => {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
                }
            }
        };
        let logged = Logged { log: self, seq };
        let writes = entries.into_iter().zip(at).map(|(mut e, pos)| {
            let header = EntryHeader {
                array_uuid: self.uuid,
                seq,
                durable_below,
                stripe: stripes.start,
                stripes: stripes.end - stripes.start,
                start: span.map_or(0, |s| s.start),
                len: span.map_or(0, |s| s.len),
                kind: e.kind,
                payload_len: e.payload_len() as u32,
            };
            fmt::seal(&mut e.bytes, &header);
            let bytes = Bytes::from(e.bytes);
            let offset = self.area.start + (pos % self.blocks) * LOG_BLOCK;
            let member = &array.members[e.slot];
            async move { member.write_raw(offset, bytes, true).await }
        });
        // A ring over half full: make what is complete durable now, beside
        // this entry's write, so that space comes back before a writer
        // has to wait for it (a flush takes about as long as the entry's
        // FUA write; one at a time).
        let early_flush = async {
            if pressure && let Ok(_flushing) = self.flushing.try_lock() {
                // A member that fails here is failed; the write sees it.
                let _ = self.flush_for_space(array).await;
            }
        };
        let (results, ()) = futures::join!(futures::future::join_all(writes), early_flush);
        for r in results {
            if let Err(e) = r
                && !array.handle(&e).await
            {
                return Err(array.io_error("write", &e));
            }
        }
        self.entries_total.increment(1);
        Ok(logged)
    }

    /// Makes what is complete durable, which gives its space back (every
    /// member flush advances the watermark: `ArrayInner::flush_members`).
    /// The caller holds `flushing`.
    async fn flush_for_space(&self, array: &ArrayInner) -> Result<(), IoError> {
        self.flushes_total.increment(1);
        array.flush_members().await
    }
}

/// Adds data chunk `index`'s bytes `src` into P bytes `dst` (XOR), or
/// into Q bytes when `q` (g^index times them): taking them out is the same.
fn fold(dst: &mut [u8], src: &[u8], index: usize, q: bool) {
    if q {
        gf::mul_slice_xor(parity::q_coefficient(index), src, dst);
    } else {
        gf::xor_slice(dst, src);
    }
}

/// Turns `parity`, a copy of `span`'s new parity (P, or Q when `q`)
/// over the in-chunk range `range`, into its partial parity in place: the
/// new data of every chunk the write changes there taken back out, which
/// leaves the parity of the chunks it does not change.
pub fn take_out_new_data(
    parity: &mut [u8],
    span: &StripeSpan,
    data: &[u8],
    range: &Range<u64>,
    q: bool,
) {
    for o in span.overlaps(range.clone()) {
        fold(
            &mut parity[o.at..o.at + o.len],
            &data[o.data..o.data + o.len],
            o.index,
            q,
        );
    }
}

impl ArrayInner {
    /// Replays the partial-parity log after a crash (assembly, before the
    /// array serves): reads every readable member's journal area, and for
    /// each stripe whose newest entries were not yet durable, rewrites P
    /// (and Q) so they agree with what the members hold. Ends with a flush.
    pub async fn replay_log(&self, uuid: Uuid, data_offset: u64) -> Result<ReplayReport, IoError> {
        let area = journal_range(data_offset);
        let len = (area.end - area.start) as usize;
        let mut areas = Vec::with_capacity(self.members.len());
        let mut found = Vec::with_capacity(self.members.len());
        for m in &self.members {
            if !m.readable() || len == 0 {
                areas.push(Vec::new());
                found.push(Vec::new());
                continue;
            }
            let bytes = match m
                .read_raw(area.start, nbdraid_client::IoBuf::zeroed(len))
                .await
            {
                Ok(b) => b.to_vec(),
                Err((e, _)) => {
                    self.handle(&e).await;
                    Vec::new()
                }
            };
            found.push(fmt::scan(&bytes, uuid));
            areas.push(bytes);
        }
        let mut report = ReplayReport {
            entries: found.iter().map(Vec::len).sum(),
            ..ReplayReport::default()
        };
        let work = fmt::select(&found);
        for (stripe, w) in work {
            let Some(s) = self.layout.stripe(stripe) else {
                continue;
            };
            let (p_restore, q_restore) = (w.p_restore(), w.q_restore());
            if p_restore == Some(Restore::Recompute) || q_restore == Some(Restore::Recompute) {
                if self.recompute_stripe(stripe).await? {
                    report.recomputed += 1;
                } else {
                    report.skipped += 1;
                }
            }
            for (restore, q, member) in [
                (p_restore, false, Some(s.p_member())),
                (q_restore, true, s.q_member()),
            ] {
                let (Some(Restore::Partial(slot, i)), Some(member)) = (restore, member) else {
                    continue;
                };
                let Some(f) = found.get(slot).and_then(|v| v.get(i)) else {
                    continue;
                };
                let payload = &areas[slot][f.payload.clone()];
                if self
                    .restore_partial(stripe, &f.header, payload, q, member)
                    .await?
                {
                    report.partial += 1;
                } else {
                    report.skipped += 1;
                }
            }
        }
        self.flush_members().await?;
        Ok(report)
    }

    /// Recomputes P (and Q) of stripe `stripe` from its data chunks;
    /// `false` when a data chunk is missing.
    async fn recompute_stripe(&self, stripe: u64) -> Result<bool, IoError> {
        let Some(s) = self.layout.stripe(stripe) else {
            return Ok(false);
        };
        let chunk = self.layout.chunk();
        let k = s.data_chunks();
        let mut cols = Vec::with_capacity(k);
        for j in 0..k {
            let Some(m) = s.data_member(j) else {
                return Ok(false);
            };
            if !self.members[m].readable() {
                return Ok(false);
            }
            match self.members[m]
                .read(s.member_offset(0), self.buffer(chunk as usize))
                .await
            {
                Ok(b) => cols.push(b),
                Err((e, _)) => {
                    self.handle(&e).await;
                    return Ok(false);
                }
            }
        }
        let redundancy = self.redundancy()?;
        let (p, q) = self.parity_of(redundancy, &cols, chunk as usize)?;
        let mut out = vec![(s.p_member(), Bytes::from_owner(p))];
        if let (Some(qm), Some(q)) = (s.q_member(), q) {
            out.push((qm, Bytes::from_owner(q)));
        }
        for (m, bytes) in out {
            if self.members[m].writable()
                && let Err(e) = self.members[m]
                    .write(s.member_offset(0), bytes, false)
                    .await
            {
                self.handle(&e).await;
            }
        }
        Ok(true)
    }

    /// Rewrites P (or Q, `q`) of `stripe` on `member` from the partial
    /// parity of the write `header` describes; `false` when a chunk the
    /// write changed is missing (or the entry does not fit the layout).
    async fn restore_partial(
        &self,
        stripe: u64,
        header: &EntryHeader,
        payload: &[u8],
        q: bool,
        member: usize,
    ) -> Result<bool, IoError> {
        let (Some(s), Some(sd)) = (self.layout.stripe(stripe), self.layout.stripe_data_bytes())
        else {
            return Ok(false);
        };
        if header.len == 0 || header.start.checked_add(header.len).is_none_or(|e| e > sd) {
            tracing::warn!(array = %self.name, stripe, "log entry does not fit the layout; ignored");
            return Ok(false);
        }
        let span = StripeSpan {
            stripe: s,
            start: header.start,
            len: header.len,
            buf_offset: 0,
        };
        let ranges: Vec<Range<u64>> = span.parity_ranges().collect();
        let want: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        if want != payload.len() as u64 {
            tracing::warn!(array = %self.name, stripe, "log entry's partial parity has the wrong length; ignored");
            return Ok(false);
        }
        if span.chunks().any(|c| !self.members[c.member].readable())
            || !self.members[member].writable()
        {
            return Ok(false);
        }
        let mut at = 0usize;
        for range in ranges {
            let n = (range.end - range.start) as usize;
            let mut out = payload[at..at + n].to_vec();
            at += n;
            for o in span.overlaps(range.clone()) {
                let cur = match self.members[o.member]
                    .read(o.member_offset, self.buffer(o.len))
                    .await
                {
                    Ok(b) => b,
                    Err((e, _)) => {
                        self.handle(&e).await;
                        return Ok(false);
                    }
                };
                fold(&mut out[o.at..o.at + o.len], &cur, o.index, q);
            }
            if let Err(e) = self.members[member]
                .write(s.member_offset(range.start), Bytes::from(out), false)
                .await
            {
                self.handle(&e).await;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Clears member `slot`'s journal area: at assembly (after a replay)
    /// on every writable member, so that entries of an earlier run are
    /// never replayed in a later one, and before a member is re-added or
    /// a new one rebuilt, so that it brings none.
    pub async fn clear_member_log(
        &self,
        slot: usize,
        data_offset: u64,
    ) -> Result<(), crate::member::MemberError> {
        let area = journal_range(data_offset);
        if area.is_empty() || self.layout.level().redundancy().is_none() {
            return Ok(());
        }
        let zeros = Bytes::from(vec![0u8; (area.end - area.start) as usize]);
        self.members[slot].write_raw(area.start, zeros, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Geometry, Layout, Level};

    const K: u64 = 4096;

    /// PP = the new parity with the new data taken out = the XOR (or Q
    /// sum) of the chunks the write leaves unchanged, at every byte; and
    /// PP with whatever the changed chunks hold gives consistent parity.
    #[test]
    fn partial_parity_is_the_parity_of_the_unchanged_chunks() {
        let layout = Layout::new(Geometry::new(Level::Raid6, 6, K, 64 * K)).unwrap();
        let k = 4usize;
        let chunk = K as usize;
        let old: Vec<Vec<u8>> = (0..k)
            .map(|j| (0..chunk).map(|x| (x * 31 + j * 7 + 1) as u8).collect())
            .collect();
        // A write from the middle of chunk 1 into chunk 2 (two ranges).
        let (start, len) = (K + 3000, 1500u64);
        let span = layout.stripes(start, len).unwrap().next().unwrap();
        let data: Vec<u8> = (0..len as usize).map(|x| (x * 13 + 5) as u8).collect();
        let mut new = old.clone();
        for c in span.chunks() {
            let rel = (c.buf_offset - span.buf_offset) as usize;
            new[c.index][c.in_chunk as usize..(c.in_chunk + c.len) as usize]
                .copy_from_slice(&data[rel..rel + c.len as usize]);
        }
        let (mut p, mut q) = (vec![0u8; chunk], vec![0u8; chunk]);
        parity::gen_pq(&new, &mut p, &mut q).unwrap();
        let (mut p_old, mut q_old) = (vec![0u8; chunk], vec![0u8; chunk]);
        parity::gen_pq(&old, &mut p_old, &mut q_old).unwrap();
        let ranges: Vec<Range<u64>> = span.parity_ranges().collect();
        assert_eq!(ranges.len(), 2);
        for r in &ranges {
            let (a, b) = (r.start as usize, r.end as usize);
            let (mut pp, mut pq) = (p[a..b].to_vec(), q[a..b].to_vec());
            take_out_new_data(&mut pp, &span, &data, r, false);
            take_out_new_data(&mut pq, &span, &data, r, true);
            // Recovery from the old bytes of the changed chunks (the
            // write never landed) gives the old parity, from the new ones
            // the new parity.
            for (cols, want_p, want_q) in [(&old, &p_old, &q_old), (&new, &p, &q)] {
                let (mut rp, mut rq) = (pp.clone(), pq.clone());
                for o in span.overlaps(r.clone()) {
                    let cur = &cols[o.index][a + o.at..a + o.at + o.len];
                    fold(&mut rp[o.at..o.at + o.len], cur, o.index, false);
                    fold(&mut rq[o.at..o.at + o.len], cur, o.index, true);
                }
                assert_eq!(rp, want_p[a..b]);
                assert_eq!(rq, want_q[a..b]);
            }
        }
    }

    #[test]
    fn ring_space_comes_back_only_when_durable() {
        // 3 MiB area: 768 blocks; entries of 257 blocks (a 1 MiB chunk).
        let log = WriteLog::new("t", Uuid::from_u128(1), 2, 4 << 20, 1 << 20).unwrap();
        let big = fmt::entry_blocks(1 << 20);
        assert_eq!(big, 257);
        let t1 = log.try_take(&[(0, big), (1, 1)]).unwrap();
        let (s1, d1, at1) = (t1.seq, t1.durable_below, t1.at);
        assert!(!t1.pressure, "257 of 768 blocks");
        let t2 = log.try_take(&[(0, big)]).unwrap();
        assert!(t2.pressure, "514 of 768 blocks");
        let s2 = t2.seq;
        assert_eq!(s2, s1 + 1);
        assert_eq!(d1, s1, "nothing is durable before the first write");
        // A third does not fit at the end of the ring (254 blocks left) and
        // wraps to the start, still held by the first.
        assert!(log.try_take(&[(0, big)]).is_none());
        assert_eq!(at1[0], 0);
        // Complete both; not yet durable: still no space.
        drop(Logged { log: &log, seq: s1 });
        drop(Logged { log: &log, seq: s2 });
        assert!(log.try_take(&[(0, big)]).is_none());
        // A flush that started after they completed makes them durable.
        let c = log.completed_below();
        assert_eq!(c, s2 + 1);
        log.durable(c);
        let t3 = log.try_take(&[(0, big)]).unwrap();
        let (s3, d3, at3) = (t3.seq, t3.durable_below, t3.at);
        assert_eq!(d3, s2 + 1);
        assert_eq!(s3, s2 + 1);
        assert_eq!(at3[0] % log.blocks, 0, "wrapped to the start");
        // In flight holds the watermark back.
        assert_eq!(log.completed_below(), s3);
        // A chunk over 1 MiB gets no log.
        assert!(WriteLog::new("t", Uuid::from_u128(1), 2, 4 << 20, 2 << 20).is_none());
        // Nor a data offset that leaves no journal area.
        assert!(WriteLog::new("t", Uuid::from_u128(1), 2, 1 << 20, 64 * K).is_none());
    }
}
