//! The array's data path in-process: members are engines serving memory
//! devices (behind the fault wrapper) on 127.0.0.1:0, reached through the
//! real client library; the array is driven through the block-device
//! trait and checked against a model of what was written, then member by
//! member for parity and mirror consistency. Members are failed with
//! injected EIO while the array works.

use std::sync::Arc;
use std::time::Duration;

use nbdraid_client::Client;
use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::{CostModel, SharedCostModel};
use nbdraid_engine::device::{BlockDevice, IoContext, ZeroFlags};
use nbdraid_engine::fault::{FaultControl, Faults, FaultyDevice, OpSet};
use nbdraid_engine::mem::MemDevice;
use nbdraid_engine::server::{Engine, EngineConfig, Exports};
use nbdraid_engine::throttle::{Throttle, ThrottleSettings};
use nbdraid_engine::upstream::Upstreams;
use nbdraid_raid::array::meta::ArrayMeta;
use nbdraid_raid::array::{Array, ArrayParams};
use nbdraid_raid::layout::{Geometry, Layout, Level};
use nbdraid_raid::member::{Member, MemberState, member_client_config};
use nbdraid_raid::parity;
use tokio_util::sync::CancellationToken;

const HANG: Duration = Duration::from_secs(60);

fn model() -> SharedCostModel {
    SharedCostModel::new(CostModel::buffers("test"))
}

/// One member: an engine serving a memory device behind the fault wrapper.
struct TestMember {
    mem: Arc<MemDevice>,
    faults: Arc<FaultControl>,
    addr: String,
    _stop: StopOnDrop,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn start_member(size: u64, min_block: u32) -> TestMember {
    let mem = Arc::new(MemDevice::new(size, model()).with_info(|i| i.block_sizes.min = min_block));
    let dev = Arc::new(FaultyDevice::new(mem.clone(), "member"));
    let faults = dev.control().clone();
    let exports = Exports::new();
    exports.insert("m", dev);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let throttle = Throttle::new(
        "member",
        ThrottleSettings {
            capacity: 256 << 20,
            background_reserve: 64 << 20,
            largest_request: (32 << 20) + 512,
            enabled: true,
        },
    )
    .expect("throttle");
    let engine = Engine::new(
        exports,
        throttle.clone(),
        Upstreams::new(),
        BufferPool::new(throttle.capacity()),
        EngineConfig::default(),
        stop.clone(),
    );
    tokio::spawn(engine.serve(listener));
    TestMember {
        mem,
        faults,
        addr,
        _stop: StopOnDrop(stop),
    }
}

struct TestArray {
    array: Array,
    members: Vec<TestMember>,
    layout: Layout,
}

async fn build(level: Level, n: usize, chunk: u64, member_size: u64) -> TestArray {
    build_aligned(level, n, chunk, member_size, 1).await
}

async fn build_aligned(
    level: Level,
    n: usize,
    chunk: u64,
    member_size: u64,
    min_block: u32,
) -> TestArray {
    let mut members = Vec::new();
    let mut handles = Vec::new();
    for slot in 0..n {
        let m = start_member(member_size, min_block).await;
        let client = tokio::time::timeout(
            HANG,
            Client::connect(
                &m.addr,
                "m",
                member_client_config(2, Duration::from_secs(10)),
            ),
        )
        .await
        .expect("connect hung")
        .expect("connect");
        handles.push(Member::new(
            slot,
            &format!("nbd://{}/m", m.addr),
            0,
            Some(Arc::new(client)),
            MemberState::Active,
        ));
        members.push(m);
    }
    let layout = Layout::new(Geometry::new(level, n, chunk, member_size)).expect("geometry");
    let array = Array::new(
        ArrayParams::new(&format!("{level}"), 32 << 20),
        layout,
        handles,
        BufferPool::new(256 << 20),
        ArrayMeta::volatile(),
        model(),
    );
    TestArray {
        array,
        members,
        layout,
    }
}

/// A small deterministic generator (no external crate needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn ctx() -> IoContext {
    IoContext::default()
}

