//! The writeout throttle end to end: the memory bound under a write flood
//! against slow storage, no deadlock or starvation with a tiny capacity and
//! mixed foreground/background/granted traffic, and the gRPC throttle
//! service (cost model, leases, watch).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use nbdraid_client::{Client, ClientConfig};
use nbdraid_proto::grpc::{self, fault_client::FaultClient, throttle_client::ThrottleClient};
use nbdraid_tests::{Node, hang};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SECTOR: usize = 4096;

fn kib_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing"))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("gRPC connect")
}

async fn set_fault(addr: SocketAddr, volume: &str, delay_us: u64, bandwidth: u64) {
    FaultClient::new(channel(addr).await)
        .set_fault(grpc::SetFaultRequest {
            volume: volume.into(),
            delay_us,
            bandwidth,
            ..Default::default()
        })
        .await
        .expect("set fault");
}

/// The contents written to `block` in generation `gen`: every 4 KiB sector
/// starts with (block, gen, sector) and is filled with a byte of `gen`.
fn block_data(block: u64, generation: u64, len: usize) -> Bytes {
    let mut v = vec![(generation % 251) as u8 + 1; len];
    for (i, sector) in v.chunks_mut(SECTOR).enumerate() {
        sector[..8].copy_from_slice(&block.to_le_bytes());
        sector[8..16].copy_from_slice(&generation.to_le_bytes());
        sector[16..24].copy_from_slice(&(i as u64).to_le_bytes());
    }
    Bytes::from(v)
}

