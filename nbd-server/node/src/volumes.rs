//! The node's volumes: catalog records plus open sparse files, served as
//! NBD exports (one export per volume, named after it).
//!
//! Creation order makes a crash at any point safe: the file is created,
//! sized and synced (with its directory) before the catalog record is
//! written and flushed, so a record never points at a missing file. A file
//! without a record (a crash in between) is reported, never silently reused.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use nbdraid_engine::cost::SharedCostModel;
use nbdraid_engine::device::{BlockDevice, BlockSizes};
use nbdraid_engine::metrics::OpMetrics;
use nbdraid_engine::server::{Export, ExportRegistry};

use crate::catalog::{Catalog, VolumeRecord};
use crate::error::{Error, Result};
use crate::store::file::{FileVolume, IoMode};

/// The device a volume is served as: its file, behind the fault-injection
/// wrapper in testing builds.
#[cfg(feature = "fault-injection")]
pub type VolumeDevice = nbdraid_engine::fault::FaultyDevice<FileVolume>;
/// The device a volume is served as: its file.
#[cfg(not(feature = "fault-injection"))]
pub type VolumeDevice = FileVolume;

#[cfg(feature = "fault-injection")]
fn wrap(file: FileVolume, name: &str) -> VolumeDevice {
    nbdraid_engine::fault::FaultyDevice::new(Arc::new(file), name)
}

#[cfg(not(feature = "fault-injection"))]
fn wrap(file: FileVolume, _name: &str) -> VolumeDevice {
    file
}

#[cfg(feature = "fault-injection")]
fn file_of(dev: &VolumeDevice) -> &FileVolume {
    dev.inner()
}

#[cfg(not(feature = "fault-injection"))]
fn file_of(dev: &VolumeDevice) -> &FileVolume {
    dev
}

/// Longest volume name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a volume name: 1-128 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !ok_start {
        return Err(Error::BadRequest(format!(
            "invalid volume name {name:?}: use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -, starting with a letter, digit or _"
        )));
    }
    Ok(())
}

/// The set of volumes a node serves.
pub struct Volumes {
    dir: PathBuf,
    catalog: Arc<dyn Catalog>,
    io_mode: IoMode,
    block_sizes: BlockSizes,
    model: SharedCostModel,
    default_export: Option<String>,
    open: RwLock<BTreeMap<String, Export<VolumeDevice>>>,
}

