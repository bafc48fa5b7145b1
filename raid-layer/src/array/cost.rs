//! The array's cost: its own buffers, plus what each request costs its
//! members by their published models, and the composed model the array
//! publishes to the layer above.
//!
//! # The composition rule
//! A request's cost is `own(op, len) + Σ_members member_cost`, where a
//! member's cost is its published model applied to the sub-requests the
//! array may send it for this request ([`ArrayInner::member_needs`]):
//!
//! - READ: the member holding each piece (RAID 0, RAID 5/6 data chunk);
//!   every readable copy (RAID 1/10: the copy read is chosen at read time);
//!   for a RAID 5/6 chunk whose member is out of sync, every other member
//!   of the stripe (reconstruction).
//! - WRITE: every writable location of each piece (RAID 0/1/10); for RAID
//!   5/6, every writable member of each touched stripe, a read and a write
//!   over the changed range (this covers read-modify-write,
//!   reconstruct-write and the degraded plan); a full stripe only writes.
//! - FLUSH, TRIM, WRITE_ZEROES: every writable member; RAID 5/6 zeroes of
//!   partial stripes as writes of two stripes.
//!
//! The published model is an upper bound of that for every request of a
//! length (`tests`: random requests never exceed it), using the largest
//! member model, and is recomputed when a member's model changes or the
//! array turns degraded (a degraded array's reads cost more).

use nbdraid_engine::cost::{CostModel, OpCost, PER_BYTE_ONE};
use nbdraid_engine::device::OpKind;

use super::ArrayInner;
use super::grants::Needs;
use crate::layout::Level;

/// Adds `units` to `slot`'s need.
fn add(needs: &mut Needs, slot: usize, units: u64) {
    match needs.iter_mut().find(|(s, _)| *s == slot) {
        Some((_, u)) => *u = u.saturating_add(units),
        None => needs.push((slot, units)),
    }
}

/// TRIM and WRITE_ZEROES travel in pieces of at most this (the client splits).
const ZERO_PIECE: u64 = 1 << 30;

/// `num/den` units per byte in 16.16 fixed point, rounded up.
fn ratio(num: u64, den: u64) -> u64 {
    (num.saturating_mul(PER_BYTE_ONE)).div_ceil(den.max(1))
}

/// The array's own buffers per request, an upper bound over every plan:
/// what the array's throttle charges (the members' part is accounted in
/// their grants).
///
/// - READ: the reply buffer, a buffer per piece when the request spans
///   chunks, and for RAID 5/6 the reconstruction of the pieces on a
///   member out of sync (the whole column of each: `n/k` per byte), plus
///   two edge columns.
/// - WRITE: the payload; RAID 5/6 whole stripes add parity (`p/k` per
///   byte); the partial stripes at either end may need a full column,
///   parity, the old data and the log entries (`n + 3 + 2p` chunks each);
///   members with a block
///   size above one byte may widen a write by two blocks.
/// - WRITE_ZEROES on RAID 5/6: partial stripes are written as zero data, a
///   MiB at a time through the write path.
pub fn own_cost_model(layer: &str, level: Level, n: u64, chunk: u64) -> CostModel {
    let base = nbdraid_engine::cost::BASE_COST;
    let chunk = chunk.max(1);
    let data = |p: u64| n.saturating_sub(p).max(1);
    let (read, write, zeroes) = match level.redundancy() {
        Some(r) => {
            let p = r.parity_chunks() as u64;
            let k = data(p);
            let edges = 2 * edge_chunks(n, p) * chunk;
            (
                OpCost {
                    base: base + edges,
                    per_byte: 2 * PER_BYTE_ONE + ratio(n, k),
                },
                OpCost {
                    base: base + edges + 2 * 4096,
                    per_byte: PER_BYTE_ONE + ratio(p, k),
                },
                OpCost {
                    // One MiB of zeroes at a time, with that write's own cost.
                    base: base + (1 << 20) + (n + 3) * (1 << 20) + edges,
                    per_byte: 0,
                },
            )
        }
        None => (
            OpCost {
                base,
                per_byte: 2 * PER_BYTE_ONE,
            },
            OpCost {
                base: base + 2 * 4096,
                per_byte: PER_BYTE_ONE,
            },
            OpCost { base, per_byte: 0 },
        ),
    };
    CostModel::buffers(layer)
        .with_op(OpKind::Read, read)
        .with_op(OpKind::Write, write)
        .with_op(OpKind::WriteZeroes, zeroes)
}

/// The chunks of buffers one partial stripe of a RAID 5/6 write may hold:
/// the column (`n`), parity and old data (3), and the partial-parity log
/// entries it writes (their payload and its encoded copy, 2 per parity
/// chunk `p`).
fn edge_chunks(n: u64, p: u64) -> u64 {
    n + 3 + 2 * p
}

