//! An in-process fake NBD server speaking the real codec
//! (`ServerHandshakeCodec`, `ServerTransmissionCodec`), for behaviour real
//! servers cannot be made to produce.
//!
//! [`FakeServer::start`] listens on 127.0.0.1:0, negotiates each accepted
//! connection as its [`Export`] says (GO or only EXPORT_NAME, structured
//! replies or not, block sizes, which names exist), then hands the
//! connection in transmission phase to the test's handler as a
//! [`FakeConn`]. The handler scripts the replies: [`FakeConn::serve_memory`]
//! is an ordinary in-memory disk, [`FakeConn::stall`] never answers, and
//! tests write their own loops for everything else. Every request header
//! received on any connection is logged, so a test can check what reached
//! the server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::codec::{Encoder, FramedRead};

use nbdraid_proto::consts::{
    self, allocation, client_flags, cmd, errno, handshake_flags, opt, rep, reply,
    transmission_flags as tf,
};
use nbdraid_proto::io::read_payload;
use nbdraid_proto::transmission::encode_block_status;
use nbdraid_proto::{
    ClientMessage, ErrorChunk, InfoItem, InfoRequest, MetaContextRequest, OptionReply, ReplyHeader,
    RequestHeader, ServerHandshakeCodec, ServerMessage, ServerTransmissionCodec,
};

/// The context id the fake server gives `base:allocation`.
pub const ALLOCATION_ID: u32 = 7;

/// What the fake server advertises and how it negotiates.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export size.
    pub size: u64,
    /// Transmission flags (HAS_FLAGS is added).
    pub flags: u16,
    /// Names that exist; empty means every name does.
    pub names: Vec<String>,
    /// Answer NBD_OPT_GO (otherwise NBD_REP_ERR_UNSUP, forcing EXPORT_NAME).
    pub go: bool,
    /// Grant structured replies and `base:allocation`.
    pub structured: bool,
    /// NBD_INFO_BLOCK_SIZE (min, preferred, max) to send in GO.
    pub block_size: Option<(u32, u32, u32)>,
    /// Advertise NO_ZEROES in the greeting.
    pub no_zeroes: bool,
    /// Advertise FIXED_NEWSTYLE (without it a client may only send EXPORT_NAME).
    pub fixed: bool,
}

impl Default for Export {
    fn default() -> Self {
        Self {
            size: 1 << 20,
            flags: tf::SEND_FLUSH
                | tf::SEND_FUA
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES
                | tf::SEND_CACHE
                | tf::SEND_FAST_ZERO,
            names: Vec::new(),
            go: true,
            structured: true,
            block_size: None,
            no_zeroes: true,
            fixed: true,
        }
    }
}

/// One request as received: its header and, for WRITE, its payload.
#[derive(Debug, Clone)]
pub struct Req {
    /// The header.
    pub hdr: RequestHeader,
    /// WRITE payload (empty otherwise).
    pub data: Vec<u8>,
}

/// How to answer a request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Success without data.
    Ok,
    /// A successful READ with its data.
    Data(Vec<u8>),
    /// A successful BLOCK_STATUS with (length, flags) extents.
    Extents(Vec<(u32, u32)>),
    /// An error with an errno and a message (sent when structured).
    Err(u32, String),
}

/// The server-side state of one connection in transmission phase.
pub struct FakeConn {
    rd: FramedRead<OwnedReadHalf, ServerTransmissionCodec>,
    wr: OwnedWriteHalf,
    out: BytesMut,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The export this connection serves.
    pub export: Export,
    log: Arc<Mutex<Vec<RequestHeader>>>,
}

impl FakeConn {
    /// Returns the next request (reading a WRITE's payload), or `None` at
    /// EOF, on a broken stream or on NBD_CMD_DISC.
    pub async fn recv(&mut self) -> Option<Req> {
        let hdr = self.rd.next().await?.ok()?;
        self.log.lock().unwrap().push(hdr);
        if hdr.command == cmd::DISC {
            return None;
        }
        let mut data = vec![0u8; hdr.payload_len() as usize];
        read_payload(&mut self.rd, &mut data).await.ok()?;
        Some(Req { hdr, data })
    }

