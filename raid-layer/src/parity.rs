//! P and Q parity: generation, delta updates, reconstruction of up to two
//! lost chunks, and the syndrome checks a scrub runs.
//!
//! A stripe has `k` data chunks D_0 .. D_{k-1}, numbered by *data index*
//! (their place in the stripe's data, not the member they live on), and
//! one or two parity chunks:
//!
//! - P = D_0 ⊕ D_1 ⊕ … ⊕ D_{k-1} (RAID 5 and 6),
//! - Q = g^0·D_0 ⊕ g^1·D_1 ⊕ … ⊕ g^{k-1}·D_{k-1} in GF(2^8) (RAID 6),
//!
//! byte by byte, exactly as Linux md computes them (`lib/raid6`), so the
//! parity bytes are md's for the same data. Because g^i are distinct only
//! for i < 255, a RAID 6 stripe has at most [`MAX_PQ_DATA`] data chunks.
//!
//! Every buffer of one call has the same length, any length at all (the
//! array does byte-granular read-modify-write); a mismatch is an error,
//! never a panic, and so are impossible reconstruction requests.
//!
//! Where a stripe's chunks are listed together (see [`reconstruct`]) the
//! order is `[D_0, …, D_{k-1}, P, Q]`: the *chunk index* of D_i is i, P's
//! is k and Q's is k + 1.
//!
//! P and Q are computed column by column (Horner's rule from the highest
//! data index, Q = (…(D_{k-1}·g ⊕ D_{k-2})·g …)·g ⊕ D_0, as md's
//! `int.uc`), 64 bytes of every chunk at a time held in registers, so each
//! input byte is read once and each output byte written once. The
//! multiply by g works on whole words; on CPUs with AVX2 the same code is
//! compiled a second time for AVX2 and picked at run time.

use crate::gf;

/// The largest number of data chunks a stripe with Q may have: beyond it
/// g^i repeats and two lost chunks could no longer be told apart.
pub const MAX_PQ_DATA: usize = gf::ORDER;

/// What goes wrong in a parity call: all caller mistakes, reported rather
/// than panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParityError {
    /// A buffer's length differs from the others'.
    #[error("buffer {chunk} is {found} bytes long, expected {expected}")]
    LengthMismatch {
        /// The offending buffer: its chunk index (`[D_0, …, D_{k-1}, P,
        /// Q]`) where the call takes a stripe, else its argument position
        /// counted from 0.
        chunk: usize,
        /// The length of the reference buffer (P, or the first chunk).
        expected: usize,
        /// The length of this one.
        found: usize,
    },
    /// More chunks are missing than the redundancy can rebuild.
    #[error("{missing} chunks missing, the redundancy tolerates {tolerated}")]
    TooManyMissing {
        /// How many were listed as missing.
        missing: usize,
        /// How many the redundancy can rebuild (1 for P, 2 for P+Q).
        tolerated: usize,
    },
    /// A missing chunk index is not a chunk of the stripe.
    #[error("missing chunk {index} is out of range: the stripe has {chunks} chunks")]
    IndexOutOfRange {
        /// The index given.
        index: usize,
        /// The number of chunks in the stripe.
        chunks: usize,
    },
    /// The same chunk index was listed twice as missing.
    #[error("chunk {index} is listed twice as missing")]
    DuplicateIndex {
        /// The index given twice.
        index: usize,
    },
    /// Q needs more data chunks (or a higher data index) than g has
    /// distinct powers.
    #[error("{data} data chunks: a stripe with Q holds at most {MAX_PQ_DATA}")]
    TooManyDataChunks {
        /// The number of data chunks (data index + 1 for an update).
        data: usize,
    },
    /// The stripe has fewer chunks than its parity chunks alone.
    #[error("a stripe of {chunks} chunks cannot hold {parity} parity chunks")]
    TooFewChunks {
        /// The number of chunks given.
        chunks: usize,
        /// The number of parity chunks of the redundancy.
        parity: usize,
    },
}

/// The parity a stripe carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Redundancy {
    /// P only (RAID 5): one lost chunk can be rebuilt.
    P,
    /// P and Q (RAID 6): any two lost chunks can be rebuilt.
    PQ,
}

