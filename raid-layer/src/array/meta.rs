//! The array's metadata as the data path sees it: the write-intent bitmap
//! (set durably before a write reaches any member), the resync set, and
//! member failures recorded in the survivors' superblocks.
//!
//! PLACEHOLDER while the on-disk formats land: nothing is persisted yet.

use std::ops::Range;

use nbdraid_engine::Error as IoError;

use super::ArrayInner;

/// Held while a write is in flight; its rows stay dirty until it drops.
pub struct WriteIntent(());

/// The array's metadata.
#[derive(Default)]
pub struct ArrayMeta {}

impl ArrayMeta {
    /// Returns metadata that persists nothing (in-memory arrays, tests).
    pub fn volatile() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::default())
    }

    /// Marks member rows `rows` (member data offsets) as being written.
    pub async fn begin_write(
        &self,
        _array: &ArrayInner,
        _rows: Range<u64>,
    ) -> Result<WriteIntent, IoError> {
        Ok(WriteIntent(()))
    }

    /// Reports whether the row at member offset `row` still awaits resync.
    pub fn resync_pending(&self, _row: u64) -> bool {
        false
    }

    /// Records member `slot`'s failure in the surviving members' superblocks.
    pub async fn record_failure(&self, _array: &ArrayInner, _slot: usize, _reason: &str) {}

    /// Waits until member `slot`'s failure is durably recorded.
    pub async fn wait_failure_recorded(&self, _slot: usize) {}
}
