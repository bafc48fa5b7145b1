//! The copy plan: the source's ranges in order, each known to hold data or
//! to read as zeroes, cut into jobs the pipeline runs concurrently.
//!
//! - An NBD source says which ranges read as zeroes through block status
//!   (`base:allocation`, the ZERO flag), when the server offers it.
//! - A local file says where its holes are through `SEEK_DATA` /
//!   `SEEK_HOLE`; a file system or device that does not support them (the
//!   `lseek` fails with EINVAL) is all data.
//! - With `--no-sparse`, or when the source can't tell, everything is data.
//!
//! Data ranges are cut at multiples of the block size (so requests stay
//! aligned); zero ranges are cut at `zero_chunk`, which the destination
//! chooses (large when it can zero a range in one request).

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::Result;
use nbdraid_client::Client;

use crate::nbd::{self, ExtentWalker};

/// A range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// The range reads as zeroes, so it need not be read.
    pub zero: bool,
}

/// Where the source's segments come from.
pub enum Source<'a> {
    /// Block status of an NBD export.
    Nbd(ExtentWalker<'a>),
    /// SEEK_DATA / SEEK_HOLE of a local file.
    File { file: &'a File, pos: u64, end: u64 },
    /// Everything is data.
    Dense { pos: u64, end: u64 },
}

impl<'a> Source<'a> {
    /// Plans `[0, size)` of an NBD export, using block status when allowed
    /// and available.
    pub fn nbd(client: &'a Client, size: u64, sparse: bool) -> Self {
        if sparse && client.info().allocation_context.is_some() {
            Source::Nbd(ExtentWalker::new(client, 0, size))
        } else {
            Source::Dense { pos: 0, end: size }
        }
    }

    /// Plans `[0, size)` of a local file.
    pub fn file(file: &'a File, size: u64, sparse: bool) -> Self {
        if sparse {
            Source::File {
                file,
                pos: 0,
                end: size,
            }
        } else {
            Source::Dense { pos: 0, end: size }
        }
    }

    /// Returns the next segment, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Segment>> {
        match self {
            Source::Nbd(w) => Ok(w.next().await?.map(|e| Segment {
                offset: e.offset,
                len: e.len,
                zero: nbd::is_zero(&e),
            })),
            Source::Dense { pos, end } => {
                if *pos >= *end {
                    return Ok(None);
                }
                let s = Segment {
                    offset: *pos,
                    len: *end - *pos,
                    zero: false,
                };
                *pos = *end;
                Ok(Some(s))
            }
            Source::File { file, pos, end } => {
                if *pos >= *end {
                    return Ok(None);
                }
                let s = match file_segment(file, *pos, *end)? {
                    Some(s) => s,
                    None => {
                        // SEEK_DATA unsupported here: the rest is data.
                        let p = *pos;
                        *self = Source::Dense { pos: p, end: *end };
                        return Box::pin(self.next()).await;
                    }
                };
                *pos = s.offset + s.len;
                Ok(Some(s))
            }
        }
    }
}

/// Returns the segment of `file` starting at `pos`: a hole up to the next
/// data, or data up to the next hole. `None` when the file system can't tell.
fn file_segment(file: &File, pos: u64, end: u64) -> Result<Option<Segment>> {
    let fd = file.as_raw_fd();
    let data = match seek(fd, pos, libc::SEEK_DATA) {
        Ok(d) => d.min(end),
        // No data at or after pos: the rest is a hole.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context("SEEK_DATA on the source")),
    };
    if data > pos {
        return Ok(Some(Segment {
            offset: pos,
            len: data - pos,
            zero: true,
        }));
    }
    let hole = match seek(fd, pos, libc::SEEK_HOLE) {
        Ok(h) => h.min(end),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
        Err(e) => return Err(anyhow::Error::new(e).context("SEEK_HOLE on the source")),
    };
    // A file that grew or shrank under us still makes progress.
    let hole = if hole > pos { hole } else { end };
    Ok(Some(Segment {
        offset: pos,
        len: hole - pos,
        zero: false,
    }))
}

fn seek(fd: i32, pos: u64, whence: i32) -> std::io::Result<u64> {
    let off =
        libc::off_t::try_from(pos).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor we own; it touches no memory.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Cuts segments into jobs: data at multiples of `block`, zeroes at
/// multiples of `zero_chunk`.
pub struct Chunker {
    block: u64,
    zero_chunk: u64,
    current: Option<Segment>,
}

impl Chunker {
    /// Returns a chunker; both sizes must be non-zero.
    pub fn new(block: u64, zero_chunk: u64) -> Self {
        Self {
            block: block.max(1),
            zero_chunk: zero_chunk.max(1),
            current: None,
        }
    }

    /// Reports whether the current segment is used up.
    pub fn is_empty(&self) -> bool {
        self.current.is_none()
    }

    /// Starts cutting `seg` (the previous one must be used up).
    pub fn push(&mut self, seg: Segment) {
        debug_assert!(self.current.is_none());
        self.current = Some(seg);
    }

    /// Returns the next job of the current segment.
    pub fn next_job(&mut self) -> Option<Segment> {
        let seg = self.current.as_mut()?;
        let unit = if seg.zero {
            self.zero_chunk
        } else {
            self.block
        };
        // Up to the next multiple of `unit`, so jobs stay aligned.
        let boundary = (seg.offset / unit + 1) * unit;
        let len = (boundary - seg.offset).min(seg.len);
        let job = Segment {
            offset: seg.offset,
            len,
            zero: seg.zero,
        };
        seg.offset += len;
        seg.len -= len;
        if seg.len == 0 {
            self.current = None;
        }
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_aligned() {
        let mut c = Chunker::new(1024, 1 << 20);
        c.push(Segment {
            offset: 1000,
            len: 3000,
            zero: false,
        });
        let jobs: Vec<_> = std::iter::from_fn(|| c.next_job()).collect();
        assert_eq!(
            jobs.iter().map(|j| (j.offset, j.len)).collect::<Vec<_>>(),
            vec![(1000, 24), (1024, 1024), (2048, 1024), (3072, 928)]
        );
        assert!(c.is_empty());
        c.push(Segment {
            offset: 0,
            len: 3 << 20,
            zero: true,
        });
        assert_eq!(std::iter::from_fn(|| c.next_job()).count(), 3);
    }

    #[tokio::test]
    async fn file_holes_are_found() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("nbdraid-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse");
        let mut f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&[1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let mut src = Source::file(&f, 64 << 20, true);
        let mut segs = Vec::new();
        while let Some(s) = src.next().await.unwrap() {
            segs.push(s);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let total: u64 = segs.iter().map(|s| s.len).sum();
        assert_eq!(total, 64 << 20);
        let data: u64 = segs.iter().filter(|s| !s.zero).map(|s| s.len).sum();
        // Some file systems report data at a coarser granularity; never less.
        assert!(data >= 1 << 20, "{segs:?}");
        assert!(data < 64 << 20, "{segs:?}");
    }
}
