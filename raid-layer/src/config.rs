//! The array daemon's configuration: a TOML file, overridden by
//! command-line flags (see `deploy/array.example.toml` for every option).
//!
//! ```toml
//! listen = "0.0.0.0:10819"
//! grpc-listen = "127.0.0.1:10820"
//! data-dir = "/var/lib/nbdraid/array"
//!
//! [throttle]
//! capacity = "512M"
//!
//! [[array]]
//! name = "r5"
//! level = "raid5"
//! members = ["nbd://node1:10809/vol0", "nbd://node2:10809/vol0", "nbd://node3:10809/vol0"]
//! ```
//!
//! The rules an array's specification must follow live in one place,
//! [`validate_spec`]: configuration validation and the manager's `create`
//! (what `nbdraid array create` reaches over gRPC) both call it, so a spec
//! is refused with the same words whichever way it arrives. Every message
//! names the array and the rule it breaks.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbdraid_engine::cost::{BASE_COST, CostModel, OpCost, PER_BYTE_ONE};
use nbdraid_engine::daemon::ListenAddrs;
use nbdraid_engine::device::OpKind;
use nbdraid_engine::throttle::ThrottleSettings;
use nbdraid_proto::ByteSize;
use nbdraid_proto::consts::{
    GREETING_LEN, IHAVEOPT, NBD_MAGIC, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, client_flags,
    opt,
};
use nbdraid_proto::units::format_size;
use serde::{Deserialize, Serialize};

pub use nbdraid_engine::throttle::ThrottleConfig;

use crate::api::{AdminError, ArraySpec};
use crate::layout::{Geometry, LayoutError, Level, MAX_CHUNK, MIN_CHUNK};
use crate::manager::ManagerSettings;
use crate::meta::MIN_REGION;

/// The chunk size of an array that does not name one (md's default).
pub const DEFAULT_CHUNK: u64 = 512 << 10;

/// The copies of each chunk of a RAID 10 array that does not name them.
pub const DEFAULT_COPIES: usize = Geometry::DEFAULT_COPIES;

/// The longest array name (the same bound as volume names).
pub const MAX_NAME_LEN: usize = 128;

/// How long `--check-config` waits for each member to accept a TCP
/// connection, and then for its NBD greeting.
pub const MEMBER_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A configuration that cannot be used; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<AdminError> for ConfigError {
    fn from(e: AdminError) -> Self {
        ConfigError(e.to_string())
    }
}

/// How the daemon talks to member volumes (its `[members]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MembersConfig {
    /// NBD connections to each member.
    pub connections: usize,
    /// A member with work outstanding that completes nothing for this many
    /// milliseconds is failed (a slow member is throttled, not failed).
    pub liveness_timeout_ms: u64,
    /// Units (bytes of the member's buffer memory) the array asks each
    /// member to grant it, for foreground and for background work each
    /// (members that publish a gRPC address with `?grpc=`); requests are
    /// admitted only when they fit in what they need at every member.
    pub grant: ByteSize,
    /// Units asked of each member's background share for resync, recovery
    /// and check (default: a quarter of `grant`).
    pub background_grant: Option<ByteSize>,
    /// Account requests against the members' grants. `false` is for
    /// measurements only: the members' memory is then bounded only by
    /// their own throttles.
    pub accounting: bool,
}

impl Default for MembersConfig {
    fn default() -> Self {
        Self {
            connections: 2,
            liveness_timeout_ms: 10_000,
            grant: ByteSize(64 << 20),
            background_grant: None,
            accounting: true,
        }
    }
}

/// The most NBD connections the daemon opens to one member.
pub const MAX_MEMBER_CONNECTIONS: usize = 64;

/// The shortest liveness timeout accepted: below it, a busy but healthy
/// member could be failed for a scheduling hiccup.
pub const MIN_LIVENESS_TIMEOUT_MS: u64 = 100;

fn default_chunk() -> ByteSize {
    ByteSize(DEFAULT_CHUNK)
}

fn default_copies() -> usize {
    DEFAULT_COPIES
}

