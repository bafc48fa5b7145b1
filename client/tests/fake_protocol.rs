//! Protocol behaviour against the in-process fake server: completions out
//! of order, error classification, client-side validation, handshake
//! fallbacks, multi-conn, block-size limits, and replies that break the
//! protocol (which must fail the connection cleanly, never panic or hang).

// A test that meets the unexpected should panic, loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::join_all;
use nbdraid_client::{
    Client, ClientConfig, ClientError, CompletionRing, ConnState, Indirect, Request,
};
use nbdraid_proto::consts::{cmd, errno, reply, transmission_flags as tf};

use common::fake::{Answer, Export, FakeConn, FakeServer, answer, block_status_payload};
use common::{connect, quick_config, within, within_for};
use nbdraid_harness::{assert_same, pattern};

const BLOCK: usize = 4096;

/// A config whose only hang protection is the test's own detector, so a
/// request the client loses shows up as a hang instead of a timeout.
fn no_deadlines() -> ClientConfig {
    ClientConfig {
        request_timeout: None,
        stall_timeout: None,
        ..quick_config()
    }
}

fn filled_memory(blocks: usize) -> Arc<Mutex<Vec<u8>>> {
    let mut m = vec![0u8; blocks * BLOCK];
    for i in 0..blocks {
        m[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&pattern(i as u64, BLOCK));
    }
    Arc::new(Mutex::new(m))
}

