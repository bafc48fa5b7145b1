//! Reference NBD servers as test peers: `nbdkit` (any plugin and filters)
//! and `qemu-nbd` over a raw file, each on 127.0.0.1 in its own temporary
//! directory.
//!
//! Neither can report an OS-picked port, so the harness picks a free port
//! and starts the server on it; readiness is the pid file the server
//! writes only once it listens, checked against the PID we spawned, so a
//! server that lost the port race is seen to exit (and is retried on
//! another port) instead of being mistaken for someone else's server.
//! Servers are killed by the PID we spawned (never by name) and reaped on
//! drop. nbdkit is started in its own process group (it may exit quietly
//! when started from a terminal's group).

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bins::hang;
use crate::tools::tool;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Builds a server's command line for a port and a pid file path.
type CommandFor = Box<dyn Fn(u16, &Path) -> Command + Send>;

/// A server that writes a pid file once it listens on the port it was given.
struct PidfileServer {
    name: &'static str,
    args: CommandFor,
    child: Option<Child>,
    port: u16,
    starts: u32,
    // Last: removed after the child is gone.
    dir: TempDir,
}

impl PidfileServer {
    fn new(name: &'static str, args: impl Fn(u16, &Path) -> Command + Send + 'static) -> Self {
        Self {
            name,
            args: Box::new(args),
            child: None,
            port: 0,
            starts: 0,
            dir: tempfile::Builder::new()
                .prefix(&format!("nbdraid-{name}-"))
                .tempdir()
                .expect("tempdir"),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}-{}.log", self.name, self.starts))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts on a free port, retrying on another one if the port was taken.
    fn start(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("{} did not start: {last}", self.name);
    }

    /// Starts on `self.port` and waits until the pid file names our child.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "{} already running", self.name);
        self.starts += 1;
        let pidfile = self.dir.path().join(format!("pid-{}", self.starts));
        let log = fs::File::create(self.log_path()).map_err(|e| e.to_string())?;
        let mut cmd = (self.args)(self.port, &pidfile);
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.name))?;
        let limit = hang(20);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{} exited ({st}) before listening:\n{}",
                    self.name,
                    self.log()
                ));
            }
            let pid: Option<u32> = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            if pid == Some(child.id()) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hang detector: {} not ready after {limit:?}:\n{}",
                    self.name,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall on the PID of the child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: as in `signal`.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let limit = hang(20);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("hang detector: {} ignored SIGTERM for {limit:?}", self.name);
    }

    /// Starts again on the same port, retrying while the old one is freed.
    fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        let deadline = Instant::now() + hang(20);
        while Instant::now() < deadline {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not restart on port {}: {last}",
            self.name, self.port
        );
    }
}

impl Drop for PidfileServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A reference server (nbdkit or qemu-nbd) on 127.0.0.1.
pub struct Peer {
    server: PidfileServer,
}

impl Peer {
    /// Starts nbdkit with `args` (filters, plugin, plugin parameters):
    /// `nbdkit -f -i 127.0.0.1 -p PORT -P PIDFILE ARGS...`, or returns
    /// `None` (the test skips) when nbdkit is not installed.
    pub fn nbdkit(test: &str, args: &[&str]) -> Option<Peer> {
        if !crate::tools::have_tools(test, &["nbdkit"]) {
            return None;
        }
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut server = PidfileServer::new("nbdkit", move |port, pidfile| {
            let mut c = tool("nbdkit");
            c.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "-P"])
                .arg(pidfile)
                .args(&args);
            c
        });
        server.start();
        Some(Peer { server })
    }

    /// Starts `nbdkit [extra...] memory size=SIZE` (export name "").
    pub fn nbdkit_memory(test: &str, size: u64, extra: &[&str]) -> Option<Peer> {
        let size = format!("size={size}");
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["memory", size.as_str()]);
        Self::nbdkit(test, &args)
    }

    /// Starts qemu-nbd exporting a fresh sparse raw image of `size` bytes
    /// as `vol0`, with `extra` arguments, or returns `None` when qemu-nbd
    /// is not installed.
    pub fn qemu_nbd(test: &str, size: u64, extra: &[&str]) -> Option<Peer> {
        if !crate::tools::have_tools(test, &["qemu-nbd"]) {
            return None;
        }
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let image = std::sync::Arc::new(std::sync::OnceLock::<PathBuf>::new());
        let img = image.clone();
        let mut server = PidfileServer::new("qemu-nbd", move |port, pidfile| {
            let mut c = tool("qemu-nbd");
            c.args([
                "--persistent",
                "--shared=8",
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "vol0",
                "--pid-file",
            ])
            .arg(pidfile)
            .args(&extra);
            if let Some(path) = img.get() {
                c.arg(path);
            }
            c
        });
        let path = server.dir.path().join("disk.img");
        fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create the qemu-nbd image");
        let _ = image.set(path);
        server.start();
        Some(Peer { server })
    }

    /// Returns `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }

    /// Returns `nbd://127.0.0.1:PORT/EXPORT` (nbdkit's export is "").
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr())
    }

    /// Returns the port.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Returns the PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Returns the current run's log (for failure messages).
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Stops the server with SIGSTOP (it answers nothing until killed).
    pub fn freeze(&self) {
        self.server.signal(libc::SIGSTOP);
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// SIGTERMs the server and reaps it (hang detector on the exit).
    pub fn terminate(&mut self) {
        self.server.terminate();
    }

    /// Starts the server again on the same port (and the same image, for qemu-nbd).
    pub fn restart(&mut self) {
        self.server.restart();
    }
}
