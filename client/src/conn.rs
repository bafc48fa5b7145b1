//! One NBD connection in the transmission phase.
//!
//! Three tasks share a table of pieces in flight, keyed by cookie:
//! - the writer drains submitted requests and sends them in batches with
//!   vectored writes (headers and write payloads, no copies);
//! - the reader decodes reply headers and reads data straight into the
//!   buffer of the request it answers; replies match by cookie, in any order;
//! - the watchdog enforces request deadlines and detects a stalled server
//!   (requests outstanding, nothing received for `stall_timeout`).
//!
//! When the connection fails (reset, EOF, protocol error, timeout), every
//! request in flight fails at once with a clear error, and later
//! submissions fail immediately; nothing hangs. Writes that were in
//! flight when the connection was lost are reported as "possibly
//! applied"; after a timeout every request in flight fails with
//! [`ClientError::Timeout`], which for a write means the same.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use slab::Slab;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use nbdraid_proto::consts::{cmd, errno, reply};
use nbdraid_proto::io::{discard_payload, read_payload};
use nbdraid_proto::transmission::parse_block_status;
use nbdraid_proto::{
    ClientHandshakeCodec, ClientTransmissionCodec, ErrorChunk, ReplyHeader, RequestHeader,
};

use crate::error::ClientError;
use crate::handshake::ExportInfo;
use crate::op::{Extent, Op};

/// Reply data read per socket read when small replies are batched.
const READ_BUFFER: usize = 256 * 1024;
/// Largest non-data chunk payload accepted (block status, errors).
const MAX_CHUNK: u32 = 16 << 20;
/// Requests the writer takes from its queue for one batch.
const BATCH: usize = 256;
const IOV_MAX: usize = 1024;

/// The state of a connection, observable through [`crate::Client::watch_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Negotiated and serving requests.
    Ready,
    /// Failed; every request in flight has failed. Reconnect to go on.
    Failed(String),
    /// Closed by the client.
    Closed,
}

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A request not answered within this time fails the connection.
    pub request: Option<Duration>,
    /// Requests outstanding and no reply for this long fails the connection.
    pub stall: Option<Duration>,
}

/// One wire request in flight.
pub(crate) struct Piece {
    pub op: Arc<Op>,
    pub command: u16,
    pub offset: u64,
    pub len: u32,
    /// Where this piece's data goes in the op's buffer (split reads), or
    /// `None` when `buf` is the caller's own buffer.
    pub buf_off: Option<usize>,
    pub buf: Option<Vec<u8>>,
    /// Watchdog tick at submission (set by [`Conn::submit`]): request
    /// deadlines are counted in ticks, so the hot path reads no clock.
    pub born: u64,
    pub extents: Vec<Extent>,
    pub error: Option<ClientError>,
    /// READ bytes covered so far by structured data and hole chunks.
    pub received: u64,
}

impl Piece {
    fn modifies(&self) -> bool {
        matches!(self.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES)
    }

    /// Returns why a successful structured reply (DONE, no error chunk)
    /// does not answer this piece: a READ whose chunks do not cover it
    /// exactly (part of the caller's buffer was never written), or a
    /// BLOCK_STATUS without an extent for `base:allocation` (a caller
    /// advancing by the extents' length would never advance).
    fn unanswered(&self) -> Option<ClientError> {
        if self.error.is_some() {
            return None;
        }
        match self.command {
            cmd::READ if self.received != self.len as u64 => Some(protocol(format!(
                "READ reply covered {} of {} bytes",
                self.received, self.len
            ))),
            cmd::BLOCK_STATUS if self.extents.is_empty() => Some(protocol(
                "BLOCK_STATUS reply without a base:allocation extent",
            )),
            _ => None,
        }
    }

    /// Reports whether the server answered ESHUTDOWN (it is going away).
    fn shutting_down(&self) -> bool {
        matches!(
            self.error,
            Some(ClientError::Server {
                errno: errno::ESHUTDOWN,
                ..
            })
        )
    }

