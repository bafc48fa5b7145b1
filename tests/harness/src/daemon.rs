//! One launched daemon process (a node, an array daemon, or a stand-in
//! peer): started with a command that writes a ready file once it
//! listens, restarted on the same ports, signalled and reaped by its own
//! PID, its log shown when a test fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::bins::hang;
use crate::process::describe;

/// Contents of `--ready-file`.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The daemon's PID.
    pub pid: u32,
    /// NBD listener.
    pub nbd: SocketAddr,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// gRPC control plane.
    pub grpc: Option<SocketAddr>,
}

impl Ready {
    pub(crate) fn parse(text: &str) -> Result<Ready> {
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

/// What a daemon's command builder gets for one start.
pub struct Launch<'a> {
    /// Where the daemon must write its ready file.
    pub ready: &'a Path,
    /// The NBD port to listen on (0 the first time: the OS picks).
    pub port: u16,
    /// The gRPC port to listen on (0 the first time).
    pub grpc_port: u16,
    /// A directory private to this daemon.
    pub run_dir: &'a Path,
}

/// Builds the command of one start (`Sync`: a daemon may be shared by
/// tests running in parallel, see [`crate::shared`]).
pub type CommandFor = Box<dyn Fn(&Launch<'_>) -> Result<Command> + Send + Sync>;

/// A launched daemon.
pub struct DaemonProc {
    what: &'static str,
    command: CommandFor,
    run_dir: TempDir,
    child: Option<Child>,
    ready: Option<Ready>,
    starts: u32,
    port: u16,
    grpc_port: u16,
    /// The ready file must name the PID spawned (false for wrappers).
    check_pid: bool,
}

impl std::fmt::Debug for DaemonProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonProc")
            .field("what", &self.what)
            .field("ready", &self.ready)
            .finish()
    }
}

impl DaemonProc {
    /// Starts `what` with `command`; fails with the daemon's log if it
    /// does not come up.
    pub fn start(what: &'static str, command: CommandFor, check_pid: bool) -> Result<Self> {
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("nbdraid-{what}-"))
            .tempdir()?;
        let mut d = DaemonProc {
            what,
            command,
            run_dir,
            child: None,
            ready: None,
            starts: 0,
            port: 0,
            grpc_port: 0,
            check_pid,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Returns the daemon's private directory.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// Log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.run_dir
            .path()
            .join(format!("{}-{}.log", self.what, self.starts))
    }

    fn ready_path(&self) -> PathBuf {
        self.run_dir.path().join("ready.json")
    }

    /// Returns the addresses of the running daemon.
    pub fn ready(&self) -> &Ready {
        self.ready
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.what))
    }

    /// Returns the PID of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.what))
            .id()
    }

    fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} already running", self.what);
        }
        self.starts += 1;
        let ready_path = self.ready_path();
        let _ = fs::remove_file(&ready_path);
        let log = fs::File::create(self.log_path())?;
        let mut cmd = (self.command)(&Launch {
            ready: &ready_path,
            port: self.port,
            grpc_port: self.grpc_port,
            run_dir: self.run_dir.path(),
        })?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1");
        if crate::shared::on_keeper_thread() {
            crate::shared::die_with_spawning_thread(&mut cmd);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", describe(&cmd)))?;
        let pid = child.id();
        self.child = Some(child);
        let ready = self.wait_ready(pid)?;
        self.port = ready.nbd.port();
        self.grpc_port = ready.grpc.map_or(0, |a| a.port());
        self.ready = Some(ready);
        Ok(())
    }

    fn wait_ready(&mut self, pid: u32) -> Result<Ready> {
        let path = self.ready_path();
        let limit = hang(30);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(text) = fs::read_to_string(&path) {
                // Written atomically (rename), so a parse error is a real error.
                let ready = Ready::parse(&text)
                    .with_context(|| format!("bad ready file {}: {text:?}", path.display()))?;
                if self.check_pid && ready.pid != pid {
                    bail!("ready file pid {} is not the spawned pid {pid}", ready.pid);
                }
                return Ok(ready);
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "{} exited before becoming ready: {st}\n{}",
                    self.what,
                    self.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "hang detector: no ready file {} after {limit:?}",
                    path.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Is the daemon still running?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` and waits (bounded) for the exit.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} is not running", self.what))?;
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
                    "hang detector: {} pid {} did not exit within {timeout:?} of signal {sig}",
                    self.what,
                    child.id()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon with SIGSTOP: it accepts and answers nothing until
    /// it is killed or thawed (a peer that hangs, as opposed to one that is gone).
    pub fn freeze(&self) {
        // SAFETY: plain syscall on the PID of the child this harness spawned and has not reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGSTOP) };
    }

    /// Resumes a frozen daemon (SIGCONT).
    pub fn thaw(&self) {
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.pid() as i32, libc::SIGCONT) };
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL, hang(30))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// SIGTERM (graceful shutdown) and wait for the exit, bounded by a hang detector.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_with(libc::SIGTERM)
    }

    /// Like [`DaemonProc::terminate`] with another signal (e.g. SIGINT).
    pub fn terminate_with(&mut self, sig: i32) -> ExitStatus {
        self.signal_and_wait(sig, hang(30))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts again (after a kill or terminate; kills a running one first)
    /// on the same ports if they can be had again, else on fresh ones.
    pub fn restart(&mut self) {
        self.try_restart()
            .unwrap_or_else(|e| panic!("restarting {}: {e:#}", self.what));
    }

    /// [`DaemonProc::restart`], returning the error when the daemon does
    /// not come up (a test expecting a refusal reads the log).
    pub fn try_restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9();
        }
        let deadline = Instant::now() + hang(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("restart on the old ports failed ({e:#}); taking new ports");
                    break;
                }
                Err(e) if !self.log_tail(5).contains("in use") => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
        self.port = 0;
        self.grpc_port = 0;
        self.spawn()
    }

    /// Last `lines` lines of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- {} log ({}) ---\n{}",
            self.what,
            self.log_path().display(),
            all[start..].join("\n")
        )
    }

    /// The whole current log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Returns the daemon's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// `GET /metrics` from the metrics listener.
    pub fn metrics_text(&self) -> Result<String> {
        let addr = self
            .ready()
            .metrics
            .ok_or_else(|| anyhow!("no metrics listener"))?;
        http_get(addr, "/metrics")
    }
}

impl Drop for DaemonProc {
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
