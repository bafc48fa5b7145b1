//! Failures end with a non-zero exit and a clear message: bad URIs,
//! unreachable servers, unknown exports, too-small or read-only
//! destinations, missing files, server I/O errors, bad arguments.

// Tests unwrap freely (allow-unwrap-in-tests covers only #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nbdraid_harness::{Node, Peer, TempDir};

#[test]
fn bad_uris() {
    let e = fails(&["info", "http://127.0.0.1:1/x"]);
    assert!(e.contains("bad NBD URI"), "{e}");
    let e = fails(&["info", "nbd://127.0.0.1:notaport/x"]);
    assert!(e.contains("bad port"), "{e}");
    let e = fails(&["cp", "/dev/null", "ftp://example/x"]);
    assert!(e.contains("bad NBD URI"), "{e}");
}

#[test]
fn nothing_listening() {
    // A port that was free a moment ago: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = fails(&["info", &format!("nbd://127.0.0.1:{port}/x")]);
    assert!(e.contains("cannot open"), "{e}");
}

#[test]
fn unknown_export_and_small_destination() {
    let node = Node::start(&["small:16M"]);
    let e = fails(&["info", &node.uri("nosuch")]);
    assert!(e.contains("nosuch") && e.contains("unknown export"), "{e}");
    let e = fails(&["bench", "-d", "1s", &node.uri("nosuch")]);
    assert!(e.contains("unknown export"), "{e}");

    let dir = TempDir::new().unwrap();
    let src = dir.path().join("big.img");
    sparse_file(&src, 32 << 20, &[(0, 4096)], 1);
    let e = fails(&["cp", src.to_str().unwrap(), &node.uri("small")]);
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn missing_source_file() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.img");
    let e = fails(&[
        "cp",
        missing.to_str().unwrap(),
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(e.contains("cannot open"), "{e}");
}

#[test]
fn read_only_destination() {
    let Some(srv) = Peer::nbdkit("read_only_destination", &["-r", "memory", "size=16M"]) else {
        return;
    };
    let e = fails(&["cp", "/dev/null", &srv.uri("")]);
    assert!(e.contains("read-only"), "{e}");
    let e = fails(&["bench", "--rw", "write", "-d", "1s", &srv.uri("")]);
    assert!(e.contains("read-only"), "{e}");
}

#[test]
fn server_io_errors_fail_the_command() {
    // A fresh server per command: nbdkit 1.32 can abort when a client
    // drops a connection with replies in flight, which these failures do.
    let failing = || {
        Peer::nbdkit(
            "server_io_errors_fail_the_command",
            &[
                "--filter=error",
                "memory",
                "size=16M",
                "error=EIO",
                "error-pwrite-rate=100%",
                "error-pread-rate=100%",
            ],
        )
    };
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src.img");
    sparse_file(&src, 16 << 20, &[(0, 1 << 20)], 1);
    let Some(srv) = failing() else {
        return;
    };
    let e = fails(&["cp", src.to_str().unwrap(), &srv.uri("")]);
    assert!(e.contains("EIO"), "{e}");
    let srv = failing().unwrap();
    let e = fails(&[
        "cp",
        "--no-sparse",
        &srv.uri(""),
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(e.contains("EIO"), "{e}");
    let srv = failing().unwrap();
    let e = fails(&["bench", "-d", "1s", &srv.uri("")]);
    assert!(e.contains("EIO"), "{e}");
}

#[test]
fn bad_arguments() {
    let e = fails(&["bench", "--verify", "--rw", "read", "nbd://127.0.0.1:1/x"]);
    assert!(e.contains("--verify"), "{e}");
    let out = nbdraid(&["bench", "--block-size", "4x", "nbd://127.0.0.1:1/x"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    let out = nbdraid(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}
