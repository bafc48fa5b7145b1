//! Assembly: which configured members hold the array, and in what state.
//!
//! [`assess`] compares the superblocks read from every configured member
//! (the newest valid copy of each, [`read_copies`](super::read_copies)).
//! The array is the one the configuration expects, or else that of the
//! member with the most events; the authoritative superblock is the one
//! with the most events among that array's members (md's rule: the
//! members that recorded a failure have more events than the member that
//! failed, so an older member can never overwrite newer ones). Every other
//! member is classified against it: current, stale (marked faulty,
//! replaced in its slot, or more than one event behind), recovering,
//! foreign, in the wrong position, or blank.
//!
//! The one-event margin is md's: a crash in the middle of a superblock
//! update leaves some members one event behind without any data write
//! having skipped them, because the array records a failure (bumping
//! `events` and writing every live member's superblock) before it
//! acknowledges a write that skipped the failed member.
//!
//! Messages ([`MemberReport`]'s `Display`) name the member by position and
//! URI, what it holds and what was expected: they are printed to
//! operators.

use std::fmt;

use uuid::Uuid;

use super::superblock::{MemberState, Superblock};

/// What one configured member holds, relative to the authoritative
/// superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberStatus {
    /// In its slot, active, and at most one event behind: usable as is.
    Current {
        /// The member's own events.
        events: u64,
    },
    /// A member of the array that missed updates: marked faulty, replaced
    /// in its slot, or more than one event behind. It must be re-added
    /// (resynced) before it serves reads.
    Stale {
        /// The member's own events.
        own_events: u64,
        /// The event at which the array marked it faulty, if it did.
        failed_at: Option<u64>,
        /// The authoritative events.
        array_events: u64,
        /// The member now recorded in its slot, if another one.
        replaced_by: Option<Uuid>,
    },
    /// Being rebuilt: the authoritative superblock marks its slot
    /// recovering (or spare: `done` 0).
    Recovering {
        /// Bytes of member data rebuilt so far.
        done: u64,
    },
    /// A superblock of another array: never to be touched automatically.
    Foreign {
        /// That array's uuid.
        array_uuid: Uuid,
        /// That array's name.
        array_name: String,
    },
    /// A superblock of this array, but for another slot than the position
    /// the member is configured at.
    WrongRole {
        /// The slot its superblock records.
        found_role: usize,
        /// Its configured position.
        expected_role: usize,
    },
    /// No superblock of ours (or none readable by the caller).
    Blank,
}

/// The status of one configured member, printable for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    /// The member's configured position.
    pub position: usize,
    /// The member's configured URI.
    pub uri: String,
    /// What it holds.
    pub status: MemberStatus,
    /// The array it was expected to hold (uuid and name), if known.
    pub array: Option<(Uuid, String)>,
}

impl fmt::Display for MemberReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member {} ({}): ", self.position, self.uri)?;
        let array = match &self.array {
            Some((uuid, name)) if name.is_empty() => format!("array {uuid}"),
            Some((uuid, name)) => format!("array {name:?} ({uuid})"),
            None => "the array".to_owned(),
        };
        match &self.status {
            MemberStatus::Current { events } => write!(f, "current at events {events}"),
            MemberStatus::Stale {
                own_events,
                failed_at,
                array_events,
                replaced_by,
            } => {
                write!(f, "stale: holds events {own_events} of {array}, ")?;
                match (replaced_by, failed_at) {
                    (Some(by), _) => {
                        write!(f, "whose slot {} now holds member {by}", self.position)?
                    }
                    (None, Some(at)) => write!(f, "which marked it failed at event {at}")?,
                    (None, None) => write!(f, "more than one event behind")?,
                }
                write!(
                    f,
                    " (the array is at events {array_events}); it must be re-added before use"
                )
            }
            MemberStatus::Recovering { done } => {
                write!(f, "recovering, {done} bytes of member data rebuilt")
            }
            MemberStatus::Foreign {
                array_uuid,
                array_name,
            } => write!(
                f,
                "holds array {array_name:?} ({array_uuid}), expected {array}; left untouched"
            ),
            MemberStatus::WrongRole {
                found_role,
                expected_role,
            } => write!(
                f,
                "holds slot {found_role} of {array}, but is configured as member \
                 {expected_role}; fix the member order in the configuration"
            ),
            MemberStatus::Blank => write!(f, "no nbdraid superblock, expected a member of {array}"),
        }
    }
}