/// An array declared in the configuration (`[[array]]`): assembled at
/// start-up, or created if its members are blank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArrayConfig {
    /// Array (and export) name.
    pub name: String,
    /// RAID level: `raid0`, `raid1`, `raid5`, `raid6` or `raid10`.
    pub level: Level,
    /// Chunk size (levels that stripe), a power of two of at least 4K.
    #[serde(default = "default_chunk")]
    pub chunk: ByteSize,
    /// Copies of each chunk (RAID 10).
    #[serde(default = "default_copies")]
    pub copies: usize,
    /// Member volumes, `nbd://host:port/export`, in slot order.
    pub members: Vec<String>,
    /// Write-intent bitmap region in bytes of member data (default: chosen
    /// by the array to fit its bitmap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_region: Option<ByteSize>,
    /// Start even if dirty and degraded (RAID 5/6 write hole): stripes
    /// written at the crash may be wrong.
    #[serde(default)]
    pub force: bool,
    /// Hot spares: volumes that take the slot of a member that fails
    /// (rebuilt onto while the array serves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spares: Vec<String>,
}

impl ArrayConfig {
    /// Returns the specification the manager assembles (or creates) from.
    /// A configured array never takes members holding another array's
    /// superblock: that needs `nbdraid array create --overwrite`.
    pub fn spec(&self) -> ArraySpec {
        ArraySpec {
            name: self.name.clone(),
            level: self.level,
            chunk: self.chunk.0,
            copies: self.copies,
            members: self.members.clone(),
            bitmap_region: self.bitmap_region.map(|b| b.0),
            force: self.force,
            overwrite: false,
            spares: self.spares.clone(),
        }
    }
}

/// Everything an array daemon is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArrayDaemonConfig {
    /// NBD listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// gRPC control plane address (`Array` admin, `Throttle`); none to disable.
    pub grpc_listen: Option<SocketAddr>,
    /// Prometheus metrics address; none to disable.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory holding the array state store.
    pub data_dir: PathBuf,
    /// File to write the bound addresses to (JSON) once listening.
    pub ready_file: Option<PathBuf>,
    /// Runtime worker threads (0 = one per CPU this process may use).
    pub threads: usize,
    /// Log filter (`info`, `debug`, `nbdraid_raid=trace`, ...).
    pub log: String,
    /// Largest READ/WRITE payload accepted (and advertised).
    pub max_payload: ByteSize,
    /// Seconds a client has to finish negotiating.
    pub handshake_timeout_secs: u64,
    /// Seconds connections get to wind down at shutdown.
    pub shutdown_grace_secs: u64,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Writeout throttle.
    pub throttle: ThrottleConfig,
    /// How members are reached.
    pub members: MembersConfig,
    /// An array idle for this many milliseconds is marked clean (md's safe mode).
    pub safe_mode_delay_ms: u64,
    /// A bitmap region idle for this many milliseconds has its bit cleared.
    pub bitmap_idle_ms: u64,
    /// Resync, recovery and check rate limit in bytes per second (0 = none).
    pub sync_rate: ByteSize,
    /// The rate they keep to (at most) while the array has served clients
    /// in the last 100 ms, so that they yield to foreground traffic (md's
    /// speed_min when busy); 0: no yielding beyond `sync-rate`.
    pub sync_rate_busy: ByteSize,
    /// Scrub every array this often, in seconds (0 = never): a check, or a
    /// repair with `scrub-repair`.
    pub scrub_interval_secs: u64,
    /// Scheduled scrubs repair what they find (a degraded array is only
    /// checked).
    pub scrub_repair: bool,
    /// RAID 5/6 writes go through the partial-parity log on the members,
    /// which closes the write hole: a crash that leaves an array dirty and
    /// degraded is recovered by replaying it. `false` is for measuring its
    /// cost only: such an array then starts only with `--force-assemble`.
    pub write_log: bool,
    /// Arrays to assemble (or create) at start-up.
    #[serde(rename = "array")]
    pub arrays: Vec<ArrayConfig>,
}

/// The array daemon's default throttle capacity. Twice the node's: a
/// maximal RAID 5/6 write costs four times its payload (see
/// [`ArrayDaemonConfig::cost_model`]), and both the foreground and the
/// background pool must hold one.
pub const DEFAULT_CAPACITY: u64 = 512 << 20;

