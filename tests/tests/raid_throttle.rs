//! Stacked writeout throttling end to end: a RAID 5 array over four
//! nodes, one node slowed down, a flood of writes far larger than every
//! budget. The array's memory stays within its capacity plus a fixed
//! overhead, each node's within its own, the units the array holds at each
//! member never exceed what that member granted (sampled from both sides'
//! metrics), nothing deadlocks, and every acknowledged write reads back.
//! Also: the published model rises when a member fails.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdraid_tests::*;

const MIB: u64 = 1 << 20;
/// Each node's budget, and what it grants the array (per class).
const NODE_CAPACITY: u64 = 64 * MIB;
const GRANT: u64 = 16 * MIB;
const ARRAY_CAPACITY: u64 = 320 * MIB;
/// Process memory beyond the budget: the binary, runtime, connections'
/// socket buffers and a debug build's allocator slack.
const OVERHEAD: u64 = 96 * MIB;

/// Parses `name{labels} value` lines of `metric` into (labels, value).
fn samples(text: &str, metric: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.as_bytes().get(metric.len()) == Some(&b'{'))
        .filter_map(|l| {
            let (labels, value) = l[metric.len()..].rsplit_once(' ')?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// The highest value each gauge reached while sampling, keyed
/// "`daemon` holds at `array`/`slot` (`class`)", "`daemon` grant at
/// `array`/`slot`" and "`daemon` share `name`" (upstream shares only).
type Worst = BTreeMap<String, f64>;

/// Samples the throttle gauges of several daemons' metrics endpoints
/// every 50 ms, keeping the highest value of each.
struct Sampler {
    stop: Arc<AtomicBool>,
    worst: Arc<Mutex<Worst>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(targets: Vec<(String, std::net::SocketAddr)>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let worst: Arc<Mutex<Worst>> = Default::default();
        let thread = {
            let (stop, worst) = (stop.clone(), worst.clone());
            std::thread::spawn(move || {
                let max = |key: String, v: f64| {
                    let mut w = worst.lock().unwrap_or_else(|e| e.into_inner());
                    let e = w.entry(key).or_insert(0.0);
                    *e = e.max(v);
                };
                while !stop.load(Ordering::Relaxed) {
                    for (name, addr) in &targets {
                        let Ok(text) = http_get(*addr, "/metrics") else {
                            continue;
                        };
                        let at = |l: &str| {
                            format!(
                                "{}/{}",
                                label(l, "array").unwrap_or("?"),
                                label(l, "slot").unwrap_or("?")
                            )
                        };
                        for (l, v) in samples(&text, "nbdraid_array_member_held_units") {
                            let class = label(&l, "class").unwrap_or("?");
                            max(format!("{name} holds at {} ({class})", at(&l)), v);
                        }
                        for (l, v) in samples(&text, "nbdraid_array_member_grant_units") {
                            if label(&l, "class") == Some("foreground") {
                                max(format!("{name} grant at {}", at(&l)), v);
                            }
                        }
                        for (l, v) in samples(&text, "nbdraid_throttle_share_in_flight_units") {
                            if let Some(share) = label(&l, "share")
                                && share.starts_with("array ")
                            {
                                max(format!("{name} share {share}"), v);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Sampler {
            stop,
            worst,
            thread,
        }
    }

    fn stop(self) -> Worst {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler");
        let worst = self.worst.lock().unwrap_or_else(|e| e.into_inner()).clone();
        eprintln!("worst samples: {worst:#?}");
        worst
    }
}

/// Asserts that what array daemon `daemon` held at each member (foreground)
/// stayed within `grant`, and that something was held at all.
fn assert_within_grants(worst: &Worst, daemon: &str, grant: u64) {
    let prefix = format!("{daemon} holds at ");
    let held: Vec<(&String, f64)> = worst
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix) && k.ends_with("(foreground)"))
        .map(|(k, v)| (k, *v))
        .collect();
    assert!(
        held.iter().any(|(_, v)| *v > 0.0),
        "{daemon}: no units were ever sampled held at a member: {worst:#?}"
    );
    for (k, v) in held {
        assert!(
            v <= grant as f64,
            "{k}: {v} units, more than the grant {grant}"
        );
    }
}

/// Asserts that every foreground upstream share at daemon `daemon` had at
/// most `grant` units in flight.
fn assert_shares_within(worst: &Worst, daemon: &str, grant: u64) {
    let prefix = format!("{daemon} share ");
    for (k, v) in worst.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        if !k.contains("background") {
            assert!(
                *v <= grant as f64,
                "{k}: {v} units in flight for the upstream, more than its grant {grant}"
            );
        }
    }
}

/// Asserts a daemon's peak RSS stayed within its capacity plus [`OVERHEAD`].
fn assert_rss(what: &str, rss: u64, capacity: u64) {
    eprintln!(
        "{what} peak RSS {} MiB (capacity {} MiB)",
        rss / MIB,
        capacity / MIB
    );
    assert!(
        rss <= capacity + OVERHEAD,
        "{what} peak RSS {} MiB above capacity {} MiB + {} MiB",
        rss / MIB,
        capacity / MIB,
        OVERHEAD / MIB
    );
}

fn fio_flood(uri: &str, dir: &std::path::Path, bs: &str, depth: u32, jobs: u32, size: &str) {
    let json = dir.join(format!("flood-{bs}.json"));
    let (out, j) = fio(
        uri,
        &json,
        &[
            "--name=flood",
            "--rw=randwrite",
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            &format!("--numjobs={jobs}"),
            &format!("--size={size}"),
            &format!("--offset_increment={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    assert_fio_clean(&out, &j, &format!("flood {bs} QD{depth} x{jobs}"));
}

#[test]
fn a_write_flood_is_bounded_at_every_layer() {
    require_tools!("fio");
    let cluster = Cluster::start_with(4, &["m:160M"], |b| {
        b.metrics()
            .arg("--throttle-capacity")
            .arg(format!("{}", NODE_CAPACITY))
            .arg("--max-payload")
            .arg("4M")
    });
    let members = cluster.members_leased("m", &[0, 1, 2, 3]);
    let config = format!(
        "[throttle]\ncapacity = {ARRAY_CAPACITY}\n[members]\ngrant = {GRANT}\nliveness-timeout-ms = 60000\n{}",
        array_entry("r5", "raid5", "64K", &members)
    );
    let array = ArrayDaemon::start(&config);
    // The array holds its grants at every member before the flood.
    let show = |args: &[&str]| {
        let mut cmd = Command::new(cli_binary());
        cmd.args(["throttle", "show"]).args(args).arg("--json");
        let out = run_ok(&mut cmd, hang(60));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("throttle show JSON")
    };
    let grpc = array.grpc_addr();
    wait_for("every member lease held", hang(60), || {
        let m = show(&["--array", &grpc]);
        let members = m["members"].as_array()?.clone();
        (members.len() == 8 && members.iter().all(|g| g["lease_held"] == true)).then_some(())
    })
    .expect("leases");
    // One node much slower than the others.
    cluster.nodes[3].set_fault("m", &["--bandwidth", "8M"]);

    // Sample both sides while the flood runs.
    let mut targets = vec![(
        "array".to_string(),
        array.ready().metrics.expect("array metrics"),
    )];
    for (i, n) in cluster.nodes.iter().enumerate() {
        targets.push((format!("node {i}"), n.metrics_addr().expect("node metrics")));
    }
    let sampler = Sampler::start(targets);

    let dir = scratch_dir();
    let uri = array.uri("r5");
    // fio allocates depth x size up front: QD 512 of 1 MiB, then 32 MiB at QD 16.
    fio_flood(&uri, dir.path(), "1M", 128, 4, "24M");
    fio_flood(&uri, dir.path(), "32M", 16, 2, "64M");
    let worst = sampler.stop();
    assert_within_grants(&worst, "array", GRANT);
    for i in 0..4 {
        assert_shares_within(&worst, &format!("node {i}"), GRANT);
    }
    // Memory at every layer: budget plus a fixed overhead.
    assert_rss("array daemon", array.peak_rss(), ARRAY_CAPACITY);
    for (i, n) in cluster.nodes.iter().enumerate() {
        assert_rss(&format!("node {i}"), n.peak_rss(), NODE_CAPACITY);
    }
    // The slow member was throttled, not failed.
    let status = array.status("r5");
    assert_eq!(status["members"][3]["state"], "active", "{status}");
}

#[test]
fn a_failed_member_raises_the_published_cost() {
    let cluster = Cluster::start(3, &["m:24M"]);
    let members = cluster.members_leased("m", &[0, 1, 2]);
    let mut array = ArrayDaemon::start(&array_entry("r5", "raid5", "64K", &members));
    let grpc = array.grpc_addr();
    let read_cost = || {
        let mut cmd = Command::new(cli_binary());
        cmd.args(["throttle", "show", "--array", &grpc, "--json"]);
        let out = run_ok(&mut cmd, hang(60));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let read = m["costs"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["op"] == "read").cloned())
            .expect("a read cost");
        read["per_byte_fp"].as_u64().expect("per byte")
    };
    // Wait for the members' models to be followed (the composition uses them).
    wait_for("models followed", hang(60), || {
        let mut cmd = Command::new(cli_binary());
        cmd.args(["throttle", "show", "--array", &grpc, "--json"]);
        let out = run(&mut cmd, hang(60)).ok()?;
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        m["members"]
            .as_array()?
            .iter()
            .all(|g| g["model_live"] == true)
            .then_some(())
    })
    .expect("models");
    let healthy = read_cost();
    let mut cluster = cluster;
    cluster.nodes[1].kill9();
    // Reads reach the lost member and fail it.
    let _ = run(tool("nbdcopy").arg(array.uri("r5")).arg("null:"), hang(60));
    array.wait_status("r5", "member 1 failed", hang(60), |s| {
        s["state"] == "degraded"
    });
    let degraded = wait_for("the published read cost rises", hang(30), || {
        let c = read_cost();
        (c > healthy).then_some(c)
    })
    .expect("a higher read cost");
    eprintln!("read per byte (16.16): healthy {healthy}, degraded {degraded}");
    // The metrics say the same: the published model, and that member 1's
    // model and lease are lost (it is charged the default) while the
    // others' are held.
    let metrics = array.ready().metrics.expect("array metrics");
    wait_for("the metrics follow", hang(30), || {
        let text = http_get(metrics, "/metrics").ok()?;
        let per_byte = samples(&text, "nbdraid_throttle_model_per_byte_units")
            .into_iter()
            .find(|(l, _)| label(l, "op") == Some("read"))?
            .1;
        let flag = |metric: &str, slot: &str| {
            samples(&text, metric)
                .into_iter()
                .find(|(l, _)| {
                    label(l, "slot") == Some(slot) && label(l, "class") != Some("background")
                })
                .map(|(_, v)| v)
        };
        let ok = (per_byte * 65536.0).round() as u64 == degraded
            && flag("nbdraid_array_member_model_live", "1")? == 0.0
            && flag("nbdraid_array_member_lease_held", "1")? == 0.0
            && flag("nbdraid_array_member_model_live", "0")? == 1.0
            && flag("nbdraid_array_member_lease_held", "2")? == 1.0;
        ok.then_some(())
    })
    .expect("model and link gauges");
    let _ = array.kill9();
}

/// RAID 10 across hosts as three levels: RAID 0 over two RAID 1 array
/// daemons, each over two nodes. The top array leases grants at the two
/// lower arrays (which publish their composed models), they at their
/// nodes; a flood against the top stays within the grants and the memory
/// budget at every level, and real clients read back what they wrote.
#[test]
fn a_three_level_stack_is_bounded_at_every_level() {
    require_tools!("fio", "nbdinfo", "nbdcopy");
    // A quarter of it is the background pool: room for its own largest
    // request (16 MiB at 4 MiB payloads) and the top array's background grant.
    const LOWER_CAPACITY: u64 = 192 * MIB;
    const LOWER_GRANT: u64 = 16 * MIB;
    const TOP_CAPACITY: u64 = 256 * MIB;
    const TOP_GRANT: u64 = 48 * MIB;
    let cluster = Cluster::start_with(4, &["m:96M"], |b| {
        b.metrics()
            .arg("--throttle-capacity")
            .arg(format!("{NODE_CAPACITY}"))
            .arg("--max-payload")
            .arg("4M")
    });
    let lower = |name: &str, which: &[usize]| {
        ArrayDaemon::start(&format!(
            "max-payload = \"4M\"\n[throttle]\ncapacity = {LOWER_CAPACITY}\n[members]\ngrant = {LOWER_GRANT}\n{}",
            array_entry(name, "raid1", "64K", &cluster.members_leased("m", which))
        ))
    };
    let (a, b) = (lower("a", &[0, 1]), lower("b", &[2, 3]));
    let top_members =
        [(&a, "a"), (&b, "b")].map(|(d, name)| format!("{}?grpc={}", d.uri(name), d.grpc_addr()));
    let top = ArrayDaemon::start(&format!(
        "max-payload = \"8M\"\n[throttle]\ncapacity = {TOP_CAPACITY}\n[members]\ngrant = {TOP_GRANT}\n{}",
        array_entry("top", "raid0", "64K", &top_members)
    ));
    // Every lease at every level is held before the flood.
    for (d, n) in [(&top, 2), (&a, 2), (&b, 2)] {
        let grpc = d.grpc_addr();
        wait_for("every member lease held", hang(60), || {
            let mut cmd = Command::new(cli_binary());
            cmd.args(["throttle", "show", "--array", &grpc, "--json"]);
            let out = run(&mut cmd, hang(60)).ok()?;
            let m: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let members = m["members"].as_array()?.clone();
            (members.len() == 2 * n && members.iter().all(|g| g["lease_held"] == true))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("leases at {grpc}: {e}"));
    }

    let uri = top.uri("top");
    let dir = scratch_dir();
    let out = run_ok(tool("nbdinfo").args(["--size", &uri]), hang(60));
    let size: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("nbdinfo --size");
    assert!(
        size >= 150 * MIB,
        "the top export is two lower arrays striped: {size}"
    );

    let mut targets = vec![
        ("top".to_string(), top.ready().metrics.expect("metrics")),
        ("a".to_string(), a.ready().metrics.expect("metrics")),
        ("b".to_string(), b.ready().metrics.expect("metrics")),
    ];
    for (i, n) in cluster.nodes.iter().enumerate() {
        targets.push((format!("node {i}"), n.metrics_addr().expect("node metrics")));
    }
    let sampler = Sampler::start(targets);
    fio_flood(&uri, dir.path(), "1M", 64, 2, "32M");
    fio_flood(&uri, dir.path(), "8M", 8, 2, "64M");
    let worst = sampler.stop();
    assert_within_grants(&worst, "top", TOP_GRANT);
    assert_within_grants(&worst, "a", LOWER_GRANT);
    assert_within_grants(&worst, "b", LOWER_GRANT);
    assert_shares_within(&worst, "a", TOP_GRANT);
    assert_shares_within(&worst, "b", TOP_GRANT);
    for i in 0..4 {
        assert_shares_within(&worst, &format!("node {i}"), LOWER_GRANT);
    }
    assert_rss("top array daemon", top.peak_rss(), TOP_CAPACITY);
    assert_rss("array daemon a", a.peak_rss(), LOWER_CAPACITY);
    assert_rss("array daemon b", b.peak_rss(), LOWER_CAPACITY);
    for (i, n) in cluster.nodes.iter().enumerate() {
        assert_rss(&format!("node {i}"), n.peak_rss(), NODE_CAPACITY);
    }

    // Real clients through all three levels.
    let src = dir.path().join("src.bin");
    let back = dir.path().join("back.bin");
    write_pattern_file(&src, 0x3_1E7E1, size as usize);
    run_ok(
        tool("nbdcopy").arg("--flush").arg(&src).arg(&uri),
        hang(300),
    );
    run_ok(tool("nbdcopy").arg(&uri).arg(&back), hang(300));
    assert_files_equal(&src, &back);
    // And each lower array holds its half as a RAID 1 should: both
    // mirrors identical (a check pass finds nothing).
    for (d, name) in [(&a, "a"), (&b, "b")] {
        let out = d.cli(&["check", name, "--quiet", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("check {name} --json: {e}\n{}", show(&out)));
        assert_eq!(report["mismatches"], 0, "array {name}: {report}");
    }
}
