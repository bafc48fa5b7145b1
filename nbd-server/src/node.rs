//! Wiring of the node daemon: data directory, catalog, volumes, listeners,
//! the NBD engine and the metrics endpoint.
//!
//! [`Node::start`] binds every listener (port 0 allowed) and reports the
//! addresses; [`Node::run`] serves until the shutdown token fires.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::buffer::BufferPool;
use crate::catalog::{Catalog, SledCatalog};
use crate::config::NodeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::store::file::FileVolume;
use crate::throttle::Throttle;
use crate::volumes::Volumes;

/// The addresses a started node listens on (what `--ready-file` records).
#[derive(Debug, Clone, Serialize)]
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

/// A node with its listeners bound, ready to serve.
pub struct Node {
    config: NodeConfig,
    volumes: Arc<Volumes>,
    throttle: Arc<Throttle>,
    nbd: TcpListener,
    metrics: Option<TcpListener>,
    addrs: BoundAddrs,
}

impl Node {
    /// Opens the data directory, creates declared volumes and binds the listeners.
    pub async fn start(config: NodeConfig) -> Result<Self> {
        config.validate()?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("cannot create data dir {}: {e}", dir.display())))?;
        let catalog: Arc<dyn Catalog> = Arc::new(SledCatalog::open(&dir.join("catalog"))?);
        let identity = catalog.identity()?;
        let volumes = Arc::new(Volumes::open(
            dir,
            catalog,
            config.io_mode,
            config.block_sizes(),
            config.default_export.clone(),
        )?);
        for v in &config.volumes {
            volumes.ensure(&v.name, v.size.0, v.read_only)?;
        }
        let throttle = Throttle::new("node", config.throttle.capacity.0, config.throttle.enabled);
        let nbd = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
        let metrics =
            match config.metrics_listen {
                Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
                    Error::Config(format!("cannot listen on {a} for metrics: {e}"))
                })?),
                None => None,
            };
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| Error::io("getsockname", "listener", e))
        };
        let addrs = BoundAddrs {
            pid: std::process::id(),
            nbd: local(&nbd)?,
            metrics: metrics.as_ref().map(local).transpose()?,
            grpc: None,
        };
        tracing::info!(
            node = %identity.uuid,
            nbd = %addrs.nbd,
            metrics = ?addrs.metrics,
            volumes = volumes.list()?.len(),
            "node listening"
        );
        Ok(Self {
            config,
            volumes,
            throttle,
            nbd,
            metrics,
            addrs,
        })
    }

    /// Returns the bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Returns the node's volumes.
    pub fn volumes(&self) -> &Arc<Volumes> {
        &self.volumes
    }

    /// Serves until `shutdown` fires, then winds down within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if let Some(path) = &self.config.ready_file {
            write_ready_file(path, &self.addrs)?;
        }
        let metrics_task = match (self.metrics, crate::metrics::install_recorder()) {
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
        let engine_config = EngineConfig {
            handshake_timeout: Duration::from_secs(self.config.handshake_timeout_secs),
            max_connections: self.config.max_connections,
            shutdown_grace: Duration::from_secs(self.config.shutdown_grace_secs),
            ..EngineConfig::default()
        };
        let pool = BufferPool::new(self.throttle.capacity());
        let engine: Arc<Engine<FileVolume, Volumes>> = Engine::new(
            self.volumes.clone(),
            self.throttle.clone(),
            pool,
            engine_config,
            shutdown.clone(),
        );
        engine.serve(self.nbd).await;
        if let Some(t) = metrics_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        tracing::info!("node stopped");
        Ok(())
    }
}

/// Writes `addrs` as JSON to `path` atomically (temporary file, then rename).
pub fn write_ready_file(path: &Path, addrs: &BoundAddrs) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(addrs).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Config(format!("cannot write ready file {}: {e}", path.display())))
}
