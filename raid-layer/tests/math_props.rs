//! Properties of the RAID math, checked against references written here
//! independently of the crate:
//!
//! - P/Q against a deliberately naive GF(2^8) (bit-by-bit carry-less
//!   multiply, Q by repeated doubling) and hand-worked vectors;
//! - every layout maps each array byte to its own member bytes, never
//!   onto parity, never past the members' data size, in request order,
//!   and agrees with md's formulas restated here;
//! - a model array: random writes through the layout (delta updates and
//!   full-stripe parity), then any tolerated set of failed members, then
//!   reconstruction reads back exactly what was written and rebuilds the
//!   lost members bit for bit.

// Helpers outside `#[test]` functions unwrap too: this is a test crate.
#![allow(clippy::unwrap_used)]

use nbdraid_raid::gf;
use nbdraid_raid::layout::{Geometry, Layout, Level, Location, Role, Unit};
use nbdraid_raid::parity::{self, Located, ParityError, Redundancy};
use proptest::prelude::*;

// ---------------------------------------------------------------------
// A naive GF(2^8): the definition, not tables.

/// Carry-less multiply of a and b, reduced by x^8+x^4+x^3+x^2+1 bit by bit.
fn ref_mul(a: u8, b: u8) -> u8 {
    let mut wide: u16 = 0;
    for bit in 0..8 {
        if b & (1 << bit) != 0 {
            wide ^= u16::from(a) << bit;
        }
    }
    for bit in (8..16).rev() {
        if wide & (1 << bit) != 0 {
            wide ^= 0x11d << (bit - 8);
        }
    }
    wide as u8
}

/// P and Q of `data`: Q = Σ g^i·D_i with g^i obtained by doubling.
fn ref_pq(data: &[Vec<u8>], len: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
    let mut coefficient = 1u8;
    for chunk in data {
        for j in 0..len {
            p[j] ^= chunk[j];
            q[j] ^= ref_mul(coefficient, chunk[j]);
        }
        coefficient = ref_mul(coefficient, 2);
    }
    (p, q)
}

#[test]
fn hand_worked_field_values() {
    // x^8 ≡ x^4 + x^3 + x^2 + 1 = 0x1d.
    assert_eq!(gf::exp2(8), 0x1d);
    assert_eq!(gf::mul(0x80, 2), 0x1d);
    assert_eq!(ref_mul(0x80, 2), 0x1d);
    // 2·0x8e = 0x11c, and 0x11c ⊕ 0x11d = 1.
    assert_eq!(gf::inv(2), Some(0x8e));
    // 2·0xca = 0x194 ⊕ 0x11d = 0x89.
    assert_eq!(gf::mul(0xca, 2), 0x89);
    assert_eq!(gf::exp2(255), 1);
    assert_eq!(gf::log2(0x1d), Some(8));
    for a in 0..=255u8 {
        for b in 0..=255u8 {
            assert_eq!(gf::mul(a, b), ref_mul(a, b));
        }
    }
}

#[test]
fn hand_worked_stripes() {
    // [0x53, 0xca, 0x80]: P = 0x53 ⊕ 0xca ⊕ 0x80 = 0x19;
    // Q = 0x53 ⊕ 2·0xca ⊕ 4·0x80 = 0x53 ⊕ 0x89 ⊕ 0x3a = 0xe0
    // (4·0x80 = 2·0x1d = 0x3a).
    // [0x80, 0x40, 0x20]: P = 0xe0; Q = 0x80 ⊕ 0x80 ⊕ 0x80 = 0x80.
    // [0x01, 0x02, 0x03]: P = 0x00; Q = 0x01 ⊕ 0x04 ⊕ 0x0c = 0x09.
    let vectors = [
        ([0x53u8, 0xca, 0x80], 0x19u8, 0xe0u8),
        ([0x80, 0x40, 0x20], 0xe0, 0x80),
        ([0x01, 0x02, 0x03], 0x00, 0x09),
    ];
    for (data, p_expected, q_expected) in vectors {
        let chunks: Vec<Vec<u8>> = data.iter().map(|&b| vec![b]).collect();
        let (mut p, mut q) = ([0u8], [0u8]);
        parity::gen_pq(&chunks, &mut p, &mut q).unwrap();
        assert_eq!((p[0], q[0]), (p_expected, q_expected), "{data:x?}");
        assert_eq!(ref_pq(&chunks, 1), (vec![p_expected], vec![q_expected]));

        // Lose D_0 and D_2: rebuilt from D_1, P and Q.
        let mut stripe = vec![
            vec![0xff],
            chunks[1].clone(),
            vec![0x00],
            p.to_vec(),
            q.to_vec(),
        ];
        parity::reconstruct(Redundancy::PQ, &mut stripe, &[0, 2]).unwrap();
        assert_eq!(stripe[0], chunks[0]);
        assert_eq!(stripe[2], chunks[2]);
        // Lose D_1 and P: rebuilt from Q.
        let mut stripe = vec![
            chunks[0].clone(),
            vec![7],
            chunks[2].clone(),
            vec![7],
            q.to_vec(),
        ];
        parity::reconstruct(Redundancy::PQ, &mut stripe, &[3, 1]).unwrap();
        assert_eq!(stripe[1], chunks[1]);
        assert_eq!(stripe[3], p.to_vec());
    }
}