fn check_block(data: &[u8], block: u64, generation: u64) -> Result<(), String> {
    let want = block_data(block, generation, data.len());
    if data == &want[..] {
        return Ok(());
    }
    let at = data
        .iter()
        .zip(want.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let got_gen = u64::from_le_bytes(data[at / SECTOR * SECTOR + 8..][..8].try_into().unwrap());
    Err(format!(
        "block {block}: expected generation {generation}, byte {at} differs (sector says generation {got_gen})"
    ))
}

struct FloodResult {
    acked: HashMap<u64, u64>,
    writes: u64,
}

/// Keeps `depth` writes of `bs` bytes in flight on each of `conns`
/// connections for `dur`; connection `c` owns blocks
/// `[c*blocks, (c+1)*blocks)` and never has two writes to one block in
/// flight, so the last acknowledged generation of a block is its content.
async fn flood(
    addr: SocketAddr,
    export: &str,
    conns: usize,
    bs: usize,
    depth: usize,
    blocks: u64,
    dur: Duration,
) -> FloodResult {
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for c in 0..conns as u64 {
        let client = Client::connect(&addr.to_string(), export, ClientConfig::default())
            .await
            .expect("connect");
        tasks.push(tokio::spawn(async move {
            let client = Arc::new(client);
            let first = c * blocks;
            let mut next = 0u64;
            let mut generation = 0u64;
            let mut in_flight = std::collections::HashSet::new();
            let mut acked = HashMap::new();
            let mut pending = FuturesUnordered::new();
            let mut writes = 0u64;
            loop {
                while Instant::now() < deadline && pending.len() < depth {
                    let mut tries = 0;
                    while in_flight.contains(&(first + next % blocks)) && tries < blocks {
                        next += 1;
                        tries += 1;
                    }
                    let block = first + next % blocks;
                    next += 1;
                    generation += 1;
                    in_flight.insert(block);
                    let data = block_data(block, generation, bs);
                    let cl = client.clone();
                    let g = generation;
                    pending.push(async move {
                        let r = cl.write(block * bs as u64, data, false).await;
                        (block, g, r)
                    });
                }
                let Some((block, g, r)) = pending.next().await else {
                    break;
                };
                r.unwrap_or_else(|e| panic!("write to block {block} failed: {e}"));
                in_flight.remove(&block);
                acked.insert(block, g);
                writes += 1;
            }
            client.flush().await.expect("flush");
            (acked, writes)
        }));
    }
    let mut out = FloodResult {
        acked: HashMap::new(),
        writes: 0,
    };
    for t in tasks {
        let (acked, writes) = t.await.expect("flood task");
        out.acked.extend(acked);
        out.writes += writes;
    }
    out
}

async fn verify(addr: SocketAddr, export: &str, bs: usize, acked: &HashMap<u64, u64>) {
    let client = Client::connect(&addr.to_string(), export, ClientConfig::default())
        .await
        .expect("connect");
    for (&block, &generation) in acked {
        let data = client
            .read_at(block * bs as u64, bs)
            .await
            .expect("read back");
        check_block(&data, block, generation).unwrap();
    }
}

/// Budget used by the flood tests. With 32 MiB requests each pool (foreground
/// and background) must hold one (32 MiB + 512), so 72 MiB is about the
/// smallest budget that admits them.
const CAPACITY: u64 = 72 << 20;
/// What the node may use beyond the budget: runtime, catalog, sockets,
/// allocator slack. An idle debug node is ~10 MiB (printed by the test).
const OVERHEAD: u64 = 48 << 20;

fn flood_bounded(bs: usize, depth: usize, blocks_per_conn: u64) {
    let node = Node::builder()
        .volume(&format!(
            "flood:{}M",
            (4 * blocks_per_conn * bs as u64) >> 20
        ))
        .metrics()
        .arg("--grpc-listen")
        .arg("127.0.0.1:0")
        .arg("--throttle-capacity")
        .arg(format!("{}", CAPACITY))
        .start();
    let pid = node.pid();
    let grpc = node.ready().grpc.expect("grpc address");
    let addr = node.addr();
    std::thread::sleep(Duration::from_millis(300));
    let idle = kib_field(pid, "VmRSS:") * 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        // Slow storage: 32 MB/s, far below what the client can send.
        set_fault(grpc, "flood", 200, 32 << 20).await;
        let stop_slowness = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            // Let the backlog drain quickly once the flood stops submitting.
            set_fault(grpc, "flood", 0, 0).await;
        });
        let r = tokio::time::timeout(
            hang(20),
            flood(
                addr,
                "flood",
                4,
                bs,
                depth,
                blocks_per_conn,
                Duration::from_secs(8),
            ),
        )
        .await
        .expect("flood hung");
        stop_slowness.await.unwrap();
        tokio::time::timeout(hang(20), verify(addr, "flood", bs, &r.acked))
            .await
            .expect("verify hung");
        r
    });
    let peak = kib_field(pid, "VmHWM:") * 1024;
    let metrics = node.metrics_text().expect("metrics");
    let peak_units = metric(&metrics, "nbdraid_throttle_peak_in_flight_units").expect("peak gauge");
    let available = metric(&metrics, "nbdraid_throttle_available_units").expect("available gauge");
    eprintln!(
        "flood bs={bs} depth={depth}x4: {} writes acknowledged and verified; node idle RSS {} MiB, peak RSS {} MiB, peak units {} MiB, budget {} MiB",
        result.writes,
        idle >> 20,
        peak >> 20,
        peak_units as u64 >> 20,
        CAPACITY >> 20
    );
    assert!(result.writes > 0, "the flood wrote nothing");
    assert!(
        peak_units <= CAPACITY as f64,
        "throttle held {peak_units} units > capacity"
    );
    assert!(peak_units > 0.0);
    assert!(available >= 0.0 && available <= CAPACITY as f64);
    // Every reply has been read, so every unit comes back (a guard drops
    // just after its reply leaves; allow it a moment).
    let settle = Instant::now() + Duration::from_secs(5);
    let mut available = available;
    while available != CAPACITY as f64 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
        let text = node.metrics_text().expect("metrics");
        available = metric(&text, "nbdraid_throttle_available_units").expect("available gauge");
    }
    assert_eq!(
        available, CAPACITY as f64,
        "units still held after every request was answered"
    );
    assert!(
        peak <= CAPACITY + OVERHEAD,
        "peak RSS {} MiB exceeds budget {} MiB + overhead {} MiB",
        peak >> 20,
        CAPACITY >> 20,
        OVERHEAD >> 20
    );
}

#[test]
fn memory_bounded_under_1m_write_flood() {
    if !nbdraid_tests::backend_is_node("memory_bounded_under_1m_write_flood") {
        return;
    }
    flood_bounded(1 << 20, 128, 160);
}

#[test]
fn memory_bounded_under_32m_write_flood() {
    if !nbdraid_tests::backend_is_node("memory_bounded_under_32m_write_flood") {
        return;
    }
    flood_bounded(32 << 20, 16, 20);
}

/// Opens a lease and returns the sender that keeps it alive (drop it to
/// release) and the first reply.
async fn open_lease(
    grpc: SocketAddr,
    upstream: &str,
    units: u64,
    class: grpc::TrafficClass,
    register: Vec<SocketAddr>,
) -> Result<
    (
        mpsc::Sender<grpc::LeaseRequest>,
        tonic::Streaming<grpc::LeaseReply>,
        grpc::LeaseReply,
    ),
    tonic::Status,
