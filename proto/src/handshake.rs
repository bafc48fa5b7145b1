//! Codecs for the fixed newstyle handshake, one per side.
//!
//! [`ServerHandshakeCodec`] decodes what a client sends (client flags, then
//! option requests) and encodes what a server sends (greeting, option
//! replies, the NBD_OPT_EXPORT_NAME reply). [`ClientHandshakeCodec`] is its
//! mirror. Encoding with one and decoding with the other is the identity;
//! the property tests check exactly that.
//!
//! Option data is bounded: a request that declares more than
//! `max_option_len` bytes is skipped as it arrives (never buffered) and
//! surfaces as [`ClientMessage::Oversized`], so option framing survives a
//! 4 GiB declared length without a 4 GiB allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::ProtoError;
use crate::consts::*;

/// Default bound on the data of one option request (and one option reply).
pub const DEFAULT_MAX_OPTION_LEN: u32 = 64 * 1024;

/// What a client sends during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// The 32-bit client flags that answer the greeting.
    Flags(u32),
    /// One option request with its data.
    Option(OptionRequest),
    /// An option request whose declared data length exceeded the bound; the
    /// data has been consumed and dropped.
    Oversized {
        /// The option number.
        option: u32,
        /// The declared data length.
        len: u32,
    },
}

/// One option request: `IHAVEOPT`, the option number and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// The option number (see [`crate::consts::opt`]).
    pub option: u32,
    /// The option's data, exactly as sent.
    pub data: Bytes,
}

/// What a server sends during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
    Greeting {
        /// Handshake flags (see [`crate::consts::handshake_flags`]).
        flags: u16,
    },
    /// One option reply.
    OptionReply(OptionReply),
    /// The reply to NBD_OPT_EXPORT_NAME: size and transmission flags.
    ExportName {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
        /// Whether the 124 zero bytes follow (false once NO_ZEROES was negotiated).
        zeroes: bool,
    },
}

/// One option reply: the echoed option, a reply type and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option this answers.
    pub option: u32,
    /// Reply type (see [`crate::consts::rep`]).
    pub reply_type: u32,
    /// Reply data.
    pub data: Bytes,
}

impl OptionReply {
    /// Returns the final success reply for `option`.
    pub fn ack(option: u32) -> Self {
        Self::new(option, rep::ACK, Bytes::new())
    }

    /// Returns a reply of any type.
    pub fn new(option: u32, reply_type: u32, data: Bytes) -> Self {
        Self {
            option,
            reply_type,
            data,
        }
    }

    /// Returns an error reply carrying a human-readable message (truncated to
    /// the protocol's string limit).
    pub fn error(option: u32, reply_type: u32, message: &str) -> Self {
        let msg = truncate_utf8(message, MAX_STRING_LEN);
        Self::new(option, reply_type, Bytes::copy_from_slice(msg.as_bytes()))
    }

    /// Returns an NBD_REP_SERVER reply naming one export for NBD_OPT_LIST.
    pub fn server(name: &str, description: &str) -> Self {
        let mut b = BytesMut::with_capacity(4 + name.len() + description.len());
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_slice(description.as_bytes());
        Self::new(opt::LIST, rep::SERVER, b.freeze())
    }

    /// Returns an NBD_REP_INFO reply carrying `item`.
    pub fn info(option: u32, item: &InfoItem) -> Self {
        let mut b = BytesMut::with_capacity(16);
        item.put(&mut b);
        Self::new(option, rep::INFO, b.freeze())
    }

    /// Returns an NBD_REP_META_CONTEXT reply.
    pub fn meta_context(option: u32, id: u32, name: &str) -> Self {
        let mut b = BytesMut::with_capacity(4 + name.len());
        b.put_u32(id);
        b.put_slice(name.as_bytes());
        Self::new(option, rep::META_CONTEXT, b.freeze())
    }

    /// Reports whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & rep::FLAG_ERROR != 0
    }
}

/// One information item of an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// NBD_INFO_EXPORT: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// NBD_INFO_NAME.
    Name(String),
    /// NBD_INFO_DESCRIPTION.
    Description(String),
    /// NBD_INFO_BLOCK_SIZE.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An information type this codec does not know, with its raw data.
    Unknown(u16, Bytes),
}

