//! What the array daemon's admin surfaces (gRPC `Array` service, config
//! start-up, CLI) ask of its arrays, as plain types: an array's
//! specification, its status, and the operations on it.
//!
//! The daemon's [`crate::manager::Manager`] implements [`ArrayAdmin`]; the
//! gRPC service translates to and from protobuf and nothing else.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::layout::Level;

/// How to build an array (from `[[array]]` in the config, or `nbdraid
/// array create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArraySpec {
    /// Array (and export) name.
    pub name: String,
    /// RAID level.
    pub level: Level,
    /// Chunk size in bytes (levels that stripe).
    pub chunk: u64,
    /// Copies of each chunk (RAID 10).
    pub copies: usize,
    /// Member volumes, `nbd://host:port/export`, in slot order.
    pub members: Vec<String>,
    /// Write-intent bitmap region in bytes of member data (None: the default).
    pub bitmap_region: Option<u64>,
    /// Start even if dirty and degraded (RAID 5/6 write hole): the
    /// operator accepts that stripes written at the crash may be wrong.
    pub force: bool,
    /// Take members that hold another array's superblock.
    pub overwrite: bool,
    /// Hot spares: volumes that take the slot of a member that fails.
    #[serde(default)]
    pub spares: Vec<String>,
}

/// The state of an array as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArrayState {
    /// Every member in sync, no write in flight since the last clean mark.
    Clean,
    /// Every member in sync, writes in flight (dirty).
    Active,
    /// Serving with fewer members in sync than it has.
    Degraded,
    /// Lost more members than the level tolerates: every request gets EIO.
    Failed,
}

impl ArrayState {
    /// Returns the lower-case name shown by status.
    pub fn name(self) -> &'static str {
        match self {
            ArrayState::Clean => "clean",
            ArrayState::Active => "active",
            ArrayState::Degraded => "degraded",
            ArrayState::Failed => "failed",
        }
    }
}

/// A background operation's progress (resync, rebuild, check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// What runs: "resync", "recovery", "check".
    pub kind: String,
    /// Bytes of member data done so far.
    pub done: u64,
    /// Bytes of member data to do in all.
    pub total: u64,
    /// Recent rate in bytes per second.
    pub rate: f64,
    /// Estimated time left.
    pub eta: Option<Duration>,
}

/// One member as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Slot (role) in the array.
    pub slot: usize,
    /// URI of the member volume.
    pub uri: String,
    /// The member's uuid (from its superblock).
    pub uuid: String,
    /// "active", "recovering", "faulty", "missing".
    pub state: String,
    /// Failed operations since start.
    pub errors: u64,
    /// Completed reads and writes since start.
    pub reads: u64,
    /// Completed writes since start.
    pub writes: u64,
    /// Mean latency of completed operations, microseconds.
    pub latency_us: u64,
}

/// An array's status (mdadm `--detail`-grade).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStatus {
    /// Name.
    pub name: String,
    /// Uuid.
    pub uuid: String,
    /// Level.
    pub level: Level,
    /// Layout name ("left-symmetric", "near", "").
    pub layout: String,
    /// Chunk size.
    pub chunk: u64,
    /// Copies (RAID 10).
    pub copies: usize,
    /// Usable size in bytes.
    pub size: u64,
    /// Bytes of each member the array uses.
    pub member_size: u64,
    /// State.
    pub state: ArrayState,
    /// Superblock event counter.
    pub events: u64,
    /// Bitmap region size and dirty regions.
    pub bitmap_region: u64,
    /// Dirty bitmap regions.
    pub bitmap_dirty: u64,
    /// Members.
    pub members: Vec<MemberStatus>,
    /// Running resync or recovery.
    pub sync: Option<Progress>,
    /// Running or last check.
    pub check: Option<CheckReport>,
    /// The NBD export serving it.
    pub export: String,
    /// Hot spares waiting for a failed member's slot.
    #[serde(default)]
    pub spares: Vec<String>,
    /// Resync, rebuild and check rate limit, bytes per second (0: none).
    #[serde(default)]
    pub sync_rate: u64,
}

