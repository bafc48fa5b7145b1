//! Recovery with real processes: a member replaced while fio writes and
//! verifies (RAID 1, 5, 6, 10), a hot spare taking over after a SIGKILL, a
//! rebuild that resumes after the array daemon or the new member's node is
//! killed, and a source member lost in the middle of a rebuild (RAID 6
//! carries on, RAID 5 fails cleanly).
//!
//! What must hold: no fio verify error and no hang while members change;
//! afterwards `check` finds zero mismatches, the array is clean with the
//! new member in its slot; a resumed rebuild copies about one member's
//! worth in all, not two; an array that can no longer reconstruct says
//! `failed` and answers EIO, never wrong data.

use std::time::Duration;

use nbdraid_tests::{
    ArrayDaemon, Cluster, FioReport, FioRun, array_entry, assert_same, hang, output_text,
    require_tools, run, run_ok, scratch_dir, show, tool, write_pattern_file,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Settings shared by every daemon of this file.
const SETTINGS: &str = "[members]\nliveness-timeout-ms = 2000\n";

/// fio job options shared by a write+verify run and its verify-only pass.
const FIO_JOB: [&str; 8] = [
    "--rw=randwrite",
    "--bsrange=4k-64k",
    "--size=12M",
    "--iodepth=16",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--randrepeat=1",
    "--end_fsync=1",
];

fn fio(name: &str, uri: &str, dir: &std::path::Path, mode: &str) -> FioRun {
    let mut args = FIO_JOB.to_vec();
    args.push(mode);
    FioRun::start(name, uri, dir, &args)
}

fn assert_read_back(report: FioReport) {
    report.assert_clean();
    assert_eq!(report.bytes("read"), 12 * MIB, "{}", report.json);
}

fn member(status: &Value, slot: usize) -> &Value {
    &status["members"][slot]
}

/// Waits until `name`'s member `slot` is `uri`, active, and no rebuild runs.
fn wait_rebuilt(array: &ArrayDaemon, name: &str, slot: usize, uri: &str) -> Value {
    array.wait_status(name, "the rebuild to finish", hang(240), |s| {
        member(s, slot)["uri"] == uri && member(s, slot)["state"] == "active" && s["sync"].is_null()
    })
}

/// The `key=value` value of `key` in the daemon log's last line with `msg`.
fn log_field(log: &str, msg: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(msg))?;
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// RAID 1, 5, 6 and 10, each with fio writing and verifying: member 1 of
/// each is replaced by a volume on a fifth node while fio runs. Every run
/// completes without a verify error, every rebuild finishes with the new
/// volume active in slot 1, `check` finds nothing, and a verify-only pass
/// reads every block back.
#[test]
fn replace_under_load_at_every_level() {
    require_tools!("fio");
    let cluster = Cluster::start(5, &["v1:40M", "v5:40M", "v6:40M", "v10:40M"]);
    let arrays = [
        ("r1", "raid1", vec![0, 1]),
        ("r5", "raid5", vec![0, 1, 2]),
        ("r6", "raid6", vec![0, 1, 2, 3]),
        ("r10", "raid10", vec![0, 1, 2, 3]),
    ];
    let volume = |name: &str| format!("v{}", &name[1..]);
    let entries = cluster.array_entries(&arrays, "64K", volume);
    let array = ArrayDaemon::start(&format!("{SETTINGS}\n{}", entries.join("\n")));
    let dir = scratch_dir();
    // Slow members keep fio going through the replacement.
    for node in &cluster.nodes[..4] {
        for (name, _, _) in &arrays {
            node.set_fault(&volume(name), &["--bandwidth", "8M"]);
        }
    }
    // Each array's fio starts just before its own replace, so how long the
    // other arrays' replaces take (a busy host) cannot let it end first.
    let mut runs: Vec<FioRun> = Vec::new();
    for (name, _, _) in &arrays {
        let mut run = fio(name, &array.uri(name), dir.path(), "--do_verify=1");
        std::thread::sleep(Duration::from_millis(300));
        assert!(run.is_running(), "fio on {name} ended before the replace");
        let new = cluster.nodes[4].uri(&volume(name));
        let out = array.cli(&["replace", name, "--member", "1", "--with", &new]);
        assert!(out.status.success(), "replace {name}: {}", show(&out));
        let s = array.status(name);
        assert_eq!(member(&s, 1)["uri"], new.as_str(), "{s:#}");
        assert_eq!(member(&s, 1)["state"], "recovering", "{s:#}");
        runs.push(run);
    }
    for run in runs.drain(..) {
        let report = run.finish();
        report.assert_clean();
        assert_eq!(report.bytes("read"), 12 * MIB, "{}", report.json);
    }
    for node in &cluster.nodes[..4] {
        for (name, _, _) in &arrays {
            node.set_fault(&volume(name), &["--clear"]);
        }
    }
    for (name, _, _) in &arrays {
        let new = cluster.nodes[4].uri(&volume(name));
        wait_rebuilt(&array, name, 1, &new);
        assert_eq!(array.check_mismatches(name), 0, "{name} after the rebuild");
        array.wait_status(name, "clean", hang(60), |s| s["state"] == "clean");
        assert_read_back(fio(name, &array.uri(name), dir.path(), "--verify_only").finish());
    }
    // The old volume is no member any more: it can be given back.
    let out = array.cli(&["add-spare", "r5", &cluster.nodes[1].uri("v5")]);
    assert!(
        !out.status.success(),
        "the replaced volume still holds the array's superblock: {}",
        show(&out)
    );
}

/// RAID 5 with a hot spare: the node of member 1 is SIGKILLed while fio
/// writes and verifies; the spare takes the slot, is rebuilt, fio sees no
/// error, and `check` finds nothing. The spare list is then empty.
#[test]
fn a_spare_takes_over_after_a_sigkill() {
    require_tools!("fio");
    let mut cluster = Cluster::start(4, &["v:40M"]);
    let members = cluster.members("v", &[0, 1, 2]);
    let spare = cluster.nodes[3].uri("v");
    let config = format!(
        "{SETTINGS}\n{}spares = [{spare:?}]\n",
        array_entry("r5", "raid5", "64K", &members)
    );
    let array = ArrayDaemon::start(&config);
    assert_eq!(array.status("r5")["spares"][0], spare.as_str());
    let dir = scratch_dir();
    for node in &cluster.nodes[..3] {
        node.set_fault("v", &["--bandwidth", "8M"]);
    }
    let mut run = fio("r5", &array.uri("r5"), dir.path(), "--do_verify=1");
    std::thread::sleep(Duration::from_secs(1));
    assert!(run.is_running(), "fio ended before the kill");
    cluster.nodes[1].kill9();
    let s = array.wait_status("r5", "the spare in slot 1", hang(60), |s| {
        member(s, 1)["uri"] == spare.as_str()
    });
    assert_eq!(s["spares"].as_array().map(Vec::len), Some(0), "{s:#}");
    // The slot's counters are the spare's own: the dead member's failed
    // requests are not shown against it.
    assert_eq!(member(&s, 1)["errors"], 0, "{s:#}");
    // `status --watch` follows the rebuild to its end: piped, a plain
    // progress line at a time, then the status.
    let out = array.cli(&["status", "r5", "--watch", "--interval", "0.5"]);
    assert!(out.status.success(), "status --watch: {}", show(&out));
    let lines = String::from_utf8_lossy(&out.stderr);
    assert!(
        lines
            .lines()
            .any(|l| l.starts_with("recovery of r5: ") && l.contains('%')),
        "no progress line: {}",
        show(&out)
    );
    let after = String::from_utf8_lossy(&out.stdout);
    assert!(
        !after.contains("Recovery Status"),
        "the rebuild still runs: {after}"
    );
    let report = run.finish();
    report.assert_clean();
    for node in [0, 2] {
        cluster.nodes[node].set_fault("v", &["--clear"]);
    }
    wait_rebuilt(&array, "r5", 1, &spare);
    assert_eq!(array.check_mismatches("r5"), 0);
    assert_read_back(fio("r5", &array.uri("r5"), dir.path(), "--verify_only").finish());
}

/// An idle RAID 1 array (clean, no client connected) whose member 1's
/// node is SIGKILLed notices it without a request to find out: the member
/// is failed within a few monitor ticks, the spare takes the slot and is
/// rebuilt, and `check` finds the copies equal. Before, the failure waited
/// for the next write, which then also waited for the spare's superblock.
#[test]
fn an_idle_array_notices_a_killed_member() {
    let mut cluster = Cluster::start(3, &["v:8M"]);
    let members = cluster.members("v", &[0, 1]);
    let spare = cluster.nodes[2].uri("v");
    let config = format!(
        "{SETTINGS}\n{}spares = [{spare:?}]\n",
        array_entry("r1", "raid1", "64K", &members)
    );
    let array = ArrayDaemon::start(&config);
    array.wait_status("r1", "clean", hang(30), |s| s["state"] == "clean");
    cluster.nodes[1].kill9();
    let s = wait_rebuilt(&array, "r1", 1, &spare);
    assert_eq!(s["spares"].as_array().map(Vec::len), Some(0), "{s:#}");
    let log = array.log();
    assert!(
        log.lines()
            .any(|l| l.contains("member failed") && l.contains("seen by the monitor")),
        "the failure was not noticed by the monitor: {log}"
    );
    assert_eq!(array.check_mismatches("r1"), 0);
}

/// A RAID 5 rebuild onto a replacement, paced at 8 MiB/s, is interrupted
/// twice: the array daemon is SIGKILLed half-way and restarted, then the
/// new member's node is SIGKILLed and restarted. Each time the rebuild
/// resumes near where it was: the bytes covered before each interruption
/// plus what the last run copied stay close to one member, not two or three.
#[test]
fn a_rebuild_resumes_after_kills() {
    require_tools!("fio");
    let mut cluster = Cluster::start(4, &["v:36M"]);
    let members = cluster.members("v", &[0, 1, 2]);
    let config = format!(
        "sync-rate = \"8M\"\n{SETTINGS}{}",
        array_entry("r5", "raid5", "64K", &members)
    );
    let mut array = ArrayDaemon::start(&config);
    let dir = scratch_dir();
    // Data to rebuild (and to read back).
    let report = fio("r5", &array.uri("r5"), dir.path(), "--do_verify=0").finish();
    report.assert_clean();
    let size = array.status("r5")["member_size"]
        .as_u64()
        .expect("member size");
    let new = cluster.nodes[3].uri("v");
    let out = array.cli(&["replace", "r5", "--member", "0", "--with", &new]);
    assert!(out.status.success(), "replace: {}", show(&out));
    assert_eq!(array.status("r5")["sync_rate"], 8 * MIB);

    let progress = |s: &Value| s["sync"]["done"].as_u64().unwrap_or(0);
    let s = array.wait_status("r5", "a third rebuilt", hang(120), |s| {
        progress(s) > size / 3
    });
    // Past the first frontier record (every 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let before_kill = progress(&array.status("r5")).max(progress(&s));
    array.kill9();
    array.restart();
    assert!(
        array.log().contains("resuming the recovery of a member"),
        "{}",
        array.log_tail(30)
    );
    let s = array.status("r5");
    assert_eq!(member(&s, 0)["state"], "recovering", "{s:#}");
    let left = s["sync"]["total"].as_u64().expect("a resumed rebuild");
    assert!(
        left < size - size / 4,
        "the rebuild restarted from the beginning: {left} of {size} bytes to go"
    );

    // Now the new member's node dies and comes back.
    let s = array.wait_status("r5", "more rebuilt", hang(120), |s| progress(s) > 8 * MIB);
    std::thread::sleep(Duration::from_millis(2500));
    let before_node_kill = (size - left) + progress(&s);
    cluster.nodes[3].kill9();
    array.wait_status("r5", "member 0 failed", hang(60), |s| {
        member(s, 0)["state"] == "faulty"
    });
    cluster.nodes[3].restart();
    wait_rebuilt(&array, "r5", 0, &new);
    let copied = log_field(&array.log(), "recovery finished", "copied").expect("copied");
    eprintln!(
        "member {size} bytes: covered {before_kill} before the daemon kill, {before_node_kill} before the node \
         kill, then copied {copied} to finish"
    );
    assert!(
        copied < size - before_node_kill / 2,
        "the re-added member was rebuilt from the beginning: copied {copied} of {size}"
    );
    assert_eq!(array.check_mismatches("r5"), 0);
    assert_read_back(fio("r5", &array.uri("r5"), dir.path(), "--verify_only").finish());
}

/// A second member lost in the middle of a rebuild: RAID 6 rebuilds from
/// what is left and every block reads back; RAID 5 cannot, and fails
/// cleanly: state `failed`, EIO on reads, the daemon still answering.
#[test]
fn a_source_lost_mid_rebuild() {
    require_tools!("fio", "qemu-io");
    let mut cluster = Cluster::start(5, &["v5:40M", "v6:40M"]);
    let config = format!(
        "sync-rate = \"6M\"\n{SETTINGS}{}\n{}",
        array_entry("r6", "raid6", "64K", &cluster.members("v6", &[0, 1, 2, 3])),
        array_entry("r5", "raid5", "64K", &cluster.members("v5", &[0, 1, 2])),
    );
    let array = ArrayDaemon::start(&config);
    let dir = scratch_dir();
    for name in ["r6", "r5"] {
        fio(name, &array.uri(name), dir.path(), "--do_verify=0")
            .finish()
            .assert_clean();
        let new = cluster.nodes[4].uri(&format!("v{}", &name[1..]));
        let out = array.cli(&["replace", name, "--member", "0", "--with", &new]);
        assert!(out.status.success(), "replace {name}: {}", show(&out));
    }
    for name in ["r6", "r5"] {
        array.wait_status(name, "a rebuild under way", hang(60), |s| {
            s["sync"]["done"].as_u64().unwrap_or(0) > 4 * MIB
        });
    }
    // Node 1 holds member 1 of both arrays.
    cluster.nodes[1].kill9();
    let s = array.wait_status("r5", "RAID 5 failed", hang(60), |s| s["state"] == "failed");
    assert_eq!(member(&s, 1)["state"], "faulty", "{s:#}");
    let out = run(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "read 0 1M"])
            .arg(array.uri("r5")),
        hang(60),
    )
    .expect("qemu-io");
    let text = output_text(&out);
    assert!(
        text.contains("Input/output error"),
        "a failed array must answer EIO:\n{text}"
    );
    let new = cluster.nodes[4].uri("v6");
    wait_rebuilt(&array, "r6", 0, &new);
    let s = array.status("r6");
    assert_eq!(s["state"], "degraded", "{s:#}");
    assert_read_back(fio("r6", &array.uri("r6"), dir.path(), "--verify_only").finish());
}

