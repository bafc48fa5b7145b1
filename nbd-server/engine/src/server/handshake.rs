//! The server side of the fixed newstyle handshake.
//!
//! Every option gets exactly one final reply (an ACK or an error), so
//! option framing is never lost: unknown and malformed options are answered
//! and negotiation continues. The connection is dropped only where the spec
//! says so: unknown client flags, a bad option magic, an unknown export
//! with NBD_OPT_EXPORT_NAME (which has no error reply), or a non-fixed
//! newstyle client sending anything but NBD_OPT_EXPORT_NAME.

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Encoder, FramedRead};

use nbdraid_proto::consts::{
    client_flags, handshake_flags, info, opt, rep, transmission_flags as tf,
};
use nbdraid_proto::{
    ClientMessage, InfoItem, InfoRequest, MetaContextRequest, OptionReply, ProtoError,
    ServerHandshakeCodec, ServerMessage, ServerTransmissionCodec, consts,
};

use super::{Engine, Export, ExportRegistry};
use crate::device::{BlockDevice, DeviceInfo};

/// The context id this server gives `base:allocation` once selected.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled: the export and the connection's options.
pub(super) struct Session<D> {
    pub export: Export<D>,
    pub info: DeviceInfo,
    pub structured: bool,
    /// Context id of `base:allocation` when it was selected for this export.
    pub meta_context: Option<u32>,
    pub reader: FramedRead<OwnedReadHalf, ServerTransmissionCodec>,
    pub writer: OwnedWriteHalf,
}

/// Returns the transmission flags advertised for a device.
pub(super) fn transmission_flags(info: &DeviceInfo, structured: bool) -> u16 {
    let mut f = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA;
    if info.read_only {
        f |= tf::READ_ONLY;
    } else {
        if info.can_trim {
            f |= tf::SEND_TRIM;
        }
        if info.can_zero {
            f |= tf::SEND_WRITE_ZEROES;
            if info.can_fast_zero {
                f |= tf::SEND_FAST_ZERO;
            }
        }
    }
    if info.can_cache {
        f |= tf::SEND_CACHE;
    }
    if info.multi_conn {
        f |= tf::CAN_MULTI_CONN;
    }
    if info.rotational {
        f |= tf::ROTATIONAL;
    }
    if structured {
        f |= tf::SEND_DF;
    }
    f
}

struct Replies {
    wr: OwnedWriteHalf,
    codec: ServerHandshakeCodec,
    buf: BytesMut,
}

impl Replies {
    fn push(&mut self, msg: ServerMessage) -> Result<(), ProtoError> {
        self.codec.encode(msg, &mut self.buf)
    }

    fn reply(&mut self, r: OptionReply) -> Result<(), ProtoError> {
        self.push(ServerMessage::OptionReply(r))
    }

    async fn flush(&mut self) -> Result<(), ProtoError> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// What handling one option led to.
enum Step<D> {
    /// Negotiation goes on.
    Continue,
    /// The client ends negotiation without entering transmission.
    End,
    /// Transmission begins with this export.
    Enter(Export<D>, DeviceInfo),
}

/// The state of one connection's option haggling.
struct Negotiation<'a, D, R> {
    engine: &'a Engine<D, R>,
    out: Replies,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// The export for which `base:allocation` was selected, if any.
    meta: Option<String>,
}

/// Runs the handshake; returns the session, or `None` when the client
/// ended negotiation without entering transmission.
pub(super) async fn negotiate<D: BlockDevice, R: ExportRegistry<D>>(
    engine: &Engine<D, R>,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
) -> Result<Option<Session<D>>, ProtoError> {
    let mut reader = FramedRead::new(rd, ServerHandshakeCodec::new(engine.config.max_option_len));
    let mut out = Replies {
        wr,
        codec: ServerHandshakeCodec::default(),
        buf: BytesMut::with_capacity(256),
    };
    out.push(ServerMessage::Greeting {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    })?;
    out.flush().await?;

    let cflags = match reader.next().await {
        Some(Ok(ClientMessage::Flags(f))) => f,
        Some(Err(e)) => return Err(e),
        _ => return Ok(None),
    };
    if cflags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return Err(ProtoError::Unsupported("unknown client flags"));
    }
    let mut n = Negotiation {
        engine,
        out,
        fixed: cflags & client_flags::FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & client_flags::NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    loop {
        let msg = tokio::select! {
            m = reader.next() => m,
            _ = engine.shutdown.cancelled() => return Ok(None),
        };
        let step = match msg {
            None => return Ok(None),
            Some(Err(e)) => return Err(e),
            Some(Ok(ClientMessage::Flags(_))) => return Err(ProtoError::Malformed("flags twice")),
            Some(Ok(ClientMessage::Oversized { option, len })) => n.oversized(option, len)?,
            Some(Ok(ClientMessage::Option(o))) => n.option(o.option, &o.data).await?,
        };
        match step {
            Step::Continue => n.out.flush().await?,
            Step::End => return Ok(None),
            Step::Enter(export, info) => {
                n.out.flush().await?;
                return Ok(Some(n.session(reader, export, info)));
            }
        }
    }
}