#[test]
fn largest_q_stripe_recovers_its_ends() {
    let k = parity::MAX_PQ_DATA;
    let data: Vec<Vec<u8>> = (0..k)
        .map(|i| (0..70).map(|j| (i * 7 + j * 13 + 1) as u8).collect())
        .collect();
    let (p, q) = ref_pq(&data, 70);
    let mut stripe = data.clone();
    stripe.push(p);
    stripe.push(q);
    for missing in [[0, k - 1], [1, k - 2], [k - 1, k + 1]] {
        let mut damaged = stripe.clone();
        for &m in &missing {
            damaged[m].fill(0);
        }
        parity::reconstruct(Redundancy::PQ, &mut damaged, &missing).unwrap();
        assert_eq!(damaged, stripe, "missing {missing:?}");
    }
    let mut too_many = vec![vec![0u8; 1]; k + 3];
    assert_eq!(
        parity::reconstruct(Redundancy::PQ, &mut too_many, &[0]),
        Err(ParityError::TooManyDataChunks { data: k + 1 })
    );
}

#[test]
fn scrub_tells_two_errors_from_one() {
    let data: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8 + 1; 16]).collect();
    let (p, q) = ref_pq(&data, 16);
    let mut bad = data.clone();
    bad[0][3] ^= 0x10;
    bad[2][9] ^= 0x01;
    assert_eq!(parity::locate_single_error(&bad, &p, &q), Ok(None));
    let mut bad_pq = (p.clone(), q.clone());
    bad_pq.0[1] ^= 1;
    bad_pq.1[2] ^= 1;
    assert_eq!(
        parity::locate_single_error(&data, &bad_pq.0, &bad_pq.1),
        Ok(None)
    );
}

/// Where in a chunk of `len` bytes an error pattern starts (derived from
/// the pattern, so it varies without another input).
fn seed_offset(error: &[u8], len: usize) -> usize {
    error.iter().map(|&e| usize::from(e)).sum::<usize>() % len
}

fn bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), len)
}

