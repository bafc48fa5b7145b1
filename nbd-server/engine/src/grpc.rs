//! The `Throttle` gRPC service every layer serves: its published cost
//! model and capacity (`GetMetric`, `WatchMetric`) and grants as leases
//! (`Lease`). The daemon adds its own services beside it (see
//! [`crate::daemon`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use nbdraid_proto::grpc::{
    self, LeaseReply, LeaseRequest, MetricModel, ShareStatus, TrafficClass, lease_request,
    throttle_server,
};

use crate::cost::SharedCostModel;
use crate::throttle::{BACKGROUND, FOREGROUND, Throttle};
use crate::upstream::Upstreams;

type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Returns the layer's current metric model: its cost model (the same
/// value its devices charge) with the throttle's state.
pub fn metric_model(throttle: &Throttle, model: &SharedCostModel, max_payload: u64) -> MetricModel {
    let costs = model.load();
    MetricModel {
        layer: costs.layer().to_string(),
        capacity: throttle.capacity(),
        available: throttle.available(),
        in_flight: throttle.in_flight(),
        costs: costs.to_wire(),
        max_request_cost: throttle.min_share(),
        max_payload,
        shares: throttle
            .shares()
            .into_iter()
            .map(|s| ShareStatus {
                name: s.name,
                reserved: s.reserved,
                used: s.used,
                waiting: s.waiting as u32,
            })
            .collect(),
        enabled: throttle.enabled(),
        members: Vec::new(),
    }
}

/// Reports what a layer holds at its members (see [`ThrottleService::with_members`]).
pub type MembersFn = Arc<dyn Fn() -> Vec<grpc::MemberGrant> + Send + Sync>;

/// The `Throttle` service.
pub struct ThrottleService {
    throttle: Arc<Throttle>,
    upstreams: Arc<Upstreams>,
    model: SharedCostModel,
    max_payload: u64,
    lease_ttl: Duration,
    members: Option<MembersFn>,
}

impl ThrottleService {
    /// Returns the service over a layer's throttle, connection table and
    /// cost model.
    pub fn new(
        throttle: Arc<Throttle>,
        upstreams: Arc<Upstreams>,
        model: SharedCostModel,
        max_payload: u64,
        lease_ttl: Duration,
    ) -> Self {
        crate::metrics::publish_model(model.clone());
        Self {
            throttle,
            upstreams,
            model,
            max_payload,
            lease_ttl,
            members: None,
        }
    }

    /// Returns the service reporting, with every model, what the layer
    /// holds at its members (an array daemon's grants).
    pub fn with_members(mut self, members: MembersFn) -> Self {
        self.members = Some(members);
        self
    }

    fn model(&self) -> MetricModel {
        let mut m = metric_model(&self.throttle, &self.model, self.max_payload);
        if let Some(f) = &self.members {
            m.members = f();
        }
        m
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("{s:?} is not an ip:port address")))
}

#[tonic::async_trait]
impl throttle_server::Throttle for ThrottleService {
    async fn get_metric(
        &self,
        _: Request<grpc::GetMetricRequest>,
    ) -> Result<Response<MetricModel>, Status> {
        Ok(Response::new(self.model()))
    }

    type WatchMetricStream = ReplyStream<MetricModel>;

    async fn watch_metric(
        &self,
        req: Request<grpc::WatchMetricRequest>,
    ) -> Result<Response<Self::WatchMetricStream>, Status> {
        let ms = req.into_inner().interval_ms;
        let interval = Duration::from_millis(if ms == 0 { 200 } else { ms.max(10) as u64 });
        let (tx, rx) = mpsc::channel(4);
        let throttle = self.throttle.clone();
        let model = self.model.clone();
        let mut changed = model.subscribe();
        let max_payload = self.max_payload;
        let members = self.members.clone();
        tokio::spawn(async move {
            let mut last: Option<MetricModel> = None;
            loop {
                let mut now = metric_model(&throttle, &model, max_payload);
                if let Some(f) = &members {
                    now.members = f();
                }
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    // A new cost model goes out at once, not at the next tick.
                    _ = changed.changed() => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LeaseStream = ReplyStream<LeaseReply>;

    async fn lease(
        &self,
        req: Request<Streaming<LeaseRequest>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(self.lease_ttl, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no lease request"))??;
        let Some(LeaseRequest {
            kind: Some(lease_request::Kind::Open(open)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first lease message must be `open`",
            ));
        };
        if open.upstream.is_empty() || open.upstream.len() > 128 {
            return Err(Status::invalid_argument(
                "upstream name must be 1-128 bytes",
            ));
        }
        let parent = if open.class == TrafficClass::Background as i32 {
            BACKGROUND
        } else {
            FOREGROUND
        };
        // A lease of 0 units runs in the class's pool; otherwise the lower
        // layer grants what it can spare (see `Throttle::add_share`).
        let (share, units) = if open.units > 0 {
            self.throttle
                .add_share(&open.upstream, open.units, parent)?
        } else {
            (parent, 0)
        };
        let share_name = self
            .throttle
            .shares()
            .into_iter()
            .find(|s| s.id == share)
            .map(|s| s.name)
            .unwrap_or_default();
        tracing::info!(upstream = %open.upstream, asked = open.units, granted = units, share = %share_name, "lease opened");
        let (tx, rx) = mpsc::channel(16);
        let ttl = self.lease_ttl;
        let upstream = open.upstream.clone();
        let reply = move |registered: &[SocketAddr]| LeaseReply {
            granted: units,
            lease_ttl_ms: ttl.as_millis() as u64,
            share: share_name.clone(),
            registered: registered.iter().map(|a| a.to_string()).collect(),
        };
        let _ = tx.send(Ok(reply(&[]))).await;
        let throttle = self.throttle.clone();
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let mut registered: Vec<SocketAddr> = Vec::new();
            let mut deadline = tokio::time::Instant::now() + ttl;
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(%upstream, "lease expired without renewal");
                        break;
                    }
                };
                let kind = match msg {
                    Ok(Some(LeaseRequest { kind: Some(k) })) => k,
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                };
                deadline = tokio::time::Instant::now() + ttl;
                let result = match kind {
                    lease_request::Kind::Register(a) => parse_addr(&a.addr).map(|addr| {
                        upstreams.assign(addr, share);
                        if !registered.contains(&addr) {
                            registered.push(addr);
                        }
                    }),
                    lease_request::Kind::Unregister(a) => parse_addr(&a.addr).map(|addr| {
                        upstreams.unassign(addr);
                        registered.retain(|r| *r != addr);
                    }),
                    lease_request::Kind::Renew(_) => Ok(()),
                    lease_request::Kind::Open(_) => {
                        Err(Status::invalid_argument("lease already open"))
                    }
                };
                let out = result.map(|()| reply(&registered));
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    break;
                }
            }
            for addr in registered {
                upstreams.unassign(addr);
            }
            if share != FOREGROUND && share != BACKGROUND {
                throttle.remove_share(share);
            }
            tracing::info!(%upstream, "lease released");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