impl Redundancy {
    /// Returns the number of parity chunks per stripe, which is also the
    /// number of lost chunks a stripe survives.
    pub const fn parity_chunks(self) -> usize {
        match self {
            Redundancy::P => 1,
            Redundancy::PQ => 2,
        }
    }
}

/// What [`locate_single_error`] found in a stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Located {
    /// P and Q agree with the data.
    Consistent,
    /// The data chunk with this data index is wrong; P and Q are right.
    Data(usize),
    /// Only P is wrong.
    P,
    /// Only Q is wrong.
    Q,
}

/// Returns Q's coefficient g^i for data index `i`.
pub const fn q_coefficient(i: usize) -> u8 {
    gf::exp2(i)
}

/// Computes P of the data chunks `data` into `p`.
///
/// With no data chunks P is all zeroes.
pub fn gen_p<D: AsRef<[u8]>>(data: &[D], p: &mut [u8]) -> Result<(), ParityError> {
    check_lengths(p.len(), data.iter().map(AsRef::as_ref).enumerate())?;
    let len = p.len();
    syndromes::<D, true, false>(data, NO_SKIP, 0, p, &mut [], len);
    Ok(())
}

/// Computes P and Q of the data chunks `data` into `p` and `q`.
pub fn gen_pq<D: AsRef<[u8]>>(data: &[D], p: &mut [u8], q: &mut [u8]) -> Result<(), ParityError> {
    check_pq_data(data.len())?;
    let k = data.len();
    check_lengths(p.len(), data.iter().map(AsRef::as_ref).enumerate())?;
    check_lengths(p.len(), [(k + 1, &*q)])?;
    let len = p.len();
    syndromes::<D, true, true>(data, NO_SKIP, 0, p, q, len);
    Ok(())
}

/// Updates `p` for a data chunk whose bytes change from `old` to `new`
/// (read-modify-write): P' = P ⊕ old ⊕ new.
pub fn update_p(p: &mut [u8], old: &[u8], new: &[u8]) -> Result<(), ParityError> {
    check_lengths(p.len(), [(1, old), (2, new)])?;
    gf::xor_slice(p, old);
    gf::xor_slice(p, new);
    Ok(())
}

/// Updates `p` and `q` for data index `index` whose bytes change from
/// `old` to `new`: P' = P ⊕ (old ⊕ new), Q' = Q ⊕ g^index·(old ⊕ new).
pub fn update_pq(
    index: usize,
    p: &mut [u8],
    q: &mut [u8],
    old: &[u8],
    new: &[u8],
) -> Result<(), ParityError> {
    check_pq_data(index.saturating_add(1))?;
    check_lengths(p.len(), [(2, &*q), (3, old), (4, new)])?;
    let c = q_coefficient(index);
    gf::xor_slice(p, old);
    gf::xor_slice(p, new);
    gf::mul_slice_xor(c, old, q);
    gf::mul_slice_xor(c, new, q);
    Ok(())
}

