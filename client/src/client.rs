//! The client: connections to one export, request validation and
//! splitting, and the `async fn` API.
//!
//! Every request is checked against what the server advertised (size,
//! alignment, read-only, supported commands) before anything is sent, so a
//! caller's mistake completes at once with [`ClientError::Invalid`] and
//! never looks like a failing server. READ and WRITE larger than the
//! server's maximum payload, and TRIM / WRITE_ZEROES larger than 1 GiB,
//! are split into pieces; the caller sees one completion.
//!
//! Data is never copied on the common paths: a READ's reply lands in the
//! caller's [`IoBuf`] (only a READ split into pieces copies each piece
//! into place), and a WRITE's payload goes to the socket from the
//! caller's [`Bytes`], which several writes (to several members) may share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use nbdraid_proto::buf::IoBuf;
use nbdraid_proto::consts::{cmd, cmd_flags, transmission_flags as tf};

use crate::conn::{Conn, ConnState, Piece, Timeouts};
use crate::error::{ClientError, Result};
use crate::handshake::{ExportInfo, HandshakeOptions, negotiate};
use crate::op::{Completer, Done, Extent, Op};

/// Largest piece of a TRIM or WRITE_ZEROES (the wire length is 32 bits).
const ZERO_PIECE: u64 = 1 << 30;

/// How to connect and how long to wait.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Connections to open; more than one only if the server advertises
    /// CAN_MULTI_CONN (otherwise one, logged; [`Client::connections`] says
    /// how many were opened).
    pub connections: usize,
    /// A request not answered within this time fails its connection.
    pub request_timeout: Option<Duration>,
    /// Requests outstanding and no reply for this long fails the connection.
    pub stall_timeout: Option<Duration>,
    /// Time allowed for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Handshake choices.
    pub handshake: HandshakeOptions,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connections: 1,
            request_timeout: Some(Duration::from_secs(60)),
            stall_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(10),
            handshake: HandshakeOptions::default(),
        }
    }
}

/// A request, as submitted to [`Client::submit`] or a completion ring.
///
/// Not `Clone`: a READ owns its destination buffer, which no other request
/// may fill at the same time.
#[derive(Debug)]
pub enum Request {
    /// Read `buf.len()` bytes at `offset` into `buf` (handed back when done).
    ///
    /// The reply is read straight into `buf`: give it the buffer the data
    /// will be used (or sent on) from, for example an [`IoBuf`] taken from
    /// the [`BufferPool`](nbdraid_proto::buf::BufferPool) of an engine that
    /// will send it to its own client. A plain vector converts with
    /// `vec.into()`. Only a read larger than the server's maximum payload,
    /// split into pieces, copies each piece into place.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination; its length is the read's length.
        buf: IoBuf,
    },
    /// Write `data` at `offset`.
    ///
    /// The payload goes to the socket from `data` itself (header and
    /// payload in one vectored write), never copied. [`Bytes`] clones and
    /// slices share one allocation, so one buffer can be written to
    /// several members without a copy: wrap a pooled [`IoBuf`] with
    /// [`Bytes::from_owner`], and give each member's write a `.clone()` (or
    /// a `.slice(..)` of its part). Each write holds its share until it
    /// completes, so the buffer stays out of its pool while any member may
    /// still be sending it, and returns to the pool when the last share is
    /// dropped: as the last write completes (or a moment later, when that
    /// connection's writer lets go of the batch the write went out in).
    ///
    /// ```no_run
    /// # async fn demo(members: &[nbdraid_client::Client]) -> nbdraid_client::Result<()> {
    /// use bytes::Bytes;
    /// use nbdraid_proto::buf::BufferPool;
    /// let pool = BufferPool::new(64 << 20);
    /// let mut buf = pool.get(4096);
    /// buf.fill(0xAB);
    /// let data = Bytes::from_owner(buf);
    /// let writes: Vec<_> = members
    ///     .iter()
    ///     .map(|m| m.write(0, data.clone(), false))
    ///     .collect();
    /// drop(data); // the writes hold the only shares now
    /// for r in futures::future::join_all(writes).await {
    ///     r?;
    /// }
    /// // All done: the buffer is back in `pool` for the next request.
    /// # Ok(()) }
    /// ```
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Bytes,
        /// Durable before completion.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (advisory).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Make a range read as zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Keep the range allocated.
        no_hole: bool,
        /// Fail fast (ENOTSUP) rather than be slow.
        fast: bool,
        /// Durable before completion.
        fua: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Allocation status of a range (`base:allocation`).
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Length (at most 4 GiB - 4 KiB per request; the server may answer
        /// for less).
        len: u64,
    },
}

