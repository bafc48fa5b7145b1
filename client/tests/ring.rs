//! The completion ring: sizes, empty and full rings, wrap-around,
//! immediate completions, the notification function, `ring_wait` racing
//! completions (async, multi-threaded and blocking), and no overflow under
//! concurrent submitters. The engine behind it is a real client talking to
//! the in-process fake server.

// A test that meets the unexpected should panic, loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nbdraid_client::{Client, ClientError, CompletionRing, Indirect, Request, RingEntry};

use common::fake::{Export, FakeServer};
use common::{connect, quick_config, within};
use nbdraid_harness::{assert_same, hang, pattern};

const BLOCK: usize = 4096;

/// A fake disk with known contents (block `i` holds `pattern(i, BLOCK)`), and a client of it.
async fn disk(blocks: usize) -> (FakeServer, Arc<Mutex<Vec<u8>>>, Arc<Client>) {
    let (srv, mem) = FakeServer::memory(Export {
        size: (blocks * BLOCK) as u64,
        ..Export::default()
    })
    .await;
    {
        let mut m = mem.lock().unwrap();
        for i in 0..blocks {
            m[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&pattern(i as u64, BLOCK));
        }
    }
    let client = connect(&srv.addr(), "", quick_config()).await;
    (srv, mem, Arc::new(client))
}

fn read_block(i: u64) -> Request {
    Request::Read {
        offset: i * BLOCK as u64,
        buf: vec![0; BLOCK].into(),
    }
}

/// Checks a completed read of block `caller_data`.
#[track_caller]
fn check_read(e: &RingEntry) {
    assert!(
        e.status.is_ok(),
        "read of block {} failed: {:?}",
        e.caller_data,
        e.status
    );
    let buf = e.buffer.as_ref().expect("a read hands its buffer back");
    assert_same(
        buf,
        &pattern(e.caller_data, BLOCK),
        &format!("block {}", e.caller_data),
    );
}

async fn pop_one(ring: &CompletionRing) -> RingEntry {
    let tail = ring.user_tail();
    within("ring_wait", ring.ring_wait(tail)).await;
    ring.pop()
        .expect("ring_wait returned, so an entry is past the tail")
}

#[test]
fn sizes_must_be_powers_of_two() {
    for bad in [0, 3, 6, 12, 1000, 1025] {
        match CompletionRing::new(bad) {
            Err(ClientError::Invalid(_)) => {}
            other => panic!("ring of {bad}: expected Invalid, got {other:?}"),
        }
    }
    for good in [1, 2, 64, 1024, 2048] {
        let r = CompletionRing::new(good).expect("power of two");
        assert_eq!(r.elements(), good);
    }
}

#[test]
fn a_new_ring_is_empty() {
    let ring = CompletionRing::new(8).unwrap();
    assert_eq!(ring.kernel_head(), ring.user_tail());
    assert_eq!(ring.kernel_head(), 0);
    assert!(ring.pop().is_none());
    assert_eq!(ring.outstanding(), 0);
    // Nothing will arrive: the blocking wait times out and says so.
    assert!(!ring.ring_wait_blocking(ring.user_tail(), Some(Duration::from_millis(20))));
}

#[tokio::test]
async fn one_completion_round_trip() {
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(4).unwrap();
    assert!(matches!(
        ring.indirect(&client, read_block(3), 3),
        Ok(Indirect::Pending)
    ));
    let e = pop_one(&ring).await;
    assert_eq!(e.caller_data, 3);
    check_read(&e);
    assert_eq!((ring.kernel_head(), ring.user_tail()), (1, 1));
    assert!(ring.pop().is_none(), "empty again");
    assert_eq!(ring.outstanding(), 0);
}

