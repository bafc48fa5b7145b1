//! The reader task: reply decoding, matching by cookie, structured chunks.
//!
//! Replies arrive in any order; each names the cookie of its request (the
//! key of its piece in the shared table). A READ's data is read straight
//! into the piece's [`IoBuf`] (for an unsplit read, the very buffer the
//! caller will send from): what the codec already buffered is copied
//! from there, the rest comes straight from the socket, and small replies
//! that arrived whole in one socket read are placed under one table lock
//! ([`fast_read`]).
//!
//! Everything the server sends is checked before it is used: an unknown
//! cookie, a chunk outside its request, a structured reply that does not
//! cover its READ, an oversized non-data chunk are protocol errors that
//! fail the connection, never panics or stray writes into a buffer.
//!
//! [`IoBuf`]: nbdraid_proto::buf::IoBuf

use std::sync::Arc;

use bytes::Buf;
use futures::StreamExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use nbdraid_proto::buf::IoBuf;
use nbdraid_proto::consts::{cmd, errno, reply};
use nbdraid_proto::io::{discard_payload, read_payload};
use nbdraid_proto::transmission::parse_block_status;
use nbdraid_proto::{ClientTransmissionCodec, ErrorChunk, ReplyHeader};

use super::{ConnState, Piece, Shared};
use crate::error::ClientError;
use crate::op::Extent;

/// Reply data read per socket read when small replies are batched.
pub(super) const READ_BUFFER: usize = 256 * 1024;
/// Largest non-data chunk payload accepted (block status, errors).
const MAX_CHUNK: u32 = 16 << 20;

impl Piece {
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
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// Reads replies until the connection fails or stops; a failure fails the
/// connection (and with it every piece in flight).
pub(super) async fn reader(
    shared: Arc<Shared>,
    mut rd: FramedRead<OwnedReadHalf, ClientTransmissionCodec>,
) {
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

fn take_buf(shared: &Shared, key: usize) -> Result<IoBuf, ClientError> {
    shared
        .table()
        .get_mut(key)
        .and_then(|p| p.buf.take())
        .ok_or_else(|| protocol("read reply for a request without a buffer"))
}

fn put_buf(shared: &Shared, key: usize, buf: IoBuf) {
    if let Some(p) = shared.table().get_mut(key) {
        p.buf = Some(buf);
    }
}
