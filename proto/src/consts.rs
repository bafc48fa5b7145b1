//! Numbers of the NBD protocol (`doc/proto.md` of NetworkBlockDevice/nbd).
//!
//! Everything on the wire is big-endian. Only the fixed newstyle handshake is
//! spoken; the oldstyle magic is deliberately absent.

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second half of the greeting and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (not supported; recognised for errors).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of the server greeting: magic, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Zero padding after an NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
/// The longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Handshake flags (server to client, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client to server, 32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after NBD_OPT_EXPORT_NAME.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Hint: the medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// FLUSH and FUA on one connection are visible on all of them.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_CMD_RESIZE is supported (experimental).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// NBD_CMD_CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// Select an export and enter transmission (no error reply exists).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Select an export and enter transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (experimental).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Final success.
    pub const ACK: u32 = 1;
    /// One export in a LIST.
    pub const SERVER: u32 = 2;
    /// One information item of INFO/GO.
    pub const INFO: u32 = 3;
    /// One selected metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const FLAG_ERROR: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    /// The export is unknown.
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    /// The request is too big.
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
    /// Extended headers are required.
    pub const ERR_EXT_HEADER_REQD: u32 = FLAG_ERROR | 10;
}

/// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Free-text description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read data.
    pub const READ: u16 = 0;
    /// Write data.
    pub const WRITE: u16 = 1;
    /// Disconnect after finishing outstanding requests.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard (advisory).
    pub const TRIM: u16 = 4;
    /// Prefetch (advisory).
    pub const CACHE: u16 = 5;
    /// Write zeroes, possibly by punching a hole.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (experimental).
    pub const RESIZE: u16 = 8;
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must be answered in one chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS wants exactly one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES must fail fast instead of being slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags and types.
pub mod reply {
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload (only with DONE).
    pub const TYPE_NONE: u16 = 0;
    /// u64 offset followed by data.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// u64 offset and u32 length of zeroes.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status extents for one context.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Bit set on error chunk types.
    pub const TYPE_FLAG_ERROR: u16 = 1 << 15;
    /// Error with a message.
    pub const TYPE_ERROR: u16 = TYPE_FLAG_ERROR | 1;
    /// Error with a message and the offset it concerns.
    pub const TYPE_ERROR_OFFSET: u16 = TYPE_FLAG_ERROR | 2;
}

/// Error numbers carried in replies (their values are the protocol's, not the host's).
pub mod errno {
    /// Operation not permitted (e.g. a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (DF reads, oversized payload-free commands).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO only).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Flags of the `base:allocation` metadata context.
pub mod allocation {
    /// The range is a hole (unallocated).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Name of the allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