/// A stripe of 1..=12 data chunks of one random length (0..300 covers the
/// empty case, vector tails and whole vectors).
fn data_stripe() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (1usize..=12, 0usize..300).prop_flat_map(|(k, len)| {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), len), k)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pq_matches_the_reference(data in data_stripe()) {
        let len = data[0].len();
        let (p_ref, q_ref) = ref_pq(&data, len);
        let (mut p, mut q) = (vec![0x5a; len], vec![0xa5; len]);
        parity::gen_pq(&data, &mut p, &mut q).unwrap();
        prop_assert_eq!(&p, &p_ref);
        prop_assert_eq!(&q, &q_ref);
        parity::gen_p(&data, &mut p).unwrap();
        prop_assert_eq!(&p, &p_ref);
        prop_assert!(parity::check_p(&data, &p).unwrap());
        prop_assert_eq!(parity::locate_single_error(&data, &p, &q), Ok(Some(Located::Consistent)));
    }

    #[test]
    fn any_one_or_two_lost_chunks_are_rebuilt(
        data in data_stripe(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let len = data[0].len();
        let (p, q) = ref_pq(&data, len);
        let mut stripe = data.clone();
        stripe.push(p);
        stripe.push(q);
        let (a, b) = (a.index(stripe.len()), b.index(stripe.len()));
        let missing: Vec<usize> = if a == b { vec![a] } else { vec![a, b] };
        let mut damaged = stripe.clone();
        for &m in &missing {
            damaged[m].iter_mut().for_each(|x| *x = x.wrapping_mul(3).wrapping_add(1));
        }
        parity::reconstruct(Redundancy::PQ, &mut damaged, &missing).unwrap();
        prop_assert_eq!(&damaged, &stripe);

        // RAID 5: the same stripe without Q, one chunk lost.
        let mut raid5: Vec<Vec<u8>> = stripe[..data.len() + 1].to_vec();
        let lost = a % raid5.len();
        raid5[lost].fill(0x33);
        parity::reconstruct(Redundancy::P, &mut raid5, &[lost]).unwrap();
        prop_assert_eq!(&raid5[..], &stripe[..data.len() + 1]);
    }

    #[test]
    fn delta_updates_equal_regeneration(
        data in data_stripe(),
        which in any::<prop::sample::Index>(),
        seed in any::<u8>(),
    ) {
        let len = data[0].len();
        let (mut p, mut q) = ref_pq(&data, len);
        let i = which.index(data.len());
        let new: Vec<u8> = data[i].iter().map(|x| x ^ seed.wrapping_add(7)).collect();
        parity::update_pq(i, &mut p, &mut q, &data[i], &new).unwrap();
        let mut updated = data.clone();
        updated[i] = new.clone();
        prop_assert_eq!((p.clone(), q.clone()), ref_pq(&updated, len));
        let mut p5 = ref_pq(&data, len).0;
        parity::update_p(&mut p5, &data[i], &new).unwrap();
        prop_assert_eq!(p5, p);
    }

    #[test]
    fn scrub_locates_a_single_bad_chunk(
        data in data_stripe(),
        which in any::<prop::sample::Index>(),
        error in bytes(1..40),
    ) {
        let len = data[0].len();
        // At most one error byte per stripe byte, so errors cannot cancel.
        let error = &error[..error.len().min(len)];
        prop_assume!(error.iter().any(|&e| e != 0));
        let (p, q) = ref_pq(&data, len);
        let mut stripe = data.clone();
        stripe.push(p);
        stripe.push(q);
        let k = data.len();
        let bad = which.index(stripe.len());
        let at = seed_offset(error, len);
        for (j, e) in error.iter().enumerate() {
            stripe[bad][(at + j) % len] ^= e;
        }
        let expected = match bad {
            i if i < k => Located::Data(i),
            i if i == k => Located::P,
            _ => Located::Q,
        };
        let found = parity::locate_single_error(&stripe[..k], &stripe[k], &stripe[k + 1]);
        prop_assert_eq!(found, Ok(Some(expected)));
        prop_assert_eq!(parity::check_p(&stripe[..k], &stripe[k]), Ok(bad == k + 1));
    }
}

// ---------------------------------------------------------------------
// Layout: hand-checked tables.

const K4: u64 = 4096;

