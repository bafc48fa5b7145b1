//! What every nbdraid daemon does around its engine: bind the listeners
//! (port 0 allowed), report the bound addresses (a log line and the ready
//! file), serve the metrics endpoint and gRPC (the `Throttle` service plus
//! the daemon's own), wind down on SIGTERM/SIGINT, and report a fatal
//! error once.
//!
//! A daemon's `main` parses its configuration and calls [`run_main`] with
//! an async body; the body binds with [`Listeners::bind`] *before* it
//! changes anything on disk (so a start that fails on a busy port leaves
//! nothing behind), builds its engine and calls [`serve`].

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::device::BlockDevice;
use crate::grpc::ThrottleService;
use crate::server::{Engine, ExportRegistry};

/// Errors of the daemon wiring (not of the data path).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {what}: {reason}")]
    Bind {
        /// Which listener (NBD, gRPC, metrics).
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why, in words.
        reason: String,
    },
    /// The ready file could not be written.
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The addresses a daemon is told to listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    /// NBD.
    pub nbd: SocketAddr,
    /// Prometheus metrics, if enabled.
    pub metrics: Option<SocketAddr>,
    /// gRPC control plane, if enabled.
    pub grpc: Option<SocketAddr>,
}

/// The addresses a started daemon listens on (what `--ready-file` records,
/// as JSON `{pid, nbd, metrics, grpc}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundAddrs {
    /// Process id.
    pub pid: u32,
    /// NBD listener.
    pub nbd: SocketAddr,
    /// Prometheus endpoint, if enabled.
    pub metrics: Option<SocketAddr>,
    /// gRPC control plane, if enabled.
    pub grpc: Option<SocketAddr>,
}

/// A daemon's bound listeners.
pub struct Listeners {
    nbd: TcpListener,
    metrics: Option<TcpListener>,
    grpc: Option<TcpListener>,
    addrs: BoundAddrs,
}

async fn bind_one(addr: SocketAddr, what: &'static str) -> Result<TcpListener, DaemonError> {
    let fail = |reason: String| DaemonError::Bind { what, addr, reason };
    let l = TcpListener::bind(addr).await.map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the address is in use (another daemon running? use port 0 to pick a free one)"
                    .into()
            }
            std::io::ErrorKind::AddrNotAvailable => "no local interface has this address".into(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".into()
            }
            _ => e.to_string(),
        })
    })?;
    Ok(l)
}

impl Listeners {
    /// Binds every listener in `addrs` (port 0 picks a free port).
    pub async fn bind(addrs: &ListenAddrs) -> Result<Self, DaemonError> {
        let nbd = bind_one(addrs.nbd, "NBD").await?;
        let metrics = match addrs.metrics {
            Some(a) => Some(bind_one(a, "metrics").await?),
            None => None,
        };
        let grpc = match addrs.grpc {
            Some(a) => Some(bind_one(a, "gRPC").await?),
            None => None,
        };
        let local = |l: &TcpListener, asked: SocketAddr| l.local_addr().unwrap_or(asked);
        let bound = BoundAddrs {
            pid: std::process::id(),
            nbd: local(&nbd, addrs.nbd),
            metrics: metrics
                .as_ref()
                .zip(addrs.metrics)
                .map(|(l, a)| local(l, a)),
            grpc: grpc.as_ref().zip(addrs.grpc).map(|(l, a)| local(l, a)),
        };
        Ok(Self {
            nbd,
            metrics,
            grpc,
            addrs: bound,
        })
    }

    /// Returns the bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }
}