fn fua_flag(fua: bool) -> u16 {
    if fua { cmd_flags::FUA } else { 0 }
}

impl Request {
    /// The command, its flags and its name.
    fn wire(&self) -> (u16, u16, &'static str) {
        match self {
            Request::Read { .. } => (cmd::READ, 0, "READ"),
            Request::Write { fua, .. } => (cmd::WRITE, fua_flag(*fua), "WRITE"),
            Request::Flush => (cmd::FLUSH, 0, "FLUSH"),
            Request::Trim { .. } => (cmd::TRIM, 0, "TRIM"),
            Request::WriteZeroes {
                no_hole, fast, fua, ..
            } => {
                let mut f = fua_flag(*fua);
                if *no_hole {
                    f |= cmd_flags::NO_HOLE;
                }
                if *fast {
                    f |= cmd_flags::FAST_ZERO;
                }
                (cmd::WRITE_ZEROES, f, "WRITE_ZEROES")
            }
            Request::Cache { .. } => (cmd::CACHE, 0, "CACHE"),
            Request::BlockStatus { .. } => (cmd::BLOCK_STATUS, 0, "BLOCK_STATUS"),
        }
    }

    /// The caller's read buffer, if this is a READ.
    fn into_buffer(self) -> Option<IoBuf> {
        match self {
            Request::Read { buf, .. } => Some(buf),
            _ => None,
        }
    }

    fn span(&self) -> (u64, u64) {
        match self {
            Request::Read { offset, buf } => (*offset, buf.len() as u64),
            Request::Write { offset, data, .. } => (*offset, data.len() as u64),
            Request::Flush => (0, 0),
            Request::Trim { offset, len }
            | Request::WriteZeroes { offset, len, .. }
            | Request::Cache { offset, len }
            | Request::BlockStatus { offset, len } => (*offset, *len),
        }
    }
}

/// What submitting a request led to.
#[derive(Debug)]
pub enum Started {
    /// Finished without waiting (validation error, zero length, dead connection).
    Done(Done),
    /// On the wire; the completion comes later.
    Pending,
}

struct Active {
    info: ExportInfo,
    conns: Vec<Arc<Conn>>,
}

/// A client of one NBD export, over one or more connections.
pub struct Client {
    addr: String,
    export: String,
    config: ClientConfig,
    active: RwLock<Arc<Active>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .finish()
    }
}

async fn open(addr: &str, export: &str, config: &ClientConfig) -> Result<Active> {
    let one = || async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::ConnectionLost {
                reason: format!("connect to {addr}: {e}"),
                possibly_applied: false,
            })?;
        let _ = stream.set_nodelay(true);
        negotiate(stream, export, &config.handshake).await
    };
    let timeouts = Timeouts {
        request: config.request_timeout,
        stall: config.stall_timeout,
    };
    let connect = async {
        let (info, rd, wr) = one().await?;
        let n = if info.multi_conn() {
            config.connections.max(1)
        } else {
            if config.connections > 1 {
                // Without CAN_MULTI_CONN a FLUSH on one connection need not
                // cover writes sent on another: one connection is the safe choice.
                tracing::info!(
                    export,
                    asked = config.connections,
                    "the server does not advertise CAN_MULTI_CONN: using one connection"
                );
            }
            1
        };
        let mut conns = vec![Arc::new(Conn::start(info.clone(), rd, wr, timeouts))];
        for _ in 1..n {
            let (i2, rd, wr) = one().await?;
            if i2.size != info.size || i2.flags != info.flags {
                return Err(ClientError::Handshake(
                    "connections disagree about the export".into(),
                ));
            }
            conns.push(Arc::new(Conn::start(i2, rd, wr, timeouts)));
        }
        Ok(Active { info, conns })
    };
    tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| ClientError::Timeout(config.connect_timeout))?
}

