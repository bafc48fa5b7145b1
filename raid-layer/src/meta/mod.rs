//! The metadata an array keeps at the start of every member volume, as
//! pure, I/O-free code: the array reads and writes the bytes, these modules
//! say what the bytes mean.
//!
//! # The reserved region
//!
//! Every member begins with a reserved region; the array's data starts at
//! the member's `data_offset` ([`DEFAULT_DATA_OFFSET`], 4 MiB, unless the
//! superblock says otherwise). Inside it, at fixed offsets:
//!
//! | bytes                          | what                                   |
//! |--------------------------------|----------------------------------------|
//! | [`SB_A_OFFSET`] 0 .. 32 KiB    | superblock copy A ([`superblock`])     |
//! | [`SB_B_OFFSET`] 32 .. 64 KiB   | superblock copy B                      |
//! | [`BITMAP_OFFSET`] 64 KiB .. 1 MiB | write-intent bitmap ([`bitmap`]), at most [`BITMAP_MAX_BYTES`] |
//! | [`JOURNAL_OFFSET`] 1 MiB .. `data_offset` | RAID 5/6 partial-parity log ([`log`], [`journal_range`]) |
//!
//! The offsets are constants, not superblock fields, so that a member can
//! be recognised before anything on it is trusted; the superblock records
//! the bitmap's geometry and the data offset so that a future format can
//! move them. The bitmap's geometry ([`BitmapGeometry`], [`geometry_for`])
//! is defined here, beside the area it must fit in.
//!
//! # Invariants
//!
//! - The two superblock copies are written alternately (ping-pong): a write
//!   always goes to the slot *not* holding the newest valid copy, so a torn
//!   write leaves the previous state readable ([`superblock::slot_for_next_write`]).
//! - Every superblock update bumps `events`; a member whose copy is more
//!   than one event behind the newest is stale (md's rule, see
//!   [`assembly`]).
//! - A bitmap bit is durably set on every live member before any data
//!   write to its region is issued, and cleared only when no write to the
//!   region is pending, the region has been idle, and the array is not
//!   degraded ([`bitmap::Bitmap`]).
//! - Nothing here panics on bytes read from a member: every decoder returns
//!   a [`MetaError`] that names what is wrong.

use std::ops::{Range, RangeInclusive};

use serde::{Deserialize, Serialize};

pub mod assembly;
pub mod bitmap;
pub mod log;
pub mod superblock;

pub use assembly::{Assessment, Found, MemberReport, MemberStatus, assess};
pub use bitmap::{Bitmap, PersistPages, ResyncSet, SweepBatch, WriteGuard};
pub use superblock::{
    MemberState, RoleState, SbError, SbRead, Slot, Superblock, decode, encode, read_copies,
    slot_for_next_write,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The size of one superblock slot (32 KiB); an encoded copy never exceeds it.
pub const SB_SLOT_SIZE: u64 = 32 * KIB;

/// The member offset of superblock copy A.
pub const SB_A_OFFSET: u64 = 0;

/// The member offset of superblock copy B, right after slot A.
pub const SB_B_OFFSET: u64 = SB_A_OFFSET + SB_SLOT_SIZE;

/// The member offset of the write-intent bitmap, right after the two
/// superblock slots.
pub const BITMAP_OFFSET: u64 = SB_B_OFFSET + SB_SLOT_SIZE;

/// The most bytes the bitmap may take (960 KiB), so that it ends by 1 MiB.
pub const BITMAP_MAX_BYTES: u64 = JOURNAL_OFFSET - BITMAP_OFFSET;

/// The unit in which the bitmap is written: one page of 4 KiB, the
/// smallest write every member handles atomically in practice.
pub const BITMAP_PAGE_SIZE: u64 = 4 * KIB;

/// The start of the journal area: the RAID 5/6 partial-parity log
/// ([`log`]), which runs up to the data offset.
pub const JOURNAL_OFFSET: u64 = MIB;

/// The default start of array data on each member (4 MiB), which leaves
/// 3 MiB for the journal.
pub const DEFAULT_DATA_OFFSET: u64 = 4 * MIB;

/// The lowest data offset a superblock may record: the end of the bitmap
/// area (no journal space).
pub const MIN_DATA_OFFSET: u64 = JOURNAL_OFFSET;

/// Returns the member byte range reserved for the journal when data
/// starts at `data_offset` (empty if `data_offset` ≤ 1 MiB).
pub fn journal_range(data_offset: u64) -> Range<u64> {
    JOURNAL_OFFSET..data_offset.max(JOURNAL_OFFSET)
}

/// The smallest region an explicit geometry may use (64 KiB).
pub const MIN_REGION: u64 = 64 * 1024;

/// The smallest default region (1 MiB).
pub const DEFAULT_MIN_REGION: u64 = 1024 * 1024;

/// The most regions a default geometry has (65,536: an 8 KiB bitmap and
/// under 1 MiB of in-memory state).
pub const DEFAULT_MAX_REGIONS: u64 = 65_536;

/// The most bits the bitmap area holds.
pub const MAX_BITS: u64 = BITMAP_MAX_BYTES * 8;

/// The regions one 4 KiB page covers.
pub const BITS_PER_PAGE: u64 = BITMAP_PAGE_SIZE * 8;

/// The bitmap's place and shape, recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BitmapGeometry {
    /// The member offset of the bitmap ([`BITMAP_OFFSET`]).
    pub offset: u64,
    /// The bytes of member data one bit covers (a power of two).
    pub region: u64,
    /// The number of regions: member data size / region, rounded up.
    pub bits: u64,
}

