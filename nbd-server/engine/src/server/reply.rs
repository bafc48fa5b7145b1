//! Replies and the connection's writer task.
//!
//! A [`Reply`] owns everything until its bytes are on the socket: the
//! header, the data buffer (written from where the device put it, by a
//! vectored write, never copied) and the throttle guard, so a request's
//! units return only once its reply has left. The writer drains all queued
//! replies at once and sends them with as few `writev` calls as possible.

use std::io::IoSlice;

use bytes::{BufMut, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::UnboundedReceiver;

use nbdraid_proto::consts::reply;
use nbdraid_proto::{ErrorChunk, ReplyHeader};

use crate::buffer::ReadData;
use crate::throttle::ThrottleGuard;

const HEAD_MAX: usize = 32;
/// Most replies the writer takes from the queue for one batch.
const BATCH: usize = 256;
/// Linux's IOV_MAX.
const IOV_MAX: usize = 1024;

/// One reply, ready to be written.
pub(super) struct Reply {
    head: [u8; HEAD_MAX],
    head_len: usize,
    data: Option<ReadData>,
    extra: Bytes,
    _guard: Option<ThrottleGuard>,
}

impl Reply {
    fn with_header(h: ReplyHeader, tail: &[u8]) -> Self {
        let mut head = [0u8; HEAD_MAX];
        let mut w = &mut head[..];
        h.put(&mut w);
        w.put_slice(tail);
        let head_len = h.wire_len() + tail.len();
        Self {
            head,
            head_len,
            data: None,
            extra: Bytes::new(),
            _guard: None,
        }
    }

    /// Returns a simple reply (success when `error` is 0).
    pub fn simple(cookie: u64, error: u32) -> Self {
        Self::with_header(ReplyHeader::Simple { error, cookie }, &[])
    }

    /// Returns a successful READ reply carrying `data`.
    pub fn read(cookie: u64, offset: u64, data: ReadData, structured: bool) -> Self {
        let mut r = if !structured {
            Self::simple(cookie, 0)
        } else if data.is_empty() {
            Self::with_header(
                ReplyHeader::Chunk {
                    flags: reply::FLAG_DONE,
                    kind: reply::TYPE_NONE,
                    cookie,
                    length: 0,
                },
                &[],
            )
        } else {
            Self::with_header(
                ReplyHeader::Chunk {
                    flags: reply::FLAG_DONE,
                    kind: reply::TYPE_OFFSET_DATA,
                    cookie,
                    length: 8 + data.len() as u32,
                },
                &offset.to_be_bytes(),
            )
        };
        if !data.is_empty() {
            r.data = Some(data);
        }
        r
    }

    /// Returns an error reply: a structured error chunk when `structured`
    /// (required for READ), a simple reply otherwise.
    pub fn error(cookie: u64, error: u32, message: &str, structured: bool) -> Self {
        if !structured {
            return Self::simple(cookie, error);
        }
        let payload = ErrorChunk::encode(error, message);
        let mut r = Self::with_header(
            ReplyHeader::Chunk {
                flags: reply::FLAG_DONE,
                kind: reply::TYPE_ERROR,
                cookie,
                length: payload.len() as u32,
            },
            &[],
        );
        r.extra = payload;
        r
    }

    /// Returns a BLOCK_STATUS reply with its encoded payload.
    pub fn block_status(cookie: u64, payload: Bytes) -> Self {
        let mut r = Self::with_header(
            ReplyHeader::Chunk {
                flags: reply::FLAG_DONE,
                kind: reply::TYPE_BLOCK_STATUS,
                cookie,
                length: payload.len() as u32,
            },
            &[],
        );
        r.extra = payload;
        r
    }

    /// Attaches the throttle guard that is released once the reply is sent.
    pub fn with_guard(mut self, guard: Option<ThrottleGuard>) -> Self {
        self._guard = guard;
        self
    }

    fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        out.push(IoSlice::new(&self.head[..self.head_len]));
        if let Some(d) = &self.data {
            out.push(IoSlice::new(d));
        }
        if !self.extra.is_empty() {
            out.push(IoSlice::new(&self.extra));
        }
    }
}

/// Writes replies as they come until every sender is gone, then shuts the
/// socket's write side. Returns early (dropping the rest) if the peer is gone.
pub(super) async fn writer(mut wr: OwnedWriteHalf, mut rx: UnboundedReceiver<Reply>) {
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if let Err(e) = write_batch(&mut wr, &batch).await {
            tracing::debug!(error = %e, "writing replies failed; peer gone");
            return;
        }
        // Dropping the replies returns their buffers and throttle units.
        batch.clear();
    }
    let _ = wr.shutdown().await;
}

async fn write_batch(wr: &mut OwnedWriteHalf, batch: &[Reply]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for r in batch {
        r.slices(&mut slices);
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let upto = rest.len().min(IOV_MAX);
        let n = wr.write_vectored(&rest[..upto]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
