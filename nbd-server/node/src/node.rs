//! Wiring of the node daemon: listeners first, then the data directory,
//! catalog and volumes, then the engine, metrics and gRPC (all from
//! [`nbdraid_engine::daemon`]).
//!
//! [`Node::start`] binds every listener (port 0 allowed) before it touches
//! the data directory, so a start that fails on a busy port creates
//! nothing; [`Node::run`] serves until the shutdown token fires.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::daemon::{self, BoundAddrs, Listeners, Services};
use nbdraid_engine::grpc::ThrottleService;
use nbdraid_engine::server::{Engine, EngineConfig};
use nbdraid_engine::throttle::Throttle;
use nbdraid_engine::upstream::Upstreams;

use crate::catalog::NodeIdentity;
use crate::catalog::{Catalog, SledCatalog};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::volumes::{VolumeDevice, Volumes};

/// A node with its listeners bound, ready to serve.
pub struct Node {
    config: NodeConfig,
    identity: NodeIdentity,
    volumes: Arc<Volumes>,
    throttle: Arc<Throttle>,
    model: SharedCostModel,
    upstreams: Arc<Upstreams>,
    listeners: Listeners,
}

/// Describes the node's own metrics (the serving stack describes its own).
fn describe_metrics() {
    nbdraid_engine::metrics::describe_counter!(
        "nbdraid_slow_inline_writes_total",
        "Buffered writes that ran inline and took long enough to send writes to the blocking pool for a while, per volume."
    );
}

impl Node {
    /// Binds the listeners, then opens the data directory and creates the
    /// declared volumes.
    pub async fn start(config: NodeConfig) -> Result<Self> {
        config.validate()?;
        // Before any metric handle exists: handles made earlier would be no-ops.
        nbdraid_engine::metrics::install_recorder();
        describe_metrics();
        let listeners = Listeners::bind(&config.listen_addrs()).await?;
        let model = SharedCostModel::new(config.cost_model());
        let throttle = Throttle::new("node", config.throttle_settings())?;
        let dir = &config.data_dir;
        crate::config::prepare_data_dir(dir)?;
        let catalog: Arc<dyn Catalog> = Arc::new(SledCatalog::open(&dir.join("catalog"))?);
        let identity = catalog.identity()?;
        let volumes = Arc::new(Volumes::open(
            dir,
            catalog,
            config.io_mode,
            config.block_sizes(),
            model.clone(),
            config.default_export.clone(),
        )?);
        for v in &config.volumes {
            volumes.ensure(&v.name, v.size.0, v.read_only)?;
        }
        apply_faults(&config, &volumes)?;
        let addrs = listeners.addrs();
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
            model,
            upstreams: Upstreams::new(),
            listeners,
        })
    }

    /// Returns the bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        self.listeners.addrs()
    }

    /// Returns the node's volumes.
    pub fn volumes(&self) -> &Arc<Volumes> {
        &self.volumes
    }

    /// Returns the node's cost model (shared with its volumes and its
    /// `Throttle` service).
    pub fn cost_model(&self) -> &SharedCostModel {
        &self.model
    }

    /// Serves until `shutdown` fires, then winds down within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let throttle = ThrottleService::new(
            self.throttle.clone(),
            self.upstreams.clone(),
            self.model.clone(),
            self.config.max_payload.0,
            Duration::from_secs(self.config.throttle.lease_ttl_secs),
        );
        let admin = crate::admin::routes(
            self.volumes.clone(),
            self.throttle.clone(),
            self.identity.clone(),
            self.listeners.addrs().nbd,
        );
        let engine_config = EngineConfig {
            handshake_timeout: Duration::from_secs(self.config.handshake_timeout_secs),
            max_connections: self.config.max_connections,
            shutdown_grace: Duration::from_secs(self.config.shutdown_grace_secs),
            ..EngineConfig::default()
        };
        let engine: Arc<Engine<VolumeDevice, Volumes>> = Engine::new(
            self.volumes.clone(),
            self.throttle.clone(),
            self.upstreams.clone(),
            BufferPool::new(self.throttle.capacity()),
            engine_config,
            shutdown.clone(),
        );
        let services = Services {
            throttle,
            extra: admin,
        };
        daemon::serve(
            self.listeners,
            self.config.ready_file.as_deref(),
            engine,
            services,
            shutdown,
        )
        .await?;
        tracing::info!("node stopped");
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
fn apply_faults(config: &NodeConfig, volumes: &Volumes) -> Result<()> {
    for f in &config.faults {
        let control = volumes
            .faults(&f.volume)
            .ok_or_else(|| Error::Config(format!("fault for unknown volume {:?}", f.volume)))?;
        tracing::warn!(fault = ?f, "FAULT INJECTION active (testing only)");
        control.set(f.faults());
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

/// Writes `addrs` as JSON to `path` atomically (see
/// [`nbdraid_engine::daemon::write_ready_file`]).
pub fn write_ready_file(path: &Path, addrs: &BoundAddrs) -> Result<()> {
    Ok(daemon::write_ready_file(path, addrs)?)
}
