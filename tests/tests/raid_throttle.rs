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
    let stop = Arc::new(AtomicBool::new(false));
    let worst: Arc<Mutex<BTreeMap<String, f64>>> = Default::default();
    let sampler = {
        let (stop, worst) = (stop.clone(), worst.clone());
        let node_metrics: Vec<std::net::SocketAddr> = cluster
            .nodes
            .iter()
            .map(|n| n.metrics_addr().expect("node metrics"))
            .collect();
        let array_metrics = array.ready().metrics.expect("array metrics");
        std::thread::spawn(move || {
            let max = |key: String, v: f64| {
                let mut w = worst.lock().unwrap();
                let e = w.entry(key).or_insert(0.0);
                *e = e.max(v);
            };
            while !stop.load(Ordering::Relaxed) {
                if let Ok(text) = http_get(array_metrics, "/metrics") {
                    for (l, v) in samples(&text, "nbdraid_array_member_held_units") {
                        let slot = label(&l, "slot").unwrap_or("?");
                        let class = label(&l, "class").unwrap_or("?");
                        max(format!("array holds at {slot} ({class})"), v);
                    }
                    for (l, v) in samples(&text, "nbdraid_array_member_grant_units") {
                        if label(&l, "class") == Some("foreground") {
                            let slot = label(&l, "slot").unwrap_or("?");
                            max(format!("grant at {slot}"), v);
                        }
                    }
                }
                for (i, addr) in node_metrics.iter().enumerate() {
                    if let Ok(text) = http_get(*addr, "/metrics") {
                        for (l, v) in samples(&text, "nbdraid_throttle_share_in_flight_units") {
                            if let Some(share) = label(&l, "share")
                                && share.starts_with("array r5")
                            {
                                max(format!("node {i} share {share}"), v);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let dir = scratch_dir();
    let uri = array.uri("r5");
    // fio allocates depth x size up front: QD 512 of 1 MiB, then 32 MiB at QD 16.
    fio_flood(&uri, dir.path(), "1M", 128, 4, "24M");
    fio_flood(&uri, dir.path(), "32M", 16, 2, "64M");
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");

    let worst = worst.lock().unwrap().clone();
    eprintln!("worst samples: {worst:#?}");
    for slot in 0..4 {
        let held = worst
            .get(&format!("array holds at {slot} (foreground)"))
            .copied()
            .unwrap_or(0.0);
        assert!(
            held <= GRANT as f64,
            "the array held {held} units at member {slot}, more than its grant {GRANT}"
        );
    }
    assert!(
        worst.keys().any(|k| k.starts_with("array holds at")) && worst.values().any(|v| *v > 0.0),
        "nothing was sampled: {worst:?}"
    );
    for (k, v) in &worst {
        if k.starts_with("node ") && !k.contains("background") {
            assert!(
                *v <= GRANT as f64,
                "{k}: {v} units in flight for the array, more than the grant {GRANT}"
            );
        }
    }
    // Memory at every layer: budget plus a fixed overhead.
    let array_rss = array.peak_rss();
    eprintln!(
        "array daemon peak RSS {} MiB (capacity {} MiB)",
        array_rss / MIB,
        ARRAY_CAPACITY / MIB
    );
    assert!(
        array_rss <= ARRAY_CAPACITY + OVERHEAD,
        "array daemon peak RSS {} MiB above capacity {} MiB + {} MiB",
        array_rss / MIB,
        ARRAY_CAPACITY / MIB,
        OVERHEAD / MIB
    );
    for (i, n) in cluster.nodes.iter().enumerate() {
        let rss = n.peak_rss();
        eprintln!(
            "node {i} peak RSS {} MiB (capacity {} MiB)",
            rss / MIB,
            NODE_CAPACITY / MIB
        );
        assert!(
            rss <= NODE_CAPACITY + OVERHEAD,
            "node {i} peak RSS {} MiB above capacity {} MiB + {} MiB",
            rss / MIB,
            NODE_CAPACITY / MIB,
            OVERHEAD / MIB
        );
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
    let _ = array.kill9();
}
