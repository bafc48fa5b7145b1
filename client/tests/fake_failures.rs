//! Failure handling against the in-process fake server: deadlines and
//! stall detection, a server that hangs up with requests in flight,
//! reconnecting, a clean close, dropping the client, and submissions racing
//! a connection failure. Nothing may hang or panic; every request gets
//! exactly one completion.

// A test that meets the unexpected should panic, loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::join_all;
use nbdraid_client::{ClientConfig, ClientError, CompletionRing, ConnState, Indirect, Request};
use nbdraid_proto::consts::cmd;

use common::fake::{Export, FakeConn, FakeServer, answer};
use common::{connect, quick_config, within, within_for};
use nbdraid_harness::pattern;

const SHORT: Duration = Duration::from_millis(200);
/// Hang detector for operations that should end after a 200 ms deadline.
const DEADLINE_HANG: Duration = Duration::from_secs(10);

fn config(request: Option<Duration>, stall: Option<Duration>) -> ClientConfig {
    ClientConfig {
        request_timeout: request,
        stall_timeout: stall,
        ..quick_config()
    }
}

/// Submits 5 reads and 5 writes to a server that never answers and checks
/// that all of them fail with `Timeout(expected)`, the connection is seen
/// to fail, and later requests fail at once.
async fn stalled_server_times_out(config: ClientConfig, expected: Duration) {
    let srv = FakeServer::start(Export::default(), |c: FakeConn| c.stall()).await;
    let client = connect(&srv.addr(), "", config).await;
    let mut watch = client.watch_state(0).expect("connection 0");
    assert_eq!(*watch.borrow(), ConnState::Ready);
    let t0 = Instant::now();
    let reads = (0..5u64).map(|i| {
        client.submit(Request::Read {
            offset: i * 4096,
            buf: vec![0; 4096].into(),
        })
    });
    let writes = (0..5u64).map(|i| {
        client.submit(Request::Write {
            offset: i * 4096,
            data: Bytes::from(vec![1; 4096]),
            fua: false,
        })
    });
    let all = futures::future::join(join_all(reads), join_all(writes));
    let (r, w) = within_for(DEADLINE_HANG, "requests to a stalled server", all).await;
    let waited = t0.elapsed();
    for d in r.iter().chain(&w) {
        match &d.result {
            Err(e @ ClientError::Timeout(t)) => {
                assert_eq!(*t, expected);
                assert!(e.is_member_failure(), "a timeout is the member's failure");
            }
            other => panic!("expected Timeout({expected:?}), got {other:?}"),
        }
    }
    assert!(
        waited >= expected,
        "failed after {waited:?}, before the {expected:?} deadline"
    );
    within_for(
        DEADLINE_HANG,
        "state Failed",
        watch.wait_for(|s| matches!(s, ConnState::Failed(_))),
    )
    .await
    .expect("watch");
    assert!(!client.is_ready());
    assert_eq!(client.in_flight(), 0, "nothing left in flight");
    // Later submissions fail at once (no waiting for another deadline).
    let later = client
        .read_at(0, 512)
        .now_or_never()
        .expect("completes without waiting");
    assert!(
        matches!(
            later,
            Err(ClientError::ConnectionLost {
                possibly_applied: false,
                ..
            })
        ),
        "{later:?}"
    );
    let ring = CompletionRing::new(2).unwrap();
    match ring.indirect(&client, Request::Flush, 1) {
        Ok(Indirect::Done(e)) => assert!(e.status.is_err()),
        other => panic!("expected an immediate failure, got {other:?}"),
    }
    assert_eq!(ring.outstanding(), 0);
}

#[tokio::test]
async fn request_timeout_against_a_stalled_server() {
    stalled_server_times_out(config(Some(SHORT), None), SHORT).await;
}

#[tokio::test]
async fn stall_timeout_against_a_stalled_server() {
    stalled_server_times_out(config(None, Some(SHORT)), SHORT).await;
}

