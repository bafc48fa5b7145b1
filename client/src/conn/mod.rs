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
//!
//! This file holds the connection, its shared state and the submit path;
//! the tasks live in [`writer`], [`reader`] and [`watchdog`].
//!
//! A WRITE's piece holds a share of its payload ([`Bytes`], never a copy)
//! until it completes, and lets go of it before its completion is
//! delivered: a caller sharing one pooled buffer across several writes
//! gets it back in its pool once the last of them has completed (and the
//! writer, which lets go once its batch is in the socket, is done with it).

mod reader;
mod watchdog;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use slab::Slab;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use nbdraid_proto::buf::IoBuf;
use nbdraid_proto::consts::cmd;
use nbdraid_proto::{ClientHandshakeCodec, ClientTransmissionCodec, RequestHeader};

use crate::error::ClientError;
use crate::handshake::ExportInfo;
use crate::op::{Extent, Op};

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
    /// The operation this piece is part of.
    pub op: Arc<Op>,
    /// The NBD command.
    pub command: u16,
    /// Byte offset on the export.
    pub offset: u64,
    /// Length on the wire.
    pub len: u32,
    /// Where this piece's data goes in the op's buffer (split reads), or
    /// `None` when `buf` is the caller's own buffer.
    pub buf_off: Option<usize>,
    /// For READ: where the reply's data is read to.
    pub buf: Option<IoBuf>,
    /// For WRITE: this piece's share of the payload; the writer sends a
    /// clone of it, and the piece holds it until it completes.
    pub payload: Option<Bytes>,
    /// Watchdog tick at submission (set by [`Conn::submit`]): request
    /// deadlines are counted in ticks, so the hot path reads no clock.
    pub born: u64,
    /// For BLOCK_STATUS: the extents received so far.
    pub extents: Vec<Extent>,
    /// The first error a structured reply reported.
    pub error: Option<ClientError>,
    /// READ bytes covered so far by structured data and hole chunks.
    pub received: u64,
}

impl Piece {
    fn modifies(&self) -> bool {
        matches!(self.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES)
    }

    /// Completes the piece in its op. The payload share goes first, so
    /// whoever sees the completion no longer shares a buffer with it.
    pub(crate) fn finish(self, result: Result<(), ClientError>) {
        drop(self.payload);
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
        rd.read_buffer_mut().reserve(reader::READ_BUFFER);
        let mut tasks = vec![
            tokio::spawn(writer::writer(shared.clone(), wr, rx)),
            tokio::spawn(reader::reader(shared.clone(), rd)),
        ];
        if timeouts.request.is_some() || timeouts.stall.is_some() {
            let shared = Arc::downgrade(&shared);
            tasks.push(tokio::spawn(watchdog::watchdog(shared, timeouts)));
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

    /// Sends one piece (with its payload, if a WRITE); on failure hands it
    /// back with the error (boxed: the rare failure path should not make
    /// every result 168 bytes).
    pub(crate) fn submit(&self, piece: Piece, flags: u16) -> Result<(), Box<(Piece, ClientError)>> {
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
            // A second reference to the same bytes, not a copy.
            payload: piece.payload.clone(),
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
