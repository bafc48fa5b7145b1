//! Writes and the other modifying commands, and block status.
//!
//! Every write first has its rows' bits set in the write-intent bitmap
//! (durably, on every live member), so a crash or a member failure leaves
//! a record of where mirrors or parity may disagree.
//!
//! - RAID 0: each piece to its member; losing it fails the array.
//! - RAID 1/10: each piece to every writable copy, under the region's
//!   lock (so concurrent overlapping writes land in the same order on
//!   every copy). A copy that fails is failed (recorded in the
//!   superblocks) before the write is acknowledged; the write succeeds if
//!   any copy of every piece took it.
//! - RAID 5/6: see `parity_write`.
//!
//! TRIM and WRITE_ZEROES map to the members for RAID 0/1/10. For RAID 5/6
//! whole stripes are zeroed on every member (data, P and Q of zeroes are
//! all zeroes, so parity stays consistent); a TRIM of a partial stripe is
//! dropped (TRIM is advisory), WRITE_ZEROES of a partial stripe is a write
//! of zeroes through the parity path.

use bytes::Bytes;
use nbdraid_engine::Error as IoError;
use nbdraid_engine::device::Extent;
use nbdraid_proto::consts::allocation;

use super::ArrayInner;
use crate::layout::{Level, Piece};
use crate::member::MemberError;

/// The largest zero buffer written at once for partial-stripe zeroing.
const ZERO_PIECE: u64 = 1 << 20;

/// The most pieces (chunks) one BLOCK_STATUS reply covers.
const STATUS_PIECES: usize = 64;

