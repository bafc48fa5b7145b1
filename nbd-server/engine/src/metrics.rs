//! Metrics: names, per-export handles and the Prometheus endpoint.
//!
//! Handles are resolved once per export (label lookups are not free), so
//! recording a request costs a few atomic operations. Every metric the
//! serving stack records is described in [`describe`] (the `# HELP` line);
//! a daemon describes its own with [`describe_counter`] and friends after
//! [`install_recorder`].
//!
//! A deleted export's series are hidden from the endpoint
//! ([`retire_export`]): the recorder cannot forget a series, so rendering
//! filters out lines labelled with a retired export. Re-creating an export
//! of the same name shows its series again.

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

static RETIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Hides the series of export `name` from the endpoint (it was deleted).
pub fn retire_export(name: &str) {
    let label = format!("export=\"{name}\"");
    let mut r = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
    if !r.contains(&label) {
        r.push(label);
    }
}

/// Shows the series of export `name` again (it was created anew).
pub fn unretire_export(name: &str) {
    let label = format!("export=\"{name}\"");
    RETIRED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|l| *l != label);
}

/// Drops the lines of retired exports from rendered text.
fn without_retired(text: String) -> String {
    let retired = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
    if retired.is_empty() {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if !retired.iter().any(|l| line.contains(l.as_str())) {
            out.push_str(line);
        }
    }
    out
}

pub use metrics::{describe_counter, describe_gauge, describe_histogram};

/// Describes every metric the serving stack records (the `# HELP` lines).
pub fn describe() {
    describe_counter!(
        "nbdraid_requests_total",
        "Requests completed, per export and operation."
    );
    describe_counter!(
        "nbdraid_request_errors_total",
        "Requests answered with an error, per export and operation."
    );
    describe_histogram!(
        "nbdraid_request_latency_seconds",
        metrics::Unit::Seconds,
        "Time from a request's admission to its reply, per export and operation."
    );
    describe_counter!(
        "nbdraid_read_bytes_total",
        metrics::Unit::Bytes,
        "Bytes read, per export."
    );
    describe_counter!(
        "nbdraid_written_bytes_total",
        metrics::Unit::Bytes,
        "Bytes written, per export."
    );
    describe_gauge!(
        "nbdraid_connections",
        "Connections in the transmission phase, per export."
    );
    describe_gauge!(
        "nbdraid_open_connections",
        "Open NBD connections (any phase)."
    );
    describe_counter!(
        "nbdraid_export_throttle_waits_total",
        "Requests of an export that waited for throttle units."
    );
    describe_histogram!(
        "nbdraid_export_throttle_wait_seconds",
        metrics::Unit::Seconds,
        "Time requests of an export waited for throttle units."
    );
    describe_gauge!(
        "nbdraid_throttle_model_base_units",
        "The layer's published cost model: units every request of the operation costs, per layer and op (a stacked layer's includes its members)."
    );
    describe_gauge!(
        "nbdraid_throttle_model_per_byte_units",
        "The layer's published cost model: units per byte of the request, per layer and op."
    );
    describe_gauge!(
        "nbdraid_throttle_available_units",
        "Throttle units (bytes of buffer memory) not in use, per layer."
    );
    describe_gauge!(
        "nbdraid_throttle_in_flight_units",
        "Throttle units held by admitted requests, per layer."
    );
    describe_gauge!(
        "nbdraid_throttle_peak_in_flight_units",
        "Highest number of throttle units ever held at once, per layer."
    );
    describe_gauge!(
        "nbdraid_throttle_share_in_flight_units",
        "Throttle units held per share (foreground, background, each grant)."
    );
    describe_counter!(
        "nbdraid_throttle_waits_total",
        "Requests that waited for throttle units, per share."
    );
    describe_histogram!(
        "nbdraid_throttle_wait_seconds",
        metrics::Unit::Seconds,
        "Time requests waited for throttle units, per share."
    );
}

type RenderHook = Box<dyn Fn() -> bool + Send + Sync>;

static RENDER_HOOKS: Mutex<Vec<RenderHook>> = Mutex::new(Vec::new());

/// Registers `hook` to run before every render of the metrics endpoint,
/// for gauges that are cheaper to set on demand than on every change
/// (the throttle's). The hook returns `false` once its owner is gone, and
/// is then dropped.
pub fn on_render(hook: impl Fn() -> bool + Send + Sync + 'static) {
    lock_hooks().push(Box::new(hook));
}

/// Publishes the cost model a layer serves as gauges, per operation
/// (`nbdraid_throttle_model_base_units`, `..._per_byte_units`), read at
/// every render, so a composed model's changes (a member failed) show.
pub fn publish_model(model: crate::cost::SharedCostModel) {
    let layer = model.load().layer().to_string();
    let gauges: Vec<_> = crate::device::OpKind::ALL
        .into_iter()
        .map(|op| {
            let g = |name: &'static str| {
                metrics::gauge!(name, "layer" => layer.clone(), "op" => op.name())
            };
            (
                op,
                g("nbdraid_throttle_model_base_units"),
                g("nbdraid_throttle_model_per_byte_units"),
            )
        })
        .collect();
    on_render(move || {
        let m = model.load();
        for (op, base, per_byte) in &gauges {
            let c = m.op(*op);
            base.set(c.base as f64);
            per_byte.set(c.per_byte as f64 / crate::cost::PER_BYTE_ONE as f64);
        }
        true
    });
}

fn lock_hooks() -> std::sync::MutexGuard<'static, Vec<RenderHook>> {
    // The hooks only set gauges; a panic in one leaves the list intact.
    RENDER_HOOKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the render hooks, dropping those whose owner is gone.
fn run_render_hooks() {
    lock_hooks().retain(|hook| hook());
}

/// Runs the render hooks, then renders the Prometheus text (without the
/// series of retired exports).
pub fn render(handle: &PrometheusHandle) -> String {
    run_render_hooks();
    without_retired(handle.render())
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
            describe();
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
    fn retired_exports_are_filtered_until_recreated() {
        let text = "a{export=\"v1\"} 1\na{export=\"v10\"} 2\nb 3\n".to_string();
        retire_export("v1");
        assert_eq!(without_retired(text.clone()), "a{export=\"v10\"} 2\nb 3\n");
        unretire_export("v1");
        assert_eq!(without_retired(text.clone()), text);
    }

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
