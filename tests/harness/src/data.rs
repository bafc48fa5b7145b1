//! Test data: one deterministic pattern generator for every suite, and
//! comparisons that name the first differing byte instead of dumping
//! megabytes.

use std::fs;
use std::io::Write;
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
pub fn assert_files_equal(a: &Path, b: &Path) {
    let da = fs::read(a).unwrap_or_else(|e| panic!("read {}: {e}", a.display()));
    let db = fs::read(b).unwrap_or_else(|e| panic!("read {}: {e}", b.display()));
    assert_eq!(
        da.len(),
        db.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(i) = da.iter().zip(&db).position(|(x, y)| x != y) {
        panic!(
            "{} and {} differ first at byte {i} ({:#04x} vs {:#04x})",
            a.display(),
            b.display(),
            da[i],
            db[i]
        );
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
