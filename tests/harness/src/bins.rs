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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
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

/// Builds `bin` of `package` with `features` in the tests' profile (unless
/// `NBDRAID_TEST_NO_BUILD` is set) and returns its path.
fn build_binary(
    package: &str,
    bin: &str,
    features: &[&str],
) -> std::result::Result<PathBuf, String> {
    let dir = profile_dir();
    let path = dir.join(bin);
    if std::env::var_os("NBDRAID_TEST_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .arg("--profile")
            .arg(profile_name(&dir));
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
        // The test binary may live under a custom target dir.
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let out = run(&mut cmd, hang(1200)).map_err(|e| format!("cargo build: {e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "`cargo build -p {package}` failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{bin} binary not found at {}", path.display()))
    }
}

/// Path of the `nbdraid-node` binary, built (once per test process) if needed, with the
/// `fault-injection` feature (faults stay off unless a test sets them over gRPC). Panics
/// with cargo's output when the build fails.
pub fn node_binary() -> PathBuf {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NBDRAID_NODE_BIN") {
            return Ok(PathBuf::from(p));
        }
        build_binary("nbdraid-node", "nbdraid-node", &["fault-injection"])
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Path of the `nbdraid` command-line tool, built (once per test process) if needed.
pub fn cli_binary() -> PathBuf {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_binary("nbdraid-cli", "nbdraid", &[]))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}