impl Volumes {
    /// Opens every volume in `catalog`, with files under `data_dir/volumes`,
    /// charging requests by the node's cost `model`. A volume whose file is
    /// missing is logged and left unexported.
    pub fn open(
        data_dir: &Path,
        catalog: Arc<dyn Catalog>,
        io_mode: IoMode,
        block_sizes: BlockSizes,
        model: SharedCostModel,
        default_export: Option<String>,
    ) -> Result<Self> {
        let dir = data_dir.join("volumes");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("create directory", dir.display().to_string(), e))?;
        let v = Self {
            dir,
            catalog,
            io_mode,
            block_sizes,
            model,
            default_export,
            open: RwLock::new(BTreeMap::new()),
        };
        for rec in v.catalog.list()? {
            match v.open_file(&rec) {
                Ok(export) => {
                    v.write_map().insert(rec.name.clone(), export);
                }
                Err(e) => {
                    tracing::error!(volume = %rec.name, error = %e, "volume cannot be opened; not exported")
                }
            }
        }
        Ok(v)
    }

    /// Returns the path of a volume's file.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Export<VolumeDevice>>> {
        self.open.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Export<VolumeDevice>>> {
        self.open.write().unwrap_or_else(|e| e.into_inner())
    }

    fn open_file(&self, rec: &VolumeRecord) -> Result<Export<VolumeDevice>> {
        let path = self.path_of(&rec.name);
        let what = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!rec.read_only)
            .open(&path)
            .map_err(|e| Error::io("open", what.clone(), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", what.clone(), e))?
            .len();
        if len < rec.size && !rec.read_only {
            // A grow that crashed before the file was extended: finish it.
            file.set_len(rec.size)
                .map_err(|e| Error::io("extend", what, e))?;
        }
        let device = FileVolume::new(
            &rec.name,
            file,
            rec.size,
            rec.read_only,
            self.io_mode,
            self.block_sizes,
            self.model.clone(),
        );
        nbdraid_engine::metrics::unretire_export(&rec.name);
        Ok(Export {
            name: rec.name.clone(),
            device: Arc::new(wrap(device, &rec.name)),
            metrics: OpMetrics::new(&rec.name),
        })
    }

    /// Creates a volume of `size` bytes (a sparse file reading as zeroes).
    pub fn create(&self, name: &str, size: u64, read_only: bool) -> Result<VolumeRecord> {
        validate_name(name)?;
        if size == 0 {
            return Err(Error::BadRequest(
                "volume size must be greater than 0".into(),
            ));
        }
        if self.catalog.get(name)?.is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let path = self.path_of(name);
        let what = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::BadRequest(format!(
                        "{what} exists but is not in the catalog (left by an interrupted create?); move it away to create volume {name:?}"
                    ))
                } else {
                    Error::io("create", what.clone(), e)
                }
            })?;
        let made = file
            .set_len(size)
            .and_then(|_| file.sync_all())
            .and_then(|_| File::open(&self.dir)?.sync_all());
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            if e.raw_os_error() == Some(libc::EFBIG) {
                return Err(Error::BadRequest(format!(
                    "volume {name:?} of {} is larger than the file system under {} allows for one file",
                    nbdraid_proto::ByteSize(size),
                    self.dir.display()
                )));
            }
            return Err(Error::io("create", what, e));
        }
        drop(file);
        let rec = VolumeRecord::new(name, size, read_only);
        if let Err(e) = self.catalog.insert(&rec) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let export = self.open_file(&rec)?;
        self.write_map().insert(name.to_string(), export);
        tracing::info!(volume = name, size, read_only, "volume created");
        Ok(rec)
    }

    /// Makes sure a declared volume exists: creates it if missing, and
    /// refuses to start on a size or mode that contradicts the catalog.
    pub fn ensure(&self, name: &str, size: u64, read_only: bool) -> Result<VolumeRecord> {
        match self.catalog.get(name)? {
            None => self.create(name, size, read_only),
            Some(rec) if rec.size != size => Err(Error::Config(format!(
                "volume {name:?} exists with size {} but the configuration declares {}; change the declaration or resize the volume",
                rec.size, size
            ))),
            Some(rec) if rec.read_only != read_only => Err(Error::Config(format!(
                "volume {name:?} exists with read-only={} but the configuration declares read-only={read_only}",
                rec.read_only
            ))),
            Some(rec) => Ok(rec),
        }
    }

    /// Grows volume `name` to `new_size` bytes. Shrinking is refused: it
    /// would destroy data. Connections already open keep seeing the size
    /// they negotiated; new ones see the new size.
    pub fn resize(&self, name: &str, new_size: u64) -> Result<VolumeRecord> {
        let mut rec = self
            .catalog
            .get(name)?
            .ok_or_else(|| Error::UnknownVolume(name.to_string()))?;
        if new_size < rec.size {
            return Err(Error::BadRequest(format!(
                "volume {name:?} is {} bytes; shrinking to {new_size} would destroy data (only growing is supported)",
                rec.size
            )));
        }
        if new_size == rec.size {
            return Ok(rec);
        }
        let dev = self.device(name).ok_or_else(|| {
            Error::BadRequest(format!(
                "volume {name:?} is not open (its file is missing?)"
            ))
        })?;
        if rec.read_only {
            return Err(Error::BadRequest(format!("volume {name:?} is read-only")));
        }
        // File first, then the record: a crash in between leaves a longer
        // file, which the catalog's size (authoritative) ignores.
        file_of(&dev).grow(new_size)?;
        rec.size = new_size;
        self.catalog.update(&rec)?;
        tracing::info!(volume = name, size = new_size, "volume resized");
        Ok(rec)
    }

    /// Deletes volume `name` and its file. Refused while clients are connected.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut map = self.write_map();
        if let Some(export) = map.get(name) {
            let conns = export
                .metrics
                .stats
                .connections
                .load(std::sync::atomic::Ordering::Acquire);
            if conns > 0 {
                return Err(Error::Busy {
                    volume: name.to_string(),
                    why: format!("{conns} client connection(s) open; disconnect them first"),
                });
            }
        }
        if self.catalog.get(name)?.is_none() {
            return Err(Error::UnknownVolume(name.to_string()));
        }
        map.remove(name);
        self.catalog.remove(name)?;
        drop(map);
        nbdraid_engine::metrics::retire_export(name);
        let path = self.path_of(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("delete", path.display().to_string(), e)),
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Returns the export of volume `name` (device and metrics).
    pub fn export(&self, name: &str) -> Option<Export<VolumeDevice>> {
        self.read_map().get(name).cloned()
    }

    /// Returns every volume record.
    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.catalog.list()
    }

    /// Returns the device a volume is served as.
    pub fn device(&self, name: &str) -> Option<Arc<VolumeDevice>> {
        self.read_map().get(name).map(|e| e.device.clone())
    }

    /// Returns the fault control of volume `name` (testing builds only).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self, name: &str) -> Option<Arc<nbdraid_engine::fault::FaultControl>> {
        self.read_map()
            .get(name)
            .map(|e| e.device.control().clone())
    }

    fn default_name(&self) -> Option<String> {
        if let Some(d) = &self.default_export {
            return Some(d.clone());
        }
        let map = self.read_map();
        if map.len() == 1 {
            return map.keys().next().cloned();
        }
        None
    }
}

impl ExportRegistry<VolumeDevice> for Volumes {
    fn lookup(&self, name: &str) -> Option<Export<VolumeDevice>> {
        let name = if name.is_empty() {
            self.default_name()?
        } else {
            name.to_string()
        };
        self.read_map().get(&name).cloned()
    }

    fn list(&self) -> Vec<(String, String)> {
        self.read_map()
            .values()
            .map(|e| (e.name.clone(), e.device.info().description))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "vol0", "my-vol.1", "_x", "A_B"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "ä", &"x".repeat(129), "a\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