impl Default for ArrayDaemonConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 10819)),
            grpc_listen: None,
            metrics_listen: None,
            data_dir: PathBuf::from("/var/lib/nbdraid/array"),
            ready_file: None,
            threads: 0,
            log: "info".into(),
            max_payload: ByteSize(32 << 20),
            handshake_timeout_secs: 30,
            shutdown_grace_secs: 10,
            max_connections: 1024,
            throttle: ThrottleConfig {
                capacity: ByteSize(DEFAULT_CAPACITY),
                ..ThrottleConfig::default()
            },
            members: MembersConfig::default(),
            safe_mode_delay_ms: 500,
            bitmap_idle_ms: 5000,
            sync_rate: ByteSize(0),
            sync_rate_busy: ByteSize(64 << 20),
            scrub_interval_secs: 0,
            scrub_repair: false,
            write_log: true,
            arrays: Vec::new(),
        }
    }
}

impl ArrayDaemonConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Returns the addresses to listen on.
    pub fn listen_addrs(&self) -> ListenAddrs {
        ListenAddrs {
            nbd: self.listen,
            metrics: self.metrics_listen,
            grpc: self.grpc_listen,
        }
    }

    /// Returns the layer's cost model: the buffers the array daemon itself
    /// may hold for one request, as a conservative bound for every level.
    ///
    /// - A READ may hold, besides the reply buffer, one piece buffer per
    ///   chunk it spans (members answer into their own buffers before the
    ///   reply is assembled, and a degraded read reconstructs from a
    ///   stripe's worth): twice its length.
    /// - A WRITE may hold its data, the old data and old parity read for a
    ///   read-modify-write, and the new parity (RAID 5/6): four times its
    ///   length.
    ///
    /// The members' own models are not in it yet: the manager adds them
    /// per request when it learns them.
    pub fn cost_model(&self) -> CostModel {
        CostModel::buffers("array")
            .with_op(
                OpKind::Read,
                OpCost {
                    base: BASE_COST,
                    per_byte: 2 * PER_BYTE_ONE,
                },
            )
            .with_op(
                OpKind::Write,
                OpCost {
                    base: BASE_COST,
                    per_byte: 4 * PER_BYTE_ONE,
                },
            )
    }

    /// Returns the throttle division this configuration asks for: every
    /// share holds at least one maximal write.
    pub fn throttle_settings(&self) -> ThrottleSettings {
        let max = self.max_payload.0;
        // Every share must hold the largest request of any configured
        // array (its own buffers for its level and geometry), and of an
        // ordinary one created later.
        let largest = self
            .arrays
            .iter()
            .map(|a| {
                let spec = a.spec();
                let own = crate::array::cost::own_cost_model(
                    "array",
                    spec.level,
                    spec.members.len() as u64,
                    spec.chunk,
                );
                own.cost(OpKind::Read, max)
                    .max(own.cost(OpKind::Write, max))
            })
            .fold(self.cost_model().cost(OpKind::Write, max), u64::max);
        self.throttle.settings(largest)
    }

    /// Returns the tunables the manager shares among its arrays.
    pub fn manager_settings(&self) -> ManagerSettings {
        ManagerSettings {
            member_connections: self.members.connections,
            liveness_timeout: Duration::from_millis(self.members.liveness_timeout_ms),
            safe_mode_delay: Duration::from_millis(self.safe_mode_delay_ms),
            bitmap_idle: Duration::from_millis(self.bitmap_idle_ms),
            max_payload: u32::try_from(self.max_payload.0).unwrap_or(u32::MAX),
            sync_rate: self.sync_rate.0,
            sync_rate_busy: self.sync_rate_busy.0,
            scrub_interval: Duration::from_secs(self.scrub_interval_secs),
            scrub_repair: self.scrub_repair,
            write_log: self.write_log,
            member_grant: self.members.grant.0,
            background_grant: self
                .members
                .background_grant
                .map_or(self.members.grant.0 / 4, |g| g.0),
            accounting: self.members.accounting,
            throttle: None,
        }
    }

    /// Returns the configured arrays' specifications, in file order.
    pub fn array_specs(&self) -> Vec<ArraySpec> {
        self.arrays.iter().map(ArrayConfig::spec).collect()
    }

    /// Checks the configuration as a whole; the message says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max = self.max_payload.0;
        if !(64 << 10..=1 << 31).contains(&max) {
            return Err(ConfigError(format!(
                "max-payload {} must be between 64K and 2G",
                self.max_payload
            )));
        }
        self.throttle_settings()
            .check()
            .map_err(|e| ConfigError(e.to_string()))?;
        if self.throttle.lease_ttl_secs == 0 {
            return Err(ConfigError(
                "throttle.lease-ttl-secs must be at least 1".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("max-connections must be at least 1".into()));
        }
        let m = &self.members;
        if !(1..=MAX_MEMBER_CONNECTIONS).contains(&m.connections) {
            return Err(ConfigError(format!(
                "members.connections {} must be from 1 to {MAX_MEMBER_CONNECTIONS}",
                m.connections
            )));
        }
        if m.liveness_timeout_ms < MIN_LIVENESS_TIMEOUT_MS {
            return Err(ConfigError(format!(
                "members.liveness-timeout-ms {} must be at least {MIN_LIVENESS_TIMEOUT_MS}",
                m.liveness_timeout_ms
            )));
        }
        let mut names = std::collections::HashSet::new();
        // Each member (by host:port and export) and the array that uses it.
        let mut owners: HashMap<(String, String), &str> = HashMap::new();
        for a in &self.arrays {
            validate_spec(&a.spec())?;
            if !names.insert(a.name.as_str()) {
                return Err(ConfigError(format!("array {:?} is declared twice", a.name)));
            }
            for uri in &a.members {
                // validate_spec has parsed every URI already.
                let key = member_key(uri).map_err(ConfigError)?;
                if let Some(other) = owners.insert(key, &a.name) {
                    return Err(ConfigError(format!(
                        "member {uri} is used by two arrays, {other:?} and {:?}: a volume can belong to one array only",
                        a.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks what a start would check beyond the configuration itself:
    /// the data directory, and that every member of every configured
    /// array accepts a TCP connection and greets as an NBD server within
    /// [`MEMBER_PROBE_TIMEOUT`] (the negotiation is then aborted: no
    /// export is opened).
    /// Changes nothing on disk; reports every unreachable member.
    pub fn check_environment(&self) -> Result<(), ConfigError> {
        check_data_dir(&self.data_dir)?;
        let probes: Vec<(&str, &str)> = self
            .arrays
            .iter()
            .flat_map(|a| a.members.iter().map(|m| (a.name.as_str(), m.as_str())))
            .collect();
        let failures: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = probes
                .iter()
                .map(|&(array, uri)| {
                    s.spawn(move || {
                        probe_member(uri, MEMBER_PROBE_TIMEOUT)
                            .err()
                            .map(|why| format!("array {array:?}: member {uri} {why}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Some("a member probe panicked".into()))
                })
                .collect()
        });
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(failures.join("\n")))
        }
    }
}

/// Returns the member's `(host:port, export)` as a key that two spellings
/// of the same URI share (an omitted port is the default one).
fn member_key(uri: &str) -> Result<(String, String), String> {
    match nbdraid_client::uri::parse(uri) {
        Ok((addr, export)) => Ok((addr.to_ascii_lowercase(), export)),
        Err(nbdraid_client::ClientError::Invalid(m)) => Err(m),
        Err(e) => Err(e.to_string()),
    }
}

/// Connects to the member's host:port, reads an NBD server's greeting and
/// ends the negotiation with `NBD_OPT_ABORT` (so the server sees a polite
/// client, not a reset); the error says why it failed, in words that follow
/// "member URI". A bare TCP connect would prove little: a proxy or
/// firewall may accept anything.
fn probe_member(uri: &str, timeout: Duration) -> Result<(), String> {
    let (addr, _) = member_key(uri).map_err(|e| format!("is not usable: {e}"))?;
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("is unreachable: cannot resolve {addr}: {e}"))?
        .collect();
    let mut last = format!("cannot resolve {addr}: no addresses");
    for a in resolved {
        let stream = match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                last = format!("{a}: no answer within {} s", timeout.as_secs());
                continue;
            }
            Err(e) => {
                last = format!("{a}: {e}");
                continue;
            }
        };
        let not_nbd =
            |why: String| format!("is not an NBD server: {a} accepts connections but {why}");
        return match greet_and_abort(stream, timeout) {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_nbd("its greeting is not NBDMAGIC".into())),
            Err(e) => Err(not_nbd(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("sent no NBD greeting within {} s", timeout.as_secs())
                }
                std::io::ErrorKind::UnexpectedEof => "closes them without an NBD greeting".into(),
                _ => format!("then fails: {e}"),
            })),
        };
    }
    Err(format!("is unreachable ({last})"))
}

