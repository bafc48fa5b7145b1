//! fio with its NBD engine: random writes with crc32c verification, several jobs at once,
//! and a verify-only pass after the node was SIGKILLed and restarted.

use nbdraid_tests::{
    Node, assert_fio_clean as assert_clean, fio, fio_io_bytes as total, hang, require_tools, run,
    scratch_dir, show, tool,
};

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
