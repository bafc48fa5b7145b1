//! The client side of the fixed newstyle handshake.
//!
//! Order: client flags; NBD_OPT_STRUCTURED_REPLY; NBD_OPT_SET_META_CONTEXT
//! for `base:allocation` when structured replies were granted; then
//! NBD_OPT_GO asking for block sizes, name and description. A server that
//! does not know GO (NBD_REP_ERR_UNSUP) gets NBD_OPT_EXPORT_NAME instead.

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Encoder, FramedRead};

use nbdraid_proto::consts::{
    self, client_flags, handshake_flags, info, opt, rep, transmission_flags as tf,
};
use nbdraid_proto::options::parse_meta_context_reply;
use nbdraid_proto::{
    ClientHandshakeCodec, ClientMessage, InfoItem, InfoRequest, MetaContextRequest, OptionReply,
    OptionRequest, ServerMessage,
};

use crate::error::{ClientError, Result};

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name as requested.
    pub name: String,
    /// Canonical name, if the server sent one.
    pub canonical_name: Option<String>,
    /// Description, if the server sent one.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (1 if not advertised).
    pub min_block: u32,
    /// Preferred block size (4096 if not advertised).
    pub preferred_block: u32,
    /// Maximum payload (32 MiB if not advertised or unlimited), a multiple
    /// of `min_block`.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, if selected.
    pub allocation_context: Option<u32>,
    /// The server needed the NBD_OPT_EXPORT_NAME fallback.
    pub used_export_name: bool,
}

impl ExportInfo {
    /// Reports whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Reports whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.has(tf::READ_ONLY)
    }

    /// Reports whether FLUSH/FUA on one connection cover every connection.
    pub fn multi_conn(&self) -> bool {
        self.has(tf::CAN_MULTI_CONN)
    }
}

/// Handshake choices.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// Ask for structured replies.
    pub structured: bool,
    /// Ask for `base:allocation` (needs structured replies).
    pub block_status: bool,
}

impl Default for HandshakeOptions {
    fn default() -> Self {
        Self {
            structured: true,
            block_status: true,
        }
    }
}

fn hs(msg: impl Into<String>) -> ClientError {
    ClientError::Handshake(msg.into())
}

struct Talk {
    rd: FramedRead<OwnedReadHalf, ClientHandshakeCodec>,
    wr: OwnedWriteHalf,
    buf: BytesMut,
}

impl Talk {
    async fn send(&mut self, m: ClientMessage) -> Result<()> {
        self.buf.clear();
        ClientHandshakeCodec::default()
            .encode(m, &mut self.buf)
            .map_err(|e| hs(e.to_string()))?;
        self.wr
            .write_all(&self.buf)
            .await
            .map_err(|e| hs(format!("send: {e}")))
    }

    async fn option(&mut self, option: u32, data: bytes::Bytes) -> Result<()> {
        self.send(ClientMessage::Option(OptionRequest { option, data }))
            .await
    }

    async fn next(&mut self) -> Result<ServerMessage> {
        match self.rd.next().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(hs(e.to_string())),
            None => Err(hs("server closed the connection during the handshake")),
        }
    }

    async fn reply(&mut self, option: u32) -> Result<OptionReply> {
        match self.next().await? {
            ServerMessage::OptionReply(r) if r.option == option => Ok(r),
            ServerMessage::OptionReply(r) => Err(hs(format!(
                "reply to option {} while waiting for option {option}",
                r.option
            ))),
            other => Err(hs(format!("unexpected {other:?}"))),
        }
    }
}

fn error_text(r: &OptionReply) -> String {
    let what = match r.reply_type {
        rep::ERR_UNSUP => "unsupported",
        rep::ERR_POLICY => "refused by policy",
        rep::ERR_INVALID => "invalid",
        rep::ERR_UNKNOWN => "unknown export",
        rep::ERR_SHUTDOWN => "server shutting down",
        rep::ERR_TLS_REQD => "TLS required",
        rep::ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        rep::ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(&r.data);
    if msg.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {msg}")
    }
}

