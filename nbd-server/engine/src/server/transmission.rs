//! The transmission phase of one connection.
//!
//! The reader task decodes request headers, validates them, acquires the
//! request's throttle units and only then reads a WRITE's payload, into a
//! pooled buffer. While it waits for units it does not read the socket, so
//! TCP pushes back on the client. The device operation is polled once
//! inline (a page-cache hit finishes right there) and spawned only if it
//! has to wait. Replies go to a separate writer task (see [`super::reply`]),
//! so the reader never blocks on a client that is slow to read replies.
//!
//! Requests are answered as they complete, out of order; the number in
//! flight is bounded by the throttle (every reply holds units).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio_util::codec::FramedRead;

use nbdraid_proto::consts::{cmd, cmd_flags, transmission_flags as tf};
use nbdraid_proto::io::{discard_payload, read_payload};
use nbdraid_proto::transmission::encode_block_status;
use nbdraid_proto::{RequestHeader, ServerTransmissionCodec};

use super::handshake::{Session, transmission_flags};
use super::reply::{self, Reply};
use super::{Engine, ExportRegistry};
use crate::buffer::{IoBuf, ReadData};
use crate::device::{BlockDevice, IoClass, IoContext, IoFuture, OpKind, Reservation, ZeroFlags};
use crate::error::{Error, Result};
use crate::metrics::OpMetrics;
use crate::throttle::BACKGROUND;
use crate::throttle::ThrottleGuard;
use crate::upstream::ConnShare;

/// Socket read buffer of a connection in transmission.
const READ_BUFFER: usize = 64 * 1024;

/// After shutdown begins, a connection idle for this long is closed.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

struct Conn<D, R> {
    engine: Arc<Engine<D, R>>,
    device: Arc<D>,
    metrics: Arc<OpMetrics>,
    size: u64,
    max_payload: u32,
    flags: u16,
    structured: bool,
    meta_context: Option<u32>,
    share: Arc<ConnShare>,
    tx: UnboundedSender<Reply>,
}

/// Serves requests until the client disconnects, breaks framing, or the
/// server shuts down; then waits for every admitted request's reply to be sent.
pub(super) async fn run<D: BlockDevice, R: ExportRegistry<D>>(
    engine: Arc<Engine<D, R>>,
    session: Session<D>,
    share: Arc<ConnShare>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(reply::writer(session.writer, rx));
    let metrics = session.export.metrics.clone();
    metrics.connection(1);
    let conn = Conn {
        device: session.export.device.clone(),
        metrics: metrics.clone(),
        size: session.info.size,
        max_payload: session.info.block_sizes.max,
        flags: transmission_flags(&session.info, session.structured),
        structured: session.structured,
        meta_context: session.meta_context,
        share,
        tx,
        engine,
    };
    let mut reader = session.reader;
    // One socket read takes in many small requests with their payloads
    // (4 KiB writes: ~15 per read instead of ~2 with the default 8 KiB).
    // A fixed per-connection cost, outside the throttle's budget.
    reader.read_buffer_mut().reserve(READ_BUFFER);
    if let Err(e) = conn.read_loop(&mut reader).await {
        tracing::info!(error = %e, "connection closed");
    }
    // Every in-flight request holds a sender; the writer ends after the last reply.
    drop(conn);
    let _ = writer.await;
    metrics.connection(-1);
}

