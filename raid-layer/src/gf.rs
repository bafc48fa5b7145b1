//! Arithmetic in GF(2^8), the field of RAID 6's Q syndrome, and the slice
//! kernels that apply it to whole buffers.
//!
//! The field is the one Linux md uses (`include/linux/raid/pq.h`,
//! `lib/raid6`): bytes are polynomials over GF(2) reduced modulo
//! x^8 + x^4 + x^3 + x^2 + 1 ([`POLY`] = 0x11d), and the generator is
//! g = 2 ([`GENERATOR`]). Using exactly md's field is what makes our Q
//! bytes identical to md's for the same data, so an array written by one
//! can be checked by the other. Addition is XOR; g has order 255, so
//! g^0 .. g^254 are distinct, which is what bounds a RAID 6 stripe to 255
//! data chunks.
//!
//! All tables are computed at compile time (`const fn`), so there is no
//! start-up cost and no lazily initialised global.
//!
//! The slice kernels ([`mul_slice_xor`], [`mul_slice`],
//! [`mul_slice_in_place`], [`xor_slice`]) are the hot path of parity
//! generation and reconstruction. Multiplying by a constant `c` uses the
//! split-nibble method: c·x = c·(x & 0x0f) ⊕ c·(x & 0xf0), two 16-entry
//! tables per constant, which x86's `pshufb` looks up 16 or 32 bytes at a
//! time. That path is taken only after a run-time CPU feature check
//! (AVX2, else SSSE3); every other CPU gets the portable kernel (a
//! 256-entry row lookup per byte), and both give identical results (unit
//! tests compare them). XOR works on machine words, which the compiler
//! turns into vector instructions; it runs at cache bandwidth as is.
//!
//! Every kernel works on the common prefix of its slices; callers in this
//! crate check lengths first (see `parity`), so a mismatch is a bug and
//! trips a `debug_assert` in debug builds.

/// The reducing polynomial x^8 + x^4 + x^3 + x^2 + 1, as md's RAID 6.
pub const POLY: u16 = 0x11d;

/// The generator g of the multiplicative group used for Q (md's g = 2).
pub const GENERATOR: u8 = 2;

/// The order of [`GENERATOR`]: g^ORDER = 1, and g^i for i < ORDER are
/// distinct.
pub const ORDER: usize = 255;

/// EXP[i] = g^i for i in 0..510 (twice the order, so that
/// `EXP[log a + log b]` needs no reduction).
const EXP: [u8; 2 * ORDER] = build_exp();

/// LOG[a] = i with g^i = a, for a != 0 (LOG[0] is unused and 0).
const LOG: [u8; 256] = build_log();

/// MUL[a][b] = a·b: the row of a constant is the portable kernel's table.
static MUL: [[u8; 256]; 256] = build_mul();

/// NIBBLES[c] = [c·x for x in 0..16, c·(x << 4) for x in 0..16]: the two
/// `pshufb` tables of the constant c.
#[cfg(target_arch = "x86_64")]
static NIBBLES: [[[u8; 16]; 2]; 256] = build_nibbles();

const fn build_exp() -> [u8; 2 * ORDER] {
    let mut table = [0u8; 2 * ORDER];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 2 * ORDER {
        table[i] = x as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= POLY;
        }
        i += 1;
    }
    table
}

const fn build_log() -> [u8; 256] {
    let exp = build_exp();
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < ORDER {
        table[exp[i] as usize] = i as u8;
        i += 1;
    }
    table
}

const fn build_mul() -> [[u8; 256]; 256] {
    let mut table = [[0u8; 256]; 256];
    let mut a = 0;
    while a < 256 {
        let mut b = 0;
        while b < 256 {
            table[a][b] = mul(a as u8, b as u8);
            b += 1;
        }
        a += 1;
    }
    table
}

#[cfg(target_arch = "x86_64")]
const fn build_nibbles() -> [[[u8; 16]; 2]; 256] {
    let mut table = [[[0u8; 16]; 2]; 256];
    let mut c = 0;
    while c < 256 {
        let mut x = 0;
        while x < 16 {
            table[c][0][x] = mul(c as u8, x as u8);
            table[c][1][x] = mul(c as u8, (x << 4) as u8);
            x += 1;
        }
        c += 1;
    }
    table
}

/// Returns the product a·b in the field.
pub const fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
    }
}

/// Returns g^i (exponents are taken modulo [`ORDER`], so any `i` is fine).
pub const fn exp2(i: usize) -> u8 {
    EXP[i % ORDER]
}

