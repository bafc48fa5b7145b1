//! Where each byte of an array lives: md-compatible geometry for RAID 0,
//! 1, 5, 6 and 10.
//!
//! The formulas are md's (`drivers/md/raid0.c`, `raid5.c`
//! `raid5_compute_sector`, `raid10.c` `raid10_find_phys`), so an array's
//! members hold the same bytes at the same offsets as an md array of the
//! same geometry, counted from the start of each member's data area.
//!
//! - Every striping level cuts members into *rows* of one chunk each:
//!   row r is bytes `r·chunk .. (r+1)·chunk` of every member, and only
//!   whole rows are used (`rows = member_size / chunk`). Nothing is ever
//!   placed at or beyond [`Layout::member_data_size`].
//! - RAID 0: array chunk c is on member c mod N at row c / N.
//! - RAID 1: every member holds the whole array at the array's offsets.
//! - RAID 5 and 6 (left-symmetric, md's default): row s is stripe s. Its
//!   P is on member (N − 1) − (s mod N); with RAID 6, Q is on the next
//!   member; data index i is on the i-th member after those, wrapping.
//!   Data index i of stripe s is array chunk s·k + i (k data chunks per
//!   stripe), and Q's coefficient for it is g^i: the data index, never
//!   the member number. A stripe's parity members hold none of its data.
//! - RAID 10 (md's "near" layout, `copies` = n2 by default): array chunk
//!   c occupies device slots c·copies .. c·copies + copies − 1, slot t
//!   being member t mod N at row t / N. The copies of a chunk are on
//!   distinct members because copies ≤ N; N need not be a multiple of
//!   `copies`.
//!
//! Mapping allocates nothing: [`Layout::map`] and [`Layout::stripes`]
//! return iterators, and the members holding a piece are described by a
//! small `Copy` value ([`Locations`]) that computes them on demand.

use std::fmt;
use std::ops::Range;

use crate::parity::Redundancy;

/// The most members an array may have. It keeps a RAID 6 stripe within
/// the 255 data chunks Q can tell apart (see `parity::MAX_PQ_DATA`).
pub const MAX_MEMBERS: usize = 256;

/// The smallest chunk size of a striping level, as md (one page).
pub const MIN_CHUNK: u64 = 4096;

/// The largest chunk size accepted (1 GiB), which keeps a chunk
/// addressable by `usize` on every platform.
pub const MAX_CHUNK: u64 = 1 << 30;

/// A RAID level (`raid0`, `raid1`, `raid5`, `raid6`, `raid10` in configs and on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Striping without redundancy.
    Raid0,
    /// N-way mirroring.
    Raid1,
    /// Striping with one rotating parity chunk (P).
    Raid5,
    /// Striping with two rotating parity chunks (P and Q).
    Raid6,
    /// Striping over `copies`-way mirrors, md's near layout.
    Raid10,
}

impl Level {
    /// Returns the fewest members the level accepts (RAID 10: see
    /// [`Geometry::validate`], which also needs members ≥ copies).
    pub const fn min_members(self) -> usize {
        match self {
            Level::Raid0 | Level::Raid1 | Level::Raid10 => 2,
            Level::Raid5 => 3,
            Level::Raid6 => 4,
        }
    }

    /// Returns whether the level cuts members into chunks (all but RAID 1).
    pub const fn is_striped(self) -> bool {
        !matches!(self, Level::Raid1)
    }

    /// Returns the parity of the level's stripes, `None` for levels
    /// without parity.
    pub const fn redundancy(self) -> Option<Redundancy> {
        match self {
            Level::Raid5 => Some(Redundancy::P),
            Level::Raid6 => Some(Redundancy::PQ),
            _ => None,
        }
    }

    /// Returns the number of parity chunks per stripe (0, 1 or 2).
    pub const fn parity_chunks(self) -> usize {
        match self.redundancy() {
            Some(r) => r.parity_chunks(),
            None => 0,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Raid5 => "raid5",
            Level::Raid6 => "raid6",
            Level::Raid10 => "raid10",
        })
    }
}