impl<D: BlockDevice, R: ExportRegistry<D>> Conn<D, R> {
    async fn read_loop(
        &self,
        reader: &mut FramedRead<OwnedReadHalf, ServerTransmissionCodec>,
    ) -> std::result::Result<(), nbdraid_proto::ProtoError> {
        let shutdown = self.engine.shutdown.clone();
        // One registration for the connection's life, not one per request.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            let stopping = shutdown.is_cancelled();
            let next = if stopping {
                match tokio::time::timeout(SHUTDOWN_LINGER, reader.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                }
            } else {
                tokio::select! {
                    n = reader.next() => n,
                    _ = &mut cancelled => continue,
                }
            };
            let hdr = match next {
                None => return Ok(()),
                Some(h) => h?,
            };
            tracing::trace!(
                cookie = hdr.cookie,
                command = hdr.command,
                offset = hdr.offset,
                len = hdr.length,
                "request"
            );
            if hdr.command == cmd::DISC {
                return Ok(());
            }
            let Some(op) = op_kind(hdr.command) else {
                self.reply_error(
                    &hdr,
                    None,
                    Error::Invalid(format!("unknown command {}", hdr.command)),
                )
                .await;
                continue;
            };
            let checked = if stopping {
                Err(Error::ShuttingDown)
            } else {
                self.validate(&hdr, op)
            };
            if let Err(e) = checked {
                if op == OpKind::Write {
                    discard_payload(reader, hdr.length as u64).await?;
                }
                self.reply_error(&hdr, Some(op), e).await;
                continue;
            }
            let units = self.device.cost(op, hdr.length as u64);
            let guard = match self.engine.throttle.acquire(self.share.get(), units).await {
                Ok((g, waited)) => {
                    if !waited.is_zero() {
                        self.metrics.record_wait(waited);
                    }
                    g
                }
                Err(e) => {
                    if op == OpKind::Write {
                        discard_payload(reader, hdr.length as u64).await?;
                    }
                    self.reply_error(&hdr, Some(op), e).await;
                    continue;
                }
            };
            // What the request needs beneath this layer, in the same
            // order every time: own units first, then the layers below.
            let reservation =
                match self
                    .device
                    .reserve(self.context(), op, hdr.offset, hdr.length as u64)
                {
                    None => Reservation::none(),
                    Some(f) => match f.await {
                        Ok(r) => r,
                        Err(e) => {
                            if op == OpKind::Write {
                                discard_payload(reader, hdr.length as u64).await?;
                            }
                            drop(guard);
                            self.reply_error(&hdr, Some(op), e).await;
                            continue;
                        }
                    },
                };
            let payload = if op == OpKind::Write {
                let mut buf = self.engine.pool.get(hdr.length as usize);
                read_payload(reader, &mut buf).await?;
                Some(buf)
            } else {
                None
            };
            self.dispatch(hdr, op, (guard, reservation), payload);
        }
    }

    /// Returns the context of this connection's requests: its share, and
    /// the background class when that share is the background pool.
    fn context(&self) -> IoContext {
        let share = self.share.get();
        IoContext {
            upstream: share,
            class: if share == BACKGROUND {
                IoClass::Background
            } else {
                IoClass::Foreground
            },
        }
    }

    /// Checks flags, permissions and range; the spec's errno comes from the
    /// returned error's [`Error::nbd_errno`].
    fn validate(&self, h: &RequestHeader, op: OpKind) -> Result<()> {
        let mut allowed = cmd_flags::FUA;
        match op {
            OpKind::Read if self.flags & tf::SEND_DF != 0 => allowed |= cmd_flags::DF,
            OpKind::WriteZeroes => {
                allowed |= cmd_flags::NO_HOLE;
                if self.flags & tf::SEND_FAST_ZERO != 0 {
                    allowed |= cmd_flags::FAST_ZERO;
                }
            }
            OpKind::BlockStatus => allowed |= cmd_flags::REQ_ONE,
            _ => {}
        }
        if h.flags & !allowed != 0 {
            return Err(Error::Invalid(format!(
                "flags {:#x} not valid for {}",
                h.flags & !allowed,
                op.name()
            )));
        }
        let writes = matches!(op, OpKind::Write | OpKind::WriteZeroes);
        if self.flags & tf::READ_ONLY != 0 && (writes || op == OpKind::Trim) {
            return Err(Error::ReadOnly);
        }
        let (offset, len) = (h.offset, h.length as u64);
        match op {
            OpKind::Flush => {
                if offset != 0 || len != 0 {
                    return Err(Error::Invalid(
                        "FLUSH with a non-zero offset or length".into(),
                    ));
                }
                return Ok(());
            }
            OpKind::Read | OpKind::Write if h.length > self.max_payload => {
                return Err(Error::Invalid(format!(
                    "length {len} exceeds the maximum payload {}",
                    self.max_payload
                )));
            }
            OpKind::BlockStatus => {
                if len == 0 {
                    return Err(Error::Invalid("BLOCK_STATUS of length 0".into()));
                }
                if self.meta_context.is_none() {
                    return Err(Error::Invalid("no metadata context was negotiated".into()));
                }
            }
            _ => {}
        }
        let past_end = offset.checked_add(len).is_none_or(|end| end > self.size);
        if past_end {
            return Err(if writes {
                Error::NoSpace {
                    offset,
                    len,
                    size: self.size,
                }
            } else {
                Error::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                }
            });
        }
        Ok(())
    }

    async fn reply_error(&self, h: &RequestHeader, op: Option<OpKind>, e: Error) {
        tracing::debug!(cookie = h.cookie, command = h.command, offset = h.offset, len = h.length, error = %e, "request refused");
        // Even an error reply holds a few units, so a client that floods
        // bad requests and never reads replies is bounded too.
        let guard = self
            .engine
            .throttle
            .acquire(self.share.get(), crate::cost::BASE_COST)
            .await
            .ok()
            .map(|(g, _)| g);
        if let Some(op) = op {
            self.metrics.record(op, 0, false, Duration::ZERO);
        }
        let structured = self.structured && matches!(op, Some(OpKind::Read | OpKind::BlockStatus));
        let r = Reply::error(h.cookie, e.nbd_errno(), &e.to_string(), structured).with_guard(guard);
        let _ = self.tx.send(r);
    }

    fn dispatch(
        &self,
        h: RequestHeader,
        op: OpKind,
        (guard, reservation): (ThrottleGuard, Reservation),
        payload: Option<IoBuf>,
    ) {
        let start = quanta::Instant::now();
        let (cookie, offset, len) = (h.cookie, h.offset, h.length as u64);
        let fua = h.flags & cmd_flags::FUA != 0;
        let dev = &self.device;
        let ctx = self.context();
        let structured = self.structured;
        let done = Completion {
            tx: self.tx.clone(),
            metrics: self.metrics.clone(),
            guard,
            _reservation: reservation,
            op,
            cookie,
            len,
            start,
            structured,
        };
        match op {
            OpKind::Read => {
                if len == 0 {
                    let empty = ReadData::Buf(IoBuf::zeroed(0));
                    return done.finish(Ok(Reply::read(cookie, offset, empty, structured)));
                }
                if let Some(view) = dev.read_zero_copy(ctx, offset, len as usize) {
                    let data = ReadData::Mapped(view);
                    return done.finish(Ok(Reply::read(cookie, offset, data, structured)));
                }
                let buf = self.engine.pool.get(len as usize);
                drive(dev.read(ctx, offset, buf), done, move |buf| {
                    Reply::read(cookie, offset, ReadData::Buf(buf), structured)
                });
            }
            OpKind::Write => {
                let Some(buf) = payload.filter(|b| !b.is_empty()) else {
                    return done.finish(Ok(Reply::simple(cookie, 0)));
                };
                drive(dev.write(ctx, offset, buf, fua), done, move |_| {
                    Reply::simple(cookie, 0)
                });
            }
            OpKind::Flush => drive(dev.flush(ctx), done, move |_| Reply::simple(cookie, 0)),
            OpKind::Trim if len == 0 => done.finish(Ok(Reply::simple(cookie, 0))),
            OpKind::Trim => drive(dev.trim(ctx, offset, len, fua), done, move |_| {
                Reply::simple(cookie, 0)
            }),
            OpKind::WriteZeroes if len == 0 => done.finish(Ok(Reply::simple(cookie, 0))),
            OpKind::WriteZeroes => {
                let flags = ZeroFlags {
                    fua,
                    no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                    fast: h.flags & cmd_flags::FAST_ZERO != 0,
                };
                drive(dev.write_zeroes(ctx, offset, len, flags), done, move |_| {
                    Reply::simple(cookie, 0)
                });
            }
            OpKind::Cache if len == 0 => done.finish(Ok(Reply::simple(cookie, 0))),
            OpKind::Cache => drive(dev.cache(ctx, offset, len), done, move |_| {
                Reply::simple(cookie, 0)
            }),
            OpKind::BlockStatus => {
                let req_one = h.flags & cmd_flags::REQ_ONE != 0;
                let max = if req_one {
                    1
                } else {
                    self.engine.config.max_extents
                };
                let id = self.meta_context.unwrap_or(0);
                drive(
                    dev.block_status(ctx, offset, len, max),
                    done,
                    move |extents| {
                        let mut wire = Vec::with_capacity(extents.len());
                        for e in extents {
                            e.to_wire(&mut wire);
                        }
                        if req_one {
                            wire.truncate(1);
                        }
                        Reply::block_status(cookie, encode_block_status(id, &wire))
                    },
                );
            }
        }
    }
}

