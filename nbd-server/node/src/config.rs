//! The node's configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "0.0.0.0:10809"
//! metrics-listen = "127.0.0.1:9109"
//! data-dir = "/var/lib/nbdraid/node"
//!
//! [throttle]
//! capacity = "256M"
//!
//! [[volume]]
//! name = "vol0"
//! size = "10G"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nbdraid_proto::ByteSize;
use serde::{Deserialize, Serialize};

use nbdraid_engine::cost::CostModel;
use nbdraid_engine::daemon::ListenAddrs;
use nbdraid_engine::device::{BlockSizes, OpKind};
use nbdraid_engine::fault::{Faults, OpSet};
use nbdraid_engine::throttle::ThrottleSettings;

use crate::error::{Error, Result};
use crate::store::file::IoMode;
use crate::volumes::validate_name;

/// FOR TESTING ONLY: a fault injected into one volume's storage (builds
/// with the `fault-injection` feature; also settable over gRPC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FaultSpec {
    /// The volume it applies to.
    pub volume: String,
    /// Added to every storage operation, in microseconds.
    pub delay_us: u64,
    /// Storage throughput limit in bytes per second (0 = none).
    pub bandwidth: ByteSize,
    /// Reads (and cache, block status) fail with EIO.
    pub fail_reads: bool,
    /// Writes (and trim, write zeroes) fail with EIO.
    pub fail_writes: bool,
    /// Flushes fail with EIO.
    pub fail_flush: bool,
    /// Every operation waits until this is cleared (a stopped disk).
    pub hang: bool,
}

impl FaultSpec {
    /// Returns the settings for the fault wrapper.
    pub fn faults(&self) -> Faults {
        let mut fail = OpSet::NONE;
        if self.fail_reads {
            fail = fail.union(OpSet::reads());
        }
        if self.fail_writes {
            fail = fail.union(OpSet::writes());
        }
        if self.fail_flush {
            fail = fail.union(OpSet::of(&[OpKind::Flush]));
        }
        Faults {
            delay: std::time::Duration::from_micros(self.delay_us),
            bandwidth: self.bandwidth.0,
            fail,
            hang: self.hang,
        }
    }
}

/// A volume declared in the configuration, created at start-up if missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeSpec {
    /// Volume (and export) name.
    pub name: String,
    /// Size, e.g. `10G`.
    pub size: ByteSize,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for VolumeSpec {
    type Err = String;

    /// Parses `NAME:SIZE` or `NAME:SIZE:ro`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut parts = s.split(':');
        let (Some(name), Some(size)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "invalid volume {s:?}: expected NAME:SIZE or NAME:SIZE:ro"
            ));
        };
        let read_only = match parts.next() {
            None => false,
            Some("ro") => true,
            Some(other) => {
                return Err(format!(
                    "invalid volume {s:?}: unknown mode {other:?} (only \"ro\")"
                ));
            }
        };
        if parts.next().is_some() {
            return Err(format!(
                "invalid volume {s:?}: expected NAME:SIZE or NAME:SIZE:ro"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            size: size.parse()?,
            read_only,
        })
    }
}

pub use nbdraid_engine::throttle::ThrottleConfig;

