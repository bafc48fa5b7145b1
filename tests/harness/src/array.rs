//! The array daemon (`nbdraid-array`), and a local cluster: storage nodes
//! serving member volumes plus an array daemon building arrays of them.
//!
//! The array daemon gets its arrays from a TOML text the test writes
//! (`[[array]]` entries; the harness adds the listeners, data dir and
//! ready file as flags), keeps its data dir across restarts, and comes
//! back on the same ports.

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tempfile::TempDir;

use crate::bins::{array_binary, cli_binary, hang};
use crate::daemon::{DaemonProc, Launch, Ready};
use crate::node::Node;
use crate::process::{run, show};

/// An `[[array]]` entry for the array daemon's configuration.
pub fn array_entry(name: &str, level: &str, chunk: &str, members: &[String]) -> String {
    let members: Vec<String> = members.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[array]]\nname = {name:?}\nlevel = {level:?}\nchunk = {chunk:?}\nmembers = [{}]\n",
        members.join(", ")
    )
}

/// A running (or stopped) array daemon.
pub struct ArrayDaemon {
    config: Arc<Mutex<String>>,
    extra: Arc<Mutex<Vec<String>>>,
    data_dir: TempDir,
    proc: DaemonProc,
}

impl ArrayDaemon {
    /// Starts the daemon with `config` (TOML without listeners or
    /// directories); panics with its log if it does not come up.
    pub fn start(config: &str) -> ArrayDaemon {
        Self::try_start(config, &[]).unwrap_or_else(|e| panic!("starting nbdraid-array: {e:#}"))
    }

    /// Starts the daemon with `config` and extra flags.
    pub fn try_start(config: &str, extra: &[&str]) -> Result<ArrayDaemon> {
        let data_dir = tempfile::Builder::new()
            .prefix("nbdraid-array-data-")
            .tempdir()?;
        let config = Arc::new(Mutex::new(config.to_string()));
        let extra = Arc::new(Mutex::new(
            extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ));
        let (c, x, dir) = (config.clone(), extra.clone(), data_dir.path().to_path_buf());
        let command = Box::new(move |l: &Launch<'_>| {
            let path = l.run_dir.join("array.toml");
            fs::write(
                &path,
                c.lock().unwrap_or_else(|e| e.into_inner()).as_bytes(),
            )?;
            let mut cmd = Command::new(array_binary());
            cmd.arg("--config")
                .arg(&path)
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", l.port))
                .arg("--grpc-listen")
                .arg(format!("127.0.0.1:{}", l.grpc_port))
                .args(["--metrics-listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(&dir)
                .arg("--ready-file")
                .arg(l.ready)
                .args(x.lock().unwrap_or_else(|e| e.into_inner()).iter());
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
            Ok(cmd)
        });
        let proc = DaemonProc::start("array", command, true)?;
        Ok(ArrayDaemon {
            config,
            extra,
            data_dir,
            proc,
        })
    }

    /// Returns the bound addresses.
    pub fn ready(&self) -> &Ready {
        self.proc.ready()
    }

    /// Returns the NBD address.
    pub fn addr(&self) -> SocketAddr {
        self.ready().nbd
    }

    /// `nbd://127.0.0.1:PORT/NAME`: the export of array `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr(), name)
    }

    /// Returns the gRPC address (for `nbdraid array ... --array ADDR`).
    pub fn grpc_addr(&self) -> String {
        self.ready().grpc.map(|a| a.to_string()).unwrap_or_default()
    }

