//! Real NBD servers for the tests: `nbdraid-node`, `nbdkit memory` and
//! `qemu-nbd`, each on 127.0.0.1 in its own temporary directory.
//!
//! Readiness is a file the server writes only once it listens (the node's
//! `--ready-file`, nbdkit's `-P`, qemu-nbd's `--pid-file`), so a server that
//! lost a port race is seen to exit instead of being mistaken for another
//! test's server on the same port. Every wait is bounded. A server is
//! killed with SIGKILL by the PID of the child we spawned, never by name,
//! and reaped; dropping a [`Server`] does that.
//!
//! A missing external tool skips the test with a printed `SKIP` line,
//! unless `NBDRAID_TEST_REQUIRE_TOOLS` is set (CI), where it fails.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Which server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `nbdraid-node` from this workspace.
    Node,
    /// `nbdkit memory size=...`.
    Nbdkit,
    /// `qemu-nbd` over a raw sparse file.
    Qemu,
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, uniquely named directory under the system temp dir.
    pub fn new(prefix: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let p = std::env::temp_dir().join(name);
        fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    /// Returns the directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Reports whether `name` is installed; prints a SKIP line (or panics under
/// `NBDRAID_TEST_REQUIRE_TOOLS`) when it is not.
pub fn have_tool(test: &str, name: &str) -> bool {
    if tool(name).is_some() {
        return true;
    }
    let msg = format!("SKIP {test}: {name} is not installed");
    if std::env::var_os("NBDRAID_TEST_REQUIRE_TOOLS").is_some() {
        panic!("{msg} and NBDRAID_TEST_REQUIRE_TOOLS is set");
    }
    eprintln!("{msg}");
    false
}

/// Returns the `nbdraid-node` binary of the profile these tests were built
/// with, building it once per test process (a no-op when up to date).
/// `NBDRAID_NODE_BIN` overrides the path and skips the build.
pub fn node_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NBDRAID_NODE_BIN") {
            return Ok(PathBuf::from(p));
        }
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut dir = exe
            .parent()
            .ok_or("test binary has no directory")?
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root)
            .args([
                "build",
                "--quiet",
                "-p",
                "nbdraid-node",
                "--bin",
                "nbdraid-node",
            ])
            .args(["--profile", &profile])
            .stdin(Stdio::null());
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let out = cmd.output().map_err(|e| format!("run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p nbdraid-node failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let bin = dir.join("nbdraid-node");
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("{} not found", bin.display()))
        }
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A running (or killed) server.
pub struct Server {
    kind: Kind,
    size: u64,
    extra: Vec<String>,
    child: Option<Child>,
    port: u16,
    starts: u32,
    // Last: removed after the child is gone.
    dir: TempDir,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("kind", &self.kind)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Server {
    /// Starts a server of `kind` with an export of `size` bytes; `extra`
    /// arguments go to the server (before the nbdkit plugin name). Returns
    /// `None` (the test skips) if the server is not installed.
    pub fn start(test: &str, kind: Kind, size: u64, extra: &[&str]) -> Option<Server> {
        match kind {
            Kind::Nbdkit if !have_tool(test, "nbdkit") => return None,
            Kind::Qemu if !have_tool(test, "qemu-nbd") => return None,
            _ => {}
        }
        let mut s = Server {
            kind,
            size,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            port: 0,
            starts: 0,
            dir: TempDir::new("nbdraid-client-test"),
        };
        if kind == Kind::Qemu {
            let f = fs::File::create(s.image()).expect("create image");
            f.set_len(size).expect("size image");
        }
        // A port picked here could be taken by someone else before the
        // server binds it: the server then exits, and we try another.
        let mut last = String::new();
        for _ in 0..5 {
            s.port = if kind == Kind::Node { 0 } else { free_port() };
            match s.spawn() {
                Ok(()) => return Some(s),
                Err(e) => last = e,
            }
        }
        panic!("{kind:?} did not start: {last}");
    }

    /// Returns `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Returns the export name the server serves.
    pub fn export(&self) -> &'static str {
        match self.kind {
            Kind::Nbdkit => "",
            Kind::Node | Kind::Qemu => "vol0",
        }
    }

