//! Pooled buffers through the client, against the in-process fake server:
//! a READ fills the caller's own `IoBuf` and hands that very buffer back
//! (pooled, so it returns to its pool), and one pooled buffer shared as
//! `Bytes` is written to two members without a copy and goes back to its
//! pool only once both writes have completed.

// A test that meets the unexpected should panic, loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nbdraid_client::{ClientError, CompletionRing, Indirect, Request};
use nbdraid_proto::buf::BufferPool;
use nbdraid_proto::consts::cmd;
use tokio::sync::{Semaphore, mpsc};

use common::fake::{Export, FakeConn, FakeServer, answer};
use common::{connect, quick_config, within};
use nbdraid_harness::{assert_same, pattern};

const LEN: usize = 64 << 10;

/// A disk whose blocks hold `pattern(block, len)`.
async fn disk(export: Export) -> (FakeServer, Arc<Mutex<Vec<u8>>>) {
    let (srv, mem) = FakeServer::memory(export).await;
    {
        let mut m = mem.lock().unwrap();
        for (i, block) in m.chunks_mut(LEN).enumerate() {
            block.copy_from_slice(&pattern(i as u64, block.len()));
        }
    }
    (srv, mem)
}

#[tokio::test]
async fn a_read_fills_and_returns_the_callers_pooled_buffer() {
    let export = Export {
        size: 4 * LEN as u64,
        ..Export::default()
    };
    let (srv, _mem) = disk(export).await;
    let client = connect(&srv.addr(), "", quick_config()).await;
    let pool = BufferPool::new(1 << 20);

    let mut buf = pool.get(LEN);
    buf.fill(0xEE);
    let at = buf.as_ptr();
    let back = within("read", client.read(LEN as u64, buf))
        .await
        .expect("read");
    assert!(back.is_pooled(), "the caller's pooled buffer comes back");
    assert_eq!(back.as_ptr(), at, "the very buffer the caller gave");
    assert_same(&back, &pattern(1, LEN), "read into a pooled buffer");
    assert_eq!(pool.used_bytes(), LEN as u64);
    drop(back);
    assert_eq!((pool.used_bytes(), pool.kept_bytes()), (0, LEN as u64));

    // Through the ring, and a read that fails at once: the buffer comes
    // back either way (and the pool reuses the one it kept).
    let ring = CompletionRing::new(4).unwrap();
    let req = Request::Read {
        offset: 2 * LEN as u64,
        buf: pool.get(LEN),
    };
    assert!(matches!(
        ring.indirect(&client, req, 2),
        Ok(Indirect::Pending)
    ));
    within("completion", ring.ring_wait(ring.user_tail())).await;
    let e = ring.pop().expect("an entry");
    assert!(e.status.is_ok(), "{:?}", e.status);
    let b = e.buffer.expect("the read's buffer");
    assert!(b.is_pooled());
    assert_same(&b, &pattern(2, LEN), "read through the ring");
    drop(b);
    let beyond = Request::Read {
        offset: 4 * LEN as u64,
        buf: pool.get(LEN),
    };
    match ring.indirect(&client, beyond, 9) {
        Ok(Indirect::Done(e)) => {
            assert!(matches!(e.status, Err(ClientError::Invalid(_))), "{e:?}");
            assert!(e.buffer.expect("handed back").is_pooled());
        }
        other => panic!("a read beyond the end finishes at once: {other:?}"),
    }
    assert_eq!((pool.used_bytes(), pool.kept_bytes()), (0, LEN as u64));
}

