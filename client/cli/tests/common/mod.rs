//! The CLI suite's adapters over the shared test harness
//! ([`nbdraid_harness`]): the tests start the harness's `Node` and `Peer`
//! (nbdkit) and compare files with its `assert_files_equal`; the `nbdraid`
//! binary is the harness's [`cli_binary`] (built the one way every suite
//! builds it), and every run of it is bounded by the harness's hang
//! detector. What is left here is
//! the CLI's own vocabulary: run-and-expect-success, run-and-expect-a-clear
//! failure, sparse source files and their allocation.

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output};

use nbdraid_harness::{cli_binary, hang, pattern, run};

/// Runs `nbdraid ARGS...` to completion (killed by a 120 s hang detector:
/// debug builds copy gigabyte sparse files).
pub fn nbdraid(args: &[&str]) -> Output {
    run(Command::new(cli_binary()).args(args), hang(120)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `nbdraid ARGS...` and asserts success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = nbdraid(args);
    assert!(
        out.status.success(),
        "nbdraid {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `nbdraid ARGS...`, asserts it failed with a message; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = nbdraid(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "nbdraid {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.code().is_some(),
        "nbdraid {args:?} died by a signal: {err}"
    );
    assert!(
        err.contains("error"),
        "nbdraid {args:?}: no error message: {err:?}"
    );
    err
}

/// Creates a sparse file of `size` bytes with pattern data at `ranges`
/// (offset, length); returns the total data bytes.
pub fn sparse_file(path: &Path, size: u64, ranges: &[(u64, usize)], seed: u64) -> u64 {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut total = 0;
    for &(off, len) in ranges {
        f.write_all_at(&pattern(seed ^ off, len), off).unwrap();
        total += len as u64;
    }
    f.sync_all().unwrap();
    total
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}