async fn read(a: &Array, offset: u64, len: usize) -> Result<Vec<u8>, nbdraid_engine::Error> {
    let buf = nbdraid_engine::buffer::IoBuf::zeroed(len);
    let b = tokio::time::timeout(HANG, a.read(ctx(), offset, buf))
        .await
        .expect("read hung")?;
    Ok(b.to_vec())
}

async fn write(a: &Array, offset: u64, data: &[u8]) -> Result<(), nbdraid_engine::Error> {
    let buf = nbdraid_engine::buffer::IoBuf::from_vec(data.to_vec());
    tokio::time::timeout(HANG, a.write(ctx(), offset, buf, false))
        .await
        .expect("write hung")
}

/// Random unaligned writes, zeroes and reads against a model.
async fn exercise(t: &TestArray, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let size = model.len() as u64;
    let span = t.layout.stripe_data_bytes().unwrap_or(t.layout.chunk() * 2) * 3;
    for _ in 0..ops {
        let offset = rng.below(size);
        let len = 1 + rng.below(span.min(size - offset));
        match rng.below(10) {
            0..=5 => {
                let data = rng.bytes(len as usize);
                write(&t.array, offset, &data).await.expect("write");
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            6 => {
                tokio::time::timeout(
                    HANG,
                    t.array
                        .write_zeroes(ctx(), offset, len, ZeroFlags::default()),
                )
                .await
                .expect("zeroes hung")
                .expect("zeroes");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            _ => {
                let got = read(&t.array, offset, len as usize).await.expect("read");
                let want = &model[offset as usize..(offset + len) as usize];
                if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                    panic!(
                        "read {offset}+{len}: byte {i} is {} want {}",
                        got[i], want[i]
                    );
                }
            }
        }
    }
    // Everything reads back.
    let got = read(&t.array, 0, size as usize).await.expect("full read");
    if let Some(i) = got.iter().zip(model.iter()).position(|(a, b)| a != b) {
        panic!("full read: byte {i} is {} want {}", got[i], model[i]);
    }
}

/// Checks parity (RAID 5/6) or copies (RAID 1/10) member by member.
fn check_consistency(t: &TestArray) {
    let g = t.layout.geometry();
    let chunk = g.chunk as usize;
    match g.level {
        Level::Raid5 | Level::Raid6 => {
            for s in 0..t.layout.rows() {
                let stripe = t.layout.stripe(s).expect("stripe");
                let mut col: Vec<Vec<u8>> = stripe
                    .members()
                    .map(|m| {
                        let mut b = vec![0u8; chunk];
                        t.members[m].mem.read_at(stripe.member_offset(0), &mut b);
                        b
                    })
                    .collect();
                let k = stripe.data_chunks();
                let mut p = vec![0u8; chunk];
                let mut q = vec![0u8; chunk];
                let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).position(|(x, y)| x != y);
                if g.level == Level::Raid5 {
                    parity::gen_p(&col[..k], &mut p).expect("gen");
                } else {
                    parity::gen_pq(&col[..k], &mut p, &mut q).expect("gen");
                    if let Some(i) = differ(&q, &col[k + 1]) {
                        panic!("stripe {s}: Q does not match the data from byte {i}");
                    }
                }
                if let Some(i) = differ(&p, &col[k]) {
                    panic!("stripe {s}: P does not match the data from byte {i}");
                }
                col.clear();
            }
        }
        Level::Raid1 | Level::Raid10 => {
            let pieces = t.layout.map(0, t.layout.size()).expect("map");
            for p in pieces {
                let copies: Vec<Vec<u8>> = p
                    .locations
                    .iter()
                    .map(|l| {
                        let mut b = vec![0u8; p.len as usize];
                        t.members[l.member].mem.read_at(l.offset, &mut b);
                        b
                    })
                    .collect();
                for c in &copies[1..] {
                    if let Some(i) = c.iter().zip(&copies[0]).position(|(x, y)| x != y) {
                        panic!("copies of {:?} differ from byte {i}", p.unit);
                    }
                }
            }
        }
        Level::Raid0 => {}
    }
}

