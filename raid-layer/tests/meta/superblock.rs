//! Superblock framing, validation and the two ping-pong copies: round
//! trips, blank and damaged slots, arbitrary bytes, and torn writes at
//! every step of a sequence of updates.

use nbdraid_raid::layout::{Geometry, Level};
use nbdraid_raid::meta::superblock::{
    SB_ALIGN, SB_HEADER_LEN, SB_MAGIC, SB_MAX_BODY, SB_VERSION, default_layout, level_from_name,
};
use nbdraid_raid::meta::{
    DEFAULT_DATA_OFFSET, MemberState, MetaError, RoleState, SB_SLOT_SIZE, SbRead, Slot, Superblock,
    decode, encode, geometry_for, read_copies, slot_for_next_write,
};
use proptest::prelude::*;
use uuid::Uuid;

const SLOT: usize = SB_SLOT_SIZE as usize;

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// The crc32c of a header's version and length and the body.
fn checksum(version: u32, len: u32, body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&version.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &len.to_le_bytes());
    crc32c::crc32c_append(crc, body)
}

const MIB: u64 = 1 << 20;

/// A RAID 5 of three 256 MiB members, as member `role` holds it.
fn sample(role: usize) -> Superblock {
    let members: Vec<(Uuid, String)> = (0..3u128)
        .map(|i| {
            (
                Uuid::from_u128(0x100 + i),
                format!("nbd://node{i}:10809/vol"),
            )
        })
        .collect();
    let geometry = Geometry::new(Level::Raid5, 3, 64 * 1024, 256 * MIB);
    let bitmap = geometry_for(256 * MIB, None).unwrap();
    let sb = Superblock::new(
        Uuid::from_u128(0xa),
        "data",
        geometry,
        DEFAULT_DATA_OFFSET,
        Some(bitmap),
        &members,
        1_700_000_000,
    )
    .unwrap();
    sb.for_role(role).unwrap()
}

fn slot_bytes(sb: &Superblock) -> Vec<u8> {
    let mut bytes = encode(sb).unwrap();
    bytes.resize(SLOT, 0);
    bytes
}

/// Encodes `body` with a valid header of `version`.
fn framed(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = SB_MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(version, body.len() as u32, body).to_le_bytes());
    out.extend_from_slice(body);
    out.resize(SLOT, 0);
    out
}

#[test]
fn round_trip_and_framing() {
    let sb = sample(1);
    let bytes = encode(&sb).unwrap();
    assert_eq!(bytes.len() % SB_ALIGN, 0);
    assert!(bytes.len() <= SLOT);
    assert_eq!(&bytes[..8], b"NBDRAIDS");
    assert_eq!(decode(&bytes).unwrap(), Some(sb.clone()));
    assert_eq!(decode(&slot_bytes(&sb)).unwrap(), Some(sb.clone()));
    let len = le32(&bytes, 12) as usize;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes[SB_HEADER_LEN..SB_HEADER_LEN + len]).unwrap();
    assert_eq!(json["level"], "raid5");
    assert_eq!(json["layout"], "left-symmetric");
    assert_eq!(json["role"], 1);
    assert_eq!(json["roles"][0]["state"]["kind"], "active");
}

#[test]
fn every_level_and_state_round_trips() {
    for level in [
        Level::Raid0,
        Level::Raid1,
        Level::Raid5,
        Level::Raid6,
        Level::Raid10,
    ] {
        assert_eq!(level_from_name(&level.to_string()), Some(level));
        let members = level.min_members().max(4);
        let mut sb = sample(0);
        sb.level = level;
        sb.layout = default_layout(level).to_owned();
        sb.members = members;
        sb.roles = (0..members)
            .map(|i| RoleState {
                member_uuid: Uuid::from_u128(0x100 + i as u128),
                uri: String::new(),
                state: MemberState::Active,
                errors: 0,
            })
            .collect();
        sb.events = 9;
        sb.roles[1].state = MemberState::Faulty { at_event: 7 };
        sb.roles[2].state = MemberState::Recovering { done: 4096 };
        sb.roles[3].state = MemberState::Spare;
        assert_eq!(decode(&encode(&sb).unwrap()).unwrap(), Some(sb));
    }
    assert_eq!(level_from_name("raid4"), None);
}