/// The array's own units for one request: `model` (its published own
/// model) with the edge allowance cut to the request. A partial stripe's
/// column, parity and old data are never wider than the bytes the request
/// touches in it (a member's block widening is the model's base allowance
/// already), so small requests are not charged whole chunks. Never above
/// `model.cost(op, len)`.
pub fn own_cost(model: &CostModel, level: Level, n: u64, chunk: u64, op: OpKind, len: u64) -> u64 {
    let full = model.cost(op, len);
    if level.redundancy().is_none() || !matches!(op, OpKind::Read | OpKind::Write) {
        return full;
    }
    let p = level.redundancy().map_or(0, |r| r.parity_chunks() as u64);
    let per = 2 * edge_chunks(n, p);
    let width = len.min(chunk);
    full.saturating_sub(per.saturating_mul(chunk))
        .saturating_add(per.saturating_mul(width))
}

impl ArrayInner {
    /// Returns the units each member's grant must hold for a request.
    pub fn member_needs(&self, op: OpKind, offset: u64, len: u64) -> Needs {
        let mut needs = Needs::new();
        let level = self.layout.level();
        let cost = |slot: usize, op: OpKind, n: u64| self.members[slot].model_guard().cost(op, n);
        match op {
            OpKind::Read | OpKind::Write => {
                if level.redundancy().is_some() && op == OpKind::Write {
                    let Ok(spans) = self.layout.stripes(offset, len) else {
                        return needs;
                    };
                    for span in spans {
                        let w: u64 = span.parity_ranges().map(|r| r.end - r.start).sum();
                        // A full stripe is written without reading; a
                        // partial one may read as much as it writes (RMW or
                        // reconstruct-write) at any member.
                        let full = span.is_full();
                        for m in span
                            .stripe
                            .members()
                            .filter(|&m| self.members[m].writable())
                        {
                            let read = if full { 0 } else { cost(m, OpKind::Read, w) };
                            add(&mut needs, m, read + cost(m, OpKind::Write, w));
                        }
                        // The partial-parity log's entries: a header
                        // block, and the partial parity for a partial stripe.
                        if self.log.is_some() {
                            let entry = crate::meta::log::LOG_BLOCK + if full { 0 } else { w };
                            let parity = [Some(span.stripe.p_member()), span.stripe.q_member()];
                            for m in parity.into_iter().flatten() {
                                if self.members[m].writable() {
                                    add(&mut needs, m, cost(m, OpKind::Write, entry));
                                }
                            }
                        }
                    }
                    return needs;
                }
                let Ok(pieces) = self.layout.map(offset, len) else {
                    return needs;
                };
                for p in pieces {
                    if level.redundancy().is_some() {
                        // A RAID 5/6 read.
                        let loc = p.locations.first();
                        if self.members[loc.member].readable() {
                            add(&mut needs, loc.member, cost(loc.member, op, p.len));
                        } else if let crate::layout::Unit::Data { stripe, .. } = p.unit
                            && let Some(s) = self.layout.stripe(stripe)
                        {
                            for m in s.members().filter(|&m| self.members[m].readable()) {
                                add(&mut needs, m, cost(m, op, p.len));
                            }
                        }
                        continue;
                    }
                    for l in p.locations.iter() {
                        let member = &self.members[l.member];
                        let usable = if op == OpKind::Read {
                            member.readable()
                        } else {
                            member.writable()
                        };
                        if usable {
                            add(&mut needs, l.member, cost(l.member, op, p.len));
                        }
                    }
                }
            }
            OpKind::Flush | OpKind::Trim | OpKind::WriteZeroes => {
                let pieces = len.div_ceil(ZERO_PIECE).max(1);
                for m in self.members.iter().filter(|m| m.writable()) {
                    let mut units = cost(m.slot, op, 0).saturating_mul(pieces);
                    if op == OpKind::WriteZeroes && level.redundancy().is_some() {
                        // Partial stripes at either end are written as data.
                        let w = 2 * self.layout.chunk();
                        units = units
                            .saturating_add(cost(m.slot, OpKind::Read, w))
                            .saturating_add(cost(m.slot, OpKind::Write, w));
                    }
                    add(&mut needs, m.slot, units);
                }
            }
            OpKind::BlockStatus => {
                for m in self.members.iter().filter(|m| m.readable()) {
                    add(&mut needs, m.slot, cost(m.slot, op, 0).saturating_mul(64));
                }
            }
            OpKind::Cache => {}
        }
        needs
    }