/// Returns the discrete logarithm i < 255 with g^i = a, or `None` for 0,
/// which has none.
pub const fn log2(a: u8) -> Option<u8> {
    if a == 0 { None } else { Some(LOG[a as usize]) }
}

/// Returns the multiplicative inverse of `a`, or `None` for 0.
pub const fn inv(a: u8) -> Option<u8> {
    if a == 0 {
        None
    } else {
        Some(EXP[ORDER - LOG[a as usize] as usize])
    }
}

/// Returns a / b, or `None` when b is 0.
pub const fn div(a: u8, b: u8) -> Option<u8> {
    match inv(b) {
        Some(b_inv) => Some(mul(a, b_inv)),
        None => None,
    }
}

/// Returns 2·x on each byte of a word independently (md's `SHLBYTE` and
/// `MASK` of `lib/raid6/int.uc`): shift every byte left and fold the
/// carried-out top bit back in as 0x1d.
#[inline(always)]
pub(crate) const fn mul2_word(v: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const LOW7: u64 = 0xfefe_fefe_fefe_fefe;
    const REDUCE: u64 = 0x1d1d_1d1d_1d1d_1d1d;
    let high = v & HIGH;
    // 0xff in every byte whose top bit was set, 0x00 elsewhere.
    let mask = (high << 1).wrapping_sub(high >> 7);
    ((v << 1) & LOW7) ^ (mask & REDUCE)
}

/// Returns the word made of the first 8 bytes of `bytes` (native order).
#[inline(always)]
pub(crate) fn load_word(bytes: &[u8]) -> u64 {
    // Callers pass 8-byte chunks; the fallback is dead code the optimiser
    // removes, and keeps this free of panics.
    bytes
        .first_chunk::<8>()
        .map_or(0, |word| u64::from_ne_bytes(*word))
}

/// Stores `word` into the first 8 bytes of `bytes` (native order).
#[inline(always)]
pub(crate) fn store_word(bytes: &mut [u8], word: u64) {
    if let Some(dst) = bytes.first_chunk_mut::<8>() {
        *dst = word.to_ne_bytes();
    }
}

/// Sets `out ^= input` byte-wise over the common prefix of the slices.
///
/// It works on 32-byte blocks of words, which the compiler turns into
/// vector instructions even for baseline x86_64 (SSE2); an AVX2 build of
/// the same loop measured no faster: it is bound by loads and stores.
pub fn xor_slice(out: &mut [u8], input: &[u8]) {
    debug_assert_eq!(out.len(), input.len());
    const BLOCK: usize = 32;
    let mut out_blocks = out.chunks_exact_mut(BLOCK);
    let mut in_blocks = input.chunks_exact(BLOCK);
    for (o, i) in (&mut out_blocks).zip(&mut in_blocks) {
        for (ow, iw) in o.chunks_exact_mut(8).zip(i.chunks_exact(8)) {
            store_word(ow, load_word(ow) ^ load_word(iw));
        }
    }
    for (o, i) in out_blocks
        .into_remainder()
        .iter_mut()
        .zip(in_blocks.remainder())
    {
        *o ^= *i;
    }
}

/// Sets `out ^= c·input` byte-wise over the common prefix of the slices:
/// the step that adds one data chunk's share to a Q syndrome.
pub fn mul_slice_xor(c: u8, input: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), input.len());
    match c {
        0 => {}
        1 => xor_slice(out, input),
        _ => mul_dispatch::<true>(c, Some(input), out),
    }
}

/// Sets `out = c·input` byte-wise over the common prefix of the slices.
pub fn mul_slice(c: u8, input: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), input.len());
    let n = out.len().min(input.len());
    match c {
        0 => out[..n].fill(0),
        1 => out[..n].copy_from_slice(&input[..n]),
        _ => mul_dispatch::<false>(c, Some(input), out),
    }
}

/// Sets `buf = c·buf` byte-wise (reconstruction scales a syndrome in
/// place instead of needing a scratch buffer).
pub fn mul_slice_in_place(c: u8, buf: &mut [u8]) {
    match c {
        0 => buf.fill(0),
        1 => {}
        _ => mul_dispatch::<false>(c, None, buf),
    }
}

/// Names the multiply kernel this CPU runs ("avx2", "ssse3" or
/// "portable"), for logs and benchmarks.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
        if std::arch::is_x86_feature_detected!("ssse3") {
            return "ssse3";
        }
    }
    "portable"
}

