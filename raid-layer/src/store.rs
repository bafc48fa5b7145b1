//! The array daemon's state store: what it remembers of its arrays between
//! starts ([`ArrayRecord`]s), behind the manager's [`ArrayStore`] trait.
//!
//! [`SledArrayStore`] keeps the records in an embedded `sled` database
//! under `<data-dir>/arrays`, one JSON value per array name. Every mutation
//! is flushed before it returns (sled's own background flush runs only
//! every 500 ms), so an array whose creation was acknowledged is assembled
//! again after a crash.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::api::AdminError;
use crate::manager::{ArrayRecord, ArrayStore};

/// An [`ArrayStore`] in an embedded sled database.
#[derive(Debug)]
pub struct SledArrayStore {
    db: sled::Db,
    arrays: sled::Tree,
}

/// How long [`SledArrayStore::open`] waits for the lock of a previous
/// owner that is still exiting.
const LOCK_WAIT: Duration = Duration::from_secs(5);

fn db_err(e: impl std::fmt::Display) -> AdminError {
    AdminError::Internal(format!("array state store: {e}"))
}

/// Returns whether opening failed because another process holds the
/// database's lock. sled reports its failed `flock` as an `Other` I/O
/// error whose message says so, not as `WouldBlock`.
fn is_locked(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().starts_with("could not acquire lock")
        }
        _ => false,
    }
}

/// Explains why the store at `path` cannot be opened, in words a user can
/// act on (sled's own message is a debug dump for I/O errors).
fn open_error(path: &Path, e: sled::Error) -> AdminError {
    let shown = path.display();
    if is_locked(&e) {
        return AdminError::Internal(format!(
            "the array state store {shown} is locked by another process: is another nbdraid-array using this data dir?"
        ));
    }
    AdminError::Internal(match e {
        sled::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot open the array state store {shown}: permission denied (check the data dir's owner and mode)"
            ),
            _ => format!("cannot open the array state store {shown}: {io}"),
        },
        other => format!("cannot open the array state store {shown}: {other}"),
    })
}

impl SledArrayStore {
    /// Opens (or creates) the store at `path`. Waits up to a few seconds
    /// for the lock of a previous owner that is still exiting.
    pub fn open(path: &Path) -> Result<Self, AdminError> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    fn open_waiting(path: &Path, lock_wait: Duration) -> Result<Self, AdminError> {
        let deadline = Instant::now() + lock_wait;
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(e) if is_locked(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(open_error(path, e)),
            }
        };
        let arrays = db.open_tree("arrays").map_err(db_err)?;
        Ok(Self { db, arrays })
    }

    fn flush(&self) -> Result<(), AdminError> {
        self.db.flush().map_err(db_err)?;
        Ok(())
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<ArrayRecord, AdminError> {
        serde_json::from_slice(bytes).map_err(|e| {
            AdminError::Internal(format!(
                "corrupt record of array {:?} in the state store: {e}",
                String::from_utf8_lossy(key)
            ))
        })
    }
}

impl ArrayStore for SledArrayStore {
    /// Returns every record, sorted by name.
    fn list(&self) -> Result<Vec<ArrayRecord>, AdminError> {
        self.arrays
            .iter()
            .map(|kv| kv.map_err(db_err).and_then(|(k, v)| Self::decode(&k, &v)))
            .collect()
    }

    fn put(&self, record: &ArrayRecord) -> Result<(), AdminError> {
        let bytes = serde_json::to_vec(record).map_err(db_err)?;
        self.arrays
            .insert(record.spec.name.as_bytes(), bytes)
            .map_err(db_err)?;
        self.flush()
    }

    /// Removes the record of `name`; removing one that is not there
    /// succeeds (the store ends as asked).
    fn remove(&self, name: &str) -> Result<(), AdminError> {
        if self
            .arrays
            .remove(name.as_bytes())
            .map_err(db_err)?
            .is_some()
        {
            self.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ArraySpec;
    use crate::layout::Level;

    fn record(name: &str, level: Level) -> ArrayRecord {
        ArrayRecord {
            spec: ArraySpec {
                name: name.into(),
                level,
                chunk: 64 << 10,
                copies: 2,
                members: vec!["nbd://a:1/x".into(), "nbd://b:1/x".into()],
                bitmap_region: Some(1 << 20),
                force: false,
                overwrite: true,
                spares: Vec::new(),
            },
            uuid: uuid::Uuid::new_v4().to_string(),
            replaced: Default::default(),
        }
    }

    /// Records written before spares and replacements existed still load.
    #[test]
    fn records_of_earlier_builds_load() {
        let old = r#"{"spec":{"name":"r5","level":"raid5","chunk":65536,"copies":2,
            "members":["nbd://a:1/x","nbd://b:1/x","nbd://c:1/x"],"bitmap_region":null,
            "force":false,"overwrite":false},"uuid":"u"}"#;
        let r: ArrayRecord = serde_json::from_str(old).unwrap();
        assert!(r.spec.spares.is_empty() && r.replaced.is_empty());
        assert_eq!(r.spec.members.len(), 3);
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arrays");
        let (b, mut c) = (record("b", Level::Raid1), record("c", Level::Raid0));
        {
            let s = SledArrayStore::open(&path).unwrap();
            assert!(s.list().unwrap().is_empty());
            s.put(&c).unwrap();
            s.put(&b).unwrap();
            s.put(&record("a", Level::Raid10)).unwrap();
            c.uuid = "replaced".into();
            s.put(&c).unwrap();
            s.remove("a").unwrap();
            s.remove("a").unwrap();
        }
        let s = SledArrayStore::open(&path).unwrap();
        assert_eq!(s.list().unwrap(), vec![b, c]);
    }

    #[test]
    fn a_second_owner_is_told_who_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arrays");
        let _first = SledArrayStore::open(&path).unwrap();
        // sled's lock is an flock() on its own open file, so a second open
        // in this process meets it as another process would.
        let m = SledArrayStore::open_waiting(&path, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("locked by another process") && m.contains("another nbdraid-array"),
            "{m}"
        );
    }

    #[test]
    fn unwritable_dir_is_reported_in_words() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let result = SledArrayStore::open(&locked.join("arrays"));
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
        // root ignores the mode; there is nothing to check then.
        if let Err(e) = result {
            let m = e.to_string();
            assert!(m.contains("cannot open the array state store"), "{m}");
            assert!(m.contains("permission denied"), "{m}");
        }
    }

    #[test]
    fn corrupt_records_name_the_array() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledArrayStore::open(&dir.path().join("arrays")).unwrap();
        s.arrays.insert(b"bad", b"{not json".to_vec()).unwrap();
        let m = s.list().unwrap_err().to_string();
        assert!(m.contains("corrupt record of array \"bad\""), "{m}");
    }
}