/// A server that waits for `batch` requests, applies them in arrival
/// order, then answers them in reverse order.
async fn reversing_server(export: Export, mem: Arc<Mutex<Vec<u8>>>, batch: usize) -> FakeServer {
    FakeServer::start(export, move |mut c: FakeConn| {
        let mem = mem.clone();
        async move {
            loop {
                let mut reqs = Vec::new();
                while reqs.len() < batch {
                    match c.recv().await {
                        Some(r) => reqs.push(r),
                        None => return,
                    }
                }
                let answers: Vec<_> = reqs.iter().map(|r| answer(&mem, r)).collect();
                for (r, a) in reqs.iter().zip(answers).rev() {
                    if c.reply(r, a).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

async fn out_of_order_ring(structured: bool) {
    const N: u64 = 64;
    let mem = filled_memory(2 * N as usize);
    let export = Export {
        size: 2 * N * BLOCK as u64,
        structured,
        ..Export::default()
    };
    let srv = reversing_server(export, mem.clone(), N as usize).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    assert_eq!(client.info().structured, structured);
    let ring = CompletionRing::new(64).unwrap();
    // Reads of blocks 0..N/2 and writes to blocks N..N+N/2, interleaved.
    for i in 0..N {
        let req = if i % 2 == 0 {
            Request::Read {
                offset: i * BLOCK as u64,
                buf: vec![0xEE; BLOCK].into(),
            }
        } else {
            let data = Bytes::from(pattern(1000 + i, BLOCK));
            Request::Write {
                offset: (N + i) * BLOCK as u64,
                data,
                fua: false,
            }
        };
        assert!(matches!(
            ring.indirect(&client, req, i),
            Ok(Indirect::Pending)
        ));
    }
    let mut order = Vec::new();
    while order.len() < N as usize {
        let tail = ring.user_tail();
        within("completions", ring.ring_wait(tail)).await;
        while let Some(e) = ring.pop() {
            assert!(e.status.is_ok(), "op {}: {:?}", e.caller_data, e.status);
            if e.caller_data % 2 == 0 {
                let buf = e.buffer.expect("read buffer");
                assert_same(
                    &buf,
                    &pattern(e.caller_data, BLOCK),
                    &format!("read {}", e.caller_data),
                );
            } else {
                assert!(e.buffer.is_none());
            }
            order.push(e.caller_data);
        }
    }
    let want: Vec<u64> = (0..N).rev().collect();
    assert_eq!(
        order, want,
        "completions arrive in the server's (reverse) order"
    );
    let m = mem.lock().unwrap();
    for i in (1..N).step_by(2) {
        let at = ((N + i) as usize) * BLOCK;
        assert_same(
            &m[at..at + BLOCK],
            &pattern(1000 + i, BLOCK),
            "written block",
        );
    }
}

#[tokio::test]
async fn out_of_order_simple_replies_reach_the_right_caller() {
    out_of_order_ring(false).await;
}

#[tokio::test]
async fn out_of_order_structured_replies_reach_the_right_caller() {
    out_of_order_ring(true).await;
}

#[tokio::test]
async fn out_of_order_async_api() {
    const N: usize = 200;
    let mem = filled_memory(N);
    let export = Export {
        size: (N * BLOCK) as u64,
        ..Export::default()
    };
    let srv = reversing_server(export, mem, N).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    // join_all polls every future once before any reply can arrive: all N are in flight.
    let reads = (0..N).map(|i| client.read_at((i * BLOCK) as u64, BLOCK));
    let results = within("200 reads", join_all(reads)).await;
    for (i, r) in results.into_iter().enumerate() {
        let buf = r.unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert_same(&buf, &pattern(i as u64, BLOCK), &format!("read {i}"));
    }
}

/// Structured chunks of different requests interleaved: first halves in
/// order, second halves (data or holes) in reverse, then the DONE chunks.
#[tokio::test]
async fn interleaved_structured_chunks() {
    const N: usize = 16;
    const LEN: usize = 2 * BLOCK;
    let mem = filled_memory(2 * N);
    // Odd requests have a hole in their second half.
    {
        let mut m = mem.lock().unwrap();
        for i in (1..N).step_by(2) {
            let at = i * LEN + BLOCK;
            m[at..at + BLOCK].fill(0);
        }
    }
    let m2 = mem.clone();
    let srv = FakeServer::start(
        Export {
            size: (2 * N * BLOCK) as u64,
            ..Export::default()
        },
        move |mut c: FakeConn| {
            let mem = m2.clone();
            async move {
                let mut reqs = Vec::new();
                while reqs.len() < N {
                    let Some(r) = c.recv().await else { return };
                    reqs.push(r);
                }
                let data = |off: u64| {
                    let m = mem.lock().unwrap();
                    m[off as usize..off as usize + BLOCK].to_vec()
                };
                for r in &reqs {
                    let off = r.hdr.offset;
                    c.send_data_chunk(r.hdr.cookie, off, &data(off), false)
                        .await
                        .unwrap();
                }
                for (k, r) in reqs.iter().enumerate().rev() {
                    let off = r.hdr.offset + BLOCK as u64;
                    if k % 2 == 1 {
                        let mut p = off.to_be_bytes().to_vec();
                        p.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                        c.send_chunk(r.hdr.cookie, 0, reply::TYPE_OFFSET_HOLE, &p)
                            .await
                            .unwrap();
                    } else {
                        c.send_data_chunk(r.hdr.cookie, off, &data(off), false)
                            .await
                            .unwrap();
                    }
                }
                for k in [5, 0, 15, 3, 8, 1, 14, 2, 9, 4, 13, 6, 12, 7, 11, 10] {
                    c.send_chunk(reqs[k].hdr.cookie, reply::FLAG_DONE, reply::TYPE_NONE, &[])
                        .await
                        .unwrap();
                }
                std::future::pending::<()>().await;
            }
        },
    )
    .await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    // Buffers start as garbage: holes must be zeroed by the client.
    let reads = (0..N).map(|i| client.read((i * LEN) as u64, vec![0xEE; LEN]));
    let results = within("interleaved reads", join_all(reads)).await;
    let m = mem.lock().unwrap();
    for (i, r) in results.into_iter().enumerate() {
        let buf = r.unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert_same(&buf, &m[i * LEN..(i + 1) * LEN], &format!("read {i}"));
    }
}

/// A server that answers every request with the errno chosen by its block number.
async fn errno_server(structured: bool, errnos: &'static [u32]) -> FakeServer {
    let export = Export {
        size: (errnos.len() * BLOCK) as u64,
        structured,
        ..Export::default()
    };
    FakeServer::start(export, move |mut c: FakeConn| async move {
        while let Some(r) = c.recv().await {
            let e = errnos[(r.hdr.offset / BLOCK as u64) as usize];
            let a = if e == 0 {
                Answer::Ok
            } else {
                Answer::Err(e, format!("injected errno {e}"))
            };
            if c.reply(&r, a).await.is_err() {
                return;
            }
        }
    })
    .await
}

async fn classification(structured: bool) {
    // (errno, is a member failure)
    const CASES: &[(u32, bool)] = &[
        (errno::EINVAL, false),
        (errno::ENOSPC, false),
        (errno::EPERM, false),
        (errno::EOVERFLOW, false),
        (errno::ENOTSUP, false),
        (errno::EIO, true),
        (errno::ENOMEM, true),
    ];
    const ERRNOS: &[u32] = &[22, 28, 1, 75, 95, 5, 12];
    assert_eq!(CASES.iter().map(|c| c.0).collect::<Vec<_>>(), ERRNOS);
    let srv = errno_server(structured, ERRNOS).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    for (k, &(e, member)) in CASES.iter().enumerate() {
        let off = (k * BLOCK) as u64;
        let r = within("write", client.write(off, vec![1u8; 512], false)).await;
        match &r {
            Err(ClientError::Server {
                errno: got,
                message,
            }) => {
                assert_eq!(*got, e);
                if structured {
                    assert_eq!(
                        message,
                        &format!("injected errno {e}"),
                        "the server's message is kept"
                    );
                }
            }
            other => panic!("errno {e}: expected a server error, got {other:?}"),
        }
        let err = r.unwrap_err();
        assert_eq!(err.is_member_failure(), member, "errno {e} ({err})");
        assert_eq!(err.errno(), e);
        // Reads get the same treatment (structured: an error chunk).
        let r = within("read", client.read_at(off, 512)).await;
        assert!(
            matches!(r, Err(ClientError::Server { errno: got, .. }) if got == e),
            "{r:?}"
        );
        // An error reply is not a connection failure.
        assert_eq!(client.state(0), Some(ConnState::Ready), "after errno {e}");
    }
}

#[tokio::test]
async fn server_errnos_are_classified_simple_replies() {
    classification(false).await;
}

#[tokio::test]
async fn server_errnos_are_classified_structured_replies() {
    classification(true).await;
}

#[tokio::test]
async fn caller_mistakes_fail_locally_and_send_nothing() {
    let size = 64 * BLOCK as u64;
    let export = Export {
        size,
        block_size: Some((512, 4096, 1 << 20)),
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let mistakes: Vec<(&str, Request)> = vec![
        (
            "read past the end",
            Request::Read {
                offset: size - 512,
                buf: vec![0; 1024].into(),
            },
        ),
        (
            "read at the end",
            Request::Read {
                offset: size,
                buf: vec![0; 512].into(),
            },
        ),
        (
            "read overflowing u64",
            Request::Read {
                offset: u64::MAX - 511,
                buf: vec![0; 1024].into(),
            },
        ),
        (
            "write past the end",
            Request::Write {
                offset: size,
                data: Bytes::from(vec![0; 512]),
                fua: false,
            },
        ),
        (
            "trim past the end",
            Request::Trim {
                offset: 0,
                len: size + 512,
            },
        ),
        (
            "zeroes past the end",
            Request::WriteZeroes {
                offset: size - 512,
                len: 1024,
                no_hole: false,
                fast: false,
                fua: false,
            },
        ),
        (
            "cache past the end",
            Request::Cache {
                offset: size,
                len: 512,
            },
        ),
        (
            "block status past the end",
            Request::BlockStatus {
                offset: size,
                len: 512,
            },
        ),
        (
            "block status of nothing",
            Request::BlockStatus { offset: 0, len: 0 },
        ),
        (
            "unaligned offset",
            Request::Read {
                offset: 100,
                buf: vec![0; 512].into(),
            },
        ),
        (
            "unaligned length",
            Request::Write {
                offset: 0,
                data: Bytes::from(vec![0; 100]),
                fua: false,
            },
        ),
        (
            "unaligned trim",
            Request::Trim {
                offset: 512,
                len: 1000,
            },
        ),
    ];
    for (what, req) in mistakes {
        let d = within(what, client.submit(req)).await;
        match d.result {
            Err(e @ ClientError::Invalid(_)) => {
                assert!(
                    !e.is_member_failure(),
                    "{what}: a caller's mistake is not a member failure"
                );
                assert_eq!(e.errno(), errno::EINVAL);
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(srv.requests(), 0, "no invalid request reached the server");
    // Still perfectly usable.
    client
        .write(0, vec![7u8; 512], false)
        .await
        .expect("valid write");
    assert_eq!(client.read_at(0, 512).await.expect("read"), vec![7u8; 512]);
}

#[tokio::test]
async fn unsupported_commands_fail_locally_and_send_nothing() {
    // Read-only, no FLUSH/FUA/WRITE_ZEROES/TRIM/CACHE, no structured replies.
    let export = Export {
        flags: tf::READ_ONLY,
        structured: false,
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let info = client.info();
    assert!(info.read_only() && !info.structured && info.allocation_context.is_none());
    let zeroes = |fast, fua| Request::WriteZeroes {
        offset: 0,
        len: 512,
        no_hole: false,
        fast,
        fua,
    };
    let refused: Vec<(&str, Request)> = vec![
        (
            "write on a read-only export",
            Request::Write {
                offset: 0,
                data: Bytes::from_static(b"x"),
                fua: false,
            },
        ),
        (
            "trim on a read-only export",
            Request::Trim {
                offset: 0,
                len: 512,
            },
        ),
        ("zeroes on a read-only export", zeroes(false, false)),
        ("flush without SEND_FLUSH", Request::Flush),
        (
            "block status without base:allocation",
            Request::BlockStatus {
                offset: 0,
                len: 512,
            },
        ),
    ];
    for (what, req) in refused {
        let d = within(what, client.submit(req)).await;
        assert!(
            matches!(d.result, Err(ClientError::Invalid(_))),
            "{what}: {:?}",
            d.result
        );
    }
    // CACHE is advisory: without SEND_CACHE it succeeds without being sent.
    within("cache", client.cache(0, 512))
        .await
        .expect("advisory cache");
    assert_eq!(srv.requests(), 0);

    // Writable, but without FUA, WRITE_ZEROES or FAST_ZERO.
    let export = Export {
        flags: tf::SEND_TRIM,
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let refused: Vec<(&str, Request)> = vec![
        (
            "FUA without SEND_FUA",
            Request::Write {
                offset: 0,
                data: Bytes::from_static(b"x"),
                fua: true,
            },
        ),
        ("zeroes without SEND_WRITE_ZEROES", zeroes(false, false)),
        ("fast zeroes without SEND_FAST_ZERO", zeroes(true, false)),
    ];
    for (what, req) in refused {
        let d = within(what, client.submit(req)).await;
        assert!(
            matches!(d.result, Err(ClientError::Invalid(_))),
            "{what}: {:?}",
            d.result
        );
    }
    assert_eq!(srv.requests(), 0);
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name() {
    for no_zeroes in [true, false] {
        let export = Export {
            go: false,
            no_zeroes,
            size: 3 << 20,
            ..Export::default()
        };
        let (srv, mem) = FakeServer::memory(export).await;
        let client = connect(&srv.addr(), "vol", no_deadlines()).await;
        let info = client.info();
        assert!(info.used_export_name, "fell back to NBD_OPT_EXPORT_NAME");
        assert_eq!(info.size, 3 << 20);
        assert!(info.has(tf::SEND_FLUSH) && info.has(tf::SEND_TRIM));
        assert_eq!(info.allocation_context, None, "no meta context without GO");
        let data = pattern(no_zeroes as u64, 10_000);
        within("write", client.write(12_345, data.clone(), false))
            .await
            .expect("write");
        within("flush", client.flush()).await.expect("flush");
        assert_same(
            &within("read", client.read_at(12_345, 10_000))
                .await
                .expect("read"),
            &data,
            "after fallback",
        );
        assert_same(&mem.lock().unwrap()[12_345..22_345], &data, "server memory");
        let bs = within("block status", client.block_status(0, 4096)).await;
        assert!(matches!(bs, Err(ClientError::Invalid(_))), "{bs:?}");
    }
}

#[tokio::test]
async fn unknown_export_is_a_clear_handshake_error() {
    let export = Export {
        names: vec!["vol0".into()],
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let err = within(
        "connect",
        Client::connect(&srv.addr(), "nope", no_deadlines()),
    )
    .await
    .expect_err("unknown export");
    match &err {
        ClientError::Handshake(msg) => {
            assert!(msg.contains("nope"), "names the export: {msg}");
            assert!(msg.contains("unknown export"), "says why: {msg}");
            assert!(
                msg.contains("no export named"),
                "carries the server's message: {msg}"
            );
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
    // The right name works on the same server.
    connect(&srv.addr(), "vol0", no_deadlines()).await;

    // Over EXPORT_NAME the server can only hang up.
    let export = Export {
        names: vec!["vol0".into()],
        go: false,
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let err = within(
        "connect",
        Client::connect(&srv.addr(), "nope", no_deadlines()),
    )
    .await
    .expect_err("unknown export");
    assert!(
        matches!(&err, ClientError::Handshake(m) if m.contains("nope")),
        "{err:?}"
    );
}

#[tokio::test]
async fn multi_conn_only_when_advertised() {
    for (flags, want) in [(0, 1), (tf::CAN_MULTI_CONN, 4)] {
        let export = Export {
            flags: flags | tf::SEND_FLUSH,
            ..Export::default()
        };
        let (srv, mem) = FakeServer::memory(export).await;
        let config = ClientConfig {
            connections: 4,
            ..no_deadlines()
        };
        let client = connect(&srv.addr(), "", config).await;
        assert_eq!(client.connections(), want, "flags {flags:#x}");
        assert_eq!(
            srv.negotiated.load(Ordering::SeqCst),
            want,
            "connections the server saw"
        );
        assert_eq!(srv.accepted.load(Ordering::SeqCst), want);
        for i in 0..want {
            assert_eq!(client.state(i), Some(ConnState::Ready));
        }
        // Writes spread over the connections all land.
        let writes = (0..32u64).map(|i| client.write(i * 512, vec![i as u8; 512], false));
        for r in within("writes", join_all(writes)).await {
            r.expect("write");
        }
        within("flush", client.flush()).await.expect("flush");
        let m = mem.lock().unwrap();
        for i in 0..32usize {
            assert!(m[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8));
        }
    }
}

#[tokio::test]
async fn requests_honour_advertised_block_sizes() {
    // Legal per the spec: the maximum need not be a power of two, only at
    // least the preferred size; every request must still be a multiple of
    // the minimum.
    let export = Export {
        size: 1 << 20,
        block_size: Some((512, 512, 1000)),
        ..Export::default()
    };
    let (srv, mem) = FakeServer::memory(export).await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let info = client.info();
    assert_eq!(info.min_block, 512);
    let data = pattern(5, 8192);
    within("write", client.write(4096, data.clone(), false))
        .await
        .expect("split write");
    let back = within("read", client.read_at(4096, 8192))
        .await
        .expect("split read");
    assert_same(&back, &data, "split round trip");
    assert_same(
        &mem.lock().unwrap()[4096..4096 + 8192],
        &data,
        "server memory",
    );
    for h in srv.log.lock().unwrap().iter() {
        if h.command == cmd::READ || h.command == cmd::WRITE {
            assert!(h.length <= 1000, "{h:?} exceeds the maximum payload");
            assert_eq!(
                h.length % 512,
                0,
                "{h:?} is not a multiple of the minimum block size"
            );
            assert_eq!(h.offset % 512, 0, "{h:?} is not aligned");
        }
    }
}

#[tokio::test]
async fn nonsensical_block_sizes_never_panic() {
    for bs in [
        (512, 4096, 0),
        (3, 4096, 1 << 20),
        (4096, 512, 1 << 20),
        (1 << 20, 1 << 20, 1 << 22),
        (0, 0, 0),
    ] {
        let export = Export {
            size: 1 << 20,
            block_size: Some(bs),
            ..Export::default()
        };
        let (srv, _mem) = FakeServer::memory(export).await;
        match within("connect", Client::connect(&srv.addr(), "", no_deadlines())).await {
            Err(ClientError::Handshake(_)) => {}
            Err(e) => panic!("block sizes {bs:?}: unexpected error {e}"),
            Ok(client) => {
                // Accepted (only the preferred size, a hint, was bad): I/O works.
                let r = within("read", client.read_at(0, 8192)).await;
                let w = within("write", client.write(0, vec![1u8; 8192], false)).await;
                assert!(r.is_ok() && w.is_ok(), "block sizes {bs:?}: {w:?}");
            }
        }
    }
}

/// A server that waits for 4 requests, answers the first with ESHUTDOWN
/// and the others normally (a server finishing its in-flight work), then
/// keeps serving until the client disconnects; reports when it does.
async fn shutting_down_server() -> (FakeServer, Arc<AtomicBool>) {
    let hung_up = Arc::new(AtomicBool::new(false));
    let h2 = hung_up.clone();
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
    let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| {
        let (h2, mem) = (h2.clone(), mem.clone());
        async move {
            let mut batch = Vec::new();
            while batch.len() < 4 {
                let Some(r) = c.recv().await else { return };
                batch.push(r);
            }
            for (k, r) in batch.iter().enumerate() {
                let a = if k == 0 {
                    Answer::Err(errno::ESHUTDOWN, "going away".into())
                } else {
                    answer(&mem, r)
                };
                c.reply(r, a).await.unwrap();
            }
            while let Some(r) = c.recv().await {
                let a = answer(&mem, &r);
                if c.reply(&r, a).await.is_err() {
                    break;
                }
            }
            h2.store(true, Ordering::SeqCst);
        }
    })
    .await;
    (srv, hung_up)
}

#[tokio::test]
async fn eshutdown_makes_the_client_disconnect_softly() {
    // The spec: a client that receives ESHUTDOWN MUST initiate a soft
    // disconnect (NBD_CMD_DISC), so replies to requests in flight still count.
    let (srv, hung_up) = shutting_down_server().await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let mut watch = client.watch_state(0).expect("connection 0");
    let reads = (0..4u64).map(|i| client.read_at(i * 512, 512));
    let results = within("reads", join_all(reads)).await;
    let err = results[0].as_ref().expect_err("ESHUTDOWN");
    assert!(
        matches!(
            err,
            ClientError::Server {
                errno: errno::ESHUTDOWN,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_member_failure(), "a member shutting down is failing");
    for r in &results[1..] {
        assert_eq!(
            r.as_ref().expect("answered after the ESHUTDOWN"),
            &vec![0u8; 512]
        );
    }
    within(
        "state change",
        watch.wait_for(|s| matches!(s, ConnState::Failed(_))),
    )
    .await
    .expect("watch");
    within("server sees the disconnect", async {
        while !hung_up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let log = srv.log.lock().unwrap().clone();
    assert_eq!(
        log.last().map(|h| h.command),
        Some(cmd::DISC),
        "a soft disconnect: {log:?}"
    );
    let later = client
        .read_at(0, 512)
        .now_or_never()
        .expect("fails at once");
    assert!(
        matches!(later, Err(ClientError::ConnectionLost { .. })),
        "{later:?}"
    );
}

/// Runs `bad` as the server's answer to the first READ and expects the
/// client to fail that read with a protocol error and drop the connection.
async fn expect_protocol_failure(what: &str, bad: fn(&mut FakeConn, u64, u64) -> Vec<u8>) {
    let srv = FakeServer::start(Export::default(), move |mut c: FakeConn| async move {
        let Some(r) = c.recv().await else { return };
        let raw = bad(&mut c, r.hdr.cookie, r.hdr.offset);
        let _ = c.send_raw(&raw).await;
        while c.recv().await.is_some() {}
    })
    .await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let r = within(what, client.read_at(4096, 4096)).await;
    match &r {
        Err(e @ ClientError::Protocol(_)) => assert!(e.is_member_failure()),
        other => panic!(
            "{what}: expected a protocol error, got {:?}",
            other.as_ref().map(|b| b.len())
        ),
    }
    assert!(
        matches!(client.state(0), Some(ConnState::Failed(_))),
        "{what}: {:?}",
        client.state(0)
    );
}

fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn reply_for_an_unknown_cookie() {
    expect_protocol_failure("unknown cookie", |_, cookie, _| {
        let mut v = Vec::new();
        v.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&(cookie ^ 0xdead_beef).to_be_bytes());
        v
    })
    .await;
}

#[tokio::test]
async fn data_chunk_offset_near_u64_max() {
    expect_protocol_failure("OFFSET_DATA at 2^64 - 8", |_, cookie, _| {
        let mut p = (u64::MAX - 7).to_be_bytes().to_vec();
        p.extend_from_slice(&[0u8; 16]);
        chunk(cookie, reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, &p)
    })
    .await;
}

#[tokio::test]
async fn hole_chunk_offset_near_u64_max() {
    expect_protocol_failure("OFFSET_HOLE at 2^64 - 8", |_, cookie, _| {
        let mut p = (u64::MAX - 7).to_be_bytes().to_vec();
        p.extend_from_slice(&4096u32.to_be_bytes());
        chunk(cookie, reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE, &p)
    })
    .await;
}

#[tokio::test]
async fn data_chunk_outside_the_request() {
    expect_protocol_failure("OFFSET_DATA before the request", |_, cookie, offset| {
        let mut p = (offset - 512).to_be_bytes().to_vec();
        p.extend_from_slice(&[0u8; 4096]);
        chunk(cookie, reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, &p)
    })
    .await;
}

#[tokio::test]
async fn read_done_without_covering_the_request() {
    // DONE after only half the data: the rest of the caller's buffer was
    // never written, so this must not be a successful read.
    expect_protocol_failure("READ done with half its data", |_, cookie, offset| {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&[9u8; 2048]);
        chunk(cookie, reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, &p)
    })
    .await;
    expect_protocol_failure("READ done with no data at all", |_, cookie, _| {
        chunk(cookie, reply::FLAG_DONE, reply::TYPE_NONE, &[])
    })
    .await;
}

#[tokio::test]
async fn simple_reply_to_a_structured_read() {
    expect_protocol_failure("simple reply to a READ", |_, cookie, _| {
        let mut v = Vec::new();
        v.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&[0u8; 4096]);
        v
    })
    .await;
}

#[tokio::test]
async fn bad_magic_in_a_reply() {
    expect_protocol_failure("bad reply magic", |_, _, _| vec![0xAB; 32]).await;
}

#[tokio::test]
async fn block_status_is_checked() {
    // A good answer: extents start at the offset and are returned in order.
    let srv = FakeServer::start(Export::default(), |mut c: FakeConn| async move {
        while let Some(r) = c.recv().await {
            let p = match r.hdr.offset {
                // Good: two extents.
                0 => block_status_payload(&[
                    (4096, 0),
                    (8192, common::fake::HOLE | common::fake::ZERO),
                ]),
                // Another context only: nothing for base:allocation.
                4096 => {
                    let mut p = block_status_payload(&[(4096, 0)]).to_vec();
                    p[..4].copy_from_slice(&999u32.to_be_bytes());
                    Bytes::from(p)
                }
                _ => Bytes::new(),
            };
            let _ = c
                .send_chunk(r.hdr.cookie, reply::FLAG_DONE, reply::TYPE_BLOCK_STATUS, &p)
                .await;
        }
    })
    .await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    assert!(client.info().allocation_context.is_some());
    let ext = within("block status", client.block_status(0, 12288))
        .await
        .expect("block status");
    assert_eq!(ext.len(), 2);
    assert_eq!((ext[0].offset, ext[0].len, ext[0].flags), (0, 4096, 0));
    assert_eq!((ext[1].offset, ext[1].len, ext[1].flags), (4096, 8192, 3));
    // A reply without an extent for our context would leave a caller that
    // advances by the extents' length looping forever: it is an error.
    let r = within(
        "block status without extents",
        client.block_status(4096, 4096),
    )
    .await;
    assert!(
        r.is_err(),
        "no base:allocation extents must not be success: {r:?}"
    );
}

#[tokio::test]
async fn server_hangs_up_mid_read_payload() {
    let srv = FakeServer::start(
        Export {
            structured: false,
            ..Export::default()
        },
        |mut c: FakeConn| async move {
            let Some(r) = c.recv().await else { return };
            // Header and half the data, then close.
            let _ = c.send_simple(r.hdr.cookie, 0, &[1u8; 2048]).await;
        },
    )
    .await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let r = within("read", client.read_at(0, 4096)).await;
    assert!(
        matches!(
            r,
            Err(ClientError::ConnectionLost {
                possibly_applied: false,
                ..
            })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn non_fixed_newstyle_server() {
    // Without FIXED_NEWSTYLE only NBD_OPT_EXPORT_NAME may be sent.
    let export = Export {
        fixed: false,
        no_zeroes: false,
        ..Export::default()
    };
    let (srv, _mem) = FakeServer::memory(export).await;
    let client = connect(&srv.addr(), "x", no_deadlines()).await;
    let info = client.info();
    assert!(info.used_export_name && !info.structured);
    within("write", client.write(100, vec![3u8; 1000], false))
        .await
        .expect("write");
    assert_eq!(
        within("read", client.read_at(100, 1000))
            .await
            .expect("read"),
        vec![3u8; 1000]
    );
}

#[tokio::test]
async fn a_silent_server_fails_the_connect_not_hangs_it() {
    // Accepts TCP, never sends the greeting.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let (_sock, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(200),
        ..no_deadlines()
    };
    let r = within_for(
        Duration::from_secs(10),
        "connect",
        Client::connect(&addr, "", config),
    )
    .await;
    assert!(
        matches!(r, Err(ClientError::Timeout(_))),
        "{:?}",
        r.map(|_| ())
    );
    hold.abort();
}

#[tokio::test]
async fn huge_payload_free_requests_are_split() {
    // A 16 GiB export that stores nothing: it answers and logs.
    let size = 16u64 << 30;
    let srv = FakeServer::start(
        Export {
            size,
            ..Export::default()
        },
        |mut c: FakeConn| async move {
            while let Some(r) = c.recv().await {
                let a = if r.hdr.command == cmd::BLOCK_STATUS {
                    Answer::Extents(vec![(r.hdr.length, 0)])
                } else {
                    Answer::Ok
                };
                if c.reply(&r, a).await.is_err() {
                    return;
                }
            }
        },
    )
    .await;
    let client = connect(&srv.addr(), "", no_deadlines()).await;
    let len = (3u64 << 30) + 512;
    within("trim", client.trim(4096, len)).await.expect("trim");
    within("zeroes", client.write_zeroes(8192, len, true))
        .await
        .expect("zeroes");
    let ext = within("block status", client.block_status(0, 8 << 30))
        .await
        .expect("block status");
    assert_eq!(ext[0].offset, 0);
    let log = srv.log.lock().unwrap().clone();
    for (command, start) in [(cmd::TRIM, 4096u64), (cmd::WRITE_ZEROES, 8192)] {
        let pieces: Vec<_> = log.iter().filter(|h| h.command == command).collect();
        assert!(pieces.len() > 1, "{command}: a 3 GiB range is split");
        let total: u64 = pieces.iter().map(|h| h.length as u64).sum();
        assert_eq!(total, len, "the pieces cover the range exactly");
        let mut pieces = pieces;
        pieces.sort_by_key(|h| h.offset);
        let mut at = start;
        for h in pieces {
            assert_eq!(h.offset, at, "contiguous");
            at += h.length as u64;
        }
    }
    let bs: Vec<_> = log
        .iter()
        .filter(|h| h.command == cmd::BLOCK_STATUS)
        .collect();
    assert_eq!(bs.len(), 1);
    assert!(bs[0].length > 0 && bs[0].length % 4096 == 0, "{:?}", bs[0]);
}
