//! Shared harness for the end-to-end tests.
//!
//! The tests start real `nbdraid-node` daemons on OS-picked ports (`--listen 127.0.0.1:0`, then
//! the addresses come from `--ready-file`) and drive them with real NBD clients (libnbd tools,
//! qemu, fio, nbd-client, python3-libnbd).
//!
//! # Finding the node binary
//!
//! `CARGO_BIN_EXE_*` does not work across packages, so [`node_binary`] looks for
//! `nbdraid-node` next to the test executable's profile directory (`target/<profile>/`,
//! derived from `std::env::current_exe()`, so `--release`, `--profile` and `CARGO_TARGET_DIR`
//! all work). Once per test process it first runs `cargo build -p nbdraid-node --profile
//! <same profile>`, a no-op when the binary is up to date, so a test never runs against a stale
//! daemon. Environment knobs:
//!
//! * `NBDRAID_NODE_BIN=/path/to/nbdraid-node`: use this binary, build nothing.
//! * `NBDRAID_TEST_NO_BUILD=1`: do not run cargo; use whatever binary is in the profile dir.
//! * `NBDRAID_TEST_REQUIRE_TOOLS=1` (set it in CI): a missing external tool fails the test
//!   instead of skipping it.
//! * `NBDRAID_TEST_HANG_SECS=N`: scale every hang detector (default 30 s for daemon start).
//! * `NBDRAID_TEST_SERVER=nbdkit`: development aid, serve the volumes with `nbdkit file`
//!   instead of the node (a reference peer; only for checking the tests themselves).
//!
//! Every wait in here is bounded; every process the harness starts is killed by its own PID
//! (or the process group it created for it) and by nothing broader.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use tempfile::TempDir;

/// Interpreter with Debian's `python3-libnbd` (not a pyenv `python3` on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

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

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

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

/// Return early (skipping, with a printed reason) unless all the tools exist.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::have_tools(module_path!(), &[$($tool),+]) {
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Running commands, bounded
// ---------------------------------------------------------------------------------------------

/// Run `cmd` to completion with captured stdout/stderr. The child gets its own process group;
/// if it outlives `timeout` that group (which we created) is SIGKILLed and an error returned.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
    let pid = child.id() as i32;
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // SAFETY: plain syscall; -pid is the process group created above for this child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren could keep the pipes open; after the group kill they are gone too.
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "hang detector: `{desc}` still running after {timeout:?}; killed.\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// [`run`], panicking (with the full output) unless the command exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    let out = run(cmd, timeout).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        panic!("`{desc}` failed: {}\n{}", out.status, show(&out));
    }
    out
}

/// Human-readable stdout + stderr of a finished command.
pub fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Shell-ish rendering of a command for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// A `Command` for an external tool (resolved via [`tool_path`]).
pub fn tool(name: &str) -> Command {
    Command::new(tool_path(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Poll `f` every 20 ms until it returns `Some`, or fail after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("hang detector: timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Write `len` deterministic pseudo-random bytes to `path`.
pub fn write_pattern_file(path: &Path, seed: u64, len: usize) {
    let mut f = fs::File::create(path).expect("create data file");
    let chunk = 1 << 20;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        f.write_all(&pattern(seed ^ (off as u64), n))
            .expect("write data file");
        off += n;
    }
    f.sync_all().ok();
}

/// Compare two files byte for byte; on mismatch, panic naming the first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let da = fs::read(a).unwrap_or_else(|e| panic!("read {}: {e}", a.display()));
    let db = fs::read(b).unwrap_or_else(|e| panic!("read {}: {e}", b.display()));
    assert_eq!(
        da.len(),
        db.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(i) = da.iter().zip(&db).position(|(x, y)| x != y) {
        panic!(
            "{} and {} differ first at byte {i} ({:#04x} vs {:#04x})",
            a.display(),
            b.display(),
            da[i],
            db[i]
        );
    }
}

/// Parse a size like `64M`, `1G`, `512K` or plain bytes.
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("numeric size") * mult
}

// ---------------------------------------------------------------------------------------------
// The node daemon
// ---------------------------------------------------------------------------------------------

/// Contents of `--ready-file`.
#[derive(Debug, Clone)]
pub struct Ready {
    pub pid: u32,
    pub nbd: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
}

impl Ready {
    fn parse(text: &str) -> Result<Ready> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let addr = |key: &str| -> Result<Option<SocketAddr>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(
                    s.parse().with_context(|| format!("ready file {key}={s}"))?,
                )),
                Some(other) => bail!("ready file: {key} is {other}"),
            }
        };
        Ok(Ready {
            pid: v
                .get("pid")
                .and_then(|p| p.as_u64())
                .ok_or_else(|| anyhow!("no pid"))? as u32,
            nbd: addr("nbd")?.ok_or_else(|| anyhow!("ready file has no nbd address"))?,
            metrics: addr("metrics")?,
            grpc: addr("grpc")?,
        })
    }
}

