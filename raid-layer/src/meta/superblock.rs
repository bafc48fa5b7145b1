//! The superblock: what an array is and who its members are, kept on every
//! member in two copies so that a torn write never loses it.
//!
//! # Framing of one copy
//!
//! ```text
//! 0        8          12         16        20
//! | magic  | version  | body len | crc32c  | JSON body ... | zeroes to 4 KiB multiple |
//!   8 bytes  u32 LE     u32 LE     u32 LE
//! ```
//!
//! The crc32c covers the version, the length and the body. The body is
//! JSON (serde), so that the format stays readable with `dd | jq` and can
//! grow fields; any change to it bumps [`SB_VERSION`], and a reader refuses
//! bodies newer than it understands instead of rewriting them without the
//! fields it does not know (hence `deny_unknown_fields`). A copy is padded
//! to a multiple of 4 KiB and never exceeds its 32 KiB slot.
//!
//! [`decode`] tells three things apart: a slot that is not ours at all
//! (`Ok(None)`: zeroes, another program's data), a copy of ours that is
//! damaged or unreadable (`Err`, naming the problem: torn write, bad JSON,
//! a format too new), and a valid copy.
//!
//! # Two copies, ping-pong
//!
//! Copy A lives at [`SB_A_OFFSET`](super::SB_A_OFFSET) and copy B at
//! [`SB_B_OFFSET`](super::SB_B_OFFSET). Every update bumps `events` and is
//! written to the slot that does *not* hold the newest valid copy
//! ([`slot_for_next_write`]); [`read_copies`] takes the valid copy with the
//! most events. A crash in the middle of a write therefore leaves either
//! the new copy or the previous one, never nothing. When an array is
//! created on a volume that may hold an older superblock, the creator
//! writes copy A and zeroes copy B, so that no older copy with more events
//! can win.
//!
//! # Assembly
//!
//! Comparing the superblocks of all configured members, and picking the
//! authoritative one, is [`assess`](super::assess)'s job (`assembly.rs`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::{
    BITMAP_OFFSET, BITMAP_PAGE_SIZE, BitmapGeometry, MIN_DATA_OFFSET, MetaError, SB_SLOT_SIZE,
};
use crate::layout::{Geometry, Level};

/// The error of superblock encoding and decoding (the module's
/// [`MetaError`]).
pub type SbError = MetaError;

/// The first 8 bytes of every superblock copy.
pub const SB_MAGIC: [u8; 8] = *b"NBDRAIDS";

/// The newest superblock format this build writes and reads.
pub const SB_VERSION: u32 = 1;

/// The bytes before the JSON body: magic, version, length and crc32c.
pub const SB_HEADER_LEN: usize = 20;

/// Encoded copies are padded to a multiple of this (one page).
pub const SB_ALIGN: usize = BITMAP_PAGE_SIZE as usize;

const SLOT: usize = SB_SLOT_SIZE as usize;

/// The largest JSON body a slot holds.
pub const SB_MAX_BODY: usize = SLOT - SB_HEADER_LEN;

/// One of the two superblock slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Copy A, at member offset 0.
    A,
    /// Copy B, at member offset 32 KiB.
    B,
}

impl Slot {
    /// Returns the member offset of the slot.
    pub const fn offset(self) -> u64 {
        match self {
            Slot::A => super::SB_A_OFFSET,
            Slot::B => super::SB_B_OFFSET,
        }
    }

    /// Returns the other slot.
    pub const fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// The state of one role (slot) of the array, as the array sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum MemberState {
    /// In sync: serves reads and takes every write.
    Active,
    /// Failed when `events` reached `at_event`: it has missed writes since.
    Faulty {
        /// The `events` value of the update that recorded the failure.
        at_event: u64,
    },
    /// Being rebuilt: member data below `done` is in sync and takes every
    /// write; data above is not and must not be read.
    Recovering {
        /// Bytes of member data rebuilt so far, from offset 0.
        done: u64,
    },
    /// Assigned to the slot but holding none of the array's data yet (a
    /// replacement whose rebuild has not started).
    Spare,
}

