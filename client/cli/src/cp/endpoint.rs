//! The two ends of a copy: an NBD export or a local file / block device,
//! behind one interface (`read`, `write`, `zero`, `flush`).
//!
//! Buffers travel by value and come back, so the pipeline reuses a fixed
//! set of them. Local file I/O runs on tokio's blocking pool, so a slow
//! disk never stalls the NBD connections that share the runtime.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use nbdraid_client::Client;
use nbdraid_proto::consts::transmission_flags as tf;

use crate::nbd;

/// Largest range zeroed with one request where zeroing is native.
pub const ZERO_RANGE: u64 = 1 << 30;

/// One end of a copy.
pub enum Endpoint {
    /// An NBD export.
    Nbd { client: Client, uri: String },
    /// A local file or device.
    File {
        file: Arc<File>,
        path: PathBuf,
        /// A regular file (can be truncated, holes are free).
        regular: bool,
    },
}

impl Endpoint {
    /// Opens the source.
    pub async fn open_source(arg: &str, connections: usize) -> Result<Self> {
        if nbd::is_uri(arg) {
            let client = nbd::connect(arg, connections).await?;
            return Ok(Endpoint::Nbd {
                client,
                uri: arg.to_string(),
            });
        }
        let path = PathBuf::from(arg);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let regular = file.metadata()?.is_file();
        Ok(Endpoint::File {
            file: Arc::new(file),
            path,
            regular,
        })
    }

    /// Opens (a local file: creates) the destination.
    pub async fn open_dest(arg: &str, connections: usize) -> Result<Self> {
        if nbd::is_uri(arg) {
            let client = nbd::connect(arg, connections).await?;
            if client.info().read_only() {
                bail!("{arg} is read-only");
            }
            return Ok(Endpoint::Nbd {
                client,
                uri: arg.to_string(),
            });
        }
        let path = PathBuf::from(arg);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        let regular = file.metadata()?.is_file();
        Ok(Endpoint::File {
            file: Arc::new(file),
            path,
            regular,
        })
    }

    /// Returns a name for messages.
    pub fn name(&self) -> String {
        match self {
            Endpoint::Nbd { uri, .. } => uri.clone(),
            Endpoint::File { path, .. } => path.display().to_string(),
        }
    }

    /// Returns the size, or `None` for a device that has none (a pipe, /dev/null).
    pub fn size(&self) -> Result<Option<u64>> {
        match self {
            Endpoint::Nbd { client, .. } => Ok(Some(client.info().size)),
            Endpoint::File { file, path, .. } => file_size(file, path),
        }
    }

    /// Returns the NBD client, if this is an export.
    pub fn client(&self) -> Option<&Client> {
        match self {
            Endpoint::Nbd { client, .. } => Some(client),
            Endpoint::File { .. } => None,
        }
    }

    /// Returns the local file, if this is one.
    pub fn file(&self) -> Option<&File> {
        match self {
            Endpoint::File { file, .. } => Some(file),
            Endpoint::Nbd { .. } => None,
        }
    }

    /// Prepares the destination for `size` bytes: a regular file is
    /// truncated and extended, so everything not written later is a hole.
    /// Returns whether the destination now reads as zeroes everywhere.
    pub fn prepare_dest(&self, size: u64, assume_zero: bool) -> Result<bool> {
        let dsize = self.size()?;
        match self {
            Endpoint::File {
                file,
                path,
                regular: true,
            } => {
                file.set_len(0)
                    .and_then(|()| file.set_len(size))
                    .with_context(|| format!("cannot size {} to {size} bytes", path.display()))?;
                Ok(true)
            }
            _ => {
                if let Some(d) = dsize
                    && d < size
                {
                    bail!(
                        "the destination {} is too small: {d} bytes ({}), the source has {size} bytes ({})",
                        self.name(),
                        crate::units::human(d),
                        crate::units::human(size)
                    );
                }
                Ok(assume_zero)
            }
        }
    }

    /// Returns how large one zero job may be on this destination.
    pub fn zero_chunk(&self, block: u64) -> u64 {
        match self {
            Endpoint::Nbd { client, .. } if client.info().has(tf::SEND_WRITE_ZEROES) => ZERO_RANGE,
            Endpoint::Nbd { .. } => block,
            Endpoint::File { .. } => ZERO_RANGE,
        }
    }

