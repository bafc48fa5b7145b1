//! A memory-backed block device, for in-process tests of the engine and of
//! layers built on it (an array whose members are engines serving these).
//!
//! Storage is sparse: 64 KiB pages allocated on first write, so a
//! multi-gigabyte device costs only what is written. Unallocated pages
//! read as zeroes and are reported as holes by BLOCK_STATUS; TRIM and
//! WRITE_ZEROES free whole pages (or zero partial ones), and NO_HOLE keeps
//! them allocated. Everything completes on the first poll.

use std::collections::BTreeMap;
use std::sync::RwLock;

use nbdraid_proto::consts::allocation;

use crate::buffer::IoBuf;
use crate::cost::SharedCostModel;
use crate::device::{
    BlockDevice, BlockSizes, DeviceInfo, Extent, IoContext, IoFuture, OpKind, ZeroFlags,
};

/// Size of one allocation page.
pub const PAGE: u64 = 64 << 10;

/// A sparse in-memory device.
pub struct MemDevice {
    info: DeviceInfo,
    model: SharedCostModel,
    pages: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    /// Returns a device of `size` bytes reading as zeroes, charging requests
    /// by `model`.
    pub fn new(size: u64, model: SharedCostModel) -> Self {
        Self {
            info: DeviceInfo {
                size,
                read_only: false,
                block_sizes: BlockSizes::default(),
                multi_conn: true,
                can_trim: true,
                can_zero: true,
                can_fast_zero: true,
                can_cache: true,
                rotational: false,
                description: "memory".into(),
            },
            model,
            pages: RwLock::new(BTreeMap::new()),
        }
    }

    /// Returns the device with `info` changed by `f` (read-only, block sizes...).
    pub fn with_info(mut self, f: impl FnOnce(&mut DeviceInfo)) -> Self {
        f(&mut self.info);
        self
    }

    /// Returns the number of bytes in allocated pages.
    pub fn allocated(&self) -> u64 {
        self.read_pages().len() as u64 * PAGE
    }

    fn read_pages(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.pages.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pages(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.pages.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f(page index, offset in page, offset in the range, length)`
    /// for each page piece of `[offset, offset+len)`.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (page, at) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE - at as u64).min(len - done) as usize;
            f(page, at, done as usize, n);
            done += n as u64;
        }
    }

    /// Copies `data` in at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let mut pages = self.write_pages();
        Self::pieces(offset, data.len() as u64, |page, at, from, n| {
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[at..at + n].copy_from_slice(&data[from..from + n]);
        });
    }

    /// Copies `[offset, offset+out.len())` out.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        let pages = self.read_pages();
        Self::pieces(offset, out.len() as u64, |page, at, to, n| {
            match pages.get(&page) {
                Some(p) => out[to..to + n].copy_from_slice(&p[at..at + n]),
                None => out[to..to + n].fill(0),
            }
        });
    }

    fn zero(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut pages = self.write_pages();
        Self::pieces(offset, len, |page, at, _, n| {
            if n as u64 == PAGE && !keep_allocated {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[at..at + n].fill(0);
            } else if keep_allocated {
                pages.insert(page, vec![0u8; PAGE as usize].into_boxed_slice());
            }
        });
    }
}

fn ready<T: Send + 'static>(v: T) -> IoFuture<T> {
    Box::pin(std::future::ready(Ok(v)))
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn read(&self, _ctx: IoContext, offset: u64, mut buf: IoBuf) -> IoFuture<IoBuf> {
        self.read_at(offset, &mut buf);
        ready(buf)
    }

    fn write(&self, _ctx: IoContext, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<()> {
        self.write_at(offset, &buf);
        ready(())
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<()> {
        ready(())
    }

    fn trim(&self, _ctx: IoContext, offset: u64, len: u64, _fua: bool) -> IoFuture<()> {
        self.zero(offset, len, false);
        ready(())
    }

    fn write_zeroes(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> IoFuture<()> {
        self.zero(offset, len, flags.no_hole);
        ready(())
    }

    fn cache(&self, _ctx: IoContext, _offset: u64, _len: u64) -> IoFuture<()> {
        ready(())
    }

    fn block_status(
        &self,
        _ctx: IoContext,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> IoFuture<Vec<Extent>> {
        let pages = self.read_pages();
        let mut out: Vec<Extent> = Vec::new();
        Self::pieces(offset, len, |page, _, _, n| {
            let flags = if pages.contains_key(&page) {
                0
            } else {
                allocation::HOLE | allocation::ZERO
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    flags,
                }),
            }
        });
        out.truncate(max_extents.max(1));
        ready(out)
    }

    fn cost(&self, op: OpKind, len: u64) -> u64 {
        self.model.cost(op, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostModel;

    fn dev(size: u64) -> MemDevice {
        MemDevice::new(size, SharedCostModel::new(CostModel::buffers("mem")))
    }

    #[test]
    fn sparse_writes_read_back_and_holes_are_reported() {
        let d = dev(1 << 30);
        d.write_at(PAGE - 3, &[1, 2, 3, 4, 5, 6]);
        let mut out = [9u8; 8];
        d.read_at(PAGE - 4, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 0]);
        assert_eq!(d.allocated(), 2 * PAGE);
        d.zero(0, 3 * PAGE, false);
        assert_eq!(d.allocated(), 0);
        d.zero(0, 10, true);
        assert_eq!(d.allocated(), PAGE);
    }

    #[tokio::test]
    async fn block_status_merges_extents() {
        let d = dev(16 * PAGE);
        d.write_at(2 * PAGE, &[1]);
        let ext = d
            .block_status(IoContext::default(), 0, 4 * PAGE, 16)
            .await
            .unwrap();
        let hole = allocation::HOLE | allocation::ZERO;
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 2 * PAGE,
                    flags: hole
                },
                Extent {
                    len: PAGE,
                    flags: 0
                },
                Extent {
                    len: PAGE,
                    flags: hole
                }
            ]
        );
    }
}
