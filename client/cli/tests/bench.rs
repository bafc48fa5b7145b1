//! `nbdraid bench` against real servers, briefly: JSON parsed, verify
//! clean, every mode and connection layout exercised.

// Tests unwrap freely (allow-unwrap-in-tests covers only #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nbdraid_harness::{Node, Peer};
use serde_json::Value;

fn bench(uri: &str, extra: &[&str]) -> Value {
    let mut args = vec!["bench", "--json", uri];
    args.extend_from_slice(extra);
    let out = ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn assert_sane(v: &Value) {
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert!(v["iops"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["latency_us"]["p50"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["latency_us"]["p99_9"].as_f64().unwrap() >= v["latency_us"]["p50"].as_f64().unwrap());
    assert!(v["cpu"]["total_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cpu"]["us_per_io"].as_f64().unwrap() > 0.0, "{v}");
}

fn assert_verified(v: &Value) {
    let vr = &v["verify"];
    assert_eq!(vr["errors"], 0, "{v}");
    assert!(vr["final_checked"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn mix_verify_nbdkit() {
    let Some(srv) = Peer::nbdkit_memory("mix_verify_nbdkit", 64 << 20, &[]) else {
        return;
    };
    let v = bench(
        &srv.uri(""),
        &[
            "-d",
            "1s",
            "--rw",
            "mix",
            "--mix-read",
            "70",
            "--verify",
            "--size",
            "4M",
        ],
    );
    assert_sane(&v);
    assert_verified(&v);
    assert!(
        v["reads"].as_u64().unwrap() > 0 && v["writes"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(v["verify"]["verified_reads"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["rw"], "mix");
    assert_eq!(v["mix_read"], 70);
}

#[test]
fn write_verify_node_two_connections() {
    let node = Node::start(&["vol0:64M"]);
    let v = bench(
        &node.uri("vol0"),
        &[
            "-d",
            "1s",
            "--rw",
            "write",
            "--verify",
            "--pattern",
            "seq",
            "-c",
            "2",
            "--size",
            "8M",
        ],
    );
    assert_sane(&v);
    assert_verified(&v);
    assert_eq!(v["connections"], 2);
    assert_eq!(v["reads"], 0);
}

#[test]
fn mix_verify_node_multi_conn_threads() {
    let node = Node::start(&["vol0:64M"]);
    let v = bench(
        &node.uri("vol0"),
        &[
            "-d",
            "1s",
            "--rw",
            "mix",
            "--verify",
            "-b",
            "64k",
            "--queue-depth",
            "8",
            "-c",
            "2",
            "--multi-conn",
            "--threads",
            "2",
        ],
    );
    assert_sane(&v);
    assert_verified(&v);
    assert_eq!(v["connection_mode"], "multi-conn");
    assert_eq!(v["connections"], 2);
}

#[test]
fn ops_limit_and_text_output() {
    let Some(srv) = Peer::nbdkit_memory("ops_limit_and_text_output", 64 << 20, &[]) else {
        return;
    };
    let v = bench(&srv.uri(""), &["--ops", "1000", "--rw", "read"]);
    assert_eq!(v["ops"], 1000);
    assert_eq!(v["reads"], 1000);
    let v = bench(
        &srv.uri(""),
        &["--ops", "999", "--queue-low", "8", "--rw", "write"],
    );
    assert_eq!(v["ops"], 999);
    assert_eq!(v["writes"], 999);
    let text = ok(&[
        "bench",
        "--ops",
        "500",
        "--offset",
        "1M",
        "--size",
        "1M",
        "-b",
        "512",
        &srv.uri(""),
    ]);
    for want in ["IOPS", "p99", "us per I/O", "ops         500"] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
