//! The client against real servers: `nbdraid-node` (with a 64 KiB maximum
//! payload, so requests split), `nbdkit memory` and `qemu-nbd`. Each
//! scenario runs once per server (`node::`, `nbdkit::`, `qemu::`); a
//! server that is not installed skips its tests with a printed SKIP line
//! (or fails them when `NBDRAID_TEST_REQUIRE_TOOLS` is set).

// A test that meets the unexpected should panic, loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::join_all;
use nbdraid_client::{
    Client, ClientConfig, ClientError, CompletionRing, ConnState, Indirect, Request,
};
use nbdraid_proto::consts::{allocation, errno, transmission_flags as tf};

use common::servers::{Kind, Server};
use common::{connect, within};
use nbdraid_harness::{assert_same, pattern};

const MIB: u64 = 1 << 20;

/// Starts `kind` with an export of `size` bytes; `None` skips the test.
fn start(test: &str, kind: Kind, size: u64) -> Option<Server> {
    // The node splits at 64 KiB, so ordinary sizes exercise splitting.
    let extra: &[&str] = if kind == Kind::Node {
        &["--max-payload", "64K"]
    } else {
        &[]
    };
    Server::start(test, kind, size, extra)
}

async fn client_of(srv: &Server, config: ClientConfig) -> Client {
    connect(&srv.addr(), srv.export(), config).await
}

/// Writes random data of many sizes at unaligned offsets, reads each back,
/// then reads the whole region at once and compares it with a model.
async fn round_trip(kind: Kind) {
    let Some(srv) = start("round_trip", kind, 48 * MIB) else {
        return;
    };
    let client = client_of(&srv, ClientConfig::default()).await;
    let info = client.info();
    assert_eq!(info.size, 48 * MIB);
    if kind == Kind::Node {
        assert_eq!(
            info.max_payload,
            64 << 10,
            "--max-payload 64K is advertised"
        );
    }
    const REGION: usize = 4 << 20;
    let mut model = vec![0u8; REGION];
    let sizes = [
        1,
        7,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        65535,
        65536,
        65537,
        131_073,
        200_000,
        (1 << 20) + 123,
    ];
    for (k, &len) in sizes.iter().enumerate() {
        // Unaligned offsets, spread over the region, overlapping earlier writes.
        let off = (k * 277_777 + 13) % (REGION - len);
        let data = pattern(k as u64, len);
        within("write", client.write(off as u64, data.clone(), false))
            .await
            .unwrap_or_else(|e| panic!("write {len} at {off}: {e}"));
        model[off..off + len].copy_from_slice(&data);
        let back = within("read", client.read_at(off as u64, len))
            .await
            .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
        assert_same(&back, &data, &format!("{kind:?}: {len} bytes at {off}"));
    }
    // Many writes in flight at once, then the whole region in one read.
    let writes: Vec<_> = (0..32)
        .map(|k| {
            let off = k * 100_003 + 1;
            let data = pattern(1000 + k as u64, 30_000);
            model[off..off + data.len()].copy_from_slice(&data);
            client.write(off as u64, data, false)
        })
        .collect();
    for r in within("concurrent writes", join_all(writes)).await {
        r.expect("concurrent write");
    }
    within("flush", client.flush()).await.expect("flush");
    let all = within("whole region", client.read_at(0, REGION))
        .await
        .expect("read");
    assert_same(&all, &model, &format!("{kind:?}: whole region"));
    // Larger than the default 32 MiB maximum: split even without a
    // server-set limit.
    let big_len = (33 << 20) + 7;
    let big = pattern(99, big_len);
    let at = 5 * MIB + 3;
    within("33 MiB write", client.write(at, big.clone(), false))
        .await
        .expect("big write");
    let back = within("33 MiB read", client.read_at(at, big_len))
        .await
        .expect("big read");
    assert_same(&back, &big, &format!("{kind:?}: 33 MiB"));
}