    /// Returns which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Reports whether data survives a restart (nbdkit memory loses it).
    pub fn persistent(&self) -> bool {
        self.kind != Kind::Nbdkit
    }

    /// Returns the PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    /// Returns the current run's log (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn command(&self, ready: &Path) -> Command {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Node => {
                let mut c = Command::new(node_binary());
                c.arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--data-dir")
                    .arg(self.dir.path().join("data"))
                    .arg("--volume")
                    .arg(format!("vol0:{}", self.size))
                    .arg("--ready-file")
                    .arg(ready)
                    .args(&self.extra);
                c
            }
            Kind::Nbdkit => {
                let mut c = Command::new(tool("nbdkit").unwrap_or_else(|| "nbdkit".into()));
                c.args(["-f", "-i", "127.0.0.1", "-p", &port, "-P"])
                    .arg(ready)
                    .args(&self.extra)
                    .arg("memory")
                    .arg(format!("size={}", self.size));
                c
            }
            Kind::Qemu => {
                let mut c = Command::new(tool("qemu-nbd").unwrap_or_else(|| "qemu-nbd".into()));
                c.args([
                    "--persistent",
                    "--shared=8",
                    "-f",
                    "raw",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port,
                ])
                .args(["-x", "vol0", "--pid-file"])
                .arg(ready)
                .args(&self.extra)
                .arg(self.image());
                c
            }
        };
        // Its own process group (setsid-like): no terminal signals reach it.
        cmd.stdin(Stdio::null()).process_group(0);
        cmd
    }

    /// Spawns the server on `self.port` (0 = the node picks) and waits until
    /// it listens; on failure the child is reaped and the log returned.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        let ready = self.dir.path().join(format!("ready-{}", self.starts));
        let log = fs::File::create(self.log_path()).expect("create log");
        let mut cmd = self.command(&ready);
        cmd.stdout(log.try_clone().expect("clone log")).stderr(log);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", self.kind))?;
        let pid = child.id();
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{:?} exited ({st}) before listening:\n{}",
                    self.kind,
                    self.log()
                ));
            }
            let text = fs::read_to_string(&ready).unwrap_or_default();
            if let Some(port) = self.parse_ready(&text, pid) {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hang detector: {:?} not ready after {START_LIMIT:?}:\n{}",
                    self.kind,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Returns the port once the ready file is complete and names our child.
    fn parse_ready(&self, text: &str, pid: u32) -> Option<u16> {
        match self.kind {
            Kind::Node => {
                // {"pid":N,"nbd":"127.0.0.1:PORT",...}
                let field = |key: &str| {
                    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
                    let rest = text[at..].trim_start().trim_start_matches('"');
                    let end = rest.find(['"', ',', '}'])?;
                    Some(rest[..end].to_string())
                };
                let file_pid: u32 = field("pid")?.parse().ok()?;
                let nbd = field("nbd")?;
                let port = nbd.rsplit(':').next()?.parse().ok()?;
                (file_pid == pid).then_some(port)
            }
            Kind::Nbdkit | Kind::Qemu => {
                let file_pid: u32 = text.trim().parse().ok()?;
                (file_pid == pid).then_some(self.port)
            }
        }
    }

    /// Freezes the server with SIGSTOP (by the PID we spawned): it accepts
    /// nothing and answers nothing until killed.
    pub fn freeze(&self) {
        let pid = self.pid().expect("server running");
        let st = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("run kill -STOP");
        assert!(st.success(), "kill -STOP {pid}: {st}");
    }

    /// Asks the server to shut down with SIGTERM (by the PID we spawned)
    /// and reaps it, killing it if it has not exited within the limit.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {}: {st}", c.id());
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!(
            "hang detector: {:?} ignored SIGTERM for {START_LIMIT:?}",
            self.kind
        );
    }

    /// Kills the server with SIGKILL (by the PID we spawned) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (and the same data, for the
    /// node and qemu-nbd). Retries while the old port is still being freed.
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{:?} did not restart on port {}: {last}",
            self.kind, self.port
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
