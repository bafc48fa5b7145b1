//! The node's rough edges, as a new user met them: the message a user gets
//! for each mistake (one line, once, saying what to change), nothing left
//! behind by a start that fails, metrics that describe themselves and
//! forget deleted volumes, and the quick start's behaviour when run twice.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use nbdraid_tests::*;

/// Runs the node binary with `args`, bounded, returning its output.
fn node(args: &[&str]) -> Output {
    run(Command::new(node_binary()).args(args), hang(60)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the failure says `want`, exactly once (not once from the
/// logger and again on exit), and no Rust debug output.
#[track_caller]
fn fails_once_with(out: &Output, want: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected a failure: {}", show(out));
    assert_eq!(
        err.matches(want).count(),
        1,
        "expected {want:?} once in stderr:\n{err}"
    );
    for debug in ["Os {", "kind:", "Custom {"] {
        assert!(!err.contains(debug), "debug output in the message:\n{err}");
    }
}

#[test]
fn a_data_dir_that_is_a_file_is_named_as_such() {
    let dir = scratch_dir();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let out = node(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file,
        "--volume",
        "v:1M",
    ]);
    fails_once_with(&out, "exists and is not a directory");
    // --check-config refuses what the start refuses.
    let out = node(&["--data-dir", file, "--check-config"]);
    fails_once_with(&out, "exists and is not a directory");
    let out = node(&["--data-dir", &format!("{file}/sub"), "--check-config"]);
    fails_once_with(&out, "is a file, not a directory");
}

#[test]
fn a_locked_data_dir_names_the_other_node() {
    let first = Node::start(&["v:1M"]);
    let dir = first.data_dir().to_str().expect("utf-8 path").to_string();
    let out = node(&["--listen", "127.0.0.1:0", "--data-dir", &dir]);
    fails_once_with(
        &out,
        "is locked by another process: is another nbdraid-node using this data dir?",
    );
}

#[test]
fn a_volume_too_large_for_its_file_system_is_refused_with_its_size() {
    let dir = scratch_dir();
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let want = "is larger than the file system under";
    let out = node(&[
        "--data-dir",
        data,
        "--volume",
        "huge:100000T",
        "--check-config",
    ]);
    fails_once_with(&out, want);
    let out = node(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--volume",
        "huge:100000T",
    ]);
    fails_once_with(&out, want);
    assert!(
        !std::path::Path::new(data).join("volumes/huge.img").exists(),
        "a refused volume left its file behind"
    );
}

#[test]
fn a_busy_port_fails_before_anything_is_created() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let dir = scratch_dir();
    let data = dir.path().join("data");
    let out = node(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--volume",
        "v:1M",
    ]);
    fails_once_with(&out, "the address is in use");
    assert!(
        !data.exists(),
        "the data dir was created by a start that could not listen"
    );
}

#[test]
fn a_data_dir_the_user_cannot_write_is_named() {
    // Needs another user than root; root may write anywhere.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP a_data_dir_the_user_cannot_write_is_named: needs root to switch users");
        return;
    }
    let dir = scratch_dir();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    // `nobody` may run a copy of the binary in the scratch dir, and read
    // `locked` but not write it.
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.path().join("nbdraid-node");
    std::fs::copy(node_binary(), &copy).expect("copy binary");
    for p in [dir.path(), copy.as_path(), locked.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = Command::new(&copy);
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(locked.join("data"))
        .args(["--volume", "v:1M"])
        .uid(65534)
        .gid(65534);
    let out = run(&mut cmd, hang(60)).unwrap_or_else(|e| panic!("{e:#}"));
    fails_once_with(&out, "is not writable by this user");
    assert!(
        !stderr(&out).contains("another nbdraid-node"),
        "a permission problem blamed on another node: {}",
        stderr(&out)
    );
}