/// Which server the harness runs (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Node,
    Nbdkit,
}

/// The backend selected by `NBDRAID_TEST_SERVER` (default: the node).
pub fn backend() -> Backend {
    match std::env::var("NBDRAID_TEST_SERVER").as_deref() {
        Ok("nbdkit") => Backend::Nbdkit,
        _ => Backend::Node,
    }
}

/// Reports whether the node (not a stand-in peer) is under test; prints a
/// SKIP line for `test` otherwise.
pub fn backend_is_node(test: &str) -> bool {
    if backend() == Backend::Node {
        return true;
    }
    eprintln!("SKIP {test}: node-specific");
    false
}

/// Builder for [`Node`].
#[derive(Debug, Default, Clone)]
pub struct NodeBuilder {
    volumes: Vec<String>,
    args: Vec<OsString>,
    metrics: bool,
    default_export: Option<String>,
}

impl NodeBuilder {
    /// `--volume NAME:SIZE[:ro]`.
    pub fn volume(mut self, spec: &str) -> Self {
        self.volumes.push(spec.to_string());
        self
    }

    /// Also listen for metrics on an OS-picked port.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// `--default-export NAME`.
    pub fn default_export(mut self, name: &str) -> Self {
        self.default_export = Some(name.to_string());
        self
    }

    /// Any other argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Start on a fresh temporary data dir; panics (with the daemon log) if it does not come up.
    pub fn start(self) -> Node {
        let data = tempfile::Builder::new()
            .prefix("nbdraid-data-")
            .tempdir()
            .expect("tempdir");
        self.start_in(data)
    }

    /// Start on the given data dir (the node owns it from now on).
    pub fn start_in(self, data_dir: TempDir) -> Node {
        let run_dir = tempfile::Builder::new()
            .prefix("nbdraid-run-")
            .tempdir()
            .expect("tempdir");
        let mut node = Node {
            spec: self,
            data_dir,
            run_dir,
            child: None,
            ready: None,
            starts: 0,
            backend: backend(),
        };
        node.spawn()
            .unwrap_or_else(|e| panic!("starting node: {e:#}"));
        node
    }
}

/// A running (or stopped) storage node on its own temporary data dir.
#[derive(Debug)]
pub struct Node {
    spec: NodeBuilder,
    data_dir: TempDir,
    run_dir: TempDir,
    child: Option<Child>,
    ready: Option<Ready>,
    starts: u32,
    backend: Backend,
}

