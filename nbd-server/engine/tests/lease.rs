//! The lease client and the model watch against a real `Throttle` gRPC
//! service on 127.0.0.1:0: a grant opened, connections registered, the
//! share released when the lease is dropped, the lease reopened (and the
//! connections registered again) after the lower layer comes back, and a
//! published model followed, with an absurd one refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nbdraid_engine::cost::{CostModel, OpCost, SharedCostModel};
use nbdraid_engine::device::OpKind;
use nbdraid_engine::grpc::ThrottleService;
use nbdraid_engine::lease::{Lease, LeaseConfig, ModelWatch};
use nbdraid_engine::throttle::{Throttle, ThrottleSettings};
use nbdraid_engine::upstream::Upstreams;
use nbdraid_proto::grpc::throttle_server::ThrottleServer;

const HANG: Duration = Duration::from_secs(30);

/// A lower layer's Throttle service on its own runtime and thread, so
/// dropping it ends every connection at once, as the death of the lower
/// layer's process would.
struct Lower {
    throttle: Arc<Throttle>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Lower {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_lower(bind: &str, model: SharedCostModel) -> Lower {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let throttle = Throttle::new(
        "lower",
        ThrottleSettings {
            capacity: 64 << 20,
            background_reserve: 16 << 20,
            largest_request: 4 << 20,
            enabled: true,
        },
    )
    .expect("throttle");
    let service = ThrottleService::new(
        throttle.clone(),
        Upstreams::new(),
        model.clone(),
        4 << 20,
        Duration::from_secs(2),
    );
    let listener = std::net::TcpListener::bind(bind).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let _ = tonic::transport::Server::builder()
            .add_service(ThrottleServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Lower {
        throttle,
        addr,
        runtime: Some(runtime),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang detector: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn share_reserved(t: &Throttle, name: &str) -> Option<u64> {
    t.shares()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.reserved)
}

#[tokio::test]
async fn a_lease_is_held_registered_released_and_reopened() {
    let model = SharedCostModel::new(CostModel::buffers("lower"));
    let lower = serve_lower("127.0.0.1:0", model.clone()).await;
    let config = LeaseConfig {
        upstream: "array-a".into(),
        units: 8 << 20,
        renew: Duration::from_millis(200),
        retry: Duration::from_millis(100),
        ..LeaseConfig::default()
    };
    let lease = Lease::start(&lower.addr.to_string(), config);
    eventually("lease held", || lease.granted() == 8 << 20).await;
    assert!(lease.held());
    eventually("share carved", || {
        share_reserved(&lower.throttle, "array-a") == Some(8 << 20)
    })
    .await;
    let conns: Vec<SocketAddr> = vec![
        "127.0.0.1:40001".parse().unwrap(),
        "127.0.0.1:40002".parse().unwrap(),
    ];
    lease.set_connections(conns.clone());
    let mut registered = lease.registered();
    eventually("connections registered", || {
        let mut r = registered.borrow_and_update().clone();
        r.sort();
        r == conns
    })
    .await;
    // Renewals keep it alive well past the TTL (2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(share_reserved(&lower.throttle, "array-a"), Some(8 << 20));

    // The lower layer goes away: the grant is lost, then taken again on
    // the new instance, with the connections registered again.
    let addr = lower.addr;
    drop(lower);
    eventually("lease lost", || !lease.held()).await;
    assert_eq!(lease.granted(), 0);
    let lower = serve_lower(&addr.to_string(), model).await;
    eventually("lease reopened", || lease.held()).await;
    eventually("share carved again", || {
        share_reserved(&lower.throttle, "array-a") == Some(8 << 20)
    })
    .await;
    let mut registered = lease.registered();
    eventually("connections registered again", || {
        registered.borrow_and_update().len() == 2
    })
    .await;

    // Dropping the lease ends the stream: the share goes back.
    drop(lease);
    eventually("share released", || {
        share_reserved(&lower.throttle, "array-a").is_none()
    })
    .await;
}

#[tokio::test]
async fn a_model_is_followed_and_an_absurd_one_refused() {
    let model = SharedCostModel::new(CostModel::buffers("lower"));
    let lower = serve_lower("127.0.0.1:0", model.clone()).await;
    let fallback = CostModel::buffers("fallback").with_op(
        OpKind::Write,
        OpCost {
            base: 99,
            per_byte: 5 << 16,
        },
    );
    let watch = ModelWatch::start(&lower.addr.to_string(), fallback.clone());
    eventually("model followed", || watch.is_live()).await;
    assert_eq!(watch.model().layer(), "lower");
    assert_eq!(watch.model().cost(OpKind::Write, 4096), 512 + 4096);

    model.set(CostModel::buffers("lower").with_op(
        OpKind::Write,
        OpCost {
            base: 1000,
            per_byte: 2 << 16,
        },
    ));
    eventually("new model seen", || {
        watch.model().cost(OpKind::Write, 4096) == 1000 + 2 * 4096
    })
    .await;

    // A peer publishing absurd costs is not believed: the fallback holds.
    model.set(CostModel::buffers("lower").with_op(
        OpKind::Write,
        OpCost {
            base: u64::MAX,
            per_byte: 0,
        },
    ));
    eventually("absurd model refused", || {
        !watch.is_live() && watch.model() == fallback
    })
    .await;
    drop(lower);
}
