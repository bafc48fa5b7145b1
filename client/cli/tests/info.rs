//! `nbdraid info` against real servers: text and JSON, flags, block sizes,
//! meta contexts and the allocation summary (complete and bounded).

// Tests unwrap freely (allow-unwrap-in-tests covers only #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nbdraid_harness::{Node, Peer, TempDir};
use serde_json::Value;

fn info_json(uri: &str, extra: &[&str]) -> Value {
    let mut args = vec!["info", "--json", uri];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args)).unwrap()
}

#[test]
fn nbdkit_memory_text_and_json() {
    let Some(srv) = Peer::nbdkit_memory("nbdkit_memory_text_and_json", 1 << 30, &[]) else {
        return;
    };
    let text = ok(&["info", &srv.uri("")]);
    for want in [
        "size:               1073741824 (1.0 GiB)",
        "multi-conn",
        "fast-zero",
        "structured replies: yes",
        "meta contexts:      base:allocation",
        "1 extents in 1 requests",
        "(whole export)",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let v = info_json(&srv.uri(""), &[]);
    assert_eq!(v["size"], 1u64 << 30);
    assert_eq!(v["flags"]["read-only"], false);
    assert_eq!(v["flags"]["flush"], true);
    assert_eq!(v["flags"]["trim"], true);
    assert_eq!(v["flags"]["zeroes"], true);
    assert_eq!(v["flags"]["multi-conn"], true);
    assert!(v["block_size"]["minimum"].as_u64().unwrap() >= 1);
    assert!(v["block_size"]["maximum"].as_u64().unwrap() >= 512);
    assert_eq!(v["meta_contexts"][0], "base:allocation");
    assert_eq!(v["allocation"]["complete"], true);
    assert_eq!(v["allocation"]["data"], 0);
    assert_eq!(v["allocation"]["zero"], 1u64 << 30);
    let none = info_json(&srv.uri(""), &["--no-map"]);
    assert!(none["allocation"].is_null());
}

#[test]
fn read_only_export() {
    let Some(srv) = Peer::nbdkit("read_only_export", &["-r", "memory", "size=16M"]) else {
        return;
    };
    let v = info_json(&srv.uri(""), &[]);
    assert_eq!(v["flags"]["read-only"], true);
    assert!(ok(&["info", &srv.uri("")]).contains("flags:              read-only"));
}

#[test]
fn node_allocation_full_and_bounded() {
    let node = Node::start(&["vol0:256M"]);
    let uri = node.uri("vol0");
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("frag.img");
    // 2000 data blocks of 4 KiB, every 64 KiB from 64 MiB on: many extents.
    let ranges: Vec<(u64, usize)> = (0..2000).map(|i| ((64 << 20) + i * 65536, 4096)).collect();
    let data = sparse_file(&src, 256 << 20, &ranges, 7);
    ok(&["cp", "--quiet", "-b", "64k", src.to_str().unwrap(), &uri]);

    let v = info_json(&uri, &[]);
    assert_eq!(v["export"], "vol0");
    assert_eq!(v["size"], 256u64 << 20);
    let a = &v["allocation"];
    assert_eq!(a["complete"], true, "{v}");
    assert_eq!(a["scanned"], 256u64 << 20);
    assert_eq!(
        a["data"].as_u64().unwrap() + a["zero"].as_u64().unwrap(),
        256u64 << 20
    );
    assert!(a["data"].as_u64().unwrap() >= data, "{a}");
    assert!(a["data"].as_u64().unwrap() <= 2 * data, "{a}");
    assert!(a["extents"].as_u64().unwrap() >= 2000, "{a}");

    // One request can't cover it all (servers cap extents per reply):
    // the walk stops after one and says so.
    let requests = a["requests"].as_u64().unwrap();
    if requests > 1 {
        let p = info_json(&uri, &["--map-requests", "1"]);
        assert_eq!(p["allocation"]["complete"], false, "{p}");
        assert_eq!(p["allocation"]["requests"], 1);
        assert!(
            p["allocation"]["stopped"]
                .as_str()
                .unwrap()
                .contains("request limit")
        );
        let text = ok(&["info", "--map-requests", "1", &uri]);
        assert!(
            text.contains("(partial)") && text.contains("walk stopped"),
            "{text}"
        );
    }
}