impl ArrayInner {
    /// Returns the member-offset rows `[start, end)` a request touches,
    /// for the write-intent bitmap.
    pub(crate) fn rows_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let g = self.layout.geometry();
        let end = offset + len.max(1) - 1;
        let (first, last) = match g.level {
            Level::Raid1 => return offset..offset + len,
            Level::Raid0 => {
                let n = g.members as u64;
                (offset / g.chunk / n, end / g.chunk / n)
            }
            Level::Raid10 => {
                let (n, copies) = (g.members as u64, g.copies as u64);
                let (c0, c1) = (offset / g.chunk, end / g.chunk);
                (c0 * copies / n, (c1 * copies + copies - 1) / n)
            }
            Level::Raid5 | Level::Raid6 => {
                let sd = self.layout.stripe_data_bytes().unwrap_or(g.chunk);
                (offset / sd, end / sd)
            }
        };
        first * g.chunk..(last + 1) * g.chunk
    }

    /// Writes `data` at array offset `offset`.
    pub(crate) async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        if self.is_failed() {
            return Err(self.failed_error("write"));
        }
        let _intent = self
            .meta
            .begin_write(self, self.rows_of(offset, data.len() as u64))
            .await?;
        match self.layout.level() {
            Level::Raid5 | Level::Raid6 => self.write_parity(offset, data, fua).await,
            _ => self.write_copies(offset, data, fua).await,
        }
    }

    /// RAID 0/1/10 writes.
    async fn write_copies(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        let pieces: Vec<Piece> = self
            .layout
            .map(offset, len)
            .map_err(|e| IoError::Invalid(format!("{}: {e}", self.name)))?
            .collect();
        let _locks = if self.layout.level() == Level::Raid0 {
            Vec::new()
        } else {
            let keys = match self.layout.level() {
                Level::Raid1 => self.mirror_lock_keys(offset, len),
                _ => {
                    let chunk = self.layout.chunk();
                    offset / chunk..=(offset + len.max(1) - 1) / chunk
                }
            };
            self.locks.lock_all(keys).await
        };
        let writes = pieces.iter().map(|p| {
            let slice = data.slice(p.buf_range());
            async move {
                let targets: Vec<_> = p
                    .locations
                    .iter()
                    .filter(|l| self.members[l.member].writable())
                    .collect();
                let results = futures::future::join_all(
                    targets
                        .iter()
                        .map(|l| self.members[l.member].write(l.offset, slice.clone(), fua)),
                )
                .await;
                let ok = results.iter().filter(|r| r.is_ok()).count();
                (ok, results)
            }
        });
        let outcomes = futures::future::join_all(writes).await;
        let mut refused: Option<MemberError> = None;
        let mut all_pieces_written = true;
        for (ok, results) in outcomes {
            all_pieces_written &= ok > 0;
            for r in results {
                if let Err(e) = r
                    && !self.handle(&e).await
                {
                    refused.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(self.io_error("write", &e));
        }
        if !all_pieces_written || self.is_failed() {
            return Err(self.failed_error("write"));
        }
        Ok(())
    }

    /// TRIM (`trim`) or WRITE_ZEROES of `[offset, offset+len)`.
    pub(crate) async fn discard(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        trim: bool,
    ) -> Result<(), IoError> {
        if self.is_failed() {
            return Err(self.failed_error(if trim { "trim" } else { "write_zeroes" }));
        }
        match self.layout.level() {
            Level::Raid5 | Level::Raid6 => {
                self.discard_parity(offset, len, no_hole, fua, trim).await
            }
            _ => {
                let _intent = self
                    .meta
                    .begin_write(self, self.rows_of(offset, len))
                    .await?;
                self.discard_copies(offset, len, no_hole, fua, trim).await
            }
        }
    }

    async fn discard_copies(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        trim: bool,
    ) -> Result<(), IoError> {
        let op = if trim { "trim" } else { "write_zeroes" };
        let pieces: Vec<Piece> = self
            .layout
            .map(offset, len)
            .map_err(|e| IoError::Invalid(format!("{}: {e}", self.name)))?
            .collect();
        // Contiguous runs per member: RAID 1 is one piece; RAID 0/10 give
        // one piece per chunk, merged here so a huge request is a few
        // member requests, not one per chunk.
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        for p in &pieces {
            for l in p.locations.iter() {
                match runs
                    .iter_mut()
                    .find(|(m, start, n)| *m == l.member && *start + *n == l.offset)
                {
                    Some(run) => run.2 += p.len,
                    None => runs.push((l.member, l.offset, p.len)),
                }
            }
        }
        let ops = runs
            .iter()
            .filter(|(m, _, _)| self.members[*m].writable())
            .map(|&(m, start, n)| async move {
                let member = &self.members[m];
                if trim {
                    member.trim(start, n).await
                } else {
                    member.write_zeroes(start, n, no_hole, fua).await
                }
            });
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
        Ok(())
    }

    /// Writes zeroes through the normal write path, a bounded piece at a time.
    pub(crate) async fn write_zero_data(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), IoError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_PIECE);
            let mut buf = self.buffer(n as usize);
            buf.fill(0);
            self.write_parity(offset + done, Bytes::from_owner(buf), fua)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// BLOCK_STATUS from the members holding the data: a copy (RAID 1/10),
    /// the chunk (RAID 0), or the data chunk (RAID 5/6: reads come from
    /// there while it is in sync, so what it reads as is what the array
    /// reads as; parity never matters). A data chunk out of sync (a degraded
    /// RAID 5/6 read reconstructs) is reported as data, which is always
    /// correct.
    ///
    /// One reply covers up to [`STATUS_PIECES`] pieces (chunks), their
    /// members asked at once, so a client mapping an array of small chunks
    /// does not pay one round trip per chunk. The reply stops before the
    /// first piece whose member answered short or failed.
    pub(crate) async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, IoError> {
        if self.is_failed() {
            return Err(self.failed_error("block_status"));
        }
        let pieces: Vec<Piece> = self
            .layout
            .map(offset, len)
            .map_err(|e| IoError::Invalid(format!("{}: {e}", self.name)))?
            .take(STATUS_PIECES)
            .collect();
        let answers = futures::future::join_all(pieces.iter().map(|p| self.piece_status(p))).await;
        let max_extents = max_extents.max(1);
        let mut out: Vec<Extent> = Vec::new();
        'pieces: for (i, answer) in answers.into_iter().enumerate() {
            let (extents, whole) = match answer {
                Ok(a) => a,
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            };
            for e in extents {
                if let Some(last) = out.last_mut().filter(|l| l.flags == e.flags) {
                    last.len += e.len;
                } else if out.len() < max_extents {
                    out.push(e);
                } else {
                    break 'pieces;
                }
            }
            if !whole {
                break;
            }
        }
        if out.is_empty() {
            return Ok(vec![Extent { len, flags: 0 }]);
        }
        Ok(out)
    }

    /// The allocation of one piece, from its least loaded in-sync member:
    /// extents covering a prefix of the piece, and whether they cover all
    /// of it.
    async fn piece_status(&self, piece: &Piece) -> Result<(Vec<Extent>, bool), IoError> {
        let data = |len| Ok((vec![Extent { len, flags: 0 }], true));
        let Some(loc) = piece
            .locations
            .iter()
            .filter(|l| self.members[l.member].readable())
            .min_by_key(|l| self.members[l.member].outstanding())
        else {
            if matches!(self.layout.level(), Level::Raid5 | Level::Raid6) {
                return data(piece.len);
            }
            return Err(self.failed_error("block_status"));
        };
        let member = &self.members[loc.member];
        if !member.has_block_status() {
            return data(piece.len);
        }
        let extents = match member.block_status(loc.offset, piece.len).await {
            Ok(x) => x,
            // Advisory: an answer that all is data is always correct.
            Err(e) if !e.is_failure() => return data(piece.len),
            Err(e) => {
                self.handle(&e).await;
                return data(piece.len);
            }
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            let n = e.len.min(piece.len - covered);
            if n == 0 {
                break;
            }
            let flags = e.flags & (allocation::HOLE | allocation::ZERO);
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len += n,
                _ => out.push(Extent { len: n, flags }),
            }
            covered += n;
        }
        if out.is_empty() {
            return data(piece.len);
        }
        Ok((out, covered == piece.len))
    }
}

impl MemberError {
    /// Reports whether the member is gone (failed or unavailable).
    pub fn is_gone(&self) -> bool {
        !matches!(self, MemberError::Refused { .. })
    }
}