impl Client {
    /// Connects to `export` on `addr` (`host:port`).
    pub async fn connect(addr: &str, export: &str, config: ClientConfig) -> Result<Self> {
        let active = open(addr, export, &config).await?;
        Ok(Self {
            addr: addr.to_string(),
            export: export.to_string(),
            config,
            active: RwLock::new(Arc::new(active)),
            next: AtomicUsize::new(0),
        })
    }

    /// Connects to an `nbd://host[:port][/export]` URI.
    pub async fn connect_uri(uri: &str, config: ClientConfig) -> Result<Self> {
        let (addr, export) = crate::uri::parse(uri)?;
        Self::connect(&addr, &export, config).await
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Returns what the server told us about the export.
    pub fn info(&self) -> ExportInfo {
        self.active().info.clone()
    }

    /// Returns the number of open connections.
    pub fn connections(&self) -> usize {
        self.active().conns.len()
    }

    /// Returns the local address of each connection: what the server sees
    /// as the peer address, which an upstream registers with a node's
    /// throttle lease to draw from its grant.
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.active()
            .conns
            .iter()
            .filter_map(|c| c.local_addr())
            .collect()
    }

    /// Returns the state of connection `i`.
    pub fn state(&self, i: usize) -> Option<ConnState> {
        self.active().conns.get(i).map(|c| c.state())
    }

    /// Reports whether every connection is ready.
    pub fn is_ready(&self) -> bool {
        self.active().conns.iter().all(|c| !c.is_failed())
    }

    /// Returns a watch on connection `i`'s state. It follows that one
    /// connection: after [`Client::reconnect`] it shows
    /// [`ConnState::Closed`] and then ends (`changed()` fails); take a new
    /// watch for the new connection.
    pub fn watch_state(&self, i: usize) -> Option<watch::Receiver<ConnState>> {
        self.active().conns.get(i).map(|c| c.watch())
    }

    /// Returns the number of wire requests in flight over all connections.
    pub fn in_flight(&self) -> usize {
        self.active().conns.iter().map(|c| c.in_flight()).sum()
    }

    /// Replaces the connections with fresh ones (after a failure). Requests
    /// in flight on the old connections fail with [`ClientError::Closed`].
    pub async fn reconnect(&self) -> Result<()> {
        let fresh = open(&self.addr, &self.export, &self.config).await?;
        let old = std::mem::replace(
            &mut *self.active.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(fresh),
        );
        drop(old);
        Ok(())
    }