    fn finish(self, result: Result<(), ClientError>) {
        let result = match (result, self.error) {
            (Ok(()), Some(e)) => Err(e),
            (r, _) => r,
        };
        self.op
            .piece_done(result, self.buf, self.buf_off, self.extents);
    }
}

struct Outgoing {
    header: RequestHeader,
    payload: Option<Bytes>,
}

struct Shared {
    info: ExportInfo,
    table: Mutex<Slab<Piece>>,
    tx: mpsc::UnboundedSender<Outgoing>,
    state: watch::Sender<ConnState>,
    failed: AtomicBool,
    /// The client sent (or is sending) NBD_CMD_DISC.
    closing: AtomicBool,
    /// Fired when the connection fails, to stop its tasks and close the socket.
    stop: CancellationToken,
    /// Bumped by every reply and by the first submission after an idle
    /// period; the watchdog declares a stall when it stops moving.
    progress: AtomicU64,
    /// Watchdog ticks so far (the clock of request deadlines).
    ticks: AtomicU64,
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, Slab<Piece>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Initiates a soft disconnect: NBD_CMD_DISC goes out after every
    /// request already queued, and no request is queued after it (both
    /// under the table lock, which `Conn::submit` holds while queueing).
    /// Replies to requests in flight are still read; the server closes the
    /// connection once it has answered them. Publishes `state`, unless a
    /// disconnect was already under way.
    fn soft_disconnect(&self, state: ConnState) {
        {
            let _t = self.table();
            if self.closing.swap(true, Ordering::AcqRel) {
                return;
            }
            let header = RequestHeader {
                flags: 0,
                command: cmd::DISC,
                cookie: u64::MAX,
                offset: 0,
                length: 0,
            };
            let _ = self.tx.send(Outgoing {
                header,
                payload: None,
            });
        }
        self.state.send_replace(state);
    }

    /// Marks the connection failed and fails every piece in flight.
    fn fail(&self, err: ClientError) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(error = %err, "NBD connection failed");
        self.stop.cancel();
        // State first: a submission refused after the drain reports why.
        // After a soft disconnect the server hanging up is the expected end,
        // and the state already says why the connection ended.
        if !self.closing.load(Ordering::Acquire) {
            self.state.send_replace(ConnState::Failed(err.to_string()));
        }
        let pieces: Vec<Piece> = self.table().drain().collect();
        for p in pieces {
            let e = match &err {
                ClientError::ConnectionLost { reason, .. } => ClientError::ConnectionLost {
                    reason: reason.clone(),
                    possibly_applied: p.modifies(),
                },
                other => other.clone(),
            };
            p.finish(Err(e));
        }
    }
}

/// A negotiated connection.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    local: Option<std::net::SocketAddr>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if !self.shared.failed.swap(true, Ordering::AcqRel) {
            // Replaced by reconnect() or dropped with the client: watchers
            // see it end (and then the watch itself ends).
            self.shared.state.send_replace(ConnState::Closed);
            let pieces: Vec<Piece> = self.shared.table().drain().collect();
            for p in pieces {
                p.finish(Err(ClientError::Closed));
            }
        }
    }
}

impl Conn {
    /// Starts the connection's tasks on negotiated stream halves.
    pub(crate) fn start(
        info: ExportInfo,
        rd: FramedRead<OwnedReadHalf, ClientHandshakeCodec>,
        wr: OwnedWriteHalf,
        timeouts: Timeouts,
    ) -> Self {
        let local = wr.local_addr().ok();
        let (tx, rx) = mpsc::unbounded_channel();
        let (state, _) = watch::channel(ConnState::Ready);
        let shared = Arc::new(Shared {
            info,
            table: Mutex::new(Slab::with_capacity(256)),
            tx,
            state,
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stop: CancellationToken::new(),
            progress: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        });
        let mut rd = rd.map_decoder(|_| ClientTransmissionCodec);
        rd.read_buffer_mut().reserve(READ_BUFFER);
        let mut tasks = vec![
            tokio::spawn(writer(shared.clone(), wr, rx)),
            tokio::spawn(reader(shared.clone(), rd)),
        ];
        if timeouts.request.is_some() || timeouts.stall.is_some() {
            tasks.push(tokio::spawn(watchdog(Arc::downgrade(&shared), timeouts)));
        }
        Self {
            shared,
            tasks,
            local,
        }
    }