fn op_kind(command: u16) -> Option<OpKind> {
    Some(match command {
        cmd::READ => OpKind::Read,
        cmd::WRITE => OpKind::Write,
        cmd::FLUSH => OpKind::Flush,
        cmd::TRIM => OpKind::Trim,
        cmd::CACHE => OpKind::Cache,
        cmd::WRITE_ZEROES => OpKind::WriteZeroes,
        cmd::BLOCK_STATUS => OpKind::BlockStatus,
        _ => return None,
    })
}

/// What is needed to answer a request once its operation is done.
struct Completion {
    tx: UnboundedSender<Reply>,
    metrics: Arc<OpMetrics>,
    guard: ThrottleGuard,
    /// Held until the request completes (dropped with the completion).
    _reservation: Reservation,
    op: OpKind,
    cookie: u64,
    len: u64,
    /// From the TSC (quanta): a latency sample per request costs two clock reads.
    start: quanta::Instant,
    structured: bool,
}

impl Completion {
    fn finish(self, result: Result<Reply>) {
        let ok = result.is_ok();
        self.metrics
            .record(self.op, self.len, ok, self.start.elapsed());
        let reply = result.unwrap_or_else(|e| {
            tracing::warn!(cookie = self.cookie, op = self.op.name(), error = %e, "request failed");
            let structured =
                self.structured && matches!(self.op, OpKind::Read | OpKind::BlockStatus);
            Reply::error(self.cookie, e.nbd_errno(), &e.to_string(), structured)
        });
        // If the writer is gone the peer is gone; the reply has nowhere to go.
        let _ = self.tx.send(reply.with_guard(Some(self.guard)));
    }
}

/// Polls `fut` once inline; if it is not done, spawns it. Either way the
/// reply built by `make` from its result goes to the writer.
fn drive<T: Send + 'static>(
    mut fut: IoFuture<T>,
    done: Completion,
    make: impl FnOnce(T) -> Reply + Send + 'static,
) {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => done.finish(r.map(make)),
        Poll::Pending => {
            tokio::spawn(async move {
                let r = fut.await;
                done.finish(r.map(make));
            });
        }
    }
}
