//! qemu-utils against the node: `qemu-img info/convert/compare` and `qemu-io` pattern I/O.

use std::process::Output;

use nbdraid_tests::{
    Node, assert_files_equal, hang, output_text, require_tools, run, run_ok, scratch_dir, show,
    tool, write_pattern_file,
};

const MIB: u64 = 1 << 20;

/// Run qemu-io commands on an export; panics if qemu-io fails or reports an error.
fn qemu_io(uri: &str, extra: &[&str], cmds: &[&str]) -> Output {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]).args(extra).arg(uri);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c, hang(120));
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        !text.contains("pattern verification failed")
            && !text.contains("failed")
            && !text.contains("error"),
        "qemu-io {cmds:?} reported a failure:\n{}",
        show(&out)
    );
    out
}

#[test]
fn qemu_img_info_reports_virtual_size() {
    require_tools!("qemu-img");
    let node = Node::start(&["vol:64M", "small:3M"]);
    for (name, size) in [("vol", 64 * MIB), ("small", 3 * MIB)] {
        let out = run_ok(
            tool("qemu-img")
                .args(["info", "--output=json"])
                .arg(node.uri(name)),
            hang(60),
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(j["virtual-size"], size, "{name}: {j:#}");
        assert_eq!(j["format"], "raw", "{name}: {j:#}");
    }
}

#[test]
fn qemu_img_convert_both_ways() {
    require_tools!("qemu-img");
    let node = Node::start(&["vol:64M"]);
    let dir = scratch_dir();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    write_pattern_file(&src, 0xABCD, 64 * MIB as usize);
    // -n: the target exists (the export); do not try to create it.
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(node.uri("vol")),
        hang(300),
    );
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(node.uri("vol")),
        hang(300),
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(node.uri("vol"))
            .arg(&back),
        hang(300),
    );
    assert_files_equal(&src, &back);

    // Change one MiB through qemu-io; compare must now notice the difference.
    qemu_io(&node.uri("vol"), &[], &["write -P 0x33 10M 1M"]);
    let out = run(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(node.uri("vol")),
        hang(300),
    )
    .expect("qemu-img compare");
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must report a difference:\n{}",
        show(&out)
    );
}

#[test]
fn qemu_io_patterns() {
    require_tools!("qemu-io");
    let node = Node::start(&["vol:64M", "ro:8M:ro"]);
    let uri = node.uri("vol");
    qemu_io(
        &uri,
        &[],
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1M 4k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 4k",
            "write -P 0x11 63M 1M",
            "read -P 0x11 63M 1M",
            "write -z 512k 64k",
            "read -P 0 512k 64k",
            "read -P 0xab 0 512k",
            "discard 32M 1M",
            "aio_write -P 0x77 40M 256k",
            "aio_write -P 0x78 41M 256k",
            "aio_flush",
            "read -P 0x77 40M 256k",
            "read -P 0x78 41M 256k",
            "write -f -P 0x99 42M 64k",
            "flush",
            "read -P 0 20M 1M",
        ],
    );
    // A second connection sees the same data.
    qemu_io(
        &uri,
        &["-r"],
        &[
            "read -P 0xab 0 512k",
            "read -P 0x11 63M 1M",
            "read -P 0x99 42M 64k",
        ],
    );
    // The checks can fail: a wrong pattern is reported.
    let out = run(
        tool("qemu-io").args(["-f", "raw", "-r", &uri, "-c", "read -P 0x5a 0 4k"]),
        hang(60),
    )
    .expect("qemu-io");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "wrong pattern not detected:\n{}",
        show(&out)
    );
    // Read-only export: reads work, writes fail.
    let ro = node.uri("ro");
    qemu_io(&ro, &["-r"], &["read -P 0 0 1M"]);
    let out = run(
        tool("qemu-io").args(["-f", "raw", &ro, "-c", "write -P 1 0 4k"]),
        hang(60),
    )
    .expect("qemu-io");
    let text = output_text(&out);
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("read-only"),
        "write to a read-only export did not fail:\n{}",
        show(&out)
    );
}
