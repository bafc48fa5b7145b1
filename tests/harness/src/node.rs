//! The storage node daemon, started on OS-picked ports with a ready file,
//! and reaped (by its own PID) when dropped.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::bins::{hang, node_binary};
use crate::data::parse_size;
use crate::process::describe;
use crate::tools::tool;

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
            port: 0,
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
    /// The NBD port of the last run (0 before the first): a restart asks
    /// for it again, as a real node's configured port would be.
    port: u16,
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
            format!("127.0.0.1:{}", self.port).into(),
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
        self.port = ready.nbd.port();
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

    /// Stops the daemon with SIGSTOP: it accepts and answers nothing until
    /// it is killed (a peer that hangs, as opposed to one that is gone).
    pub fn freeze(&self) {
        // SAFETY: plain syscall on the PID of the child this harness spawned and has not reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGSTOP) };
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
        // The same port if it can be had again (clients reconnect to it),
        // else a fresh one.
        let deadline = Instant::now() + hang(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    self.port = 0;
                    eprintln!("restart on the old port failed ({e:#}); taking a new port");
                    break;
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
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
