//! fio with its NBD engine: random writes with crc32c verification, several jobs at once,
//! and a verify-only pass after the node was SIGKILLed and restarted.

use std::path::Path;

use nbdraid_tests::{Node, hang, require_tools, run, scratch_dir, show, tool};
use serde_json::Value;

fn fio(uri: &str, json_out: &Path, args: &[&str]) -> (std::process::Output, Value) {
    let mut c = tool("fio");
    // fio drops *-verify.state files into its working directory: keep them in the scratch dir.
    c.current_dir(json_out.parent().expect("scratch dir"));
    c.args(["--ioengine=nbd", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .arg(format!("--output={}", json_out.display()))
        .args(args);
    let out = run(&mut c, hang(600)).unwrap_or_else(|e| panic!("{e:#}"));
    let text = std::fs::read_to_string(json_out).unwrap_or_default();
    // fio may print notices before the JSON document.
    let j = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or(Value::Null);
    (out, j)
}

fn assert_clean(out: &std::process::Output, j: &Value, what: &str) {
    assert!(
        out.status.success(),
        "{what}: fio failed: {}\n{}\n{j:#}",
        out.status,
        show(out)
    );
    let jobs = j["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no JSON jobs\n{}", show(out)));
    assert!(!jobs.is_empty());
    for job in jobs {
        assert_eq!(job["error"], 0, "{what}: job error: {job:#}");
    }
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("verify:") && !text.contains("bad magic"),
        "{what}: {text}"
    );
}

fn total(j: &Value, dir: &str) -> u64 {
    j["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|x| x[dir]["io_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn fio_randwrite_verify_crc32c() {
    require_tools!("fio");
    let node = Node::start(&["vol:64M"]);
    let dir = scratch_dir();
    let (out, j) = fio(
        &node.uri("vol"),
        &dir.path().join("fio.json"),
        &[
            "--name=randwrite-verify",
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--size=64M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
        ],
    );
    assert_clean(&out, &j, "randwrite+verify");
    assert_eq!(total(&j, "write"), 64 << 20, "{j:#}");
    assert_eq!(
        total(&j, "read"),
        64 << 20,
        "verify pass must read everything back: {j:#}"
    );
}

#[test]
fn fio_parallel_jobs_verify() {
    require_tools!("fio");
    let node = Node::start(&["vol:64M"]);
    let dir = scratch_dir();
    let (out, j) = fio(
        &node.uri("vol"),
        &dir.path().join("fio.json"),
        &[
            "--name=par",
            "--numjobs=8",
            "--offset_increment=8M",
            "--size=8M",
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    assert_clean(&out, &j, "8 parallel jobs");
    assert_eq!(j["jobs"].as_array().map(Vec::len), Some(8), "{j:#}");
    assert_eq!(total(&j, "write"), 64 << 20);
    assert_eq!(total(&j, "read"), 64 << 20);
}

#[test]
fn fio_verify_after_kill9_and_restart() {
    require_tools!("fio", "qemu-io");
    let mut node = Node::start(&["vol:32M"]);
    let dir = scratch_dir();
    let common = [
        "--name=persist",
        "--rw=write",
        "--bs=64k",
        "--size=32M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
    ];
    let mut write = common.to_vec();
    write.extend(["--do_verify=0", "--end_fsync=1"]);
    let (out, j) = fio(&node.uri("vol"), &dir.path().join("w.json"), &write);
    assert_clean(&out, &j, "write phase");

    node.kill9();
    node.restart();

    let mut verify = common.to_vec();
    verify.push("--verify_only");
    let (out, j) = fio(&node.uri("vol"), &dir.path().join("v.json"), &verify);
    assert_clean(&out, &j, "verify-only after restart");
    assert_eq!(total(&j, "read"), 32 << 20, "{j:#}");

    // The verification really checks: corrupt one block and it must fail.
    let io = run(
        tool("qemu-io").args(["-f", "raw", &node.uri("vol"), "-c", "write -P 0x42 1M 4k"]),
        hang(60),
    )
    .expect("qemu-io");
    assert!(io.status.success(), "{}", show(&io));
    let (out, _) = fio(&node.uri("vol"), &dir.path().join("c.json"), &verify);
    assert!(
        !out.status.success(),
        "fio verify did not detect a corrupted block:\n{}",
        show(&out)
    );
}