    /// Sends raw bytes (for malformed replies).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(bytes).await
    }

    /// Sends a simple reply with `data` after it.
    pub async fn send_simple(
        &mut self,
        cookie: u64,
        error: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.out.clear();
        ServerTransmissionCodec
            .encode(ReplyHeader::Simple { error, cookie }, &mut self.out)
            .expect("encode");
        self.out.put_slice(data);
        self.wr.write_all(&self.out).await
    }

    /// Sends one structured chunk.
    pub async fn send_chunk(
        &mut self,
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.out.clear();
        let length = payload.len() as u32;
        ServerTransmissionCodec
            .encode(
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    length,
                },
                &mut self.out,
            )
            .expect("encode");
        self.out.put_slice(payload);
        self.wr.write_all(&self.out).await
    }

    /// Sends an OFFSET_DATA chunk for `data` at `offset`.
    pub async fn send_data_chunk(
        &mut self,
        cookie: u64,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> std::io::Result<()> {
        let mut p = Vec::with_capacity(8 + data.len());
        p.extend_from_slice(&offset.to_be_bytes());
        p.extend_from_slice(data);
        let flags = if done { reply::FLAG_DONE } else { 0 };
        self.send_chunk(cookie, flags, reply::TYPE_OFFSET_DATA, &p)
            .await
    }

    /// Answers `req` in the form the negotiation calls for (structured
    /// chunks for READ data, block status and errors when structured).
    pub async fn reply(&mut self, req: &Req, answer: Answer) -> std::io::Result<()> {
        let cookie = req.hdr.cookie;
        match answer {
            Answer::Ok => self.send_simple(cookie, 0, &[]).await,
            Answer::Data(d) if self.structured => {
                self.send_data_chunk(cookie, req.hdr.offset, &d, true).await
            }
            Answer::Data(d) => self.send_simple(cookie, 0, &d).await,
            Answer::Extents(ext) => {
                let ext: Vec<_> = ext
                    .into_iter()
                    .map(|(length, flags)| nbdraid_proto::Extent { length, flags })
                    .collect();
                let p = encode_block_status(ALLOCATION_ID, &ext);
                self.send_chunk(cookie, reply::FLAG_DONE, reply::TYPE_BLOCK_STATUS, &p)
                    .await
            }
            Answer::Err(e, msg) if self.structured => {
                let p = ErrorChunk::encode(e, &msg);
                self.send_chunk(cookie, reply::FLAG_DONE, reply::TYPE_ERROR, &p)
                    .await
            }
            Answer::Err(e, _) => self.send_simple(cookie, e, &[]).await,
        }
    }

    /// Serves requests from `mem` until the client goes away.
    pub async fn serve_memory(mut self, mem: Arc<Mutex<Vec<u8>>>) {
        while let Some(req) = self.recv().await {
            let a = answer(&mem, &req);
            if self.reply(&req, a).await.is_err() {
                return;
            }
        }
    }

    /// Reads requests and never answers them (a stalled server that still
    /// drains its socket, so the client's sends never block).
    pub async fn stall(mut self) {
        while self.recv().await.is_some() {}
        // Keep the socket open until the client closes it.
        std::future::pending::<()>().await;
    }
}

/// Returns what an ordinary disk holding `mem` answers to `req`.
pub fn answer(mem: &Mutex<Vec<u8>>, req: &Req) -> Answer {
    let mut m = mem.lock().unwrap();
    let (off, len) = (req.hdr.offset, req.hdr.length as u64);
    let in_range = off
        .checked_add(len)
        .is_some_and(|end| end <= m.len() as u64);
    let range = off as usize..(off + len) as usize;
    match req.hdr.command {
        cmd::FLUSH => Answer::Ok,
        _ if !in_range && req.hdr.command == cmd::WRITE => {
            Answer::Err(errno::ENOSPC, "write beyond the end".into())
        }
        _ if !in_range => Answer::Err(errno::EINVAL, "beyond the end".into()),
        cmd::READ => Answer::Data(m[range].to_vec()),
        cmd::WRITE => {
            m[range].copy_from_slice(&req.data);
            Answer::Ok
        }
        cmd::TRIM | cmd::WRITE_ZEROES => {
            m[range].fill(0);
            Answer::Ok
        }
        cmd::CACHE => Answer::Ok,
        cmd::BLOCK_STATUS => Answer::Extents(vec![(req.hdr.length, 0)]),
        other => Answer::Err(errno::EINVAL, format!("unknown command {other}")),
    }
}

/// A fake server: an accept loop and its connections, all stopped on drop.
pub struct FakeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Connections that reached transmission phase.
    pub negotiated: Arc<AtomicUsize>,
    /// Every request header received, in arrival order.
    pub log: Arc<Mutex<Vec<RequestHeader>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, aborting every connection.
        self.task.abort();
    }
}