/// Why a geometry is refused, or a request cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Fewer members than the level needs.
    #[error("{level} needs at least {min} members, got {members}")]
    TooFewMembers {
        /// The level.
        level: Level,
        /// The members given.
        members: usize,
        /// The minimum for the level (and copies).
        min: usize,
    },
    /// More members than [`MAX_MEMBERS`].
    #[error("{members} members, at most {MAX_MEMBERS} are supported")]
    TooManyMembers {
        /// The members given.
        members: usize,
    },
    /// The chunk size is not a power of two in [`MIN_CHUNK`]..=[`MAX_CHUNK`].
    #[error("chunk size {chunk} must be a power of two from {MIN_CHUNK} to {MAX_CHUNK} bytes")]
    BadChunk {
        /// The chunk size given.
        chunk: u64,
    },
    /// RAID 10 with fewer than 2 copies.
    #[error("raid10 needs at least 2 copies, got {copies}")]
    TooFewCopies {
        /// The copies given.
        copies: usize,
    },
    /// The members are too small to hold one row (one byte for RAID 1).
    #[error("member data size {member_size} is below the {min} bytes of one row")]
    MembersTooSmall {
        /// The member data size given.
        member_size: u64,
        /// The least that holds one row.
        min: u64,
    },
    /// The array would be larger than 2^64 bytes.
    #[error("the array would exceed 2^64 bytes")]
    TooLarge,
    /// A request reaches past the end of the array.
    #[error("request at {offset} for {len} bytes reaches past the array's {size} bytes")]
    OutOfRange {
        /// The request's array offset.
        offset: u64,
        /// The request's length.
        len: u64,
        /// The array's size.
        size: u64,
    },
    /// Stripes were asked of a level without parity.
    #[error("{level} has no parity stripes")]
    NoParity {
        /// The level.
        level: Level,
    },
}

/// What an array is made of: the input of [`Layout::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// The RAID level.
    pub level: Level,
    /// The number of members, N.
    pub members: usize,
    /// The chunk size in bytes (ignored by RAID 1).
    pub chunk: u64,
    /// The bytes of each member available for data (after any metadata).
    pub member_size: u64,
    /// The copies of each chunk, for RAID 10 only (md's n2 is 2).
    pub copies: usize,
}

impl Geometry {
    /// The default copies of RAID 10, md's `n2`.
    pub const DEFAULT_COPIES: usize = 2;

    /// Returns a geometry with [`Geometry::DEFAULT_COPIES`] copies.
    pub const fn new(level: Level, members: usize, chunk: u64, member_size: u64) -> Self {
        Geometry {
            level,
            members,
            chunk,
            member_size,
            copies: Self::DEFAULT_COPIES,
        }
    }

    /// Returns the same geometry with `copies` copies (RAID 10).
    pub const fn with_copies(self, copies: usize) -> Self {
        Geometry { copies, ..self }
    }

    /// Checks the geometry: enough members for the level (RAID 0 and 1:
    /// 2, RAID 5: 3, RAID 6: 4, RAID 10: at least `copies` ≥ 2) and at
    /// most [`MAX_MEMBERS`], a power-of-two chunk of at least 4 KiB for
    /// striping levels, members that hold at least one row, and an array
    /// size that fits in a `u64`.
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.sizes().map(|_| ())
    }

    /// Validates and returns (rows, array size).
    fn sizes(&self) -> Result<(u64, u64), LayoutError> {
        let level = self.level;
        let n = self.members;
        if level == Level::Raid10 && self.copies < 2 {
            return Err(LayoutError::TooFewCopies {
                copies: self.copies,
            });
        }
        let min = match level {
            Level::Raid10 => self.copies,
            _ => level.min_members(),
        };
        if n < min {
            return Err(LayoutError::TooFewMembers {
                level,
                members: n,
                min,
            });
        }
        if n > MAX_MEMBERS {
            return Err(LayoutError::TooManyMembers { members: n });
        }
        if level == Level::Raid1 {
            if self.member_size == 0 {
                return Err(LayoutError::MembersTooSmall {
                    member_size: 0,
                    min: 1,
                });
            }
            return Ok((0, self.member_size));
        }
        let chunk = self.chunk;
        if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(LayoutError::BadChunk { chunk });
        }
        let rows = self.member_size / chunk;
        if rows == 0 {
            return Err(LayoutError::MembersTooSmall {
                member_size: self.member_size,
                min: chunk,
            });
        }
        // n ≤ MAX_MEMBERS, so these conversions are exact.
        let n64 = n as u64;
        let slots = rows.checked_mul(n64).ok_or(LayoutError::TooLarge)?;
        let chunks = match level {
            Level::Raid0 => slots,
            Level::Raid5 | Level::Raid6 => rows * (n64 - level.parity_chunks() as u64),
            Level::Raid10 => slots / self.copies as u64,
            Level::Raid1 => 0, // returned above
        };
        let size = chunks.checked_mul(chunk).ok_or(LayoutError::TooLarge)?;
        Ok((rows, size))
    }
}

