//! Member failures with real processes: storage nodes SIGKILLed or
//! SIGSTOPped under an array daemon serving fio, member volumes failing
//! with EIO (fault injection), and losses an array cannot survive.
//!
//! What must hold: an array whose level tolerates the loss goes on serving
//! every block correctly (fio's crc32c verification during the run and a
//! separate verify-only pass after it) and reports itself degraded, with
//! the lost members faulty; a frozen member is failed by the liveness
//! timeout instead of hanging the array; an array that lost more than its
//! level tolerates answers EIO (never hangs), and the daemon goes on
//! serving its other arrays and answering `status`.
//!
//! Every daemon runs with `[members] liveness-timeout-ms = 2000`, so a
//! frozen member is detected quickly; hang detectors stay generous.

use std::process::Output;

use nbdraid_tests::{
    ArrayDaemon, Cluster, FioRun, array_entry, assert_files_equal, hang, output_text,
    require_tools, run, run_ok, scratch_dir, show, tool, write_pattern_file,
};
use serde_json::Value;

/// Settings shared by every daemon of this file.
const SETTINGS: &str = "[members]\nliveness-timeout-ms = 2000\n";

fn config(arrays: &[String]) -> String {
    format!("{SETTINGS}\n{}", arrays.join("\n"))
}

/// Writes the members of `status`'s array completed so far.
fn member_writes(status: &Value) -> u64 {
    status["members"]
        .as_array()
        .map(|m| m.iter().map(|m| m["writes"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// Waits until the members of every array of `names` have completed at
/// least `writes` writes (one `list` per poll).
fn wait_member_writes(array: &ArrayDaemon, names: &[&str], writes: u64) {
    nbdraid_tests::wait_for(&format!("{writes} writes to {names:?}"), hang(120), || {
        let out = array.cli(&["list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        let list = list.as_array()?;
        names
            .iter()
            .all(|n| {
                list.iter()
                    .any(|s| s["name"] == *n && member_writes(s) >= writes)
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// The member states of `status`, by slot.
fn member_states(status: &Value) -> Vec<String> {
    status["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["state"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that `name` is degraded with exactly the slots `lost` faulty.
fn assert_degraded(array: &ArrayDaemon, name: &str, lost: &[usize]) -> Value {
    let status = array.wait_status(name, "the lost members faulty", hang(60), |s| {
        member_states(s)
            .iter()
            .enumerate()
            .all(|(slot, st)| (st == "faulty") == lost.contains(&slot))
    });
    assert_eq!(status["state"], "degraded", "{name}: {status:#}");
    let states = member_states(&status);
    for (slot, st) in states.iter().enumerate() {
        let want = if lost.contains(&slot) {
            "faulty"
        } else {
            "active"
        };
        assert_eq!(st, want, "{name} member {slot}: {status:#}");
    }
    status
}

/// Runs `qemu-io -f raw URI -c CMD...` to completion (bounded).
fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(&mut c, hang(120)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Asserts that every qemu-io command succeeded (and every pattern read matched).
fn assert_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let text = output_text(&out);
    assert!(
        out.status.success()
            && !text.contains("failed")
            && !text.contains("error")
            && !text.contains("Pattern verification"),
        "qemu-io {uri} {cmds:?}:\n{}",
        show(&out)
    );
}

/// Asserts that the qemu-io command fails with EIO.
fn assert_io_eio(uri: &str, cmd: &str) {
    let out = qemu_io(uri, &[cmd]);
    let text = output_text(&out);
    assert!(
        text.contains("Input/output error"),
        "qemu-io {uri} {cmd:?} did not fail with EIO:\n{}",
        show(&out)
    );
}

/// Bytes each fio job writes (and verifies).
const FIO_SIZE: u64 = 16 << 20;

/// fio job options shared by the write+verify run and the verify-only pass
/// (same options, same random sequence).
const FIO_JOB: [&str; 8] = [
    "--rw=randwrite",
    "--bsrange=4k-64k",
    "--size=16M",
    "--iodepth=16",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--randrepeat=1",
    "--end_fsync=1",
];

/// RAID 1, 5 and 10 lose one member each and RAID 6 two, all in one
/// daemon, SIGKILLed while fio writes and verifies all four arrays: every
/// run completes without a verify error, every array reports degraded with
/// its lost members faulty, and a verify-only pass afterwards reads every
/// block back correctly.
#[test]
fn fio_verifies_through_member_node_kills() {
    require_tools!("fio");
    // Node 0 holds a member of every array, node 1 only RAID 6's second;
    // each array has its own volume on the nodes it uses.
    let mut cluster = Cluster::start(5, &["v1:36M", "v5:36M", "v10:36M", "v6:36M"]);
    let arrays = [
        ("r1", "raid1", vec![0, 4]),
        ("r5", "raid5", vec![0, 2, 3]),
        ("r10", "raid10", vec![0, 2, 3, 4]),
        ("r6", "raid6", vec![0, 1, 2, 3]),
    ];
    let volume = |name: &str| format!("v{}", &name[1..]);
    let entries = cluster.array_entries(&arrays, "64K", volume);
    let mut array = ArrayDaemon::start(&config(&entries));
    let dir = scratch_dir();
    // Members slowed to 8 MiB/s each so the runs are still going when the
    // nodes die, however fast this build is.
    for node in &cluster.nodes {
        for (name, _, _) in &arrays {
            node.set_fault(&volume(name), &["--bandwidth", "8M"]);
        }
    }

    let mut runs: Vec<FioRun> = arrays
        .iter()
        .map(|(name, _, _)| {
            let mut args = FIO_JOB.to_vec();
            args.push("--do_verify=1");
            FioRun::start(name, &array.uri(name), dir.path(), &args)
        })
        .collect();
    // Wait until every array has been written to, then take the nodes down.
    let names: Vec<&str> = arrays.iter().map(|(name, _, _)| *name).collect();
    wait_member_writes(&array, &names, 64);
    for (run, (name, _, _)) in runs.iter_mut().zip(&arrays) {
        assert!(
            run.is_running(),
            "fio on {name} finished before the first node was killed: the test tested nothing"
        );
    }
    cluster.nodes[0].kill9();
    // The second loss only after the first is recorded (RAID 6 degraded).
    assert_degraded(&array, "r6", &[0]);
    assert!(
        runs[3].is_running(),
        "fio on r6 finished before the second node was killed"
    );
    cluster.nodes[1].kill9();

    for run in runs.drain(..) {
        let report = run.finish();
        report.assert_clean();
        assert_eq!(report.bytes("write"), FIO_SIZE, "{}", report.json);
        assert_eq!(
            report.bytes("read"),
            FIO_SIZE,
            "{}: the verify phase must read everything back",
            report.what
        );
    }
    for (name, _, nodes) in &arrays {
        let lost: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| **n <= 1)
            .map(|(slot, _)| slot)
            .collect();
        assert_degraded(&array, name, &lost);
    }

    // A separate verify-only pass over each degraded array, at full speed.
    for node in &cluster.nodes[2..] {
        for (name, _, _) in &arrays {
            node.set_fault(&volume(name), &["--clear"]);
        }
    }
    let verifies: Vec<FioRun> = arrays
        .iter()
        .map(|(name, _, _)| {
            let mut args = FIO_JOB.to_vec();
            args.push("--verify_only");
            FioRun::start(name, &array.uri(name), dir.path(), &args)
        })
        .collect();
    for v in verifies {
        let report = v.finish();
        report.assert_clean();
        assert_eq!(report.bytes("read"), FIO_SIZE, "{}", report.json);
    }
    assert!(array.is_running(), "the array daemon died");
}

/// A SIGSTOPped member node answers nothing: with I/O outstanding it is
/// failed by the liveness timeout and the RAID 5 array goes on (fio
/// completes and verifies), while a RAID 0 array on the same node answers
/// EIO instead of hanging. Thawed, the node comes back and the RAID 5
/// member is re-added automatically (the bitmap covers what it missed),
/// after which that array is whole again and `check` finds nothing wrong.
#[test]
fn frozen_member_is_failed_by_liveness_timeout() {
    require_tools!("fio", "qemu-io");
    let cluster = Cluster::start(3, &["m:36M", "z:20M"]);
    let mut array = ArrayDaemon::start(&config(&[
        array_entry("r5", "raid5", "64K", &cluster.members("m", &[0, 1, 2])),
        array_entry("r0", "raid0", "64K", &cluster.members("z", &[1, 2])),
    ]));
    assert_io_ok(&array.uri("r0"), &["write -P 0x11 0 1M", "flush"]);
    let dir = scratch_dir();
    for node in &cluster.nodes {
        node.set_fault("m", &["--bandwidth", "8M"]);
    }
    let mut args = FIO_JOB.to_vec();
    args.push("--do_verify=1");
    let mut run = FioRun::start("r5", &array.uri("r5"), dir.path(), &args);
    wait_member_writes(&array, &["r5"], 64);
    assert!(
        run.is_running(),
        "fio finished before the member was frozen: the test tested nothing"
    );
    cluster.nodes[2].freeze();
    // RAID 0's second chunk lives on the frozen node: EIO once the
    // liveness timeout fails that member, not a hang.
    let r0 = qemu_io(&array.uri("r0"), &["read 64k 64k"]);
    let report = run.finish();
    let degraded = array.status("r5");
    cluster.nodes[2].thaw();
    assert!(
        String::from_utf8_lossy(&r0.stdout).contains("Input/output error"),
        "RAID 0 over a frozen member did not fail with EIO: {}",
        show(&r0)
    );
    assert_eq!(array.status("r0")["state"], "failed");
    report.assert_clean();
    assert_eq!(report.bytes("write"), FIO_SIZE, "{}", report.json);
    assert_eq!(report.bytes("read"), FIO_SIZE, "{}", report.json);
    assert_eq!(
        member_states(&degraded),
        ["active", "active", "faulty"],
        "the frozen member was not failed: {degraded:#}"
    );
    assert_eq!(degraded["state"], "degraded", "{degraded:#}");
    // Failed for making no progress, not for anything else.
    let log = array.log();
    let failure = log
        .lines()
        .find(|l| l.contains("member failed array=r5 member=2"))
        .unwrap_or_else(|| panic!("no failure of member 2 in the log:\n{}", array.log_tail(40)));
    assert!(
        failure.contains("timed out"),
        "member 2 was not failed by the liveness timeout: {failure}"
    );
    // Full speed for the recovery and the checks.
    for node in &cluster.nodes {
        node.set_fault("m", &["--clear"]);
    }

    // Back from SIGSTOP: re-added from the bitmap and recovered.
    let whole = array.wait_status("r5", "member 2 re-added and in sync", hang(120), |s| {
        member_states(s) == ["active", "active", "active"]
    });
    assert_ne!(whole["state"], "degraded", "{whole:#}");
    let out = array.cli(&["check", "r5"]);
    assert!(out.status.success(), "check after recovery: {}", show(&out));
    assert_eq!(array.status("r5")["check"]["mismatches"], 0);
    let mut args = FIO_JOB.to_vec();
    args.push("--verify_only");
    let report = FioRun::start("r5", &array.uri("r5"), dir.path(), &args).finish();
    report.assert_clean();
    assert_eq!(report.bytes("read"), FIO_SIZE, "{}", report.json);
    assert!(array.is_running(), "the array daemon died");
}

/// A member volume whose storage fails with EIO is failed, and the array
/// goes on: RAID 5 with a member failing writes takes a whole image and
/// gives it back; RAID 1 with a member failing reads gives its data back
/// from the other copy; RAID 10 with a member failing flushes completes
/// the client's FLUSH without it (its data is not durable there).
#[test]
fn eio_member_is_failed_and_array_goes_on() {
    require_tools!("nbdcopy", "qemu-io");
    let cluster = Cluster::start(3, &["p:36M", "m:36M", "t:20M"]);
    let mut array = ArrayDaemon::start(&config(&[
        array_entry("r5", "raid5", "64K", &cluster.members("p", &[0, 1, 2])),
        array_entry("r1", "raid1", "64K", &cluster.members("m", &[0, 1])),
        array_entry("r10", "raid10", "64K", &cluster.members("t", &[0, 1, 2])),
    ]));
    let dir = scratch_dir();
    let (src5, src1, back) = (
        dir.path().join("r5.img"),
        dir.path().join("r1.img"),
        dir.path().join("back.img"),
    );
    let size = |name: &str| array.status(name)["size"].as_u64().expect("size") as usize;
    write_pattern_file(&src5, 5, size("r5"));
    write_pattern_file(&src1, 1, size("r1"));
    run_ok(tool("nbdcopy").arg(&src1).arg(array.uri("r1")), hang(300));

    // RAID 5: member 1 fails every write from now on.
    cluster.nodes[1].set_fault("p", &["--fail-writes"]);
    run_ok(
        tool("nbdcopy")
            .arg("--flush")
            .arg(&src5)
            .arg(array.uri("r5")),
        hang(300),
    );
    assert_degraded(&array, "r5", &[1]);
    run_ok(tool("nbdcopy").arg(array.uri("r5")).arg(&back), hang(300));
    assert_files_equal(&src5, &back);

    // RAID 1: member 0 fails every read; both copies are read from.
    cluster.nodes[0].set_fault("m", &["--fail-reads"]);
    for _ in 0..2 {
        run_ok(
            tool("nbdcopy")
                .args(["--connections=4", "--requests=16"])
                .arg(array.uri("r1"))
                .arg(&back),
            hang(300),
        );
        assert_files_equal(&src1, &back);
    }
    assert_degraded(&array, "r1", &[0]);
    // Not failing again: the array goes on without it.
    run_ok(tool("nbdcopy").arg(array.uri("r1")).arg(&back), hang(300));
    assert_files_equal(&src1, &back);

    // RAID 10: member 2 fails every flush.
    cluster.nodes[2].set_fault("t", &["--fail-flush"]);
    assert_io_ok(
        &array.uri("r10"),
        &["write -P 0x5e 0 1M", "flush", "read -P 0x5e 0 1M"],
    );
    assert_degraded(&array, "r10", &[2]);
    assert_io_ok(
        &array.uri("r10"),
        &[
            "write -P 0x5f 1M 1M",
            "flush",
            "read -P 0x5e 0 1M",
            "read -P 0x5f 1M 1M",
        ],
    );
    assert!(array.is_running(), "the array daemon died");
}

/// RAID 0 losing a member, RAID 5 losing two, and RAID 10 losing both
/// copies of a chunk answer EIO (they do not hang) and report `failed`;
/// RAID 10 losing one copy of each chunk goes on. The daemon goes on: a
/// fourth array in it still reads and writes, and `status` answers for all.
#[test]
fn losses_beyond_tolerance_give_eio_and_the_daemon_stays_up() {
    require_tools!("qemu-io");
    let mut cluster = Cluster::start(4, &["z:20M", "p:20M", "s:20M", "t:20M"]);
    let mut array = ArrayDaemon::start(&config(&[
        array_entry("r0", "raid0", "64K", &cluster.members("z", &[0, 1])),
        array_entry("r5", "raid5", "64K", &cluster.members("p", &[1, 2, 3])),
        array_entry("r10", "raid10", "64K", &cluster.members("t", &[0, 1, 2, 3])),
        array_entry("r1", "raid1", "64K", &cluster.members("s", &[2, 3])),
    ]));
    for name in ["r0", "r5", "r10", "r1"] {
        assert_io_ok(
            &array.uri(name),
            &["write -P 0x11 0 1M", "read -P 0x11 0 1M", "flush"],
        );
    }

    // Node 1 dies: RAID 0 has lost a member, RAID 5 one of three.
    cluster.nodes[1].kill9();
    // The first request to the lost member's chunk notices the loss; from
    // then on every request fails, also those to the surviving member.
    assert_io_eio(&array.uri("r0"), "read 64k 64k");
    assert_io_eio(&array.uri("r0"), "read 0 64k");
    assert_io_eio(&array.uri("r0"), "write -P 0x22 0 64k");
    let r0 = array.status("r0");
    assert_eq!(r0["state"], "failed", "{r0:#}");
    assert_io_ok(&array.uri("r5"), &["read -P 0x11 0 1M"]);
    assert_degraded(&array, "r5", &[0]);

    // A second RAID 5 member fails its I/O: beyond what RAID 5 tolerates.
    cluster.nodes[2].set_fault("p", &["--fail-reads", "--fail-writes"]);
    assert_io_eio(&array.uri("r5"), "read 0 1M");
    assert_io_eio(&array.uri("r5"), "write -P 0x33 0 1M");
    let r5 = array.status("r5");
    assert_eq!(r5["state"], "failed", "{r5:#}");

    // RAID 10 over four members keeps two copies of each chunk in slots
    // (0, 1) and (2, 3). With slot 1 gone (node 1) and slot 3 failing
    // writes, every chunk still has a copy...
    cluster.nodes[3].set_fault("t", &["--fail-writes"]);
    assert_io_ok(
        &array.uri("r10"),
        &["write -P 0x55 0 1M", "flush", "read -P 0x55 0 1M"],
    );
    assert_degraded(&array, "r10", &[1, 3]);
    // ...until slot 0 fails too: chunks 0, 2, 4... have lost both copies.
    cluster.nodes[0].set_fault("t", &["--fail-writes"]);
    assert_io_eio(&array.uri("r10"), "write -P 0x66 0 1M");
    assert_io_eio(&array.uri("r10"), "read 0 64k");
    let r10 = array.status("r10");
    assert_eq!(r10["state"], "failed", "{r10:#}");

    // The daemon, and its fourth array, are fine.
    assert!(array.is_running(), "the array daemon died");
    assert_io_ok(
        &array.uri("r1"),
        &[
            "read -P 0x11 0 1M",
            "write -P 0x44 1M 1M",
            "flush",
            "read -P 0x44 1M 1M",
        ],
    );
    let r1 = array.status("r1");
    assert_ne!(r1["state"], "failed", "{r1:#}");
    assert_ne!(r1["state"], "degraded", "{r1:#}");
    let out = array.cli(&["list", "--json"]);
    assert!(out.status.success(), "list: {}", show(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("list --json");
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list:#}");
}