    /// Returns the model the array publishes: `own` plus an upper bound of
    /// what any request costs its members (the composition rule above).
    pub fn composed_model(&self, own: &CostModel) -> CostModel {
        let n = self.members.len() as u64;
        let g = self.layout.geometry();
        let level = g.level;
        // The largest member cost per operation.
        let max = |op: OpKind| {
            self.members.iter().fold(OpCost::default(), |acc, m| {
                let c = m.model_guard().op(op);
                OpCost {
                    base: acc.base.max(c.base),
                    per_byte: acc.per_byte.max(c.per_byte),
                }
            })
        };
        let (r, w) = (max(OpKind::Read), max(OpKind::Write));
        let chunk = g.chunk.max(1);
        let copies = match level {
            Level::Raid1 => n,
            Level::Raid10 => g.copies as u64,
            _ => 1,
        };
        // Pieces of a request of `len`: at most len/chunk + 2 (RAID 1: 1).
        let per_piece = |c: OpCost, times: u64| {
            let per_byte = if level == Level::Raid1 {
                c.per_byte.saturating_mul(times)
            } else {
                c.per_byte
                    .saturating_add(c.base.saturating_mul(PER_BYTE_ONE) / chunk)
                    .saturating_mul(times)
            };
            OpCost {
                base: c.base.saturating_mul(2).saturating_mul(times),
                per_byte,
            }
        };
        let degraded_parity = level.redundancy().is_some() && self.is_degraded();
        let read = if degraded_parity {
            // Reconstruction reads every other member of the stripe.
            per_piece(r, n)
        } else {
            per_piece(r, copies)
        };
        let write = if level.redundancy().is_some() {
            // Every member of each stripe, a read and a write of the changed
            // range (Σ over stripes ≤ len), two sub-requests per stripe, at
            // most len/stripe + 2 stripes.
            let sd = self.layout.stripe_data_bytes().unwrap_or(chunk).max(1);
            let rw = OpCost {
                base: r.base.saturating_add(w.base),
                per_byte: r.per_byte.saturating_add(w.per_byte),
            };
            OpCost {
                base: rw.base.saturating_mul(2 * n),
                per_byte: rw
                    .per_byte
                    .saturating_add(rw.base.saturating_mul(PER_BYTE_ONE) / sd)
                    .saturating_mul(n),
            }
        } else {
            per_piece(w, copies)
        };
        let all = |op: OpKind, extra: OpCost| {
            let c = max(op);
            OpCost {
                base: c.base.saturating_mul(n).saturating_add(extra.base),
                per_byte: extra.per_byte,
            }
        };
        // TRIM and WRITE_ZEROES: a base per member per GiB piece.
        let per_gib = |op: OpKind| {
            let c = max(op);
            c.base.saturating_mul(n).saturating_mul(PER_BYTE_ONE) / ZERO_PIECE + 1
        };
        let zero_extra = if level.redundancy().is_some() {
            let w2 = 2 * chunk;
            let rw = r.cost(w2).saturating_add(w.cost(w2));
            OpCost {
                base: rw.saturating_mul(n),
                per_byte: per_gib(OpKind::WriteZeroes),
            }
        } else {
            OpCost {
                base: 0,
                per_byte: per_gib(OpKind::WriteZeroes),
            }
        };
        let trim_extra = OpCost {
            base: 0,
            per_byte: per_gib(OpKind::Trim),
        };
        let bs = max(OpKind::BlockStatus);
        let member_part = [
            (OpKind::Read, read),
            (OpKind::Write, write),
            (OpKind::Flush, all(OpKind::Flush, OpCost::default())),
            (OpKind::Trim, all(OpKind::Trim, trim_extra)),
            (OpKind::WriteZeroes, all(OpKind::WriteZeroes, zero_extra)),
            (OpKind::Cache, OpCost::default()),
            (
                OpKind::BlockStatus,
                OpCost {
                    base: bs.base.saturating_mul(64).saturating_mul(n),
                    per_byte: 0,
                },
            ),
        ];
        let mut out = own.clone();
        for (op, extra) in member_part {
            out = out.with_op(op, own.op(op).plus(extra));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cost_cuts_the_edge_allowance_to_small_requests() {
        let chunk = 64 << 10;
        let model = own_cost_model("t", Level::Raid5, 4, chunk);
        let mut len = 1u64;
        while len <= 64 << 20 {
            for op in [OpKind::Read, OpKind::Write, OpKind::Flush] {
                let c = own_cost(&model, Level::Raid5, 4, chunk, op, len);
                assert!(c <= model.cost(op, len), "{op:?} {len}");
                assert!(
                    c >= len.min(1 << 30) || op == OpKind::Flush,
                    "{op:?} {len}: {c}"
                );
            }
            len = len * 3 + 1;
        }
        let small = own_cost(&model, Level::Raid5, 4, chunk, OpKind::Write, 4096);
        assert!(
            small * 8 < model.cost(OpKind::Write, 4096),
            "a 4 KiB write is charged {small}, the model {}",
            model.cost(OpKind::Write, 4096)
        );
        let raid1 = own_cost_model("t", Level::Raid1, 2, chunk);
        assert_eq!(
            own_cost(&raid1, Level::Raid1, 2, chunk, OpKind::Write, 4096),
            raid1.cost(OpKind::Write, 4096)
        );
    }
}