/// The roles of the members of stripes 0.. as "D0 D1 P Q"-style rows.
fn role_rows(layout: &Layout, stripes: u64) -> Vec<String> {
    (0..stripes)
        .map(|s| {
            let stripe = layout.stripe(s).unwrap();
            (0..layout.members())
                .map(|m| match stripe.role_of(m).unwrap() {
                    Role::Data(i) => format!("D{i}"),
                    Role::P => "P".to_string(),
                    Role::Q => "Q".to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn raid5_left_symmetric_over_4() {
    let layout = Layout::new(Geometry::new(Level::Raid5, 4, K4, 8 * K4)).unwrap();
    // md's left-symmetric diagram, array chunks per member:
    //   0  1  2  P
    //   4  5  P  3
    //   8  P  6  7
    //   P  9 10 11
    assert_eq!(
        role_rows(&layout, 4),
        ["D0 D1 D2 P", "D1 D2 P D0", "D2 P D0 D1", "P D0 D1 D2"]
    );
    let chunk_table = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]];
    let members = [[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3]];
    for s in 0..4 {
        for i in 0..3 {
            let c = chunk_table[s][i];
            let piece = layout.map(c * K4 + 5, 1).unwrap().next().unwrap();
            let stripe = s as u64;
            assert_eq!(piece.unit, Unit::Data { stripe, index: i });
            let offset = stripe * K4 + 5;
            let member = members[s][i];
            assert_eq!(piece.locations.first(), Location { member, offset });
        }
    }
    assert_eq!(layout.size(), 3 * 8 * K4);
    let stripe = layout.stripe(1).unwrap();
    assert_eq!(stripe.members().collect::<Vec<_>>(), [3, 0, 1, 2]);
    assert_eq!(stripe.q_member(), None);
    assert_eq!(stripe.chunk_index_of(2), Some(3));
}

#[test]
fn raid6_left_symmetric_over_5() {
    let layout = Layout::new(Geometry::new(Level::Raid6, 5, K4, 10 * K4)).unwrap();
    // P on member 4 − s mod 5, Q on the next member (wrapping), data
    // from the one after Q.
    assert_eq!(
        role_rows(&layout, 6),
        [
            "Q D0 D1 D2 P",
            "D0 D1 D2 P Q",
            "D1 D2 P Q D0",
            "D2 P Q D0 D1",
            "P Q D0 D1 D2",
            "Q D0 D1 D2 P",
        ]
    );
    let stripe = layout.stripe(2).unwrap();
    assert_eq!((stripe.p_member(), stripe.q_member()), (2, Some(3)));
    assert_eq!(stripe.data_member(0), Some(4));
    assert_eq!(stripe.data_member(3), None);
    assert_eq!(stripe.members().collect::<Vec<_>>(), [4, 0, 1, 2, 3]);
    assert_eq!(layout.size(), 3 * 10 * K4);
    assert_eq!(layout.stripe_data_bytes(), Some(3 * K4));
    assert_eq!(layout.row_of(7 * K4), Some(2));
}

/// The (member, row) pairs of array chunk c.
fn copies_of(layout: &Layout, c: u64) -> Vec<(usize, u64)> {
    let piece = layout.map(c * K4, K4).unwrap().next().unwrap();
    piece
        .locations
        .iter()
        .map(|l| (l.member, l.offset / K4))
        .collect()
}

#[test]
fn raid10_near2_over_3_and_4() {
    // 3 members: slots 0 1 2 / 3 4 5 / ... hold chunks 0 0 1 / 1 2 2 / ...
    let layout = Layout::new(Geometry::new(Level::Raid10, 3, K4, 4 * K4)).unwrap();
    assert_eq!(copies_of(&layout, 0), [(0, 0), (1, 0)]);
    assert_eq!(copies_of(&layout, 1), [(2, 0), (0, 1)]);
    assert_eq!(copies_of(&layout, 2), [(1, 1), (2, 1)]);
    assert_eq!(copies_of(&layout, 3), [(0, 2), (1, 2)]);
    // ⌊3·4 / 2⌋ = 6 chunks.
    assert_eq!(layout.size(), 6 * K4);
    // 4 members: two mirrored pairs, striped.
    let layout = Layout::new(Geometry::new(Level::Raid10, 4, K4, 4 * K4)).unwrap();
    assert_eq!(copies_of(&layout, 0), [(0, 0), (1, 0)]);
    assert_eq!(copies_of(&layout, 1), [(2, 0), (3, 0)]);
    assert_eq!(copies_of(&layout, 2), [(0, 1), (1, 1)]);
    assert_eq!(copies_of(&layout, 3), [(2, 1), (3, 1)]);
    assert_eq!(layout.size(), 8 * K4);
    // 3 members, 3 copies: a 3-way mirror, striped.
    let layout = Layout::new(Geometry::new(Level::Raid10, 3, K4, 5 * K4).with_copies(3)).unwrap();
    assert_eq!(copies_of(&layout, 1), [(0, 1), (1, 1), (2, 1)]);
    assert_eq!(layout.size(), 5 * K4);
}

#[test]
fn raid0_and_raid1() {
    let layout = Layout::new(Geometry::new(Level::Raid0, 3, K4, 2 * K4 + 100)).unwrap();
    assert_eq!(layout.size(), 6 * K4);
    assert_eq!(layout.member_data_size(), 2 * K4);
    assert_eq!(copies_of(&layout, 4), [(1, 1)]);
    let layout = Layout::new(Geometry::new(Level::Raid1, 3, 0, 1000)).unwrap();
    let pieces: Vec<_> = layout.map(10, 990).unwrap().collect();
    assert_eq!(pieces.len(), 1);
    let locations: Vec<_> = pieces[0].locations.iter().collect();
    assert_eq!(
        locations,
        (0..3)
            .map(|member| Location { member, offset: 10 })
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------
// Layout: properties over random geometries.

/// md's formulas restated, one array byte at a time.
fn ref_locate(g: &Geometry, offset: u64) -> Vec<Location> {
    let n = g.members as u64;
    let c = offset / g.chunk.max(1);
    let within = offset % g.chunk.max(1);
    let at = |member: u64, row: u64| Location {
        member: member as usize,
        offset: row * g.chunk + within,
    };
    match g.level {
        Level::Raid0 => vec![at(c % n, c / n)],
        Level::Raid1 => (0..g.members)
            .map(|member| Location { member, offset })
            .collect(),
        Level::Raid5 | Level::Raid6 => {
            let parity = if g.level == Level::Raid5 { 1 } else { 2 };
            let k = n - parity;
            let (s, i) = (c / k, c % k);
            let pd = (n - 1) - s % n;
            vec![at((pd + parity + i) % n, s)]
        }
        Level::Raid10 => (0..g.copies as u64)
            .map(|j| {
                let slot = c * g.copies as u64 + j;
                at(slot % n, slot / n)
            })
            .collect(),
    }
}

/// Random valid geometries: 2..=8 members within each level's minimum,
/// chunks 4 KiB..256 KiB, 1..=5 rows plus a partial row that must go
/// unused.
fn geometry(max_chunk_shift: u32, max_rows: u64) -> impl Strategy<Value = Geometry> {
    let level = prop_oneof![
        Just(Level::Raid0),
        Just(Level::Raid1),
        Just(Level::Raid5),
        Just(Level::Raid6),
        Just(Level::Raid10),
    ];
    (level, 12..=max_chunk_shift, 1..=max_rows, 0u64..4096).prop_flat_map(
        |(level, shift, rows, extra)| {
            let chunk = 1u64 << shift;
            let min = level.min_members();
            (min..=8usize).prop_flat_map(move |members| {
                let copies = if level == Level::Raid10 {
                    2..=members.min(4)
                } else {
                    2..=2
                };
                copies.prop_map(move |copies| {
                    Geometry::new(level, members, chunk, rows * chunk + extra).with_copies(copies)
                })
            })
        },
    )
}

/// A geometry and a request inside its array.
fn geometry_and_request() -> impl Strategy<Value = (Layout, u64, u64)> {
    geometry(18, 5).prop_flat_map(|g| {
        let layout = Layout::new(g).unwrap();
        let size = layout.size();
        (0..size).prop_flat_map(move |offset| {
            let most = (size - offset).min(1 << 20);
            (0..=most).prop_map(move |len| (layout, offset, len))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Mapping the whole array (plus the parity chunks) tiles the members:
    /// no member byte holds two things, nothing lies past the data size,
    /// and the copies of a piece are on distinct members.
    #[test]
    fn the_whole_array_tiles_the_members(g in geometry(18, 5)) {
        let layout = Layout::new(g).unwrap();
        let n = layout.members();
        let limit = layout.member_data_size();
        let mut extents: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n];
        for piece in layout.map(0, layout.size()).unwrap() {
            let expected = match g.level {
                Level::Raid1 => n,
                Level::Raid10 => g.copies,
                _ => 1,
            };
            prop_assert_eq!(piece.locations.len(), expected);
            let mut seen = vec![false; n];
            for location in piece.locations {
                prop_assert!(!seen[location.member], "two copies on member {}", location.member);
                seen[location.member] = true;
                extents[location.member].push((location.offset, piece.len));
            }
            if let Unit::Data { stripe, index } = piece.unit {
                let s = layout.stripe(stripe).unwrap();
                let member = piece.locations.first().member;
                prop_assert_eq!(s.data_member(index), Some(member));
                prop_assert_ne!(member, s.p_member());
                prop_assert_ne!(Some(member), s.q_member());
            }
        }
        for s in 0..layout.rows() {
            if let Some(stripe) = layout.stripe(s) {
                extents[stripe.p_member()].push((stripe.member_offset(0), g.chunk));
                if let Some(q) = stripe.q_member() {
                    extents[q].push((stripe.member_offset(0), g.chunk));
                }
            }
        }
        let mut used = 0;
        for (member, mut list) in extents.into_iter().enumerate() {
            list.sort_unstable();
            let mut end = 0;
            for (offset, len) in list {
                prop_assert!(offset >= end, "member {} overlaps at {}", member, offset);
                end = offset + len;
                used += len;
            }
            prop_assert!(end <= limit, "member {} used up to {} > {}", member, end, limit);
        }
        let expected_used = match g.level {
            Level::Raid10 => layout.size() * g.copies as u64,
            _ => n as u64 * limit,
        };
        prop_assert_eq!(used, expected_used);
    }

    /// The pieces of a request cover it exactly, in order, each inside
    /// one chunk and where md's formulas put it.
    #[test]
    fn pieces_cover_requests_in_order((layout, offset, len) in geometry_and_request()) {
        let g = layout.geometry();
        let mut next = 0;
        for piece in layout.map(offset, len).unwrap() {
            prop_assert_eq!(piece.buf_offset, next);
            prop_assert!(piece.len > 0);
            if g.level.is_striped() {
                prop_assert!(piece.in_chunk + piece.len <= g.chunk);
            }
            let first = offset + piece.buf_offset;
            let last = first + piece.len - 1;
            let locations: Vec<_> = piece.locations.iter().collect();
            prop_assert_eq!(&ref_locate(&g, first), &locations);
            let shifted: Vec<_> = locations
                .iter()
                .map(|l| Location { member: l.member, offset: l.offset + piece.len - 1 })
                .collect();
            prop_assert_eq!(ref_locate(&g, last), shifted);
            next += piece.len;
        }
        prop_assert_eq!(next, len);
    }

    /// Stripe spans say the same as pieces, and their summaries agree
    /// with their chunk spans.
    #[test]
    fn stripe_spans_agree_with_pieces((layout, offset, len) in geometry_and_request()) {
        let g = layout.geometry();
        let Ok(spans) = layout.stripes(offset, len) else {
            prop_assert!(g.level.redundancy().is_none());
            return Ok(());
        };
        let mut pieces = layout.map(offset, len).unwrap();
        let mut next = 0;
        for span in spans {
            prop_assert_eq!(span.buf_offset, next);
            let k = span.stripe.data_chunks() as u64;
            prop_assert_eq!(span.is_full(), span.start == 0 && span.len == k * g.chunk);
            let mut parity_bytes = vec![false; g.chunk as usize];
            let touched = span.touched();
            let chunks: Vec<_> = span.chunks().collect();
            prop_assert_eq!(chunks.len(), touched.len());
            for (c, index) in chunks.iter().zip(touched) {
                prop_assert_eq!(c.index, index);
                let piece = pieces.next().unwrap();
                let stripe = span.stripe.number();
                prop_assert_eq!(piece.unit, Unit::Data { stripe, index });
                prop_assert_eq!(
                    (c.in_chunk, c.len, c.buf_offset),
                    (piece.in_chunk, piece.len, piece.buf_offset)
                );
                let at = piece.locations.first();
                prop_assert_eq!((c.member, c.member_offset), (at.member, at.offset));
                for b in c.in_chunk..c.in_chunk + c.len {
                    parity_bytes[b as usize] = true;
                }
            }
            let mut from_ranges = vec![false; g.chunk as usize];
            let mut previous_end = None;
            for range in span.parity_ranges() {
                prop_assert!(previous_end.is_none_or(|end| end < range.start));
                previous_end = Some(range.end);
                for b in range {
                    from_ranges[b as usize] = true;
                }
            }
            prop_assert!(parity_bytes == from_ranges);
            next += span.len;
        }
        prop_assert!(pieces.next().is_none());
        prop_assert_eq!(next, len);
    }
}

// ---------------------------------------------------------------------
// The model array.

/// In-memory members, written and read through a layout.
struct Model {
    layout: Layout,
    members: Vec<Vec<u8>>,
}

impl Model {
    fn new(layout: Layout) -> Self {
        let members = vec![vec![0u8; layout.member_data_size() as usize]; layout.members()];
        Model { layout, members }
    }

    fn range(location: Location, len: u64) -> std::ops::Range<usize> {
        location.offset as usize..(location.offset + len) as usize
    }

    /// Writes `data` at `offset` the way the array will: mirrors to every
    /// copy; parity levels by delta update, or by regenerating P/Q for a
    /// full stripe.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if self.layout.level().redundancy().is_none() {
            for piece in self.layout.map(offset, len).unwrap() {
                for location in piece.locations {
                    let range = Self::range(location, piece.len);
                    self.members[location.member][range].copy_from_slice(&data[piece.buf_range()]);
                }
            }
            return;
        }
        let chunk = self.layout.chunk();
        for span in self.layout.stripes(offset, len).unwrap() {
            let stripe = span.stripe;
            let row = Self::range(
                Location {
                    member: 0,
                    offset: stripe.member_offset(0),
                },
                chunk,
            );
            let p_member = stripe.p_member();
            for c in span.chunks() {
                let at = Location {
                    member: c.member,
                    offset: c.member_offset,
                };
                let new = &data[c.buf_offset as usize..(c.buf_offset + c.len) as usize];
                if !span.is_full() {
                    let old = self.members[c.member][Self::range(at, c.len)].to_vec();
                    let parity_at = Location {
                        member: p_member,
                        offset: c.member_offset,
                    };
                    let mut p = self.members[p_member][Self::range(parity_at, c.len)].to_vec();
                    if let Some(q_member) = stripe.q_member() {
                        let q_at = Location {
                            member: q_member,
                            offset: c.member_offset,
                        };
                        let mut q = self.members[q_member][Self::range(q_at, c.len)].to_vec();
                        parity::update_pq(c.index, &mut p, &mut q, &old, new).unwrap();
                        self.members[q_member][Self::range(q_at, c.len)].copy_from_slice(&q);
                    } else {
                        parity::update_p(&mut p, &old, new).unwrap();
                    }
                    self.members[p_member][Self::range(parity_at, c.len)].copy_from_slice(&p);
                }
                self.members[c.member][Self::range(at, c.len)].copy_from_slice(new);
            }
            if span.is_full() {
                let k = stripe.data_chunks();
                let data: Vec<Vec<u8>> = (0..k)
                    .map(|i| self.members[stripe.data_member(i).unwrap()][row.clone()].to_vec())
                    .collect();
                let (mut p, mut q) = (vec![0; chunk as usize], vec![0; chunk as usize]);
                parity::gen_pq(&data, &mut p, &mut q).unwrap();
                self.members[p_member][row.clone()].copy_from_slice(&p);
                if let Some(q_member) = stripe.q_member() {
                    self.members[q_member][row.clone()].copy_from_slice(&q);
                }
            }
        }
    }

    /// The chunks of stripe `s` in `[D_0, …, P, (Q)]` order.
    fn stripe_chunks(&self, s: u64) -> Vec<Vec<u8>> {
        let stripe = self.layout.stripe(s).unwrap();
        let at = Location {
            member: 0,
            offset: stripe.member_offset(0),
        };
        let row = Self::range(at, self.layout.chunk());
        stripe
            .members()
            .map(|m| self.members[m][row.clone()].to_vec())
            .collect()
    }

    /// The bytes of every member location the layout uses (RAID 10 may
    /// leave a few slots at the end unused), in a fixed order.
    fn used_bytes(&self) -> Vec<u8> {
        let mut used = Vec::new();
        for piece in self.layout.map(0, self.layout.size()).unwrap() {
            for at in piece.locations {
                used.extend_from_slice(&self.members[at.member][Self::range(at, piece.len)]);
            }
        }
        for s in 0..self.layout.rows() {
            if self.layout.stripe(s).is_some() {
                for chunk in self.stripe_chunks(s) {
                    used.extend_from_slice(&chunk);
                }
            }
        }
        used
    }

    /// Rebuilds the `failed` members from the others, as a resync would.
    fn rebuild(&mut self, failed: &[usize]) {
        let level = self.layout.level();
        if let Some(redundancy) = level.redundancy() {
            for s in 0..self.layout.rows() {
                let stripe = self.layout.stripe(s).unwrap();
                let mut chunks = self.stripe_chunks(s);
                let missing: Vec<usize> = failed
                    .iter()
                    .map(|&m| stripe.chunk_index_of(m).unwrap())
                    .collect();
                parity::reconstruct(redundancy, &mut chunks, &missing).unwrap();
                let row = Self::range(
                    Location {
                        member: 0,
                        offset: stripe.member_offset(0),
                    },
                    self.layout.chunk(),
                );
                for (member, chunk) in stripe.members().zip(chunks) {
                    self.members[member][row.clone()].copy_from_slice(&chunk);
                }
            }
            return;
        }
        for piece in self.layout.map(0, self.layout.size()).unwrap() {
            let source = piece
                .locations
                .iter()
                .find(|l| !failed.contains(&l.member))
                .unwrap();
            let bytes = self.members[source.member][Self::range(source, piece.len)].to_vec();
            for location in piece
                .locations
                .iter()
                .filter(|l| failed.contains(&l.member))
            {
                self.members[location.member][Self::range(location, piece.len)]
                    .copy_from_slice(&bytes);
            }
        }
    }

    /// Reads the whole array, reconstructing what lies on `failed`
    /// members from what survives.
    fn read_all(&self, failed: &[usize]) -> Vec<u8> {
        let size = self.layout.size();
        let mut out = vec![0u8; size as usize];
        for piece in self.layout.map(0, size).unwrap() {
            let dst = &mut out[piece.buf_range()];
            if let Some(at) = piece.locations.iter().find(|l| !failed.contains(&l.member)) {
                dst.copy_from_slice(&self.members[at.member][Self::range(at, piece.len)]);
                continue;
            }
            let Unit::Data { stripe, index } = piece.unit else {
                panic!("no surviving copy of {piece:?}");
            };
            let s = self.layout.stripe(stripe).unwrap();
            let mut chunks = self.stripe_chunks(stripe);
            let missing: Vec<usize> = failed
                .iter()
                .map(|&m| s.chunk_index_of(m).unwrap())
                .collect();
            let redundancy = self.layout.level().redundancy().unwrap();
            parity::reconstruct(redundancy, &mut chunks, &missing).unwrap();
            let within = piece.in_chunk as usize..(piece.in_chunk + piece.len) as usize;
            dst.copy_from_slice(&chunks[index][within]);
        }
        out
    }
}

/// Picks a set of members whose loss the layout survives, from `pick`.
fn tolerated_failures(layout: &Layout, pick: u64) -> Vec<usize> {
    let n = layout.members();
    let a = (pick % n as u64) as usize;
    let b = ((pick / n as u64) % n as u64) as usize;
    match layout.level() {
        Level::Raid0 => vec![],
        Level::Raid5 => vec![a],
        Level::Raid6 if a == b => vec![a],
        Level::Raid6 => vec![a, b],
        Level::Raid1 => (0..n).filter(|&m| m != a).collect(),
        Level::Raid10 => {
            // A random subset, then members given back until every chunk
            // keeps a copy.
            let mut failed: Vec<usize> = (0..n).filter(|&m| (pick >> (m + 16)) & 1 == 1).collect();
            for piece in layout.map(0, layout.size()).unwrap() {
                if piece.locations.iter().all(|l| failed.contains(&l.member)) {
                    let first = piece.locations.first().member;
                    failed.retain(|&m| m != first);
                }
            }
            failed
        }
    }
}

/// Random writes inside the array: (fraction of the size, length, seed).
fn writes() -> impl Strategy<Value = Vec<(f64, usize, u8)>> {
    proptest::collection::vec((0.0..1.0f64, 1usize..40_000, any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn model_array_survives_tolerated_failures(
        g in geometry(14, 3),
        writes in writes(),
        full_writes in any::<bool>(),
        pick in any::<u64>(),
    ) {
        let layout = Layout::new(g).unwrap();
        let size = layout.size();
        let mut model = Model::new(layout);
        let mut expected = vec![0u8; size as usize];
        for (fraction, len, seed) in writes {
            let (offset, len) = if full_writes {
                // Whole stripes (or whole arrays of other levels).
                let row = layout.stripe_data_bytes().unwrap_or(size).min(size);
                let rows = size / row;
                let first = ((fraction * rows as f64) as u64).min(rows - 1);
                (first * row, row.min(size - first * row))
            } else {
                let offset = ((fraction * size as f64) as u64).min(size - 1);
                (offset, (len as u64).min(size - offset))
            };
            let data: Vec<u8> = (0..len)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            model.write(offset, &data);
            expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        }
        prop_assert!(model.read_all(&[]) == expected);
        if let Some(redundancy) = layout.level().redundancy() {
            for s in 0..layout.rows() {
                let chunks = model.stripe_chunks(s);
                let k = chunks.len() - redundancy.parity_chunks();
                prop_assert!(parity::check_p(&chunks[..k], &chunks[k]).unwrap());
                if redundancy == Redundancy::PQ {
                    let found = parity::locate_single_error(&chunks[..k], &chunks[k], &chunks[k + 1]);
                    prop_assert_eq!(found, Ok(Some(Located::Consistent)));
                }
            }
        }

        let failed = tolerated_failures(&layout, pick);
        let pristine = model.members.clone();
        for &m in &failed {
            model.members[m].fill(0xa5);
        }
        prop_assert!(model.read_all(&failed) == expected, "read back with {:?} failed", failed);
        model.rebuild(&failed);
        prop_assert!(model.used_bytes() == Model { layout, members: pristine }.used_bytes(),
            "rebuild of {:?} differs", failed);
    }
}