    /// Reads `buf.len()` bytes at `offset`; returns the buffer, filled.
    pub async fn read(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        match self {
            Endpoint::Nbd { client, .. } => client
                .read(offset, buf)
                .await
                .map(|b| b.into_vec())
                .map_err(|e| nbd::op_error(e, "read", offset, len)),
            Endpoint::File { file, path, .. } => {
                let f = file.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let r = read_full(&f, &mut buf, offset);
                    r.map(|()| buf)
                })
                .await?;
                r.with_context(|| {
                    format!("read {} at offset {offset}, length {len}", path.display())
                })
            }
        }
    }

    /// Writes `buf` at `offset`; returns the buffer for reuse.
    pub async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        match self {
            Endpoint::Nbd { client, .. } => {
                let data = Bytes::from(buf);
                client
                    .write(offset, data.clone(), false)
                    .await
                    .map_err(|e| nbd::op_error(e, "write", offset, len))?;
                // The client has let go of its references once the write
                // completed; if not, a fresh buffer replaces this one.
                Ok(match data.try_into_mut() {
                    Ok(m) => Vec::from(m),
                    Err(_) => Vec::with_capacity(len as usize),
                })
            }
            Endpoint::File { file, path, .. } => {
                let f = file.clone();
                let r =
                    tokio::task::spawn_blocking(move || f.write_all_at(&buf, offset).map(|()| buf))
                        .await?;
                r.with_context(|| {
                    format!("write {} at offset {offset}, length {len}", path.display())
                })
            }
        }
    }

    /// Makes `[offset, offset + len)` read as zeroes, leaving it sparse
    /// where the destination can (WRITE_ZEROES without NO_HOLE; a punched
    /// hole), and writing zeroes where it can't.
    pub async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Endpoint::Nbd { client, .. } => {
                if client.info().has(tf::SEND_WRITE_ZEROES) {
                    client
                        .write_zeroes(offset, len, false)
                        .await
                        .map_err(|e| nbd::op_error(e, "write zeroes", offset, len))
                } else {
                    // Jobs are at most one block here (see `zero_chunk`).
                    let zeroes = Bytes::from(vec![0u8; len as usize]);
                    client
                        .write(offset, zeroes, false)
                        .await
                        .map_err(|e| nbd::op_error(e, "write", offset, len))
                }
            }
            Endpoint::File {
                file,
                path,
                regular,
            } => {
                let (f, regular) = (file.clone(), *regular);
                let r = tokio::task::spawn_blocking(move || zero_file(&f, offset, len, regular))
                    .await?;
                r.with_context(|| {
                    format!("zero {} at offset {offset}, length {len}", path.display())
                })
            }
        }
    }

    /// Makes everything written durable: NBD FLUSH, or fsync.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Endpoint::Nbd { client, uri } => {
                if client.info().has(tf::SEND_FLUSH) {
                    client
                        .flush()
                        .await
                        .with_context(|| format!("flush {uri}"))?;
                }
                Ok(())
            }
            Endpoint::File { file, path, .. } => {
                let f = file.clone();
                match tokio::task::spawn_blocking(move || f.sync_all()).await? {
                    Ok(()) => Ok(()),
                    // Character devices (/dev/null) can't be synced; nothing to lose.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                    Err(e) => {
                        Err(anyhow::Error::new(e).context(format!("fsync {}", path.display())))
                    }
                }
            }
        }
    }

    /// Disconnects cleanly from an export.
    pub async fn close(&self) {
        if let Endpoint::Nbd { client, .. } = self {
            client.close(std::time::Duration::from_secs(10)).await;
        }
    }
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::new(e.kind(), "the source file shrank during the copy")
        } else {
            e
        }
    })
}

/// Zeroes a range of a local file: punch a hole (regular files), or
/// FALLOC_FL_ZERO_RANGE, or write zeroes.
fn zero_file(f: &File, offset: u64, len: u64, regular: bool) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    let (off, n) = (offset as libc::off_t, len as libc::off_t);
    let mode = if regular {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
    if unsafe { libc::fallocate(fd, mode, off, n) } == 0 {
        return Ok(());
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64) as usize;
        f.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Returns the size of a regular file or block device; `None` otherwise.
fn file_size(file: &File, path: &Path) -> Result<Option<u64>> {
    let meta = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?;
    if meta.is_file() {
        return Ok(Some(meta.len()));
    }
    if meta.file_type().is_block_device() {
        // SAFETY: lseek on a descriptor we own.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(anyhow::Error::new(std::io::Error::last_os_error())
                .context(format!("size of {}", path.display())));
        }
        return Ok(Some(end as u64));
    }
    Ok(None)
}

/// Reports whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u8 -> u64 reinterpretation; align_to handles alignment.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body
            .chunks(64)
            .all(|c| c.iter().fold(0, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        assert!(is_zero(&b[1..]));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[2000] = 1;
        assert!(!is_zero(&b[1..]));
        assert!(is_zero(&[]));
    }
}
