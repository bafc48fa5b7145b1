//! The client's error type, with the classification the RAID layer needs:
//! a member's failure (EIO, timeout, lost connection) versus a caller's
//! mistake (EINVAL, ENOSPC, EPERM, ...), so a bad offset never fails a member.

use nbdraid_proto::consts::errno;

/// Convenience alias for results carrying [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything a client operation can fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// The request was refused before it was sent (range, alignment, flags,
    /// read-only export). Nothing reached the server.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The server answered with an error.
    #[error("server error {} ({errno}): {message}", errno_name(*errno))]
    Server {
        /// NBD error number.
        errno: u32,
        /// The server's message, if it sent one (structured replies).
        message: String,
    },
    /// The connection failed before the reply arrived. For a request that
    /// modifies data, `possibly_applied` says the server may have done it.
    #[error("connection lost: {reason}{}", if *possibly_applied { " (the request may have been applied)" } else { "" })]
    ConnectionLost {
        /// What happened.
        reason: String,
        /// A write-class request may have reached the disk.
        possibly_applied: bool,
    },
    /// A request's deadline passed (`request_timeout`), or the server made
    /// no progress for `stall_timeout` with requests outstanding. The
    /// connection is closed and every request in flight on it fails with
    /// this error; a write-class request (WRITE, TRIM, WRITE_ZEROES) that
    /// fails with it may have been applied.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The reply broke the protocol (the connection is closed).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A completion ring has no free slot for another request.
    #[error("completion ring full ({0} entries pending)")]
    RingFull(usize),
    /// The client was shut down.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// Reports whether a request that modifies data and failed with this
    /// error may nevertheless have reached the server's storage: true for a
    /// connection lost with the request in flight, a timeout and a close
    /// with requests in flight; false when the request provably never left
    /// (validation, full ring) or the server answered with an error.
    pub fn possibly_applied(&self) -> bool {
        match self {
            ClientError::ConnectionLost {
                possibly_applied, ..
            } => *possibly_applied,
            ClientError::Timeout(_) | ClientError::Closed | ClientError::Protocol(_) => true,
            ClientError::Invalid(_)
            | ClientError::Server { .. }
            | ClientError::Handshake(_)
            | ClientError::RingFull(_) => false,
        }
    }

    /// Reports whether this error means the server (the member) failed, as
    /// opposed to the caller asking for something invalid.
    pub fn is_member_failure(&self) -> bool {
        match self {
            ClientError::Server { errno: e, .. } => !matches!(
                *e,
                errno::EINVAL | errno::ENOSPC | errno::EPERM | errno::EOVERFLOW | errno::ENOTSUP
            ),
            ClientError::ConnectionLost { .. }
            | ClientError::Timeout(_)
            | ClientError::Protocol(_)
            | ClientError::Handshake(_) => true,
            ClientError::Invalid(_) | ClientError::RingFull(_) | ClientError::Closed => false,
        }
    }

    /// Returns the NBD errno this error corresponds to (EIO for local failures).
    pub fn errno(&self) -> u32 {
        match self {
            ClientError::Server { errno, .. } => *errno,
            ClientError::Invalid(_) => errno::EINVAL,
            ClientError::RingFull(_) => errno::ENOMEM,
            ClientError::Closed => errno::ESHUTDOWN,
            _ => errno::EIO,
        }
    }
}

/// Returns the symbolic name of an NBD errno.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "error",
    }
}
