//! The node's gRPC control plane: the `Throttle` service (cost model,
//! capacity, grants as leases), the `Node` admin service (volumes, node
//! info, stats) and, in testing builds, the `Fault` service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use nbdraid_proto::grpc::{
    self, LeaseReply, LeaseRequest, MetricModel, OpCost, ShareStatus, TrafficClass, lease_request,
    node_server, throttle_server,
};

use crate::catalog::{NodeIdentity, VolumeRecord};
use crate::device::default_cost_model;
use crate::error::Error;
use crate::throttle::{BACKGROUND, FOREGROUND, Throttle};
use crate::upstream::Upstreams;
use crate::volumes::Volumes;

type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Returns the layer's current metric model.
pub fn metric_model(throttle: &Throttle, max_payload: u64) -> MetricModel {
    MetricModel {
        layer: "node".into(),
        capacity: throttle.capacity(),
        available: throttle.available(),
        in_flight: throttle.in_flight(),
        costs: default_cost_model()
            .into_iter()
            .map(|m| OpCost {
                op: m.op.name().into(),
                base: m.base,
                per_byte_fp: m.per_byte,
            })
            .collect(),
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
    }
}

/// The `Throttle` service.
pub struct ThrottleService {
    throttle: Arc<Throttle>,
    upstreams: Arc<Upstreams>,
    max_payload: u64,
    lease_ttl: Duration,
}

