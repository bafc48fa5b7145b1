//! The partial-parity log's on-member format (RAID 5/6), as pure code.
//!
//! Each member's journal area (1 MiB up to the data offset, see the
//! module table in [`crate::meta`]) is a ring of 4 KiB blocks holding log
//! entries. An entry is one header block and, for a partial write, the
//! partial parity over the changed in-chunk ranges, padded to whole
//! blocks. The header carries two crc32c checksums (its own and the
//! payload's), so a torn entry is simply not found.
//!
//! | bytes   | field                                                     |
//! |---------|-----------------------------------------------------------|
//! | 0..8    | magic `NBDRPPL1`                                          |
//! | 8..24   | array uuid                                                |
//! | 24..32  | sequence number (one per stripe write, increasing)       |
//! | 32..40  | durable-below: every write numbered below it was complete and flushed on every member when this entry was written |
//! | 40..48  | first stripe                                              |
//! | 48..56  | stripes covered (1, or a batch of zeroed stripes)        |
//! | 56..64  | start of the write in the stripe's data bytes             |
//! | 64..72  | length of the write                                       |
//! | 72      | kind: 0 recompute, 1 partial P, 2 partial Q               |
//! | 76..80  | payload length                                            |
//! | 80..84  | payload crc32c                                            |
//! | 84..88  | header crc32c (over bytes 0..84)                          |
//!
//! **Partial parity** (md's PPL): for a write that changes some data
//! chunks of a stripe, over every changed byte position `x`,
//! `PP[x] = ⊕ D_j[x]` over the data chunks `j` the write does *not* change
//! at `x` (and `PQ[x] = Σ g^j·D_j[x]` for RAID 6's Q). Whatever the crash
//! left of the changed chunks, `P = PP ⊕ (their current bytes)` is parity
//! consistent with what the members hold, and an unchanged chunk (the
//! acknowledged data at risk in the write hole) is then reconstructed
//! correctly from it. A full-stripe write or a batch of zeroed stripes
//! logs a *recompute* entry: parity from the data, if every data chunk is
//! still there (when one is not, the stripe held nothing but the
//! unacknowledged write).

use uuid::Uuid;

/// The size of a log block and of an entry's header (4 KiB).
pub const LOG_BLOCK: u64 = 4096;

const MAGIC: &[u8; 8] = b"NBDRPPL1";
const HEADER_CRC_AT: usize = 84;

/// What an entry asks recovery to do for its stripes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Recompute P (and Q) from the data.
    Recompute,
    /// `P = payload ⊕ the changed chunks' current bytes`.
    PartialP,
    /// `Q = payload ⊕ Σ g^i·(the changed chunks' current bytes)`.
    PartialQ,
}

impl EntryKind {
    fn code(self) -> u8 {
        match self {
            EntryKind::Recompute => 0,
            EntryKind::PartialP => 1,
            EntryKind::PartialQ => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => EntryKind::Recompute,
            1 => EntryKind::PartialP,
            2 => EntryKind::PartialQ,
            _ => return None,
        })
    }
}

/// A log entry's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    /// The array the entry belongs to.
    pub array_uuid: Uuid,
    /// Its sequence number.
    pub seq: u64,
    /// Every write numbered below this was complete and durable.
    pub durable_below: u64,
    /// The first stripe it covers.
    pub stripe: u64,
    /// The number of stripes it covers.
    pub stripes: u64,
    /// The write's start in the stripe's data bytes (partial entries).
    pub start: u64,
    /// The write's length (partial entries).
    pub len: u64,
    /// What recovery does.
    pub kind: EntryKind,
    /// The payload's length in bytes.
    pub payload_len: u32,
}

impl EntryHeader {
    /// Returns the blocks the entry takes: its header and its payload.
    pub fn blocks(&self) -> u64 {
        1 + u64::from(self.payload_len).div_ceil(LOG_BLOCK)
    }
}

/// Returns the blocks an entry with a payload of `payload_len` bytes takes.
pub fn entry_blocks(payload_len: usize) -> u64 {
    1 + (payload_len as u64).div_ceil(LOG_BLOCK)
}

/// Encodes `header` and `payload` as the entry's bytes (whole blocks).
/// `header.payload_len` is set from `payload`.
pub fn encode(header: &EntryHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; LOG_BLOCK as usize];
    out.extend_from_slice(payload);
    seal(&mut out, header);
    out
}