impl BitmapGeometry {
    /// Returns the number of 4 KiB pages the bitmap occupies.
    pub fn pages(&self) -> u64 {
        self.bits.div_ceil(BITS_PER_PAGE)
    }

    /// Returns the bytes the bitmap occupies on each member (whole pages).
    pub fn bytes(&self) -> u64 {
        self.pages() * BITMAP_PAGE_SIZE
    }

    /// Returns the region holding member data byte `member_offset`.
    pub fn region_of(&self, member_offset: u64) -> u64 {
        member_offset.checked_div(self.region).unwrap_or(0)
    }

    /// Returns the regions a write of member data bytes `member_offsets`
    /// touches, `None` for an empty range.
    pub fn regions_for(&self, member_offsets: Range<u64>) -> Option<RangeInclusive<u64>> {
        if member_offsets.is_empty() {
            return None;
        }
        Some(self.region_of(member_offsets.start)..=self.region_of(member_offsets.end - 1))
    }

    /// Checks the geometry against the member data it must cover: at
    /// [`BITMAP_OFFSET`], a power-of-two region of at least [`MIN_REGION`],
    /// exactly enough bits, and no more than fit in the bitmap area.
    pub fn validate(&self, member_data_size: u64) -> Result<(), MetaError> {
        if self.offset != BITMAP_OFFSET {
            return Err(MetaError::BadBitmap(format!(
                "bitmap at member offset {}, expected {BITMAP_OFFSET}",
                self.offset
            )));
        }
        self.check_shape()?;
        let want = member_data_size.div_ceil(self.region);
        if self.bits != want {
            return Err(MetaError::BadBitmap(format!(
                "{} bits of {} bytes for {member_data_size} bytes of member data, expected {want}",
                self.bits, self.region
            )));
        }
        Ok(())
    }

    /// Checks what an in-memory bitmap depends on: the region and the
    /// number of bits.
    fn check_shape(&self) -> Result<(), MetaError> {
        check_region(self.region)?;
        if self.bits == 0 || self.bits > MAX_BITS {
            return Err(MetaError::BadBitmap(format!(
                "{} bits, expected 1..={MAX_BITS}",
                self.bits
            )));
        }
        Ok(())
    }
}

fn check_region(region: u64) -> Result<(), MetaError> {
    if !region.is_power_of_two() || region < MIN_REGION {
        return Err(MetaError::BadRegion {
            region,
            reason: format!("must be a power of two of at least {MIN_REGION} bytes"),
        });
    }
    Ok(())
}

/// Returns the bitmap geometry for members with `member_data_size` bytes
/// of data, with `region` bytes per bit or the default.
///
/// The default region is the smallest power of two of at least 1 MiB that
/// needs at most 65,536 regions: 1 MiB up to 64 GiB members (a 256 MiB
/// member has 256 regions, so a re-add after a few writes copies a small
/// fraction), 16 MiB for 1 TiB, 64 MiB (mdadm's default) for 4 TiB. The
/// bitmap is then at most 8 KiB, two pages, and its in-memory state
/// (12 bytes per region) under 1 MiB. An explicit region must be a power
/// of two of at least 64 KiB whose bits fit in the 960 KiB bitmap area.
pub fn geometry_for(
    member_data_size: u64,
    region: Option<u64>,
) -> Result<BitmapGeometry, MetaError> {
    if member_data_size == 0 {
        return Err(MetaError::BadBitmap("no member data to cover".to_owned()));
    }
    let region = match region {
        Some(region) => {
            check_region(region)?;
            let bits = member_data_size.div_ceil(region);
            if bits > MAX_BITS {
                return Err(MetaError::BitmapTooLarge {
                    bits,
                    member_data_size,
                    max: MAX_BITS,
                    min_region: member_data_size.div_ceil(MAX_BITS).next_power_of_two(),
                });
            }
            region
        }
        // ≤ 2^48 before rounding up, so next_power_of_two cannot overflow.
        None => member_data_size
            .div_ceil(DEFAULT_MAX_REGIONS)
            .next_power_of_two()
            .max(DEFAULT_MIN_REGION),
    };
    Ok(BitmapGeometry {
        offset: BITMAP_OFFSET,
        region,
        bits: member_data_size.div_ceil(region),
    })
}