#[test]
fn blank_and_foreign_slots_are_none() {
    assert_eq!(decode(&[]).unwrap(), None);
    assert_eq!(decode(&[0; SLOT]).unwrap(), None);
    assert_eq!(decode(b"NBDRAID").unwrap(), None);
    let mut ext4ish = vec![0xEF; SLOT];
    ext4ish[..8].copy_from_slice(b"NBDRAIDX");
    assert_eq!(decode(&ext4ish).unwrap(), None);
}

#[test]
fn damaged_copies_say_what_is_wrong() {
    let good = slot_bytes(&sample(0));
    let len = le32(&good, 12) as usize;

    let mut torn = good.clone();
    torn[SB_HEADER_LEN + len / 2] ^= 0x40;
    let err = decode(&torn).unwrap_err();
    assert!(matches!(err, MetaError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("torn"), "{err}");

    let err = decode(&good[..SB_HEADER_LEN + len - 1]).unwrap_err();
    assert!(matches!(err, MetaError::Truncated { .. }), "{err}");
    assert!(matches!(
        decode(&good[..12]).unwrap_err(),
        MetaError::Truncated { need: 20, .. }
    ));

    let mut long = good.clone();
    long[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&long).unwrap_err(),
        MetaError::BadLength { .. }
    ));

    let err = decode(&framed(SB_VERSION + 1, b"{}")).unwrap_err();
    assert_eq!(
        err,
        MetaError::TooNew {
            version: 2,
            supported: 1
        }
    );
    assert!(err.to_string().contains("newer"), "{err}");
    assert!(matches!(
        decode(&framed(0, b"{}")).unwrap_err(),
        MetaError::BadVersion { version: 0 }
    ));

    let err = decode(&framed(1, b"{\"version\": 1")).unwrap_err();
    assert!(matches!(err, MetaError::Json { .. }), "{err}");

    let mut json: serde_json::Value =
        serde_json::from_slice(&good[SB_HEADER_LEN..SB_HEADER_LEN + len]).unwrap();
    json["surprise"] = 1.into();
    let err = decode(&framed(1, json.to_string().as_bytes())).unwrap_err();
    assert!(err.to_string().contains("surprise"), "{err}");

    let mut json: serde_json::Value =
        serde_json::from_slice(&good[SB_HEADER_LEN..SB_HEADER_LEN + len]).unwrap();
    json["level"] = "raid4".into();
    let err = decode(&framed(1, json.to_string().as_bytes())).unwrap_err();
    assert!(err.to_string().contains("raid4"), "{err}");
}

#[test]
fn inconsistent_superblocks_are_refused() {
    type Spoil = Box<dyn Fn(&mut Superblock)>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("role records", Box::new(|sb| drop(sb.roles.pop()))),
        ("past the last", Box::new(|sb| sb.role = 3)),
        (
            "this member is",
            Box::new(|sb| sb.member_uuid = Uuid::nil()),
        ),
        (
            "two slots",
            Box::new(|sb| sb.roles[2].member_uuid = sb.roles[1].member_uuid),
        ),
        ("layout", Box::new(|sb| sb.layout = "near".to_owned())),
        ("geometry", Box::new(|sb| sb.chunk_size = 3000)),
        ("data offset", Box::new(|sb| sb.data_offset = 4096)),
        (
            "after the current",
            Box::new(|sb| sb.roles[2].state = MemberState::Faulty { at_event: 5 }),
        ),
        (
            "recovered",
            Box::new(|sb| sb.roles[2].state = MemberState::Recovering { done: 1 << 40 }),
        ),
        ("bits", Box::new(|sb| sb.member_data_size *= 2)),
        ("version", Box::new(|sb| sb.version = 7)),
    ];
    for (what, spoil) in cases {
        let mut sb = sample(0);
        spoil(&mut sb);
        let err = sb.validate().unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
        if sb.version == SB_VERSION {
            let err = decode(&encode(&sb).unwrap()).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }
}

#[test]
fn a_body_too_large_for_the_slot_is_refused() {
    let mut sb = sample(0);
    sb.array_name = "x".repeat(SB_MAX_BODY);
    let err = encode(&sb).unwrap_err();
    assert!(matches!(err, MetaError::SuperblockTooLarge { .. }), "{err}");
}