/// What a check found (so far, while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Still running.
    pub running: bool,
    /// Progress.
    pub progress: Progress,
    /// Stripes (RAID 5/6) or chunks (RAID 1/10) whose parity or copies
    /// disagree.
    pub mismatches: u64,
    /// The first mismatching stripes or chunks (array-relative numbers).
    pub first_mismatches: Vec<u64>,
    /// Member read errors met (the member was failed).
    pub errors: u64,
    /// Units rewritten (a repair).
    #[serde(default)]
    pub repaired: u64,
    /// Whether this is a repair, not a read-only check.
    #[serde(default)]
    pub repair: bool,
}

/// Errors of admin operations; the gRPC layer maps each to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No array by that name.
    #[error("no array named {0:?}")]
    UnknownArray(String),
    /// An array by that name exists.
    #[error("array {0:?} already exists")]
    Exists(String),
    /// The request breaks a rule (the message names the array and the rule).
    #[error("{0}")]
    Invalid(String),
    /// The array or member is in a state that refuses this now.
    #[error("{0}")]
    Refused(String),
    /// A member could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (I/O on metadata, the state store).
    #[error("{0}")]
    Internal(String),
}

impl From<AdminError> for tonic::Status {
    fn from(e: AdminError) -> Self {
        let msg = e.to_string();
        match e {
            AdminError::UnknownArray(_) => tonic::Status::not_found(msg),
            AdminError::Exists(_) => tonic::Status::already_exists(msg),
            AdminError::Invalid(_) => tonic::Status::invalid_argument(msg),
            AdminError::Refused(_) => tonic::Status::failed_precondition(msg),
            AdminError::Unavailable(_) => tonic::Status::unavailable(msg),
            AdminError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// The operations the admin surfaces call.
pub trait ArrayAdmin: Send + Sync + 'static {
    /// Creates (members blank, or `overwrite`) or assembles (members carry
    /// this array's superblocks) an array and starts serving it.
    fn create(&self, spec: ArraySpec) -> BoxFuture<'_, Result<ArrayStatus, AdminError>>;
    /// Returns every array's status.
    fn list(&self) -> Vec<ArrayStatus>;
    /// Returns one array's status.
    fn status(&self, name: &str) -> Result<ArrayStatus, AdminError>;
    /// Re-adds a failed member (by slot) and resyncs it from the bitmap.
    fn re_add(&self, name: &str, slot: usize) -> BoxFuture<'_, Result<ArrayStatus, AdminError>>;
    /// Starts a check (read every stripe, verify parity or copies), or a
    /// repair, and returns at once; progress shows in status.
    fn check(&self, name: &str, repair: bool) -> Result<CheckReport, AdminError>;
    /// Gives member `slot`'s place to the volume at `uri` and rebuilds it
    /// there while the array serves.
    fn replace(
        &self,
        name: &str,
        slot: usize,
        uri: &str,
    ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>>;
    /// Adds a hot spare (it takes the slot of a member that fails).
    fn add_spare(&self, name: &str, uri: &str) -> BoxFuture<'_, Result<ArrayStatus, AdminError>>;
    /// Removes a spare, or fails a member out of the array.
    fn remove(&self, name: &str, what: Removal) -> BoxFuture<'_, Result<ArrayStatus, AdminError>>;
    /// Sets the resync, rebuild and check rate (bytes per second, 0: none),
    /// in force at once for the passes running.
    fn set_rate(&self, name: &str, rate: u64) -> Result<ArrayStatus, AdminError>;
}

/// What `remove` takes out of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// A spare, by URI.
    Spare(String),
    /// A member, by slot: it is failed (the array goes on degraded).
    Member(usize),
}