    /// Returns the data dir (the state store).
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    /// PID of the daemon this harness started.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Is the daemon still running?
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.proc.kill9()
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// Replaces the configuration the next start uses.
    pub fn set_config(&mut self, config: &str) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config.to_string();
    }

    /// Replaces the extra flags the next start uses (e.g. `--force-assemble NAME`).
    pub fn set_args(&mut self, args: &[&str]) {
        *self.extra.lock().unwrap_or_else(|e| e.into_inner()) =
            args.iter().map(|s| s.to_string()).collect();
    }

    /// Starts again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.proc.restart()
    }

    /// [`ArrayDaemon::restart`], returning the error if it does not come up.
    pub fn try_restart(&mut self) -> Result<()> {
        self.proc.try_restart()
    }

    /// The whole current log.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Last `lines` lines of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        self.proc.metrics_text()
    }

    /// Returns the daemon's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc.peak_rss()
    }

    /// Runs `nbdraid array ARGS --array ADDR` (bounded), returning its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(cli_binary());
        cmd.arg("array")
            .args(args)
            .arg("--array")
            .arg(self.grpc_addr());
        run(&mut cmd, hang(120)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Returns `nbdraid array status NAME --json` parsed.
    pub fn status(&self, name: &str) -> serde_json::Value {
        let out = self.cli(&["status", name, "--json"]);
        assert!(
            out.status.success(),
            "status {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status {name} --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `nbdraid array check NAME` to the end and returns the
    /// mismatches its JSON report counts; panics with the CLI's output
    /// when there is no such report.
    pub fn check_mismatches(&self, name: &str) -> u64 {
        let out = self.cli(&["check", name, "--quiet", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("check {name} --json: {e}\n{}", show(&out)));
        report["mismatches"]
            .as_u64()
            .unwrap_or_else(|| panic!("check report without mismatches: {report}"))
    }

    /// Polls [`ArrayDaemon::status`] until `pred` holds and returns that
    /// status; panics (hang detector) with the last status and the log's
    /// tail if it does not within `timeout`.
    pub fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(name);
            if pred(&status) {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "hang detector: array {name}: {what} not seen within {timeout:?}; last status:\n{status:#}\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Storage nodes for arrays: `n` nodes, each serving the given volumes
/// (with gRPC, for fault injection), all on 127.0.0.1.
pub struct Cluster {
    /// The nodes, in order.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes, each with volumes `volumes` (`NAME:SIZE`).
    pub fn start(n: usize, volumes: &[&str]) -> Cluster {
        Self::start_with(n, volumes, |b| b)
    }

    /// Like [`Cluster::start`], each node's builder passed through `more`
    /// (extra flags, metrics...).
    pub fn start_with(
        n: usize,
        volumes: &[&str],
        more: impl Fn(crate::node::NodeBuilder) -> crate::node::NodeBuilder,
    ) -> Cluster {
        let nodes = (0..n)
            .map(|_| {
                more(
                    volumes
                        .iter()
                        .fold(Node::builder().grpc(), |b, v| b.volume(v)),
                )
                .start()
            })
            .collect();
        Cluster { nodes }
    }

    /// Returns the URIs of volume `name` on nodes `which` (in that order).
    pub fn members(&self, name: &str, which: &[usize]) -> Vec<String> {
        which.iter().map(|&i| self.nodes[i].uri(name)).collect()
    }

    /// Returns an [`array_entry`] per `(name, level, nodes)` of `arrays`,
    /// all with chunk `chunk`: array `name`'s members are volume
    /// `volume(name)` on `nodes` (in that order), so several arrays can
    /// share the cluster's nodes, each on volumes of its own.
    pub fn array_entries(
        &self,
        arrays: &[(&str, &str, Vec<usize>)],
        chunk: &str,
        volume: impl Fn(&str) -> String,
    ) -> Vec<String> {
        arrays
            .iter()
            .map(|(name, level, nodes)| {
                array_entry(name, level, chunk, &self.members(&volume(name), nodes))
            })
            .collect()
    }

    /// Like [`Cluster::members`], with each node's control plane in the
    /// URI (`?grpc=`), so the array holds grants at the members and
    /// follows their cost models.
    pub fn members_leased(&self, name: &str, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&i| {
                let node = &self.nodes[i];
                let grpc = node.grpc_addr().expect("cluster nodes serve gRPC");
                format!("{}?grpc={grpc}", node.uri(name))
            })
            .collect()
    }
}