/// Makes `entry` (a header block, still blank, then the payload) a whole
/// entry in place: pads it to whole blocks and writes the header, with
/// `payload_len` and both checksums from the payload. Building the
/// payload right behind its header block spares the copy `encode` makes.
pub fn seal(entry: &mut Vec<u8>, header: &EntryHeader) {
    let b = LOG_BLOCK as usize;
    if entry.len() < b {
        entry.resize(b, 0);
    }
    let payload_len = entry.len() - b;
    let payload_crc = crc32c::crc32c(&entry[b..]);
    entry.resize((entry_blocks(payload_len) * LOG_BLOCK) as usize, 0);
    let out = &mut entry[..b];
    out.fill(0);
    out[0..8].copy_from_slice(MAGIC);
    out[8..24].copy_from_slice(header.array_uuid.as_bytes());
    out[24..32].copy_from_slice(&header.seq.to_le_bytes());
    out[32..40].copy_from_slice(&header.durable_below.to_le_bytes());
    out[40..48].copy_from_slice(&header.stripe.to_le_bytes());
    out[48..56].copy_from_slice(&header.stripes.to_le_bytes());
    out[56..64].copy_from_slice(&header.start.to_le_bytes());
    out[64..72].copy_from_slice(&header.len.to_le_bytes());
    out[72] = header.kind.code();
    out[76..80].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[80..84].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32c::crc32c(&out[..HEADER_CRC_AT]);
    out[84..88].copy_from_slice(&crc.to_le_bytes());
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Decodes the header in the first block of `block`, `None` unless it is
/// a whole, valid header (magic, known kind, checksum).
pub fn decode_header(block: &[u8]) -> Option<EntryHeader> {
    if block.len() < LOG_BLOCK as usize || &block[0..8] != MAGIC {
        return None;
    }
    if crc32c::crc32c(&block[..HEADER_CRC_AT]) != u32_at(block, HEADER_CRC_AT) {
        return None;
    }
    let uuid = Uuid::from_slice(&block[8..24]).ok()?;
    Some(EntryHeader {
        array_uuid: uuid,
        seq: u64_at(block, 24),
        durable_below: u64_at(block, 32),
        stripe: u64_at(block, 40),
        stripes: u64_at(block, 48),
        start: u64_at(block, 56),
        len: u64_at(block, 64),
        kind: EntryKind::from_code(block[72])?,
        payload_len: u32_at(block, 76),
    })
}

/// An entry found in a journal area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its header.
    pub header: EntryHeader,
    /// Its payload's byte range in the area that was scanned.
    pub payload: std::ops::Range<usize>,
}

/// Returns every whole, valid entry of array `uuid` in the journal area
/// `area` (headers and payloads checked), in area order.
pub fn scan(area: &[u8], uuid: Uuid) -> Vec<Found> {
    let b = LOG_BLOCK as usize;
    let mut out = Vec::new();
    let mut at = 0;
    while at + b <= area.len() {
        let Some(header) = decode_header(&area[at..at + b]) else {
            at += b;
            continue;
        };
        let start = at + b;
        let end = start.saturating_add(header.payload_len as usize);
        if header.array_uuid != uuid
            || end > area.len()
            || crc32c::crc32c(&area[start..end]) != u32_at(&area[at..], 80)
        {
            at += b;
            continue;
        }
        out.push(Found {
            header,
            payload: start..end,
        });
        at += (header.blocks() as usize) * b;
    }
    out
}

/// What recovery does for one stripe: the newest entries that concern it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripeWork {
    /// The newest recompute entry's sequence number.
    pub recompute: Option<u64>,
    /// The newest partial P entry: (sequence number, member slot it was
    /// found on, index in that member's scan).
    pub p: Option<(u64, usize, usize)>,
    /// The newest partial Q entry, as `p`.
    pub q: Option<(u64, usize, usize)>,
}

/// How recovery restores one parity chunk of a stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// From the data chunks.
    Recompute,
    /// From the partial parity of the entry at (member slot, scan index).
    Partial(usize, usize),
}

fn newest(recompute: Option<u64>, partial: Option<(u64, usize, usize)>) -> Option<Restore> {
    match (recompute, partial) {
        (Some(r), Some((s, ..))) if r > s => Some(Restore::Recompute),
        (_, Some((_, slot, i))) => Some(Restore::Partial(slot, i)),
        (Some(_), None) => Some(Restore::Recompute),
        (None, None) => None,
    }
}

impl StripeWork {
    /// How P is restored: from the newest entry that concerns it.
    pub fn p_restore(&self) -> Option<Restore> {
        newest(self.recompute, self.p)
    }

    /// How Q is restored.
    pub fn q_restore(&self) -> Option<Restore> {
        newest(self.recompute, self.q)
    }
}