fn fail(t: &TestArray, slot: usize) {
    t.members[slot].faults.set(Faults {
        fail: OpSet::reads()
            .union(OpSet::writes())
            .union(OpSet::of(&[nbdraid_engine::device::OpKind::Flush])),
        ..Faults::default()
    });
}

async fn level_survives(level: Level, n: usize, chunk: u64, lose: &[usize], seed: u64) {
    let t = build(level, n, chunk, 1 << 20).await;
    let mut model = vec![0u8; t.layout.size() as usize];
    let mut rng = Rng(seed);
    exercise(&t, &mut model, &mut rng, 150).await;
    check_consistency(&t);
    for &slot in lose {
        fail(&t, slot);
        exercise(&t, &mut model, &mut rng, 60).await;
        assert_eq!(
            t.array.inner().members[slot].state(),
            MemberState::Faulty,
            "member {slot} was not failed"
        );
    }
    assert!(!t.array.inner().is_failed());
    tokio::time::timeout(HANG, t.array.flush(ctx()))
        .await
        .expect("flush hung")
        .expect("flush on a degraded array");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_writes_keep_parity_and_survive_a_lost_member() {
    level_survives(Level::Raid5, 4, 4096, &[2], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_survives_two_lost_members() {
    level_survives(Level::Raid6, 5, 8192, &[0, 3], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_three_way_survives_two_lost_members() {
    level_survives(Level::Raid1, 3, 4096, &[1, 0], 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_survives_one_lost_member_per_copy_set() {
    level_survives(Level::Raid10, 4, 4096, &[1, 2], 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_odd_member_count() {
    level_survives(Level::Raid10, 3, 4096, &[2], 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid0_fails_cleanly_when_a_member_is_lost() {
    let t = build(Level::Raid0, 3, 16384, 1 << 20).await;
    let mut model = vec![0u8; t.layout.size() as usize];
    let mut rng = Rng(6);
    exercise(&t, &mut model, &mut rng, 100).await;
    fail(&t, 1);
    // A request touching the lost member gets EIO, promptly.
    let e = read(&t.array, 0, t.layout.size() as usize)
        .await
        .expect_err("RAID 0 cannot serve a lost member's chunks");
    assert_eq!(e.nbd_errno(), nbdraid_proto::consts::errno::EIO, "{e}");
    assert!(t.array.inner().is_failed());
    let e = write(&t.array, 0, &[1, 2, 3])
        .await
        .expect_err("failed array");
    assert_eq!(e.nbd_errno(), nbdraid_proto::consts::errno::EIO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_losing_a_second_member_fails_the_array() {
    let t = build(Level::Raid5, 3, 4096, 1 << 20).await;
    let mut model = vec![0u8; t.layout.size() as usize];
    let mut rng = Rng(7);
    exercise(&t, &mut model, &mut rng, 50).await;
    fail(&t, 0);
    exercise(&t, &mut model, &mut rng, 30).await;
    fail(&t, 1);
    let e = read(&t.array, 0, t.layout.size() as usize)
        .await
        .expect_err("two lost members");
    assert_eq!(e.nbd_errno(), nbdraid_proto::consts::errno::EIO, "{e}");
    assert!(t.array.inner().is_failed());
}

/// Concurrent overlapping writes to the same stripes keep parity consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_stripe_keep_parity() {
    for level in [Level::Raid5, Level::Raid6] {
        let t = build(level, 5, 4096, 256 << 10).await;
        let sd = t.layout.stripe_data_bytes().expect("striped");
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let a = t.array.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(100 + i);
                let off = rng.below(2 * sd - 1);
                let len = 1 + rng.below(2 * sd - off);
                let data = rng.bytes(len as usize);
                write(&a, off, &data).await.expect("write");
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        check_consistency(&t);
    }
}

/// A caller's mistake (out of range) is refused and fails no member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_fails_no_member() {
    let t = build(Level::Raid5, 3, 4096, 1 << 20).await;
    let size = t.layout.size();
    assert!(read(&t.array, size - 1, 2).await.is_err());
    assert!(write(&t.array, size, &[1]).await.is_err());
    for m in &t.array.inner().members {
        assert_eq!(m.state(), MemberState::Active);
    }
}

/// Members that insist on 4 KiB blocks still serve unaligned array I/O
/// (the array widens member requests to their block size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_a_minimum_block_size_serve_any_alignment() {
    for level in [Level::Raid1, Level::Raid5] {
        let t = build_aligned(level, 3, 4096, 1 << 20, 4096).await;
        let mut model = vec![0u8; t.layout.size() as usize];
        let mut rng = Rng(40);
        exercise(&t, &mut model, &mut rng, 120).await;
        check_consistency(&t);
    }
}

/// The published (composed) model bounds what any request is charged: its
/// own units plus what it reserves at every member; a degraded array
/// publishes higher read costs and reserves reconstruction reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_model_bounds_every_request_and_rises_when_degraded() {
    use nbdraid_engine::device::OpKind;
    for (level, n, chunk) in [
        (Level::Raid0, 3, 4096),
        (Level::Raid1, 2, 4096),
        (Level::Raid5, 4, 8192),
        (Level::Raid6, 5, 4096),
        (Level::Raid10, 3, 4096),
    ] {
        let t = build(level, n, chunk, 1 << 20).await;
        let inner = t.array.inner();
        let check = |rng: &mut Rng| {
            let own = inner.model.load();
            let composed = inner.composed_model(&own);
            let size = t.layout.size();
            for _ in 0..300 {
                let op = OpKind::ALL[rng.below(OpKind::ALL.len() as u64) as usize];
                let offset = rng.below(size);
                let len = 1 + rng.below(size - offset);
                let members: u64 = inner
                    .member_needs(op, offset, len)
                    .iter()
                    .map(|(_, u)| u)
                    .sum();
                let charged = own.cost(op, len) + members;
                assert!(
                    charged <= composed.cost(op, len),
                    "{level} {op:?} {offset}+{len}: charged {charged} > published {}",
                    composed.cost(op, len)
                );
            }
            composed
        };
        let mut rng = Rng(77);
        let healthy = check(&mut rng);
        if level == Level::Raid0 {
            continue;
        }
        fail(&t, 0);
        // Make the array notice (a read of every member's chunks).
        let _ = read(&t.array, 0, t.layout.size() as usize).await;
        assert!(inner.is_degraded(), "{level}: the failure was not noticed");
        let degraded = check(&mut rng);
        if level.redundancy().is_some() {
            assert!(
                degraded.cost(OpKind::Read, 4096) > healthy.cost(OpKind::Read, 4096),
                "{level}: a degraded array must publish a higher read cost"
            );
            // A read of a chunk on the lost member reserves the rest of its stripe.
            let sd = t.layout.stripe_data_bytes().expect("striped");
            let (stripe, i) = (0..t.layout.rows())
                .find_map(|r| {
                    let s = t.layout.stripe(r)?;
                    let i = (0..s.data_chunks()).find(|&i| s.data_member(i) == Some(0))?;
                    Some((r, i))
                })
                .expect("member 0 holds data in some stripe");
            let offset = stripe * sd + i as u64 * chunk;
            let needs = inner.member_needs(OpKind::Read, offset, 4096);
            assert_eq!(needs.len(), n - 1, "{level}: {needs:?}");
        }
    }
}