/// Why member metadata cannot be encoded, decoded or used. Every variant
/// says what was found and what was expected, because these messages are
/// printed to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The superblock's JSON body does not fit in one slot.
    #[error("superblock body is {len} bytes, a slot holds at most {max}")]
    SuperblockTooLarge {
        /// The encoded body's length.
        len: usize,
        /// The most a slot holds after the header.
        max: usize,
    },
    /// The slot is shorter than the header or the body it announces.
    #[error("superblock slot is {len} bytes, the copy in it needs {need}: truncated read")]
    Truncated {
        /// The bytes given.
        len: usize,
        /// The bytes the header announces.
        need: usize,
    },
    /// The header announces a body longer than a slot can hold.
    #[error("superblock header announces a {len}-byte body, at most {max} fit: torn or corrupted")]
    BadLength {
        /// The announced length.
        len: usize,
        /// The most a slot holds after the header.
        max: usize,
    },
    /// The checksum does not match: a torn or corrupted write.
    #[error(
        "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         torn or corrupted write"
    )]
    Checksum {
        /// The crc32c in the header.
        stored: u32,
        /// The crc32c of the bytes read.
        computed: u32,
    },
    /// The copy was written by a newer nbdraid in a format this one does
    /// not understand.
    #[error(
        "superblock format {version} is newer than this nbdraid understands (up to {supported}); \
         upgrade nbdraid, the member is left untouched"
    )]
    TooNew {
        /// The version in the header.
        version: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The format version is one no nbdraid ever wrote (0).
    #[error("superblock format version {version} is not valid")]
    BadVersion {
        /// The version in the header.
        version: u32,
    },
    /// The body passed its checksum but is not the JSON this format expects.
    #[error("superblock body is not a valid format-{version} superblock: {reason}")]
    Json {
        /// The version in the header.
        version: u32,
        /// What serde_json reported.
        reason: String,
    },
    /// The superblock parses but contradicts itself.
    #[error("superblock is inconsistent: {0}")]
    Invalid(String),
    /// A bitmap region size that is not usable.
    #[error("bitmap region of {region} bytes: {reason}")]
    BadRegion {
        /// The region size asked for or read.
        region: u64,
        /// Why it is refused.
        reason: String,
    },
    /// The bitmap would need more bits than its area holds.
    #[error(
        "bitmap needs {bits} bits for {member_data_size} bytes of member data, \
         at most {max} fit in {BITMAP_MAX_BYTES} bytes; use a region of at least {min_region} bytes"
    )]
    BitmapTooLarge {
        /// The bits needed.
        bits: u64,
        /// The member data size to cover.
        member_data_size: u64,
        /// The most bits that fit.
        max: u64,
        /// The smallest power-of-two region that fits.
        min_region: u64,
    },
    /// The bitmap's geometry disagrees with what it must cover.
    #[error("bitmap geometry is inconsistent: {0}")]
    BadBitmap(String),
    /// Fewer bitmap bytes were given than the bitmap holds.
    #[error("bitmap read is {len} bytes, the bitmap has {need}")]
    BitmapTruncated {
        /// The bytes given.
        len: usize,
        /// The bytes needed (all bits, rounded up to a byte).
        need: u64,
    },
    /// A write reaches regions the bitmap does not have.
    #[error("bitmap regions {start}..={end} are past the last region ({bits} regions)")]
    RegionOutOfRange {
        /// The first region asked for.
        start: u64,
        /// The last region asked for.
        end: u64,
        /// The number of regions.
        bits: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_region_layout() {
        assert_eq!(SB_A_OFFSET, 0);
        assert_eq!(SB_B_OFFSET, 32 * KIB);
        assert_eq!(BITMAP_OFFSET, 64 * KIB);
        assert_eq!(BITMAP_OFFSET + BITMAP_MAX_BYTES, MIB);
        assert_eq!(BITMAP_MAX_BYTES, 960 * KIB);
        assert_eq!(BITMAP_MAX_BYTES % BITMAP_PAGE_SIZE, 0);
        assert_eq!(journal_range(DEFAULT_DATA_OFFSET), MIB..4 * MIB);
        assert!(journal_range(MIN_DATA_OFFSET).is_empty());
    }
}
