//! Everything nbdraid speaks on a wire.
//!
//! - [`buf`]: pooled request buffers, shared by the server engine and the client.
//! - [`consts`]: the numbers of the NBD protocol.
//! - [`handshake`]: codecs for the fixed newstyle handshake (both sides).
//! - [`options`]: the structured data of INFO/GO and META_CONTEXT options.
//! - [`transmission`]: codecs for request and reply *headers*; payloads are
//!   read by the caller once it knows where they go (see [`io`]).
//! - [`units`]: `64M`-style byte sizes shared by configs and command lines.
//!
//! The codecs do no I/O and never panic on input: every malformed byte
//! sequence is a [`ProtoError`].

pub mod buf;
pub mod consts;
pub mod handshake;
pub mod io;
pub mod options;
pub mod transmission;
pub mod units;

/// The gRPC control plane (generated from `proto/nbdraid.proto`).
#[allow(missing_docs, clippy::all)]
pub mod grpc {
    tonic::include_proto!("nbdraid.v1");
}

pub use handshake::{
    ClientHandshakeCodec, ClientMessage, InfoItem, OptionReply, OptionRequest,
    ServerHandshakeCodec, ServerMessage,
};
pub use options::{InfoRequest, MetaContextRequest};
pub use transmission::{
    ClientTransmissionCodec, ErrorChunk, Extent, ReplyHeader, RequestHeader,
    ServerTransmissionCodec,
};
pub use units::ByteSize;

/// Errors of the wire codecs.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A message did not start with the magic number it must start with.
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic {
        /// Which message was expected.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A message declared a length above the bound.
    #[error("{what} too large: {len} bytes")]
    TooLarge {
        /// Which message.
        what: &'static str,
        /// The declared length.
        len: u64,
    },
    /// A message's data does not have the layout it must have.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The peer uses a protocol feature this implementation refuses.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The underlying stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