/// Rebuilds the chunks listed in `missing` from the others, in place.
///
/// `chunks` is the whole stripe in chunk-index order `[D_0, …, D_{k-1},
/// P]` for [`Redundancy::P`] or `[D_0, …, D_{k-1}, P, Q]` for
/// [`Redundancy::PQ`]; the buffers named by `missing` are overwritten with
/// their reconstructed contents (what they held before does not matter),
/// the others are only read. Lost data is rebuilt from P when P is
/// present, from Q when only P is also lost, and from both when two data
/// chunks are lost (md's `lib/raid6/recov.c`); lost parity is then
/// recomputed. An empty `missing` does nothing.
///
/// Any buffer type that can be borrowed as bytes works (`&mut [u8]`,
/// `Vec<u8>`, …); a missing chunk is briefly swapped for `D::default()`
/// while it is written, which for those types costs nothing.
///
/// Refused, with nothing written: more missing chunks than the redundancy
/// tolerates, an index out of range or listed twice, buffers of different
/// lengths, a stripe too short for its parity or, with Q, more than
/// [`MAX_PQ_DATA`] data chunks.
pub fn reconstruct<D>(
    level: Redundancy,
    chunks: &mut [D],
    missing: &[usize],
) -> Result<(), ParityError>
where
    D: AsRef<[u8]> + AsMut<[u8]> + Default,
{
    let parity = level.parity_chunks();
    let k = chunks
        .len()
        .checked_sub(parity)
        .ok_or(ParityError::TooFewChunks {
            chunks: chunks.len(),
            parity,
        })?;
    if level == Redundancy::PQ {
        check_pq_data(k)?;
    }
    if missing.len() > parity {
        return Err(ParityError::TooManyMissing {
            missing: missing.len(),
            tolerated: parity,
        });
    }
    for (n, &index) in missing.iter().enumerate() {
        if index >= chunks.len() {
            return Err(ParityError::IndexOutOfRange {
                index,
                chunks: chunks.len(),
            });
        }
        if missing[..n].contains(&index) {
            return Err(ParityError::DuplicateIndex { index });
        }
    }
    let len = chunks.first().map_or(0, |c| c.as_ref().len());
    check_lengths(len, chunks.iter().map(AsRef::as_ref).enumerate())?;

    let p_index = k;
    let q_index = k + 1;
    let mut lost_data = missing.iter().copied().filter(|&i| i < k);
    let p_lost = missing.contains(&p_index);
    let q_lost = level == Redundancy::PQ && missing.contains(&q_index);
    match (lost_data.next(), lost_data.next()) {
        (None, _) => {}
        (Some(x), None) if !p_lost => rebuild_from_p(chunks, k, x),
        (Some(x), None) => rebuild_from_q(chunks, k, x),
        (Some(x), Some(y)) => rebuild_two_from_pq(chunks, k, x, y),
    }
    match (p_lost, q_lost) {
        (false, false) => {}
        (true, false) => regenerate::<D, true, false>(chunks, k),
        (false, true) => regenerate::<D, false, true>(chunks, k),
        (true, true) => regenerate::<D, true, true>(chunks, k),
    }
    Ok(())
}

