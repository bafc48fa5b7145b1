//! Codecs for the transmission phase: request headers and reply headers.
//!
//! The decoders yield *headers only*. A WRITE's payload, a READ reply's data
//! and a structured chunk's payload stay in the byte stream for the caller
//! to read once it has decided where they go: the server reads a write's
//! payload only after the throttle has admitted the request, straight into
//! a buffer it accounts for; the client reads read data straight into the
//! caller's buffer. So no decoder here ever buffers a payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::ProtoError;
use crate::consts::*;

/// A compact (28-byte) transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (see [`crate::consts::cmd_flags`]).
    pub flags: u16,
    /// Command type (see [`crate::consts::cmd`]); unknown values are passed through.
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE, the payload that follows).
    pub length: u32,
}

impl RequestHeader {
    /// Appends the 28-byte wire form to `b`.
    pub fn put(&self, b: &mut impl BufMut) {
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(self.flags);
        b.put_u16(self.command);
        b.put_u64(self.cookie);
        b.put_u64(self.offset);
        b.put_u32(self.length);
    }

    /// Returns the number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A reply header: a simple reply or one structured chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; a successful READ's data follows (its length is the request's).
    Simple {
        /// Error number (0 = success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk header; `length` payload bytes follow.
    Chunk {
        /// Chunk flags (see [`crate::consts::reply`]).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Returns the cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }

    /// Returns the length of the wire form.
    pub fn wire_len(&self) -> usize {
        match self {
            ReplyHeader::Simple { .. } => SIMPLE_REPLY_LEN,
            ReplyHeader::Chunk { .. } => STRUCTURED_HEADER_LEN,
        }
    }

    /// Appends the wire form to `b`.
    pub fn put(&self, b: &mut impl BufMut) {
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                b.put_u32(SIMPLE_REPLY_MAGIC);
                b.put_u32(error);
                b.put_u64(cookie);
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
            } => {
                b.put_u32(STRUCTURED_REPLY_MAGIC);
                b.put_u16(flags);
                b.put_u16(kind);
                b.put_u64(cookie);
                b.put_u32(length);
            }
        }
    }
}

/// The server side of transmission: decodes [`RequestHeader`]s, encodes [`ReplyHeader`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTransmissionCodec;

impl Decoder for ServerTransmissionCodec {
    type Item = RequestHeader;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RequestHeader>, ProtoError> {
        if src.len() < REQUEST_HEADER_LEN {
            src.reserve(REQUEST_HEADER_LEN - src.len());
            return Ok(None);
        }
        let magic = (&src[..4]).get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                got: magic as u64,
            });
        }
        src.advance(4);
        Ok(Some(RequestHeader {
            flags: src.get_u16(),
            command: src.get_u16(),
            cookie: src.get_u64(),
            offset: src.get_u64(),
            length: src.get_u32(),
        }))
    }
}

impl Encoder<ReplyHeader> for ServerTransmissionCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: ReplyHeader, dst: &mut BytesMut) -> Result<(), ProtoError> {
        dst.reserve(item.wire_len());
        item.put(dst);
        Ok(())
    }
}

/// The client side of transmission: decodes [`ReplyHeader`]s, encodes [`RequestHeader`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTransmissionCodec;

impl Decoder for ClientTransmissionCodec {
    type Item = ReplyHeader;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ReplyHeader>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        match (&src[..4]).get_u32() {
            SIMPLE_REPLY_MAGIC => {
                if src.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                src.advance(4);
                Ok(Some(ReplyHeader::Simple {
                    error: src.get_u32(),
                    cookie: src.get_u64(),
                }))
            }
            STRUCTURED_REPLY_MAGIC => {
                if src.len() < STRUCTURED_HEADER_LEN {
                    return Ok(None);
                }
                src.advance(4);
                Ok(Some(ReplyHeader::Chunk {
                    flags: src.get_u16(),
                    kind: src.get_u16(),
                    cookie: src.get_u64(),
                    length: src.get_u32(),
                }))
            }
            other => Err(ProtoError::BadMagic {
                what: "reply",
                got: other as u64,
            }),
        }
    }
}

impl Encoder<RequestHeader> for ClientTransmissionCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: RequestHeader, dst: &mut BytesMut) -> Result<(), ProtoError> {
        dst.reserve(REQUEST_HEADER_LEN);
        item.put(dst);
        Ok(())
    }
}

/// The payload of a structured error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Error number (never 0).
    pub error: u32,
    /// Human-readable message.
    pub message: String,
    /// The offset concerned, for NBD_REPLY_TYPE_ERROR_OFFSET.
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Returns the wire payload of an NBD_REPLY_TYPE_ERROR chunk.
    pub fn encode(error: u32, message: &str) -> Bytes {
        let msg = crate::handshake::truncate_utf8(message, MAX_STRING_LEN);
        let mut b = BytesMut::with_capacity(6 + msg.len());
        b.put_u32(error);
        b.put_u16(msg.len() as u16);
        b.put_slice(msg.as_bytes());
        b.freeze()
    }

    /// Parses an error chunk payload of type `kind`.
    pub fn parse(kind: u16, mut data: &[u8]) -> Result<Self, ProtoError> {
        let bad = || ProtoError::Malformed("structured error chunk");
        if data.len() < 6 {
            return Err(bad());
        }
        let error = data.get_u32();
        let mlen = data.get_u16() as usize;
        if data.len() < mlen {
            return Err(bad());
        }
        let message = String::from_utf8_lossy(&data[..mlen]).into_owned();
        data.advance(mlen);
        let offset = if kind == reply::TYPE_ERROR_OFFSET {
            if data.len() != 8 {
                return Err(bad());
            }
            Some(data.get_u64())
        } else {
            None
        };
        Ok(Self {
            error,
            message,
            offset,
        })
    }
}

/// One extent of a block status reply: a length and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0 on the wire).
    pub length: u32,
    /// Context-specific flags (for `base:allocation`, see [`crate::consts::allocation`]).
    pub flags: u32,
}

/// Returns the wire payload of a BLOCK_STATUS chunk for `context_id`.
pub fn encode_block_status(context_id: u32, extents: &[Extent]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + 8 * extents.len());
    b.put_u32(context_id);
    for e in extents {
        b.put_u32(e.length);
        b.put_u32(e.flags);
    }
    b.freeze()
}

/// Parses a BLOCK_STATUS chunk payload into its context id and extents.
pub fn parse_block_status(mut data: &[u8]) -> Result<(u32, Vec<Extent>), ProtoError> {
    if data.len() < 12 || !(data.len() - 4).is_multiple_of(8) {
        return Err(ProtoError::Malformed("block status chunk"));
    }
    let id = data.get_u32();
    let mut extents = Vec::with_capacity(data.len() / 8);
    while data.has_remaining() {
        let length = data.get_u32();
        let flags = data.get_u32();
        if length == 0 {
            return Err(ProtoError::Malformed("block status extent of length 0"));
        }
        extents.push(Extent { length, flags });
    }
    Ok((id, extents))
}
