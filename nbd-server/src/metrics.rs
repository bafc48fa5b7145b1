//! Metrics: names, per-export handles and the Prometheus endpoint.
//!
//! Handles are resolved once per export (label lookups are not free), so
//! recording a request costs a few atomic operations.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::device::OpKind;

/// Per-export request metrics.
#[derive(Debug)]
pub struct OpMetrics {
    ops: Vec<Counter>,
    errors: Vec<Counter>,
    latency: Vec<Histogram>,
    bytes_read: Counter,
    bytes_written: Counter,
    /// Open transmission-phase connections to this export.
    pub connections: Gauge,
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
            connections: metrics::gauge!("nbdraid_connections", "export" => e),
        })
    }

    /// Records one completed request.
    pub fn record(&self, op: OpKind, len: u64, ok: bool, latency: Duration) {
        let i = op.index();
        self.ops[i].increment(1);
        self.latency[i].record(latency.as_secs_f64());
        if !ok {
            self.errors[i].increment(1);
        } else if op == OpKind::Read {
            self.bytes_read.increment(len);
        } else if op == OpKind::Write {
            self.bytes_written.increment(len);
        }
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

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
            async move { h.render() }
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