#[test]
fn newest_valid_copy_wins() {
    let mut sb = sample(0);
    let old = slot_bytes(&sb);
    sb.bump(1_700_000_100);
    let new = slot_bytes(&sb);
    let mut torn = new.clone();
    torn[100] ^= 1;
    let blank = vec![0u8; SLOT];

    let read = read_copies(&torn, &old);
    assert_eq!(read.slot(), Some(Slot::B));
    let SbRead::Valid { sb: got, other, .. } = read else {
        panic!("{read:?}")
    };
    assert_eq!(got.events, 0);
    assert!(matches!(other, Some(MetaError::Checksum { .. })));

    assert_eq!(read_copies(&old, &new).slot(), Some(Slot::B));
    assert_eq!(read_copies(&new, &old).slot(), Some(Slot::A));
    assert_eq!(read_copies(&new, &new).slot(), Some(Slot::A));
    assert_eq!(read_copies(&blank, &new).slot(), Some(Slot::B));
    assert_eq!(read_copies(&blank, &blank), SbRead::Blank);

    let SbRead::Corrupt { reason } = read_copies(&torn, &blank) else {
        panic!()
    };
    assert!(reason.contains("copy A: superblock checksum"), "{reason}");
    assert!(reason.contains("copy B: blank"), "{reason}");

    let newer = framed(SB_VERSION + 1, b"{}");
    let read = read_copies(&new, &newer);
    assert!(
        matches!(read, SbRead::Unsupported { slot: Slot::B, .. }),
        "{read:?}"
    );
}

#[test]
fn ping_pong_survives_a_torn_write_at_every_step() {
    let mut slots = [vec![0u8; SLOT], vec![0u8; SLOT]];
    let mut sb = sample(2);
    let mut written = Vec::new();
    for step in 0..6u64 {
        let current = read_copies(&slots[0], &slots[1]);
        let expect_events = step.checked_sub(1);
        assert_eq!(
            match &current {
                SbRead::Valid { sb, .. } => Some(sb.events),
                _ => None,
            },
            expect_events
        );
        let slot = slot_for_next_write(current.slot());
        written.push(slot);
        if step > 0 {
            sb.bump(step);
        }
        // A torn write of this step leaves the previous state readable.
        let mut torn = slots.clone();
        let i = usize::from(slot == Slot::B);
        torn[i][..SB_ALIGN].copy_from_slice(&slot_bytes(&sb)[..SB_ALIGN]);
        torn[i][SB_HEADER_LEN + 5] ^= 0xff;
        let after_crash = read_copies(&torn[0], &torn[1]);
        assert_eq!(after_crash.slot(), current.slot());
        slots[i] = slot_bytes(&sb);
    }
    assert_eq!(
        written,
        [Slot::A, Slot::B, Slot::A, Slot::B, Slot::A, Slot::B]
    );
}

#[test]
fn helpers() {
    let sb = sample(0);
    let other = sample(2);
    assert!(sb.is_same_array(&other));
    assert_eq!(other.role, 2);
    assert_eq!(other.member_uuid, sb.roles[2].member_uuid);
    assert!(sb.for_role(3).is_none());
    let mut foreign = sample(0);
    foreign.array_uuid = Uuid::from_u128(0xb);
    assert!(!sb.is_same_array(&foreign));
    assert_eq!(sb.geometry().validate(), Ok(()));
    assert_eq!(Slot::A.offset(), 0);
    assert_eq!(Slot::B.offset(), 32 * 1024);
    assert_eq!(slot_for_next_write(None), Slot::A);
    assert_eq!(slot_for_next_write(Some(Slot::A)), Slot::B);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..SLOT + 100),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&SB_MAGIC);
        }
        let _ = decode(&bytes);
        let _ = read_copies(&bytes, &bytes);
    }

    #[test]
    fn corrupted_encodings_never_pass_as_something_else(
        flips in proptest::collection::vec((0usize..SB_ALIGN, 1u8..=255), 1..4),
        cut in proptest::option::of(0usize..SB_ALIGN),
    ) {
        let sb = sample(1);
        let mut bytes = slot_bytes(&sb);
        for (at, x) in flips {
            bytes[at] ^= x;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut);
        }
        // Damage is detected, lands in the padding, or spoils the magic.
        if let Ok(Some(got)) = decode(&bytes) {
            prop_assert_eq!(got, sb);
        }
    }
}