impl Node {
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Start a node with these `--volume` specs.
    pub fn start(volumes: &[&str]) -> Node {
        volumes
            .iter()
            .fold(Node::builder(), |b, v| b.volume(v))
            .start()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when the server is the real node (some assertions are node-specific).
    pub fn is_node(&self) -> bool {
        self.backend == Backend::Node
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.run_dir
            .path()
            .join(format!("node-{}.log", self.starts))
    }

    fn ready_path(&self) -> PathBuf {
        self.run_dir.path().join("ready.json")
    }

    pub fn ready(&self) -> &Ready {
        self.ready.as_ref().expect("node is not running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.ready().nbd
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    pub fn host(&self) -> String {
        self.addr().ip().to_string()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ready().metrics
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr(), export)
    }

    /// PID of the daemon this harness started.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is not running").id()
    }

    /// Command line arguments (without the binary) of the next spawn.
    fn node_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.data_dir().into(),
            "--ready-file".into(),
            self.ready_path().into(),
        ];
        for v in &self.spec.volumes {
            a.push("--volume".into());
            a.push(v.into());
        }
        if self.spec.metrics {
            a.push("--metrics-listen".into());
            a.push("127.0.0.1:0".into());
        }
        if let Some(d) = &self.spec.default_export {
            a.push("--default-export".into());
            a.push(d.into());
        }
        a.extend(self.spec.args.iter().cloned());
        a
    }

    fn spawn(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "node already running");
        self.starts += 1;
        let _ = fs::remove_file(self.ready_path());
        let log = fs::File::create(self.log_path())?;
        let mut cmd = match self.backend {
            Backend::Node => {
                let mut c = Command::new(node_binary());
                c.args(self.node_args()).env("RUST_BACKTRACE", "1");
                if std::env::var_os("RUST_LOG").is_none() {
                    c.env("RUST_LOG", "info");
                }
                c
            }
            Backend::Nbdkit => self.nbdkit_command()?,
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", describe(&cmd)))?;
        let pid = child.id();
        self.child = Some(child);
        let ready = self.wait_ready(pid)?;
        self.ready = Some(ready);
        Ok(())
    }

    fn wait_ready(&mut self, pid: u32) -> Result<Ready> {
        let path = self.ready_path();
        let deadline = Instant::now() + hang(30);
        loop {
            if let Ok(text) = fs::read_to_string(&path) {
                // Written atomically (rename), so a parse error is a real error.
                let ready = Ready::parse(&text)
                    .with_context(|| format!("bad ready file {}: {text:?}", path.display()))?;
                if self.backend == Backend::Node && ready.pid != pid {
                    bail!("ready file pid {} is not the spawned pid {pid}", ready.pid);
                }
                return Ok(ready);
            }
            if let Some(st) = self.child.as_mut().expect("child").try_wait()? {
                self.child = None;
                bail!("node exited before becoming ready: {st}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "hang detector: no ready file {} after {:?}",
                    path.display(),
                    hang(30)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Development peer: nbdkit's file plugin serving `<data-dir>/volumes/*.img`.
    fn nbdkit_command(&self) -> Result<Command> {
        let vols = self.data_dir().join("volumes");
        let exports = self.run_dir.path().join("exports");
        fs::create_dir_all(&vols)?;
        let _ = fs::remove_dir_all(&exports);
        fs::create_dir_all(&exports)?;
        let mut ro = false;
        let mut first = None;
        for spec in &self.spec.volumes {
            let mut parts = spec.split(':');
            let name = parts.next().unwrap_or_default();
            let size = parse_size(parts.next().unwrap_or("0"));
            ro |= parts.next() == Some("ro");
            let img = vols.join(format!("{name}.img"));
            if !img.exists() {
                fs::File::create(&img)?.set_len(size)?;
            }
            std::os::unix::fs::symlink(&img, exports.join(name))?;
            first.get_or_insert(name.to_string());
        }
        // nbdkit cannot report an OS-picked port: pick one and hope (development only).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let ready = self.ready_path();
        let default = self
            .spec
            .default_export
            .clone()
            .or(first)
            .unwrap_or_default();
        let mut c = tool("nbdkit");
        c.args([
            "-f",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]);
        if ro {
            c.arg("-r");
        }
        // nbdkit writes the pidfile once listening; translate it into our ready file.
        let pidfile = self.run_dir.path().join("nbdkit.pid");
        let _ = fs::remove_file(&pidfile);
        c.arg("-P").arg(&pidfile);
        c.args(["--filter=exportname", "file"]);
        c.arg(format!("dir={}", exports.display()));
        c.arg(format!("default-export={default}"));
        let ready2 = ready.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let pid = fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    let tmp = ready2.with_extension("tmp");
                    let j = format!(
                        r#"{{"pid": {pid}, "nbd": "127.0.0.1:{port}", "metrics": null, "grpc": null}}"#
                    );
                    if fs::write(&tmp, j).is_ok() {
                        let _ = fs::rename(&tmp, &ready2);
                    }
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(c)
    }

    /// Is the daemon still running?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("node is not running"))?;
        self.ready = None;
        // SAFETY: plain syscall on the PID of the child this harness spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "hang detector: node pid {} did not exit within {timeout:?} of signal {sig}",
                    child.id()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL, hang(30))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// SIGTERM (graceful shutdown) and wait for the exit, bounded by a hang detector.
    /// Returns the exit status; panics (with the log) if the daemon hangs.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_with(libc::SIGTERM)
    }

    /// Like [`Node::terminate`] with another signal (e.g. SIGINT).
    pub fn terminate_with(&mut self, sig: i32) -> ExitStatus {
        match self.signal_and_wait(sig, hang(30)) {
            Ok(st) => st,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Replace the `--volume` specs used by the next [`Node::restart`].
    pub fn set_volumes(&mut self, specs: &[&str]) {
        self.spec.volumes = specs.iter().map(|s| s.to_string()).collect();
    }

    /// Start again on the same data dir (after [`Node::kill9`] or [`Node::terminate`]).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn()
            .unwrap_or_else(|e| panic!("restarting node: {e:#}"));
    }

    /// Last `lines` lines of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- node log ({}) ---\n{}",
            self.log_path().display(),
            all[start..].join("\n")
        )
    }

    /// `GET /metrics` from the metrics listener (plain HTTP/1.0 over a TcpStream).
    pub fn metrics_text(&self) -> Result<String> {
        let addr = self
            .metrics_addr()
            .ok_or_else(|| anyhow!("no metrics listener"))?;
        http_get(addr, "/metrics")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Only the PID this harness spawned.
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
    }
}