/// A validated geometry, which maps array bytes to member bytes.
///
/// It is small and `Copy`; the iterators it returns hold their own copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    geometry: Geometry,
    rows: u64,
    size: u64,
}

/// One member byte range: `offset` into the member's data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// The member's number, 0..N.
    pub member: usize,
    /// The offset in the member's data area.
    pub offset: u64,
}

/// The logical unit a [`Piece`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Array chunk number `c` (RAID 0 and 10).
    Chunk(u64),
    /// Data index `index` of stripe `stripe` (RAID 5 and 6).
    Data {
        /// The stripe (row) number.
        stripe: u64,
        /// The data index within the stripe.
        index: usize,
    },
    /// The whole mirrored array (RAID 1, which has no chunks).
    Mirror,
}

/// The part of a request that lies inside one chunk, and where it is
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Piece {
    /// The chunk (or stripe data chunk) this part lies in.
    pub unit: Unit,
    /// The offset of the part inside its unit (RAID 1: the array offset).
    pub in_chunk: u64,
    /// The part's length in bytes (never 0).
    pub len: u64,
    /// The part's offset from the start of the request.
    pub buf_offset: u64,
    /// Where the part's bytes are stored: one location for RAID 0/5/6,
    /// N for RAID 1, `copies` for RAID 10. Each location holds all
    /// `len` bytes contiguously.
    pub locations: Locations,
}

impl Piece {
    /// Returns the part's range in the request buffer.
    ///
    /// Meant for requests that came with a buffer, whose offsets fit in
    /// `usize` by construction.
    pub fn buf_range(&self) -> Range<usize> {
        self.buf_offset as usize..(self.buf_offset + self.len) as usize
    }
}

/// The member locations holding one piece, computed on demand.
///
/// They are consecutive *device slots* t = first .. first + count, slot
/// t being member t mod N at offset (t / N)·chunk + in_chunk: this one
/// rule describes a RAID 0 chunk, a RAID 5/6 data chunk, RAID 10's
/// copies and (with a zero chunk) RAID 1's mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Locations {
    first: u64,
    count: usize,
    members: usize,
    chunk: u64,
    in_chunk: u64,
}

impl Locations {
    fn get_unchecked(&self, j: usize) -> Location {
        let slot = self.first + j as u64;
        let n = self.members as u64;
        Location {
            member: (slot % n) as usize,
            offset: (slot / n) * self.chunk + self.in_chunk,
        }
    }

    /// Returns how many locations there are (at least 1).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Returns false: a piece is always stored somewhere.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Returns the `j`-th location, `None` past the last.
    pub fn get(&self, j: usize) -> Option<Location> {
        (j < self.count).then(|| self.get_unchecked(j))
    }

    /// Returns the first location (the only one for RAID 0/5/6).
    pub fn first(&self) -> Location {
        self.get_unchecked(0)
    }

    /// Returns an iterator over the locations, in member-slot order.
    pub fn iter(&self) -> LocationIter {
        LocationIter {
            locations: *self,
            next: 0,
        }
    }
}

impl IntoIterator for Locations {
    type Item = Location;
    type IntoIter = LocationIter;

    fn into_iter(self) -> LocationIter {
        self.iter()
    }
}

/// Iterator over [`Locations`].
#[derive(Debug, Clone)]
pub struct LocationIter {
    locations: Locations,
    next: usize,
}

impl Iterator for LocationIter {
    type Item = Location;