/// One configured member as read by the caller: [`assess`]'s input.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    /// The member's configured URI.
    pub uri: &'a str,
    /// The newest valid superblock on it (from
    /// [`read_copies`](super::read_copies)), `None`
    /// if blank.
    pub sb: Option<&'a Superblock>,
}

/// The outcome of [`assess`]: the authoritative superblock and each
/// member's status, by configured position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// The configured position whose superblock is authoritative.
    pub authority: Option<usize>,
    /// The authoritative superblock, `None` when every member is blank
    /// (or, with an expected uuid, none holds that array).
    pub superblock: Option<Superblock>,
    /// Every configured member's status, in configured order.
    pub members: Vec<MemberReport>,
}

/// Classifies the configured members (their superblocks in configured
/// order) and picks the authoritative superblock.
///
/// The array is `expected` if given (the uuid the configuration
/// records), else the array of the member with the most events (the
/// lowest position on a tie). The authoritative superblock is the one
/// with the most events among that array's members (the lowest position
/// on a tie): md's rule, which makes a member that missed updates lose
/// against those that recorded its failure.
pub fn assess(members: &[Found<'_>], expected: Option<Uuid>) -> Assessment {
    let newest = |uuid: Option<Uuid>| {
        members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.sb.map(|sb| (i, sb)))
            .filter(|(_, sb)| uuid.is_none_or(|u| sb.array_uuid == u))
            // max_by_key keeps the last maximum; rev() makes it the first.
            .rev()
            .max_by_key(|(_, sb)| sb.events)
    };
    let array_uuid = expected.or_else(|| newest(None).map(|(_, sb)| sb.array_uuid));
    let authority = array_uuid.and_then(|u| newest(Some(u)));
    let array = authority
        .map(|(_, sb)| (sb.array_uuid, sb.array_name.clone()))
        .or_else(|| expected.map(|u| (u, String::new())));
    let reports = members
        .iter()
        .enumerate()
        .map(|(position, m)| MemberReport {
            position,
            uri: m.uri.to_owned(),
            status: classify(position, m.sb, authority.map(|(_, sb)| sb), array_uuid),
            array: array.clone(),
        })
        .collect();
    Assessment {
        authority: authority.map(|(i, _)| i),
        superblock: authority.map(|(_, sb)| sb.clone()),
        members: reports,
    }
}

