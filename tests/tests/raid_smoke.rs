//! The array daemon end to end, smallest case: four nodes, a RAID 5 array
//! over them, data in and out with nbdcopy, then `nbdraid array check`.

use nbdraid_tests::*;

#[test]
fn raid5_round_trip_and_check() {
    require_tools!("nbdcopy");
    let cluster = Cluster::start(4, &["m:36M"]);
    let members = cluster.members("m", &[0, 1, 2, 3]);
    let array = ArrayDaemon::start(&array_entry("r5", "raid5", "64K", &members));
    let status = array.status("r5");
    assert_eq!(status["state"], "clean", "{status}");
    assert_eq!(status["level"], "raid5", "{status}");

    let dir = scratch_dir();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let size = status["size"].as_u64().expect("size") as usize;
    write_pattern_file(&src, 5, size);
    run_ok(tool("nbdcopy").arg(&src).arg(array.uri("r5")), hang(120));
    run_ok(tool("nbdcopy").arg(array.uri("r5")).arg(&back), hang(120));
    assert_files_equal(&src, &back);

    let out = array.cli(&["check", "r5"]);
    assert!(out.status.success(), "check: {}", show(&out));
    let status = array.status("r5");
    assert_eq!(status["check"]["mismatches"], 0, "{status}");

    // The array's state is in the metrics, described.
    let metrics = array.metrics_text().expect("metrics");
    for line in [
        "# HELP nbdraid_array_state ",
        "nbdraid_array_member_state{array=\"r5\",slot=\"3\"} 0",
        "nbdraid_array_check_mismatches{array=\"r5\"} 0",
        "nbdraid_requests_total{export=\"r5\",op=\"write\"}",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
}
