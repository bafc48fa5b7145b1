//! Metrics: names, per-export handles and the Prometheus endpoint.
//!
//! Handles are resolved once per export (label lookups are not free), so
//! recording a request costs a few atomic operations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::device::OpKind;

/// Per-export counters readable in-process (for the admin API).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Completed READs.
    pub reads: AtomicU64,
    /// Completed WRITEs.
    pub writes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub written_bytes: AtomicU64,
    /// Failed requests.
    pub errors: AtomicU64,
    /// Other completed requests (flush, trim, zero, cache, block status).
    pub other_ops: AtomicU64,
    /// Requests that waited for throttle units.
    pub throttle_waits: AtomicU64,
    /// Open transmission-phase connections.
    pub connections: AtomicU64,
}

/// Per-export request metrics.
#[derive(Debug)]
pub struct OpMetrics {
    ops: Vec<Counter>,
    errors: Vec<Counter>,
    latency: Vec<Histogram>,
    bytes_read: Counter,
    bytes_written: Counter,
    connections: Gauge,
    waits: Counter,
    wait_seconds: Histogram,
    /// Counters for the admin API.
    pub stats: ExportStats,
}

impl OpMetrics {
    /// Returns handles labelled with `export`.
    pub fn new(export: &str) -> Arc<Self> {
        let e = export.to_string();
        let per_op = |name: &'static str| -> Vec<_> {
            OpKind::ALL
                .iter()
                .map(|op| metrics::counter!(name, "export" => e.clone(), "op" => op.name()))
                .collect()
        };
        Arc::new(Self {
            ops: per_op("nbdraid_requests_total"),
            errors: per_op("nbdraid_request_errors_total"),
            latency: OpKind::ALL
                .iter()
                .map(|op| {
                    metrics::histogram!("nbdraid_request_latency_seconds", "export" => e.clone(), "op" => op.name())
                })
                .collect(),
            bytes_read: metrics::counter!("nbdraid_read_bytes_total", "export" => e.clone()),
            bytes_written: metrics::counter!("nbdraid_written_bytes_total", "export" => e.clone()),
            connections: metrics::gauge!("nbdraid_connections", "export" => e.clone()),
            waits: metrics::counter!("nbdraid_export_throttle_waits_total", "export" => e.clone()),
            wait_seconds: metrics::histogram!("nbdraid_export_throttle_wait_seconds", "export" => e),
            stats: ExportStats::default(),
        })
    }

    /// Records one completed request.
    pub fn record(&self, op: OpKind, len: u64, ok: bool, latency: Duration) {
        let i = op.index();
        let st = &self.stats;
        self.ops[i].increment(1);
        self.latency[i].record(latency.as_secs_f64());
        if !ok {
            self.errors[i].increment(1);
            st.errors.fetch_add(1, Ordering::Relaxed);
        } else if op == OpKind::Read {
            self.bytes_read.increment(len);
            st.reads.fetch_add(1, Ordering::Relaxed);
            st.read_bytes.fetch_add(len, Ordering::Relaxed);
        } else if op == OpKind::Write {
            self.bytes_written.increment(len);
            st.writes.fetch_add(1, Ordering::Relaxed);
            st.written_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            st.other_ops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that a request of this export waited `waited` for throttle units.
    pub fn record_wait(&self, waited: Duration) {
        self.waits.increment(1);
        self.wait_seconds.record(waited.as_secs_f64());
        self.stats.throttle_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection entering (+1) or leaving (-1) transmission.
    pub fn connection(&self, delta: i64) {
        self.connections.increment(delta as f64);
        if delta >= 0 {
            self.stats
                .connections
                .fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.stats
                .connections
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

type RenderHook = Box<dyn Fn() -> bool + Send + Sync>;

static RENDER_HOOKS: Mutex<Vec<RenderHook>> = Mutex::new(Vec::new());

/// Registers `hook` to run before every render of the metrics endpoint,
/// for gauges that are cheaper to set on demand than on every change
/// (the throttle's). The hook returns `false` once its owner is gone, and
/// is then dropped.
pub fn on_render(hook: impl Fn() -> bool + Send + Sync + 'static) {
    lock_hooks().push(Box::new(hook));
}

fn lock_hooks() -> std::sync::MutexGuard<'static, Vec<RenderHook>> {
    // The hooks only set gauges; a panic in one leaves the list intact.
    RENDER_HOOKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the render hooks, dropping those whose owner is gone.
fn run_render_hooks() {
    lock_hooks().retain(|hook| hook());
}

/// Runs the render hooks, then renders the Prometheus text.
pub fn render(handle: &PrometheusHandle) -> String {
    run_render_hooks();
    handle.render()
}

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install_recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                _ = stop.cancelled() => return,
            }
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move { render(&h) }
        }),
    );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// Binds the metrics listener (port 0 allowed) and returns it with its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn render_hooks_run_until_their_owner_is_gone() {
        let owner = Arc::new(());
        let weak = Arc::downgrade(&owner);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        on_render(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            weak.upgrade().is_some()
        });
        run_render_hooks();
        run_render_hooks();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        drop(owner);
        run_render_hooks(); // finds the owner gone and is dropped
        run_render_hooks();
        assert_eq!(calls.load(Ordering::Relaxed), 3, "a dead hook was kept");
    }
}