/// Reads the greeting on `stream`; returns whether it is an NBD server's,
/// after aborting the negotiation of a newstyle one.
fn greet_and_abort(mut stream: TcpStream, timeout: Duration) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut greeting = [0u8; GREETING_LEN];
    stream.read_exact(&mut greeting[..8])?;
    if greeting[..8] != NBD_MAGIC.to_be_bytes() {
        return Ok(false);
    }
    stream.read_exact(&mut greeting[8..16])?;
    if greeting[8..16] == IHAVEOPT.to_be_bytes() {
        stream.read_exact(&mut greeting[16..])?;
        let mut abort = Vec::with_capacity(4 + OPTION_HEADER_LEN);
        abort.extend_from_slice(&client_flags::FIXED_NEWSTYLE.to_be_bytes());
        abort.extend_from_slice(&IHAVEOPT.to_be_bytes());
        abort.extend_from_slice(&opt::ABORT.to_be_bytes());
        abort.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&abort)?;
        // The server's acknowledgement; a server may also just close.
        let _ = stream.read(&mut [0u8; OPTION_REPLY_HEADER_LEN]);
    }
    Ok(true)
}

/// Checks an array (export) name: 1-128 characters of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` or `-` (the rules of volume names).
pub fn validate_name(name: &str) -> Result<(), AdminError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if name.len() > MAX_NAME_LEN || !ok_chars || !ok_start {
        return Err(AdminError::Invalid(format!(
            "invalid array name {name:?}: use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -, starting with a letter, digit or _"
        )));
    }
    Ok(())
}

