//! External tools (libnbd, qemu, fio, nbdkit...): found on PATH or in the
//! sbin directories, and either present or the test is skipped with a
//! clear line (or fails, with `NBDRAID_TEST_REQUIRE_TOOLS` set, as in CI).

use std::path::PathBuf;
use std::process::Command;

use crate::bins::hang;
use crate::process::run;

/// Interpreter with Debian's `python3-libnbd` (not a pyenv `python3` on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Full path of an external tool, searching PATH plus the sbin directories (nbd-client,
/// mkfs.ext4 live there and a non-login PATH may lack them).
pub fn tool_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Are all the tools present? If not: fail when `NBDRAID_TEST_REQUIRE_TOOLS` is set (CI),
/// otherwise print a clear SKIP line and return false (the caller returns early).
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| tool_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "SKIP {test}: missing tool(s) {} (run tests/install-deps.sh)",
        missing.join(", ")
    );
    if std::env::var_os("NBDRAID_TEST_REQUIRE_TOOLS").is_some() {
        panic!("{msg} and NBDRAID_TEST_REQUIRE_TOOLS is set");
    }
    eprintln!("{msg}");
    false
}

/// Does Debian's python have the libnbd bindings?
pub fn have_python_libnbd(test: &str) -> bool {
    if !have_tools(test, &[SYSTEM_PYTHON]) {
        return false;
    }
    let ok = run(
        Command::new(SYSTEM_PYTHON).args(["-c", "import nbd"]),
        hang(30),
    )
    .map(|o| o.status.success())
    .unwrap_or(false);
    if !ok {
        let msg = format!("SKIP {test}: {SYSTEM_PYTHON} cannot `import nbd` (python3-libnbd)");
        if std::env::var_os("NBDRAID_TEST_REQUIRE_TOOLS").is_some() {
            panic!("{msg} and NBDRAID_TEST_REQUIRE_TOOLS is set");
        }
        eprintln!("{msg}");
    }
    ok
}

/// A `Command` for an external tool (resolved via [`tool_path`]).
pub fn tool(name: &str) -> Command {
    Command::new(tool_path(name).unwrap_or_else(|| PathBuf::from(name)))
}
