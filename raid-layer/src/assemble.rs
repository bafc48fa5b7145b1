//! Assembly: from a spec (configured member URIs in slot order) to a
//! running [`Array`], by reading every member's superblocks.
//!
//! - No member holds this array (the uuid the state store recorded, or
//!   else a superblock under this array's name): the array is
//!   **created**, over blank members only (members holding another array
//!   or damaged superblocks are refused unless `overwrite`, never
//!   assembled under this name): geometry from the smallest
//!   member (and said so when they differ), new uuids, a zeroed bitmap and
//!   clean when every member's data area reads as zeroes (block status),
//!   else a full bitmap and a resync in the background; superblocks last.
//! - Otherwise it is **assembled**: the authoritative superblock is the
//!   newest of the array's members ([`crate::meta::assess`]); a current
//!   member serves; a stale one (failed earlier, or behind) is kept out
//!   and recorded faulty, to be re-added; a foreign member, one in the
//!   wrong role, a corrupt or unreachable one is left out with a message
//!   naming it, what it holds and what was expected. The array starts
//!   degraded if its level allows, else not at all (refused before
//!   anything is written to its members).
//! - A dirty array (not marked clean: a crash) resyncs the regions its
//!   bitmap marks, in the background, while it serves. A RAID 5/6 array
//!   that is both dirty and degraded is refused unless forced (parity of
//!   stripes written at the crash may be wrong, and a missing member's data
//!   would be reconstructed from it: the write hole), unless the run that
//!   left it dirty logged its writes: then the partial-parity log is
//!   replayed first ([`crate::array::log`]) and it starts.

use std::sync::Arc;

use bytes::Bytes;
use nbdraid_client::{Client, IoBuf};
use nbdraid_engine::buffer::BufferPool;
use nbdraid_engine::cost::SharedCostModel;
use nbdraid_proto::ByteSize;
use nbdraid_proto::consts::allocation;
use uuid::Uuid;

use crate::api::{AdminError, ArraySpec};
use crate::array::Array;
use crate::array::meta::{ArrayMeta, PersistError};
use crate::layout::{Geometry, Layout, Level};
use crate::manager::ManagerSettings;
use crate::member::{Member, MemberState, member_client_config};
use crate::meta::{
    BITMAP_OFFSET, BITMAP_PAGE_SIZE, Bitmap, DEFAULT_DATA_OFFSET, Found, MemberStatus, SB_B_OFFSET,
    SB_SLOT_SIZE, SbRead, Slot, Superblock, assess, geometry_for, read_copies, superblock,
};

/// What assembly found besides the array: messages for operators.
#[derive(Debug, Default)]
pub struct Notes {
    /// One line per member left out or kept out, and other warnings.
    pub warnings: Vec<String>,
    /// The array was created now (not assembled).
    pub created: bool,
    /// Regions to resync (dirty at assembly, or a new array over non-blank members).
    pub resync_regions: u64,
    /// What replaying the partial-parity log did, if it was replayed.
    pub log_replayed: Option<crate::array::log::ReplayReport>,
}

/// One configured member as found.
struct Probe {
    client: Option<Arc<Client>>,
    read: Option<SbRead>,
    error: Option<String>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Connects to every member and reads its superblock slots.
async fn probe(spec: &ArraySpec, settings: &ManagerSettings) -> Vec<Probe> {
    let probes = spec.members.iter().map(|uri| async move {
        let config = member_client_config(settings.member_connections, settings.liveness_timeout);
        let client = match Client::connect_uri(uri, config).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                return Probe {
                    client: None,
                    read: None,
                    error: Some(format!("unreachable: {e}")),
                };
            }
        };
        let area = 2 * SB_SLOT_SIZE;
        if client.info().size < area {
            return Probe {
                client: Some(client),
                read: Some(SbRead::Blank),
                error: None,
            };
        }
        match client.read(0, IoBuf::zeroed(area as usize)).await {
            Ok(buf) => {
                let (a, b) = buf.split_at(SB_SLOT_SIZE as usize);
                Probe {
                    read: Some(read_copies(a, b)),
                    client: Some(client),
                    error: None,
                }
            }
            Err(e) => Probe {
                client: None,
                read: None,
                error: Some(format!("cannot read its superblocks: {e}")),
            },
        }
    });
    futures::future::join_all(probes).await
}

