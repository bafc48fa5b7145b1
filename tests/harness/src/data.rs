//! Test data: one deterministic pattern generator for every suite, and
//! comparisons that name the first differing byte instead of dumping
//! megabytes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tempfile::TempDir;

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Write `len` deterministic pseudo-random bytes to `path`.
pub fn write_pattern_file(path: &Path, seed: u64, len: usize) {
    let mut f = fs::File::create(path).expect("create data file");
    let chunk = 1 << 20;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        f.write_all(&pattern(seed ^ (off as u64), n))
            .expect("write data file");
        off += n;
    }
    f.sync_all().ok();
}

/// Compare two files byte for byte; on mismatch, panic naming the first differing offset.
/// Reads both in 4 MiB chunks, so gigabyte (sparse) files cost no more memory than small ones.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (fa, fb) = (open(a), open(b));
    let len = |f: &fs::File, p: &Path| {
        f.metadata()
            .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
            .len()
    };
    let size = len(&fa, a);
    assert_eq!(
        size,
        len(&fb, b),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    const CHUNK: u64 = 4 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK) as usize;
        let read = |f: &fs::File, buf: &mut [u8], p: &Path| {
            f.read_exact_at(buf, off)
                .unwrap_or_else(|e| panic!("read {} at {off}: {e}", p.display()))
        };
        read(&fa, &mut ba[..n], a);
        read(&fb, &mut bb[..n], b);
        if let Some(i) = first_difference(&ba[..n], &bb[..n]) {
            panic!(
                "{} and {} differ first at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Parse a size like `64M`, `1G`, `512K` or plain bytes.
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("numeric size") * mult
}

/// A fresh temporary directory for test files (client-side data, mount points).
pub fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("nbdraid-test-")
        .tempdir()
        .expect("tempdir")
}

/// Returns the first index where `a` and `b` differ, for readable failures.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    // memcmp first: a byte loop is ~50x slower in the tests' debug build
    // (it made comparing 1 GiB take seconds).
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts two buffers are equal, naming the first differing byte (never
/// dumping megabytes).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: data differs at byte {i} (len {} vs {}): got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}
