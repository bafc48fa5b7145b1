//! `nbdraid cp` against real servers: sparse round trips (holes kept),
//! stale destinations, NBD to NBD, multi-conn, and zero detection.

// Tests unwrap freely (allow-unwrap-in-tests covers only #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nbdraid_harness::{Node, Peer, TempDir, assert_files_equal};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A few MiB of random data scattered over 1 GiB, aligned and not.
fn scattered_ranges() -> Vec<(u64, usize)> {
    vec![
        (0, MIB as usize),
        (123_456_789, 777_777),
        (300 * MIB + 12_345, 3_000),
        (512 * MIB, 2 * MIB as usize),
        (GIB - MIB, MIB as usize),
    ]
}

fn round_trip(uri: &str, extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let (src, back) = (dir.path().join("src.img"), dir.path().join("back.img"));
    let data = sparse_file(&src, GIB, &scattered_ranges(), 1);
    let (s, u, b) = (src.to_str().unwrap(), uri, back.to_str().unwrap());
    let mut to = vec!["cp", "--quiet", s, u];
    to.extend_from_slice(extra);
    ok(&to);
    let mut from = vec!["cp", s, b];
    from[1] = u;
    from.extend_from_slice(extra);
    let summary = ok(&from);
    assert!(summary.contains("copied 1.0 GiB"), "{summary}");
    assert_files_equal(&src, &back);
    let alloc = allocated(&back);
    assert!(
        alloc < 64 * MIB,
        "holes were not kept: {alloc} bytes allocated for {data} bytes of data"
    );
}

#[test]
fn sparse_1g_round_trip_nbdkit() {
    let Some(srv) = Peer::nbdkit_memory("sparse_1g_round_trip_nbdkit", GIB, &[]) else {
        return;
    };
    round_trip(&srv.uri(""), &[]);
}

#[test]
fn sparse_1g_round_trip_node_multi_conn() {
    let node = Node::start(&["vol0:1G"]);
    round_trip(
        &node.uri("vol0"),
        &["--connections", "4", "--queue-depth", "8"],
    );
}

/// The destination held other data: zero ranges must be zeroed, not skipped.
#[test]
fn stale_destination_is_overwritten() {
    let node = Node::start(&["vol0:64M"]);
    let uri = node.uri("vol0");
    // Fill the whole volume with non-zero data first.
    ok(&[
        "bench",
        "--rw",
        "write",
        "--pattern",
        "seq",
        "-b",
        "1M",
        "--ops",
        "64",
        "--queue-depth",
        "4",
        &uri,
    ]);
    let dir = TempDir::new().unwrap();
    let (src, back) = (dir.path().join("src.img"), dir.path().join("back.img"));
    sparse_file(
        &src,
        64 * MIB,
        &[(5 * MIB + 7, 100_000), (40 * MIB, MIB as usize)],
        2,
    );
    ok(&["cp", "--quiet", src.to_str().unwrap(), &uri]);
    ok(&["cp", "--quiet", &uri, back.to_str().unwrap()]);
    assert_files_equal(&src, &back);
}

#[test]
fn nbd_to_nbd() {
    let Some(a) = Peer::nbdkit_memory("nbd_to_nbd", 64 * MIB, &[]) else {
        return;
    };
    let node = Node::start(&["vol0:64M"]);
    let dir = TempDir::new().unwrap();
    let (src, back) = (dir.path().join("src.img"), dir.path().join("back.img"));
    sparse_file(
        &src,
        64 * MIB,
        &[
            (0, 4096),
            (9 * MIB + 1, 3 * MIB as usize),
            (63 * MIB, MIB as usize),
        ],
        3,
    );
    ok(&["cp", "--quiet", src.to_str().unwrap(), &a.uri("")]);
    ok(&["cp", "--quiet", "-b", "256k", &a.uri(""), &node.uri("vol0")]);
    ok(&["cp", "--quiet", &node.uri("vol0"), back.to_str().unwrap()]);
    assert_files_equal(&src, &back);
}

/// Explicitly written zeroes are found and sent as zero ranges.
#[test]
fn zero_blocks_are_detected() {
    use std::os::unix::fs::FileExt;
    let Some(srv) = Peer::nbdkit_memory("zero_blocks_are_detected", 64 * MIB, &[]) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src.img");
    sparse_file(&src, 64 * MIB, &[(32 * MIB, MIB as usize)], 4);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; 8 * MIB as usize], 16 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    let summary = ok(&["cp", src.to_str().unwrap(), &srv.uri("")]);
    assert!(
        summary.contains("(8.0 MiB of it detected in data)"),
        "{summary}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--json", &srv.uri("")])).unwrap();
    assert_eq!(info["allocation"]["data"].as_u64(), Some(MIB), "{info}");
}

#[test]
fn local_to_local_keeps_holes() {
    let dir = TempDir::new().unwrap();
    let (src, dst) = (dir.path().join("a.img"), dir.path().join("sub-b.img"));
    sparse_file(&src, 256 * MIB, &[(MIB, 4096), (200 * MIB + 3, 10_000)], 5);
    // The destination exists, longer and full of data: it is truncated first.
    std::fs::write(&dst, vec![0xffu8; 300 * MIB as usize]).unwrap();
    // --progress forces progress lines although stderr is a pipe here.
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let out = nbdraid(&["cp", "--progress", s, d]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/256.00 MiB"), "no progress lines: {err:?}");
    assert_files_equal(&src, &dst);
    assert!(allocated(&dst) < 16 * MIB);
    // --quiet: nothing at all.
    let out = nbdraid(&["cp", "--quiet", s, d]);
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty());
}