fn classify(
    position: usize,
    sb: Option<&Superblock>,
    authority: Option<&Superblock>,
    array_uuid: Option<Uuid>,
) -> MemberStatus {
    let Some(sb) = sb else {
        return MemberStatus::Blank;
    };
    let (Some(auth), true) = (authority, array_uuid == Some(sb.array_uuid)) else {
        return MemberStatus::Foreign {
            array_uuid: sb.array_uuid,
            array_name: sb.array_name.clone(),
        };
    };
    if sb.role != position {
        return MemberStatus::WrongRole {
            found_role: sb.role,
            expected_role: position,
        };
    }
    let stale = |failed_at, replaced_by| MemberStatus::Stale {
        own_events: sb.events,
        failed_at,
        array_events: auth.events,
        replaced_by,
    };
    let Some(slot) = auth.roles.get(position) else {
        // Only a superblock with another member count can get here.
        return stale(None, None);
    };
    if slot.member_uuid != sb.member_uuid {
        return stale(None, Some(slot.member_uuid));
    }
    match slot.state {
        MemberState::Faulty { at_event } => stale(Some(at_event), None),
        MemberState::Recovering { done } => MemberStatus::Recovering { done },
        MemberState::Spare => MemberStatus::Recovering { done: 0 },
        MemberState::Active if sb.events.saturating_add(1) >= auth.events => {
            MemberStatus::Current { events: sb.events }
        }
        MemberState::Active => stale(None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Geometry, Level};
    use crate::meta::DEFAULT_DATA_OFFSET;

    /// A RAID 5 of three members, array "data", as member `role` holds it.
    fn sample(role: usize) -> Superblock {
        let members: Vec<(Uuid, String)> = (0..3u128)
            .map(|i| (Uuid::from_u128(0x100 + i), format!("nbd://node{i}/vol")))
            .collect();
        let geometry = Geometry::new(Level::Raid5, 3, 64 * 1024, 256 << 20);
        let uuid = Uuid::from_u128(0xa);
        Superblock::new(
            uuid,
            "data",
            geometry,
            DEFAULT_DATA_OFFSET,
            None,
            &members,
            0,
        )
        .unwrap()
        .for_role(role)
        .unwrap()
    }

    const URIS: [&str; 3] = ["nbd://a/v", "nbd://b/v", "nbd://c/v"];

    /// The three members of the sample array at `events`.
    fn members(events: [u64; 3]) -> Vec<Superblock> {
        (0..3)
            .map(|i| Superblock {
                events: events[i],
                ..sample(i)
            })
            .collect()
    }

    fn run(sbs: &[Option<&Superblock>], expected: Option<Uuid>) -> Assessment {
        let found: Vec<Found<'_>> = sbs
            .iter()
            .zip(URIS)
            .map(|(sb, uri)| Found { uri, sb: *sb })
            .collect();
        assess(&found, expected)
    }

    fn statuses(a: &Assessment) -> Vec<MemberStatus> {
        a.members.iter().map(|m| m.status.clone()).collect()
    }

    #[test]
    fn all_current_within_one_event() {
        let sbs = members([5, 4, 5]);
        let a = run(&[Some(&sbs[0]), Some(&sbs[1]), Some(&sbs[2])], None);
        assert_eq!(a.authority, Some(0), "ties go to the lowest position");
        assert_eq!(a.superblock.as_ref(), Some(&sbs[0]));
        assert_eq!(
            statuses(&a),
            [
                MemberStatus::Current { events: 5 },
                MemberStatus::Current { events: 4 },
                MemberStatus::Current { events: 5 },
            ]
        );
        assert_eq!(
            a.members[1].to_string(),
            "member 1 (nbd://b/v): current at events 4"
        );
    }

    #[test]
    fn more_than_one_event_behind_is_stale() {
        let sbs = members([3, 5, 5]);
        let a = run(&[Some(&sbs[0]), Some(&sbs[1]), Some(&sbs[2])], None);
        assert_eq!(a.authority, Some(1));
        assert_eq!(
            a.members[0].status,
            MemberStatus::Stale {
                own_events: 3,
                failed_at: None,
                array_events: 5,
                replaced_by: None
            }
        );
        let msg = a.members[0].to_string();
        assert!(msg.starts_with("member 0 (nbd://a/v): stale"), "{msg}");
        assert!(msg.contains("more than one event behind"), "{msg}");
    }

    #[test]
    fn a_member_marked_faulty_is_stale_even_one_event_behind() {
        // neilbrown/mdadm#22: the survivors recorded the failure, so the
        // failed member (one event behind) must not be taken as current.
        let mut sbs = members([6, 7, 7]);
        for sb in &mut sbs[1..] {
            sb.roles[0].state = MemberState::Faulty { at_event: 7 };
        }
        let a = run(&[Some(&sbs[0]), Some(&sbs[1]), Some(&sbs[2])], None);
        assert_eq!(a.authority, Some(1));
        assert!(matches!(
            a.members[0].status,
            MemberStatus::Stale {
                failed_at: Some(7),
                own_events: 6,
                ..
            }
        ));
        let msg = a.members[0].to_string();
        assert!(msg.contains("marked it failed at event 7"), "{msg}");
        assert!(msg.contains("array \"data\""), "{msg}");
    }

    #[test]
    fn recovering_spare_and_replaced_slots() {
        let mut sbs = members([9, 9, 9]);
        let replacement = Uuid::from_u128(0x999);
        for sb in &mut sbs {
            sb.roles[1].state = MemberState::Recovering { done: 1 << 20 };
            sb.roles[2].state = MemberState::Spare;
        }
        let a = run(&[Some(&sbs[0]), Some(&sbs[1]), Some(&sbs[2])], None);
        assert_eq!(
            statuses(&a)[1..],
            [
                MemberStatus::Recovering { done: 1 << 20 },
                MemberStatus::Recovering { done: 0 },
            ]
        );
        assert!(a.members[1].to_string().contains("recovering"));

        // Slot 2 now belongs to a replacement: the old volume is stale.
        sbs[0].roles[2].member_uuid = replacement;
        let a = run(&[Some(&sbs[0]), Some(&sbs[1]), Some(&sbs[2])], None);
        assert_eq!(
            a.members[2].status,
            MemberStatus::Stale {
                own_events: 9,
                failed_at: None,
                array_events: 9,
                replaced_by: Some(replacement)
            }
        );
        assert!(a.members[2].to_string().contains(&replacement.to_string()));
    }

    #[test]
    fn foreign_wrong_role_and_blank_members() {
        let sbs = members([4, 4, 4]);
        let mut other = sample(0);
        other.array_uuid = Uuid::from_u128(0xb);
        other.array_name = "scratch".to_owned();
        other.events = 4;
        // Member 1 holds another array, member 2 holds slot 0 (swapped
        // with a blank volume at position 0).
        let a = run(&[None, Some(&other), Some(&sbs[0])], None);
        assert_eq!(a.authority, Some(1), "highest events, then lowest position");
        let a = run(
            &[None, Some(&other), Some(&sbs[0])],
            Some(sbs[0].array_uuid),
        );
        assert_eq!(a.authority, Some(2));
        assert_eq!(
            statuses(&a),
            [
                MemberStatus::Blank,
                MemberStatus::Foreign {
                    array_uuid: other.array_uuid,
                    array_name: "scratch".to_owned()
                },
                MemberStatus::WrongRole {
                    found_role: 0,
                    expected_role: 2
                },
            ]
        );
        let text: Vec<String> = a.members.iter().map(ToString::to_string).collect();
        assert!(text[0].starts_with("member 0 (nbd://a/v): no nbdraid superblock"));
        assert!(text[0].contains("array \"data\""), "{}", text[0]);
        assert!(text[1].contains("holds array \"scratch\""), "{}", text[1]);
        assert!(text[1].contains("expected array \"data\""), "{}", text[1]);
        assert!(text[2].contains("holds slot 0"), "{}", text[2]);
        assert!(text[2].contains("configured as member 2"), "{}", text[2]);
    }

    #[test]
    fn the_array_of_the_newest_member_wins_without_an_expected_uuid() {
        let sbs = members([4, 4, 4]);
        let mut other = sample(1);
        other.array_uuid = Uuid::from_u128(0xb);
        other.events = 50;
        let a = run(&[Some(&sbs[0]), Some(&other), Some(&sbs[2])], None);
        assert_eq!(a.authority, Some(1));
        assert!(matches!(a.members[0].status, MemberStatus::Foreign { .. }));
        assert!(matches!(a.members[2].status, MemberStatus::Foreign { .. }));
    }

    #[test]
    fn nothing_found() {
        let a = run(&[None, None, None], None);
        assert_eq!(a.authority, None);
        assert_eq!(a.superblock, None);
        assert_eq!(statuses(&a), vec![MemberStatus::Blank; 3]);
        let sb = sample(0);
        let a = run(&[Some(&sb), None, None], Some(Uuid::from_u128(0xc)));
        assert_eq!(a.authority, None);
        assert!(matches!(a.members[0].status, MemberStatus::Foreign { .. }));
        let msg = a.members[0].to_string();
        assert!(
            msg.contains("expected array 00000000-0000-0000-0000-00000000000c"),
            "{msg}"
        );
    }
}