/// Minimal bounded HTTP GET, returning the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, hang(10))?;
    s.set_read_timeout(Some(hang(10)))?;
    s.set_write_timeout(Some(hang(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad response"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        bail!("GET {path}: {status}");
    }
    Ok(body.to_string())
}

/// A fresh temporary directory for test files (client-side data, mount points).
pub fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("nbdraid-test-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------------------------
// Background processes
// ---------------------------------------------------------------------------------------------

/// A process running in the background (its own process group) whose stdout lines are
/// collected as they arrive. Dropping it SIGKILLs that process group (the one we created).
pub struct Background {
    child: Option<Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: PathBuf,
    _dir: TempDir,
    desc: String,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        let dir = scratch_dir();
        let stderr = dir.path().join("stderr");
        let desc = describe(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let out = child.stdout.take().expect("piped");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                match line {
                    Ok(l) => l2.lock().expect("lock").push(l),
                    Err(_) => break,
                }
            }
        });
        Background {
            child: Some(child),
            lines,
            stderr,
            _dir: dir,
            desc,
        }
    }

    /// Snapshot of the stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait (bounded) until `pred` holds for the lines so far.
    pub fn wait_lines(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.lines()) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Give the reader thread a moment to drain the pipe.
                thread::sleep(Duration::from_millis(100));
                if pred(&self.lines()) {
                    return;
                }
                panic!(
                    "`{}` exited ({st}) before {what}; stdout tail: {:?}\nstderr: {}",
                    self.desc,
                    self.lines().iter().rev().take(10).collect::<Vec<_>>(),
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "hang detector: {what} not seen within {timeout:?} from `{}`",
                    self.desc
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for the exit; panics on the hang detector.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                thread::sleep(Duration::from_millis(50)); // let the reader drain
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "hang detector: `{}` still running after {timeout:?}",
                    self.desc
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall; -pid is the process group created for this child.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}