/// Creates or assembles the array of `spec`. `expected` is the uuid the
/// daemon's state store recorded for it, if any.
pub async fn assemble(
    spec: &ArraySpec,
    expected: Option<Uuid>,
    settings: &ManagerSettings,
    pool: Arc<BufferPool>,
    model: SharedCostModel,
) -> Result<(Array, Notes), AdminError> {
    let name = &spec.name;
    let probes = probe(spec, settings).await;
    fn valid(p: &Probe) -> Option<&Superblock> {
        match &p.read {
            Some(SbRead::Valid { sb, .. }) => Some(sb),
            _ => None,
        }
    }
    // This array is the one the state store recorded or, for an array it
    // does not know (a `create`, or a configured array met for the first
    // time), the one its members' superblocks record under this name: a
    // member holding another array is foreign to it, and `create` over
    // such members refuses them unless told to overwrite.
    let this_array = expected.or_else(|| {
        probes
            .iter()
            .filter_map(valid)
            .filter(|sb| sb.array_name == *name)
            .max_by_key(|sb| sb.events)
            .map(|sb| sb.array_uuid)
    });
    let any_valid = probes.iter().any(|p| valid(p).is_some());
    if !any_valid || (expected.is_none() && (spec.overwrite || this_array.is_none())) {
        return create(spec, probes, settings, pool, model).await;
    }
    // Assemble from the members' superblocks.
    let sbs: Vec<Option<&Superblock>> = probes
        .iter()
        .map(|p| match &p.read {
            Some(SbRead::Valid { sb, .. }) => Some(&**sb),
            _ => None,
        })
        .collect();
    let found: Vec<Found<'_>> = spec
        .members
        .iter()
        .zip(&sbs)
        .map(|(uri, sb)| Found { uri, sb: *sb })
        .collect();
    let assessment = assess(&found, this_array);
    let Some(auth) = assessment.superblock.clone() else {
        let lines: Vec<String> = assessment.members.iter().map(|r| r.to_string()).collect();
        return Err(AdminError::Refused(format!(
            "array {name:?}: no member holds it: {}",
            lines.join("; ")
        )));
    };
    check_matches_spec(spec, &auth)?;
    let mut notes = Notes::default();
    let mut members = Vec::with_capacity(spec.members.len());
    let mut slots = Vec::with_capacity(spec.members.len());
    let mut clean = auth.clean;
    let mut newly_lost = Vec::new();
    for ((slot, probe), report) in probes.into_iter().enumerate().zip(&assessment.members) {
        let uri = &spec.members[slot];
        let recorded_faulty = matches!(
            auth.roles.get(slot).map(|r| r.state),
            Some(superblock::MemberState::Faulty { .. })
        );
        let mut recovered = 0;
        let (state, keep) = match (&probe.error, &probe.read, &report.status) {
            (Some(e), _, _) => {
                notes.warnings.push(format!("member {slot} ({uri}): {e}"));
                (MemberState::Missing, false)
            }
            (_, Some(SbRead::Corrupt { reason }), _) => {
                notes.warnings.push(format!(
                    "member {slot} ({uri}): its superblocks are damaged ({reason}); left out"
                ));
                (MemberState::Missing, false)
            }
            (_, Some(SbRead::Unsupported { error, .. }), _) => {
                notes
                    .warnings
                    .push(format!("member {slot} ({uri}): {error}; left out"));
                (MemberState::Missing, false)
            }
            (_, _, MemberStatus::Current { .. }) => {
                if let Some(SbRead::Valid { sb, .. }) = &probe.read {
                    clean &= sb.clean;
                }
                (MemberState::Active, true)
            }
            (_, _, MemberStatus::Recovering { done }) => {
                recovered = *done;
                (MemberState::Recovering, true)
            }
            (_, _, MemberStatus::Stale { .. }) => {
                notes.warnings.push(report.to_string());
                (MemberState::Faulty, true)
            }
            _ => {
                notes.warnings.push(format!("{report}; left out"));
                (MemberState::Missing, false)
            }
        };
        if !matches!(state, MemberState::Active | MemberState::Recovering) && !recorded_faulty {
            newly_lost.push(slot);
        }
        slots.push(probe.read.as_ref().and_then(SbRead::slot));
        let client = if keep { probe.client } else { None };
        let member = Member::new(slot, uri, auth.data_offset, client, state);
        member.set_recovered(recovered);
        members.push(member);
    }
    for w in &notes.warnings {
        tracing::warn!(array = %name, "{w}");
    }
    let level = auth.level;
    let geometry = auth.geometry();
    let layout = Layout::new(geometry)
        .map_err(|e| AdminError::Invalid(format!("array {name:?}: superblock geometry: {e}")))?;
    let bitmap_geometry = auth.bitmap.ok_or_else(|| {
        AdminError::Invalid(format!("array {name:?}: the superblock records no bitmap"))
    })?;
    let bitmap: Bitmap<PersistError> = Bitmap::new(bitmap_geometry)
        .map_err(|e| AdminError::Invalid(format!("array {name:?}: {e}")))?;
    // The union of the in-sync members' bitmaps.
    for m in members.iter().filter(|m| m.readable()) {
        let len = (bitmap_geometry.pages() * BITMAP_PAGE_SIZE) as usize;
        match m.read_raw(BITMAP_OFFSET, IoBuf::zeroed(len)).await {
            Ok(bytes) => {
                if let Err(e) = bitmap.load(&bytes) {
                    tracing::warn!(array = %name, member = m.slot, error = %e, "bitmap unreadable");
                }
            }
            Err((e, _)) => {
                tracing::warn!(array = %name, member = m.slot, error = %e, "cannot read the bitmap")
            }
        }
    }
    // Dirty and degraded: stripes written at the crash may have torn
    // parity, and where a member is out of sync its data would be rebuilt
    // from it (the RAID 5/6 write hole). Only dirty regions where some
    // member is out of sync are at risk: below a rebuild's frontier every
    // member is in sync, so a crash during a rebuild with no write beyond
    // the frontier starts without being forced.
    let in_sync_below = crate::member::in_sync_below(&members);
    let region = bitmap_geometry.region.max(1);
    let at_risk: Vec<u64> = if clean {
        Vec::new()
    } else {
        bitmap
            .dirty_regions()
            .filter(|r| r.saturating_add(1).saturating_mul(region) > in_sync_below)
            .collect()
    };
    let parity_level = matches!(level, Level::Raid5 | Level::Raid6);
    // The previous run logged its writes: replaying the log (below, before
    // the array serves) makes parity agree with what the members hold.
    let replay = parity_level && !clean && auth.write_log;
    if !at_risk.is_empty() && parity_level && !spec.force && !replay {
        return Err(AdminError::Refused(format!(
            "array {name:?} ({level}) is dirty (it was not shut down cleanly) and degraded (members {:?} are not in sync \
             in {} of its dirty regions): parity of stripes being written at the crash may be wrong, and a missing \
             member's data would be rebuilt from it (the RAID 5/6 write hole). Bring the missing members back, or \
             start it with --force-assemble {name} to accept that risk",
            members
                .iter()
                .filter(|m| !m.readable())
                .map(|m| m.slot)
                .collect::<Vec<_>>(),
            at_risk.len()
        )));
    }
    if !clean {
        notes.resync_regions = bitmap.resync_dirty();
        tracing::warn!(
            array = %name,
            regions = notes.resync_regions,
            "the array was not shut down cleanly: resyncing its dirty regions in the background"
        );
    }
    let (uuid, data_offset) = (auth.array_uuid, auth.data_offset);
    let meta = ArrayMeta::persistent(auth, slots, bitmap);
    let array = Array::new(
        settings.array_params(name),
        layout,
        members,
        pool,
        meta.clone(),
        model,
    );
    // Refused before anything is written: recording the members left out
    // as failed would make a fixable mistake (members swapped in the
    // configuration, a node down) permanent.
    if array.inner().is_failed() {
        let out: Vec<usize> = array
            .inner()
            .members
            .iter()
            .filter(|m| !m.writable())
            .map(|m| m.slot)
            .collect();
        return Err(AdminError::Refused(format!(
            "array {name:?} ({level}) cannot start: members {out:?} are out, more than {level} tolerates; \
             nothing was written to its members: {}",
            notes.warnings.join("; ")
        )));
    }
    for slot in newly_lost {
        meta.record_failure(array.inner(), slot, "not in sync at assembly")
            .await;
    }
    if parity_level {
        let inner = array.inner();
        if replay {
            let report = inner.replay_log(uuid, data_offset).await.map_err(|e| {
                AdminError::Unavailable(format!(
                    "array {name:?}: cannot replay its partial-parity log: {e}"
                ))
            })?;
            tracing::warn!(
                array = %name,
                entries = report.entries,
                partial = report.partial,
                recomputed = report.recomputed,
                skipped = report.skipped,
                "partial-parity log replayed"
            );
            notes.log_replayed = Some(report);
        }
        for slot in 0..inner.members.len() {
            if inner.members[slot].writable()
                && let Err(e) = inner.clear_member_log(slot, data_offset).await
            {
                inner.handle(&e).await;
            }
        }
        if inner.is_failed() {
            return Err(AdminError::Unavailable(format!(
                "array {name:?}: too many members failed while it was assembled"
            )));
        }
        meta.record_logging(inner).await.map_err(|e| {
            AdminError::Unavailable(format!(
                "array {name:?}: cannot record whether it logs: {e}"
            ))
        })?;
    }
    Ok((array, notes))
}