impl<D: BlockDevice, R: ExportRegistry<D>> Negotiation<'_, D, R> {
    /// Answers one option.
    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Step<D>, ProtoError> {
        tracing::debug!(option, len = data.len(), "option");
        if !self.fixed && option != opt::EXPORT_NAME {
            return Err(ProtoError::Unsupported(
                "non-fixed newstyle client sent an option other than EXPORT_NAME",
            ));
        }
        match option {
            opt::EXPORT_NAME => self.export_name(data),
            opt::ABORT => {
                self.out.reply(OptionReply::ack(option))?;
                // The client may already have closed; that is its right.
                let _ = self.out.flush().await;
                Ok(Step::End)
            }
            opt::LIST => self.list(data),
            opt::STARTTLS => {
                let (t, m) = if data.is_empty() {
                    (rep::ERR_UNSUP, "TLS is not supported by this server")
                } else {
                    (rep::ERR_INVALID, "STARTTLS takes no data")
                };
                self.reply_error(option, t, m)
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self.reply_error(
                        option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured = true;
                self.out.reply(OptionReply::ack(option))?;
                Ok(Step::Continue)
            }
            opt::INFO | opt::GO => self.info_or_go(option, data),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data),
            other => self.reply_error(
                other,
                rep::ERR_UNSUP,
                &format!("option {other} is not supported"),
            ),
        }
    }

    fn reply_error(&mut self, option: u32, code: u32, msg: &str) -> Result<Step<D>, ProtoError> {
        self.out.reply(OptionReply::error(option, code, msg))?;
        Ok(Step::Continue)
    }

    fn shutting_down(&self) -> bool {
        self.engine.shutdown.is_cancelled()
    }

    /// An option whose data exceeded the bound: skipped as it arrived.
    fn oversized(&mut self, option: u32, len: u32) -> Result<Step<D>, ProtoError> {
        tracing::debug!(option, len, "oversized option");
        if !self.fixed {
            return Err(ProtoError::TooLarge {
                what: "option",
                len: len as u64,
            });
        }
        self.reply_error(
            option,
            rep::ERR_TOO_BIG,
            &format!("option data of {len} bytes is too large"),
        )
    }

    /// NBD_OPT_EXPORT_NAME: no error reply exists, so an unknown export
    /// (or a server shutting down) ends the connection.
    fn export_name(&mut self, data: &[u8]) -> Result<Step<D>, ProtoError> {
        let Ok(name) = nbdraid_proto::options::parse_string(data) else {
            return Err(ProtoError::Malformed("export name"));
        };
        if self.shutting_down() {
            return Ok(Step::End);
        }
        let Some(export) = self.engine.registry.lookup(&name) else {
            tracing::info!(export = %name, "unknown export requested with EXPORT_NAME");
            return Ok(Step::End);
        };
        let info = export.device.info();
        self.out.push(ServerMessage::ExportName {
            size: info.size,
            flags: transmission_flags(&info, self.structured),
            zeroes: !self.no_zeroes,
        })?;
        Ok(Step::Enter(export, info))
    }

    fn list(&mut self, data: &[u8]) -> Result<Step<D>, ProtoError> {
        if !data.is_empty() {
            return self.reply_error(opt::LIST, rep::ERR_INVALID, "LIST takes no data");
        }
        if self.shutting_down() {
            return self.reply_error(opt::LIST, rep::ERR_SHUTDOWN, "server is shutting down");
        }
        for (name, desc) in self.engine.registry.list() {
            self.out.reply(OptionReply::server(&name, &desc))?;
        }
        self.out.reply(OptionReply::ack(opt::LIST))?;
        Ok(Step::Continue)
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: the same information, and GO enters
    /// transmission after its ACK.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Step<D>, ProtoError> {
        let req = match InfoRequest::parse(data) {
            Ok(r) => r,
            Err(e) => return self.reply_error(option, rep::ERR_INVALID, &e.to_string()),
        };
        if self.shutting_down() {
            return self.reply_error(option, rep::ERR_SHUTDOWN, "server is shutting down");
        }
        let Some(export) = self.engine.registry.lookup(&req.name) else {
            return self.reply_error(
                option,
                rep::ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            );
        };
        let info = export.device.info();
        let flags = transmission_flags(&info, self.structured);
        let out = &mut self.out;
        out.reply(OptionReply::info(
            option,
            &InfoItem::Export {
                size: info.size,
                flags,
            },
        ))?;
        if req.requests.contains(&info::NAME) {
            out.reply(OptionReply::info(
                option,
                &InfoItem::Name(export.name.clone()),
            ))?;
        }
        if req.requests.contains(&info::DESCRIPTION) {
            out.reply(OptionReply::info(
                option,
                &InfoItem::Description(info.description.clone()),
            ))?;
        }
        // Sent whether asked or not (allowed), so clients that care learn the limits.
        let bs = info.block_sizes;
        out.reply(OptionReply::info(
            option,
            &InfoItem::BlockSize {
                min: bs.min,
                preferred: bs.preferred,
                max: bs.max,
            },
        ))?;
        out.reply(OptionReply::ack(option))?;
        if option == opt::GO {
            return Ok(Step::Enter(export, info));
        }
        Ok(Step::Continue)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Step<D>, ProtoError> {
        let set = option == opt::SET_META_CONTEXT;
        match meta_context(self.engine, option, data, self.structured) {
            Err(r) => self.out.reply(r)?,
            Ok((export, selected)) => {
                if selected {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    self.out.reply(OptionReply::meta_context(
                        option,
                        id,
                        consts::BASE_ALLOCATION,
                    ))?;
                }
                if set {
                    self.meta = selected.then_some(export);
                }
                self.out.reply(OptionReply::ack(option))?;
            }
        }
        Ok(Step::Continue)
    }

    /// Builds the transmission session for `export`.
    fn session(
        self,
        reader: FramedRead<OwnedReadHalf, ServerHandshakeCodec>,
        export: Export<D>,
        info: DeviceInfo,
    ) -> Session<D> {
        // `base:allocation` counts only if it was selected for this very export.
        let selected = self.structured && self.meta.as_deref() == Some(export.name.as_str());
        Session {
            meta_context: selected.then_some(BASE_ALLOCATION_ID),
            export,
            info,
            structured: self.structured,
            reader: reader.map_decoder(|_| ServerTransmissionCodec),
            writer: self.out.wr,
        }
    }
}