#[tokio::test]
async fn deadlines_reach_ring_entries() {
    let srv = FakeServer::start(Export::default(), |c: FakeConn| c.stall()).await;
    let client = connect(&srv.addr(), "", config(None, Some(SHORT))).await;
    let ring = CompletionRing::new(8).unwrap();
    for i in 0..8 {
        assert!(matches!(
            ring.indirect(
                &client,
                Request::Read {
                    offset: 0,
                    buf: vec![0; 512].into()
                },
                i
            ),
            Ok(Indirect::Pending)
        ));
    }
    let mut got = Vec::new();
    while got.len() < 8 {
        within_for(
            DEADLINE_HANG,
            "timed-out entries",
            ring.ring_wait(ring.user_tail()),
        )
        .await;
        while let Some(e) = ring.pop() {
            assert!(
                matches!(e.status, Err(ClientError::Timeout(_))),
                "{:?}",
                e.status
            );
            got.push(e.caller_data);
        }
    }
    got.sort();
    assert_eq!(got, (0..8).collect::<Vec<_>>());
    assert_eq!(ring.outstanding(), 0);
}

#[tokio::test]
async fn stall_after_some_progress() {
    // Answers the first 3 requests, then stops answering.
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| {
        let mem = mem.clone();
        async move {
            let mut n = 0;
            while let Some(r) = c.recv().await {
                n += 1;
                if n <= 3 {
                    let a = answer(&mem, &r);
                    let _ = c.reply(&r, a).await;
                }
            }
        }
    })
    .await;
    let client = connect(&srv.addr(), "", config(None, Some(SHORT))).await;
    for i in 0..3 {
        within("answered read", client.read_at(i * 512, 512))
            .await
            .expect("answered");
    }
    let r = within_for(DEADLINE_HANG, "unanswered read", client.read_at(0, 512)).await;
    assert!(
        matches!(r, Err(ClientError::Timeout(t)) if t == SHORT),
        "{:?}",
        r.map(|b| b.len())
    );
}

