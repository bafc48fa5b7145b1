//! The node daemon's own interface: the ready file, the metrics endpoint, `--check-config`,
//! bad arguments, several nodes side by side.

use std::net::TcpStream;
use std::process::Command;

use nbdraid_tests::{Node, hang, node_binary, require_tools, run, run_ok, scratch_dir, show, tool};

fn node_only(node: &Node, test: &str) -> bool {
    if !node.is_node() {
        eprintln!("SKIP {test}: node-specific");
    }
    node.is_node()
}

#[test]
fn ready_file_describes_the_running_node() {
    let node = Node::start(&["vol:16M"]);
    if !node_only(&node, "ready_file_describes_the_running_node") {
        return;
    }
    let r = node.ready();
    assert_eq!(r.pid, node.pid());
    assert!(r.nbd.ip().is_loopback(), "{r:?}");
    assert_ne!(r.nbd.port(), 0, "{r:?}");
    assert!(
        r.metrics.is_none(),
        "metrics listener without --metrics-listen: {r:?}"
    );
    TcpStream::connect_timeout(&r.nbd, hang(10)).expect("NBD port accepts connections");
}

#[test]
fn two_nodes_side_by_side_get_distinct_ports() {
    require_tools!("nbdinfo");
    let a = Node::start(&["vol:16M"]);
    let b = Node::start(&["vol:32M"]);
    assert_ne!(a.port(), b.port());
    for (n, size) in [(&a, 16u64 << 20), (&b, 32 << 20)] {
        let out = run_ok(tool("nbdinfo").args(["--size", &n.uri("vol")]), hang(60));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string()
        );
    }
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    require_tools!("qemu-io");
    let node = Node::builder().volume("vol:16M").metrics().start();
    if !node_only(&node, "metrics_endpoint_serves_prometheus_text") {
        return;
    }
    let addr = node
        .metrics_addr()
        .expect("ready file has a metrics address");
    assert!(addr.ip().is_loopback());
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            &node.uri("vol"),
            "-c",
            "write -P 1 0 1M",
            "-c",
            "read -P 1 0 1M",
        ]),
        hang(60),
    );
    let body = node
        .metrics_text()
        .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"));
    let samples: Vec<&str> = body
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!samples.is_empty(), "no samples in /metrics:\n{body}");
    for l in &samples {
        let value = l.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "not a Prometheus sample line: {l:?}"
        );
    }
}

#[test]
fn check_config_validates_and_exits() {
    if nbdraid_tests::backend() != nbdraid_tests::Backend::Node {
        eprintln!("SKIP check_config_validates_and_exits: node-specific");
        return;
    }
    let dir = scratch_dir();
    let ready = dir.path().join("ready.json");
    let ok = run(
        Command::new(node_binary())
            .arg("--check-config")
            .args(["--listen", "127.0.0.1:0", "--volume", "vol:16M"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--ready-file")
            .arg(&ready),
        hang(30),
    )
    .expect("run --check-config");
    assert!(ok.status.success(), "valid config rejected:\n{}", show(&ok));
    assert!(
        !ready.exists(),
        "--check-config must not start serving (ready file written)"
    );

    for bad in [
        &["--volume", "vol:notasize"][..],
        &["--volume", ":16M"],
        &["--listen", "nonsense"],
    ] {
        let out = run(
            Command::new(node_binary())
                .arg("--check-config")
                .args(bad)
                .arg("--data-dir")
                .arg(dir.path().join("data2")),
            hang(30),
        )
        .expect("run --check-config");
        assert!(
            !out.status.success(),
            "invalid args {bad:?} accepted:\n{}",
            show(&out)
        );
    }
}

#[test]
fn bad_arguments_fail_fast() {
    if nbdraid_tests::backend() != nbdraid_tests::Backend::Node {
        eprintln!("SKIP bad_arguments_fail_fast: node-specific");
        return;
    }
    let dir = scratch_dir();
    let out = run(
        Command::new(node_binary())
            .args(["--listen", "127.0.0.1:0", "--volume", "x:12Q"])
            .arg("--data-dir")
            .arg(dir.path()),
        hang(30),
    )
    .expect("run");
    assert!(
        !out.status.success(),
        "bad --volume accepted:\n{}",
        show(&out)
    );
}