/// The record of one role of the array: who holds it and in what state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RoleState {
    /// The uuid of the member volume in this slot (its own superblock's
    /// `member_uuid`).
    pub member_uuid: Uuid,
    /// Where the member was reached, for operators only: assembly goes by
    /// uuid and configured position, never by this.
    pub uri: String,
    /// The state of the slot.
    pub state: MemberState,
    /// I/O errors counted against the member (informational).
    #[serde(default)]
    pub errors: u64,
}

/// The superblock of one member: the array's identity and geometry, this
/// member's role, and the state of every role.
///
/// All members hold the same superblock except for `member_uuid` and
/// `role`; see [`Superblock::for_role`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Superblock {
    /// The body's format version, equal to the header's.
    pub version: u32,
    /// The array's identity, shared by all its members.
    pub array_uuid: Uuid,
    /// The array's name, for operators.
    pub array_name: String,
    /// The RAID level, `"raid0"` .. `"raid10"` in the JSON.
    #[serde(with = "level_name")]
    pub level: Level,
    /// The layout: `"left-symmetric"` for RAID 5/6, `"near"` for RAID 10,
    /// `""` otherwise ([`default_layout`]).
    pub layout: String,
    /// The chunk size in bytes (ignored by RAID 1).
    pub chunk_size: u64,
    /// The number of roles (slots) of the array.
    pub members: usize,
    /// Copies of each chunk (RAID 10; other levels ignore it).
    pub copies: usize,
    /// Usable bytes per member, counted from `data_offset`.
    pub member_data_size: u64,
    /// The member offset where array data starts.
    pub data_offset: u64,
    /// The write-intent bitmap's geometry, `None` without a bitmap.
    pub bitmap: Option<BitmapGeometry>,
    /// This member's own uuid.
    pub member_uuid: Uuid,
    /// This member's slot, `0..members`.
    pub role: usize,
    /// The state of every slot, indexed by role.
    pub roles: Vec<RoleState>,
    /// Bumped by every superblock update; the highest wins at assembly.
    pub events: u64,
    /// Whether the array was shut down (or idle) with parity and mirrors
    /// in sync, so that no resync is needed at the next start.
    pub clean: bool,
    /// When the array was created, in unix seconds.
    pub created: u64,
    /// When this superblock was last updated, in unix seconds.
    pub updated: u64,
    /// Whether the writes since the array was last clean were logged in
    /// the partial-parity log (RAID 5/6), so that a crash that leaves it
    /// dirty *and* degraded can be recovered by replaying the log. Absent
    /// (false) in superblocks written before the log existed, and left out
    /// when false so that those versions still read ours.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_log: bool,
}

/// Serializes [`Level`] as its name (`"raid5"`), which `layout` does not.
mod level_name {
    use super::*;
    use serde::de::Error as _;

    pub fn serialize<S: Serializer>(level: &Level, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(level)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Level, D::Error> {
        let name = String::deserialize(d)?;
        level_from_name(&name).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown RAID level {name:?}, expected raid0, raid1, raid5, raid6 or raid10"
            ))
        })
    }
}

/// Returns the level named `name` (`"raid0"`, `"raid1"`, `"raid5"`,
/// `"raid6"`, `"raid10"`), as [`Level`]'s `Display` writes it.
pub fn level_from_name(name: &str) -> Option<Level> {
    Some(match name {
        "raid0" => Level::Raid0,
        "raid1" => Level::Raid1,
        "raid5" => Level::Raid5,
        "raid6" => Level::Raid6,
        "raid10" => Level::Raid10,
        _ => return None,
    })
}

/// Returns the layout name recorded for `level`: md's defaults, the only
/// layouts [`crate::layout`] implements.
pub const fn default_layout(level: Level) -> &'static str {
    match level {
        Level::Raid5 | Level::Raid6 => "left-symmetric",
        Level::Raid10 => "near",
        Level::Raid0 | Level::Raid1 => "",
    }
}