/// Refuses a configured spec that contradicts the members' superblock.
fn check_matches_spec(spec: &ArraySpec, sb: &Superblock) -> Result<(), AdminError> {
    let name = &spec.name;
    let mut diffs = Vec::new();
    if sb.level != spec.level {
        diffs.push(format!("level {} (configured {})", sb.level, spec.level));
    }
    if sb.members != spec.members.len() {
        diffs.push(format!(
            "{} members (configured {})",
            sb.members,
            spec.members.len()
        ));
    }
    if spec.level.is_striped() && sb.chunk_size != spec.chunk {
        diffs.push(format!(
            "chunk {} (configured {})",
            ByteSize(sb.chunk_size),
            ByteSize(spec.chunk)
        ));
    }
    if spec.level == Level::Raid10 && sb.copies != spec.copies {
        diffs.push(format!("{} copies (configured {})", sb.copies, spec.copies));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "array {name:?}: its members' superblocks say {}; change the configuration to match (the members are authoritative)",
            diffs.join(", ")
        )))
    }
}

/// Reports whether `member`'s data area reads as zeroes (block status).
async fn reads_as_zeroes(member: &Member, len: u64) -> bool {
    if !member.has_block_status() {
        return false;
    }
    let mut at = 0;
    let mut calls = 0;
    while at < len {
        calls += 1;
        if calls > 64 {
            return false;
        }
        let ask = (len - at).min(1 << 30);
        let Ok(extents) = member.block_status(at, ask).await else {
            return false;
        };
        if extents.is_empty() {
            return false;
        }
        for e in extents {
            if e.flags & allocation::ZERO == 0 {
                return false;
            }
            at = e.offset + e.len;
        }
    }
    true
}

