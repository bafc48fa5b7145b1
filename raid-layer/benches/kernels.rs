//! A quick throughput check of the parity kernels on 64 KiB buffers:
//! `cargo bench -p nbdraid-raid --bench kernels` prints MB/s (of input
//! data) per kernel. It asserts nothing; it is for comparing kernels and
//! machines, not for CI.

use std::hint::black_box;
use std::time::{Duration, Instant};

use nbdraid_raid::gf;
use nbdraid_raid::parity::{self, Redundancy};

const LEN: usize = 64 * 1024;
const DATA_CHUNKS: usize = 6;

/// Runs `f` (which processes `bytes` bytes) for about half a second and
/// prints its throughput.
fn measure(name: &str, bytes: usize, mut f: impl FnMut()) {
    for _ in 0..10 {
        f();
    }
    let mut rounds = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        for _ in 0..16 {
            f();
        }
        rounds += 16;
    }
    let secs = started.elapsed().as_secs_f64();
    let mb_per_s = (rounds as f64 * bytes as f64) / secs / 1e6;
    println!("{name:<40} {mb_per_s:>10.0} MB/s");
}

fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() {
    println!("multiply kernel: {}", gf::kernel_name());
    let input = pattern(1);
    let mut out = pattern(2);
    measure("xor_slice 64 KiB", LEN, || {
        gf::xor_slice(black_box(&mut out), black_box(&input));
    });
    measure("mul_slice_xor 64 KiB", LEN, || {
        gf::mul_slice_xor(black_box(0x53), black_box(&input), black_box(&mut out));
    });
    measure("mul_slice 64 KiB", LEN, || {
        gf::mul_slice(black_box(0x53), black_box(&input), black_box(&mut out));
    });

    let data: Vec<Vec<u8>> = (0..DATA_CHUNKS as u64).map(pattern).collect();
    let (mut p, mut q) = (vec![0u8; LEN], vec![0u8; LEN]);
    let data_bytes = DATA_CHUNKS * LEN;
    measure("gen_p 6 x 64 KiB (MB/s of data)", data_bytes, || {
        parity::gen_p(black_box(&data), black_box(&mut p)).ok();
    });
    measure("gen_pq 6 x 64 KiB (MB/s of data)", data_bytes, || {
        parity::gen_pq(black_box(&data), black_box(&mut p), black_box(&mut q)).ok();
    });
    let (old, new) = (pattern(10), pattern(11));
    measure("update_pq 64 KiB (MB/s of new data)", LEN, || {
        parity::update_pq(3, &mut p, &mut q, black_box(&old), black_box(&new)).ok();
    });

    let mut stripe = data.clone();
    stripe.push(p.clone());
    stripe.push(q.clone());
    measure("reconstruct 2 data, 6+2 (MB/s of data)", data_bytes, || {
        parity::reconstruct(Redundancy::PQ, black_box(&mut stripe), &[1, 4]).ok();
    });
    measure("reconstruct data from Q, 6+2", data_bytes, || {
        parity::reconstruct(Redundancy::PQ, black_box(&mut stripe), &[2, DATA_CHUNKS]).ok();
    });
}