impl Superblock {
    /// Returns the superblock of a new array, as member 0 holds it, with
    /// every role `Active`, `events` 0 and `clean` false (a new array is
    /// resynced, or its members are known blank and the caller sets it).
    /// `members` gives each slot's member uuid and URI.
    pub fn new(
        array_uuid: Uuid,
        array_name: &str,
        geometry: Geometry,
        data_offset: u64,
        bitmap: Option<BitmapGeometry>,
        members: &[(Uuid, String)],
        now: u64,
    ) -> Result<Superblock, MetaError> {
        let roles: Vec<RoleState> = members
            .iter()
            .map(|(member_uuid, uri)| RoleState {
                member_uuid: *member_uuid,
                uri: uri.clone(),
                state: MemberState::Active,
                errors: 0,
            })
            .collect();
        let sb = Superblock {
            version: SB_VERSION,
            array_uuid,
            array_name: array_name.to_owned(),
            level: geometry.level,
            layout: default_layout(geometry.level).to_owned(),
            chunk_size: geometry.chunk,
            members: geometry.members,
            copies: geometry.copies,
            member_data_size: geometry.member_size,
            data_offset,
            bitmap,
            member_uuid: roles.first().map(|r| r.member_uuid).unwrap_or_default(),
            role: 0,
            roles,
            events: 0,
            clean: false,
            created: now,
            updated: now,
            write_log: false,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Returns the copy of this superblock that the member in `role`
    /// holds (its own uuid and role), `None` if there is no such role.
    pub fn for_role(&self, role: usize) -> Option<Superblock> {
        let state = self.roles.get(role)?;
        Some(Superblock {
            member_uuid: state.member_uuid,
            role,
            ..self.clone()
        })
    }

    /// Returns whether both superblocks belong to the same array (same
    /// array uuid), whatever their events.
    pub fn is_same_array(&self, other: &Superblock) -> bool {
        self.array_uuid == other.array_uuid
    }

    /// Records an update: bumps `events` and sets `updated` to `now`.
    /// Call it before writing the superblock, every time.
    pub fn bump(&mut self, now: u64) {
        self.events = self.events.saturating_add(1);
        self.updated = now;
    }

    /// Returns the array geometry the superblock describes.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(
            self.level,
            self.members,
            self.chunk_size,
            self.member_data_size,
        )
        .with_copies(self.copies)
    }

    /// Checks that the superblock is consistent: a valid geometry with its
    /// level's layout, one role per slot with distinct members, this
    /// member in its own slot, a page-aligned data offset past the bitmap,
    /// and a bitmap at [`BITMAP_OFFSET`] that covers the member data.
    pub fn validate(&self) -> Result<(), MetaError> {
        let bad = |what: String| Err(MetaError::Invalid(what));
        if self.version == 0 || self.version > SB_VERSION {
            return bad(format!(
                "body version {} is not 1..={SB_VERSION}",
                self.version
            ));
        }
        if let Err(e) = self.geometry().validate() {
            return bad(format!("geometry: {e}"));
        }
        let want = default_layout(self.level);
        if self.layout != want {
            return bad(format!(
                "layout {:?} for {}, only {want:?} is supported",
                self.layout, self.level
            ));
        }
        if self.roles.len() != self.members {
            return bad(format!(
                "{} role records for {} members",
                self.roles.len(),
                self.members
            ));
        }
        let Some(own) = self.roles.get(self.role) else {
            return bad(format!(
                "role {} is past the last of {} members",
                self.role, self.members
            ));
        };
        if own.member_uuid != self.member_uuid {
            return bad(format!(
                "slot {} records member {}, but this member is {}",
                self.role, own.member_uuid, self.member_uuid
            ));
        }
        for (i, r) in self.roles.iter().enumerate() {
            if self.roles[..i]
                .iter()
                .any(|o| o.member_uuid == r.member_uuid)
            {
                return bad(format!("member {} holds two slots", r.member_uuid));
            }
            match r.state {
                MemberState::Recovering { done } if done > self.member_data_size => {
                    return bad(format!(
                        "slot {i} recovered {done} bytes of {}",
                        self.member_data_size
                    ));
                }
                MemberState::Faulty { at_event } if at_event > self.events => {
                    return bad(format!(
                        "slot {i} failed at event {at_event}, after the current {}",
                        self.events
                    ));
                }
                _ => {}
            }
        }
        if self.data_offset < MIN_DATA_OFFSET || !self.data_offset.is_multiple_of(BITMAP_PAGE_SIZE)
        {
            return bad(format!(
                "data offset {} is not a multiple of {BITMAP_PAGE_SIZE} at or past {MIN_DATA_OFFSET}",
                self.data_offset
            ));
        }
        if self
            .data_offset
            .checked_add(self.member_data_size)
            .is_none()
        {
            return bad("data offset plus member data size overflows".to_owned());
        }
        if let Some(bitmap) = &self.bitmap {
            if bitmap.offset != BITMAP_OFFSET {
                return bad(format!(
                    "bitmap at {}, expected {BITMAP_OFFSET}",
                    bitmap.offset
                ));
            }
            bitmap.validate(self.member_data_size)?;
        }
        Ok(())
    }
}

