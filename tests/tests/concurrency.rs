//! Many clients at once: 16 concurrent nbdcopy round trips (each with several connections)
//! on 16 volumes, and connection churn (hundreds of short-lived and abruptly closed
//! connections) without leaking file descriptors or breaking other clients.

use std::process::Command;
use std::thread;

use nbdraid_tests::{
    Node, SYSTEM_PYTHON, assert_files_equal, hang, have_python_libnbd, require_tools, run_ok,
    scratch_dir, show, tool, write_pattern_file,
};

#[test]
fn sixteen_concurrent_nbdcopy_roundtrips() {
    require_tools!("nbdcopy");
    let specs: Vec<String> = (0..16).map(|i| format!("v{i}:8M")).collect();
    let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let node = Node::start(&refs);
    let dir = scratch_dir();
    let uris: Vec<String> = (0..16).map(|i| node.uri(&format!("v{i}"))).collect();
    let handles: Vec<_> = uris
        .into_iter()
        .enumerate()
        .map(|(i, uri)| {
            let src = dir.path().join(format!("src{i}"));
            let back = dir.path().join(format!("back{i}"));
            thread::spawn(move || {
                write_pattern_file(&src, 1000 + i as u64, 8 << 20);
                run_ok(
                    tool("nbdcopy")
                        .args(["--connections=4", "--flush"])
                        .arg(&src)
                        .arg(&uri),
                    hang(300),
                );
                run_ok(
                    tool("nbdcopy")
                        .args(["--connections=4"])
                        .arg(&uri)
                        .arg(&back),
                    hang(300),
                );
                assert_files_equal(&src, &back);
            })
        })
        .collect();
    let mut failures = 0;
    for h in handles {
        if h.join().is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 0, "{failures} of 16 concurrent copies failed");
}

const CHURN: &str = r#"
import nbd, socket, struct, sys, os
uri, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keep = nbd.NBD(); keep.connect_uri(uri)
keep.pwrite(b"K" * 4096, 0)
for i in range(n):
    h = nbd.NBD(); h.connect_uri(uri)
    h.pwrite(struct.pack("<Q", i) * 64, 4096 + (i % 64) * 512)
    if i % 3 == 0:
        h.shutdown()            # clean NBD_CMD_DISC
    del h                       # otherwise: just close the socket
    s = socket.create_connection((host, port), timeout=30)
    s.recv(18)                  # greeting, then vanish mid-handshake
    if i % 2:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
assert keep.pread(4096, 0) == b"K" * 4096, "long-lived connection broken"
for i in range(max(0, n - 64), n):
    got = keep.pread(512, 4096 + (i % 64) * 512)
    assert got == struct.pack("<Q", i) * 64, f"write {i} lost"
print("OK")
"#;

fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

#[test]
fn connection_churn_does_not_leak_or_disturb() {
    if !have_python_libnbd("connection_churn_does_not_leak_or_disturb") {
        return;
    }
    let node = Node::start(&["vol:16M"]);
    let pid = node.pid();
    let port = node.port().to_string();
    // Warm up (lazy listeners, thread pools) before taking the baseline.
    let mut warm = Command::new(SYSTEM_PYTHON);
    warm.args(["-c", CHURN, &node.uri("vol"), &node.host(), &port, "20"]);
    run_ok(&mut warm, hang(120));
    let before = fd_count(pid);
    let mut c = Command::new(SYSTEM_PYTHON);
    c.args(["-c", CHURN, &node.uri("vol"), &node.host(), &port, "300"]);
    let out = run_ok(&mut c, hang(300));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}",
        show(&out)
    );
    // Closed connections must release their sockets (allow a little slack for timing).
    if let (Some(b), Some(_)) = (before, fd_count(pid)) {
        let settled = nbdraid_tests::wait_for("fds to settle", hang(30), || {
            fd_count(pid).filter(|&a| a <= b + 8)
        });
        assert!(
            settled.is_ok(),
            "node fds grew from {b} to {:?} after 300 closed connections",
            fd_count(pid)
        );
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The design's property: with a write flood far larger than the throttle budget, nothing
/// deadlocks, every write verifies, and the node's peak RSS stays within its budget plus a
/// fixed overhead. (16 jobs x 4 x 32 MiB = 2 GiB requested at once against a 96 MiB budget;
/// without the throttle the same flood peaked at ~550 MiB in a debug build.)
#[test]
fn throttle_bounds_memory_under_write_flood() {
    require_tools!("fio");
    if nbdraid_tests::backend() != nbdraid_tests::Backend::Node {
        eprintln!("SKIP throttle_bounds_memory_under_write_flood: node-specific");
        return;
    }
    let help = run_ok(
        Command::new(nbdraid_tests::node_binary()).arg("--help"),
        hang(30),
    );
    if !String::from_utf8_lossy(&help.stdout).contains("--throttle-capacity") {
        eprintln!("SKIP throttle_bounds_memory_under_write_flood: node has no --throttle-capacity");
        return;
    }
    const CAPACITY_MIB: u64 = 96;
    const OVERHEAD_MIB: u64 = 128;
    let node = Node::builder()
        .volume("flood:512M")
        .arg("--throttle-capacity")
        .arg(format!("{CAPACITY_MIB}M"))
        .start();
    let pid = node.pid();
    let baseline = peak_rss_kib(pid).expect("VmHWM");
    let dir = scratch_dir();
    let json = dir.path().join("fio.json");
    let out = nbdraid_tests::run(
        tool("fio")
            .current_dir(dir.path())
            .args(["--ioengine=nbd", "--output-format=json"])
            .arg(format!("--uri={}", node.uri("flood")))
            .arg(format!("--output={}", json.display()))
            .args([
                "--name=flood",
                "--numjobs=16",
                "--offset_increment=32M",
                "--size=32M",
                "--bs=32M",
                "--iodepth=4",
                "--rw=write",
                "--loops=2",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ]),
        hang(600),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "fio flood failed:\n{}", show(&out));
    let text = std::fs::read_to_string(&json).expect("fio json");
    let j: serde_json::Value =
        serde_json::from_str(&text[text.find('{').expect("json")..]).expect("fio json");
    for job in j["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"], 0, "{job:#}");
    }
    let peak = peak_rss_kib(pid).expect("VmHWM");
    println!("node RSS: baseline {baseline} KiB, peak {peak} KiB under the flood");
    assert!(
        peak < (CAPACITY_MIB + OVERHEAD_MIB) * 1024,
        "node peak RSS {peak} KiB exceeds the {CAPACITY_MIB} MiB budget + {OVERHEAD_MIB} MiB overhead \
         (baseline {baseline} KiB)"
    );
}
