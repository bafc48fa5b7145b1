//! fio with its NBD engine (`--ioengine=nbd --uri=...`): one run, its JSON
//! report, and the checks every verifying run must pass.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::bins::hang;
use crate::process::{run, show};
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