/// Returns one encoded copy of `sb`: header and JSON body, zero-padded to
/// a multiple of 4 KiB. Fails if the body does not fit in a slot (very
/// many members with long URIs or names).
pub fn encode(sb: &Superblock) -> Result<Vec<u8>, SbError> {
    let body = serde_json::to_vec(sb).map_err(|e| MetaError::Json {
        version: SB_VERSION,
        reason: e.to_string(),
    })?;
    if body.len() > SB_MAX_BODY {
        return Err(MetaError::SuperblockTooLarge {
            len: body.len(),
            max: SB_MAX_BODY,
        });
    }
    let len = SB_HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(SB_ALIGN));
    out.extend_from_slice(&SB_MAGIC);
    out.extend_from_slice(&SB_VERSION.to_le_bytes());
    // body.len() ≤ SB_MAX_BODY < 2^32.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(SB_VERSION, body.len() as u32, &body).to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(len.next_multiple_of(SB_ALIGN), 0);
    Ok(out)
}

fn checksum(version: u32, len: u32, body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&version.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &len.to_le_bytes());
    crc32c::crc32c_append(crc, body)
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

/// Decodes one slot's bytes (normally the whole 32 KiB slot).
///
/// Returns `Ok(None)` when the slot does not start with [`SB_MAGIC`]
/// (blank, or not ours), `Err` when it does but the copy is truncated,
/// torn (checksum), from a newer format, or not a consistent superblock,
/// and the superblock otherwise. Never panics, whatever the bytes.
pub fn decode(slot: &[u8]) -> Result<Option<Superblock>, SbError> {
    if slot.get(..SB_MAGIC.len()) != Some(&SB_MAGIC[..]) {
        return Ok(None);
    }
    if slot.len() < SB_HEADER_LEN {
        return Err(MetaError::Truncated {
            len: slot.len(),
            need: SB_HEADER_LEN,
        });
    }
    // The version comes first: a newer format may frame its body
    // differently, and must be refused as newer, not as torn.
    let version = le32(slot, 8);
    if version > SB_VERSION {
        return Err(MetaError::TooNew {
            version,
            supported: SB_VERSION,
        });
    }
    let len = le32(slot, 12) as usize;
    if len > SB_MAX_BODY {
        return Err(MetaError::BadLength {
            len,
            max: SB_MAX_BODY,
        });
    }
    let Some(body) = slot.get(SB_HEADER_LEN..SB_HEADER_LEN + len) else {
        return Err(MetaError::Truncated {
            len: slot.len(),
            need: SB_HEADER_LEN + len,
        });
    };
    let stored = le32(slot, 16);
    let computed = checksum(version, len as u32, body);
    if stored != computed {
        return Err(MetaError::Checksum { stored, computed });
    }
    if version == 0 {
        return Err(MetaError::BadVersion { version });
    }
    let sb: Superblock = serde_json::from_slice(body).map_err(|e| MetaError::Json {
        version,
        reason: e.to_string(),
    })?;
    if sb.version != version {
        return Err(MetaError::Invalid(format!(
            "body version {} in a format-{version} header",
            sb.version
        )));
    }
    sb.validate()?;
    Ok(Some(sb))
}