    fn next(&mut self) -> Option<Location> {
        let location = self.locations.get(self.next)?;
        self.next += 1;
        Some(location)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.locations.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for LocationIter {}

/// What a member holds in one RAID 5/6 stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The data chunk with this data index.
    Data(usize),
    /// The P parity chunk.
    P,
    /// The Q parity chunk.
    Q,
}

/// One RAID 5/6 stripe (row): which member holds what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stripe {
    number: u64,
    members: usize,
    parity: usize,
    p: usize,
    chunk: u64,
}

impl Stripe {
    /// Returns the stripe number (its row).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Returns k, the number of data chunks per stripe.
    pub fn data_chunks(&self) -> usize {
        self.members - self.parity
    }

    /// Returns the member holding P: (N − 1) − (s mod N).
    pub fn p_member(&self) -> usize {
        self.p
    }

    /// Returns the member holding Q (RAID 6: the one after P), `None` for
    /// RAID 5.
    pub fn q_member(&self) -> Option<usize> {
        (self.parity == 2).then_some((self.p + 1) % self.members)
    }

    /// Returns the member holding data index `i`, `None` if `i` ≥ k.
    pub fn data_member(&self, i: usize) -> Option<usize> {
        (i < self.data_chunks()).then_some((self.p + self.parity + i) % self.members)
    }

    /// Returns what `member` holds in this stripe, `None` if there is no
    /// such member.
    pub fn role_of(&self, member: usize) -> Option<Role> {
        if member >= self.members {
            return None;
        }
        let after_p = (member + self.members - self.p) % self.members;
        Some(match after_p {
            0 => Role::P,
            1 if self.parity == 2 => Role::Q,
            d => Role::Data(d - self.parity),
        })
    }

    /// Returns the chunk index of `member`'s chunk in the order
    /// `parity::reconstruct` takes, `[D_0, …, D_{k-1}, P, Q]`.
    pub fn chunk_index_of(&self, member: usize) -> Option<usize> {
        let k = self.data_chunks();
        Some(match self.role_of(member)? {
            Role::Data(i) => i,
            Role::P => k,
            Role::Q => k + 1,
        })
    }

    /// Returns the members in chunk-index order `[D_0, …, D_{k-1}, P,
    /// (Q)]`, ready to be read into `parity::reconstruct`'s buffers.
    pub fn members(&self) -> impl ExactSizeIterator<Item = usize> + use<> {
        let (n, p, parity) = (self.members, self.p, self.parity);
        let k = n - parity;
        (0..n).map(move |c| match c {
            c if c < k => (p + parity + c) % n,
            c if c == k => p,
            _ => (p + 1) % n,
        })
    }

    /// Returns the member offset of byte `in_chunk` of any chunk of this
    /// stripe: number·chunk + in_chunk.
    pub fn member_offset(&self, in_chunk: u64) -> u64 {
        self.number * self.chunk + in_chunk
    }
}

/// The part of a RAID 5/6 write inside one stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StripeSpan {
    /// The stripe.
    pub stripe: Stripe,
    /// The offset of the part inside the stripe's data (data index i
    /// holds stripe data bytes i·chunk .. (i+1)·chunk).
    pub start: u64,
    /// The part's length (never 0).
    pub len: u64,
    /// The part's offset from the start of the request.
    pub buf_offset: u64,
}

/// The part of a [`StripeSpan`] inside one data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSpan {
    /// The data index.
    pub index: usize,
    /// The member holding it.
    pub member: usize,
    /// The offset inside the chunk.
    pub in_chunk: u64,
    /// The length in bytes (never 0).
    pub len: u64,
    /// The offset from the start of the request.
    pub buf_offset: u64,
    /// The offset in the member's data area (= stripe offset + in_chunk).
    pub member_offset: u64,
}

/// Where one changed chunk's bytes fall inside a range of parity
/// ([`StripeSpan::overlaps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Overlap {
    /// The chunk's data index.
    pub index: usize,
    /// The member holding it.
    pub member: usize,
    /// The offset of the bytes from the start of the range.
    pub at: usize,
    /// Their offset in the part's data (the request's bytes of this stripe).
    pub data: usize,
    /// How many bytes.
    pub len: usize,
    /// Their offset in the member's data area.
    pub member_offset: u64,
}

