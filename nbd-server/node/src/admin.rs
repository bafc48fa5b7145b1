//! The node's admin gRPC services: `Node` (volumes, node info, stats)
//! and, in testing builds, `Fault` (injected storage faults). They are
//! served beside the serving stack's `Throttle` service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tonic::{Request, Response, Status};

use nbdraid_engine::throttle::Throttle;
use nbdraid_proto::grpc::{self, node_server};

use crate::catalog::{NodeIdentity, VolumeRecord};
use crate::error::Error;
use crate::volumes::Volumes;

/// Returns the node's admin services as routes for the daemon's gRPC server.
pub fn routes(
    volumes: Arc<Volumes>,
    throttle: Arc<Throttle>,
    identity: NodeIdentity,
    nbd_addr: SocketAddr,
) -> tonic::service::Routes {
    let node = NodeService::new(volumes.clone(), throttle, identity, nbd_addr);
    let routes = tonic::service::Routes::new(node_server::NodeServer::new(node));
    #[cfg(feature = "fault-injection")]
    let routes = routes.add_service(grpc::fault_server::FaultServer::new(FaultService::new(
        volumes,
    )));
    #[cfg(not(feature = "fault-injection"))]
    drop(volumes);
    routes
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
        let control = self
            .volumes
            .faults(&r.volume)
            .ok_or(Error::UnknownVolume(r.volume.clone()))?;
        let spec = crate::config::FaultSpec {
            volume: r.volume,
            delay_us: r.delay_us,
            bandwidth: nbdraid_proto::ByteSize(r.bandwidth),
            fail_reads: r.fail_reads,
            fail_writes: r.fail_writes,
            fail_flush: r.fail_flush,
            hang: r.hang,
        };
        tracing::warn!(?spec, "fault injection changed");
        control.set(spec.faults());
        Ok(Response::new(grpc::SetFaultReply {}))
    }
}