/// FLUSH, FUA, TRIM, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO), CACHE,
/// BLOCK_STATUS and zero-length requests.
async fn commands(kind: Kind) {
    let Some(srv) = start("commands", kind, 16 * MIB) else {
        return;
    };
    let client = client_of(&srv, ClientConfig::default()).await;
    let info = client.info();
    for flag in [
        tf::SEND_FLUSH,
        tf::SEND_FUA,
        tf::SEND_TRIM,
        tf::SEND_WRITE_ZEROES,
    ] {
        assert!(info.has(flag), "{kind:?} advertises {flag:#x}");
    }
    let data = pattern(1, 1 << 20);
    within("write", client.write(0, data.clone(), false))
        .await
        .expect("write");
    within("flush", client.flush()).await.expect("flush");
    within("fua write", client.write(MIB, data.clone(), true))
        .await
        .expect("FUA write");

    // TRIM: the range is undefined afterwards, its neighbours are not.
    within("trim", client.trim(64 << 10, 64 << 10))
        .await
        .expect("trim");
    let head = within("read", client.read_at(0, 64 << 10))
        .await
        .expect("read");
    assert_same(&head, &data[..64 << 10], "before the trimmed range");
    let tail = within("read", client.read_at(128 << 10, 64 << 10))
        .await
        .expect("read");
    assert_same(
        &tail,
        &data[128 << 10..192 << 10],
        "after the trimmed range",
    );

    // WRITE_ZEROES, unaligned, with and without NO_HOLE.
    for (at, len, no_hole) in [(256_000u64, 100_000u64, false), (600_001, 77_777, true)] {
        within("zeroes", client.write_zeroes(at, len, no_hole))
            .await
            .expect("write zeroes");
        let z = within("read", client.read_at(at, len as usize))
            .await
            .expect("read");
        assert!(
            z.iter().all(|&b| b == 0),
            "{kind:?}: zeroed range reads as zero"
        );
        let before = within("read", client.read_at(at - 100, 100))
            .await
            .expect("read");
        assert_same(
            &before,
            &data[at as usize - 100..at as usize],
            "before the zeroed range",
        );
        let after = within("read", client.read_at(at + len, 100))
            .await
            .expect("read");
        let e = (at + len) as usize;
        assert_same(&after, &data[e..e + 100], "after the zeroed range");
    }
    // FAST_ZERO: quick success, or ENOTSUP (which is a caller's matter).
    let fast = Request::WriteZeroes {
        offset: 2 * MIB,
        len: MIB,
        no_hole: false,
        fast: true,
        fua: false,
    };
    let d = within("fast zeroes", client.submit(fast)).await;
    match d.result {
        Ok(()) => {
            let z = within("read", client.read_at(2 * MIB, MIB as usize))
                .await
                .expect("read");
            assert!(z.iter().all(|&b| b == 0));
        }
        Err(ClientError::Server {
            errno: errno::ENOTSUP,
            ..
        }) => {}
        Err(ClientError::Invalid(_)) => assert!(!info.has(tf::SEND_FAST_ZERO)),
        Err(e) => panic!("{kind:?}: fast zero: {e}"),
    }

    // CACHE is advisory; zero-length requests finish at once.
    within("cache", client.cache(0, MIB)).await.expect("cache");
    assert_eq!(
        within("empty read", client.read_at(5, 0))
            .await
            .expect("empty read"),
        Vec::<u8>::new()
    );
    within("empty write", client.write(5, Vec::new(), false))
        .await
        .expect("empty write");
    within("empty trim", client.trim(5, 0))
        .await
        .expect("empty trim");

    // BLOCK_STATUS: extents start at the offset, are contiguous, and data
    // just written is never reported as ZERO.
    if info.allocation_context.is_some() {
        let ext = within("block status", client.block_status(0, 4 * MIB))
            .await
            .expect("block status");
        assert!(!ext.is_empty());
        assert_eq!(ext[0].offset, 0);
        for w in ext.windows(2) {
            assert_eq!(w[0].offset + w[0].len, w[1].offset, "contiguous: {ext:?}");
        }
        for e in ext.iter().filter(|e| e.offset < 64 << 10) {
            assert_eq!(
                e.flags & allocation::ZERO,
                0,
                "{kind:?}: written data reported as zero: {ext:?}"
            );
        }
        // From an unaligned offset in the middle.
        let ext = within("block status", client.block_status(12_345, 1000))
            .await
            .expect("block status");
        assert_eq!(ext[0].offset, 12_345);
    } else {
        eprintln!("note: {kind:?} did not grant base:allocation");
    }
    within("final flush", client.flush()).await.expect("flush");
}