impl StripeSpan {
    /// Returns whether the part covers all the stripe's data, so parity
    /// can be computed from the new data alone.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.len == self.stripe.data_chunks() as u64 * self.stripe.chunk
    }

    /// Returns the data indices the part touches.
    pub fn touched(&self) -> Range<usize> {
        let chunk = self.stripe.chunk;
        let first = (self.start / chunk) as usize;
        let last = ((self.start + self.len - 1) / chunk) as usize;
        first..last + 1
    }

    /// Returns the parts inside each touched data chunk, in order.
    pub fn chunks(&self) -> impl ExactSizeIterator<Item = ChunkSpan> + use<> {
        let span = *self;
        let chunk = span.stripe.chunk;
        span.touched().map(move |index| {
            let begin = (index as u64 * chunk).max(span.start);
            let end = ((index as u64 + 1) * chunk).min(span.start + span.len);
            let in_chunk = begin - index as u64 * chunk;
            ChunkSpan {
                index,
                // `touched` yields only indices below k.
                member: (span.stripe.p + span.stripe.parity + index) % span.stripe.members,
                in_chunk,
                len: end - begin,
                buf_offset: span.buf_offset + (begin - span.start),
                member_offset: span.stripe.member_offset(in_chunk),
            }
        })
    }

    /// Returns, for each chunk the part changes inside the in-chunk byte
    /// range `range` (of parity), where its changed bytes there are.
    pub fn overlaps(&self, range: Range<u64>) -> impl Iterator<Item = Overlap> + use<> {
        let first = self.buf_offset;
        self.chunks().filter_map(move |c| {
            let lo = c.in_chunk.max(range.start);
            let hi = (c.in_chunk + c.len).min(range.end);
            (lo < hi).then(|| Overlap {
                index: c.index,
                member: c.member,
                at: (lo - range.start) as usize,
                data: (c.buf_offset - first + (lo - c.in_chunk)) as usize,
                len: (hi - lo) as usize,
                member_offset: c.member_offset + (lo - c.in_chunk),
            })
        })
    }

    /// Returns the in-chunk byte ranges of P (and Q) that the part
    /// changes: the union of the touched in-chunk ranges, as one or two
    /// sorted, disjoint ranges (two when the part crosses one chunk
    /// boundary and its ends do not overlap in chunk offsets).
    pub fn parity_ranges(&self) -> impl Iterator<Item = Range<u64>> + use<> {
        let chunk = self.stripe.chunk;
        let touched = self.touched();
        let head = self.start % chunk;
        let tail_end = (self.start + self.len - 1) % chunk + 1;
        let (a, b) = match touched.len() {
            1 => (head..tail_end, None),
            2 if tail_end < head => (0..tail_end, Some(head..chunk)),
            _ => (0..chunk, None),
        };
        std::iter::once(a).chain(b)
    }
}

impl Layout {
    /// Validates `geometry` and returns its layout.
    pub fn new(geometry: Geometry) -> Result<Self, LayoutError> {
        let (rows, size) = geometry.sizes()?;
        Ok(Layout {
            geometry,
            rows,
            size,
        })
    }

    /// Returns the geometry the layout was built from.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Returns the level.
    pub fn level(&self) -> Level {
        self.geometry.level
    }

    /// Returns the number of members, N.
    pub fn members(&self) -> usize {
        self.geometry.members
    }

    /// Returns the chunk size (meaningless for RAID 1).
    pub fn chunk(&self) -> u64 {
        self.geometry.chunk
    }

    /// Returns the array's size in bytes: RAID 0: N·rows·chunk; RAID 1:
    /// the member size; RAID 5: (N − 1)·rows·chunk; RAID 6:
    /// (N − 2)·rows·chunk; RAID 10: ⌊N·rows / copies⌋·chunk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Returns the number of rows (stripes for RAID 5/6); 0 for RAID 1.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Returns how many bytes of each member are used: whole rows, or
    /// the member size for RAID 1. Nothing is placed beyond.
    pub fn member_data_size(&self) -> u64 {
        match self.geometry.level {
            Level::Raid1 => self.geometry.member_size,
            _ => self.rows * self.geometry.chunk,
        }
    }

