//! The upstream side of the throttle: a grant held at a lower layer (a
//! member node, or an array used as a member) and that layer's cost model.
//!
//! [`Lease`] holds a grant over the lower layer's `Throttle.Lease` stream:
//! it opens it (units, class), registers the local addresses of the NBD
//! connections the upstream opened under it (and registers them again
//! after every reconnect of the stream), renews it well inside the TTL,
//! and when the lower layer goes away keeps trying to open it again; the
//! grant in force ([`Lease::granted`]) is 0 meanwhile, and [`Lease::held`]
//! says whether the lower layer has granted it.
//!
//! [`ModelWatch`] follows the lower layer's published cost model over
//! `Throttle.WatchMetric`, parsed once into [`CostModel`] (absurd values
//! refused, never wrapped); when the lower layer cannot be asked it falls
//! back to a conservative default and says so in the log.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nbdraid_proto::grpc::throttle_client::ThrottleClient;
use nbdraid_proto::grpc::{
    self, ConnectionAddr, LeaseOpen, LeaseRequest, TrafficClass, lease_request,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cost::CostModel;

/// How to hold a grant.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Who holds it (the lower layer's metrics label and logs).
    pub upstream: String,
    /// Units asked for.
    pub units: u64,
    /// Foreground or background share of the lower layer.
    pub background: bool,
    /// Renewal period (a third of the lower layer's TTL is safe).
    pub renew: Duration,
    /// Wait between attempts to reopen a lost lease.
    pub retry: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            upstream: "upstream".into(),
            units: 0,
            background: false,
            renew: Duration::from_secs(2),
            retry: Duration::from_millis(500),
        }
    }
}

struct Shared {
    granted: AtomicU64,
    held: AtomicBool,
    addrs: std::sync::Mutex<BTreeSet<SocketAddr>>,
    changed: tokio::sync::Notify,
    /// What the lower layer says is registered, after its last reply.
    registered: watch::Sender<Vec<SocketAddr>>,
}

/// A grant held at a lower layer, kept alive in the background.
pub struct Lease {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Ending the stream releases the grant at the lower layer.
        self.stop.cancel();
    }
}

