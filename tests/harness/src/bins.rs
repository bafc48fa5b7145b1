//! The binaries under test, built one way only.
//!
//! `CARGO_BIN_EXE_*` does not work across packages, so the harness finds
//! each daemon next to the test executable's profile directory
//! (`target/<profile>/`, derived from `std::env::current_exe()`, so
//! `--release`, `--profile` and `CARGO_TARGET_DIR` all work). Once per test
//! process it runs `cargo build` for it in that profile, always with the
//! same features (the daemons with `fault-injection`, so tests can inject
//! faults over gRPC; faults stay off unless set), a no-op when the binary
//! is up to date. Every suite (end-to-end, client, CLI) goes through here,
//! so no suite runs a stale daemon and no two builds of different features
//! overwrite each other's binary.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::run;

/// Multiplier applied to every hang detector (`NBDRAID_TEST_HANG_SECS` / 30).
fn hang_scale() -> f64 {
    std::env::var("NBDRAID_TEST_HANG_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| s / 30.0)
        .unwrap_or(1.0)
}

/// A hang detector of `secs` seconds (scaled by `NBDRAID_TEST_HANG_SECS`). Never a
/// performance assertion: generous by design.
pub fn hang(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 * hang_scale())
}

/// Root of the cargo workspace (`tests/..`).
pub fn workspace_root() -> PathBuf {
    // This crate lives in tests/harness.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/harness has a grandparent")
        .to_path_buf()
}

/// Directory of the cargo profile the tests were built with, e.g. `target/debug`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let deps = exe.parent().expect("test binary has a parent dir");
    if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn profile_name(dir: &Path) -> String {
    match dir.file_name().and_then(|s| s.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    }
}

/// The binaries under test: package, binary, and the features every
/// suite builds it with (the only build of it the tests ever make).
const BINARIES: [(&str, &str); 3] = [
    ("nbdraid-node", "nbdraid-node"),
    ("nbdraid-raid", "nbdraid-array"),
    ("nbdraid-cli", "nbdraid"),
];

/// The features the daemons are built with for tests.
const FEATURES: &str = "nbdraid-node/fault-injection";

/// Builds every binary under test in one cargo call, in the tests'
/// profile (unless `NBDRAID_TEST_NO_BUILD` is set), once per process.
fn build_all() -> std::result::Result<(), String> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("NBDRAID_TEST_NO_BUILD").is_some() {
                return Ok(());
            }
            let dir = profile_dir();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace_root()).args(["build", "--quiet"]);
            for (package, bin) in BINARIES {
                cmd.args(["-p", package, "--bin", bin]);
            }
            cmd.args(["--features", FEATURES])
                .arg("--profile")
                .arg(profile_name(&dir));
            // The test binary may live under a custom target dir.
            if let Some(target) = dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            let out = run(&mut cmd, hang(1200)).map_err(|e| format!("cargo build: {e:#}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the binaries under test failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(())
        })
        .clone()
}

/// Returns the path of `bin`, built (once per process) if needed, or
/// the path in `env` when that variable is set. Panics with cargo's
/// output when the build fails.
fn binary(bin: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    if let Err(e) = build_all() {
        panic!("{e}");
    }
    let path = profile_dir().join(bin);
    if !path.is_file() {
        panic!("{bin} binary not found at {}", path.display());
    }
    path
}

/// Path of the `nbdraid-node` binary (with the `fault-injection` feature:
/// faults stay off unless a test sets them over gRPC). `NBDRAID_NODE_BIN`
/// overrides it.
pub fn node_binary() -> PathBuf {
    binary("nbdraid-node", "NBDRAID_NODE_BIN")
}

/// Path of the `nbdraid-array` binary. `NBDRAID_ARRAY_BIN` overrides it.
pub fn array_binary() -> PathBuf {
    binary("nbdraid-array", "NBDRAID_ARRAY_BIN")
}

/// Path of the `nbdraid` command-line tool. `NBDRAID_CLI_BIN` overrides it.
pub fn cli_binary() -> PathBuf {
    binary("nbdraid", "NBDRAID_CLI_BIN")
}