impl InfoItem {
    /// Appends the wire form (type, then data) to `b`.
    pub fn put(&self, b: &mut impl BufMut) {
        match self {
            InfoItem::Export { size, flags } => {
                b.put_u16(info::EXPORT);
                b.put_u64(*size);
                b.put_u16(*flags);
            }
            InfoItem::Name(n) => {
                b.put_u16(info::NAME);
                b.put_slice(n.as_bytes());
            }
            InfoItem::Description(d) => {
                b.put_u16(info::DESCRIPTION);
                b.put_slice(d.as_bytes());
            }
            InfoItem::BlockSize {
                min,
                preferred,
                max,
            } => {
                b.put_u16(info::BLOCK_SIZE);
                b.put_u32(*min);
                b.put_u32(*preferred);
                b.put_u32(*max);
            }
            InfoItem::Unknown(t, data) => {
                b.put_u16(*t);
                b.put_slice(data);
            }
        }
    }

    /// Parses the data of an NBD_REP_INFO reply.
    pub fn parse(mut data: &[u8]) -> Result<Self, ProtoError> {
        let bad = || ProtoError::Malformed("NBD_REP_INFO");
        if data.len() < 2 {
            return Err(bad());
        }
        let t = data.get_u16();
        Ok(match t {
            info::EXPORT => {
                if data.len() != 10 {
                    return Err(bad());
                }
                InfoItem::Export {
                    size: data.get_u64(),
                    flags: data.get_u16(),
                }
            }
            info::NAME => InfoItem::Name(String::from_utf8_lossy(data).into_owned()),
            info::DESCRIPTION => InfoItem::Description(String::from_utf8_lossy(data).into_owned()),
            info::BLOCK_SIZE => {
                if data.len() != 12 {
                    return Err(bad());
                }
                InfoItem::BlockSize {
                    min: data.get_u32(),
                    preferred: data.get_u32(),
                    max: data.get_u32(),
                }
            }
            other => InfoItem::Unknown(other, Bytes::copy_from_slice(data)),
        })
    }
}

/// Returns the longest prefix of `s` that fits in `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Flags,
    Options,
    Skipping { option: u32, len: u32, left: u64 },
}

/// The server side of the handshake: decodes [`ClientMessage`]s, encodes
/// [`ServerMessage`]s.
#[derive(Debug, Clone)]
pub struct ServerHandshakeCodec {
    state: ServerState,
    max_option_len: u32,
}

impl Default for ServerHandshakeCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_OPTION_LEN)
    }
}

impl ServerHandshakeCodec {
    /// Returns a codec that expects client flags first and bounds option data
    /// to `max_option_len` bytes.
    pub fn new(max_option_len: u32) -> Self {
        Self {
            state: ServerState::Flags,
            max_option_len,
        }
    }
}

impl Decoder for ServerHandshakeCodec {
    type Item = ClientMessage;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientMessage>, ProtoError> {
        loop {
            match self.state {
                ServerState::Flags => {
                    if src.len() < 4 {
                        return Ok(None);
                    }
                    self.state = ServerState::Options;
                    return Ok(Some(ClientMessage::Flags(src.get_u32())));
                }
                ServerState::Options => {
                    if src.len() < OPTION_HEADER_LEN {
                        src.reserve(OPTION_HEADER_LEN - src.len());
                        return Ok(None);
                    }
                    let mut peek = &src[..OPTION_HEADER_LEN];
                    let (magic, option, len) = (peek.get_u64(), peek.get_u32(), peek.get_u32());
                    if magic != IHAVEOPT {
                        return Err(ProtoError::BadMagic {
                            what: "option request",
                            got: magic,
                        });
                    }
                    if len > self.max_option_len {
                        src.advance(OPTION_HEADER_LEN);
                        self.state = ServerState::Skipping {
                            option,
                            len,
                            left: len as u64,
                        };
                        continue;
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if src.len() < total {
                        src.reserve(total - src.len());
                        return Ok(None);
                    }
                    src.advance(OPTION_HEADER_LEN);
                    let data = src.split_to(len as usize).freeze();
                    return Ok(Some(ClientMessage::Option(OptionRequest { option, data })));
                }
                ServerState::Skipping { option, len, left } => {
                    let n = (src.len() as u64).min(left);
                    src.advance(n as usize);
                    let left = left - n;
                    if left > 0 {
                        self.state = ServerState::Skipping { option, len, left };
                        return Ok(None);
                    }
                    self.state = ServerState::Options;
                    return Ok(Some(ClientMessage::Oversized { option, len }));
                }
            }
        }
    }
}

impl Encoder<ServerMessage> for ServerHandshakeCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: ServerMessage, dst: &mut BytesMut) -> Result<(), ProtoError> {
        match item {
            ServerMessage::Greeting { flags } => {
                dst.reserve(GREETING_LEN);
                dst.put_u64(NBD_MAGIC);
                dst.put_u64(IHAVEOPT);
                dst.put_u16(flags);
            }
            ServerMessage::OptionReply(r) => {
                dst.reserve(OPTION_REPLY_HEADER_LEN + r.data.len());
                dst.put_u64(OPT_REPLY_MAGIC);
                dst.put_u32(r.option);
                dst.put_u32(r.reply_type);
                dst.put_u32(r.data.len() as u32);
                dst.put_slice(&r.data);
            }
            ServerMessage::ExportName {
                size,
                flags,
                zeroes,
            } => {
                dst.reserve(10 + EXPORT_NAME_PADDING);
                dst.put_u64(size);
                dst.put_u16(flags);
                if zeroes {
                    dst.put_bytes(0, EXPORT_NAME_PADDING);
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Greeting,
    Replies,
    ExportName { zeroes: bool },
}

/// The client side of the handshake: decodes [`ServerMessage`]s, encodes
/// [`ClientMessage`]s.
///
/// After sending NBD_OPT_EXPORT_NAME the caller must call
/// [`ClientHandshakeCodec::expect_export_name_reply`], because that reply
/// has no header to recognise it by.
#[derive(Debug, Clone)]
pub struct ClientHandshakeCodec {
    state: ClientState,
    max_reply_len: u32,
}

impl Default for ClientHandshakeCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_OPTION_LEN)
    }
}