#[tokio::test]
async fn a_split_read_fills_the_callers_pooled_buffer() {
    // A 4 KiB maximum payload: the 64 KiB read goes out in 16 pieces, each
    // copied into place in the caller's buffer.
    let export = Export {
        size: 2 * LEN as u64,
        block_size: Some((512, 4096, 4096)),
        ..Export::default()
    };
    let (srv, _mem) = disk(export).await;
    let client = connect(&srv.addr(), "", quick_config()).await;
    let pool = BufferPool::new(1 << 20);
    let buf = pool.get(LEN);
    let at = buf.as_ptr();
    let back = within("split read", client.read(LEN as u64, buf))
        .await
        .expect("read");
    assert_eq!(back.as_ptr(), at, "the very buffer the caller gave");
    assert!(back.is_pooled());
    assert_same(&back, &pattern(1, LEN), "split read");
    assert_eq!(srv.requests(), 16, "one request per piece");
}

/// A disk that answers only as `gate` lets it, and says (on `received`)
/// whenever it has a whole request, payload included.
async fn gated_disk(
    export: Export,
    gate: Arc<Semaphore>,
) -> (
    FakeServer,
    Arc<Mutex<Vec<u8>>>,
    mpsc::UnboundedReceiver<u16>,
) {
    let mem = Arc::new(Mutex::new(vec![0u8; export.size as usize]));
    let (tx, rx) = mpsc::unbounded_channel();
    let m = mem.clone();
    let srv = FakeServer::start(export, move |mut c: FakeConn| {
        let (m, gate, tx) = (m.clone(), gate.clone(), tx.clone());
        async move {
            while let Some(req) = c.recv().await {
                let _ = tx.send(req.hdr.command);
                let Ok(permit) = gate.acquire().await else {
                    return;
                };
                permit.forget();
                let a = answer(&m, &req);
                if c.reply(&req, a).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (srv, mem, rx)
}

#[tokio::test]
async fn one_pooled_buffer_is_written_to_two_members_and_returns_after_both() {
    let export = Export {
        size: 4 * LEN as u64,
        ..Export::default()
    };
    let (fast, fast_mem) = FakeServer::memory(export.clone()).await;
    let gate = Arc::new(Semaphore::new(0));
    let (slow, slow_mem, mut slow_got) = gated_disk(export, gate.clone()).await;
    let a = connect(&fast.addr(), "", quick_config()).await;
    let b = Arc::new(connect(&slow.addr(), "", quick_config()).await);

    let pool = BufferPool::new(1 << 20);
    let mut buf = pool.get(LEN);
    buf.copy_from_slice(&pattern(42, LEN));
    let data = Bytes::from_owner(buf);
    let at = data.as_ptr();
    assert_eq!(pool.used_bytes(), LEN as u64);

    // One member's share is a clone, the other's a slice: the same bytes.
    let to_b = data.slice(..);
    assert_eq!(to_b.as_ptr(), at, "a slice shares the buffer");
    let slow_write = tokio::spawn({
        let b = b.clone();
        async move { b.write(LEN as u64, to_b, false).await }
    });
    within("member A's write", a.write(LEN as u64, data.clone(), false))
        .await
        .expect("member A");
    drop(data);
    // Member B has the whole request (so its bytes have left the writer's
    // batch) but has not answered: its write still holds the buffer.
    let got = within("member B receives the write", slow_got.recv()).await;
    assert_eq!(got, Some(cmd::WRITE));
    assert!(!slow_write.is_finished());
    assert_eq!(
        pool.used_bytes(),
        LEN as u64,
        "the buffer stays out of the pool while member B's write is pending"
    );
    assert_eq!(pool.kept_bytes(), 0);

    gate.add_permits(1);
    within("member B's write", slow_write)
        .await
        .expect("task")
        .expect("member B");
    // The connection's writer may let go of its share a moment after the
    // completion: wait for it (bounded), never assume it.
    within("the buffer returns to its pool", async {
        while pool.used_bytes() != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(pool.kept_bytes(), LEN as u64, "back in the pool, for reuse");

    let want = pattern(42, LEN);
    for (name, mem) in [("member A", &fast_mem), ("member B", &slow_mem)] {
        let m = mem.lock().unwrap();
        assert_same(&m[LEN..2 * LEN], &want, name);
        assert!(
            m[..LEN].iter().all(|&x| x == 0),
            "{name}: nothing else written"
        );
    }
}