/// Well over 1,000 requests in flight through a 2048-slot ring, and 1,024
/// through the async API, every one checked.
async fn many_in_flight(kind: Kind) {
    const N: u64 = 1500;
    const BLOCK: usize = 4096;
    let Some(srv) = start("many_in_flight", kind, 8 * MIB) else {
        return;
    };
    let client = client_of(&srv, ClientConfig::default()).await;
    let ring = CompletionRing::new(2048).unwrap();
    for i in 0..N {
        let req = Request::Write {
            offset: i * BLOCK as u64,
            data: Bytes::from(pattern(i, BLOCK)),
            fua: false,
        };
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    assert_eq!(
        ring.outstanding(),
        N as usize,
        "all {N} submitted before any was consumed"
    );
    let mut done = 0;
    while done < N {
        within("write completions", ring.ring_wait(ring.user_tail())).await;
        while let Some(e) = ring.pop() {
            e.status
                .unwrap_or_else(|err| panic!("{kind:?}: write {}: {err}", e.caller_data));
            done += 1;
        }
    }
    for i in 0..N {
        let req = Request::Read {
            offset: i * BLOCK as u64,
            buf: vec![0; BLOCK].into(),
        };
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    let mut seen = vec![false; N as usize];
    let mut done = 0;
    while done < N {
        within("read completions", ring.ring_wait(ring.user_tail())).await;
        while let Some(e) = ring.pop() {
            e.status
                .as_ref()
                .unwrap_or_else(|err| panic!("{kind:?}: read {}: {err}", e.caller_data));
            let buf = e.buffer.as_ref().expect("buffer");
            assert_same(
                buf,
                &pattern(e.caller_data, BLOCK),
                &format!("{kind:?}: block {}", e.caller_data),
            );
            assert!(
                !seen[e.caller_data as usize],
                "block {} completed twice",
                e.caller_data
            );
            seen[e.caller_data as usize] = true;
            done += 1;
        }
    }
    let reads = (0..1024u64).map(|i| client.read_at(i * BLOCK as u64, BLOCK));
    for (i, r) in within("1024 async reads", join_all(reads))
        .await
        .into_iter()
        .enumerate()
    {
        assert_same(
            &r.expect("read"),
            &pattern(i as u64, BLOCK),
            &format!("async block {i}"),
        );
    }
    assert_eq!(client.in_flight(), 0);
}

/// SIGKILL the server with many requests in flight (half of them sent
/// while it runs, half after a SIGSTOP, so some are certainly in flight):
/// every one completes
/// (ConnectionLost, writes "possibly applied"), the state is watched going
/// to Failed, new requests fail at once; after a restart `reconnect()`
/// works and every acknowledged write reads back (node and qemu-nbd keep
/// their data).
async fn killed_mid_stream(kind: Kind) {
    const BLOCK: usize = 64 << 10;
    let Some(mut srv) = start("killed_mid_stream", kind, 64 * MIB) else {
        return;
    };
    let client = client_of(&srv, ClientConfig::default()).await;
    let mut watch = client.watch_state(0).expect("connection 0");
    let ring = CompletionRing::new(256).unwrap();
    let mut acked = Vec::new();
    // Phase 1: 128 writes acknowledged.
    for i in 0..128u64 {
        let req = Request::Write {
            offset: i * BLOCK as u64,
            data: Bytes::from(pattern(i, BLOCK)),
            fua: false,
        };
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    while acked.len() < 128 {
        within("phase 1", ring.ring_wait(ring.user_tail())).await;
        while let Some(e) = ring.pop() {
            e.status.expect("phase 1 write");
            acked.push(e.caller_data);
        }
    }
    // Phase 2: 16 MiB of writes and reads queued at once (the data made
    // beforehand: generating it is slower than a server), then the kill.
    let reqs: Vec<_> = (128..384u64)
        .map(|i| {
            let req = if i % 4 == 3 {
                Request::Read {
                    offset: (i - 128) * BLOCK as u64,
                    buf: vec![0; BLOCK].into(),
                }
            } else {
                let data = Bytes::from(pattern(i, BLOCK));
                Request::Write {
                    offset: i * BLOCK as u64,
                    data,
                    fua: false,
                }
            };
            (i, req)
        })
        .collect();
    // The first half races the server; before the second half it is frozen,
    // so those are certainly in flight when it dies.
    for (i, req) in reqs {
        if i == 256 {
            srv.freeze();
        }
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    // Async reads too: polled once, so they are on the wire before the kill.
    let mut async_reads = Box::pin(join_all(
        (0..32u64).map(|i| client.read_at(i * BLOCK as u64, BLOCK)),
    ));
    assert!(
        (&mut async_reads).now_or_never().is_none(),
        "no server answers that fast"
    );
    srv.kill();
    let (mut failed, mut phase2) = (0, 0);
    while phase2 < 256 {
        within(
            "completions after the kill",
            ring.ring_wait(ring.user_tail()),
        )
        .await;
        while let Some(e) = ring.pop() {
            phase2 += 1;
            let write = e.caller_data % 4 != 3;
            match e.status {
                Ok(()) if write => acked.push(e.caller_data),
                Ok(()) => {}
                Err(ClientError::ConnectionLost {
                    possibly_applied,
                    ref reason,
                }) => {
                    assert_eq!(possibly_applied, write, "op {}: {reason}", e.caller_data);
                    failed += 1;
                }
                Err(err) => panic!("{kind:?}: op {}: unexpected {err}", e.caller_data),
            }
        }
    }
    assert!(
        failed >= 128,
        "{kind:?}: only {failed} failed, yet 128 were sent to a frozen server"
    );
    for r in within("async reads after the kill", async_reads).await {
        match r {
            Ok(buf) => assert_eq!(buf.len(), BLOCK),
            Err(ClientError::ConnectionLost {
                possibly_applied: false,
                ..
            }) => {}
            Err(e) => panic!("{kind:?}: async read: {e}"),
        }
    }
    within(
        "state Failed",
        watch.wait_for(|s| matches!(s, ConnState::Failed(_))),
    )
    .await
    .expect("watch");
    assert!(!client.is_ready());
    let later = client
        .read_at(0, 512)
        .now_or_never()
        .expect("fails at once");
    assert!(
        matches!(later, Err(ClientError::ConnectionLost { .. })),
        "{later:?}"
    );
    assert_eq!(ring.outstanding(), 0);

    srv.restart();
    within("reconnect", client.reconnect())
        .await
        .expect("reconnect after restart");
    assert!(client.is_ready());
    if srv.persistent() {
        for &i in &acked {
            let back = within("read back", client.read_at(i * BLOCK as u64, BLOCK))
                .await
                .expect("read");
            assert_same(
                &back,
                &pattern(i, BLOCK),
                &format!("{kind:?}: acknowledged block {i}"),
            );
        }
    }
    let data = pattern(5, 12345);
    within("write", client.write(777, data.clone(), true))
        .await
        .expect("write after reconnect");
    assert_eq!(
        within("read", client.read_at(777, 12345))
            .await
            .expect("read"),
        data
    );
}

/// Several connections only when the server allows multi-conn; writes
/// spread over them, one FLUSH, everything reads back.
async fn multi_conn(kind: Kind) {
    let Some(srv) = start("multi_conn", kind, 16 * MIB) else {
        return;
    };
    let config = ClientConfig {
        connections: 4,
        ..ClientConfig::default()
    };
    let client = client_of(&srv, config).await;
    let multi = client.info().multi_conn();
    if kind == Kind::Nbdkit {
        assert!(multi, "nbdkit memory advertises CAN_MULTI_CONN");
    }
    assert_eq!(client.connections(), if multi { 4 } else { 1 });
    for i in 0..client.connections() {
        assert_eq!(client.state(i), Some(ConnState::Ready));
    }
    let writes = (0..64u64).map(|i| client.write(i * 8192, pattern(i, 8192), false));
    for r in within("writes", join_all(writes)).await {
        r.expect("write");
    }
    within("flush", client.flush()).await.expect("flush");
    let reads = (0..64u64).map(|i| client.read_at(i * 8192, 8192));
    for (i, r) in within("reads", join_all(reads))
        .await
        .into_iter()
        .enumerate()
    {
        assert_same(
            &r.expect("read"),
            &pattern(i as u64, 8192),
            &format!("block {i}"),
        );
    }
    within("close", client.close(Duration::from_secs(10))).await;
    assert_eq!(client.state(0), Some(ConnState::Closed));
}

/// SIGTERM with requests in flight: each one succeeds, or fails with
/// ESHUTDOWN or a lost connection; none hangs, and the connection ends up
/// Failed (the client must disconnect after ESHUTDOWN).
async fn terminated_mid_stream(kind: Kind) {
    const BLOCK: usize = 64 << 10;
    let Some(mut srv) = start("terminated_mid_stream", kind, 32 * MIB) else {
        return;
    };
    let client = client_of(&srv, ClientConfig::default()).await;
    let mut watch = client.watch_state(0).expect("connection 0");
    let ring = CompletionRing::new(512).unwrap();
    let reqs: Vec<_> = (0..384u64)
        .map(|i| {
            let data = Bytes::from(pattern(i, BLOCK));
            (
                i,
                Request::Write {
                    offset: i * BLOCK as u64,
                    data,
                    fua: false,
                },
            )
        })
        .collect();
    for (i, req) in reqs {
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    // terminate() blocks until the server exits: run it beside the engine.
    let term = tokio::task::spawn_blocking(move || {
        srv.terminate();
        srv
    });
    let (mut ok, mut shutdown, mut lost) = (0, 0, 0);
    while ok + shutdown + lost < 384 {
        within(
            "completions after SIGTERM",
            ring.ring_wait(ring.user_tail()),
        )
        .await;
        while let Some(e) = ring.pop() {
            match e.status {
                Ok(()) => ok += 1,
                Err(ClientError::Server {
                    errno: errno::ESHUTDOWN,
                    ..
                }) => shutdown += 1,
                Err(ClientError::ConnectionLost {
                    possibly_applied: true,
                    ..
                }) => lost += 1,
                Err(err) => panic!("{kind:?}: write {}: {err}", e.caller_data),
            }
        }
    }
    let _srv = within("server exit", term).await.expect("terminate");
    eprintln!("{kind:?} after SIGTERM: {ok} done, {shutdown} ESHUTDOWN, {lost} lost");
    within(
        "state Failed",
        watch.wait_for(|s| matches!(s, ConnState::Failed(_))),
    )
    .await
    .expect("watch");
    let later = client
        .read_at(0, 512)
        .now_or_never()
        .expect("fails at once");
    assert!(later.is_err(), "{later:?}");
}

macro_rules! per_server {
    ($($test:ident),* $(,)?) => {
        mod node {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Kind::Node).await
            })*
        }
        mod nbdkit {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Kind::Nbdkit).await
            })*
        }
        mod qemu {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Kind::Qemu).await
            })*
        }
    };
}