/// Writes `addrs` as JSON to `path` atomically (temporary file, then rename).
pub fn write_ready_file(path: &Path, addrs: &BoundAddrs) -> Result<(), DaemonError> {
    let fail = |source| DaemonError::ReadyFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(addrs).map_err(|e| fail(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(fail)
}

/// Reads a ready file written by [`write_ready_file`].
pub fn read_ready_file(path: &Path) -> Option<BoundAddrs> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Removes the ready file at `path` if it still names this process (a
/// stopped daemon leaves no stale addresses behind, and never removes the
/// file of another daemon that took its place).
pub fn remove_ready_file(path: &Path) {
    if read_ready_file(path).is_some_and(|a| a.pid == std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Returns the nearest existing ancestor of `dir` (itself if it exists).
pub fn existing_ancestor(dir: &Path) -> Option<&Path> {
    dir.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Checks that a daemon's data directory is usable, as a start would find
/// it: a writable directory, or creatable under a writable one. The error
/// says what is wrong, in words a user can act on.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(format!("data dir {shown} exists and is not a directory")),
        Ok(_) if !writable(dir) => Err(format!("data dir {shown} is not writable by this user")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(parent) = existing_ancestor(dir) else {
                return Err(format!("data dir {shown} cannot be created"));
            };
            if !parent.is_dir() {
                return Err(format!(
                    "cannot create data dir {shown}: {} is not a directory",
                    parent.display()
                ));
            }
            if !writable(parent) {
                return Err(format!(
                    "cannot create data dir {shown}: {} is not writable by this user",
                    parent.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(format!("cannot access data dir {shown}: permission denied"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            // A parent is a file: name it.
            match dir.ancestors().skip(1).find(|a| a.is_file()) {
                Some(file) => Err(format!(
                    "cannot create data dir {shown}: {} is a file, not a directory",
                    file.display()
                )),
                None => Err(format!("cannot access data dir {shown}: {e}")),
            }
        }
        Err(e) => Err(format!("cannot access data dir {shown}: {e}")),
    }
}

/// Checks the data directory ([`check_data_dir`]) and creates it if missing.
pub fn prepare_data_dir(dir: &Path) -> Result<(), String> {
    check_data_dir(dir)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))
}

/// What a daemon serves besides NBD.
pub struct Services {
    /// The layer's `Throttle` service.
    pub throttle: ThrottleService,
    /// The daemon's own gRPC services (admin, fault injection...).
    pub extra: tonic::service::Routes,
}

/// Serves NBD through `engine`, the metrics endpoint and gRPC on
/// `listeners` until `shutdown` fires; writes the ready file (if any) once
/// everything listens and removes it at the end.
pub async fn serve<D: BlockDevice, R: ExportRegistry<D>>(
    listeners: Listeners,
    ready_file: Option<&Path>,
    engine: Arc<Engine<D, R>>,
    services: Services,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let Listeners {
        nbd,
        metrics,
        grpc,
        addrs,
    } = listeners;
    let metrics_task = match (metrics, crate::metrics::install_recorder()) {
        (Some(l), Some(handle)) => Some(tokio::spawn(crate::metrics::serve(
            l,
            handle,
            shutdown.clone(),
        ))),
        (Some(_), None) => {
            tracing::warn!("a metrics recorder was already installed; endpoint disabled");
            None
        }
        _ => None,
    };
    let grpc_task = grpc.map(|l| {
        tokio::spawn(serve_grpc(
            l,
            services.throttle,
            services.extra,
            shutdown.clone(),
        ))
    });
    if let Some(path) = ready_file {
        write_ready_file(path, &addrs)?;
    }
    engine.serve(nbd).await;
    for t in [metrics_task, grpc_task].into_iter().flatten() {
        // Long-lived streams (leases, watches) must not hold up exit.
        let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
    }
    if let Some(path) = ready_file {
        remove_ready_file(path);
    }
    Ok(())
}

async fn serve_grpc(
    listener: TcpListener,
    throttle: ThrottleService,
    extra: tonic::service::Routes,
    shutdown: CancellationToken,
) {
    use nbdraid_proto::grpc::throttle_server::ThrottleServer;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let routes = extra.add_service(ThrottleServer::new(throttle));
    let result = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// How a daemon's process is set up before its body runs.
#[derive(Debug, Clone)]
pub struct MainSettings {
    /// The program name, prefixed to the fatal error.
    pub name: &'static str,
    /// Runtime worker threads (0 = one per usable CPU).
    pub threads: usize,
    /// Log filter (`info`, `debug`, `nbdraid_engine=trace`...).
    pub log: String,
    /// How long blocking work may hold up exit after the body returns.
    pub exit_grace: Duration,
}

/// Runs a daemon's async `body` with tracing, a multi-threaded runtime and
/// a shutdown token fired by SIGTERM or SIGINT. A fatal error is printed
/// once, on standard error, and gives a failing exit code.
pub fn run_main<F, Fut, E>(settings: MainSettings, body: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    crate::buffer::pin_malloc_behaviour();
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if settings.threads > 0 {
        rt.worker_threads(settings.threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", settings.name);
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(shutdown.clone()));
        body(shutdown).await
    });
    // Blocking-pool threads still finishing requests must not hold up exit
    // for long; idle ones leave at once.
    rt.shutdown_timeout(settings.exit_grace);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", settings.name);
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
