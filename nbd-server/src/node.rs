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
use crate::catalog::NodeIdentity;
use crate::catalog::{Catalog, SledCatalog};
use crate::config::NodeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::store::file::FileVolume;
use crate::throttle::Throttle;
use crate::upstream::Upstreams;
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
    identity: NodeIdentity,
    volumes: Arc<Volumes>,
    throttle: Arc<Throttle>,
    upstreams: Arc<Upstreams>,
    nbd: TcpListener,
    metrics: Option<TcpListener>,
    grpc: Option<TcpListener>,
    addrs: BoundAddrs,
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> Result<Option<TcpListener>> {
    match addr {
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| Error::Config(format!("cannot listen on {a} for {what}: {e}"))),
        None => Ok(None),
    }
}

impl Node {
    /// Opens the data directory, creates declared volumes and binds the listeners.
    pub async fn start(config: NodeConfig) -> Result<Self> {
        config.validate()?;
        // Before any metric handle exists: handles made earlier would be no-ops.
        crate::metrics::install_recorder();
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
        apply_faults(&config, &volumes)?;
        let throttle = Throttle::new("node", config.throttle_settings())?;
        let nbd = bind(Some(config.listen), "NBD")
            .await?
            .ok_or_else(|| Error::Config("no NBD listener".into()))?;
        let metrics = bind(config.metrics_listen, "metrics").await?;
        let grpc = bind(config.grpc_listen, "gRPC").await?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| Error::io("getsockname", "listener", e))
        };
        let addrs = BoundAddrs {
            pid: std::process::id(),
            nbd: local(&nbd)?,
            metrics: metrics.as_ref().map(local).transpose()?,
            grpc: grpc.as_ref().map(local).transpose()?,
        };
        tracing::info!(
            node = %identity.uuid,
            nbd = %addrs.nbd,
            metrics = ?addrs.metrics,
            grpc = ?addrs.grpc,
            capacity = throttle.capacity(),
            volumes = volumes.list()?.len(),
            "node listening"
        );
        Ok(Self {
            config,
            identity,
            volumes,
            throttle,
            upstreams: Upstreams::new(),
            nbd,
            metrics,
            grpc,
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
        let grpc_task = self.grpc.map(|l| {
            let throttle = crate::grpc::ThrottleService::new(
                self.throttle.clone(),
                self.upstreams.clone(),
                self.config.max_payload.0,
                Duration::from_secs(self.config.throttle.lease_ttl_secs),
            );
            let node = crate::grpc::NodeService::new(
                self.volumes.clone(),
                self.throttle.clone(),
                self.identity.clone(),
                self.addrs.nbd,
            );
            tokio::spawn(crate::grpc::serve(
                l,
                throttle,
                node,
                self.volumes.clone(),
                shutdown.clone(),
            ))
        });
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
            self.upstreams.clone(),
            pool,
            engine_config,
            shutdown.clone(),
        );
        engine.serve(self.nbd).await;
        for t in [metrics_task, grpc_task].into_iter().flatten() {
            // Long-lived streams (leases, watches) must not hold up exit.
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        tracing::info!("node stopped");
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
fn apply_faults(config: &NodeConfig, volumes: &Volumes) -> Result<()> {
    for f in &config.faults {
        let dev = volumes
            .device(&f.volume)
            .ok_or_else(|| Error::Config(format!("fault for unknown volume {:?}", f.volume)))?;
        tracing::warn!(fault = ?f, "FAULT INJECTION active (testing only)");
        dev.faults().set(f);
    }
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
fn apply_faults(config: &NodeConfig, _volumes: &Volumes) -> Result<()> {
    if config.faults.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(
            "[[fault]] needs a build with the fault-injection feature".into(),
        ))
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
