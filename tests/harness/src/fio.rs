//! fio with its NBD engine (`--ioengine=nbd --uri=...`): one run, its JSON
//! report, and the checks every verifying run must pass.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};

use serde_json::Value;

use crate::bins::hang;
use crate::process::{Background, run, show};
use crate::tools::tool;

/// Runs fio against `uri` with `args`, writing its JSON report to
/// `json_out` (fio's working directory is that file's directory, so its
/// `*-verify.state` files stay there). Returns the output and the parsed
/// report (`Null` if there is none).
pub fn fio(uri: &str, json_out: &Path, args: &[&str]) -> (Output, Value) {
    let mut c = tool("fio");
    c.current_dir(json_out.parent().expect("scratch dir"));
    c.args(["--ioengine=nbd", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .arg(format!("--output={}", json_out.display()))
        .args(args);
    let out = run(&mut c, hang(600)).unwrap_or_else(|e| panic!("{e:#}"));
    let text = std::fs::read_to_string(json_out).unwrap_or_default();
    // fio may print notices before the JSON document.
    let j = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or(Value::Null);
    (out, j)
}

/// Asserts that a fio run succeeded: exit status 0, at least one job in the
/// report, no job with an error, and no verification complaint.
pub fn assert_fio_clean(out: &Output, j: &Value, what: &str) {
    assert!(
        out.status.success(),
        "{what}: fio failed: {}\n{}\n{j:#}",
        out.status,
        show(out)
    );
    let jobs = j["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no JSON jobs\n{}", show(out)));
    assert!(!jobs.is_empty(), "{what}: no jobs in the report\n{j:#}");
    for job in jobs {
        assert_eq!(job["error"], 0, "{what}: job error: {job:#}");
    }
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("verify:") && !text.contains("bad magic"),
        "{what}: {text}"
    );
}

/// Returns the bytes all jobs of a report moved in direction `dir`
/// (`"read"` or `"write"`).
pub fn fio_io_bytes(j: &Value, dir: &str) -> u64 {
    j["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|x| x[dir]["io_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// A fio run (NBD engine) in the background, its JSON report in a file.
pub struct FioRun {
    what: String,
    bg: Background,
    json: PathBuf,
}

/// What a finished fio run reported.
pub struct FioReport {
    /// The job name.
    pub what: String,
    /// fio's exit status.
    pub status: ExitStatus,
    /// What fio printed on stderr (verify complaints go there).
    pub stderr: String,
    /// The JSON report (`Null` if none).
    pub json: Value,
}

impl FioRun {
    /// Starts fio against `uri` as job `what` with `args`, its report in
    /// `dir/what.json` (and its verify state files in `dir`).
    pub fn start(what: &str, uri: &str, dir: &Path, args: &[&str]) -> FioRun {
        let json = dir.join(format!("{what}.json"));
        let mut c = tool("fio");
        // fio drops *-verify.state files into its working directory.
        c.current_dir(dir)
            .args(["--ioengine=nbd", "--output-format=json"])
            .arg(format!("--uri={uri}"))
            .arg(format!("--output={}", json.display()))
            .arg(format!("--name={what}"))
            .args(args);
        FioRun {
            what: what.to_string(),
            bg: Background::spawn(&mut c),
            json,
        }
    }

    /// Reports whether fio is still running.
    pub fn is_running(&mut self) -> bool {
        self.bg.is_running()
    }

    /// Waits for fio to end and returns its report.
    pub fn finish(mut self) -> FioReport {
        let status = self.bg.wait(hang(600));
        let text = std::fs::read_to_string(&self.json).unwrap_or_default();
        // fio may print notices before the JSON document.
        let json = text
            .find('{')
            .and_then(|i| serde_json::from_str(&text[i..]).ok())
            .unwrap_or(Value::Null);
        FioReport {
            what: self.what,
            status,
            stderr: self.bg.stderr(),
            json,
        }
    }
}

impl FioReport {
    /// Asserts exit status 0, no job error and no verification complaint.
    pub fn assert_clean(&self) {
        let what = &self.what;
        assert!(
            self.status.success(),
            "{what}: fio failed: {}\n{}\n{:#}",
            self.status,
            self.stderr,
            self.json
        );
        let jobs = self.json["jobs"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no JSON jobs: {}", self.stderr));
        assert!(!jobs.is_empty(), "{what}: no jobs");
        for job in jobs {
            assert_eq!(job["error"], 0, "{what}: job error: {job:#}");
        }
        assert!(
            !self.stderr.contains("verify:") && !self.stderr.contains("bad magic"),
            "{what}: {}",
            self.stderr
        );
    }

    /// Bytes moved in direction `dir` ("read" or "write").
    pub fn bytes(&self, dir: &str) -> u64 {
        self.json["jobs"]
            .as_array()
            .map(|jobs| {
                jobs.iter()
                    .map(|j| j[dir]["io_bytes"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }
}