fn endpoint(grpc: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let uri = if grpc.starts_with("http") {
        grpc.to_string()
    } else {
        format!("http://{grpc}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

impl Lease {
    /// Starts holding a grant of `config.units` at the lower layer whose
    /// gRPC control plane is `grpc` (`host:port`). Returns at once; the
    /// lease is opened (and reopened after losses) in the background.
    pub fn start(grpc: &str, config: LeaseConfig) -> Lease {
        let shared = Arc::new(Shared {
            granted: AtomicU64::new(0),
            held: AtomicBool::new(false),
            addrs: Default::default(),
            changed: tokio::sync::Notify::new(),
            registered: watch::Sender::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run(grpc.to_string(), config, shared.clone(), stop.clone()));
        Lease { shared, stop }
    }

    /// Returns the units granted now (0 while the lease is not held).
    pub fn granted(&self) -> u64 {
        self.shared.granted.load(Ordering::Acquire)
    }

    /// Reports whether the lower layer holds the grant for us now.
    pub fn held(&self) -> bool {
        self.shared.held.load(Ordering::Acquire)
    }

    /// Replaces the set of connection addresses drawing from the grant
    /// (call it again after the connections are reopened).
    pub fn set_connections(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        *self.shared.addrs.lock().unwrap_or_else(|e| e.into_inner()) = addrs.into_iter().collect();
        self.shared.changed.notify_one();
    }

    /// Returns a watch of the addresses the lower layer has registered.
    pub fn registered(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.shared.registered.subscribe()
    }
}

fn request(kind: lease_request::Kind) -> LeaseRequest {
    LeaseRequest { kind: Some(kind) }
}

/// Holds the lease until `stop`: open, register, renew; reopen when lost.
async fn run(grpc: String, config: LeaseConfig, shared: Arc<Shared>, stop: CancellationToken) {
    let mut logged_loss = false;
    loop {
        let outcome = tokio::select! {
            o = hold_once(&grpc, &config, &shared) => o,
            _ = stop.cancelled() => return,
        };
        if shared.held.swap(false, Ordering::AcqRel) {
            // It was held this time: a new loss is worth a warning again.
            logged_loss = false;
        }
        shared.granted.store(0, Ordering::Release);
        if let Err(e) = outcome
            && !logged_loss
        {
            tracing::warn!(lower = %grpc, error = %e, "throttle lease lost; retrying");
            logged_loss = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One life of the lease stream; returns when the stream ends.
async fn hold_once(grpc: &str, config: &LeaseConfig, shared: &Shared) -> Result<(), String> {
    let channel = endpoint(grpc)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = ThrottleClient::new(channel);
    let (tx, rx) = mpsc::channel::<LeaseRequest>(16);
    let class = if config.background {
        TrafficClass::Background
    } else {
        TrafficClass::Foreground
    };
    tx.send(request(lease_request::Kind::Open(LeaseOpen {
        upstream: config.upstream.clone(),
        units: config.units,
        class: class as i32,
    })))
    .await
    .map_err(|_| "stream closed".to_string())?;
    let mut replies = client
        .lease(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("open: {}", e.message()))?
        .into_inner();
    let first = replies
        .message()
        .await
        .map_err(|e| format!("open: {}", e.message()))?
        .ok_or("the lower layer closed the lease stream")?;
    shared.granted.store(first.granted, Ordering::Release);
    shared.held.store(true, Ordering::Release);
    tracing::info!(lower = %grpc, granted = first.granted, share = %first.share, "throttle lease held");
    let mut sent: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut renew = tokio::time::interval(config.renew);
    renew.tick().await;
    loop {
        // Bring the lower layer's registrations up to date.
        let want = shared
            .addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for a in want.difference(&sent) {
            let msg = request(lease_request::Kind::Register(ConnectionAddr {
                addr: a.to_string(),
            }));
            tx.send(msg).await.map_err(|_| "stream closed")?;
        }
        for a in sent.difference(&want) {
            let msg = request(lease_request::Kind::Unregister(ConnectionAddr {
                addr: a.to_string(),
            }));
            tx.send(msg).await.map_err(|_| "stream closed")?;
        }
        sent = want;
        tokio::select! {
            _ = renew.tick() => {
                tx.send(request(lease_request::Kind::Renew(grpc::Renew {})))
                    .await
                    .map_err(|_| "stream closed")?;
            }
            _ = shared.changed.notified() => {}
            reply = replies.message() => {
                match reply {
                    Ok(Some(r)) => {
                        let regs = r.registered.iter().filter_map(|a| a.parse().ok()).collect();
                        shared.registered.send_replace(regs);
                    }
                    Ok(None) => return Err("the lower layer closed the lease stream".into()),
                    Err(e) => return Err(e.message().to_string()),
                }
            }
        }
    }
}

/// Follows a lower layer's published cost model.
pub struct ModelWatch {
    model: watch::Receiver<CostModel>,
    live: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Drop for ModelWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ModelWatch {
    /// Starts following the model of the layer at `grpc`; until it answers
    /// (and whenever it cannot be asked) the model is `fallback`.
    pub fn start(grpc: &str, fallback: CostModel) -> ModelWatch {
        let (tx, rx) = watch::channel(fallback.clone());
        let live = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        tokio::spawn(watch_model(
            grpc.to_string(),
            fallback,
            tx,
            live.clone(),
            stop.clone(),
        ));
        ModelWatch {
            model: rx,
            live,
            stop,
        }
    }

    /// Returns the model in force.
    pub fn model(&self) -> CostModel {
        self.model.borrow().clone()
    }

    /// Returns a receiver that sees every new model.
    pub fn subscribe(&self) -> watch::Receiver<CostModel> {
        self.model.clone()
    }

    /// Reports whether the model is the lower layer's (not the fallback).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

async fn watch_model(
    grpc: String,
    fallback: CostModel,
    tx: watch::Sender<CostModel>,
    live: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut warned = false;
    loop {
        let result = tokio::select! {
            r = follow(&grpc, &tx, &live) => r,
            _ = stop.cancelled() => return,
        };
        if live.swap(false, Ordering::AcqRel) {
            // It was followed this time: losing it again is worth a warning.
            warned = false;
        }
        tx.send_replace(fallback.clone());
        if let Err(e) = result
            && !warned
        {
            tracing::warn!(lower = %grpc, error = %e, "cannot follow the lower layer's cost model; charging the conservative default");
            warned = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn follow(
    grpc: &str,
    tx: &watch::Sender<CostModel>,
    live: &AtomicBool,
) -> Result<(), String> {
    let channel = endpoint(grpc)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = ThrottleClient::new(channel);
    let mut stream = client
        .watch_metric(grpc::WatchMetricRequest { interval_ms: 1000 })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(m)) => match CostModel::from_wire(&m.layer, &m.costs) {
                Ok(model) => {
                    if *tx.borrow() != model {
                        tracing::debug!(lower = %grpc, layer = %m.layer, "cost model updated");
                    }
                    tx.send_replace(model);
                    live.store(true, Ordering::Release);
                }
                Err(e) => return Err(format!("refusing its cost model: {e}")),
            },
            Ok(None) => return Err("the watch ended".into()),
            Err(e) => return Err(e.message().to_string()),
        }
    }
}