#[test]
fn metrics_describe_themselves_and_forget_deleted_volumes() {
    require_tools!("nbdinfo");
    let node = Node::builder()
        .volume("keep:4M")
        .volume("gone:4M")
        .metrics()
        .grpc()
        .start();
    for v in ["keep", "gone"] {
        run_ok(tool("nbdinfo").args(["--size", &node.uri(v)]), hang(60));
    }
    let text = node.metrics_text().expect("metrics");
    for name in [
        "nbdraid_requests_total",
        "nbdraid_throttle_available_units",
        "nbdraid_connections",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP line for {name}:\n{text}"
        );
    }
    assert!(text.contains("export=\"gone\""), "{text}");
    let grpc = node.grpc_addr().expect("grpc").to_string();
    let out = run(
        Command::new(cli_binary()).args(["volume", "delete", "gone", "--node", &grpc]),
        hang(60),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "delete: {}", show(&out));
    let text = node.metrics_text().expect("metrics");
    assert!(
        !text.contains("export=\"gone\""),
        "a deleted volume's series are still served"
    );
    assert!(text.contains("export=\"keep\""), "{text}");
}

/// Waits until the quick start says it serves.
fn wait_serving(qs: &mut Background) {
    qs.wait_lines("the quick start serving", hang(180), |lines| {
        lines.iter().any(|l| l.contains("nbdraid is serving"))
    });
}

#[test]
fn a_second_quick_start_refuses_at_once_and_harms_nothing() {
    require_tools!("nbdinfo");
    // Build the binaries (the harness's one build) and use them directly.
    let bin_dir = node_binary().parent().expect("profile dir").to_path_buf();
    let _ = array_binary();
    let _ = cli_binary();
    let data = scratch_dir();
    let script = workspace_root().join("deploy/quickstart.sh");
    let start = || {
        let mut c = Command::new("bash");
        c.arg(&script)
            .env("NBDRAID_DATA", data.path())
            .env("NBDRAID_BIN_DIR", &bin_dir)
            .env("NBDRAID_PORTS", "auto");
        c
    };
    let mut first = Background::spawn(&mut start());
    wait_serving(&mut first);
    let ready = data.path().join("array/ready.json");
    let before = std::fs::read_to_string(&ready).expect("the array's ready file");
    let uri = first
        .lines()
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("nbd://"))
                .map(str::to_string)
        })
        .expect("an nbd:// URI in the quick start's output");
    run_ok(tool("nbdinfo").args(["--size", &uri]), hang(60));
    // The array follows its nodes' throttles: a lease held at every member
    // (foreground and background) and their models followed.
    let grpc = serde_json::from_str::<serde_json::Value>(&before).expect("ready JSON")["grpc"]
        .as_str()
        .expect("the array's gRPC address")
        .to_string();
    wait_for(
        "the quick start's array leases at its nodes",
        hang(60),
        || {
            let out = run(
                Command::new(cli_binary()).args(["throttle", "show", "--array", &grpc, "--json"]),
                hang(60),
            )
            .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let members = v["members"].as_array()?;
            (members.len() == 8
                && members
                    .iter()
                    .all(|m| m["lease_held"] == true && m["model_live"] == true))
            .then_some(())
        },
    )
    .expect("leases");

    let second = run(&mut start(), hang(60)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !second.status.success(),
        "a second quick start ran: {}",
        show(&second)
    );
    assert!(
        stderr(&second).contains("another quick start is running"),
        "{}",
        show(&second)
    );
    assert_eq!(
        std::fs::read_to_string(&ready).expect("ready file after the second run"),
        before,
        "the second quick start touched the first one's ready file"
    );
    run_ok(tool("nbdinfo").args(["--size", &uri]), hang(60));

    // Ctrl-C stops everything the quick start started, and it exits.
    let pids: Vec<u32> = ["node0", "node1", "node2", "node3", "array"]
        .iter()
        .map(|d| {
            let text = std::fs::read_to_string(data.path().join(d).join("ready.json"))
                .expect("ready file");
            let v: serde_json::Value = serde_json::from_str(&text).expect("ready JSON");
            v["pid"].as_u64().expect("pid") as u32
        })
        .collect();
    first.signal_group(libc::SIGINT);
    let status = first.wait(hang(60));
    assert_eq!(
        status.code(),
        Some(130),
        "the quick start's exit after Ctrl-C: {status}"
    );
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "daemon {pid} outlived the quick start's Ctrl-C");
    }
}