    /// Waits (at most `timeout`) for requests in flight, then disconnects
    /// cleanly with NBD_CMD_DISC.
    pub async fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for c in &self.active().conns {
            c.disconnect();
        }
    }

    /// Starts a request; its completion goes to `completer` unless it
    /// finished at once.
    pub(crate) fn start(&self, req: Request, completer: Completer) -> Started {
        let active = self.active();
        match self.check(&active, req) {
            Ok(req) => self.send(&active, req, completer),
            Err(done) => Started::Done(done),
        }
    }

    /// Finishes `req` at once if it can finish without being sent (a
    /// validation error, a zero-length or unsupported advisory operation,
    /// no live connection); hands it back otherwise. Sends nothing.
    pub(crate) fn finish_now(&self, req: Request) -> Result<Done, Request> {
        match self.check(&self.active(), req) {
            Ok(req) => Err(req),
            Err(done) => Ok(done),
        }
    }

    /// Returns the request if it must be sent, or how it finished: the
    /// caller's read buffer always comes back.
    fn check(&self, active: &Active, req: Request) -> std::result::Result<Request, Done> {
        let info = &active.info;
        let (offset, len) = req.span();
        let (command, flags, name) = req.wire();
        let finish = |req: Request, result: Result<()>| Done {
            result,
            buffer: req.into_buffer(),
            extents: Vec::new(),
        };
        let invalid = |req: Request, msg: String| finish(req, Err(ClientError::Invalid(msg)));
        let ok_now = |req: Request| finish(req, Ok(()));
        // What the server supports.
        let writes = matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && info.read_only() {
            return Err(invalid(req, format!("{name} on a read-only export")));
        }
        if flags & cmd_flags::FUA != 0 && !info.has(tf::SEND_FUA) {
            return Err(invalid(req, "the server does not support FUA".into()));
        }
        match command {
            cmd::FLUSH if !info.has(tf::SEND_FLUSH) => {
                return Err(invalid(req, "the server does not support FLUSH".into()));
            }
            cmd::TRIM if !info.has(tf::SEND_TRIM) => return Err(ok_now(req)), // advisory
            cmd::CACHE if !info.has(tf::SEND_CACHE) => return Err(ok_now(req)), // advisory
            cmd::WRITE_ZEROES if !info.has(tf::SEND_WRITE_ZEROES) => {
                return Err(invalid(
                    req,
                    "the server does not support WRITE_ZEROES".into(),
                ));
            }
            cmd::WRITE_ZEROES
                if flags & cmd_flags::FAST_ZERO != 0 && !info.has(tf::SEND_FAST_ZERO) =>
            {
                return Err(invalid(req, "the server does not support FAST_ZERO".into()));
            }
            cmd::BLOCK_STATUS if info.allocation_context.is_none() => {
                return Err(invalid(req, "base:allocation was not negotiated".into()));
            }
            cmd::BLOCK_STATUS if len == 0 => {
                return Err(invalid(req, "BLOCK_STATUS of length 0".into()));
            }
            _ => {}
        }
        // Range and alignment.
        if command != cmd::FLUSH {
            if offset.checked_add(len).is_none_or(|end| end > info.size) {
                return Err(invalid(
                    req,
                    format!(
                        "{name} {offset}+{len} is beyond the end of the export ({})",
                        info.size
                    ),
                ));
            }
            let m = info.min_block as u64;
            if m > 1 && (offset % m != 0 || len % m != 0) {
                return Err(invalid(
                    req,
                    format!("{name} {offset}+{len} is not aligned to the minimum block size {m}"),
                ));
            }
        }
        if active.conns.iter().all(|c| c.is_failed()) {
            let err = match active.conns.first().map(|c| c.state()) {
                Some(ConnState::Closed) => ClientError::Closed,
                Some(ConnState::Failed(reason)) => ClientError::ConnectionLost {
                    reason,
                    possibly_applied: false,
                },
                _ => ClientError::ConnectionLost {
                    reason: "no connection".into(),
                    possibly_applied: false,
                },
            };
            return Err(finish(req, Err(err)));
        }
        if len == 0 && command != cmd::FLUSH {
            return Err(ok_now(req));
        }
        Ok(req)
    }

    /// Sends a checked request, split into pieces of at most the server's maximum.
    fn send(&self, active: &Active, req: Request, completer: Completer) -> Started {
        let info = &active.info;
        let (offset, len) = req.span();
        let (command, flags, _) = req.wire();
        let piece_max = match command {
            cmd::READ | cmd::WRITE => info.max_payload as u64,
            // The largest 32-bit length that keeps the minimum alignment.
            cmd::BLOCK_STATUS => u32::MAX as u64 & !(info.min_block.max(4096) as u64 - 1),
            _ => ZERO_PIECE,
        };
        let (req_buf, data) = match req {
            Request::Read { buf, .. } => (Some(buf), None),
            Request::Write { data, .. } => (None, Some(data)),
            _ => (None, None),
        };
        let len = if command == cmd::BLOCK_STATUS {
            len.min(piece_max)
        } else {
            len
        };
        let npieces = if command == cmd::FLUSH {
            1
        } else {
            len.div_ceil(piece_max) as usize
        };
        let split = npieces > 1;
        let is_read = command == cmd::READ;
        let (op_buf, mut whole_buf) = if split {
            (req_buf, None)
        } else {
            (None, req_buf)
        };
        let op = Op::new(npieces, op_buf, completer);
        for i in 0..npieces {
            let start = i as u64 * piece_max;
            let n = if command == cmd::FLUSH {
                0
            } else {
                (len - start).min(piece_max)
            };
            let buf = if !is_read {
                None
            } else if split {
                Some(IoBuf::zeroed(n as usize))
            } else {
                whole_buf.take()
            };
            let piece = Piece {
                op: op.clone(),
                command,
                offset: if command == cmd::FLUSH {
                    0
                } else {
                    offset + start
                },
                len: n as u32,
                buf_off: split.then_some(start as usize),
                buf,
                payload: data
                    .as_ref()
                    .map(|d| d.slice(start as usize..(start + n) as usize)),
                born: 0,
                extents: Vec::new(),
                error: None,
                received: 0,
            };
            let conn = self.pick(active);
            if let Err(refused) = conn.submit(piece, flags) {
                let (p, e) = *refused;
                p.finish(Err(e));
            }
        }
        Started::Pending
    }

    fn pick<'a>(&self, active: &'a Active) -> &'a Conn {
        let n = active.conns.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let c = &active.conns[(first + k) % n];
            if !c.is_failed() {
                return c;
            }
        }
        &active.conns[first % n]
    }

    /// Submits a request and waits for its completion.
    pub async fn submit(&self, req: Request) -> Done {
        let (tx, rx) = oneshot::channel();
        match self.start(req, Completer::Async(tx)) {
            Started::Done(d) => d,
            Started::Pending => rx
                .await
                .unwrap_or_else(|_| Done::result(Err(ClientError::Closed))),
        }
    }

    /// Reads `buf.len()` bytes at `offset` straight into `buf` (an
    /// [`IoBuf`], or a `Vec<u8>` converted into one) and returns it, filled.
    /// See [`Request::Read`].
    pub async fn read(&self, offset: u64, buf: impl Into<IoBuf>) -> Result<IoBuf> {
        let buf = buf.into();
        let d = self.submit(Request::Read { offset, buf }).await;
        d.result?;
        d.buffer.ok_or(ClientError::Closed)
    }

    /// Reads `len` bytes at `offset` into a new vector.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let buf = self.read(offset, IoBuf::zeroed(len)).await?;
        Ok(buf.into_vec())
    }

    /// Writes `data` at `offset`; with `fua` it is durable on return.
    ///
    /// `data` is sent as it is, never copied; to write one pooled buffer
    /// to several members, share it as [`Bytes`] (see [`Request::Write`]).
    pub async fn write(&self, offset: u64, data: impl Into<Bytes>, fua: bool) -> Result<()> {
        self.submit(Request::Write {
            offset,
            data: data.into(),
            fua,
        })
        .await
        .result
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<()> {
        self.submit(Request::Flush).await.result
    }

    /// Discards a range (advisory).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.submit(Request::Trim { offset, len }).await.result
    }

    /// Makes a range read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.submit(Request::WriteZeroes {
            offset,
            len,
            no_hole,
            fast: false,
            fua: false,
        })
        .await
        .result
    }

    /// Hints that a range will be read soon.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.submit(Request::Cache { offset, len }).await.result
    }

    /// Returns `base:allocation` extents from `offset` (covering at least
    /// one byte, at most `len`).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let d = self.submit(Request::BlockStatus { offset, len }).await;
        d.result?;
        Ok(d.extents)
    }
}