/// Multiplies `input` (or `out` itself when `input` is `None`) by `c` into
/// `out`, XORing into it when `XOR`; picks the fastest kernel the CPU has
/// and finishes the tail that is not a whole vector portably.
fn mul_dispatch<const XOR: bool>(c: u8, input: Option<&[u8]>, out: &mut [u8]) {
    let len = input.map_or(out.len(), |i| i.len().min(out.len()));
    #[allow(unused_mut)] // only x86_64 advances it
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let tables = &NIBBLES[usize::from(c)];
        let dst = out.as_mut_ptr();
        let src = input.map_or(dst.cast_const(), <[u8]>::as_ptr);
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above); `src` and `dst`
            // point to at least `len` bytes (`len` is the shorter slice's
            // length) and are either the same buffer (in place) or two
            // distinct slices, which cannot overlap since `out` is `&mut`.
            done = unsafe { x86::mul_avx2::<XOR>(tables, src, dst, len) };
        } else if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: as above, with SSSE3 checked instead of AVX2.
            done = unsafe { x86::mul_ssse3::<XOR>(tables, src, dst, len) };
        }
    }
    let row = &MUL[usize::from(c)];
    let out = &mut out[done..len];
    match input {
        Some(input) => {
            for (o, i) in out.iter_mut().zip(&input[done..len]) {
                let product = row[usize::from(*i)];
                *o = if XOR { *o ^ product } else { product };
            }
        }
        None => {
            for o in out.iter_mut() {
                let product = row[usize::from(*o)];
                *o = if XOR { *o ^ product } else { product };
            }
        }
    }
}

