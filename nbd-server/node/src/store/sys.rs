//! Thin, safe wrappers over the file system calls the store uses.
//!
//! Each function retries on EINTR and completes short transfers, so callers
//! see either the whole operation or an error.

use std::io;
use std::os::fd::RawFd;

/// Result of a non-blocking read attempt.
pub enum NoWait {
    /// The whole range was read.
    Done,
    /// Only the first `n` bytes were read without blocking (possibly 0).
    Partial(usize),
    /// The file system does not support non-blocking reads.
    Unsupported,
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads all of `buf` from `offset`; bytes past end of file read as zeroes.
pub fn read_at(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let r = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match cvt(r) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Tries to read `buf` from `offset` without blocking (RWF_NOWAIT: only
/// what the page cache holds).
pub fn read_at_nowait(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<NoWait> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes a valid writable buffer.
        let r = unsafe {
            libc::preadv2(
                fd,
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match cvt(r) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(NoWait::Done);
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(NoWait::Partial(done)),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Ok(if done == 0 {
                    NoWait::Unsupported
                } else {
                    NoWait::Partial(done)
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(NoWait::Done)
}

/// Writes all of `buf` at `offset`; with `dsync` the range is durable on return.
pub fn write_at(fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes a valid readable buffer; pwritev2 does not write to it.
        let r =
            unsafe { libc::pwritev2(fd, &iov, 1, (offset + done as u64) as libc::off_t, flags) };
        match cvt(r) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the file's data durable.
pub fn datasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::fdatasync(fd) };
        match cvt(r as isize) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Calls fallocate(2) with `mode` on the range.
pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        match cvt(r as isize) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Seeks with SEEK_DATA or SEEK_HOLE; `Ok(None)` when there is no such
/// position before end of file (ENXIO).
pub fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Hints that a range will be read soon.
pub fn will_need(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe {
        libc::posix_fadvise(
            fd,
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Reports whether the file lives on a memory-backed file system (tmpfs,
/// ramfs), where I/O never waits for a device.
pub fn is_memory_backed(fd: RawFd) -> bool {
    // SAFETY: `st` is a plain C struct, fully written by fstatfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a statfs struct.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}