> {
    use grpc::lease_request::Kind;
    let (tx, rx) = mpsc::channel(16);
    tx.send(grpc::LeaseRequest {
        kind: Some(Kind::Open(grpc::LeaseOpen {
            upstream: upstream.into(),
            units,
            class: class as i32,
        })),
    })
    .await
    .unwrap();
    let mut replies = ThrottleClient::new(channel(grpc).await)
        .lease(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = replies.message().await?.expect("lease reply");
    for a in register {
        tx.send(grpc::LeaseRequest {
            kind: Some(Kind::Register(grpc::ConnectionAddr {
                addr: a.to_string(),
            })),
        })
        .await
        .unwrap();
        let r = replies.message().await?.expect("register reply");
        assert!(r.registered.contains(&a.to_string()), "registration echoed");
    }
    Ok((tx, replies, first))
}

async fn get_metric(grpc: SocketAddr) -> grpc::MetricModel {
    ThrottleClient::new(channel(grpc).await)
        .get_metric(grpc::GetMetricRequest {})
        .await
        .expect("get metric")
        .into_inner()
}

/// Runs `ops` mixed requests (1 MiB and 4 KiB writes and reads) at depth 16
/// on `client`, in its own region; returns how many completed.
async fn mixed(client: Arc<Client>, region: u64, ops: u64) -> u64 {
    let mut pending = FuturesUnordered::new();
    let mut done = 0;
    let mut issued = 0u64;
    while done < ops {
        while issued < ops && pending.len() < 16 {
            let c = client.clone();
            let k = issued;
            pending.push(async move {
                let big = k.is_multiple_of(2);
                let len = if big { 1 << 20 } else { 4096 };
                let off = region + (k % 8) * (1 << 20);
                if k % 4 < 2 {
                    c.write(off, vec![k as u8; len], false).await
                } else {
                    c.read_at(off, len).await.map(|_| ())
                }
            });
            issued += 1;
        }
        let r = pending.next().await.expect("pending op");
        r.expect("mixed op failed");
        done += 1;
    }
    done
}

#[test]
fn tiny_capacity_mixed_traffic_never_deadlocks() {
    if !nbdraid_tests::backend_is_node("tiny_capacity_mixed_traffic_never_deadlocks") {
        return;
    }
    let largest: u64 = (1 << 20) + 512;
    // Room for: the background pool (one largest request), one grant (one
    // largest request), and a foreground pool just above one largest request.
    let capacity = 3 * largest + 64 * 1024;
    let node = Node::builder()
        .volume("mix:256M")
        .arg("--grpc-listen")
        .arg("127.0.0.1:0")
        .arg("--max-payload")
        .arg("1M")
        .arg("--throttle-capacity")
        .arg(capacity.to_string())
        .arg("--background-reserve")
        .arg(largest.to_string())
        .start();
    let grpc = node.ready().grpc.expect("grpc");
    let addr = node.addr().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Storage with latency, so requests pile up against the budget.
        set_fault(grpc, "mix", 2000, 0).await;
        let connect = || async {
            Arc::new(
                Client::connect(&addr, "mix", ClientConfig::default())
                    .await
                    .unwrap(),
            )
        };
        let fg: Vec<_> = futures::future::join_all((0..3).map(|_| connect())).await;
        let granted = connect().await;
        let background = connect().await;
        let (_grant, _g_replies, g) = open_lease(
            grpc,
            "array-a",
            largest,
            grpc::TrafficClass::Foreground,
            granted.local_addrs(),
        )
        .await
        .expect("grant");
        assert_eq!(g.granted, largest);
        let (_bg, _b_replies, _) = open_lease(
            grpc,
            "rebuild",
            0,
            grpc::TrafficClass::Background,
            background.local_addrs(),
        )
        .await
        .expect("background lease");
        let model = get_metric(grpc).await;
        assert!(
            model
                .shares
                .iter()
                .any(|s| s.name == "array-a" && s.reserved == largest)
        );

        let mut work = Vec::new();
        for (i, c) in fg.iter().enumerate() {
            work.push(tokio::spawn(mixed(c.clone(), i as u64 * (16 << 20), 120)));
        }
        work.push(tokio::spawn(mixed(granted.clone(), 64 << 20, 120)));
        work.push(tokio::spawn(mixed(background.clone(), 96 << 20, 120)));
        let all = tokio::time::timeout(hang(120), futures::future::join_all(work))
            .await
            .expect("mixed traffic deadlocked");
        for (i, r) in all.into_iter().enumerate() {
            assert_eq!(r.expect("task"), 120, "client {i} did not finish");
        }
        let model = get_metric(grpc).await;
        assert!(model.in_flight <= model.capacity);
        let bg = model
            .shares
            .iter()
            .find(|s| s.name == "background")
            .expect("background share");
        assert_eq!(bg.reserved, largest);
    });
}