/// Answers LIST/SET_META_CONTEXT: returns the export's canonical name and
/// whether `base:allocation` matches, or the error reply to send.
fn meta_context<D: BlockDevice, R: ExportRegistry<D>>(
    engine: &Engine<D, R>,
    option: u32,
    data: &[u8],
    structured: bool,
) -> Result<(String, bool), OptionReply> {
    let set = option == opt::SET_META_CONTEXT;
    if set && !structured {
        return Err(OptionReply::error(
            option,
            rep::ERR_INVALID,
            "SET_META_CONTEXT needs structured replies first",
        ));
    }
    let req = MetaContextRequest::parse(data)
        .map_err(|e| OptionReply::error(option, rep::ERR_INVALID, &e.to_string()))?;
    if let Some(q) = req.queries.iter().find(|q| !q.contains(':')) {
        return Err(OptionReply::error(
            option,
            rep::ERR_INVALID,
            &format!("meta context query {q:?} has no namespace"),
        ));
    }
    let Some(export) = engine.registry.lookup(&req.export) else {
        return Err(OptionReply::error(
            option,
            rep::ERR_UNKNOWN,
            &format!("no export named {:?}", req.export),
        ));
    };
    let selected = if req.queries.is_empty() {
        // LIST with no queries lists everything; SET with none selects nothing.
        !set
    } else {
        req.queries
            .iter()
            .any(|q| q == consts::BASE_ALLOCATION || (!set && q == "base:"))
    };
    Ok((export.name, selected))
}