per_server!(
    round_trip,
    commands,
    many_in_flight,
    killed_mid_stream,
    terminated_mid_stream,
    multi_conn
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_on_real_servers() {
    for kind in [Kind::Node, Kind::Qemu] {
        let Some(srv) = start("unknown_export_on_real_servers", kind, MIB) else {
            continue;
        };
        let err = within(
            "connect",
            Client::connect(&srv.addr(), "nope", ClientConfig::default()),
        )
        .await
        .expect_err("no export named nope");
        match &err {
            ClientError::Handshake(msg) => assert!(msg.contains("nope"), "{kind:?}: {msg}"),
            other => panic!("{kind:?}: expected a handshake error, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_volume_refuses_writes_locally() {
    let Some(srv) = Server::start("read_only", Kind::Node, MIB, &["--volume", "ro0:1M:ro"]) else {
        return;
    };
    let client = connect(&srv.addr(), "ro0", ClientConfig::default()).await;
    assert!(client.info().read_only());
    let w = within("write", client.write(0, vec![1u8; 512], false)).await;
    assert!(matches!(w, Err(ClientError::Invalid(_))), "{w:?}");
    assert!(!w.unwrap_err().is_member_failure());
    let z = within("zeroes", client.write_zeroes(0, 512, false)).await;
    assert!(matches!(z, Err(ClientError::Invalid(_))), "{z:?}");
    assert_eq!(
        within("read", client.read_at(0, 512)).await.expect("read"),
        vec![0u8; 512]
    );
    assert_eq!(client.state(0), Some(ConnState::Ready));
}