#[test]
fn throttle_service_publishes_the_model_and_manages_leases() {
    if !nbdraid_tests::backend_is_node("throttle_service_publishes_the_model_and_manages_leases") {
        return;
    }
    let node = Node::builder()
        .volume("v:64M")
        .arg("--grpc-listen")
        .arg("127.0.0.1:0")
        .arg("--throttle-capacity")
        .arg("256M")
        .start();
    let grpc = node.ready().grpc.expect("grpc");
    let addr = node.addr().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let m = get_metric(grpc).await;
        assert_eq!(m.capacity, 256 << 20);
        assert_eq!(m.available, 256 << 20);
        assert!(m.enabled);
        assert_eq!(m.max_payload, 32 << 20);
        assert_eq!(m.max_request_cost, (32 << 20) + 512);
        let write = m
            .costs
            .iter()
            .find(|c| c.op == "write")
            .expect("write cost");
        assert_eq!((write.base, write.per_byte_fp), (512, 65536));
        let flush = m
            .costs
            .iter()
            .find(|c| c.op == "flush")
            .expect("flush cost");
        assert_eq!(flush.per_byte_fp, 0);

        // The node sizes a grant: raised to the largest request, cut to
        // what the pool spares while keeping one largest request for
        // itself, refused only when it cannot spare even that.
        let largest = (32u64 << 20) + 512;
        let fg_reserved = |m: &grpc::MetricModel| {
            m.shares
                .iter()
                .find(|s| s.name == "foreground")
                .map(|s| s.reserved)
                .expect("foreground share")
        };
        let before = fg_reserved(&get_metric(grpc).await);
        let (small_tx, _small_rx, small) =
            open_lease(grpc, "small", 4096, grpc::TrafficClass::Foreground, vec![])
                .await
                .expect("a small grant is raised, not refused");
        assert_eq!(small.granted, largest);
        let (huge_tx, _huge_rx, huge) = open_lease(
            grpc,
            "huge",
            250 << 20,
            grpc::TrafficClass::Foreground,
            vec![],
        )
        .await
        .expect("a huge grant is cut, not refused");
        assert_eq!(huge.granted, before - largest - largest);
        let none = open_lease(grpc, "none", 4096, grpc::TrafficClass::Foreground, vec![]).await;
        assert_eq!(
            none.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument),
            "nothing left to spare"
        );
        // Ending the streams gives the units back.
        drop((small_tx, huge_tx));
        let deadline = std::time::Instant::now() + hang(30);
        while fg_reserved(&get_metric(grpc).await) != before {
            assert!(std::time::Instant::now() < deadline, "grants not returned");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A grant shows up as a share and goes away with its stream.
        let client = Client::connect(&addr, "v", ClientConfig::default())
            .await
            .unwrap();
        let (tx, replies, first) = open_lease(
            grpc,
            "up1",
            64 << 20,
            grpc::TrafficClass::Foreground,
            client.local_addrs(),
        )
        .await
        .expect("lease");
        assert_eq!(first.share, "up1");
        assert!(first.lease_ttl_ms > 0);
        let m = get_metric(grpc).await;
        let fg = m.shares.iter().find(|s| s.name == "foreground").unwrap();
        assert!(
            m.shares
                .iter()
                .any(|s| s.name == "up1" && s.reserved == 64 << 20)
        );
        // The registered connection draws from the grant.
        client.write(0, vec![1u8; 1 << 20], false).await.unwrap();

        // Watch: the first model comes at once.
        let mut watch = ThrottleClient::new(channel(grpc).await)
            .watch_metric(grpc::WatchMetricRequest { interval_ms: 20 })
            .await
            .unwrap()
            .into_inner();
        let w = watch.message().await.unwrap().expect("watch model");
        assert!(w.shares.iter().any(|s| s.name == "up1"));

        drop(tx);
        drop(replies);
        let deadline = Instant::now() + hang(10);
        loop {
            let m = get_metric(grpc).await;
            if !m.shares.iter().any(|s| s.name == "up1") {
                let fg2 = m.shares.iter().find(|s| s.name == "foreground").unwrap();
                assert_eq!(
                    fg2.reserved,
                    fg.reserved + (64 << 20),
                    "reservation returned"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lease not released after its stream ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The watch reports the change.
        let deadline = Instant::now() + hang(10);
        loop {
            let w = watch.message().await.unwrap().expect("watch update");
            if !w.shares.iter().any(|s| s.name == "up1") {
                break;
            }
            assert!(Instant::now() < deadline);
        }

        // The first message of a lease must be `open`.
        let (tx, rx) = mpsc::channel(1);
        tx.send(grpc::LeaseRequest {
            kind: Some(grpc::lease_request::Kind::Renew(grpc::Renew {})),
        })
        .await
        .unwrap();
        let r = ThrottleClient::new(channel(grpc).await)
            .lease(ReceiverStream::new(rx))
            .await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    });
}