    /// Returns the number of data chunks per stripe, k (RAID 5: N − 1,
    /// RAID 6: N − 2), `None` for levels without parity.
    pub fn data_chunks_per_stripe(&self) -> Option<usize> {
        self.geometry.level.redundancy()?;
        Some(self.geometry.members - self.geometry.level.parity_chunks())
    }

    /// Returns the data bytes per stripe, k·chunk, for RAID 5/6 (RAID 0:
    /// a row, N·chunk); `None` for RAID 1 and 10, whose rows do not hold
    /// a whole number of chunks.
    pub fn stripe_data_bytes(&self) -> Option<u64> {
        let data = match self.geometry.level {
            Level::Raid0 => self.geometry.members,
            Level::Raid5 | Level::Raid6 => self.geometry.members - self.level().parity_chunks(),
            Level::Raid1 | Level::Raid10 => return None,
        };
        Some(data as u64 * self.geometry.chunk)
    }

    /// Returns the stripe (row) holding array byte `offset`, under the
    /// same conditions as [`Layout::stripe_data_bytes`].
    pub fn row_of(&self, offset: u64) -> Option<u64> {
        Some(offset / self.stripe_data_bytes()?)
    }

    /// Returns stripe `number` of a RAID 5/6 array; `None` for other
    /// levels and past the last stripe.
    pub fn stripe(&self, number: u64) -> Option<Stripe> {
        let parity = self.geometry.level.parity_chunks();
        if parity == 0 || number >= self.rows {
            return None;
        }
        let n = self.geometry.members;
        Some(Stripe {
            number,
            members: n,
            parity,
            p: (n - 1) - (number % n as u64) as usize,
            chunk: self.geometry.chunk,
        })
    }

    /// Checks that `offset .. offset + len` lies inside the array.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), LayoutError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(LayoutError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Splits the request `offset .. offset + len` into pieces, one per
    /// chunk it touches (RAID 1: one piece), in request order, each with
    /// the locations holding it. This is how reads of every level and
    /// writes of RAID 0, 1 and 10 find their member I/O; an empty request
    /// has no pieces.
    pub fn map(&self, offset: u64, len: u64) -> Result<Pieces, LayoutError> {
        self.check_range(offset, len)?;
        Ok(Pieces {
            layout: *self,
            offset,
            end: offset + len,
            start: offset,
        })
    }

    /// Splits a RAID 5/6 request at stripe boundaries, in request order:
    /// what a write needs to update each stripe's parity.
    pub fn stripes(&self, offset: u64, len: u64) -> Result<StripeSpans, LayoutError> {
        let level = self.geometry.level;
        let Some(stripe_bytes) = self
            .stripe_data_bytes()
            .filter(|_| level.parity_chunks() > 0)
        else {
            return Err(LayoutError::NoParity { level });
        };
        self.check_range(offset, len)?;
        Ok(StripeSpans {
            layout: *self,
            stripe_bytes,
            offset,
            end: offset + len,
            start: offset,
        })
    }

    /// Returns the piece of the request (started at `start`) beginning at
    /// array offset `offset` and ending at or before `end`.
    fn piece(&self, start: u64, offset: u64, end: u64) -> Piece {
        let g = &self.geometry;
        let n = g.members as u64;
        let buf_offset = offset - start;
        if g.level == Level::Raid1 {
            return Piece {
                unit: Unit::Mirror,
                in_chunk: offset,
                len: end - offset,
                buf_offset,
                locations: Locations {
                    first: 0,
                    count: g.members,
                    members: g.members,
                    chunk: 0,
                    in_chunk: offset,
                },
            };
        }
        let c = offset / g.chunk;
        let in_chunk = offset % g.chunk;
        let len = (g.chunk - in_chunk).min(end - offset);
        let (unit, first, count) = match g.level {
            Level::Raid10 => (Unit::Chunk(c), c * g.copies as u64, g.copies),
            Level::Raid5 | Level::Raid6 => {
                let parity = g.level.parity_chunks();
                let k = n - parity as u64;
                let (stripe, index) = (c / k, (c % k) as usize);
                let p = (n - 1) - stripe % n;
                let member = (p + parity as u64 + index as u64) % n;
                (Unit::Data { stripe, index }, stripe * n + member, 1)
            }
            Level::Raid0 | Level::Raid1 => (Unit::Chunk(c), c, 1),
        };
        Piece {
            unit,
            in_chunk,
            len,
            buf_offset,
            locations: Locations {
                first,
                count,
                members: g.members,
                chunk: g.chunk,
                in_chunk,
            },
        }
    }
}