/// Parses a RAID level as configs, the CLI and gRPC spell it (`raid5`).
pub fn parse_level(s: &str) -> Result<Level, AdminError> {
    match s {
        "raid0" => Ok(Level::Raid0),
        "raid1" => Ok(Level::Raid1),
        "raid5" => Ok(Level::Raid5),
        "raid6" => Ok(Level::Raid6),
        "raid10" => Ok(Level::Raid10),
        _ => Err(AdminError::Invalid(format!(
            "unknown RAID level {s:?}: use raid0, raid1, raid5, raid6 or raid10"
        ))),
    }
}

/// Checks an array specification against every rule that needs no member
/// to answer: a valid export name; enough members for the level (RAID 0
/// and 1: 2, RAID 5: 3, RAID 6: 4, RAID 10: at least `copies`, itself at
/// least 2); a power-of-two chunk of at least 4 KiB for striping levels;
/// every member an `nbd://` URI listed once; a power-of-two bitmap region
/// of at least 64 KiB ([`MIN_REGION`]; whether its bits fit depends on the
/// members' size, which the manager checks). The message names the array and the rule.
///
/// Configuration validation and the manager's `create` both call it.
pub fn validate_spec(spec: &ArraySpec) -> Result<(), AdminError> {
    validate_name(&spec.name)?;
    let name = &spec.name;
    let bad = |rule: String| AdminError::Invalid(format!("array {name:?}: {rule}"));
    let geometry = Geometry {
        level: spec.level,
        members: spec.members.len(),
        chunk: spec.chunk,
        // Large enough for one row of any valid chunk, small enough that
        // no array size overflows: only the rules above can fail.
        member_size: MAX_CHUNK,
        copies: spec.copies,
    };
    geometry.validate().map_err(|e| {
        bad(match e {
            LayoutError::TooFewMembers {
                level: Level::Raid10,
                members,
                min,
            } => format!(
                "raid10 with {min} copies needs at least {min} members (one per copy), got {members}"
            ),
            LayoutError::BadChunk { chunk } => format!(
                "chunk {} must be a power of two from {} to {}",
                format_size(chunk),
                format_size(MIN_CHUNK),
                format_size(MAX_CHUNK)
            ),
            other => other.to_string(),
        })
    })?;
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (slot, uri) in spec.members.iter().enumerate() {
        let key = member_key(uri).map_err(|e| bad(format!("member {slot}: {e}")))?;
        if let Some(first) = seen.insert(key, slot) {
            return Err(bad(format!(
                "member {uri} is listed twice (slots {first} and {slot})"
            )));
        }
    }
    if let Some(region) = spec.bitmap_region
        && (!region.is_power_of_two() || region < MIN_REGION)
    {
        return Err(bad(format!(
            "bitmap region {} must be a power of two of at least {}",
            format_size(region),
            format_size(MIN_REGION)
        )));
    }
    Ok(())
}