/// Returns whether `p` is the P of `data`.
pub fn check_p<D: AsRef<[u8]>>(data: &[D], p: &[u8]) -> Result<bool, ParityError> {
    check_lengths(p.len(), data.iter().map(AsRef::as_ref).enumerate())?;
    let mut scratch = [0u8; SCRATCH];
    for (n, expected) in p.chunks(SCRATCH).enumerate() {
        let computed = &mut scratch[..expected.len()];
        syndromes::<D, true, false>(
            data,
            NO_SKIP,
            n * SCRATCH,
            computed,
            &mut [],
            expected.len(),
        );
        if computed != expected {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Says which single chunk of a RAID 6 stripe is wrong, assuming at most
/// one is; `None` when no single wrong chunk explains the syndromes (two
/// or more chunks are wrong).
///
/// With the syndromes P* = P ⊕ ΣD_i and Q* = Q ⊕ Σg^i·D_i, a data chunk z
/// off by an error e gives P* = e and Q* = g^z·e, so every byte where P*
/// is nonzero has Q* ≠ 0 and the same log(Q*) − log(P*) = z, and every
/// byte where P* is zero has Q* zero too. A wrong P alone gives P* ≠ 0,
/// Q* = 0; a wrong Q alone gives P* = 0, Q* ≠ 0. This is what lets a
/// repair rewrite the right chunk, which md's scrub cannot.
pub fn locate_single_error<D: AsRef<[u8]>>(
    data: &[D],
    p: &[u8],
    q: &[u8],
) -> Result<Option<Located>, ParityError> {
    check_pq_data(data.len())?;
    check_lengths(p.len(), data.iter().map(AsRef::as_ref).enumerate())?;
    check_lengths(p.len(), [(data.len() + 1, q)])?;
    let mut p_star = [0u8; SCRATCH];
    let mut q_star = [0u8; SCRATCH];
    let mut evidence = Evidence::default();
    for (n, (p_block, q_block)) in p.chunks(SCRATCH).zip(q.chunks(SCRATCH)).enumerate() {
        let len = p_block.len();
        let (ps, qs) = (&mut p_star[..len], &mut q_star[..len]);
        syndromes::<D, true, true>(data, NO_SKIP, n * SCRATCH, ps, qs, len);
        gf::xor_slice(ps, p_block);
        gf::xor_slice(qs, q_block);
        for (&pb, &qb) in ps.iter().zip(qs.iter()) {
            evidence.add(pb, qb);
        }
        if evidence.inconsistent {
            return Ok(None);
        }
    }
    Ok(evidence.verdict(data.len()))
}

/// What the syndrome bytes seen so far say, for [`locate_single_error`].
#[derive(Default)]
struct Evidence {
    /// Some byte had P* ≠ 0 and Q* = 0 (only P can explain it).
    p_only: bool,
    /// Some byte had P* = 0 and Q* ≠ 0 (only Q can explain it).
    q_only: bool,
    /// The data index z all bytes with both nonzero point at.
    data: Option<u8>,
    /// Two bytes pointed at different data indices.
    inconsistent: bool,
}

impl Evidence {
    fn add(&mut self, p_star: u8, q_star: u8) {
        match (gf::log2(p_star), gf::log2(q_star)) {
            (None, None) => {}
            (Some(_), None) => self.p_only = true,
            (None, Some(_)) => self.q_only = true,
            (Some(lp), Some(lq)) => {
                let z = ((usize::from(lq) + gf::ORDER - usize::from(lp)) % gf::ORDER) as u8;
                match self.data {
                    None => self.data = Some(z),
                    Some(seen) if seen == z => {}
                    Some(_) => self.inconsistent = true,
                }
            }
        }
    }

    fn verdict(&self, k: usize) -> Option<Located> {
        match (self.p_only, self.q_only, self.data) {
            (false, false, None) => Some(Located::Consistent),
            (true, false, None) => Some(Located::P),
            (false, true, None) => Some(Located::Q),
            (false, false, Some(z)) if usize::from(z) < k => Some(Located::Data(usize::from(z))),
            _ => None,
        }
    }
}

/// Bytes per stack scratch block of the checks (two of them on the stack).
const SCRATCH: usize = 1024;

/// "Skip no data index" for [`syndromes`].
const NO_SKIP: [usize; 2] = [usize::MAX; 2];

/// Refuses Q over more data chunks than g has distinct powers.
fn check_pq_data(data: usize) -> Result<(), ParityError> {
    if data > MAX_PQ_DATA {
        return Err(ParityError::TooManyDataChunks { data });
    }
    Ok(())
}

/// Checks that every numbered buffer of `buffers` is `expected` bytes
/// long; the error names the first that is not by its number.
fn check_lengths<'a>(
    expected: usize,
    buffers: impl IntoIterator<Item = (usize, &'a [u8])>,
) -> Result<(), ParityError> {
    for (n, other) in buffers {
        if other.len() != expected {
            return Err(ParityError::LengthMismatch {
                chunk: n,
                expected,
                found: other.len(),
            });
        }
    }
    Ok(())
}

/// Rebuilds data chunk `x` as P ⊕ (the other data chunks).
fn rebuild_from_p<D>(chunks: &mut [D], k: usize, x: usize)
where
    D: AsRef<[u8]> + AsMut<[u8]> + Default,
{
    let mut target = std::mem::take(&mut chunks[x]);
    let out = target.as_mut();
    let len = out.len();
    syndromes::<D, true, false>(&chunks[..k], [x, usize::MAX], 0, out, &mut [], len);
    gf::xor_slice(out, chunks[k].as_ref());
    chunks[x] = target;
}

/// Rebuilds data chunk `x` from Q when P is lost too:
/// D_x = g^{-x}·(Q ⊕ Σ_{i≠x} g^i·D_i).
fn rebuild_from_q<D>(chunks: &mut [D], k: usize, x: usize)
where
    D: AsRef<[u8]> + AsMut<[u8]> + Default,
{
    let mut target = std::mem::take(&mut chunks[x]);
    let out = target.as_mut();
    let len = out.len();
    syndromes::<D, false, true>(&chunks[..k], [x, usize::MAX], 0, &mut [], out, len);
    gf::xor_slice(out, chunks[k + 1].as_ref());
    gf::mul_slice_in_place(gf::exp2(gf::ORDER - x % gf::ORDER), out);
    chunks[x] = target;
}

/// Rebuilds data chunks `x` and `y` from P and Q (`lib/raid6/recov.c`).
///
/// With P' = P ⊕ Σ_{i∉{x,y}} D_i = D_x ⊕ D_y and
/// Q' = Q ⊕ Σ_{i∉{x,y}} g^i·D_i = g^x·D_x ⊕ g^y·D_y:
/// D_y = (Q' ⊕ g^x·P') / (g^x ⊕ g^y) and D_x = P' ⊕ D_y. P' and Q' are
/// built in the lost chunks' own buffers, so no scratch is needed.
fn rebuild_two_from_pq<D>(chunks: &mut [D], k: usize, x: usize, y: usize)
where
    D: AsRef<[u8]> + AsMut<[u8]> + Default,
{
    let mut dx = std::mem::take(&mut chunks[x]);
    let mut dy = std::mem::take(&mut chunks[y]);
    let (px, qy) = (dx.as_mut(), dy.as_mut());
    let len = px.len();
    syndromes::<D, true, true>(&chunks[..k], [x, y], 0, px, qy, len);
    gf::xor_slice(px, chunks[k].as_ref());
    gf::xor_slice(qy, chunks[k + 1].as_ref());
    let (gx, gy) = (gf::exp2(x), gf::exp2(y));
    // g^x ≠ g^y because x ≠ y and both are below 255 (checked by the
    // caller), so the sum is invertible; 1 is never used.
    let denominator_inv = gf::inv(gx ^ gy).unwrap_or(1);
    gf::mul_slice_in_place(denominator_inv, qy);
    gf::mul_slice_xor(gf::mul(gx, denominator_inv), px, qy);
    gf::xor_slice(px, qy);
    chunks[x] = dx;
    chunks[y] = dy;
}

/// Recomputes P (chunk k) and/or Q (chunk k + 1) from the data chunks.
fn regenerate<D, const P: bool, const Q: bool>(chunks: &mut [D], k: usize)
where
    D: AsRef<[u8]> + AsMut<[u8]> + Default,
{
    let (data, parity) = chunks.split_at_mut(k);
    let (p, q) = match parity {
        [p] => (p.as_mut(), &mut [][..]),
        [p, q, ..] => (p.as_mut(), q.as_mut()),
        [] => return,
    };
    let len = if P { p.len() } else { q.len() };
    syndromes::<D, P, Q>(data, NO_SKIP, 0, p, q, len);
}

/// Computes, over bytes `start .. start + len` of every data chunk,
/// P (into `p[..len]`, when `P`) and Q (into `q[..len]`, when `Q`),
/// treating the data indices in `skip` as all zeroes. The caller has
/// checked that every chunk has those bytes and the outputs are long
/// enough; an output not asked for may be empty.
fn syndromes<D: AsRef<[u8]>, const P: bool, const Q: bool>(
    data: &[D],
    skip: [usize; 2],
    start: usize,
    p: &mut [u8],
    q: &mut [u8],
    len: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), the only
        // requirement of the `target_feature` function.
        unsafe { syndromes_avx2::<D, P, Q>(data, skip, start, p, q, len) };
        return;
    }
    syndromes_body::<D, P, Q>(data, skip, start, p, q, len);
}

/// [`syndromes_body`] compiled with AVX2, so its word loops become
/// 256-bit vector operations.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn syndromes_avx2<D: AsRef<[u8]>, const P: bool, const Q: bool>(
    data: &[D],
    skip: [usize; 2],
    start: usize,
    p: &mut [u8],
    q: &mut [u8],
    len: usize,
) {
    syndromes_body::<D, P, Q>(data, skip, start, p, q, len);
}

