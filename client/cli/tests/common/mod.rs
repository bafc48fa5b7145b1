//! Harness for the CLI tests: real servers (`nbdkit`, `nbdraid-node`) on
//! ports the OS picked, and the built `nbdraid` binary run with a bound.
//!
//! Every process started here is stopped by its own PID when its guard is
//! dropped (SIGTERM, a bounded wait, then SIGKILL), and every wait is
//! bounded. `nbdkit` also gets `--exit-with-parent`, so a test that dies
//! leaves no server behind.

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// The `nbdraid` binary under test.
pub const NBDRAID: &str = env!("CARGO_BIN_EXE_nbdraid");

/// A hang detector: generous, never a performance assertion.
pub const HANG: Duration = Duration::from_secs(120);

/// Reports whether `tool` is on PATH; when it is not, the test is skipped
/// (or fails, under `NBDRAID_TEST_REQUIRE_TOOLS=1`, as in CI).
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("NBDRAID_TEST_REQUIRE_TOOLS").is_none(),
            "{tool} is required (NBDRAID_TEST_REQUIRE_TOOLS is set); see tests/install-deps.sh"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// A process we started, stopped by PID on drop.
pub struct Guard {
    child: Child,
    pub pid: u32,
}

impl Guard {
    fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Its own session, so a terminal's signals don't reach it.
        cmd.process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id();
        Self { child, pid }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        // SAFETY: signalling the child we spawned, by its PID.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Finds the TCP port a process listens on, from its socket inodes and
/// /proc/net/tcp (so a server can bind port 0 and be found without races).
fn listening_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(ino.to_string());
            }
        }
    }
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address, st == 0A (LISTEN), inode
        if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            let port = f[1].rsplit(':').next()?;
            return u16::from_str_radix(port, 16).ok();
        }
    }
    None
}

/// An `nbdkit` server on 127.0.0.1.
pub struct Nbdkit {
    pub guard: Guard,
    pub port: u16,
    _dir: TempDir,
}

impl Nbdkit {
    /// Starts `nbdkit PLUGIN ARGS...` on a free port.
    pub fn start(plugin_args: &[&str]) -> Self {
        let dir = TempDir::new().unwrap();
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "0"]);
        cmd.args(plugin_args);
        let mut guard = Guard::spawn(cmd, &dir.path().join("nbdkit.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = listening_port(guard.pid) {
                break p;
            }
            assert!(
                guard.running(),
                "nbdkit exited: {}",
                fs::read_to_string(dir.path().join("nbdkit.log")).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "nbdkit did not listen within 30 s"
            );
            thread::sleep(Duration::from_millis(10));
        };
        Self {
            guard,
            port,
            _dir: dir,
        }
    }

    /// Starts `nbdkit memory size=SIZE`.
    pub fn memory(size: &str) -> Self {
        Self::start(&["memory", &format!("size={size}")])
    }

    /// Returns the URI of its (default) export.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }
}

/// An `nbdraid-node` serving volumes from a temporary data directory.
pub struct Node {
    pub guard: Guard,
    pub addr: String,
    pub dir: TempDir,
}

fn node_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = Path::new(NBDRAID).parent().unwrap().to_path_buf();
        let bin = profile_dir.join("nbdraid-node");
        if !bin.exists() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "nbdraid-node"]);
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build -p nbdraid-node");
            assert!(st.success(), "cargo build -p nbdraid-node failed");
        }
        bin
    })
    .clone()
}

impl Node {
    /// Starts a node with `volumes` (each `NAME:SIZE`).
    pub fn start(volumes: &[&str]) -> Self {
        let dir = TempDir::new().unwrap();
        let ready = dir.path().join("ready.json");
        let mut cmd = Command::new(node_binary());
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"));
        for v in volumes {
            cmd.args(["--volume", v]);
        }
        cmd.arg("--ready-file").arg(&ready);
        let log = dir.path().join("node.log");
        let mut guard = Guard::spawn(cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Some(v) = fs::read_to_string(&ready)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            {
                assert_eq!(
                    v["pid"].as_u64(),
                    Some(guard.pid as u64),
                    "ready file of another process"
                );
                break v["nbd"].as_str().unwrap().to_string();
            }
            assert!(
                guard.running(),
                "nbdraid-node exited: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "nbdraid-node wrote no ready file within 60 s"
            );
            thread::sleep(Duration::from_millis(10));
        };
        Self { guard, addr, dir }
    }

    /// Returns the URI of volume `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr)
    }
}

/// Runs `nbdraid ARGS...` to completion (killed after [`HANG`]).
pub fn nbdraid(args: &[&str]) -> Output {
    let mut child = Command::new(NBDRAID)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes on threads so a chatty child never blocks.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nbdraid {args:?} still running after {HANG:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
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

/// A deterministic pseudo-random generator (splitmix64) for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Creates a sparse file of `size` bytes with random data at `ranges`
/// (offset, length); returns the total data bytes.
pub fn sparse_file(path: &Path, size: u64, ranges: &[(u64, usize)], seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed);
    let mut total = 0;
    for &(off, len) in ranges {
        f.write_all_at(&rng.bytes(len), off).unwrap();
        total += len as u64;
    }
    f.sync_all().unwrap();
    total
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Asserts two files have the same size and bytes, comparing in chunks.
pub fn assert_same_content(a: &Path, b: &Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(
        size,
        fb.metadata().unwrap().len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}
