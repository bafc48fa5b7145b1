//! The NBD server engine, generic over the [`BlockDevice`] it serves.
//!
//! `serve` accepts connections; each runs the handshake
//! ([`handshake`]) and then the transmission phase ([`transmission`]).
//! The node serves its file volumes through it; the RAID layer will serve
//! its arrays through the same code.
//!
//! Shutdown: when the token fires, the engine stops accepting; connections
//! in the handshake get NBD_REP_ERR_SHUTDOWN; connections in transmission
//! finish the requests they already admitted, answer new ones with
//! ESHUTDOWN, and close once idle (or after the grace period).

mod handshake;
mod reply;
mod transmission;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::buffer::BufferPool;
use crate::device::BlockDevice;
use crate::metrics::OpMetrics;
use crate::throttle::Throttle;
use crate::upstream::Upstreams;

/// One export the engine can serve.
pub struct Export<D> {
    /// The export name clients ask for.
    pub name: String,
    /// The device behind it.
    pub device: Arc<D>,
    /// Its request metrics.
    pub metrics: Arc<OpMetrics>,
}

impl<D> Clone for Export<D> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            device: self.device.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Where the engine finds exports by name.
pub trait ExportRegistry<D>: Send + Sync + 'static {
    /// Returns the export `name` ("" is the default export), if any.
    fn lookup(&self, name: &str) -> Option<Export<D>>;
    /// Returns every export's name and description, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// A registry of exports kept in memory, for daemons whose exports are not
/// files in a catalog (arrays) and for tests.
pub struct Exports<D> {
    map: std::sync::RwLock<std::collections::BTreeMap<String, Export<D>>>,
    default: std::sync::RwLock<Option<String>>,
}

impl<D> Default for Exports<D> {
    fn default() -> Self {
        Self {
            map: Default::default(),
            default: Default::default(),
        }
    }
}

impl<D: BlockDevice> Exports<D> {
    /// Returns an empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds (or replaces) the export `name` serving `device`, with fresh metrics.
    pub fn insert(&self, name: &str, device: Arc<D>) -> Export<D> {
        crate::metrics::unretire_export(name);
        let export = Export {
            name: name.to_string(),
            device,
            metrics: OpMetrics::new(name),
        };
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), export.clone());
        export
    }

    /// Removes the export `name` (open connections keep their device) and
    /// hides its metrics.
    pub fn remove(&self, name: &str) -> Option<Export<D>> {
        let gone = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if gone.is_some() {
            crate::metrics::retire_export(name);
        }
        gone
    }

    /// Serves `name` to clients that ask for the default export "".
    pub fn set_default(&self, name: Option<String>) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// Returns every export.
    pub fn all(&self) -> Vec<Export<D>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl<D: BlockDevice> ExportRegistry<D> for Exports<D> {
    fn lookup(&self, name: &str) -> Option<Export<D>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        if name.is_empty() {
            let default = self.default.read().unwrap_or_else(|e| e.into_inner());
            return match default.as_deref() {
                Some(d) => map.get(d).cloned(),
                None if map.len() == 1 => map.values().next().cloned(),
                None => None,
            };
        }
        map.get(name).cloned()
    }

    fn list(&self) -> Vec<(String, String)> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| (e.name.clone(), e.device.info().description))
            .collect()
    }
}

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A client must finish negotiating within this time.
    pub handshake_timeout: Duration,
    /// Connections beyond this number are refused.
    pub max_connections: usize,
    /// Bound on the data of one option request.
    pub max_option_len: u32,
    /// Bound on extents in one BLOCK_STATUS reply.
    pub max_extents: usize,
    /// How long connections may take to wind down after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_option_len: nbdraid_proto::handshake::DEFAULT_MAX_OPTION_LEN,
            max_extents: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The NBD server engine.
pub struct Engine<D, R> {
    registry: Arc<R>,
    throttle: Arc<Throttle>,
    upstreams: Arc<Upstreams>,
    pool: Arc<BufferPool>,
    config: EngineConfig,
    shutdown: CancellationToken,
    _device: std::marker::PhantomData<fn() -> D>,
}

impl<D: BlockDevice, R: ExportRegistry<D>> Engine<D, R> {
    /// Returns an engine serving `registry`'s exports under `throttle`
    /// (connections draw from the shares `upstreams` assigns them), with
    /// request buffers from `pool`, stopping when `shutdown` fires.
    pub fn new(
        registry: Arc<R>,
        throttle: Arc<Throttle>,
        upstreams: Arc<Upstreams>,
        pool: Arc<BufferPool>,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            throttle,
            upstreams,
            pool,
            config,
            shutdown,
            _device: std::marker::PhantomData,
        })
    }

    /// Returns the engine's throttle.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// Accepts and serves connections until shutdown, then waits (at most the
    /// grace period) for open connections to wind down.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        // Calibrate the TSC clock used for latency samples now, not on the
        // first request.
        let _ = quanta::Instant::now();
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let connections = metrics::gauge!("nbdraid_open_connections");
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = self.shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.config.max_connections, "too many connections; refusing");
                continue;
            };
            let engine = self.clone();
            let gauge = connections.clone();
            gauge.increment(1.0);
            let span = tracing::info_span!("conn", %peer);
            tracker.spawn(
                async move {
                    engine.connection(stream, peer).await;
                    gauge.decrement(1.0);
                    drop(slot);
                }
                .instrument(span),
            );
        }
        tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "connections still open after the shutdown grace period; closing them"
            );
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        tracing::debug!("connected");
        let (rd, wr) = stream.into_split();
        let negotiated = tokio::time::timeout(
            self.config.handshake_timeout,
            handshake::negotiate(&self, rd, wr),
        )
        .await;
        let session = match negotiated {
            Err(_) => {
                tracing::info!("handshake timed out");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "handshake ended");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(s))) => s,
        };
        tracing::debug!(export = %session.export.name, structured = session.structured, "transmission");
        let share = self.upstreams.attach(peer);
        let upstreams = self.upstreams.clone();
        transmission::run(self, session, share.clone()).await;
        upstreams.detach(peer, share);
        tracing::debug!("disconnected");
    }
}