impl ClientHandshakeCodec {
    /// Returns a codec that expects the greeting first and bounds reply data
    /// to `max_reply_len` bytes.
    pub fn new(max_reply_len: u32) -> Self {
        Self {
            state: ClientState::Greeting,
            max_reply_len,
        }
    }

    /// Makes the next decoded message the NBD_OPT_EXPORT_NAME reply.
    pub fn expect_export_name_reply(&mut self, zeroes: bool) {
        self.state = ClientState::ExportName { zeroes };
    }
}

impl Decoder for ClientHandshakeCodec {
    type Item = ServerMessage;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerMessage>, ProtoError> {
        match self.state {
            ClientState::Greeting => {
                if src.len() < GREETING_LEN {
                    return Ok(None);
                }
                let magic = src.get_u64();
                if magic != NBD_MAGIC {
                    return Err(ProtoError::BadMagic {
                        what: "server greeting",
                        got: magic,
                    });
                }
                let second = src.get_u64();
                if second != IHAVEOPT {
                    return Err(ProtoError::Unsupported(
                        "oldstyle negotiation (server did not send IHAVEOPT)",
                    ));
                }
                self.state = ClientState::Replies;
                Ok(Some(ServerMessage::Greeting {
                    flags: src.get_u16(),
                }))
            }
            ClientState::Replies => {
                if src.len() < OPTION_REPLY_HEADER_LEN {
                    return Ok(None);
                }
                let mut peek = &src[..OPTION_REPLY_HEADER_LEN];
                let magic = peek.get_u64();
                let (option, reply_type, len) = (peek.get_u32(), peek.get_u32(), peek.get_u32());
                if magic != OPT_REPLY_MAGIC {
                    return Err(ProtoError::BadMagic {
                        what: "option reply",
                        got: magic,
                    });
                }
                if len > self.max_reply_len {
                    return Err(ProtoError::TooLarge {
                        what: "option reply",
                        len: len as u64,
                    });
                }
                let total = OPTION_REPLY_HEADER_LEN + len as usize;
                if src.len() < total {
                    src.reserve(total - src.len());
                    return Ok(None);
                }
                src.advance(OPTION_REPLY_HEADER_LEN);
                let data = src.split_to(len as usize).freeze();
                Ok(Some(ServerMessage::OptionReply(OptionReply {
                    option,
                    reply_type,
                    data,
                })))
            }
            ClientState::ExportName { zeroes } => {
                let total = 10 + if zeroes { EXPORT_NAME_PADDING } else { 0 };
                if src.len() < total {
                    return Ok(None);
                }
                let size = src.get_u64();
                let flags = src.get_u16();
                src.advance(total - 10);
                self.state = ClientState::Replies;
                Ok(Some(ServerMessage::ExportName {
                    size,
                    flags,
                    zeroes,
                }))
            }
        }
    }
}

impl Encoder<ClientMessage> for ClientHandshakeCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: ClientMessage, dst: &mut BytesMut) -> Result<(), ProtoError> {
        match item {
            ClientMessage::Flags(f) => dst.put_u32(f),
            ClientMessage::Option(o) => {
                dst.reserve(OPTION_HEADER_LEN + o.data.len());
                dst.put_u64(IHAVEOPT);
                dst.put_u32(o.option);
                dst.put_u32(o.data.len() as u32);
                dst.put_slice(&o.data);
            }
            ClientMessage::Oversized { option, len } => {
                // Only the header: the caller streams the declared data itself.
                dst.put_u64(IHAVEOPT);
                dst.put_u32(option);
                dst.put_u32(len);
            }
        }
        Ok(())
    }
}
