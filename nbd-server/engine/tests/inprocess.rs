//! The engine in-process: an engine serving memory devices (plain and
//! fault-wrapped) on 127.0.0.1:0, driven by the real client library.
//! Every wait is a hang detector, never a performance assertion.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdraid_client::{Client, ClientConfig, ClientError};
use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::{CostModel, OpCost, SharedCostModel};
use nbdraid_engine::device::{BlockDevice, OpKind};
use nbdraid_engine::fault::{Faults, FaultyDevice, OpSet};
use nbdraid_engine::grpc::ThrottleService;
use nbdraid_engine::mem::MemDevice;
use nbdraid_engine::server::{Engine, EngineConfig, Exports};
use nbdraid_engine::throttle::{Throttle, ThrottleSettings};
use nbdraid_engine::upstream::Upstreams;
use nbdraid_proto::consts::{allocation, errno};
use nbdraid_proto::grpc::throttle_server::Throttle as _;
use tokio_util::sync::CancellationToken;

const HANG: Duration = Duration::from_secs(30);
const SIZE: u64 = 64 << 20;

fn throttle() -> Arc<Throttle> {
    Throttle::new(
        "test",
        ThrottleSettings {
            capacity: 256 << 20,
            background_reserve: 64 << 20,
            largest_request: (32 << 20) + 512,
            enabled: true,
        },
    )
    .expect("valid throttle settings")
}

/// An engine serving `exports` on 127.0.0.1:0; stops when dropped.
struct Served {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve<D: BlockDevice>(exports: Arc<Exports<D>>) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let throttle = throttle();
    let engine = Engine::new(
        exports,
        throttle.clone(),
        Upstreams::new(),
        BufferPool::new(throttle.capacity()),
        EngineConfig::default(),
        shutdown.clone(),
    );
    tokio::spawn(engine.serve(listener));
    Served { addr, shutdown }
}

async fn connect(s: &Served, export: &str) -> Client {
    let config = ClientConfig {
        connections: 2,
        ..ClientConfig::default()
    };
    tokio::time::timeout(HANG, Client::connect(&s.addr.to_string(), export, config))
        .await
        .expect("connect hung")
        .expect("connect")
}

fn model() -> SharedCostModel {
    SharedCostModel::new(CostModel::buffers("test"))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn memory_device_serves_every_command() {
    let exports = Exports::new();
    exports.insert("m", Arc::new(MemDevice::new(SIZE, model())));
    let s = serve(exports).await;
    let c = connect(&s, "m").await;
    assert_eq!(c.info().size, SIZE);
    assert!(
        c.connections() == 2,
        "the memory device advertises multi-conn"
    );

    let data = pattern(1, 3 << 20);
    c.write(4095, data.clone(), false).await.expect("write");
    c.flush().await.expect("flush");
    assert_eq!(c.read_at(4095, data.len()).await.expect("read"), data);

    c.write_zeroes(4096, 8192, false).await.expect("zeroes");
    let back = c.read_at(4095, 8194).await.expect("read");
    assert_eq!(back[0], data[0]);
    assert!(back[1..8193].iter().all(|&b| b == 0));
    assert_eq!(back[8193], data[8193]);

    c.trim(32 << 20, 1 << 20).await.expect("trim");
    let ext = c.block_status(32 << 20, 1 << 20).await.expect("status");
    assert_eq!(ext[0].flags, allocation::HOLE | allocation::ZERO);
    let ext = c.block_status(0, 1 << 20).await.expect("status");
    assert_eq!(ext[0].flags, 0, "written data is reported allocated");

    let e = c.read_at(SIZE - 1, 2).await.expect_err("read past the end");
    assert!(matches!(e, ClientError::Invalid(_)), "{e:?}");
}

#[tokio::test]
async fn fault_wrapper_fails_hangs_and_paces() {
    let dev = Arc::new(FaultyDevice::new(
        Arc::new(MemDevice::new(SIZE, model())),
        "f",
    ));
    let control = dev.control().clone();
    let exports = Exports::new();
    exports.insert("f", dev);
    let s = serve(exports).await;
    let c = Arc::new(connect(&s, "f").await);
    c.write(0, vec![7u8; 4096], false).await.expect("write");

    // EIO per operation kind: reads fail, writes still work.
    control.set(Faults {
        fail: OpSet::reads(),
        ..Faults::default()
    });
    match c.read_at(0, 4096).await {
        Err(ClientError::Server { errno: e, .. }) => assert_eq!(e, errno::EIO),
        other => panic!("expected EIO, got {other:?}"),
    }
    c.write(4096, vec![8u8; 4096], false)
        .await
        .expect("writes are not failed");
    control.set(Faults::default());
    assert_eq!(c.read_at(4096, 4096).await.expect("read"), vec![8u8; 4096]);

    // Hang until released: the read stays pending, then completes.
    control.set(Faults {
        hang: true,
        ..Faults::default()
    });
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.read_at(0, 4096).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a hung device answered");
    control.set(Faults::default());
    let got = tokio::time::timeout(HANG, pending)
        .await
        .expect("released read hung")
        .expect("task")
        .expect("read after release");
    assert_eq!(got, vec![7u8; 4096]);

    // Bandwidth: 2 MiB at 8 MiB/s cannot finish in less than ~250 ms.
    control.set(Faults {
        bandwidth: 8 << 20,
        ..Faults::default()
    });
    let start = Instant::now();
    c.write(0, vec![1u8; 1 << 20], false).await.expect("write");
    c.write(1 << 20, vec![2u8; 1 << 20], false)
        .await
        .expect("write");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(240),
        "the bandwidth limit was not applied ({took:?})"
    );
    control.set(Faults::default());
}

/// The published model and `cost()` read one value: changing it changes both.
#[tokio::test]
async fn published_model_and_device_cost_are_one_value() {
    let model = model();
    let dev = MemDevice::new(SIZE, model.clone());
    let throttle = throttle();
    let service = ThrottleService::new(
        throttle,
        Upstreams::new(),
        model.clone(),
        32 << 20,
        Duration::from_secs(10),
    );
    let published = |m: nbdraid_proto::grpc::MetricModel| {
        let write = m.costs.iter().find(|c| c.op == "write").cloned();
        (m.layer, write.map(|c| (c.base, c.per_byte_fp)))
    };
    let before = service
        .get_metric(tonic::Request::new(Default::default()))
        .await
        .expect("get_metric")
        .into_inner();
    assert_eq!(
        published(before),
        ("test".to_string(), Some((512, 1 << 16)))
    );
    assert_eq!(dev.cost(OpKind::Write, 4096), 512 + 4096);

    model.set(CostModel::buffers("raid5").with_op(
        OpKind::Write,
        OpCost {
            base: 1000,
            per_byte: 3 << 16,
        },
    ));
    let after = service
        .get_metric(tonic::Request::new(Default::default()))
        .await
        .expect("get_metric")
        .into_inner();
    assert_eq!(
        published(after),
        ("raid5".to_string(), Some((1000, 3 << 16)))
    );
    assert_eq!(dev.cost(OpKind::Write, 4096), 1000 + 3 * 4096);
}
