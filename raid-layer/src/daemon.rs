//! Wiring of the array daemon: listeners first, then the data directory
//! and state store, the throttle and buffers, the manager and its arrays,
//! then the engine, metrics and gRPC (from [`nbdraid_engine::daemon`]).
//!
//! [`ArrayDaemon::start`] binds every listener (port 0 allowed) before it
//! touches the data directory, so a start that fails on a busy port creates
//! nothing. An array that cannot be assembled is logged and left out; the
//! daemon serves the others and its admin service, so the operator can see
//! why and act. [`ArrayDaemon::run`] serves until the shutdown token fires,
//! lets NBD connections wind down, then has the manager mark every array
//! clean.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::daemon::{self, BoundAddrs, Listeners, Services};
use nbdraid_engine::grpc::ThrottleService;
use nbdraid_engine::server::{Engine, EngineConfig, Exports};
use nbdraid_engine::throttle::Throttle;
use nbdraid_engine::upstream::Upstreams;

use crate::api::{AdminError, ArrayAdmin};
use crate::array::Array;
use crate::config::{ArrayDaemonConfig, ConfigError, prepare_data_dir};
use crate::manager::{ArrayStore, Manager};
use crate::store::SledArrayStore;

/// Why the daemon cannot start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration or data directory is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound, or the ready file written.
    #[error(transparent)]
    Serve(#[from] daemon::DaemonError),
    /// The throttle's division is unusable.
    #[error(transparent)]
    Throttle(#[from] nbdraid_engine::Error),
    /// The state store could not be opened.
    #[error(transparent)]
    Store(#[from] AdminError),
}

/// An array daemon with its listeners bound and its arrays assembled,
/// ready to serve.
pub struct ArrayDaemon {
    config: ArrayDaemonConfig,
    manager: Arc<Manager>,
    exports: Arc<Exports<Array>>,
    throttle: Arc<Throttle>,
    pool: Arc<BufferPool>,
    upstreams: Arc<Upstreams>,
    listeners: Listeners,
}

impl ArrayDaemon {
    /// Binds the listeners, opens the data directory and state store, and
    /// assembles the stored and configured arrays.
    pub async fn start(config: ArrayDaemonConfig) -> Result<Self, DaemonError> {
        config.validate()?;
        // Before any metric handle exists: handles made earlier would be no-ops.
        nbdraid_engine::metrics::install_recorder();
        let listeners = Listeners::bind(&config.listen_addrs()).await?;
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || {
            prepare_data_dir(&dir)?;
            SledArrayStore::open(&dir.join("arrays")).map_err(DaemonError::from)
        })
        .await
        .map_err(|e| ConfigError(format!("opening the state store failed: {e}")))??;
        let store: Arc<dyn ArrayStore> = Arc::new(store);
        let model = SharedCostModel::new(config.cost_model());
        let throttle = Throttle::new("array", config.throttle_settings())?;
        // One pool for the engine's request buffers and the arrays' own
        // (parity, read-modify-write): both are counted by the throttle.
        let pool = BufferPool::new(throttle.capacity());
        let exports = Exports::<Array>::new();
        let mut settings = config.manager_settings();
        settings.throttle = Some(throttle.clone());
        let manager = Manager::new(
            settings,
            exports.clone(),
            pool.clone(),
            model.clone(),
            store,
        );
        if let Err(e) = manager.start(config.array_specs()).await {
            tracing::error!(error = %e, "assembling arrays failed; serving what could be assembled");
        }
        let addrs = listeners.addrs();
        tracing::info!(
            nbd = %addrs.nbd,
            metrics = ?addrs.metrics,
            grpc = ?addrs.grpc,
            capacity = throttle.capacity(),
            arrays = manager.list().len(),
            "array daemon listening"
        );
        Ok(Self {
            config,
            manager,
            exports,
            throttle,
            pool,
            upstreams: Upstreams::new(),
            listeners,
        })
    }

    /// Returns the bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        self.listeners.addrs()
    }

    /// Returns the daemon's arrays.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Serves until `shutdown` fires, lets connections wind down within the
    /// grace period, then marks every array clean.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DaemonError> {
        // Published: own costs plus what requests cost the members; charged
        // here: own costs (`self.model`, which the arrays' `cost` reads).
        let manager = Arc::downgrade(&self.manager);
        let throttle = ThrottleService::new(
            self.throttle.clone(),
            self.upstreams.clone(),
            self.manager.published_model(),
            self.config.max_payload.0,
            Duration::from_secs(self.config.throttle.lease_ttl_secs),
        )
        .with_members(Arc::new(move || {
            manager
                .upgrade()
                .map(|m| m.member_grants())
                .unwrap_or_default()
        }));
        let admin: Arc<dyn ArrayAdmin> = self.manager.clone();
        let engine_config = EngineConfig {
            handshake_timeout: Duration::from_secs(self.config.handshake_timeout_secs),
            max_connections: self.config.max_connections,
            shutdown_grace: Duration::from_secs(self.config.shutdown_grace_secs),
            ..EngineConfig::default()
        };
        let engine: Arc<Engine<Array, Exports<Array>>> = Engine::new(
            self.exports.clone(),
            self.throttle.clone(),
            self.upstreams.clone(),
            self.pool.clone(),
            engine_config,
            shutdown.clone(),
        );
        let services = Services {
            throttle,
            extra: crate::grpc::routes(admin),
        };
        let served = daemon::serve(
            self.listeners,
            self.config.ready_file.as_deref(),
            engine,
            services,
            shutdown,
        )
        .await;
        // Whatever ended serving, the arrays are marked clean if they can be.
        self.manager.shutdown().await;
        served?;
        tracing::info!("array daemon stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdraid_proto::grpc::{self, array_client::ArrayClient};

    fn config(dir: &std::path::Path) -> ArrayDaemonConfig {
        ArrayDaemonConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: dir.join("data"),
            ready_file: Some(dir.join("ready.json")),
            ..Default::default()
        }
    }

    /// The daemon binds port 0, reports what it bound, serves the `Array`
    /// and `Throttle` services, and stops on the token.
    #[tokio::test]
    async fn serves_admin_and_throttle_services_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let d = ArrayDaemon::start(config(dir.path())).await.unwrap();
        let grpc_addr = d.addrs().grpc.unwrap();
        assert!(dir.path().join("data/arrays").exists());
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(d.run(shutdown.clone()));
        let ready = dir.path().join("ready.json");
        for _ in 0..100 {
            if ready.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let addrs = daemon::read_ready_file(&ready).unwrap();
        assert_eq!(addrs.grpc, Some(grpc_addr));

        let url = format!("http://{grpc_addr}");
        let mut c = ArrayClient::connect(url.clone()).await.unwrap();
        let e = c
            .create_array(grpc::ArraySpec {
                name: "a".into(),
                level: "raid7".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("raid7"), "{e:?}");
        let e = c
            .get_array_status(grpc::ArrayStatusRequest { name: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let mut t = nbdraid_proto::grpc::throttle_client::ThrottleClient::connect(url)
            .await
            .unwrap();
        let m = t
            .get_metric(grpc::GetMetricRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.layer, "array");
        assert_eq!(m.capacity, crate::config::DEFAULT_CAPACITY);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!ready.exists(), "the ready file is removed at exit");
    }

    /// A busy port fails the start before the data directory is created.
    #[tokio::test]
    async fn a_busy_port_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = ArrayDaemonConfig {
            listen: busy.local_addr().unwrap(),
            ..config(dir.path())
        };
        let e = ArrayDaemon::start(c).await.err().unwrap();
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(!dir.path().join("data").exists());
    }
}
