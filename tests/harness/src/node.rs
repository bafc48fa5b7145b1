//! The storage node daemon, started on OS-picked ports with a ready file
//! (see [`crate::daemon`]), with its own temporary data directory.

use std::ffi::OsString;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use tempfile::TempDir;

use crate::bins::{cli_binary, hang, node_binary};
use crate::daemon::{DaemonProc, Launch, Ready};
use crate::data::parse_size;
use crate::process::run_ok;
use crate::tools::tool;

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
    grpc: bool,
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

    /// Also serve the gRPC control plane on an OS-picked port (kept across restarts).
    pub fn grpc(mut self) -> Self {
        self.grpc = true;
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
        let backend = backend();
        let spec = Arc::new(Mutex::new(self));
        let dir = data_dir.path().to_path_buf();
        let s = spec.clone();
        let command = Box::new(move |l: &Launch<'_>| {
            let spec = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match backend {
                Backend::Node => Ok(node_command(&spec, &dir, l)),
                Backend::Nbdkit => nbdkit_command(&spec, &dir, l),
            }
        });
        let proc = DaemonProc::start("node", command, backend == Backend::Node)
            .unwrap_or_else(|e| panic!("starting node: {e:#}"));
        Node {
            spec,
            data_dir,
            proc,
            backend,
        }
    }
}

fn node_command(spec: &NodeBuilder, data_dir: &Path, l: &Launch<'_>) -> Command {
    let mut c = Command::new(node_binary());
    c.arg("--listen")
        .arg(format!("127.0.0.1:{}", l.port))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--ready-file")
        .arg(l.ready);
    for v in &spec.volumes {
        c.arg("--volume").arg(v);
    }
    if spec.metrics {
        c.args(["--metrics-listen", "127.0.0.1:0"]);
    }
    if spec.grpc {
        c.arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", l.grpc_port));
    }
    if let Some(d) = &spec.default_export {
        c.arg("--default-export").arg(d);
    }
    c.args(&spec.args);
    if std::env::var_os("RUST_LOG").is_none() {
        c.env("RUST_LOG", "info");
    }
    c
}

/// A running (or stopped) storage node on its own temporary data dir.
#[derive(Debug)]
pub struct Node {
    spec: Arc<Mutex<NodeBuilder>>,
    data_dir: TempDir,
    proc: DaemonProc,
    backend: Backend,
}

impl Node {
    /// Returns a builder.
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

    /// Returns which server this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when the server is the real node (some assertions are node-specific).
    pub fn is_node(&self) -> bool {
        self.backend == Backend::Node
    }

    /// Returns the data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.proc.log_path()
    }

    /// Returns the bound addresses.
    pub fn ready(&self) -> &Ready {
        self.proc.ready()
    }

    /// Returns the NBD address.
    pub fn addr(&self) -> SocketAddr {
        self.ready().nbd
    }

    /// Returns the NBD port.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Returns the NBD host.
    pub fn host(&self) -> String {
        self.addr().ip().to_string()
    }

    /// Returns the metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ready().metrics
    }

    /// Returns the gRPC address, if enabled.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.ready().grpc
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr(), export)
    }

    /// PID of the daemon this harness started.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Is the daemon still running?
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Stops the daemon with SIGSTOP (it answers nothing until killed or thawed).
    pub fn freeze(&self) {
        self.proc.freeze()
    }

    /// Resumes a frozen daemon.
    pub fn thaw(&self) {
        self.proc.thaw()
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.proc.kill9()
    }

    /// SIGTERM (graceful shutdown) and wait for the exit, bounded by a hang detector.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// Like [`Node::terminate`] with another signal (e.g. SIGINT).
    pub fn terminate_with(&mut self, sig: i32) -> ExitStatus {
        self.proc.terminate_with(sig)
    }

    /// Replace the `--volume` specs used by the next [`Node::restart`].
    pub fn set_volumes(&mut self, specs: &[&str]) {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).volumes =
            specs.iter().map(|s| s.to_string()).collect();
    }

    /// Start again on the same data dir and ports (after [`Node::kill9`]
    /// or [`Node::terminate`]; a running node is killed first).
    pub fn restart(&mut self) {
        self.proc.restart()
    }

    /// Last `lines` lines of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// `GET /metrics` from the metrics listener.
    pub fn metrics_text(&self) -> Result<String> {
        self.proc.metrics_text()
    }

    /// Returns the daemon's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc.peak_rss()
    }

    /// Sets the injected faults of `volume` with `nbdraid node fault VOLUME
    /// FLAGS --node GRPC` (e.g. `&["--fail-writes"]`, `&["--hang"]`,
    /// `&["--clear"]`; each call replaces the volume's faults). Needs the
    /// node's gRPC listener ([`NodeBuilder::grpc`]); panics with the CLI's
    /// output if the fault cannot be set.
    pub fn set_fault(&self, volume: &str, flags: &[&str]) {
        let grpc = self
            .grpc_addr()
            .unwrap_or_else(|| panic!("set_fault({volume}): the node has no gRPC listener"));
        let mut cmd = Command::new(cli_binary());
        cmd.args(["node", "fault", volume])
            .args(flags)
            .arg("--node")
            .arg(grpc.to_string());
        run_ok(&mut cmd, hang(60));
    }
}

/// Development peer: nbdkit's file plugin serving `<data-dir>/volumes/*.img`.
fn nbdkit_command(spec: &NodeBuilder, data_dir: &Path, l: &Launch<'_>) -> Result<Command> {
    let vols = data_dir.join("volumes");
    let exports = l.run_dir.join("exports");
    fs::create_dir_all(&vols)?;
    let _ = fs::remove_dir_all(&exports);
    fs::create_dir_all(&exports)?;
    let mut ro = false;
    let mut first = None;
    for spec in &spec.volumes {
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
    let ready = l.ready.to_path_buf();
    let default = spec.default_export.clone().or(first).unwrap_or_default();
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
    let pidfile = l.run_dir.join("nbdkit.pid");
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