/// Checks the data directory as a start would (see
/// [`nbdraid_engine::daemon::check_data_dir`]).
pub fn check_data_dir(dir: &Path) -> Result<(), ConfigError> {
    nbdraid_engine::daemon::check_data_dir(dir).map_err(ConfigError)
}

/// Checks the data directory and creates it if missing.
pub fn prepare_data_dir(dir: &Path) -> Result<(), ConfigError> {
    nbdraid_engine::daemon::prepare_data_dir(dir).map_err(ConfigError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, level: Level, members: usize) -> ArraySpec {
        ArraySpec {
            name: name.into(),
            level,
            chunk: DEFAULT_CHUNK,
            copies: DEFAULT_COPIES,
            members: (0..members)
                .map(|i| format!("nbd://10.0.0.{i}:10809/{name}"))
                .collect(),
            bitmap_region: None,
            force: false,
            overwrite: false,
            spares: Vec::new(),
        }
    }

    /// Returns the message of `validate_spec`'s refusal.
    fn refusal(s: &ArraySpec) -> String {
        match validate_spec(s) {
            Err(AdminError::Invalid(m)) => m,
            other => panic!("{s:?} gave {other:?}"),
        }
    }

    fn assert_refused(s: &ArraySpec, want: &[&str]) {
        let m = refusal(s);
        for w in want {
            assert!(m.contains(w), "{m:?} lacks {w:?}");
        }
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../deploy/array.example.toml");
        let c: ArrayDaemonConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.arrays.len(), 2);
        assert_eq!(c.arrays[0].level, Level::Raid5);
        assert_eq!(c.arrays[0].chunk.0, DEFAULT_CHUNK);
        assert_eq!(c.grpc_listen, Some("127.0.0.1:10820".parse().unwrap()));
        // The example states the defaults, apart from what it sets on purpose.
        let d = ArrayDaemonConfig::default();
        assert_eq!(c.members, d.members);
        assert_eq!(c.throttle, d.throttle);
        assert_eq!(
            (
                c.safe_mode_delay_ms,
                c.bitmap_idle_ms,
                c.sync_rate,
                c.sync_rate_busy
            ),
            (
                d.safe_mode_delay_ms,
                d.bitmap_idle_ms,
                d.sync_rate,
                d.sync_rate_busy
            )
        );
    }

    #[test]
    fn parses_a_full_file() {
        let c: ArrayDaemonConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:0"
            grpc-listen = "127.0.0.1:0"
            data-dir = "/tmp/x"
            sync-rate = "100M"
            [members]
            connections = 4
            liveness-timeout-ms = 2000
            [[array]]
            name = "m"
            level = "raid1"
            members = ["nbd://a/v", "nbd://b/v"]
            [[array]]
            name = "p"
            level = "raid10"
            chunk = "64K"
            copies = 3
            bitmap-region = "64M"
            force = true
            members = ["nbd://a:1/w", "nbd://b:1/w", "nbd://c:1/w"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let s = c.manager_settings();
        assert_eq!(s.member_connections, 4);
        assert_eq!(s.liveness_timeout, Duration::from_secs(2));
        assert_eq!(s.sync_rate, 100 << 20);
        assert_eq!(s.max_payload, 32 << 20);
        let specs = c.array_specs();
        assert_eq!(specs[0].copies, DEFAULT_COPIES);
        assert_eq!(specs[1].chunk, 64 << 10);
        assert_eq!(specs[1].bitmap_region, Some(64 << 20));
        assert!(specs[1].force && !specs[1].overwrite);
    }

    #[test]
    fn unknown_keys_and_levels_are_refused() {
        assert!(toml::from_str::<ArrayDaemonConfig>("lisen = \"x\"").is_err());
        assert!(toml::from_str::<ArrayDaemonConfig>("[members]\nconnection = 2").is_err());
        let e = toml::from_str::<ArrayDaemonConfig>(
            "[[array]]\nname = \"a\"\nlevel = \"raid7\"\nmembers = []",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("raid7"), "{e}");
        assert!(parse_level("raid7").is_err());
        for l in [
            Level::Raid0,
            Level::Raid1,
            Level::Raid5,
            Level::Raid6,
            Level::Raid10,
        ] {
            assert_eq!(parse_level(&l.to_string()), Ok(l));
        }
    }

    #[test]
    fn member_counts_per_level() {
        for (level, min) in [
            (Level::Raid0, 2),
            (Level::Raid1, 2),
            (Level::Raid5, 3),
            (Level::Raid6, 4),
            (Level::Raid10, 2),
        ] {
            validate_spec(&spec("a", level, min)).unwrap();
            assert_refused(
                &spec("a", level, min - 1),
                &[
                    "array \"a\"",
                    &format!("at least {min} members"),
                    &format!("got {}", min - 1),
                ],
            );
        }
        let mut s = spec("r10", Level::Raid10, 2);
        s.copies = 3;
        assert_refused(&s, &["array \"r10\"", "3 copies needs at least 3 members"]);
        s.copies = 1;
        assert_refused(&s, &["array \"r10\"", "at least 2 copies, got 1"]);
        // Copies mean nothing to other levels.
        let mut s = spec("r5", Level::Raid5, 3);
        s.copies = 0;
        validate_spec(&s).unwrap();
    }

    #[test]
    fn chunk_rules() {
        let mut s = spec("r5", Level::Raid5, 3);
        for bad in [0, 2048, 3 << 12, 1000, 2 * MAX_CHUNK] {
            s.chunk = bad;
            assert_refused(&s, &["array \"r5\"", "must be a power of two from 4K"]);
        }
        s.chunk = 4096;
        validate_spec(&s).unwrap();
        // RAID 1 has no chunks.
        let mut s = spec("m", Level::Raid1, 2);
        s.chunk = 1000;
        validate_spec(&s).unwrap();
    }

    #[test]
    fn member_rules() {
        let mut s = spec("r5", Level::Raid5, 3);
        s.members[2] = "http://x/y".into();
        assert_refused(
            &s,
            &["array \"r5\"", "member 2", "bad NBD URI", "http://x/y"],
        );
        let mut s = spec("r5", Level::Raid5, 3);
        s.members[2] = s.members[0].clone();
        assert_refused(&s, &["array \"r5\"", "listed twice (slots 0 and 2)"]);
        // Two spellings of one member are one member.
        let mut s = spec("m", Level::Raid1, 2);
        s.members = vec!["nbd://h/v".into(), "nbd://H:10809/v".into()];
        assert_refused(&s, &["listed twice"]);
    }

    #[test]
    fn name_and_bitmap_rules() {
        for bad in ["", ".a", "-a", "a b", "a/b", &"x".repeat(129)] {
            let s = spec(bad, Level::Raid1, 2);
            assert_refused(&s, &["invalid array name", "1-128 characters"]);
        }
        for good in ["a", "_a", "A.b-c_9", &"x".repeat(128)] {
            validate_spec(&spec(good, Level::Raid1, 2)).unwrap();
        }
        let mut s = spec("r6", Level::Raid6, 4);
        s.bitmap_region = Some(1000);
        assert_refused(&s, &["array \"r6\"", "bitmap region 1000", "power of two"]);
        s.bitmap_region = Some(32 << 10);
        assert_refused(&s, &["bitmap region 32K", "at least 64K"]);
        s.bitmap_region = Some(64 << 20);
        validate_spec(&s).unwrap();
    }

    fn config(arrays: Vec<ArraySpec>) -> ArrayDaemonConfig {
        ArrayDaemonConfig {
            arrays: arrays
                .into_iter()
                .map(|s| ArrayConfig {
                    name: s.name,
                    level: s.level,
                    chunk: ByteSize(s.chunk),
                    copies: s.copies,
                    members: s.members,
                    bitmap_region: s.bitmap_region.map(ByteSize),
                    force: s.force,
                    spares: s.spares,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn config_refusal(c: &ArrayDaemonConfig) -> String {
        match c.validate() {
            Err(ConfigError(m)) => m,
            Ok(()) => panic!("accepted {c:?}"),
        }
    }

    #[test]
    fn arrays_in_one_config() {
        let a = spec("a", Level::Raid1, 2);
        let mut b = spec("b", Level::Raid1, 2);
        config(vec![a.clone(), b.clone()]).validate().unwrap();
        let m = config_refusal(&config(vec![a.clone(), a.clone()]));
        assert!(m.contains("array \"a\" is declared twice"), "{m}");
        b.members[1] = a.members[0].clone();
        let m = config_refusal(&config(vec![a.clone(), b.clone()]));
        assert!(
            m.contains(&a.members[0]) && m.contains("two arrays, \"a\" and \"b\""),
            "{m}"
        );
        // A spec rule breaks the config with the same words.
        let bad = spec("r5", Level::Raid5, 2);
        assert_eq!(config_refusal(&config(vec![bad.clone()])), refusal(&bad));
    }

    #[test]
    fn daemon_settings_rules() {
        ArrayDaemonConfig::default().validate().unwrap();
        let refused = |change: &dyn Fn(&mut ArrayDaemonConfig), want: &str| {
            let mut c = ArrayDaemonConfig::default();
            change(&mut c);
            let m = config_refusal(&c);
            assert!(m.contains(want), "{m:?} lacks {want:?}");
        };
        refused(
            &|c| c.throttle.capacity = ByteSize(256 << 20),
            "raise throttle.capacity",
        );
        refused(&|c| c.members.connections = 0, "members.connections 0");
        refused(
            &|c| c.members.liveness_timeout_ms = 10,
            "members.liveness-timeout-ms 10 must be at least 100",
        );
        refused(&|c| c.max_payload = ByteSize(4096), "max-payload 4K");
        refused(&|c| c.max_connections = 0, "max-connections");
        refused(&|c| c.throttle.lease_ttl_secs = 0, "lease-ttl-secs");
    }

    #[test]
    fn cost_model_and_throttle() {
        let c = ArrayDaemonConfig::default();
        let m = c.cost_model();
        assert_eq!(m.layer(), "array");
        assert_eq!(m.cost(OpKind::Write, 1 << 20), BASE_COST + (4 << 20));
        assert_eq!(m.cost(OpKind::Read, 1 << 20), BASE_COST + (2 << 20));
        assert_eq!(m.cost(OpKind::Flush, 0), BASE_COST);
        let t = c.throttle_settings();
        assert_eq!(t.largest_request, BASE_COST + (128 << 20));
        t.check().unwrap();
    }

    /// Returns the address of a listener that greets every connection as
    /// an NBD server does (and then hangs up).
    fn fake_nbd_server() -> SocketAddr {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut greeting = NBD_MAGIC.to_be_bytes().to_vec();
                greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
                greeting.extend_from_slice(&[0, 3]);
                let _ = s.write_all(&greeting);
            }
        });
        addr
    }

    #[test]
    fn environment_checks() {
        let dir = tempfile::tempdir().unwrap();
        let nbd = fake_nbd_server();
        // Accepts connections (the kernel's backlog) but says nothing.
        let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A port nothing listens on: bound, then closed.
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut a = spec("m", Level::Raid1, 2);
        a.members = vec![format!("nbd://{nbd}/x"), format!("nbd://{nbd}/y")];
        let mut c = ArrayDaemonConfig {
            data_dir: dir.path().join("new"),
            ..config(vec![a.clone()])
        };
        c.check_environment().unwrap();

        a.members[1] = format!("nbd://{down}/y");
        let mut b = spec("n", Level::Raid1, 2);
        b.members = vec![
            format!("nbd://{nbd}/z"),
            format!("nbd://{}/w", mute.local_addr().unwrap()),
        ];
        c.arrays = config(vec![a, b]).arrays;
        let m = c.check_environment().unwrap_err().0;
        let lines: Vec<&str> = m.lines().collect();
        assert_eq!(lines.len(), 2, "{m}");
        assert!(
            lines[0].starts_with("array \"m\": member nbd://")
                && lines[0].contains("/y is unreachable"),
            "{m}"
        );
        assert!(
            lines[1].starts_with("array \"n\": member nbd://")
                && lines[1].contains("/w is not an NBD server")
                && lines[1].contains("sent no NBD greeting"),
            "{m}"
        );

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let m = check_data_dir(&file).unwrap_err().0;
        assert!(m.contains("is not a directory"), "{m}");
        let m = check_data_dir(&file.join("sub")).unwrap_err().0;
        assert!(m.contains("is a file, not a directory"), "{m}");
        c.data_dir = file;
        assert!(c.check_environment().unwrap_err().0.contains("data dir"));
        prepare_data_dir(&dir.path().join("a/b")).unwrap();
        assert!(dir.path().join("a/b").is_dir());
    }
}
