//! Runs the libnbd + raw-socket conformance suite (`tests/python/conformance.py`) under
//! Debian's `/usr/bin/python3` against a node serving a writable, a read-only and a 200 MiB
//! volume. The script prints one PASS/FAIL/SKIP line per check; any FAIL fails this test.
//!
//! `NBDRAID_CONFORMANCE_FILTER=a,b` runs only the checks whose names contain `a` or `b`.

use std::path::Path;
use std::process::Command;

use nbdraid_tests::{Node, SYSTEM_PYTHON, hang, have_python_libnbd, run, show};

#[test]
fn libnbd_conformance_suite() {
    if !have_python_libnbd("libnbd_conformance_suite") {
        return;
    }
    let mut node = Node::builder()
        .volume("vol:64M")
        .volume("ro:16M:ro")
        .volume("big:200M")
        .default_export("vol")
        .start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/conformance.py");
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg(&script)
        .args(["--rw-uri", &node.uri("vol")])
        .args(["--ro-uri", &node.uri("ro")])
        .args(["--big-uri", &node.uri("big")])
        .args(["--exports", "vol,ro,big", "--default-is", "vol"])
        .args(["--server-pid", &node.pid().to_string()]);
    if node.is_node() {
        cmd.arg("--node");
    }
    if let Ok(filter) = std::env::var("NBDRAID_CONFORMANCE_FILTER") {
        for f in filter.split(',').filter(|f| !f.is_empty()) {
            cmd.args(["-k", f]);
        }
    }
    let out = run(&mut cmd, hang(900)).unwrap_or_else(|e| panic!("{e:#}"));
    println!("{}", show(&out));
    assert!(
        out.status.success(),
        "conformance suite failed ({}); FAIL lines:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(node.is_running(), "node died during the conformance suite");
    let st = node.terminate();
    assert!(
        st.success() || !node.is_node(),
        "node exit after SIGTERM: {st}"
    );
}