/// Everything a node daemon is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// NBD listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Prometheus metrics address; none to disable.
    pub metrics_listen: Option<SocketAddr>,
    /// gRPC control plane address (admin, throttle); none to disable.
    pub grpc_listen: Option<SocketAddr>,
    /// Directory holding the catalog and the volume files.
    pub data_dir: PathBuf,
    /// File to write the bound addresses to (JSON) once listening.
    pub ready_file: Option<PathBuf>,
    /// Export served to clients that ask for the default name "".
    pub default_export: Option<String>,
    /// Volumes to create at start-up if missing.
    #[serde(rename = "volume")]
    pub volumes: Vec<VolumeSpec>,
    /// How file I/O is issued.
    pub io_mode: IoMode,
    /// Largest READ/WRITE payload accepted (and advertised).
    pub max_payload: ByteSize,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Seconds a client has to finish negotiating.
    pub handshake_timeout_secs: u64,
    /// Seconds connections get to wind down at shutdown.
    pub shutdown_grace_secs: u64,
    /// Runtime worker threads (0 = one per CPU this process may use).
    pub threads: usize,
    /// Log filter (`info`, `debug`, `nbd_server=trace`, ...).
    pub log: String,
    /// Writeout throttle.
    pub throttle: ThrottleConfig,
    /// FOR TESTING ONLY: storage faults to inject (needs a build with the
    /// `fault-injection` feature; rejected otherwise).
    #[serde(rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 10809)),
            metrics_listen: None,
            grpc_listen: None,
            data_dir: PathBuf::from("/var/lib/nbdraid/node"),
            ready_file: None,
            default_export: None,
            volumes: Vec::new(),
            io_mode: IoMode::Auto,
            max_payload: ByteSize(32 << 20),
            max_connections: 1024,
            handshake_timeout_secs: 30,
            shutdown_grace_secs: 10,
            threads: 0,
            log: "info".into(),
            throttle: ThrottleConfig::default(),
            faults: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Returns the block sizes advertised to clients.
    pub fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            max: self.max_payload.0 as u32,
            ..BlockSizes::default()
        }
    }

    /// Returns the node's cost model (what its volumes charge and its
    /// `Throttle` service publishes).
    pub fn cost_model(&self) -> CostModel {
        CostModel::buffers("node")
    }

    /// Returns the addresses to listen on.
    pub fn listen_addrs(&self) -> ListenAddrs {
        ListenAddrs {
            nbd: self.listen,
            metrics: self.metrics_listen,
            grpc: self.grpc_listen,
        }
    }

    /// Returns the throttle division this configuration asks for.
    pub fn throttle_settings(&self) -> ThrottleSettings {
        let largest = self.cost_model().cost(OpKind::Write, self.max_payload.0);
        self.throttle.settings(largest)
    }

    /// Checks the configuration as a whole; the message says what to change.
    pub fn validate(&self) -> Result<()> {
        let max = self.max_payload.0;
        if !(64 << 10..=1 << 31).contains(&max) {
            return Err(Error::Config(format!(
                "max-payload {} must be between 64K and 2G",
                self.max_payload
            )));
        }
        self.throttle_settings()
            .check()
            .map_err(|e| Error::Config(e.to_string()))?;
        if self.throttle.lease_ttl_secs == 0 {
            return Err(Error::Config(
                "throttle.lease-ttl-secs must be at least 1".into(),
            ));
        }
        if !self.faults.is_empty() && !cfg!(feature = "fault-injection") {
            return Err(Error::Config(
                "[[fault]] sections need a build with the fault-injection feature (testing only)"
                    .into(),
            ));
        }
        for f in &self.faults {
            if !self.volumes.iter().any(|v| v.name == f.volume) {
                tracing::warn!(volume = %f.volume, "fault declared for a volume not declared in this config");
            }
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max-connections must be at least 1".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            validate_name(&v.name).map_err(|e| Error::Config(e.to_string()))?;
            if v.size.0 == 0 {
                return Err(Error::Config(format!("volume {:?} has size 0", v.name)));
            }
            if !seen.insert(&v.name) {
                return Err(Error::Config(format!(
                    "volume {:?} is declared twice",
                    v.name
                )));
            }
        }
        if let Some(d) = &self.default_export {
            validate_name(d).map_err(|e| Error::Config(e.to_string()))?;
        }
        Ok(())
    }
}

/// Checks the data directory as a start would (see
/// [`nbdraid_engine::daemon::check_data_dir`]).
pub fn check_data_dir(dir: &Path) -> Result<()> {
    nbdraid_engine::daemon::check_data_dir(dir).map_err(Error::Config)
}

/// Checks the data directory and creates it if missing.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    nbdraid_engine::daemon::prepare_data_dir(dir).map_err(Error::Config)
}

/// Checks that the file system under `dir` can hold a file of `size`
/// bytes, with an unnamed temporary file that disappears when closed
/// (nothing is left behind). File systems without `O_TMPFILE` pass.
fn check_file_size(dir: &Path, name: &str, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(at) = nbdraid_engine::daemon::existing_ancestor(dir) else {
        return Ok(());
    };
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(at)
    else {
        return Ok(());
    };
    match file.set_len(size) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)) => {
            Err(Error::Config(format!(
                "volume {name:?} of {} is larger than the file system under {} allows for one file",
                ByteSize(size),
                at.display()
            )))
        }
        _ => Ok(()),
    }
}

impl NodeConfig {
    /// Checks what a start would check beyond the configuration itself:
    /// the data directory, and that every declared volume fits in one file
    /// on its file system. Changes nothing on disk.
    pub fn check_environment(&self) -> Result<()> {
        check_data_dir(&self.data_dir)?;
        for v in &self.volumes {
            check_file_size(&self.data_dir, &v.name, v.size.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let c: NodeConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:10809"
            metrics-listen = "127.0.0.1:0"
            data-dir = "/tmp/x"
            io-mode = "blocking"
            [throttle]
            capacity = "128M"
            [[volume]]
            name = "a"
            size = "1G"
            [[volume]]
            name = "b"
            size = 4096
            read-only = true
            "#,
        )
        .unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[0].size.0, 1 << 30);
        assert!(c.volumes[1].read_only);
        assert_eq!(c.throttle.capacity.0, 128 << 20);
        assert_eq!(c.io_mode, IoMode::Blocking);
        c.validate().unwrap();
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../deploy/node.example.toml");
        let c: NodeConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.volumes[0].name, "vol0");
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(toml::from_str::<NodeConfig>("lisen = \"x\"").is_err());
        let mut c = NodeConfig::default();
        c.throttle.capacity = ByteSize(1 << 20);
        assert!(c.validate().is_err(), "capacity below the largest request");
        let c = NodeConfig {
            volumes: vec!["a:1M".parse().unwrap(), "a:2M".parse().unwrap()],
            ..Default::default()
        };
        assert!(c.validate().is_err(), "duplicate volume");
        assert!("a".parse::<VolumeSpec>().is_err());
        assert!("a:1M:rw".parse::<VolumeSpec>().is_err());
        assert!("a:1Q".parse::<VolumeSpec>().is_err());
        assert!("a:1M:ro".parse::<VolumeSpec>().unwrap().read_only);
    }
}