/// Bytes per column: 8 words of every chunk are combined in registers
/// before moving on.
const COLUMN: usize = 64;
const WORDS: usize = COLUMN / 8;

/// The column loop of [`syndromes`]; inlined into each caller so that it
/// is compiled for the caller's target features.
#[inline(always)]
fn syndromes_body<D: AsRef<[u8]>, const P: bool, const Q: bool>(
    data: &[D],
    skip: [usize; 2],
    start: usize,
    p: &mut [u8],
    q: &mut [u8],
    len: usize,
) {
    let whole = len / COLUMN * COLUMN;
    let mut off = 0;
    while off < whole {
        let mut wp = [0u64; WORDS];
        let mut wq = [0u64; WORDS];
        for (i, chunk) in data.iter().enumerate().rev() {
            if Q {
                for w in &mut wq {
                    *w = gf::mul2_word(*w);
                }
            }
            if i == skip[0] || i == skip[1] {
                continue;
            }
            let column = &chunk.as_ref()[start + off..start + off + COLUMN];
            for (j, bytes) in column.chunks_exact(8).enumerate() {
                let word = gf::load_word(bytes);
                if P {
                    wp[j] ^= word;
                }
                if Q {
                    wq[j] ^= word;
                }
            }
        }
        if P {
            for (bytes, w) in p[off..off + COLUMN].chunks_exact_mut(8).zip(wp) {
                gf::store_word(bytes, w);
            }
        }
        if Q {
            for (bytes, w) in q[off..off + COLUMN].chunks_exact_mut(8).zip(wq) {
                gf::store_word(bytes, w);
            }
        }
        off += COLUMN;
    }
    // The tail, shorter than a column, byte by byte.
    for off in whole..len {
        let (mut bp, mut bq) = (0u8, 0u8);
        for (i, chunk) in data.iter().enumerate().rev() {
            bq = gf::mul(bq, gf::GENERATOR);
            if i == skip[0] || i == skip[1] {
                continue;
            }
            let byte = chunk.as_ref()[start + off];
            bp ^= byte;
            bq ^= byte;
        }
        if P {
            p[off] = bp;
        }
        if Q {
            q[off] = bq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripe(k: usize, len: usize, seed: u32) -> Vec<Vec<u8>> {
        (0..k)
            .map(|i| {
                (0..len)
                    .map(|j| {
                        ((j as u32 * 131 + i as u32 * 71 + seed).wrapping_mul(2654435761) >> 13)
                            as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn gen_pq_matches_the_sum_definition() {
        for len in [0, 1, 63, 64, 65, 200] {
            let data = stripe(5, len, 1);
            let (mut p, mut q) = (vec![0xaa; len], vec![0x55; len]);
            gen_pq(&data, &mut p, &mut q).unwrap();
            for j in 0..len {
                let mut ep = 0;
                let mut eq = 0;
                for (i, d) in data.iter().enumerate() {
                    ep ^= d[j];
                    eq ^= gf::mul(gf::exp2(i), d[j]);
                }
                assert_eq!((p[j], q[j]), (ep, eq), "byte {j} of {len}");
            }
            let mut p_only = vec![0; len];
            gen_p(&data, &mut p_only).unwrap();
            assert_eq!(p_only, p);
            assert!(check_p(&data, &p).unwrap());
        }
    }

    #[test]
    fn every_single_and_double_loss_is_rebuilt() {
        let k = 4;
        let len = 130;
        let data = stripe(k, len, 7);
        let (mut p, mut q) = (vec![0; len], vec![0; len]);
        gen_pq(&data, &mut p, &mut q).unwrap();
        let mut whole = data.clone();
        whole.push(p);
        whole.push(q);
        for a in 0..k + 2 {
            for b in a..k + 2 {
                let missing: Vec<usize> = if a == b { vec![a] } else { vec![a, b] };
                let mut damaged = whole.clone();
                for &m in &missing {
                    damaged[m].fill(0xee);
                }
                reconstruct(Redundancy::PQ, &mut damaged, &missing).unwrap();
                assert_eq!(damaged, whole, "missing {missing:?}");
            }
        }
    }

    #[test]
    fn impossible_requests_are_refused() {
        let mut chunks = vec![vec![0u8; 8]; 4];
        let err = reconstruct(Redundancy::P, &mut chunks, &[0, 1]);
        assert_eq!(
            err,
            Err(ParityError::TooManyMissing {
                missing: 2,
                tolerated: 1
            })
        );
        let err = reconstruct(Redundancy::PQ, &mut chunks, &[4]);
        assert!(matches!(err, Err(ParityError::IndexOutOfRange { .. })));
        let err = reconstruct(Redundancy::PQ, &mut chunks, &[1, 1]);
        assert_eq!(err, Err(ParityError::DuplicateIndex { index: 1 }));
        chunks[2].push(0);
        let err = reconstruct(Redundancy::PQ, &mut chunks, &[0]);
        assert!(matches!(
            err,
            Err(ParityError::LengthMismatch { chunk: 2, .. })
        ));
        let mut one: Vec<Vec<u8>> = vec![vec![0; 1]];
        let err = reconstruct(Redundancy::PQ, &mut one, &[0]);
        assert!(matches!(err, Err(ParityError::TooFewChunks { .. })));
        let err = update_pq(255, &mut [0], &mut [0], &[0], &[1]);
        assert!(matches!(err, Err(ParityError::TooManyDataChunks { .. })));
    }
}
