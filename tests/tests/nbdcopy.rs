//! `nbdcopy` (libnbd-bin) in both directions, data compared byte for byte.

use nbdraid_tests::{
    Node, assert_files_equal, hang, require_tools, run_ok, scratch_dir, tool, write_pattern_file,
};

const MIB: usize = 1 << 20;

#[test]
fn nbdcopy_file_to_export_and_back() {
    require_tools!("nbdcopy");
    let node = Node::start(&["vol:64M"]);
    let dir = scratch_dir();
    let src = dir.path().join("src.bin");
    let back = dir.path().join("back.bin");
    write_pattern_file(&src, 0xC0FFEE, 64 * MIB);

    run_ok(
        tool("nbdcopy")
            .args(["--flush"])
            .arg(&src)
            .arg(node.uri("vol")),
        hang(300),
    );
    run_ok(tool("nbdcopy").arg(node.uri("vol")).arg(&back), hang(300));
    assert_files_equal(&src, &back);

    // Again with a single connection and a deep queue of small requests, overwriting
    // with different data (so a stale copy cannot pass).
    let src2 = dir.path().join("src2.bin");
    write_pattern_file(&src2, 0xBEEF, 64 * MIB);
    run_ok(
        tool("nbdcopy")
            .args([
                "--connections=1",
                "--requests=64",
                "--request-size=65536",
                "--flush",
            ])
            .arg(&src2)
            .arg(node.uri("vol")),
        hang(300),
    );
    run_ok(
        tool("nbdcopy")
            .args(["--connections=4", "--request-size=4194304"])
            .arg(node.uri("vol"))
            .arg(&back),
        hang(300),
    );
    assert_files_equal(&src2, &back);
}

#[test]
fn nbdcopy_sparse_source_leaves_zeroes() {
    require_tools!("nbdcopy");
    let node = Node::start(&["vol:32M"]);
    let dir = scratch_dir();
    // First fill the export with data, then copy a mostly-sparse image over it: the holes
    // must come back as zeroes (nbdcopy zeroes/trims them on the destination).
    let full = dir.path().join("full.bin");
    write_pattern_file(&full, 7, 32 * MIB);
    run_ok(tool("nbdcopy").arg(&full).arg(node.uri("vol")), hang(300));

    let sparse = dir.path().join("sparse.bin");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&sparse).expect("create");
        f.set_len(32 * MIB as u64).expect("set_len");
        for (i, off) in [0usize, 5 * MIB + 4096, 31 * MIB].into_iter().enumerate() {
            f.seek(SeekFrom::Start(off as u64)).expect("seek");
            f.write_all(&nbdraid_tests::pattern(100 + i as u64, 65536))
                .expect("write");
        }
    }
    run_ok(
        tool("nbdcopy")
            .arg("--flush")
            .arg(&sparse)
            .arg(node.uri("vol")),
        hang(300),
    );
    let back = dir.path().join("back.bin");
    run_ok(tool("nbdcopy").arg(node.uri("vol")).arg(&back), hang(300));
    assert_files_equal(&sparse, &back);
}