/// Copies `uri` (an export) whole into a file in `dir` and returns it.
fn read_export(uri: &str, dir: &std::path::Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    run_ok(tool("nbdcopy").arg(uri).arg(&path), hang(120));
    std::fs::read(&path).expect("read the copy")
}

/// Writes 4 KiB of 0x5a at `offset` of a member volume, behind the
/// array's back.
fn corrupt(uri: &str, offset: u64) {
    run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P 0x5a {offset} 4k")])
            .arg(uri),
        hang(60),
    );
}

/// Runs `check` (or `check --repair`) to the end; returns its report.
fn check_report(array: &ArrayDaemon, name: &str, repair: bool) -> Value {
    let mut args = vec!["check", name, "--quiet", "--json"];
    if repair {
        args.push("--repair");
    }
    let out = array.cli(&args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check {name} --json: {e}\n{}", show(&out)))
}

/// Chunks corrupted behind the array's back (written to member volumes
/// directly): `check` finds exactly those stripes or chunks, `check
/// --repair` fixes them, and a second check is clean. RAID 6 rewrites the
/// corrupted data chunk itself (located by the P and Q syndromes; md would
/// rewrite parity and keep the bad data); RAID 1 with three copies takes
/// the two that agree over a corrupted first copy (the one a plain resync
/// would copy from); RAID 5 can only make parity agree again.
#[test]
fn repair_fixes_what_check_finds() {
    require_tools!("nbdcopy", "qemu-io");
    let cluster = Cluster::start(4, &["v6:12M", "v1:12M", "v5:12M"]);
    let config = format!(
        "{SETTINGS}\n{}\n{}\n{}",
        array_entry("r6", "raid6", "64K", &cluster.members("v6", &[0, 1, 2, 3])),
        array_entry("r1", "raid1", "64K", &cluster.members("v1", &[0, 1, 2])),
        array_entry("r5", "raid5", "64K", &cluster.members("v5", &[0, 1, 2])),
    );
    let array = ArrayDaemon::start(&config);
    let dir = scratch_dir();
    const DATA: u64 = 4 * MIB;
    const CHUNK: u64 = 64 << 10;
    let mut want = std::collections::BTreeMap::new();
    for name in ["r6", "r1", "r5"] {
        let size = array.status(name)["size"].as_u64().expect("size") as usize;
        let src = dir.path().join(format!("{name}.src"));
        write_pattern_file(&src, 0x5EED ^ size as u64, size);
        run_ok(
            tool("nbdcopy")
                .arg("--flush")
                .arg(&src)
                .arg(array.uri(name)),
            hang(120),
        );
        want.insert(name, std::fs::read(&src).expect("source"));
        assert_eq!(check_report(&array, name, false)["mismatches"], 0, "{name}");
    }

    // RAID 6, 4 members (2 data chunks a stripe): stripe 0's data chunk 0
    // and stripe 5's data chunk 1 are both on member 1.
    let m1 = cluster.nodes[1].uri("v6");
    corrupt(&m1, DATA + 8192);
    corrupt(&m1, DATA + 5 * CHUNK + 4096);
    // RAID 1: the first copy, at 1 MiB.
    let r1_m0 = cluster.nodes[0].uri("v1");
    corrupt(&r1_m0, DATA + MIB);
    // RAID 5: stripe 3 on member 2.
    corrupt(&cluster.nodes[2].uri("v5"), DATA + 3 * CHUNK);

    for (name, found) in [("r6", vec![0, 5]), ("r1", vec![1]), ("r5", vec![3])] {
        let r = check_report(&array, name, false);
        assert_eq!(r["mismatches"], found.len(), "{name}: {r}");
        assert_eq!(
            r["first_mismatches"],
            serde_json::json!(found),
            "{name}: {r}"
        );
        let r = check_report(&array, name, true);
        assert_eq!(r["repaired"], found.len(), "{name}: {r}");
        let r = check_report(&array, name, false);
        assert_eq!(r["mismatches"], 0, "{name} after the repair: {r}");
    }
    // The bad data itself was rewritten where the level can tell.
    let member = read_export(&m1, dir.path(), "r6-m1");
    let r6 = &want["r6"];
    let d = DATA as usize;
    let c = CHUNK as usize;
    assert_same(
        &member[d..d + c],
        &r6[..c],
        "r6 stripe 0 data chunk 0 on member 1",
    );
    assert_same(
        &member[d + 5 * c..d + 6 * c],
        &r6[5 * 2 * c + c..5 * 2 * c + 2 * c],
        "r6 stripe 5 data chunk 1 on member 1",
    );
    assert_same(
        &read_export(&array.uri("r6"), dir.path(), "r6"),
        r6,
        "r6 through the array",
    );
    let member = read_export(&r1_m0, dir.path(), "r1-m0");
    let m = MIB as usize;
    assert_same(
        &member[d + m..d + m + 4096],
        &want["r1"][m..m + 4096],
        "r1 first copy",
    );
    assert_same(
        &read_export(&array.uri("r1"), dir.path(), "r1"),
        &want["r1"],
        "r1 through the array",
    );
}

/// `scrub-interval-secs` starts a check on its own (and `scrub-repair` a
/// repair): a corrupted copy is found and fixed without anyone asking.
#[test]
fn a_scheduled_scrub_repairs_on_its_own() {
    require_tools!("qemu-io");
    let cluster = Cluster::start(3, &["v:8M"]);
    let config = format!(
        "scrub-interval-secs = 2\nscrub-repair = true\n{SETTINGS}\n{}",
        array_entry("r1", "raid1", "64K", &cluster.members("v", &[0, 1, 2]))
    );
    let array = ArrayDaemon::start(&config);
    corrupt(&cluster.nodes[2].uri("v"), 4 * MIB);
    let s = array.wait_status("r1", "a scheduled repair", hang(60), |s| {
        s["check"]["repaired"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(s["check"]["repair"], true, "{s:#}");
    assert_eq!(check_report(&array, "r1", false)["mismatches"], 0);
}