/// Picks, from the entries found on each member (`found[slot]`), those
/// recovery must replay: entries numbered at or above the highest
/// durable-below any entry records (older ones were complete and flushed
/// before it was written), and of those the newest per stripe and kind.
/// Returns the work per stripe, in stripe order.
pub fn select(found: &[Vec<Found>]) -> std::collections::BTreeMap<u64, StripeWork> {
    let durable = found
        .iter()
        .flatten()
        .map(|f| f.header.durable_below)
        .max()
        .unwrap_or(0);
    let mut work: std::collections::BTreeMap<u64, StripeWork> = Default::default();
    for (slot, entries) in found.iter().enumerate() {
        for (i, f) in entries.iter().enumerate() {
            let h = &f.header;
            if h.seq < durable {
                continue;
            }
            // A batch covers at most a few hundred stripes; a damaged count
            // is bounded so that a bad entry cannot make recovery loop.
            let stripes = h.stripes.min(1 << 16);
            for s in h.stripe..h.stripe.saturating_add(stripes) {
                let w = work.entry(s).or_default();
                match h.kind {
                    EntryKind::Recompute => {
                        w.recompute = w.recompute.max(Some(h.seq));
                    }
                    EntryKind::PartialP => {
                        if w.p.is_none_or(|p| p.0 < h.seq) {
                            w.p = Some((h.seq, slot, i));
                        }
                    }
                    EntryKind::PartialQ => {
                        if w.q.is_none_or(|q| q.0 < h.seq) {
                            w.q = Some((h.seq, slot, i));
                        }
                    }
                }
            }
        }
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64, durable: u64, stripe: u64, kind: EntryKind) -> EntryHeader {
        EntryHeader {
            array_uuid: Uuid::from_u128(7),
            seq,
            durable_below: durable,
            stripe,
            stripes: 1,
            start: 100,
            len: 50,
            kind,
            payload_len: 0,
        }
    }

    #[test]
    fn entries_round_trip_and_torn_ones_are_not_found() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let e1 = encode(&header(5, 1, 3, EntryKind::PartialP), &payload);
        assert_eq!(e1.len(), 3 * LOG_BLOCK as usize);
        let e2 = encode(&header(6, 2, 9, EntryKind::Recompute), &[]);
        let mut area = vec![0u8; 8 * LOG_BLOCK as usize];
        area[..e1.len()].copy_from_slice(&e1);
        area[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let found = scan(&area, Uuid::from_u128(7));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].header.seq, 5);
        assert_eq!(found[0].header.payload_len, 5000);
        assert_eq!(&area[found[0].payload.clone()], &payload[..]);
        assert_eq!(found[1].header.kind, EntryKind::Recompute);
        // Another array's entries are not ours.
        assert!(scan(&area, Uuid::from_u128(8)).is_empty());
        // A torn payload (its last block not written) loses the entry.
        let mut torn = area.clone();
        torn[2 * LOG_BLOCK as usize + 10] ^= 1;
        let found = scan(&torn, Uuid::from_u128(7));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].header.seq, 6);
        // A torn header too.
        let mut torn = area.clone();
        torn[30] ^= 1;
        assert_eq!(scan(&torn, Uuid::from_u128(7)).len(), 1);
        // Garbage never decodes.
        assert!(decode_header(&[0xff; 4096]).is_none());
        assert!(decode_header(&[0; 10]).is_none());
    }

    #[test]
    fn selection_keeps_the_newest_undurable_entry_per_stripe() {
        let f = |h: EntryHeader| Found {
            header: h,
            payload: 0..0,
        };
        let member0 = vec![
            f(header(1, 0, 4, EntryKind::PartialP)),
            f(header(3, 0, 4, EntryKind::PartialP)),
            f(header(2, 0, 5, EntryKind::PartialP)),
        ];
        let mut batch = header(4, 2, 10, EntryKind::Recompute);
        batch.stripes = 3;
        let member1 = vec![
            f(batch),
            f(header(5, 2, 11, EntryKind::PartialQ)),
            f(header(1, 0, 6, EntryKind::PartialQ)),
        ];
        let work = select(&[member0, member1]);
        // Durable below 2: entries 1 are complete and flushed.
        assert!(!work.contains_key(&6));
        assert_eq!(work[&4].p, Some((3, 0, 1)));
        assert_eq!(work[&5].p, Some((2, 0, 2)));
        assert_eq!(work[&4].p_restore(), Some(Restore::Partial(0, 1)));
        assert_eq!(work[&10].p_restore(), Some(Restore::Recompute));
        assert_eq!(work[&12].q_restore(), Some(Restore::Recompute));
        // The partial Q after the batch wins for Q of stripe 11; P is
        // recomputed (the batch is P's newest entry).
        assert_eq!(work[&11].q_restore(), Some(Restore::Partial(1, 1)));
        assert_eq!(work[&11].p_restore(), Some(Restore::Recompute));
    }
}
