//! Self-checking block contents for `nbdraid bench --verify`.
//!
//! Every block written under `--verify` carries a 24-byte header (magic,
//! the block's byte offset, the write's generation) and a body of
//! pseudo-random words derived from (offset, generation), so a read can
//! tell a stale block, a misplaced block and a torn block apart.
//!
//! [`Tracker`] is the in-memory model: the generation last *completed*
//! for every block of the region, and whether an operation is in flight on
//! it. The bench never issues an operation on a block that has one in
//! flight, so a read always has exactly one right answer (the last
//! completed write) and two writes to one block are never reordered.

use std::fmt;

/// Marks a block written by `nbdraid bench --verify`.
const MAGIC: u64 = u64::from_be_bytes(*b"NBDRvrfy");
/// Bytes of header before the pseudo-random body.
pub const HEADER: usize = 24;
/// Smallest block size `--verify` accepts.
pub const MIN_BLOCK: usize = 512;

/// splitmix64: a fast, well-mixed generator for block bodies and offsets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Returns a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Returns the next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a number uniformly in `[0, n)` (`n` > 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn body_rng(offset: u64, generation: u32) -> Rng {
    Rng::new(offset.rotate_left(17) ^ (generation as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// Fills `buf` with the content of the block at `offset`, generation `generation`.
pub fn fill(buf: &mut [u8], offset: u64, generation: u32) {
    buf[..8].copy_from_slice(&MAGIC.to_be_bytes());
    buf[8..16].copy_from_slice(&offset.to_be_bytes());
    buf[16..24].copy_from_slice(&(generation as u64).to_be_bytes());
    body_rng(offset, generation).fill(&mut buf[HEADER..]);
}

/// What was wrong with a block read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// No verify header: never written by a verifying bench, or overwritten.
    NoHeader,
    /// The header names another block: data landed in the wrong place.
    WrongOffset(u64),
    /// An older or newer write than the last one completed.
    WrongGeneration(u32),
    /// The header is right, the body is not: a torn or corrupted block,
    /// first wrong at this byte.
    Body(usize),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::NoHeader => write!(f, "no verify header"),
            Mismatch::WrongOffset(o) => write!(f, "holds the block written for offset {o}"),
            Mismatch::WrongGeneration(g) => write!(f, "holds generation {g}"),
            Mismatch::Body(at) => write!(f, "header intact but body differs from byte {at}"),
        }
    }
}

/// Checks that `buf` is the block at `offset`, generation `generation`.
pub fn check(buf: &[u8], offset: u64, generation: u32) -> Result<(), Mismatch> {
    let word = |i: usize| u64::from_be_bytes(buf[i..i + 8].try_into().unwrap_or_default());
    if buf.len() < HEADER || word(0) != MAGIC {
        return Err(Mismatch::NoHeader);
    }
    if word(8) != offset {
        return Err(Mismatch::WrongOffset(word(8)));
    }
    if word(16) != generation as u64 {
        return Err(Mismatch::WrongGeneration(word(16) as u32));
    }
    let mut rng = body_rng(offset, generation);
    let body = &buf[HEADER..];
    let mut chunks = body.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        if c != rng.next_u64().to_le_bytes() {
            return Err(Mismatch::Body(HEADER + i * 8));
        }
    }
    let rest = chunks.remainder();
    if rest != &rng.next_u64().to_le_bytes()[..rest.len()] {
        return Err(Mismatch::Body(buf.len() - rest.len()));
    }
    Ok(())
}

/// The model of the region under `--verify` (see the module documentation).
#[derive(Debug)]
pub struct Tracker {
    /// Last completed generation per block; 0 = not written by this run.
    generation: Vec<u32>,
    busy: Vec<bool>,
}

impl Tracker {
    /// Returns a tracker of `blocks` blocks, none written, none busy.
    pub fn new(blocks: usize) -> Self {
        Self {
            generation: vec![0; blocks],
            busy: vec![false; blocks],
        }
    }

    /// Reports whether `block` has an operation in flight.
    pub fn is_busy(&self, block: u64) -> bool {
        self.busy[block as usize]
    }

    /// Marks `block` busy and returns the generation a read must find (0:
    /// unknown) or, for a write, the generation to write.
    pub fn start(&mut self, block: u64, write: bool) -> u32 {
        let b = block as usize;
        debug_assert!(!self.busy[b]);
        self.busy[b] = true;
        if write {
            // 0 means "unknown", so generations skip it when they wrap.
            self.generation[b].wrapping_add(1).max(1)
        } else {
            self.generation[b]
        }
    }

    /// Ends the operation on `block`; a completed write records its generation.
    pub fn finish(&mut self, block: u64, written: Option<u32>) {
        let b = block as usize;
        self.busy[b] = false;
        if let Some(g) = written {
            self.generation[b] = g;
        }
    }

    /// Returns the blocks written by this run with their generations.
    pub fn written(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.generation
            .iter()
            .enumerate()
            .filter(|(_, g)| **g != 0)
            .map(|(b, g)| (b as u64, *g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatches() {
        let mut b = vec![0u8; 4096 + 3];
        fill(&mut b, 8192, 7);
        assert_eq!(check(&b, 8192, 7), Ok(()));
        assert_eq!(check(&b, 8192, 6), Err(Mismatch::WrongGeneration(7)));
        assert_eq!(check(&b, 4096, 7), Err(Mismatch::WrongOffset(8192)));
        b[1000] ^= 1;
        assert_eq!(check(&b, 8192, 7), Err(Mismatch::Body(1000 / 8 * 8)));
        b[1000] ^= 1;
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(check(&b, 8192, 7), Err(Mismatch::Body(n - 3)));
        assert_eq!(check(&[0u8; 4096], 0, 1), Err(Mismatch::NoHeader));
    }

    #[test]
    fn tracker_generations() {
        let mut t = Tracker::new(4);
        assert_eq!(t.start(2, false), 0);
        assert!(t.is_busy(2));
        t.finish(2, None);
        let g = t.start(2, true);
        assert_eq!(g, 1);
        t.finish(2, Some(g));
        assert_eq!(t.start(2, false), 1);
        t.finish(2, None);
        assert_eq!(t.written().collect::<Vec<_>>(), vec![(2, 1)]);
    }

    #[test]
    fn below_is_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