#[tokio::test]
async fn full_ring_refuses_and_hands_the_request_back() {
    let (srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(4).unwrap();
    for i in 0..4 {
        assert!(matches!(
            ring.indirect(&client, read_block(i), i),
            Ok(Indirect::Pending)
        ));
    }
    // Pending plus unconsumed == elements, whichever of the two they are now.
    assert_eq!(ring.outstanding(), 4);
    let refused = ring
        .indirect(
            &client,
            Request::Write {
                offset: 0,
                data: Bytes::from_static(b"x"),
                fua: false,
            },
            99,
        )
        .expect_err("a full ring refuses");
    assert!(
        matches!(refused.error, ClientError::RingFull(4)),
        "{:?}",
        refused.error
    );
    match refused.request {
        Request::Write {
            offset: 0,
            ref data,
            fua: false,
        } if &data[..] == b"x" => {}
        other => panic!("the request must come back untouched, got {other:?}"),
    }
    // Wait for all four to land: still full until the application pops.
    while ring.kernel_head() < 4 {
        within("completions", ring.ring_wait(ring.kernel_head())).await;
    }
    let mut seen = Vec::new();
    assert!(
        ring.indirect(&client, read_block(5), 5).is_err(),
        "entries not consumed yet"
    );
    assert_eq!(
        srv.requests(),
        4,
        "a refused request never reaches the server"
    );
    while let Some(e) = ring.pop() {
        check_read(&e);
        seen.push(e.caller_data);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    assert!(matches!(
        ring.indirect(&client, read_block(5), 5),
        Ok(Indirect::Pending)
    ));
    check_read(&pop_one(&ring).await);
}

#[tokio::test]
async fn indirect_wait_waits_for_a_pop() {
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(2).unwrap();
    for i in 0..2 {
        assert!(matches!(
            ring.indirect(&client, read_block(i), i),
            Ok(Indirect::Pending)
        ));
    }
    // Let both complete; the ring stays full until popped.
    while ring.kernel_head() < 2 {
        within("completions", ring.ring_wait(ring.kernel_head())).await;
    }
    let r2 = ring.clone();
    let c2 = client.clone();
    let waiter = tokio::spawn(async move { r2.indirect_wait(&c2, read_block(7), 7).await });
    // It must still be waiting: nothing was consumed (not a timing bound;
    // a wrongly returning waiter would be caught here most of the time).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "indirect_wait must wait while the ring is full"
    );
    assert_eq!(ring.outstanding(), 2);
    check_read(&ring.pop().expect("entry 0"));
    let got = within("indirect_wait after a pop", waiter)
        .await
        .expect("task");
    assert!(matches!(got, Indirect::Pending));
    let mut rest = vec![];
    while rest.len() < 2 {
        let e = pop_one(&ring).await;
        check_read(&e);
        rest.push(e.caller_data);
    }
    rest.sort();
    assert_eq!(rest, vec![1, 7]);
}

#[tokio::test]
async fn wrap_around_many_times() {
    const BLOCKS: u64 = 64;
    const OPS: u64 = 1000;
    let (_srv, _mem, client) = disk(BLOCKS as usize).await;
    let ring = CompletionRing::new(8).unwrap();
    let (mut next, mut done) = (0u64, 0u64);
    let mut last_head = 0;
    while done < OPS {
        while next < OPS {
            // caller_data = op number; the block is derived from it.
            match ring.indirect(&client, read_block(next % BLOCKS), next) {
                Ok(Indirect::Pending) => next += 1,
                Ok(Indirect::Done(e)) => panic!("a valid read completed at once: {e:?}"),
                Err(r) => {
                    assert!(matches!(r.error, ClientError::RingFull(8)));
                    break;
                }
            }
        }
        assert!(ring.outstanding() <= 8);
        let e = pop_one(&ring).await;
        assert!(
            ring.kernel_head() >= last_head,
            "kernel_head never goes back"
        );
        last_head = ring.kernel_head();
        assert!(ring.kernel_head() - ring.user_tail() <= 8);
        let block = e.caller_data % BLOCKS;
        assert!(e.status.is_ok(), "{:?}", e.status);
        assert_same(
            e.buffer.as_ref().unwrap(),
            &pattern(block, BLOCK),
            "wrapped entry",
        );
        done += 1;
    }
    assert_eq!(
        ring.kernel_head(),
        OPS,
        "indexes keep increasing past elements"
    );
    assert_eq!(ring.user_tail(), OPS);
    assert_eq!(ring.outstanding(), 0);
}

/// Requests that finish without being sent, and whether they succeed.
fn immediate_cases(size: u64) -> Vec<(Request, bool)> {
    vec![
        (
            Request::Read {
                offset: 0,
                buf: Vec::new().into(),
            },
            true,
        ),
        (
            Request::Write {
                offset: 4096,
                data: Bytes::new(),
                fua: false,
            },
            true,
        ),
        (Request::Trim { offset: 0, len: 0 }, true),
        (Request::Cache { offset: 0, len: 0 }, true),
        (
            Request::Read {
                offset: size,
                buf: vec![0; 1].into(),
            },
            false,
        ),
        (
            Request::Write {
                offset: size - 1,
                data: Bytes::from_static(b"ab"),
                fua: false,
            },
            false,
        ),
        (
            Request::Read {
                offset: u64::MAX,
                buf: vec![0; 2].into(),
            },
            false,
        ),
        (Request::BlockStatus { offset: 0, len: 0 }, false),
    ]
}

/// Submits every immediate case and checks each finished at once, took no
/// slot, and (for a READ) handed its buffer back.
fn submit_immediate_cases(ring: &CompletionRing, client: &Client) {
    let outstanding = ring.outstanding();
    for (i, (req, ok)) in immediate_cases(client.info().size).into_iter().enumerate() {
        let head = ring.kernel_head();
        let read_len = match &req {
            Request::Read { buf, .. } => Some(buf.len()),
            _ => None,
        };
        match ring.indirect(client, req, i as u64) {
            Ok(Indirect::Done(e)) => {
                assert_eq!(e.caller_data, i as u64);
                if ok {
                    assert!(e.status.is_ok(), "case {i}: {:?}", e.status);
                } else {
                    assert!(
                        matches!(e.status, Err(ClientError::Invalid(_))),
                        "case {i}: {:?}",
                        e.status
                    );
                }
                assert_eq!(
                    e.buffer.map(|b| b.len()),
                    read_len,
                    "case {i}: a READ's buffer comes back, failed or not"
                );
            }
            other => panic!("case {i}: expected Indirect::Done, got {other:?}"),
        }
        assert_eq!(ring.outstanding(), outstanding, "case {i} kept a slot");
        assert_eq!(ring.kernel_head(), head, "case {i} entered the ring");
    }
}

#[tokio::test]
async fn immediate_completions_do_not_take_a_slot() {
    let (srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(1).unwrap();
    submit_immediate_cases(&ring, &client);
    assert_eq!(srv.requests(), 0, "nothing was sent");
    // The single slot is still free for a real request.
    assert!(matches!(
        ring.indirect(&client, read_block(1), 1),
        Ok(Indirect::Pending)
    ));
    // Now the ring is full: what finishes at once still does, and only
    // what would need a slot is refused.
    submit_immediate_cases(&ring, &client);
    assert!(matches!(
        ring.indirect(&client, read_block(2), 2),
        Err(r) if matches!(r.error, ClientError::RingFull(1))
    ));
    match within(
        "indirect_wait on a full ring",
        ring.indirect_wait(&client, Request::Trim { offset: 0, len: 0 }, 7),
    )
    .await
    {
        Indirect::Done(e) => assert!(e.status.is_ok() && e.caller_data == 7),
        Indirect::Pending => panic!("a zero-length TRIM finishes at once"),
    }
    check_read(&pop_one(&ring).await);
    assert_eq!(srv.requests(), 1, "only the real read was sent");
}

#[tokio::test]
async fn notification_runs_once_per_completion() {
    let (_srv, _mem, client) = disk(32).await;
    let calls: Arc<Mutex<HashMap<u64, (usize, bool)>>> = Arc::default();
    let c2 = calls.clone();
    let ring = CompletionRing::with_notify(
        64,
        Box::new(move |data, status| {
            let mut m = c2.lock().unwrap();
            let e = m.entry(data).or_insert((0, status.is_ok()));
            e.0 += 1;
        }),
    )
    .unwrap();
    let size = client.info().size;
    let n = 200u64;
    let mut immediate = 0;
    let mut entries = Vec::new();
    for i in 0..n {
        // Every tenth request is invalid and completes at once: no notification for it.
        let req = if i % 10 == 9 {
            Request::Read {
                offset: size,
                buf: vec![0; 1].into(),
            }
        } else {
            read_block(i % 32)
        };
        // The only consumer is this task: when the ring is full, consume
        // (indirect_wait here would wait for a pop that never comes).
        let mut req = req;
        let started = loop {
            match ring.indirect(&client, req, i) {
                Ok(s) => break s,
                Err(r) => {
                    req = r.request;
                    entries.push(pop_one(&ring).await);
                }
            }
        };
        if let Indirect::Done(e) = started {
            assert!(e.status.is_err());
            immediate += 1;
        }
    }
    while entries.len() < (n - immediate) as usize {
        entries.push(pop_one(&ring).await);
    }
    assert_eq!(immediate, 20);
    let calls = calls.lock().unwrap();
    assert_eq!(
        calls.len(),
        entries.len(),
        "one notification per ring entry"
    );
    for e in &entries {
        let (count, ok) = calls.get(&e.caller_data).copied().unwrap_or_default();
        assert_eq!(
            count, 1,
            "caller_data {} notified {count} times",
            e.caller_data
        );
        assert_eq!(
            ok,
            e.status.is_ok(),
            "the notification saw the entry's status"
        );
        assert_ne!(
            e.caller_data % 10,
            9,
            "invalid requests never enter the ring"
        );
        assert_same(
            e.buffer.as_ref().unwrap(),
            &pattern(e.caller_data % 32, BLOCK),
            "notified read",
        );
    }
}

/// Many rounds of: note the tail, submit one op, wait on the noted tail.
/// The completion may land before, during or after `ring_wait` starts; a
/// lost wake-up shows as a hang.
async fn wait_race_rounds(client: &Client, ring: &CompletionRing, rounds: u64, tail_first: bool) {
    for i in 0..rounds {
        let tail = ring.user_tail();
        let req = read_block(i % 16);
        assert!(matches!(
            ring.indirect(client, req, i),
            Ok(Indirect::Pending)
        ));
        let wait_from = if tail_first { tail } else { ring.user_tail() };
        // Sometimes let the completion land first.
        if i % 3 == 0 {
            tokio::task::yield_now().await;
        }
        common::within_for(
            Duration::from_secs(10),
            &format!("ring_wait in round {i}"),
            ring.ring_wait(wait_from),
        )
        .await;
        let e = ring.pop().expect("entry");
        assert_eq!(e.caller_data, i);
    }
}

#[tokio::test]
async fn ring_wait_does_not_lose_wakeups_current_thread() {
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(2).unwrap();
    wait_race_rounds(&client, &ring, 2000, true).await;
    wait_race_rounds(&client, &ring, 1000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ring_wait_does_not_lose_wakeups_multi_thread() {
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(2).unwrap();
    // Completions land on other worker threads than the waiter's.
    let r2 = ring.clone();
    let c2 = client.clone();
    within(
        "waiter task",
        tokio::spawn(async move { wait_race_rounds(&c2, &r2, 3000, true).await }),
    )
    .await
    .expect("waiter task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_wait_blocking_from_a_std_thread() {
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(4).unwrap();
    let (r2, c2) = (ring.clone(), client.clone());
    // indirect() needs no runtime context; the engine runs on the runtime.
    let t = std::thread::spawn(move || {
        for i in 0..2000u64 {
            let tail = r2.user_tail();
            assert!(matches!(
                r2.indirect(&c2, read_block(i % 16), i),
                Ok(Indirect::Pending)
            ));
            assert!(
                r2.ring_wait_blocking(tail, Some(Duration::from_secs(10))),
                "hang in round {i}"
            );
            let e = r2.pop().expect("entry");
            assert_eq!(e.caller_data, i);
            check_read(&RingEntry {
                caller_data: i % 16,
                ..e
            });
        }
    });
    within("std thread", tokio::task::spawn_blocking(move || t.join()))
        .await
        .expect("join")
        .expect("the std thread panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_waiter_and_blocking_waiter_together() {
    // One std thread waits blocking while an async task waits too; both
    // must wake for the same completion.
    let (_srv, _mem, client) = disk(16).await;
    let ring = CompletionRing::new(8).unwrap();
    for round in 0..200u64 {
        let tail = ring.user_tail();
        let r2 = ring.clone();
        let blocking = std::thread::spawn(move || r2.ring_wait_blocking(tail, Some(hang(30))));
        let r3 = ring.clone();
        let asynch = tokio::spawn(async move { r3.ring_wait(tail).await });
        assert!(matches!(
            ring.indirect(&client, read_block(round % 16), round),
            Ok(Indirect::Pending)
        ));
        within("async waiter", asynch).await.expect("task");
        let woke = within(
            "blocking waiter",
            tokio::task::spawn_blocking(move || blocking.join()),
        )
        .await
        .expect("join")
        .expect("thread");
        assert!(woke, "blocking waiter timed out in round {round}");
        assert_eq!(ring.pop().expect("entry").caller_data, round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submitters_never_overflow() {
    const ELEMENTS: usize = 16;
    const PER_TASK: u64 = 400;
    const TASKS: u64 = 8;
    let (_srv, _mem, client) = disk(64).await;
    let ring = CompletionRing::new(ELEMENTS).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicUsize::new(0));

    // A sampler watching the invariants while everything runs.
    let sampler = {
        let (ring, client, stop, max_seen) =
            (ring.clone(), client.clone(), stop.clone(), max_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let out = ring.outstanding();
                assert!(out <= ELEMENTS, "outstanding {out} > {ELEMENTS}");
                let in_flight = client.in_flight();
                assert!(
                    in_flight <= ELEMENTS,
                    "{in_flight} requests in flight through a {ELEMENTS}-slot ring"
                );
                let (h, t) = ring.positions();
                assert!(h >= t && h - t <= ELEMENTS as u64, "head {h} tail {t}");
                max_seen.fetch_max(out, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    // Submitters: half refuse-and-retry, half indirect_wait.
    let mut subs = Vec::new();
    for t in 0..TASKS {
        let (ring, client) = (ring.clone(), client.clone());
        subs.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                let data = t * PER_TASK + k;
                let mut req = read_block(data % 64);
                if t % 2 == 0 {
                    loop {
                        match ring.indirect(&client, req, data) {
                            Ok(Indirect::Pending) => break,
                            Ok(Indirect::Done(e)) => panic!("completed at once: {e:?}"),
                            Err(r) => {
                                assert!(matches!(r.error, ClientError::RingFull(ELEMENTS)));
                                req = r.request;
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                } else {
                    assert!(matches!(
                        ring.indirect_wait(&client, req, data).await,
                        Indirect::Pending
                    ));
                }
            }
        }));
    }
    // Two consumers.
    let total = TASKS * PER_TASK;
    let popped = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let mut cons = Vec::new();
    for _ in 0..2 {
        let (ring, popped) = (ring.clone(), popped.clone());
        cons.push(tokio::spawn(async move {
            loop {
                if popped.lock().unwrap().len() as u64 >= total {
                    return;
                }
                let tail = ring.user_tail();
                let waited =
                    tokio::time::timeout(Duration::from_millis(20), ring.ring_wait(tail)).await;
                if waited.is_err() {
                    continue; // the other consumer may have taken it; look again
                }
                while let Some(e) = ring.pop() {
                    let data = e.caller_data;
                    check_read(&RingEntry {
                        caller_data: data % 64,
                        ..e
                    });
                    popped.lock().unwrap().push(data);
                }
            }
        }));
    }
    for s in subs {
        within("submitter", s).await.expect("submitter panicked");
    }
    for c in cons {
        within("consumer", c).await.expect("consumer panicked");
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("invariant violated");
    let mut got = popped.lock().unwrap().clone();
    got.sort();
    let want: Vec<u64> = (0..total).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "every completion popped exactly once"
    );
    assert_eq!(got, want, "no entry lost or duplicated");
    assert!(max_seen.load(Ordering::Relaxed) <= ELEMENTS);
    assert_eq!(ring.outstanding(), 0);
}