#[tokio::test]
async fn a_slow_server_making_progress_is_not_failed() {
    // One reply every 10 ms; 60 requests outstanding take ~600 ms, longer
    // than the 300 ms stall timeout, but progress never stops for long.
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| {
        let mem = mem.clone();
        async move {
            while let Some(r) = c.recv().await {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let a = answer(&mem, &r);
                if c.reply(&r, a).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let stall = Duration::from_millis(300);
    let client = connect(&srv.addr(), "", config(None, Some(stall))).await;
    let t0 = Instant::now();
    let reads = (0..60u64).map(|i| client.read_at(i * 512, 512));
    for r in within("slow reads", join_all(reads)).await {
        r.expect("a slow but live server is not failed");
    }
    if t0.elapsed() < stall {
        eprintln!("note: the slow server was faster than the stall timeout; test inconclusive");
    }
    assert_eq!(client.state(0), Some(ConnState::Ready));
}

/// A server whose first connection takes `take` requests and hangs up
/// without answering; later connections serve memory normally.
async fn hangs_up_once(take: usize) -> FakeServer {
    let conns = Arc::new(AtomicUsize::new(0));
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    FakeServer::start(Export::default(), move |mut c: FakeConn| {
        let first = conns.fetch_add(1, Ordering::SeqCst) == 0;
        let mem = mem.clone();
        async move {
            if first {
                for _ in 0..take {
                    if c.recv().await.is_none() {
                        return;
                    }
                }
                // Dropping the connection closes the socket.
            } else {
                c.serve_memory(mem).await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn server_hangs_up_with_requests_in_flight_then_reconnect() {
    let srv = hangs_up_once(16).await;
    let client = connect(&srv.addr(), "", config(None, None)).await;
    let mut watch = client.watch_state(0).expect("connection 0");
    let ring = CompletionRing::new(16).unwrap();
    // caller_data: even = write, odd = read.
    for i in 0..16u64 {
        let req = if i % 2 == 0 {
            Request::Write {
                offset: i * 4096,
                data: Bytes::from(pattern(i, 4096)),
                fua: false,
            }
        } else {
            Request::Read {
                offset: i * 4096,
                buf: vec![0; 4096].into(),
            }
        };
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    let mut n = 0;
    while n < 16 {
        within("failed entries", ring.ring_wait(ring.user_tail())).await;
        while let Some(e) = ring.pop() {
            n += 1;
            let write = e.caller_data % 2 == 0;
            match &e.status {
                Err(
                    err @ ClientError::ConnectionLost {
                        possibly_applied, ..
                    },
                ) => {
                    assert_eq!(*possibly_applied, write, "op {}: {err}", e.caller_data);
                    assert!(err.is_member_failure());
                }
                other => panic!(
                    "op {}: expected ConnectionLost, got {other:?}",
                    e.caller_data
                ),
            }
        }
    }
    within(
        "state Failed",
        watch.wait_for(|s| matches!(s, ConnState::Failed(_))),
    )
    .await
    .expect("watch");
    let later = client
        .write(0, vec![1u8; 512], false)
        .now_or_never()
        .expect("fails at once");
    assert!(
        matches!(
            later,
            Err(ClientError::ConnectionLost {
                possibly_applied: false,
                ..
            })
        ),
        "{later:?}"
    );

    within("reconnect", client.reconnect())
        .await
        .expect("reconnect");
    assert!(client.is_ready());
    assert_eq!(client.state(0), Some(ConnState::Ready));
    let data = pattern(77, 8192);
    within("write", client.write(8192, data.clone(), true))
        .await
        .expect("write after reconnect");
    assert_eq!(
        within("read", client.read_at(8192, 8192))
            .await
            .expect("read"),
        data
    );
    assert_eq!(
        *client.watch_state(0).expect("new connection").borrow(),
        ConnState::Ready
    );
}

#[tokio::test]
async fn reconnect_completes_requests_on_the_old_connection() {
    let srv = FakeServer::start(Export::default(), |c: FakeConn| c.stall()).await;
    let client = connect(&srv.addr(), "", config(None, None)).await;
    let ring = CompletionRing::new(4).unwrap();
    for i in 0..4 {
        assert!(matches!(
            ring.indirect(
                &client,
                Request::Read {
                    offset: 0,
                    buf: vec![0; 512].into()
                },
                i
            ),
            Ok(Indirect::Pending)
        ));
    }
    let mut old = client.watch_state(0).expect("connection 0");
    assert_eq!(*old.borrow_and_update(), ConnState::Ready);
    within("reconnect", client.reconnect())
        .await
        .expect("reconnect");
    // A watch follows one connection: it reports the old one closed, then
    // ends; the new connection has a watch of its own.
    assert_eq!(*old.borrow_and_update(), ConnState::Closed);
    within("the old watch ends", async {
        while old.changed().await.is_ok() {}
    })
    .await;
    assert_eq!(
        *client.watch_state(0).expect("new connection").borrow(),
        ConnState::Ready
    );
    let mut n = 0;
    while n < 4 {
        within(
            "entries of the old connection",
            ring.ring_wait(ring.user_tail()),
        )
        .await;
        while let Some(e) = ring.pop() {
            assert!(e.status.is_err(), "{:?}", e.status);
            n += 1;
        }
    }
}

#[tokio::test]
async fn dropping_the_client_completes_everything() {
    let srv = FakeServer::start(Export::default(), |c: FakeConn| c.stall()).await;
    let client = connect(&srv.addr(), "", config(None, None)).await;
    let ring = CompletionRing::new(8).unwrap();
    for i in 0..8 {
        assert!(matches!(
            ring.indirect(
                &client,
                Request::Read {
                    offset: 0,
                    buf: vec![0; 512].into()
                },
                i
            ),
            Ok(Indirect::Pending)
        ));
    }
    drop(client);
    let mut n = 0;
    while n < 8 {
        within("entries after drop", ring.ring_wait(ring.user_tail())).await;
        while let Some(e) = ring.pop() {
            assert!(
                matches!(e.status, Err(ClientError::Closed)),
                "{:?}",
                e.status
            );
            n += 1;
        }
    }
    assert_eq!(ring.outstanding(), 0);
}

#[tokio::test]
async fn close_finishes_in_flight_work_and_stays_closed() {
    let done = Arc::new(AtomicBool::new(false));
    let saw_disc = Arc::new(AtomicBool::new(false));
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    let (d2, s2) = (done.clone(), saw_disc.clone());
    let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| {
        let (d2, s2, mem) = (d2.clone(), s2.clone(), mem.clone());
        async move {
            while let Some(r) = c.recv().await {
                // Slow enough that close() finds work in flight.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let a = answer(&mem, &r);
                let _ = c.reply(&r, a).await;
            }
            s2.store(true, Ordering::SeqCst);
            d2.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let client = Arc::new(connect(&srv.addr(), "", config(None, None)).await);
    let c2 = client.clone();
    let write = tokio::spawn(async move { c2.write(0, vec![5u8; 4096], false).await });
    tokio::task::yield_now().await;
    within("close", client.close(Duration::from_secs(10))).await;
    within("write finished before close", write)
        .await
        .expect("task")
        .expect("the write completed");
    within("server sees the disconnect", async {
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(saw_disc.load(Ordering::SeqCst));
    assert!(
        srv.log
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.command == cmd::DISC),
        "NBD_CMD_DISC was sent"
    );
    // The server closing its end after DISC is not a failure.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(client.state(0), Some(ConnState::Closed));
    let later = within("request after close", client.read_at(0, 512)).await;
    assert!(
        matches!(later, Err(ClientError::Closed)),
        "a closed client refuses work: {later:?}"
    );
    assert!(!client.is_ready());
}

/// Submitters race a connection failure: every submission that was
/// accepted as pending must produce exactly one ring entry, and no slot
/// may leak. A lost completion shows as a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submissions_racing_a_failure_always_complete() {
    for round in 0..100u64 {
        // Fewer than the ring's 64 slots, so the server gets them all.
        let take = 1 + (round as usize * 37) % 60;
        let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| async move {
            for _ in 0..take {
                if c.recv().await.is_none() {
                    return;
                }
            }
        })
        .await;
        let client = Arc::new(connect(&srv.addr(), "", config(None, None)).await);
        let ring = CompletionRing::new(64).unwrap();
        let pending = Arc::new(AtomicU64::new(0));
        let mut subs = Vec::new();
        for t in 0..4u64 {
            let (ring, client, pending) = (ring.clone(), client.clone(), pending.clone());
            subs.push(tokio::spawn(async move {
                for k in 0.. {
                    let req = Request::Read {
                        offset: (k % 64) * 512,
                        buf: vec![0; 512].into(),
                    };
                    match ring.indirect(&client, req, t << 32 | k) {
                        Ok(Indirect::Pending) => {
                            pending.fetch_add(1, Ordering::SeqCst);
                        }
                        // Failed at once: the connection is known dead.
                        Ok(Indirect::Done(e)) => {
                            assert!(e.status.is_err());
                            return;
                        }
                        Err(_) => tokio::task::yield_now().await, // full: let the consumer run
                    }
                }
            }));
        }
        let consumer = {
            let (ring, pending) = (ring.clone(), pending.clone());
            let subs_done = Arc::new(AtomicBool::new(false));
            let sd = subs_done.clone();
            let h = tokio::spawn(async move {
                let mut popped = 0u64;
                loop {
                    while let Some(e) = ring.pop() {
                        assert!(e.status.is_err(), "nothing was answered: {:?}", e.status);
                        popped += 1;
                    }
                    if sd.load(Ordering::SeqCst) && popped == pending.load(Ordering::SeqCst) {
                        return popped;
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_millis(5),
                        ring.ring_wait(ring.user_tail()),
                    )
                    .await;
                }
            });
            (h, subs_done)
        };
        for s in subs {
            within(&format!("submitters, round {round}"), s)
                .await
                .expect("submitter panicked");
        }
        consumer.1.store(true, Ordering::SeqCst);
        let popped = within(
            &format!("every pending op completes, round {round}"),
            consumer.0,
        )
        .await
        .expect("consumer panicked");
        assert_eq!(popped, pending.load(Ordering::SeqCst));
        assert_eq!(ring.outstanding(), 0, "round {round}: a slot leaked");
    }
}
