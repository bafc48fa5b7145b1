//! Reads: each piece of a request (the part inside one chunk) from one of
//! the members holding it.
//!
//! - RAID 0: the one member; losing it fails the array.
//! - RAID 1/10: the readable copy with the least work outstanding; if it
//!   fails, the member is failed and the next copy is tried.
//! - RAID 5/6: the data chunk's member; if it is out of sync or fails,
//!   the bytes are reconstructed from the rest of the stripe (under the
//!   stripe's lock, so parity and data are read at one point in time).
//!
//! A request inside one piece is read straight into the engine's buffer
//! (no copy); a request spanning pieces reads them concurrently into
//! pooled buffers and copies them into place.

use nbdraid_engine::Error as IoError;
use nbdraid_engine::buffer::IoBuf;

use super::ArrayInner;
use crate::layout::{Level, Piece, Unit};
use crate::member::MemberError;
use crate::parity;

impl ArrayInner {
    /// Fills `buf` from array offset `offset`.
    pub(crate) async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf, IoError> {
        if self.is_failed() {
            return Err(self.failed_error("read"));
        }
        let len = buf.len() as u64;
        let mut pieces = self
            .layout
            .map(offset, len)
            .map_err(|e| IoError::Invalid(format!("{}: {e}", self.name)))?;
        let Some(first) = pieces.next() else {
            return Ok(buf);
        };
        let rest: Vec<Piece> = pieces.collect();
        if rest.is_empty() {
            return self.read_piece(first, buf).await;
        }
        let all = std::iter::once(first).chain(rest);
        let reads = all.map(|p| async move {
            let piece_buf = self.buffer(p.len as usize);
            (p, self.read_piece(p, piece_buf).await)
        });
        for (p, r) in futures::future::join_all(reads).await {
            buf[p.buf_range()].copy_from_slice(&r?);
        }
        Ok(buf)
    }

    /// Reads one piece into `buf` (its length is the piece's).
    async fn read_piece(&self, piece: Piece, buf: IoBuf) -> Result<IoBuf, IoError> {
        match self.layout.level() {
            Level::Raid5 | Level::Raid6 => self.read_parity_piece(piece, buf).await,
            _ => self.read_copy(piece, buf).await,
        }
    }

    /// RAID 0/1/10: reads from the least loaded readable copy, failing over
    /// to the next when one fails. Where copies may still disagree (a
    /// region not yet resynced after a crash) every read goes to the first
    /// in-sync copy, the one the resync copies from, so a re-read never
    /// returns different data.
    async fn read_copy(&self, piece: Piece, mut buf: IoBuf) -> Result<IoBuf, IoError> {
        let unsynced = self.meta.resync_pending(piece.locations.first().offset);
        loop {
            let mut readable = piece
                .locations
                .iter()
                .filter(|l| self.members[l.member].readable());
            let best = if unsynced {
                readable.next()
            } else {
                readable.min_by_key(|l| self.members[l.member].outstanding())
            };
            let Some(loc) = best else {
                return Err(self.failed_error("read"));
            };
            match self.members[loc.member].read(loc.offset, buf).await {
                Ok(b) => return Ok(b),
                Err((e, back)) => {
                    if !self.handle(&e).await {
                        return Err(self.io_error("read", &e));
                    }
                    buf = back.unwrap_or_else(|| self.buffer(piece.len as usize));
                }
            }
        }
    }

    /// RAID 5/6: reads a data piece from its member, or reconstructs it.
    async fn read_parity_piece(&self, piece: Piece, buf: IoBuf) -> Result<IoBuf, IoError> {
        let Unit::Data { stripe, index } = piece.unit else {
            return Err(IoError::Invalid(format!(
                "{}: not a stripe data piece",
                self.name
            )));
        };
        let loc = piece.locations.first();
        let member = &self.members[loc.member];
        let mut buf = buf;
        if member.readable() {
            match member.read(loc.offset, buf).await {
                Ok(b) => return Ok(b),
                Err((e, back)) => {
                    if !self.handle(&e).await {
                        return Err(self.io_error("read", &e));
                    }
                    buf = back.unwrap_or_else(|| self.buffer(piece.len as usize));
                }
            }
        }
        // Re-admission at the degraded cost: the rest of the stripe is read.
        let _recon = self
            .recon
            .acquire(self.reconstruction_needs(stripe, piece.len))
            .await;
        let _lock = self.locks.lock(stripe).await;
        let range = piece.in_chunk..piece.in_chunk + piece.len;
        let mut column = self.read_column(stripe, range).await?;
        buf.copy_from_slice(&column.swap_remove(index));
        Ok(buf)
    }

    /// Returns what reconstructing `len` bytes of a chunk of `stripe` costs
    /// the members it reads (every other readable member of the stripe).
    fn reconstruction_needs(&self, stripe: u64, len: u64) -> super::Needs {
        let Some(s) = self.layout.stripe(stripe) else {
            return Vec::new();
        };
        s.members()
            .filter(|&m| self.members[m].readable())
            .map(|m| {
                let cost = self.members[m]
                    .model_guard()
                    .cost(nbdraid_engine::device::OpKind::Read, len);
                (m, cost)
            })
            .collect()
    }

    /// Reads byte range `range` (inside a chunk) of every chunk of stripe
    /// `stripe`, in chunk-index order `[D_0.., P, (Q)]`, reconstructing
    /// what members out of sync hold. The caller holds the stripe's lock.
    pub(crate) async fn read_column(
        &self,
        stripe: u64,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<IoBuf>, IoError> {
        let Some(s) = self.layout.stripe(stripe) else {
            return Err(IoError::Invalid(format!(
                "{}: no stripe {stripe}",
                self.name
            )));
        };
        let redundancy = self
            .layout
            .level()
            .redundancy()
            .ok_or_else(|| IoError::Invalid(format!("{}: no parity", self.name)))?;
        let len = (range.end - range.start) as usize;
        let offset = s.member_offset(range.start);
        let order: Vec<usize> = s.members().collect();
        loop {
            if self.is_failed() {
                return Err(self.failed_error("read"));
            }
            let missing: Vec<usize> = order
                .iter()
                .enumerate()
                .filter(|(_, m)| !self.members[**m].readable())
                .map(|(c, _)| c)
                .collect();
            if missing.len() > redundancy.parity_chunks() {
                return Err(self.failed_error("read"));
            }
            let reads = order.iter().enumerate().map(|(c, &m)| {
                let member = &self.members[m];
                let buf = self.buffer(len);
                let skip = missing.contains(&c);
                async move {
                    if skip {
                        return Ok(buf);
                    }
                    member.read(offset, buf).await.map_err(|(e, _)| e)
                }
            });
            let results = futures::future::join_all(reads).await;
            let mut failure: Option<MemberError> = None;
            let mut bufs = Vec::with_capacity(order.len());
            for r in results {
                match r {
                    Ok(b) => bufs.push(b),
                    Err(e) => {
                        if !e.is_failure() && !matches!(e, MemberError::Unavailable { .. }) {
                            return Err(self.io_error("read", &e));
                        }
                        failure.get_or_insert(e);
                        bufs.push(self.buffer(len));
                    }
                }
            }
            if let Some(e) = failure {
                // Fail it (recorded), then read the column again without it.
                self.handle(&e).await;
                continue;
            }
            if !missing.is_empty() {
                let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                parity::reconstruct(redundancy, &mut refs, &missing)
                    .map_err(|e| IoError::eio("reconstruct", &self.name, e.to_string()))?;
            }
            return Ok(bufs);
        }
    }
}