    /// Returns our end's address (what a node sees as the peer address).
    pub(crate) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local
    }

    pub(crate) fn watch(&self) -> watch::Receiver<ConnState> {
        self.shared.state.subscribe()
    }

    pub(crate) fn state(&self) -> ConnState {
        self.shared.state.borrow().clone()
    }

    /// Reports whether the connection can no longer take requests (it
    /// failed, or the client closed it).
    pub(crate) fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire) || self.shared.closing.load(Ordering::Acquire)
    }

    /// Returns the number of pieces in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.table().len()
    }

    /// Sends one piece; on failure hands it back with the error (boxed:
    /// the rare failure path should not make every result 168 bytes).
    pub(crate) fn submit(
        &self,
        piece: Piece,
        flags: u16,
        payload: Option<Bytes>,
    ) -> Result<(), Box<(Piece, ClientError)>> {
        let s = &self.shared;
        let refuse = |piece, error| Err(Box::new((piece, error)));
        // Everything below happens under the table lock:
        // - `fail` sets `failed` before it drains the table, so a piece is
        //   either drained by it or refused here, never stranded in a dead
        //   connection's table;
        // - `disconnect` queues DISC under the same lock, so no request is
        //   queued behind it;
        // - the reader cannot look the cookie up before the piece is in.
        let mut t = s.table();
        if s.failed.load(Ordering::Acquire) {
            drop(t);
            let reason = match &*s.state.borrow() {
                ConnState::Failed(r) => r.clone(),
                _ => "connection closed".into(),
            };
            let possibly_applied = false;
            return refuse(
                piece,
                ClientError::ConnectionLost {
                    reason,
                    possibly_applied,
                },
            );
        }
        if s.closing.load(Ordering::Acquire) {
            let error = match &*s.state.borrow() {
                ConnState::Failed(reason) => ClientError::ConnectionLost {
                    reason: reason.clone(),
                    possibly_applied: false,
                },
                _ => ClientError::Closed,
            };
            drop(t);
            return refuse(piece, error);
        }
        let mut piece = piece;
        piece.born = s.ticks.load(Ordering::Relaxed);
        let slot = t.vacant_entry();
        let out = Outgoing {
            header: RequestHeader {
                flags,
                command: piece.command,
                cookie: slot.key() as u64,
                offset: piece.offset,
                length: piece.len,
            },
            payload,
        };
        if s.tx.send(out).is_err() {
            let reason = "writer stopped".into();
            let possibly_applied = false;
            return refuse(
                piece,
                ClientError::ConnectionLost {
                    reason,
                    possibly_applied,
                },
            );
        }
        slot.insert(piece);
        if t.len() == 1 {
            s.touch();
        }
        Ok(())
    }

    /// Sends NBD_CMD_DISC after everything queued, then closes our side.
    /// From then on the connection refuses requests with
    /// [`ClientError::Closed`], and the server hanging up after the DISC is
    /// not a failure: the state stays [`ConnState::Closed`].
    pub(crate) fn disconnect(&self) {
        self.shared.soft_disconnect(ConnState::Closed);
    }
}

