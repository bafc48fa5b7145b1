//! The node's metadata: its identity and the catalog of volumes.
//!
//! Callers use the [`Catalog`] trait; [`SledCatalog`] keeps it in an
//! embedded `sled` database under `<data-dir>/catalog`. Every mutation is
//! flushed before it returns (sled's own background flush runs only every
//! 500 ms), so an acknowledged create/resize/delete survives a crash.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One volume as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Unique name; also the NBD export name and the file name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Random identity, stable for the volume's life.
    pub uuid: String,
    /// Writes are refused.
    pub read_only: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl VolumeRecord {
    /// Returns a new record with a fresh uuid and the current time.
    pub fn new(name: &str, size: u64, read_only: bool) -> Self {
        Self {
            name: name.to_string(),
            size,
            uuid: uuid::Uuid::new_v4().to_string(),
            read_only,
            created: now_secs(),
        }
    }
}

/// The node's identity, created once with its data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Random identity of this node.
    pub uuid: String,
    /// When the data directory was initialised, seconds since the Unix epoch.
    pub created: u64,
}

/// Returns seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Durable storage of the node's identity and volume records.
pub trait Catalog: Send + Sync + 'static {
    /// Returns the node identity, creating it on first use.
    fn identity(&self) -> Result<NodeIdentity>;
    /// Returns every volume, sorted by name.
    fn list(&self) -> Result<Vec<VolumeRecord>>;
    /// Returns one volume.
    fn get(&self, name: &str) -> Result<Option<VolumeRecord>>;
    /// Adds a volume; fails if the name is taken.
    fn insert(&self, rec: &VolumeRecord) -> Result<()>;
    /// Replaces an existing volume's record.
    fn update(&self, rec: &VolumeRecord) -> Result<()>;
    /// Removes a volume's record.
    fn remove(&self, name: &str) -> Result<()>;
}

/// A [`Catalog`] in an embedded sled database.
#[derive(Debug)]
pub struct SledCatalog {
    db: sled::Db,
    volumes: sled::Tree,
}

const IDENTITY_KEY: &[u8] = b"node-identity";

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Catalog(e.to_string())
}

/// Reports whether sled could not take the catalog's lock (another
/// process holds it). sled reports that as an `Other` I/O error whose
/// message says so (`could not acquire lock on ...`), not as `WouldBlock`.
fn is_locked(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

/// Explains why the catalog at `path` cannot be opened, in words a user
/// can act on (sled's own message is a debug dump for I/O errors).
fn open_error(path: &Path, e: sled::Error) -> Error {
    let shown = path.display();
    if is_locked(&e) {
        return Error::Catalog(format!(
            "the catalog {shown} is locked by another process: is another nbdraid-node using this data dir?"
        ));
    }
    match e {
        sled::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Catalog(format!(
                "cannot open the catalog {shown}: permission denied (check the data dir's owner and mode)"
            )),
            _ => Error::Catalog(format!("cannot open the catalog {shown}: {io}")),
        },
        other => Error::Catalog(format!("cannot open the catalog {shown}: {other}")),
    }
}

impl SledCatalog {
    /// Opens (or creates) the catalog at `path`. Waits up to a few seconds
    /// for the lock of a previous owner that is still exiting.
    pub fn open(path: &Path) -> Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => break db,
                Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(open_error(path, e)),
            }
        };
        let volumes = db.open_tree("volumes").map_err(db_err)?;
        Ok(Self { db, volumes })
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(db_err)?;
        Ok(())
    }

    fn encode(rec: &VolumeRecord) -> Result<Vec<u8>> {
        serde_json::to_vec(rec).map_err(db_err)
    }

    fn decode(bytes: &[u8]) -> Result<VolumeRecord> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Catalog(format!("corrupt volume record: {e}")))
    }
}

impl Catalog for SledCatalog {
    fn identity(&self) -> Result<NodeIdentity> {
        if let Some(v) = self.db.get(IDENTITY_KEY).map_err(db_err)? {
            return serde_json::from_slice(&v)
                .map_err(|e| Error::Catalog(format!("corrupt node identity: {e}")));
        }
        let id = NodeIdentity {
            uuid: uuid::Uuid::new_v4().to_string(),
            created: now_secs(),
        };
        let bytes = serde_json::to_vec(&id).map_err(db_err)?;
        // Another caller may have raced us; whoever wrote first wins.
        match self
            .db
            .compare_and_swap(IDENTITY_KEY, None as Option<&[u8]>, Some(bytes))
            .map_err(db_err)?
        {
            Ok(()) => {
                self.flush()?;
                Ok(id)
            }
            Err(_) => self.identity(),
        }
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.volumes
            .iter()
            .map(|kv| kv.map_err(db_err).and_then(|(_, v)| Self::decode(&v)))
            .collect()
    }

    fn get(&self, name: &str) -> Result<Option<VolumeRecord>> {
        self.volumes
            .get(name.as_bytes())
            .map_err(db_err)?
            .map(|v| Self::decode(&v))
            .transpose()
    }

    fn insert(&self, rec: &VolumeRecord) -> Result<()> {
        let bytes = Self::encode(rec)?;
        match self
            .volumes
            .compare_and_swap(rec.name.as_bytes(), None as Option<&[u8]>, Some(bytes))
            .map_err(db_err)?
        {
            Ok(()) => self.flush(),
            Err(_) => Err(Error::VolumeExists(rec.name.clone())),
        }
    }

    fn update(&self, rec: &VolumeRecord) -> Result<()> {
        if self.get(&rec.name)?.is_none() {
            return Err(Error::UnknownVolume(rec.name.clone()));
        }
        self.volumes
            .insert(rec.name.as_bytes(), Self::encode(rec)?)
            .map_err(db_err)?;
        self.flush()
    }

    fn remove(&self, name: &str) -> Result<()> {
        if self
            .volumes
            .remove(name.as_bytes())
            .map_err(db_err)?
            .is_none()
        {
            return Err(Error::UnknownVolume(name.to_string()));
        }
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let id = {
            let c = SledCatalog::open(&path).unwrap();
            c.insert(&VolumeRecord::new("a", 4096, false)).unwrap();
            assert!(matches!(
                c.insert(&VolumeRecord::new("a", 1, false)),
                Err(Error::VolumeExists(_))
            ));
            let mut b = VolumeRecord::new("b", 8192, true);
            c.insert(&b).unwrap();
            b.size = 16384;
            c.update(&b).unwrap();
            c.identity().unwrap()
        };
        let c = SledCatalog::open(&path).unwrap();
        assert_eq!(c.identity().unwrap(), id);
        let names: Vec<_> = c
            .list()
            .unwrap()
            .into_iter()
            .map(|r| (r.name, r.size))
            .collect();
        assert_eq!(names, vec![("a".into(), 4096), ("b".into(), 16384)]);
        c.remove("a").unwrap();
        assert!(c.get("a").unwrap().is_none());
        assert!(matches!(c.remove("a"), Err(Error::UnknownVolume(_))));
    }
}
