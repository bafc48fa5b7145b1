//! The data path's one error type, and its single mapping to NBD errnos
//! and gRPC status codes.
//!
//! Only what a request can meet lives here: range and flag checks, storage
//! failures, shutdown, and the throttle. Administrative errors (a catalog,
//! volume names, configuration) belong to the daemon that has them.

use nbdraid_proto::consts::errno;

/// Convenience alias for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail while serving a request.
///
/// Each variant maps to exactly one NBD error number in [`Error::nbd_errno`]
/// and one gRPC status code (`From<Error> for tonic::Status`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read-class request (READ, TRIM, CACHE, BLOCK_STATUS) outside the export.
    #[error("range {offset}+{len} is beyond the end of the export (size {size})")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// A write-class request (WRITE, WRITE_ZEROES) past the end of the export.
    #[error("write {offset}+{len} is beyond the end of the export (size {size})")]
    NoSpace {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// A request that is malformed in a way the spec answers with EINVAL.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A modification of a read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// A FAST_ZERO request that cannot be done quickly.
    #[error("fast zeroing is not possible here")]
    FastZeroUnsupported,
    /// A payload-free request longer than this layer accepts.
    #[error("request length {0} too large")]
    Overflow(u64),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The storage underneath failed.
    #[error("{op} failed on {what}: {source}")]
    Io {
        /// Which operation.
        op: &'static str,
        /// Which volume, file or member.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The storage underneath is full.
    #[error("{op} on {what}: no space left: {source}")]
    StorageFull {
        /// Which operation.
        op: &'static str,
        /// Which volume or file.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A throttle division or grant that cannot be honoured.
    #[error("throttle: {0}")]
    Throttle(String),
}

impl Error {
    /// Wraps an OS error from `op` on `what`, classifying "disk full" errors.
    pub fn io(op: &'static str, what: impl Into<String>, source: std::io::Error) -> Self {
        let what = what.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                Error::StorageFull { op, what, source }
            }
            _ => Error::Io { op, what, source },
        }
    }

    /// Returns an EIO error for `op` on `what` with a message (a member
    /// that failed, an array that cannot serve a range).
    pub fn eio(op: &'static str, what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Io {
            op,
            what: what.into(),
            source: std::io::Error::other(msg.into()),
        }
    }

    /// Returns the NBD error number this error is reported as.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::OutOfRange { .. } | Error::Invalid(_) | Error::Throttle(_) => errno::EINVAL,
            Error::NoSpace { .. } | Error::StorageFull { .. } => errno::ENOSPC,
            Error::ReadOnly => errno::EPERM,
            Error::FastZeroUnsupported => errno::ENOTSUP,
            Error::Overflow(_) => errno::EOVERFLOW,
            Error::ShuttingDown => errno::ESHUTDOWN,
            Error::Io { .. } => errno::EIO,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Invalid(_) | Error::OutOfRange { .. } | Error::Throttle(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::ReadOnly => tonic::Status::permission_denied(msg),
            Error::NoSpace { .. } | Error::StorageFull { .. } | Error::Overflow(_) => {
                tonic::Status::resource_exhausted(msg)
            }
            Error::ShuttingDown => tonic::Status::unavailable(msg),
            Error::FastZeroUnsupported => tonic::Status::unimplemented(msg),
            Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}