/// Checks the server's NBD_INFO_BLOCK_SIZE and returns the (minimum,
/// preferred, maximum payload) the client will use.
///
/// Every request must be a multiple of the minimum, and requests are split
/// at the maximum payload, so the maximum is rounded down to a multiple of
/// the minimum (the spec allows any maximum at least the preferred size,
/// e.g. 1000 with a minimum of 512). A minimum that is not a power of two
/// up to 64 KiB, or a maximum below it, breaks the spec's MUSTs and leaves
/// no way to form valid requests: the handshake fails rather than
/// dividing by zero later. The preferred size is only a hint.
fn block_sizes(min: u32, preferred: u32, max: u32) -> Result<(u32, u32, u32)> {
    let bad = || {
        hs(format!(
            "invalid block sizes from the server: minimum {min}, preferred {preferred}, maximum {max}"
        ))
    };
    if !min.is_power_of_two() || min > 64 * 1024 {
        return Err(bad());
    }
    let max = if max == u32::MAX { 32 << 20 } else { max };
    let max = max - max % min;
    if max == 0 {
        return Err(bad());
    }
    let preferred = if preferred.is_power_of_two() && preferred >= min {
        preferred
    } else {
        min.max(4096)
    };
    Ok((min, preferred, max))
}

/// Negotiates `export` on a connected stream; returns the export's
/// information and the stream halves, positioned at the transmission phase.
pub async fn negotiate(
    stream: TcpStream,
    export: &str,
    opts: &HandshakeOptions,
) -> Result<(
    ExportInfo,
    FramedRead<OwnedReadHalf, ClientHandshakeCodec>,
    OwnedWriteHalf,
)> {
    let (rd, wr) = stream.into_split();
    let mut t = Talk {
        rd: FramedRead::new(rd, ClientHandshakeCodec::default()),
        wr,
        buf: BytesMut::new(),
    };
    let ServerMessage::Greeting { flags: sflags } = t.next().await? else {
        return Err(hs("expected the server greeting"));
    };
    let fixed = sflags & handshake_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = sflags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= client_flags::FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    t.send(ClientMessage::Flags(cflags)).await?;

    let mut info = ExportInfo {
        name: export.to_string(),
        canonical_name: None,
        description: None,
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
        structured: false,
        allocation_context: None,
        used_export_name: false,
    };

    if fixed && opts.structured {
        t.option(opt::STRUCTURED_REPLY, bytes::Bytes::new()).await?;
        let r = t.reply(opt::STRUCTURED_REPLY).await?;
        info.structured = r.reply_type == rep::ACK;
    }
    if info.structured && opts.block_status {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![consts::BASE_ALLOCATION.to_string()],
        };
        t.option(opt::SET_META_CONTEXT, req.encode()).await?;
        loop {
            let r = t.reply(opt::SET_META_CONTEXT).await?;
            match r.reply_type {
                rep::META_CONTEXT => {
                    let (id, name) =
                        parse_meta_context_reply(&r.data).map_err(|e| hs(e.to_string()))?;
                    if name == consts::BASE_ALLOCATION {
                        info.allocation_context = Some(id);
                    }
                }
                _ => break, // ACK, or an error: block status is then unavailable.
            }
        }
    }

    if fixed {
        let req = InfoRequest {
            name: export.to_string(),
            requests: vec![info::BLOCK_SIZE, info::NAME, info::DESCRIPTION],
        };
        t.option(opt::GO, req.encode()).await?;
        loop {
            let r = t.reply(opt::GO).await?;
            match r.reply_type {
                rep::INFO => match InfoItem::parse(&r.data).map_err(|e| hs(e.to_string()))? {
                    InfoItem::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                    }
                    InfoItem::Name(n) => info.canonical_name = Some(n),
                    InfoItem::Description(d) => info.description = Some(d),
                    InfoItem::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        (info.min_block, info.preferred_block, info.max_payload) =
                            block_sizes(min, preferred, max)?;
                    }
                    InfoItem::Unknown(..) => {}
                },
                rep::ACK => {
                    if info.flags & tf::HAS_FLAGS == 0 {
                        return Err(hs("server finished GO without NBD_INFO_EXPORT"));
                    }
                    return Ok((info, t.rd, t.wr));
                }
                rep::ERR_UNSUP => break,
                _ => return Err(hs(format!("export {export:?}: {}", error_text(&r)))),
            }
        }
    }

    // Fallback: NBD_OPT_EXPORT_NAME (no error reply exists: a close means "no").
    t.option(
        opt::EXPORT_NAME,
        bytes::Bytes::copy_from_slice(export.as_bytes()),
    )
    .await?;
    t.rd.decoder_mut().expect_export_name_reply(!no_zeroes);
    match t.next().await {
        Ok(ServerMessage::ExportName { size, flags, .. }) => {
            info.size = size;
            info.flags = flags;
            info.used_export_name = true;
            // Meta contexts are tied to GO; without it there is no block status.
            info.allocation_context = None;
            Ok((info, t.rd, t.wr))
        }
        Ok(other) => Err(hs(format!("unexpected {other:?}"))),
        Err(_) => Err(hs(format!("server refused export {export:?}"))),
    }
}