impl FakeServer {
    /// Starts a server that negotiates `export` and then runs `handler` on
    /// each connection.
    pub async fn start<F, Fut>(export: Export, handler: F) -> FakeServer
    where
        F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let negotiated = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let (acc, neg, lg) = (accepted.clone(), negotiated.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (export, handler, neg, lg) =
                    (export.clone(), handler.clone(), neg.clone(), lg.clone());
                conns.spawn(async move {
                    if let Some(conn) = negotiate(sock, export, lg).await {
                        neg.fetch_add(1, Ordering::SeqCst);
                        handler(conn).await;
                    }
                });
                // Reap finished connections so the set does not grow.
                while conns.try_join_next().is_some() {}
            }
        });
        FakeServer {
            addr,
            accepted,
            negotiated,
            log,
            task,
        }
    }

    /// Starts a server that serves a zero-filled in-memory disk; returns the
    /// disk too.
    pub async fn memory(export: Export) -> (FakeServer, Arc<Mutex<Vec<u8>>>) {
        let mem = Arc::new(Mutex::new(vec![0u8; export.size as usize]));
        let m = mem.clone();
        let srv = FakeServer::start(export, move |c| c.serve_memory(m.clone())).await;
        (srv, mem)
    }

    /// Returns `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Returns the number of requests received so far.
    pub fn requests(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

async fn send(wr: &mut OwnedWriteHalf, m: ServerMessage) -> Option<()> {
    let mut b = BytesMut::new();
    ServerHandshakeCodec::default().encode(m, &mut b).ok()?;
    wr.write_all(&b).await.ok()
}

async fn send_reply(wr: &mut OwnedWriteHalf, r: OptionReply) -> Option<()> {
    send(wr, ServerMessage::OptionReply(r)).await
}

/// The server side of the handshake; `None` if the client went away or
/// asked for an export that does not exist via EXPORT_NAME.
async fn negotiate(
    sock: TcpStream,
    export: Export,
    log: Arc<Mutex<Vec<RequestHeader>>>,
) -> Option<FakeConn> {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = FramedRead::new(rd, ServerHandshakeCodec::default());
    let mut gflags = 0;
    if export.fixed {
        gflags |= handshake_flags::FIXED_NEWSTYLE;
    }
    if export.no_zeroes {
        gflags |= handshake_flags::NO_ZEROES;
    }
    send(&mut wr, ServerMessage::Greeting { flags: gflags }).await?;
    let ClientMessage::Flags(cflags) = rd.next().await?.ok()? else {
        return None;
    };
    if !export.fixed && cflags & client_flags::FIXED_NEWSTYLE != 0 {
        return None; // a flag we did not advertise: the spec says drop the connection
    }
    let zeroes = cflags & client_flags::NO_ZEROES == 0;
    let known = |name: &str| export.names.is_empty() || export.names.iter().any(|n| n == name);
    let flags = export.flags | tf::HAS_FLAGS;
    let mut structured = false;
    loop {
        let ClientMessage::Option(o) = rd.next().await?.ok()? else {
            return None;
        };
        if !export.fixed && o.option != opt::EXPORT_NAME {
            return None; // non-fixed newstyle knows nothing else
        }
        match o.option {
            opt::STRUCTURED_REPLY if export.structured => {
                structured = true;
                send_reply(&mut wr, OptionReply::ack(o.option)).await?;
            }
            opt::SET_META_CONTEXT if structured => {
                let req = MetaContextRequest::parse(&o.data).ok()?;
                if req.queries.iter().any(|q| q == consts::BASE_ALLOCATION) {
                    let r =
                        OptionReply::meta_context(o.option, ALLOCATION_ID, consts::BASE_ALLOCATION);
                    send_reply(&mut wr, r).await?;
                }
                send_reply(&mut wr, OptionReply::ack(o.option)).await?;
            }
            opt::GO | opt::INFO if export.go => {
                let req = InfoRequest::parse(&o.data).ok()?;
                if !known(&req.name) {
                    let msg = format!("no export named {:?} here", req.name);
                    send_reply(
                        &mut wr,
                        OptionReply::error(o.option, rep::ERR_UNKNOWN, &msg),
                    )
                    .await?;
                    continue;
                }
                let item = InfoItem::Export {
                    size: export.size,
                    flags,
                };
                send_reply(&mut wr, OptionReply::info(o.option, &item)).await?;
                if let Some((min, preferred, max)) = export.block_size {
                    let item = InfoItem::BlockSize {
                        min,
                        preferred,
                        max,
                    };
                    send_reply(&mut wr, OptionReply::info(o.option, &item)).await?;
                }
                send_reply(&mut wr, OptionReply::ack(o.option)).await?;
                if o.option == opt::GO {
                    break;
                }
            }
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&o.data).into_owned();
                if !known(&name) {
                    return None; // EXPORT_NAME has no error reply: hang up.
                }
                send(
                    &mut wr,
                    ServerMessage::ExportName {
                        size: export.size,
                        flags,
                        zeroes,
                    },
                )
                .await?;
                // Meta contexts are negotiated for GO only.
                break;
            }
            opt::ABORT => {
                send_reply(&mut wr, OptionReply::ack(o.option)).await?;
                return None;
            }
            _ => {
                let r = OptionReply::error(o.option, rep::ERR_UNSUP, "not supported here");
                send_reply(&mut wr, r).await?;
            }
        }
    }
    Some(FakeConn {
        rd: rd.map_decoder(|_| ServerTransmissionCodec),
        wr,
        out: BytesMut::new(),
        structured,
        export,
        log,
    })
}

/// Returns the bytes of a BLOCK_STATUS chunk payload (for hand-made replies).
pub fn block_status_payload(extents: &[(u32, u32)]) -> Bytes {
    let ext: Vec<_> = extents
        .iter()
        .map(|&(length, flags)| nbdraid_proto::Extent { length, flags })
        .collect();
    encode_block_status(ALLOCATION_ID, &ext)
}

/// `base:allocation` flags, re-exported for tests.
pub const HOLE: u32 = allocation::HOLE;
/// `base:allocation` ZERO flag.
pub const ZERO: u32 = allocation::ZERO;
