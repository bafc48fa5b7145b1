//! The node's error type: the data path's errors (from the serving stack)
//! plus the node's administrative ones, each mapped to one NBD errno and
//! one gRPC status code in one place.

use nbdraid_engine::daemon::DaemonError;
use nbdraid_proto::consts::errno;

/// Convenience alias for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data-path error (range, flags, storage, shutdown, throttle).
    #[error(transparent)]
    Data(#[from] nbdraid_engine::Error),
    /// The daemon's listeners or ready file.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The volume catalog failed.
    #[error("catalog: {0}")]
    Catalog(String),
    /// A volume that does not exist.
    #[error("no volume named {0:?}")]
    UnknownVolume(String),
    /// A volume that already exists.
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    /// A request a user made that cannot be honoured (bad name, shrinking, ...).
    #[error("{0}")]
    BadRequest(String),
    /// An operation on a volume that is in use.
    #[error("volume {volume:?} is in use: {why}")]
    Busy {
        /// The volume.
        volume: String,
        /// What uses it.
        why: String,
    },
    /// A configuration error.
    #[error("config: {0}")]
    Config(String),
}

impl Error {
    /// Wraps an OS error from `op` on `what`, classifying "disk full" errors.
    pub fn io(op: &'static str, what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Data(nbdraid_engine::Error::io(op, what, source))
    }

    /// Returns the NBD error number this error is reported as.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::Data(e) => e.nbd_errno(),
            Error::UnknownVolume(_) => errno::EINVAL,
            Error::Daemon(_)
            | Error::Catalog(_)
            | Error::VolumeExists(_)
            | Error::BadRequest(_)
            | Error::Busy { .. }
            | Error::Config(_) => errno::EIO,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Data(d) => d.into(),
            Error::UnknownVolume(_) => tonic::Status::not_found(msg),
            Error::VolumeExists(_) => tonic::Status::already_exists(msg),
            Error::BadRequest(_) | Error::Config(_) => tonic::Status::invalid_argument(msg),
            Error::Busy { .. } => tonic::Status::failed_precondition(msg),
            Error::Catalog(_) | Error::Daemon(_) => tonic::Status::internal(msg),
        }
    }
}
