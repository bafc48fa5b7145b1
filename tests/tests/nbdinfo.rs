//! `nbdinfo` (libnbd-bin) against the node: export listing, sizes, flags, block sizes, the
//! default export, unknown exports and block status (`--map`).

use nbdraid_tests::{Node, hang, require_tools, run, run_ok, show, tool};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn nbdinfo_json(args: &[&str], uri: &str) -> Value {
    let out = run_ok(tool("nbdinfo").arg("--json").args(args).arg(uri), hang(60));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{}", show(&out)))
}

fn export<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .find(|e| e["export-name"] == name)
        .unwrap_or_else(|| panic!("export {name:?} not listed in {j:#}"))
}

/// Exit status of `nbdinfo --is/--can`: 0 true, 2 false, anything else an error.
fn flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = run(tool("nbdinfo").args([kind, what, uri]), hang(60)).expect("nbdinfo");
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {kind} {what} {uri} failed: {}\n{}",
            out.status,
            show(&out)
        ),
    }
}

#[test]
fn list_shows_every_export_with_sizes_and_flags() {
    require_tools!("nbdinfo");
    let node = Node::start(&["vol0:64M", "vol1:32M", "ro0:16M:ro"]);
    let j = nbdinfo_json(&["--list"], &node.uri(""));
    assert_eq!(j["protocol"], "newstyle-fixed", "{j:#}");
    assert_eq!(j["TLS"], false);
    assert_eq!(
        j["structured"], true,
        "structured replies should be negotiated: {j:#}"
    );
    let names: Vec<&str> = j["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("name"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["ro0", "vol0", "vol1"], "listed exports: {names:?}");

    for (name, size, ro) in [
        ("vol0", 64 * MIB, false),
        ("vol1", 32 * MIB, false),
        ("ro0", 16 * MIB, true),
    ] {
        let e = export(&j, name);
        assert_eq!(e["export-size"], size, "{name}: {e:#}");
        assert_eq!(e["is_read_only"], ro, "{name}: {e:#}");
        assert_eq!(e["can_multi_conn"], true, "{name}: {e:#}");
        assert_eq!(e["can_flush"], true, "{name}: {e:#}");
        assert_eq!(e["can_cache"], true, "{name}: {e:#}");
        assert_eq!(e["can_df"], true, "{name}: {e:#}");
        let contexts = e["contexts"].as_array().expect("contexts");
        assert!(
            contexts.iter().any(|c| c == "base:allocation"),
            "{name}: {e:#}"
        );
        if !ro {
            for f in ["can_fua", "can_trim", "can_zero"] {
                assert_eq!(e[f], true, "{name} {f}: {e:#}");
            }
        }
        if node.is_node() {
            if !ro {
                assert_eq!(e["can_fast_zero"], true, "{name}: {e:#}");
            }
            assert_eq!(e["block_size_minimum"], 1, "{name}: {e:#}");
            assert_eq!(e["block_size_preferred"], 4096, "{name}: {e:#}");
            assert_eq!(e["block_size_maximum"], 32 * MIB, "{name}: {e:#}");
        }
    }
}

#[test]
fn single_export_details_and_flag_queries() {
    require_tools!("nbdinfo");
    let node = Node::start(&["vol0:64M", "ro0:16M:ro"]);
    let vol = node.uri("vol0");
    let ro = node.uri("ro0");

    let size = run_ok(tool("nbdinfo").args(["--size", &vol]), hang(60));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (64 * MIB).to_string()
    );

    let j = nbdinfo_json(&[], &vol);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "vol0", "{j:#}");
    assert_eq!(e["export-size"], 64 * MIB, "{j:#}");

    // Human-readable form too.
    let text = run_ok(tool("nbdinfo").arg(&ro), hang(60));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("export-size: 16777216"), "{text}");
    assert!(text.contains("is_read_only: true"), "{text}");

    assert!(flag("--can", "connect", &vol));
    assert!(flag("--can", "multi-conn", &vol));
    assert!(flag("--can", "flush", &vol));
    assert!(flag("--can", "fua", &vol));
    assert!(flag("--can", "trim", &vol));
    assert!(flag("--can", "zero", &vol));
    assert!(flag("--can", "cache", &vol));
    assert!(flag("--can", "df", &vol));
    assert!(flag("--can", "structured-reply", &vol));
    assert!(!flag("--is", "read-only", &vol));
    assert!(flag("--can", "write", &vol));
    assert!(!flag("--is", "tls", &vol));
    assert!(flag("--is", "read-only", &ro));
    assert!(!flag("--can", "write", &ro));
    if node.is_node() {
        assert!(flag("--can", "fast-zero", &vol));
    }
}

#[test]
fn default_export_maps_to_the_only_volume() {
    require_tools!("nbdinfo");
    let node = Node::start(&["only:48M"]);
    let j = nbdinfo_json(&[], &node.uri(""));
    assert_eq!(j["exports"][0]["export-size"], 48 * MIB, "{j:#}");
}

#[test]
fn default_export_flag_selects_a_volume() {
    require_tools!("nbdinfo");
    let node = Node::builder()
        .volume("a:16M")
        .volume("b:24M")
        .default_export("b")
        .start();
    let j = nbdinfo_json(&[], &node.uri(""));
    assert_eq!(j["exports"][0]["export-size"], 24 * MIB, "{j:#}");
}

#[test]
fn no_default_export_with_several_volumes() {
    require_tools!("nbdinfo");
    let node = Node::start(&["a:16M", "b:24M"]);
    let out = run(tool("nbdinfo").arg(node.uri("")), hang(60)).expect("nbdinfo");
    assert!(
        !out.status.success(),
        "the default export must not exist with two volumes and no --default-export:\n{}",
        show(&out)
    );
}

#[test]
fn unknown_export_is_refused_and_the_server_keeps_serving() {
    require_tools!("nbdinfo");
    let node = Node::start(&["vol0:16M"]);
    let out = run(tool("nbdinfo").arg(node.uri("no-such-export")), hang(60)).expect("nbdinfo");
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded:\n{}",
        show(&out)
    );
    assert!(flag("--can", "connect", &node.uri("vol0")));
}

#[test]
fn map_reports_data_and_holes() {
    require_tools!("nbdinfo", "qemu-io");
    let node = Node::start(&["vol0:16M"]);
    let uri = node.uri("vol0");
    // A fresh sparse volume: everything is a hole that reads as zero.
    let j = nbdinfo_json(&["--map"], &uri);
    let extents = j.as_array().expect("map is an array");
    assert!(!extents.is_empty());
    for e in extents {
        let ty = e["type"].as_u64().expect("type");
        assert_eq!(ty & 2, 2, "fresh volume must be reported as zero: {j:#}");
    }
    // Write 1 MiB of data at 4 MiB; it must not be reported as a hole or zero.
    run_ok(
        tool("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x5a 4M 1M"]),
        hang(60),
    );
    let j = nbdinfo_json(&["--map"], &uri);
    let mut covered = 0u64;
    for e in j.as_array().expect("map is an array") {
        let off = e["offset"].as_u64().expect("offset");
        let len = e["length"].as_u64().expect("length");
        assert_eq!(off, covered, "extents must be contiguous: {j:#}");
        covered += len;
        let overlaps = off < 5 * MIB && off + len > 4 * MIB;
        if overlaps {
            // type bits: 1 = hole, 2 = zero (base:allocation).
            assert_eq!(e["type"], 0, "written range reported as hole/zero: {j:#}");
        }
    }
    assert_eq!(covered, 16 * MIB, "map must cover the export: {j:#}");
}
