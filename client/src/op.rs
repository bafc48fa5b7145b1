//! Logical operations and their completion.
//!
//! An [`Op`] is what the caller submitted; it travels on the wire as one or
//! more pieces (a READ or WRITE larger than the server's maximum payload is
//! split). When the last piece completes, the op's [`Completer`] delivers
//! one [`Done`]: to an `async fn` caller through a oneshot channel, or to a
//! [`CompletionSink`] (a completion ring).
//!
//! This module knows nothing of the ring or the client: the ring plugs in
//! through [`CompletionSink`], so dependencies run one way (the ring uses
//! the client, the client its connections, and all of them this module).
//!
//! A READ's buffer is the caller's [`IoBuf`] throughout: an unsplit read
//! travels in its one piece and the connection reads the reply straight
//! into it; a split read's buffer waits here while each piece reads into a
//! buffer of its own, copied into place as the piece completes.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nbdraid_proto::buf::IoBuf;
use tokio::sync::oneshot;

use crate::error::ClientError;

/// One extent of a block status answer (for `base:allocation`: HOLE=1, ZERO=2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset of the extent's first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Context flags.
    pub flags: u32,
}

/// The final outcome of an operation.
#[derive(Debug)]
pub struct Done {
    /// Success, or the first error of any of its pieces.
    pub result: Result<(), ClientError>,
    /// For READ: the caller's buffer, filled on success (handed back on
    /// failure too, whenever the engine still holds it). It is the very
    /// buffer the request carried, so a pooled one still returns to its pool.
    pub buffer: Option<IoBuf>,
    /// For BLOCK_STATUS: the extents, in order from the request's offset.
    pub extents: Vec<Extent>,
}

impl Done {
    /// Returns a completion with only a result.
    pub fn result(result: Result<(), ClientError>) -> Self {
        Self {
            result,
            buffer: None,
            extents: Vec::new(),
        }
    }
}

/// Takes the completions of operations submitted with a caller's value
/// attached (a completion ring implements it).
///
/// `complete` runs on a connection's task (or the submitter's, when a
/// piece is refused): it must be short and must not block.
pub(crate) trait CompletionSink: Send + Sync {
    /// Delivers the completion of the operation submitted with `caller_data`.
    fn complete(&self, caller_data: u64, done: Done);
}

/// Where an operation's completion goes.
pub(crate) enum Completer {
    /// An `async fn` caller waiting on a oneshot.
    Async(oneshot::Sender<Done>),
    /// A sink (a completion ring), with the caller's data.
    Sink(Arc<dyn CompletionSink>, u64),
}

impl Completer {
    /// Delivers `done` to wherever this completer points.
    pub(crate) fn complete(self, done: Done) {
        match self {
            Completer::Async(tx) => {
                // The caller may have stopped waiting; nothing to do then.
                let _ = tx.send(done);
            }
            Completer::Sink(sink, caller_data) => sink.complete(caller_data, done),
        }
    }
}

/// A submitted operation, shared by its pieces.
pub(crate) struct Op {
    pieces_left: AtomicUsize,
    state: Mutex<OpState>,
}

struct OpState {
    /// The caller's buffer for a split READ (pieces copy into it).
    buffer: Option<IoBuf>,
    extents: Vec<Extent>,
    error: Option<ClientError>,
    completer: Option<Completer>,
}

impl Op {
    pub(crate) fn new(pieces: usize, buffer: Option<IoBuf>, completer: Completer) -> Arc<Self> {
        Arc::new(Self {
            pieces_left: AtomicUsize::new(pieces),
            state: Mutex::new(OpState {
                buffer,
                extents: Vec::new(),
                error: None,
                completer: Some(completer),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one piece's outcome: its data (copied into place at
    /// `buf_off` for split reads, or the whole buffer for unsplit ones), its
    /// extents and error. Completes the op after the last piece.
    pub(crate) fn piece_done(
        &self,
        result: Result<(), ClientError>,
        data: Option<IoBuf>,
        buf_off: Option<usize>,
        extents: Vec<Extent>,
    ) {
        let finished = {
            let mut st = self.lock();
            match (data, buf_off) {
                (Some(d), Some(off)) if result.is_ok() => {
                    if let Some(b) = st.buffer.as_mut() {
                        b[off..off + d.len()].copy_from_slice(&d);
                    }
                }
                (Some(d), None) => st.buffer = Some(d),
                _ => {}
            }
            st.extents.extend(extents);
            if let Err(e) = result {
                st.error.get_or_insert(e);
            }
            if self.pieces_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let done = Done {
                    result: st.error.take().map_or(Ok(()), Err),
                    buffer: st.buffer.take(),
                    extents: std::mem::take(&mut st.extents),
                };
                st.completer.take().map(|c| (c, done))
            } else {
                None
            }
        };
        if let Some((c, done)) = finished {
            c.complete(done);
        }
    }
}