async fn writer(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let mut heads = BytesMut::with_capacity(BATCH * 28);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shared.stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        heads.clear();
        let mut disc = false;
        for o in &batch {
            o.header.put(&mut heads);
            disc |= o.header.command == cmd::DISC;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for (i, o) in batch.iter().enumerate() {
            slices.push(IoSlice::new(&heads[i * 28..(i + 1) * 28]));
            if let Some(p) = &o.payload {
                slices.push(IoSlice::new(p));
            }
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let upto = rest.len().min(IOV_MAX);
            let written = tokio::select! {
                w = wr.write_vectored(&rest[..upto]) => w,
                _ = shared.stop.cancelled() => return,
            };
            match written {
                Ok(0) => {
                    shared.fail(ClientError::ConnectionLost {
                        reason: "server closed the connection".into(),
                        possibly_applied: false,
                    });
                    return;
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) => {
                    shared.fail(ClientError::ConnectionLost {
                        reason: format!("send: {e}"),
                        possibly_applied: false,
                    });
                    return;
                }
            }
        }
        batch.clear();
        if disc {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

async fn reader(shared: Arc<Shared>, mut rd: FramedRead<OwnedReadHalf, ClientTransmissionCodec>) {
    let stop = shared.stop.clone();
    let err = loop {
        let next = tokio::select! {
            n = rd.next() => n,
            _ = stop.cancelled() => return,
        };
        let hdr = match next {
            None => {
                break ClientError::ConnectionLost {
                    reason: "server closed the connection".into(),
                    possibly_applied: false,
                };
            }
            Some(Err(nbdraid_proto::ProtoError::Io(e))) => {
                break ClientError::ConnectionLost {
                    reason: format!("receive: {e}"),
                    possibly_applied: false,
                };
            }
            Some(Err(e)) => break protocol(e.to_string()),
            Some(Ok(h)) => h,
        };
        shared.touch();
        match fast_read(&shared, &mut rd, &hdr) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => break e,
        }
        let handled = tokio::select! {
            r = handle_reply(&shared, &mut rd, hdr) => r,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = handled {
            break e;
        }
    };
    shared.fail(err);
}

/// Reacts to an NBD_ESHUTDOWN reply: the spec says the client MUST then
/// initiate a soft disconnect. The connection takes no more requests and
/// is reported Failed (its member is going away); the requests in flight
/// still get the server's answers until it closes the connection.
fn server_shutting_down(shared: &Shared) {
    let reason = "the server is shutting down (ESHUTDOWN)".to_string();
    tracing::warn!("{reason}: disconnecting");
    shared.soft_disconnect(ConnState::Failed(reason));
}

fn io_lost(e: std::io::Error) -> ClientError {
    ClientError::ConnectionLost {
        reason: format!("receive: {e}"),
        possibly_applied: false,
    }
}

/// Reads the payload of one reply into its request and completes the request when done.
async fn handle_reply(
    shared: &Shared,
    rd: &mut FramedRead<OwnedReadHalf, ClientTransmissionCodec>,
    hdr: ReplyHeader,
) -> Result<(), ClientError> {
    let key = hdr.cookie() as usize;
    let (command, offset, len, structured) = {
        let t = shared.table();
        let p = t
            .get(key)
            .ok_or_else(|| protocol(format!("reply for unknown cookie {key}")))?;
        (p.command, p.offset, p.len, shared.info.structured)
    };
    match hdr {
        ReplyHeader::Simple { error, .. } => {
            if command == cmd::READ && structured {
                return Err(protocol(
                    "simple reply to a READ after structured replies were negotiated",
                ));
            }
            if error == 0 && command == cmd::READ {
                let mut buf = take_buf(shared, key)?;
                let r = read_payload(rd, &mut buf[..len as usize]).await;
                put_buf(shared, key, buf);
                r.map_err(io_lost)?;
            }
            if error == 0 && command == cmd::BLOCK_STATUS {
                return Err(protocol("simple reply to BLOCK_STATUS"));
            }
            let p = shared.table().try_remove(key);
            if let Some(p) = p {
                let res = if error == 0 {
                    Ok(())
                } else {
                    Err(ClientError::Server {
                        errno: error,
                        message: String::new(),
                    })
                };
                p.finish(res);
            }
            if error == errno::ESHUTDOWN {
                server_shutting_down(shared);
            }
            Ok(())
        }
        ReplyHeader::Chunk {
            flags,
            kind,
            length,
            ..
        } => {
            match kind {
                reply::TYPE_OFFSET_DATA => {
                    if command != cmd::READ || length < 8 {
                        return Err(protocol("OFFSET_DATA chunk for a non-READ or too short"));
                    }
                    let mut off = [0u8; 8];
                    read_payload(rd, &mut off).await.map_err(io_lost)?;
                    let at = u64::from_be_bytes(off);
                    let n = (length - 8) as u64;
                    let start = chunk_start(at, n, offset, len)
                        .ok_or_else(|| protocol("OFFSET_DATA chunk outside the request"))?;
                    let mut buf = take_buf(shared, key)?;
                    let r = read_payload(rd, &mut buf[start..start + n as usize]).await;
                    put_buf(shared, key, buf);
                    r.map_err(io_lost)?;
                    if let Some(p) = shared.table().get_mut(key) {
                        p.received += n;
                    }
                }
                reply::TYPE_OFFSET_HOLE => {
                    if command != cmd::READ || length != 12 {
                        return Err(protocol("bad OFFSET_HOLE chunk"));
                    }
                    let mut b = [0u8; 12];
                    read_payload(rd, &mut b).await.map_err(io_lost)?;
                    let at = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                    let n = u32::from_be_bytes(b[8..].try_into().unwrap_or_default()) as u64;
                    let start = chunk_start(at, n, offset, len)
                        .ok_or_else(|| protocol("OFFSET_HOLE chunk outside the request"))?;
                    let mut t = shared.table();
                    if let Some(p) = t.get_mut(key) {
                        if let Some(buf) = p.buf.as_mut() {
                            buf[start..start + n as usize].fill(0);
                        }
                        p.received += n;
                    }
                }
                reply::TYPE_BLOCK_STATUS => {
                    let data = read_small(rd, length).await?;
                    let (id, wire) =
                        parse_block_status(&data).map_err(|e| protocol(e.to_string()))?;
                    if Some(id) == shared.info.allocation_context {
                        let mut t = shared.table();
                        if let Some(p) = t.get_mut(key) {
                            let mut at = p.offset;
                            for e in wire {
                                p.extents.push(Extent {
                                    offset: at,
                                    len: e.length as u64,
                                    flags: e.flags,
                                });
                                at = at.saturating_add(e.length as u64);
                            }
                        }
                    }
                }
                reply::TYPE_NONE => {
                    if length != 0 {
                        return Err(protocol("NONE chunk with a payload"));
                    }
                }
                k if k & reply::TYPE_FLAG_ERROR != 0 => {
                    let data = read_small(rd, length).await?;
                    let e = ErrorChunk::parse(k, &data).map_err(|e| protocol(e.to_string()))?;
                    if e.error == 0 {
                        return Err(protocol("error chunk with error 0"));
                    }
                    let mut t = shared.table();
                    if let Some(p) = t.get_mut(key) {
                        p.error.get_or_insert(ClientError::Server {
                            errno: e.error,
                            message: e.message,
                        });
                    }
                }
                other => {
                    // Unknown non-error chunk types must not be sent unnegotiated.
                    discard_payload(rd, length as u64).await.map_err(io_lost)?;
                    return Err(protocol(format!("unknown chunk type {other}")));
                }
            }
            if flags & reply::FLAG_DONE != 0 {
                let p = shared.table().try_remove(key);
                if let Some(p) = p {
                    return finish_structured(shared, p);
                }
            }
            Ok(())
        }
    }
}

/// Completes a piece whose structured reply ended (DONE).
fn finish_structured(shared: &Shared, p: Piece) -> Result<(), ClientError> {
    if let Some(e) = p.unanswered() {
        // The piece fails with the protocol error, then the connection.
        p.finish(Err(e.clone()));
        return Err(e);
    }
    let going_away = p.shutting_down();
    p.finish(Ok(()));
    if going_away {
        server_shutting_down(shared);
    }
    Ok(())
}

/// The common case of a READ reply whose data is already in the read
/// buffer (small reads arrive many per socket read): copies it into place
/// and completes the piece under one table lock. Returns false, having
/// consumed nothing, whenever anything is unusual; the general path then
/// handles (and reports) it.
fn fast_read(
    shared: &Shared,
    rd: &mut FramedRead<OwnedReadHalf, ClientTransmissionCodec>,
    hdr: &ReplyHeader,
) -> Result<bool, ClientError> {
    let (chunk, done, length) = match *hdr {
        ReplyHeader::Simple { error: 0, .. } if !shared.info.structured => (false, true, None),
        ReplyHeader::Chunk {
            flags,
            kind: reply::TYPE_OFFSET_DATA,
            length,
            ..
        } if length >= 8 => (true, flags & reply::FLAG_DONE != 0, Some(length)),
        _ => return Ok(false),
    };
    let key = hdr.cookie() as usize;
    let mut t = shared.table();
    let Some(p) = t.get_mut(key) else {
        return Ok(false);
    };
    if p.command != cmd::READ {
        return Ok(false);
    }
    let n = length.map_or(p.len, |l| l - 8) as usize;
    let head = if chunk { 8 } else { 0 };
    let buffered = rd.read_buffer();
    if buffered.len() < head + n {
        return Ok(false);
    }
    let at = if chunk {
        u64::from_be_bytes(buffered[..8].try_into().unwrap_or_default())
    } else {
        p.offset
    };
    let Some(start) = chunk_start(at, n as u64, p.offset, p.len) else {
        return Ok(false);
    };
    let Some(buf) = p.buf.as_mut() else {
        return Ok(false);
    };
    buf[start..start + n].copy_from_slice(&buffered[head..head + n]);
    rd.read_buffer_mut().advance(head + n);
    p.received += n as u64;
    if !done {
        return Ok(true);
    }
    let p = t.remove(key);
    drop(t);
    if chunk {
        finish_structured(shared, p)?;
    } else {
        p.finish(Ok(()));
    }
    Ok(true)
}

/// Returns where a chunk covering `[at, at + n)` starts in the buffer of a
/// request for `[offset, offset + len)`, or `None` if it does not lie
/// inside. `at` and `n` come from the server: nothing here may overflow.
fn chunk_start(at: u64, n: u64, offset: u64, len: u32) -> Option<usize> {
    let start = at.checked_sub(offset)?;
    (start.checked_add(n)? <= len as u64).then_some(start as usize)
}

async fn read_small(
    rd: &mut FramedRead<OwnedReadHalf, ClientTransmissionCodec>,
    length: u32,
) -> Result<Vec<u8>, ClientError> {
    if length > MAX_CHUNK {
        return Err(protocol(format!("chunk of {length} bytes is too large")));
    }
    let mut data = vec![0u8; length as usize];
    read_payload(rd, &mut data).await.map_err(io_lost)?;
    Ok(data)
}

fn take_buf(shared: &Shared, key: usize) -> Result<Vec<u8>, ClientError> {
    shared
        .table()
        .get_mut(key)
        .and_then(|p| p.buf.take())
        .ok_or_else(|| protocol("read reply for a request without a buffer"))
}

fn put_buf(shared: &Shared, key: usize, buf: Vec<u8>) {
    if let Some(p) = shared.table().get_mut(key) {
        p.buf = Some(buf);
    }
}

async fn watchdog(shared: std::sync::Weak<Shared>, t: Timeouts) {
    let shortest = [t.request, t.stall]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(1));
    let tick = (shortest / 4).max(Duration::from_millis(5));
    // Whole ticks that must pass: a piece born just before a tick sees one
    // tick less of real time, so add one (deadlines fire up to a tick late).
    let ticks_for = |d: Duration| (d.as_nanos().div_ceil(tick.as_nanos()) as u64) + 1;
    let request_ticks = t.request.map(ticks_for);
    let stall_ticks = t.stall.map(ticks_for);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut still) = (u64::MAX, 0u64);
    loop {
        interval.tick().await;
        let Some(s) = shared.upgrade() else { return };
        if s.failed.load(Ordering::Acquire) {
            return;
        }
        let now = s.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let (busy, expired) = {
            let tb = s.table();
            let expired = request_ticks
                .is_some_and(|limit| tb.iter().any(|(_, p)| now.saturating_sub(p.born) >= limit));
            (!tb.is_empty(), expired)
        };
        if expired {
            s.fail(ClientError::Timeout(t.request.unwrap_or_default()));
            return;
        }
        let progress = s.progress.load(Ordering::Relaxed);
        if !busy || progress != seen {
            (seen, still) = (progress, 0);
            continue;
        }
        still += 1;
        if stall_ticks.is_some_and(|limit| still >= limit) {
            s.fail(ClientError::Timeout(t.stall.unwrap_or_default()));
            return;
        }
    }
}
