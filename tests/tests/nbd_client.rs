//! The Linux `nbd-client` (3.24): `-l` lists exports (NBD_OPT_LIST, then ABORT without
//! reading the ACK); a connect performs the NBD_OPT_GO handshake (default) or
//! NBD_OPT_EXPORT_NAME (`-g`) and prints `size = …MB` before it fails for lack of the kernel
//! module. Plus a kernel attach that only runs as root with `/dev/nbd0` present.

use std::path::Path;

use nbdraid_tests::{Node, hang, output_text, require_tools, run, run_ok, show, tool};

#[test]
fn nbd_client_lists_exports() {
    require_tools!("nbd-client");
    let node = Node::start(&["alpha:16M", "beta:32M", "gamma:8M:ro"]);
    let out = run_ok(
        tool("nbd-client").args(["-l", &node.host(), &node.port().to_string()]),
        hang(60),
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            lines
                .iter()
                .any(|l| l == name || l.starts_with(&format!("{name}:"))),
            "{name} not listed:\n{}",
            show(&out)
        );
    }
    // The server survived the client's ABORT-without-reading-the-ACK.
    let again = run_ok(
        tool("nbd-client").args(["-l", &node.host(), &node.port().to_string()]),
        hang(60),
    );
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("beta"),
        "{}",
        show(&again)
    );
}

/// The `size = NMB` that nbd-client printed, if any.
fn reported_size_mb(out: &std::process::Output) -> Option<u64> {
    let text = output_text(out);
    let rest = &text[text.find("size = ")? + "size = ".len()..];
    rest.split("MB").next()?.trim().parse().ok()
}

fn handshake(node: &Node, export: &str, extra: &[&str]) -> std::process::Output {
    let dev = "/dev/nbd0";
    let mut c = tool("nbd-client");
    c.args([&node.host(), &node.port().to_string(), dev, "-N", export])
        .args(extra);
    run(&mut c, hang(60)).expect("nbd-client")
}

#[test]
fn nbd_client_go_handshake_reports_size() {
    require_tools!("nbd-client");
    if Path::new("/dev/nbd0").exists() {
        eprintln!("SKIP nbd_client_go_handshake_reports_size: /dev/nbd0 exists (would attach)");
        return;
    }
    let node = Node::start(&["alpha:16M", "beta:32M"]);
    let out = handshake(&node, "beta", &[]);
    assert_eq!(
        reported_size_mb(&out),
        Some(32),
        "GO handshake:\n{}",
        show(&out)
    );
    let out = handshake(&node, "alpha", &[]);
    assert_eq!(
        reported_size_mb(&out),
        Some(16),
        "GO handshake:\n{}",
        show(&out)
    );
    // Unknown export: an error from the server, no size line.
    let out = handshake(&node, "nope", &[]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        !output_text(&out).contains("size ="),
        "unknown export got a size:\n{}",
        show(&out)
    );
}

#[test]
fn nbd_client_export_name_handshake_reports_size() {
    require_tools!("nbd-client");
    if Path::new("/dev/nbd0").exists() {
        eprintln!("SKIP nbd_client_export_name_handshake_reports_size: /dev/nbd0 exists");
        return;
    }
    let node = Node::start(&["alpha:16M", "beta:32M"]);
    let out = handshake(&node, "beta", &["-g"]);
    assert_eq!(
        reported_size_mb(&out),
        Some(32),
        "EXPORT_NAME handshake:\n{}",
        show(&out)
    );
    // Unknown export with EXPORT_NAME: the server must close the connection. nbd-client
    // 3.24 does not check for EOF there and prints "size = 0MB"; any real size is wrong.
    let out = handshake(&node, "nope", &["-g"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert_eq!(
        reported_size_mb(&out).unwrap_or(0),
        0,
        "unknown export got a size:\n{}",
        show(&out)
    );
    // The node still serves.
    let out = handshake(&node, "alpha", &["-g"]);
    assert_eq!(reported_size_mb(&out), Some(16), "{}", show(&out));
}

/// Real kernel attach: root only, and only where the nbd module is loaded.
#[test]
fn kernel_attach_mkfs_and_io() {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/nbd0").exists() {
        eprintln!(
            "SKIP kernel_attach_mkfs_and_io: needs root and /dev/nbd0 (modprobe nbd); \
             root={root}, /dev/nbd0 present={}",
            Path::new("/dev/nbd0").exists()
        );
        return;
    }
    require_tools!("nbd-client", "mkfs.ext4", "fsck.ext4", "dd");
    let node = Node::start(&["kvol:64M"]);
    let dev = "/dev/nbd0";
    run_ok(
        tool("nbd-client").args([
            &node.host(),
            &node.port().to_string(),
            dev,
            "-N",
            "kvol",
            "-C",
            "2",
        ]),
        hang(60),
    );
    struct Detach;
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = run(tool("nbd-client").args(["-d", "/dev/nbd0"]), hang(60));
        }
    }
    let _detach = Detach;
    let size = std::fs::read_to_string("/sys/block/nbd0/size").expect("sysfs size");
    assert_eq!(size.trim().parse::<u64>().expect("sectors") * 512, 64 << 20);
    run_ok(tool("mkfs.ext4").args(["-F", "-q", dev]), hang(120));
    run_ok(tool("fsck.ext4").args(["-n", "-f", dev]), hang(120));
    run_ok(
        tool("dd").args([
            "if=/dev/urandom",
            "of=/dev/nbd0",
            "bs=1M",
            "count=8",
            "oflag=direct",
        ]),
        hang(120),
    );
    let out = run_ok(tool("nbd-client").args(["-c", dev]), hang(30));
    assert!(out.status.success());
}