/// The pieces of a request, from [`Layout::map`].
#[derive(Debug, Clone)]
pub struct Pieces {
    layout: Layout,
    start: u64,
    offset: u64,
    end: u64,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.offset >= self.end {
            return None;
        }
        let piece = self.layout.piece(self.start, self.offset, self.end);
        self.offset += piece.len;
        Some(piece)
    }
}

/// The stripe spans of a request, from [`Layout::stripes`].
#[derive(Debug, Clone)]
pub struct StripeSpans {
    layout: Layout,
    stripe_bytes: u64,
    start: u64,
    offset: u64,
    end: u64,
}

impl Iterator for StripeSpans {
    type Item = StripeSpan;

    fn next(&mut self) -> Option<StripeSpan> {
        if self.offset >= self.end {
            return None;
        }
        let number = self.offset / self.stripe_bytes;
        let start = self.offset % self.stripe_bytes;
        let len = (self.stripe_bytes - start).min(self.end - self.offset);
        let stripe = self.layout.stripe(number)?;
        let span = StripeSpan {
            stripe,
            start,
            len,
            buf_offset: self.offset - self.start,
        };
        self.offset += len;
        Some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 4096;

    #[test]
    fn validation_names_the_problem() {
        let ok = Geometry::new(Level::Raid5, 3, K, 10 * K);
        assert_eq!(ok.validate(), Ok(()));
        let few = Geometry { members: 2, ..ok };
        assert!(matches!(
            few.validate(),
            Err(LayoutError::TooFewMembers { min: 3, .. })
        ));
        let chunk = Geometry { chunk: 3 * K, ..ok };
        assert_eq!(
            chunk.validate(),
            Err(LayoutError::BadChunk { chunk: 3 * K })
        );
        let small = Geometry {
            member_size: K - 1,
            ..ok
        };
        assert!(matches!(
            small.validate(),
            Err(LayoutError::MembersTooSmall { .. })
        ));
        let r10 = Geometry::new(Level::Raid10, 3, K, K).with_copies(4);
        assert!(matches!(
            r10.validate(),
            Err(LayoutError::TooFewMembers { min: 4, .. })
        ));
        let r10 = Geometry::new(Level::Raid10, 3, K, K).with_copies(1);
        assert_eq!(r10.validate(), Err(LayoutError::TooFewCopies { copies: 1 }));
        let huge = Geometry::new(Level::Raid0, 256, MAX_CHUNK, u64::MAX);
        assert_eq!(huge.validate(), Err(LayoutError::TooLarge));
        let r1 = Geometry::new(Level::Raid1, 2, 0, 12345);
        assert_eq!(Layout::new(r1).unwrap().size(), 12345);
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        let layout = Layout::new(Geometry::new(Level::Raid0, 2, K, 2 * K)).unwrap();
        assert_eq!(layout.size(), 4 * K);
        assert!(layout.map(4 * K, 0).is_ok());
        assert!(layout.map(4 * K - 1, 2).is_err());
        assert!(layout.map(u64::MAX, 2).is_err());
        assert_eq!(
            layout.stripes(0, 1).err(),
            Some(LayoutError::NoParity {
                level: Level::Raid0
            })
        );
    }

    #[test]
    fn parity_ranges_are_the_union_of_touched_ranges() {
        let layout = Layout::new(Geometry::new(Level::Raid5, 3, K, 4 * K)).unwrap();
        let ranges = |off, len| {
            let span = layout.stripes(off, len).unwrap().next().unwrap();
            span.parity_ranges().collect::<Vec<_>>()
        };
        assert_eq!(ranges(100, 50), vec![100..150]);
        assert_eq!(ranges(K - 10, 20), vec![0..10, K - 10..K]);
        assert_eq!(ranges(10, K), vec![0..K]);
        assert_eq!(ranges(K - 10, K + 20), vec![0..K]);
    }
}