/// Creates a new array over blank members.
async fn create(
    spec: &ArraySpec,
    probes: Vec<Probe>,
    settings: &ManagerSettings,
    pool: Arc<BufferPool>,
    model: SharedCostModel,
) -> Result<(Array, Notes), AdminError> {
    let name = &spec.name;
    let mut notes = Notes {
        created: true,
        ..Notes::default()
    };
    let mut clients = Vec::with_capacity(probes.len());
    for (slot, p) in probes.into_iter().enumerate() {
        let uri = &spec.members[slot];
        if let Some(e) = p.error {
            return Err(AdminError::Unavailable(format!(
                "cannot create array {name:?}: member {slot} ({uri}) is {e}"
            )));
        }
        match p.read {
            Some(SbRead::Valid { sb, .. }) if !spec.overwrite => {
                return Err(AdminError::Refused(format!(
                    "cannot create array {name:?}: member {slot} ({uri}) belongs to array {:?} ({}); \
                     use overwrite to take it anyway",
                    sb.array_name, sb.array_uuid
                )));
            }
            Some(SbRead::Corrupt { reason }) if !spec.overwrite => {
                return Err(AdminError::Refused(format!(
                    "cannot create array {name:?}: member {slot} ({uri}) holds damaged nbdraid superblocks ({reason}); \
                     use overwrite to take it anyway"
                )));
            }
            Some(SbRead::Unsupported { error, .. }) => {
                return Err(AdminError::Refused(format!(
                    "cannot create array {name:?}: member {slot} ({uri}): {error}"
                )));
            }
            _ => {}
        }
        let Some(client) = p.client else {
            return Err(AdminError::Unavailable(format!(
                "cannot create array {name:?}: member {slot} ({uri}) is not connected"
            )));
        };
        clients.push(client);
    }
    // Metadata is written in 4 KiB pages and chunks must not share a
    // member block: a member insisting on larger blocks cannot be used.
    let largest_block = 4096.min(if spec.level.is_striped() {
        spec.chunk
    } else {
        4096
    });
    for (slot, c) in clients.iter().enumerate() {
        let min = u64::from(c.info().min_block);
        if min > largest_block {
            return Err(AdminError::Invalid(format!(
                "cannot create array {name:?}: member {slot} ({}) requires {min}-byte blocks; \
                 the array needs members that accept {largest_block}-byte blocks",
                spec.members[slot]
            )));
        }
    }
    let data_offset = DEFAULT_DATA_OFFSET;
    let sizes: Vec<u64> = clients.iter().map(|c| c.info().size).collect();
    let smallest = sizes.iter().copied().min().unwrap_or(0);
    if smallest <= data_offset {
        return Err(AdminError::Invalid(format!(
            "cannot create array {name:?}: member volumes must be larger than {} (the metadata area); the smallest is {}",
            ByteSize(data_offset),
            ByteSize(smallest)
        )));
    }
    if sizes.iter().any(|&s| s != smallest) {
        let w = format!(
            "array {name:?}: members differ in size ({}); every member uses {}, the smallest",
            sizes
                .iter()
                .map(|s| ByteSize(*s).to_string())
                .collect::<Vec<_>>()
                .join(", "),
            ByteSize(smallest)
        );
        tracing::warn!("{w}");
        notes.warnings.push(w);
    }
    let member_data_size = smallest - data_offset;
    let geometry = Geometry::new(spec.level, spec.members.len(), spec.chunk, member_data_size)
        .with_copies(spec.copies);
    let layout =
        Layout::new(geometry).map_err(|e| AdminError::Invalid(format!("array {name:?}: {e}")))?;
    let bitmap_geometry = geometry_for(member_data_size, spec.bitmap_region)
        .map_err(|e| AdminError::Invalid(format!("array {name:?}: {e}")))?;
    let member_ids: Vec<(Uuid, String)> = spec
        .members
        .iter()
        .map(|u| (Uuid::new_v4(), u.clone()))
        .collect();
    let mut sb = Superblock::new(
        Uuid::new_v4(),
        name,
        geometry,
        data_offset,
        Some(bitmap_geometry),
        &member_ids,
        now_unix(),
    )
    .map_err(|e| AdminError::Invalid(format!("array {name:?}: {e}")))?;
    let members: Vec<Arc<Member>> = clients
        .into_iter()
        .enumerate()
        .map(|(slot, c)| {
            Member::new(
                slot,
                &spec.members[slot],
                data_offset,
                Some(c),
                MemberState::Active,
            )
        })
        .collect();
    // Blank members need no initial sync when their data reads as zeroes:
    // zero data has zero parity and identical copies.
    let mut zero = true;
    if spec.level != Level::Raid0 {
        for m in &members {
            if !reads_as_zeroes(m, member_data_size).await {
                zero = false;
                break;
            }
        }
    }
    let bitmap: Bitmap<PersistError> = Bitmap::new(bitmap_geometry)
        .map_err(|e| AdminError::Invalid(format!("array {name:?}: {e}")))?;
    if !zero {
        bitmap.mark_all();
        notes.resync_regions = bitmap.resync_dirty();
        tracing::info!(array = %name, "members hold data: the new array is synced in the background");
    }
    sb.clean = zero;
    // The bitmap first, the superblocks last: until they are written the
    // members are still blank. Slot B is zeroed (a previous array's copy
    // there could otherwise outrank the new copy A).
    for m in &members {
        m.write_raw(
            SB_B_OFFSET,
            Bytes::from(vec![0u8; SB_SLOT_SIZE as usize]),
            false,
        )
        .await
        .map_err(|e| AdminError::Unavailable(format!("cannot create array {name:?}: {e}")))?;
        for page in 0..bitmap_geometry.pages() {
            let bytes = Bytes::from(bitmap.page_bytes(page));
            m.write_raw(BITMAP_OFFSET + page * BITMAP_PAGE_SIZE, bytes, false)
                .await
                .map_err(|e| {
                    AdminError::Unavailable(format!("cannot create array {name:?}: {e}"))
                })?;
        }
    }
    let slots: Vec<Option<Slot>> = vec![None; members.len()];
    let meta = ArrayMeta::persistent(sb, slots, bitmap);
    let array = Array::new(
        settings.array_params(name),
        layout,
        members,
        pool,
        meta.clone(),
        model,
    );
    meta.commit(array.inner())
        .await
        .map_err(|e| AdminError::Unavailable(format!("cannot create array {name:?}: {e}")))?;
    tracing::info!(
        array = %name,
        level = %spec.level,
        members = spec.members.len(),
        size = array.inner().layout.size(),
        clean = zero,
        "array created"
    );
    Ok((array, notes))
}