/// The x86_64 vector kernels. Each is a `target_feature` function, so it
/// may only be called after the matching run-time feature check.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm_and_si128, _mm_loadu_si128, _mm_set1_epi8, _mm_shuffle_epi8,
        _mm_srli_epi64, _mm_storeu_si128, _mm_xor_si128, _mm256_and_si256,
        _mm256_broadcastsi128_si256, _mm256_loadu_si256, _mm256_set1_epi8, _mm256_shuffle_epi8,
        _mm256_srli_epi64, _mm256_storeu_si256, _mm256_xor_si256,
    };

    /// Multiplies the first `len / 32 * 32` bytes at `src` by the constant
    /// whose nibble tables are `tables`, storing (or XORing, with `XOR`)
    /// into `dst`; returns how many bytes it did.
    ///
    /// # Safety
    /// The CPU must support AVX2; `src` must be valid for reads and `dst`
    /// for writes of `len` bytes; `src` is either `dst` or does not
    /// overlap it.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn mul_avx2<const XOR: bool>(
        tables: &[[u8; 16]; 2],
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> usize {
        let whole = len / 32 * 32;
        // SAFETY: the caller guarantees AVX2 and that every offset below
        // `len` is in bounds for both pointers; unaligned loads/stores
        // have no alignment requirement. Each block is read before it is
        // written, so `src == dst` (in place) is fine.
        unsafe {
            let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(tables[0].as_ptr().cast()));
            let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(tables[1].as_ptr().cast()));
            let mask = _mm256_set1_epi8(0x0f);
            let mut off = 0;
            while off < whole {
                let x = _mm256_loadu_si256(src.add(off).cast::<__m256i>());
                let low = _mm256_and_si256(x, mask);
                let high = _mm256_and_si256(_mm256_srli_epi64::<4>(x), mask);
                let mut product =
                    _mm256_xor_si256(_mm256_shuffle_epi8(lo, low), _mm256_shuffle_epi8(hi, high));
                if XOR {
                    let old = _mm256_loadu_si256(dst.add(off).cast::<__m256i>());
                    product = _mm256_xor_si256(product, old);
                }
                _mm256_storeu_si256(dst.add(off).cast::<__m256i>(), product);
                off += 32;
            }
        }
        whole
    }

    /// The 16-byte SSSE3 version of [`mul_avx2`].
    ///
    /// # Safety
    /// As [`mul_avx2`], with SSSE3 instead of AVX2.
    #[target_feature(enable = "ssse3")]
    pub(super) unsafe fn mul_ssse3<const XOR: bool>(
        tables: &[[u8; 16]; 2],
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> usize {
        let whole = len / 16 * 16;
        // SAFETY: as in `mul_avx2`.
        unsafe {
            let lo = _mm_loadu_si128(tables[0].as_ptr().cast());
            let hi = _mm_loadu_si128(tables[1].as_ptr().cast());
            let mask = _mm_set1_epi8(0x0f);
            let mut off = 0;
            while off < whole {
                let x = _mm_loadu_si128(src.add(off).cast::<__m128i>());
                let low = _mm_and_si128(x, mask);
                let high = _mm_and_si128(_mm_srli_epi64::<4>(x), mask);
                let mut product =
                    _mm_xor_si128(_mm_shuffle_epi8(lo, low), _mm_shuffle_epi8(hi, high));
                if XOR {
                    let old = _mm_loadu_si128(dst.add(off).cast::<__m128i>());
                    product = _mm_xor_si128(product, old);
                }
                _mm_storeu_si128(dst.add(off).cast::<__m128i>(), product);
                off += 16;
            }
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Carry-less multiply reduced bit by bit: the definition, not a table.
    fn slow_mul(mut a: u8, mut b: u8) -> u8 {
        let mut product = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                product ^= a;
            }
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= (POLY & 0xff) as u8;
            }
            b >>= 1;
        }
        product
    }

    #[test]
    fn tables_match_the_definition() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), slow_mul(a, b), "{a:#x}·{b:#x}");
            }
            if a != 0 {
                let a_inv = inv(a).unwrap();
                assert_eq!(mul(a, a_inv), 1);
                assert_eq!(exp2(usize::from(log2(a).unwrap())), a);
                assert_eq!(div(a, a), Some(1));
            }
        }
        assert_eq!(inv(0), None);
        assert_eq!(log2(0), None);
        assert_eq!(div(5, 0), None);
    }

    #[test]
    fn generator_has_order_255() {
        let mut x = 1u8;
        for i in 0..ORDER {
            assert_eq!(exp2(i), x);
            assert!(i == 0 || x != 1, "g^{i} = 1");
            x = slow_mul(x, GENERATOR);
        }
        assert_eq!(x, 1);
        assert_eq!(exp2(ORDER), 1);
        assert_eq!(exp2(8), 0x1d);
    }

    #[test]
    fn mul2_word_doubles_each_byte() {
        let bytes: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0x81, 0xca, 0xfe, 0xff];
        let doubled = mul2_word(u64::from_ne_bytes(bytes)).to_ne_bytes();
        for (d, b) in doubled.iter().zip(bytes) {
            assert_eq!(*d, slow_mul(b, 2));
        }
    }

    /// Every kernel agrees with byte-wise `mul` for all lengths around the
    /// vector widths (whole vectors, tails, both together).
    #[test]
    fn kernels_match_scalar() {
        let input: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        let base: Vec<u8> = (0..200u32).map(|i| (i * 91 + 5) as u8).collect();
        for c in [0u8, 1, 2, 3, 0x1d, 0x80, 0x8e, 0xff] {
            for len in [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 100, 200] {
                let input = &input[..len];
                let mut out = base[..len].to_vec();
                mul_slice_xor(c, input, &mut out);
                for j in 0..len {
                    assert_eq!(
                        out[j],
                        base[j] ^ slow_mul(c, input[j]),
                        "xor c={c} len={len}"
                    );
                }
                mul_slice(c, input, &mut out);
                for j in 0..len {
                    assert_eq!(out[j], slow_mul(c, input[j]), "set c={c} len={len}");
                }
                let mut buf = input.to_vec();
                mul_slice_in_place(c, &mut buf);
                assert_eq!(buf, out, "in place c={c} len={len}");
                let mut x = base[..len].to_vec();
                xor_slice(&mut x, input);
                for j in 0..len {
                    assert_eq!(x[j], base[j] ^ input[j]);
                }
            }
        }
    }

    /// The SSSE3 kernel, which the dispatcher skips on AVX2 machines.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn ssse3_kernel_matches_scalar() {
        if !std::arch::is_x86_feature_detected!("ssse3") {
            return;
        }
        let input: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        for c in [2u8, 0x53, 0xff] {
            let mut out = vec![7u8; 64];
            let done = unsafe {
                x86::mul_ssse3::<true>(
                    &NIBBLES[usize::from(c)],
                    input.as_ptr(),
                    out.as_mut_ptr(),
                    50,
                )
            };
            assert_eq!(done, 48);
            for j in 0..48 {
                assert_eq!(out[j], 7 ^ slow_mul(c, input[j]));
            }
            assert!(out[48..].iter().all(|&b| b == 7));
        }
    }
}