/// What the two copies on one member amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SbRead {
    /// A valid copy: the one with the most events (A on a tie).
    Valid {
        /// The newest valid copy.
        sb: Box<Superblock>,
        /// Where it is: the next write goes to the other slot.
        slot: Slot,
        /// Why the other copy is unusable, if it is ours but damaged
        /// (`None` when it is valid or blank). Worth a warning; the next
        /// write repairs it.
        other: Option<SbError>,
    },
    /// Neither slot holds anything of ours: a blank (or foreign) volume.
    Blank,
    /// No valid copy, but at least one of ours that is damaged: the
    /// member must not be used, nor overwritten, without an operator.
    Corrupt {
        /// What is wrong with each copy, for operators.
        reason: String,
    },
    /// A copy written by a newer nbdraid: this build must neither use
    /// the member nor write to it (its next write would replace the newer
    /// copy's ping-pong partner and lose state it cannot read).
    Unsupported {
        /// The slot holding the newer copy.
        slot: Slot,
        /// The error naming the versions.
        error: SbError,
    },
}

impl SbRead {
    /// Returns the slot holding the newest valid copy, the input of
    /// [`slot_for_next_write`].
    pub fn slot(&self) -> Option<Slot> {
        match self {
            SbRead::Valid { slot, .. } => Some(*slot),
            _ => None,
        }
    }
}

/// Decodes both copies (the bytes of slots A and B) and returns the
/// newest valid one, or why there is none.
pub fn read_copies(a: &[u8], b: &[u8]) -> SbRead {
    let copies = [(Slot::A, decode(a)), (Slot::B, decode(b))];
    for (slot, copy) in &copies {
        if let Err(error @ MetaError::TooNew { .. }) = copy {
            return SbRead::Unsupported {
                slot: *slot,
                error: error.clone(),
            };
        }
    }
    let [(_, a), (_, b)] = copies;
    match (a, b) {
        (Ok(Some(a)), Ok(Some(b))) => {
            // Ping-pong: both valid, the one with more events is newer.
            let (sb, slot) = if b.events > a.events {
                (b, Slot::B)
            } else {
                (a, Slot::A)
            };
            SbRead::Valid {
                sb: Box::new(sb),
                slot,
                other: None,
            }
        }
        (Ok(Some(sb)), other) => SbRead::Valid {
            sb: Box::new(sb),
            slot: Slot::A,
            other: other.err(),
        },
        (other, Ok(Some(sb))) => SbRead::Valid {
            sb: Box::new(sb),
            slot: Slot::B,
            other: other.err(),
        },
        (Ok(None), Ok(None)) => SbRead::Blank,
        (a, b) => {
            let say = |r: Result<Option<Superblock>, SbError>| match r {
                Err(e) => e.to_string(),
                Ok(_) => "blank".to_owned(),
            };
            SbRead::Corrupt {
                reason: format!("copy A: {}; copy B: {}", say(a), say(b)),
            }
        }
    }
}

/// Returns the slot the next superblock write goes to: the one *not*
/// holding the newest valid copy (`current`, from [`SbRead::slot`]), so a
/// torn write leaves that copy intact; slot A when there is none.
pub fn slot_for_next_write(current: Option<Slot>) -> Slot {
    current.map_or(Slot::A, Slot::other)
}