impl ThrottleService {
    /// Returns the service over the node's throttle and connection table.
    pub fn new(
        throttle: Arc<Throttle>,
        upstreams: Arc<Upstreams>,
        max_payload: u64,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            throttle,
            upstreams,
            max_payload,
            lease_ttl,
        }
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
        Ok(Response::new(metric_model(
            &self.throttle,
            self.max_payload,
        )))
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
        let max_payload = self.max_payload;
        tokio::spawn(async move {
            let mut last: Option<MetricModel> = None;
            loop {
                let now = metric_model(&throttle, max_payload);
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
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
        let share = if open.units > 0 {
            self.throttle
                .add_share(&open.upstream, open.units, parent)?
        } else {
            parent
        };
        let share_name = self
            .throttle
            .shares()
            .into_iter()
            .find(|s| s.id == share)
            .map(|s| s.name)
            .unwrap_or_default();
        tracing::info!(upstream = %open.upstream, units = open.units, share = %share_name, "lease opened");
        let (tx, rx) = mpsc::channel(16);
        let ttl = self.lease_ttl;
        let units = open.units;
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

/// The `Node` admin service.
pub struct NodeService {
    volumes: Arc<Volumes>,
    throttle: Arc<Throttle>,
    identity: NodeIdentity,
    nbd_addr: SocketAddr,
    started: Instant,
}

impl NodeService {
    /// Returns the service over the node's volumes.
    pub fn new(
        volumes: Arc<Volumes>,
        throttle: Arc<Throttle>,
        identity: NodeIdentity,
        nbd_addr: SocketAddr,
    ) -> Self {
        Self {
            volumes,
            throttle,
            identity,
            nbd_addr,
            started: Instant::now(),
        }
    }
}

fn volume_msg(r: VolumeRecord) -> grpc::Volume {
    grpc::Volume {
        name: r.name,
        size: r.size,
        uuid: r.uuid,
        read_only: r.read_only,
        created_unix: r.created,
    }
}

/// Runs blocking catalog/file work off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn create_volume(
        &self,
        req: Request<grpc::CreateVolumeRequest>,
    ) -> Result<Response<grpc::Volume>, Status> {
        let r = req.into_inner();
        let v = self.volumes.clone();
        let rec = blocking(move || v.create(&r.name, r.size, r.read_only)).await?;
        Ok(Response::new(volume_msg(rec)))
    }

    async fn list_volumes(
        &self,
        _: Request<grpc::ListVolumesRequest>,
    ) -> Result<Response<grpc::ListVolumesReply>, Status> {
        let volumes = self.volumes.list()?.into_iter().map(volume_msg).collect();
        Ok(Response::new(grpc::ListVolumesReply { volumes }))
    }

    async fn resize_volume(
        &self,
        req: Request<grpc::ResizeVolumeRequest>,
    ) -> Result<Response<grpc::Volume>, Status> {
        let r = req.into_inner();
        let v = self.volumes.clone();
        let rec = blocking(move || v.resize(&r.name, r.new_size)).await?;
        Ok(Response::new(volume_msg(rec)))
    }

    async fn delete_volume(
        &self,
        req: Request<grpc::DeleteVolumeRequest>,
    ) -> Result<Response<grpc::DeleteVolumeReply>, Status> {
        let r = req.into_inner();
        let v = self.volumes.clone();
        blocking(move || v.delete(&r.name)).await?;
        Ok(Response::new(grpc::DeleteVolumeReply {}))
    }

    async fn node_info(
        &self,
        _: Request<grpc::NodeInfoRequest>,
    ) -> Result<Response<grpc::NodeInfoReply>, Status> {
        Ok(Response::new(grpc::NodeInfoReply {
            uuid: self.identity.uuid.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: self.throttle.capacity(),
            available: self.throttle.available(),
            uptime_secs: self.started.elapsed().as_secs(),
            nbd_addr: self.nbd_addr.to_string(),
            volumes: self.volumes.list()?.len() as u32,
            created_unix: self.identity.created,
            fault_injection: cfg!(feature = "fault-injection"),
        }))
    }

    async fn volume_stats(
        &self,
        req: Request<grpc::VolumeStatsRequest>,
    ) -> Result<Response<grpc::VolumeStatsReply>, Status> {
        let name = req.into_inner().name;
        let export = self
            .volumes
            .export(&name)
            .ok_or(Error::UnknownVolume(name.clone()))?;
        let s = &export.metrics.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(grpc::VolumeStatsReply {
            name,
            connections: get(&s.connections) as u32,
            reads: get(&s.reads),
            writes: get(&s.writes),
            read_bytes: get(&s.read_bytes),
            written_bytes: get(&s.written_bytes),
            errors: get(&s.errors),
            other_ops: get(&s.other_ops),
            throttle_waits: get(&s.throttle_waits),
        }))
    }
}

/// The `Fault` service (testing builds only).
#[cfg(feature = "fault-injection")]
pub struct FaultService {
    volumes: Arc<Volumes>,
}

#[cfg(feature = "fault-injection")]
impl FaultService {
    /// Returns the service over the node's volumes.
    pub fn new(volumes: Arc<Volumes>) -> Self {
        Self { volumes }
    }
}

#[cfg(feature = "fault-injection")]
#[tonic::async_trait]
impl grpc::fault_server::Fault for FaultService {
    async fn set_fault(
        &self,
        req: Request<grpc::SetFaultRequest>,
    ) -> Result<Response<grpc::SetFaultReply>, Status> {
        let r = req.into_inner();
        let dev = self
            .volumes
            .device(&r.volume)
            .ok_or(Error::UnknownVolume(r.volume.clone()))?;
        let spec = crate::fault::FaultSpec {
            volume: r.volume,
            delay_us: r.delay_us,
            bandwidth: nbdraid_proto::ByteSize(r.bandwidth),
            fail_reads: r.fail_reads,
            fail_writes: r.fail_writes,
            fail_flush: r.fail_flush,
        };
        tracing::warn!(?spec, "fault injection changed");
        dev.faults().set(&spec);
        Ok(Response::new(grpc::SetFaultReply {}))
    }
}

/// Serves the control plane on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    throttle: ThrottleService,
    node: NodeService,
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] volumes: Arc<Volumes>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let builder = tonic::transport::Server::builder()
        .add_service(throttle_server::ThrottleServer::new(throttle))
        .add_service(node_server::NodeServer::new(node));
    #[cfg(feature = "fault-injection")]
    let builder = builder.add_service(grpc::fault_server::FaultServer::new(FaultService::new(
        volumes,
    )));
    if let Err(e) = builder
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
