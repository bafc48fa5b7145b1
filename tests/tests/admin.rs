//! The node's gRPC admin service end to end, through the `nbdraid` CLI:
//! `volume create|list|resize|delete|stats` and `node info`, including the
//! bad-input cases.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use nbdraid_client::{Client, ClientConfig};
use nbdraid_tests::{Node, hang, run, show};

fn cli(grpc: &str, args: &[&str]) -> Output {
    // `--node` right after the subcommand, so a `--` later in `args` still works.
    let mut cmd = Command::new(nbdraid_tests::cli_binary());
    cmd.arg(args[0]).arg("--node").arg(grpc).args(&args[1..]);
    run(&mut cmd, hang(60)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ok(grpc: &str, args: &[&str]) -> String {
    let out = cli(grpc, args);
    assert!(
        out.status.success(),
        "nbdraid {args:?} failed:\n{}",
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail and returns its stderr.
fn fails(grpc: &str, args: &[&str]) -> String {
    let out = cli(grpc, args);
    assert!(
        !out.status.success(),
        "nbdraid {args:?} should have failed:\n{}",
        show(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn admin_node() -> (Node, String) {
    let node = Node::builder()
        .volume("first:16M")
        .arg("--grpc-listen")
        .arg("127.0.0.1:0")
        .start();
    let grpc = node.ready().grpc.expect("grpc address").to_string();
    (node, grpc)
}

fn export_size(node: &Node, name: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        Client::connect(&node.addr().to_string(), name, ClientConfig::default())
            .await
            .unwrap_or_else(|e| panic!("connect to {name}: {e}"))
            .info()
            .size
    })
}

#[test]
fn volumes_are_created_listed_grown_and_deleted() {
    if !nbdraid_tests::backend_is_node("volumes_are_created_listed_grown_and_deleted") {
        return;
    }
    let (node, grpc) = admin_node();
    let list: serde_json::Value =
        serde_json::from_str(&ok(&grpc, &["volume", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    assert_eq!(list[0]["name"], "first");
    assert_eq!(list[0]["size"], 16 << 20);

    let created = ok(&grpc, &["volume", "create", "second", "64M"]);
    assert!(
        created.contains("second") && created.contains("64M"),
        "{created}"
    );
    ok(&grpc, &["volume", "create", "golden", "8M", "--read-only"]);
    let text = ok(&grpc, &["volume", "list"]);
    assert!(text.contains("second") && text.contains("golden"), "{text}");
    assert_eq!(export_size(&node, "second"), 64 << 20);
    assert!(node.data_dir().join("volumes/second.img").is_file());

    let grown = ok(&grpc, &["volume", "resize", "second", "128M"]);
    assert!(grown.contains("128M"), "{grown}");
    assert_eq!(
        export_size(&node, "second"),
        128 << 20,
        "new connections see the new size"
    );

    let info: serde_json::Value =
        serde_json::from_str(&ok(&grpc, &["node", "info", "--json"])).unwrap();
    assert_eq!(info["volumes"], 3);
    assert_eq!(info["nbd_addr"], node.addr().to_string());
    assert!(
        info["uuid"].as_str().is_some_and(|u| u.len() == 36),
        "{info}"
    );
    assert!(info["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(info["capacity"].as_u64().is_some_and(|c| c > 0));
    let human = ok(&grpc, &["node", "info"]);
    assert!(human.contains(info["uuid"].as_str().unwrap()), "{human}");

    let stats = ok(&grpc, &["volume", "stats", "second"]);
    assert!(
        stats.contains("second") && stats.contains("connections 0"),
        "{stats}"
    );

    ok(&grpc, &["volume", "delete", "second"]);
    let text = ok(&grpc, &["volume", "list"]);
    assert!(!text.contains("second"), "{text}");
    assert!(
        !node.data_dir().join("volumes/second.img").exists(),
        "file removed"
    );

    // The catalog survives a restart.
    let mut node = node;
    node.set_volumes(&[]);
    node.restart();
    let grpc = node.ready().grpc.expect("grpc").to_string();
    let text = ok(&grpc, &["volume", "list"]);
    assert!(
        text.contains("first") && text.contains("golden") && !text.contains("second"),
        "{text}"
    );
    assert!(text.contains("ro"), "read-only flag kept: {text}");
}

#[test]
fn bad_admin_input_gets_clear_errors() {
    if !nbdraid_tests::backend_is_node("bad_admin_input_gets_clear_errors") {
        return;
    }
    let (node, grpc) = admin_node();
    let e = fails(&grpc, &["volume", "resize", "nosuch", "1G"]);
    assert!(e.contains("no volume named \"nosuch\""), "{e}");
    let e = fails(&grpc, &["volume", "delete", "nosuch"]);
    assert!(e.contains("no volume named"), "{e}");
    let e = fails(&grpc, &["volume", "stats", "nosuch"]);
    assert!(e.contains("no volume named"), "{e}");

    let e = fails(&grpc, &["volume", "resize", "first", "8M"]);
    assert!(e.contains("shrinking"), "{e}");
    assert_eq!(
        export_size(&node, "first"),
        16 << 20,
        "size unchanged after a refused shrink"
    );

    let e = fails(&grpc, &["volume", "create", "first", "1G"]);
    assert!(e.contains("already exists"), "{e}");
    for bad in ["a/b", "-x", "white space", ".hidden", "ä"] {
        let e = fails(&grpc, &["volume", "create", "--", bad, "1M"]);
        assert!(e.contains("invalid volume name"), "{bad}: {e}");
    }
    let e = fails(&grpc, &["volume", "create", "zero", "0"]);
    assert!(e.contains("greater than 0"), "{e}");
    let out = cli(&grpc, &["volume", "create", "x", "12Q"]);
    assert_eq!(out.status.code(), Some(2), "usage error:\n{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown suffix"),
        "{}",
        show(&out)
    );

    // A volume with a client connected cannot be deleted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        Client::connect(&node.addr().to_string(), "first", ClientConfig::default())
            .await
            .unwrap()
    });
    let e = fails(&grpc, &["volume", "delete", "first"]);
    assert!(e.contains("in use"), "{e}");
    rt.block_on(async {
        client.close(std::time::Duration::from_secs(5)).await;
        // Let the writer send NBD_CMD_DISC before the runtime stops.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    });
    drop(client);
    drop(rt);
    // Once the client is gone the delete goes through.
    nbdraid_tests::wait_for("delete after disconnect", hang(10), || {
        cli(&grpc, &["volume", "delete", "first"])
            .status
            .success()
            .then_some(())
    })
    .unwrap();

    // A node that is not there.
    let e = fails("127.0.0.1:1", &["node", "info"]);
    assert!(e.contains("cannot reach node"), "{e}");
}
