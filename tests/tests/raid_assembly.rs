//! Assembly of arrays from their members' superblocks, end to end: real
//! nodes serving the member volumes, the real array daemon, data through
//! the real NBD client, and the members' metadata read (and damaged)
//! straight in the nodes' volume files.
//!
//! - A stale member (its node killed, the array written, node and array
//!   daemon restarted) is never served as current: the array reads the
//!   newest data everywhere, re-adds and resyncs it, and afterwards the
//!   array reads right with another member gone.
//! - A re-add after a transient failure copies only the bitmap's dirty
//!   regions (the bytes copied are printed against the member size).
//! - A foreign member (another array's superblock) and members swapped in
//!   the configuration are refused with messages naming them; `create`
//!   takes a foreign member only with `--overwrite`.
//! - A torn superblock copy is survived and repaired by the next update;
//!   a member whose both copies are damaged is left out.
//! - `nbdraid-array --check-config` refuses bad configurations, naming
//!   the array and the rule.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nbdraid_client::{Client, ClientConfig};
use nbdraid_proto::grpc::{self, fault_client::FaultClient};
use nbdraid_tests::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Where array data starts on every member (the metadata area before it).
const DATA_OFFSET: u64 = 4 * MIB;

/// The size of one superblock slot; copy A at 0, copy B right after.
const SB_SLOT: u64 = 32 * KIB;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An array's export through the real NBD client.
struct Export {
    // Dropped before the runtime it runs on.
    client: Client,
    rt: tokio::runtime::Runtime,
    uri: String,
}

impl Export {
    fn connect(uri: &str) -> Export {
        let rt = runtime();
        let client = rt
            .block_on(Client::connect_uri(uri, ClientConfig::default()))
            .unwrap_or_else(|e| panic!("connect to {uri}: {e}"));
        Export {
            client,
            rt,
            uri: uri.to_string(),
        }
    }

    fn size(&self) -> u64 {
        self.client.info().size
    }

    /// Writes `data` at `offset`, in 1 MiB requests.
    fn write(&self, offset: u64, data: &[u8]) {
        self.rt.block_on(async {
            for (i, piece) in data.chunks(MIB as usize).enumerate() {
                let at = offset + i as u64 * MIB;
                self.client
                    .write(at, piece.to_vec(), false)
                    .await
                    .unwrap_or_else(|e| panic!("write {} at {at}: {e}", self.uri));
            }
            self.client
                .flush()
                .await
                .unwrap_or_else(|e| panic!("flush {}: {e}", self.uri));
        })
    }

    /// Reads `len` bytes at `offset`, in 1 MiB requests.
    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(len as usize);
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(MIB);
                let piece = self
                    .client
                    .read_at(at, n as usize)
                    .await
                    .unwrap_or_else(|e| panic!("read {} at {at}: {e}", self.uri));
                out.extend_from_slice(&piece);
                at += n;
            }
            out
        })
    }
}

/// Sets the storage bandwidth of `volume` on `node` (0: unlimited)
/// through the node's fault-injection service.
fn set_bandwidth(node: &Node, volume: &str, bandwidth: u64) {
    let addr: SocketAddr = node.grpc_addr().expect("the cluster's nodes serve gRPC");
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect to the node");
        FaultClient::new(channel)
            .set_fault(grpc::SetFaultRequest {
                volume: volume.into(),
                bandwidth,
                ..Default::default()
            })
            .await
            .expect("set fault");
    });
}

/// Polls `f` every 200 ms until it returns `Some`; panics with `what`,
/// the last value seen and the daemon's log after `timeout` (a hang
/// detector, not a performance assertion).
fn poll<T>(
    what: &str,
    array: &ArrayDaemon,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!(
                "hang detector: no {what} within {timeout:?}; last seen: {last}\n{}",
                array.log_tail(40)
            ),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits until `pred` holds for the array's status and returns it.
fn wait_status(
    array: &ArrayDaemon,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    poll(what, array, hang(120), || {
        let s = array.status(name);
        if pred(&s) { Ok(s) } else { Err(s.to_string()) }
    })
}

fn member_state(status: &Value, slot: usize) -> String {
    status["members"][slot]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no member {slot} in {status}"))
        .to_string()
}

/// The `key=value` fields of the daemon's last log line containing `msg`
/// and every one of `with` (e.g. `member=0`).
fn log_fields(log: &str, msg: &str, with: &[&str]) -> Option<Vec<(String, String)>> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(msg) && with.iter().all(|w| l.split_whitespace().any(|t| t == *w)))?;
    Some(
        line.split_whitespace()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn field_u64(fields: &[(String, String)], key: &str) -> u64 {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {fields:?}"))
}

// ---------------------------------------------------------------------------
// Member metadata, read and damaged in the nodes' volume files.

/// The file holding volume `name` on `node`.
fn volume_file(node: &Node, name: &str) -> PathBuf {
    node.data_dir().join("volumes").join(format!("{name}.img"))
}

fn read_file_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
    f.sync_all().ok();
}

/// CRC-32C (Castagnoli), bitwise: the superblock checksum, computed here
/// independently of the array's code.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One superblock copy as found in its slot.
#[derive(Debug, Clone)]
enum Copy {
    /// No nbdraid magic.
    Absent,
    /// The magic, but a bad length or checksum: torn or corrupted.
    Damaged,
    /// A checksummed copy (its JSON body).
    Valid(Value),
}

impl Copy {
    fn body(&self) -> Option<&Value> {
        match self {
            Copy::Valid(v) => Some(v),
            _ => None,
        }
    }

    fn events(&self) -> Option<u64> {
        self.body().and_then(|b| b["events"].as_u64())
    }
}

/// Decodes one slot (framing: magic, version, length, crc32c over
/// version, length and body; then the JSON body).
fn decode_slot(slot: &[u8]) -> Copy {
    if &slot[..8] != b"NBDRAIDS" {
        return Copy::Absent;
    }
    let le32 = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    let len = le32(12) as usize;
    let Some(body) = slot.get(20..20 + len) else {
        return Copy::Damaged;
    };
    let mut covered = slot[8..16].to_vec();
    covered.extend_from_slice(body);
    if crc32c(&covered) != le32(16) {
        return Copy::Damaged;
    }
    serde_json::from_slice(body).map_or(Copy::Damaged, Copy::Valid)
}

/// Both superblock copies (A, B) of a member volume file.
fn copies(path: &Path) -> [Copy; 2] {
    let area = read_file_at(path, 0, 2 * SB_SLOT);
    let (a, b) = area.split_at(SB_SLOT as usize);
    [decode_slot(a), decode_slot(b)]
}

/// Returns the slot index (0 = A, 1 = B) of the newest valid copy.
fn newest_slot(path: &Path) -> usize {
    let c = copies(path);
    match (c[0].events(), c[1].events()) {
        (Some(a), Some(b)) if b > a => 1,
        (Some(_), _) => 0,
        (None, Some(_)) => 1,
        (None, None) => panic!("no valid superblock copy in {}: {c:?}", path.display()),
    }
}

/// Returns the newest valid copy's body.
fn newest(path: &Path) -> Value {
    copies(path)[newest_slot(path)]
        .body()
        .cloned()
        .expect("a valid copy")
}

/// Damages the copy in `slot` as a torn write would: the header (magic,
/// length, checksum) stays, part of the body is garbage.
fn tear(path: &Path, slot: usize) {
    let start = slot as u64 * SB_SLOT;
    let header = read_file_at(path, start, 20);
    assert_eq!(
        &header[..8],
        b"NBDRAIDS",
        "slot {slot} of {}",
        path.display()
    );
    let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as u64;
    write_file_at(
        path,
        start + 20 + len / 2,
        &pattern(0x7ea5 + slot as u64, 512),
    );
    assert!(
        matches!(copies(path)[slot], Copy::Damaged),
        "slot {slot} of {} should now fail its checksum",
        path.display()
    );
}

/// Overwrites the whole copy in `slot` with garbage (no magic left).
fn overwrite_with_garbage(path: &Path, slot: usize) {
    write_file_at(
        path,
        slot as u64 * SB_SLOT,
        &pattern(0x9a4b + slot as u64, SB_SLOT as usize),
    );
    assert!(matches!(copies(path)[slot], Copy::Absent));
}

// ---------------------------------------------------------------------------
// Stale members.

/// How the array daemon is stopped while a member is down.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM: graceful, the array is marked clean.
    Term,
    /// SIGKILL right after the writes: the array may be left dirty.
    Kill,
}

/// A member's node is killed, the array written (B over A), the array
/// daemon stopped, the node restarted, the daemon restarted: the member
/// is kept out as stale (never served), the array reads B everywhere,
/// the member is re-added and resynced, `check` finds nothing, and the
/// array still reads B after *another* member is killed (so the re-added
/// member really holds B).
fn stale_member_is_never_served(level: &str, nodes: usize, stop: Stop) {
    let mut cluster = Cluster::start(nodes, &["s:12M"]);
    let all: Vec<usize> = (0..nodes).collect();
    let members = cluster.members("s", &all);
    let mut array = ArrayDaemon::start(&array_entry("st", level, "64K", &members));
    let status = array.status("st");
    assert_eq!(status["state"], "clean", "{status}");

    let export = Export::connect(&array.uri("st"));
    let size = export.size();
    let a = pattern(0xa, size as usize);
    let b = pattern(0xb, size as usize);
    export.write(0, &a);
    assert_same(&export.read(0, size), &a, "array after writing A");

    cluster.nodes[0].kill9();
    export.write(0, &b);
    let status = array.status("st");
    assert_eq!(status["state"], "degraded", "{status}");
    assert_eq!(member_state(&status, 0), "faulty", "{status}");
    drop(export);
    match stop {
        Stop::Term => {
            array.terminate();
        }
        Stop::Kill => {
            array.kill9();
        }
    }

    // What member 0 holds now: the array as it was before B.
    let member0 = volume_file(&cluster.nodes[0], "s");
    let member_size = status["member_size"].as_u64().expect("member_size");
    let stale = read_file_at(&member0, DATA_OFFSET, member_size);
    let stale_events = newest(&member0)["events"].as_u64().expect("events");

    cluster.nodes[0].restart();
    // Member 0's disk crawls until the reads below are done, so that they
    // happen while it still holds A (checked below): a re-add cannot
    // have rewritten it yet.
    set_bandwidth(&cluster.nodes[0], "s", 64 * KIB);
    array.restart();
    let log = array.log();
    let stale_note = format!(
        "member 0 ({}): stale: holds events {stale_events} of array",
        members[0]
    );
    assert!(
        log.contains(&stale_note) && log.contains("must be re-added before use"),
        "the daemon should name member 0 as stale ({stale_note:?}):\n{}",
        array.log_tail(40)
    );

    let export = Export::connect(&array.uri("st"));
    assert_same(
        &export.read(0, size),
        &b,
        "array after restart with a stale member",
    );
    let status = array.status("st");
    assert_ne!(
        member_state(&status, 0),
        "active",
        "member 0 is served as current: {status}"
    );
    assert_same(
        &read_file_at(&member0, DATA_OFFSET, member_size),
        &stale,
        "member 0's data while the array was read (must still be stale, or the reads proved nothing)",
    );

    // Let it recover: re-added automatically, since its events show the
    // bitmap covers what it missed.
    set_bandwidth(&cluster.nodes[0], "s", 0);
    wait_status(&array, "st", "member 0 active again", |s| {
        member_state(s, 0) == "active" && s["state"] != "degraded"
    });
    let finished = log_fields(
        &array.log(),
        "recovery finished: member in sync",
        &["member=0"],
    )
    .unwrap_or_else(|| panic!("no recovery of member 0 logged\n{}", array.log_tail(40)));
    eprintln!(
        "{level}/{stop:?}: recovery copied {} of {} bytes",
        field_u64(&finished, "copied"),
        field_u64(&finished, "member_size")
    );
    assert_eq!(array.check_mismatches("st"), 0);
    assert_ne!(
        read_file_at(&member0, DATA_OFFSET, member_size),
        stale,
        "member 0 still holds its stale data after recovery"
    );

    // Another member goes: what member 0 holds must now carry the array.
    cluster.nodes[1].kill9();
    assert_same(
        &export.read(0, size),
        &b,
        "array with member 1 gone after member 0's recovery",
    );
    // (Member 1 is failed once a request reaches it; reads may not.)
    let status = array.status("st");
    assert_eq!(member_state(&status, 0), "active", "{status}");
}

#[test]
fn stale_raid5_member_after_sigterm_is_resynced_not_served() {
    stale_member_is_never_served("raid5", 3, Stop::Term);
}

#[test]
fn stale_raid1_member_after_sigkill_is_resynced_not_served() {
    stale_member_is_never_served("raid1", 2, Stop::Kill);
}

// ---------------------------------------------------------------------------
// Re-add from the bitmap.

/// A member's node dies, a few MiB are written in a few places, the node
/// comes back: the member is re-added by itself and only the bitmap's
/// dirty regions are copied to it, which is all it missed (check finds
/// nothing, and the array reads right with another member gone).
#[test]
fn readd_after_a_transient_failure_copies_only_dirty_regions() {
    let mut cluster = Cluster::start(3, &["r:68M"]);
    let members = cluster.members("r", &[0, 1, 2]);
    // Idle bitmap regions are cleared quickly, so that only what is
    // written while member 0 is down stays dirty.
    let config = format!(
        "bitmap-idle-ms = 300\n{}",
        array_entry("ra", "raid5", "64K", &members)
    );
    let array = ArrayDaemon::start(&config);
    let status = array.status("ra");
    let member_size = status["member_size"].as_u64().expect("member_size");
    let region = status["bitmap_region"].as_u64().expect("bitmap_region");
    assert_eq!((member_size, region), (64 * MIB, MIB), "{status}");

    // (array offset, length), whole rows of the RAID 5 (2 x 64 KiB).
    let a_writes = [
        (0, MIB),
        (2 * MIB, MIB),
        (30 * MIB, 2 * MIB),
        (40 * MIB, 3 * MIB),
        (90 * MIB, MIB),
        (127 * MIB, MIB),
    ];
    let b_writes = [(2 * MIB, MIB), (40 * MIB, 3 * MIB), (127 * MIB, MIB)];
    let data = |seed: u64, (off, len): (u64, u64)| pattern(seed ^ off, len as usize);

    let export = Export::connect(&array.uri("ra"));
    for w in a_writes {
        export.write(w.0, &data(0xa, w));
    }
    wait_status(&array, "ra", "a clean array with an empty bitmap", |s| {
        s["state"] == "clean" && s["bitmap_dirty"] == 0
    });

    cluster.nodes[0].kill9();
    for w in b_writes {
        export.write(w.0, &data(0xb, w));
    }
    // Two data chunks per row: array bytes [o, o + len) in whole rows are
    // member bytes [o / 2, (o + len) / 2) on every member.
    let missed: Vec<(u64, u64)> = b_writes
        .iter()
        .map(|&(o, l)| (o / 2, (o + l) / 2))
        .collect();
    let missed_bytes: u64 = missed.iter().map(|(s, e)| e - s).sum();
    let mut dirty: Vec<u64> = missed
        .iter()
        .flat_map(|&(s, e)| s / region..=(e - 1) / region)
        .collect();
    dirty.dedup();
    let status = array.status("ra");
    assert_eq!(member_state(&status, 0), "faulty", "{status}");
    assert_eq!(
        status["bitmap_dirty"].as_u64(),
        Some(dirty.len() as u64),
        "regions {dirty:?} should be dirty: {status}"
    );

    cluster.nodes[0].restart();
    wait_status(&array, "ra", "member 0 re-added and in sync", |s| {
        member_state(s, 0) == "active" && s["state"] != "degraded"
    });
    let log = array.log();
    assert!(
        log.contains("member re-added; recovering") && log.contains("full=false"),
        "member 0 should be re-added from the bitmap:\n{}",
        array.log_tail(30)
    );
    let finished = log_fields(&log, "recovery finished: member in sync", &["member=0"])
        .unwrap_or_else(|| panic!("no recovery of member 0 logged\n{}", array.log_tail(30)));
    let copied = field_u64(&finished, "copied");
    assert_eq!(field_u64(&finished, "member_size"), member_size);
    eprintln!(
        "re-add after a transient failure: copied {copied} of {member_size} member bytes \
         ({:.2}%; {} dirty regions of {region} bytes; the member missed {missed_bytes} bytes)",
        copied as f64 * 100.0 / member_size as f64,
        dirty.len()
    );
    assert!(
        copied >= missed_bytes,
        "copied {copied} bytes, but the member missed {missed_bytes}"
    );
    assert!(
        copied <= dirty.len() as u64 * region,
        "copied {copied} bytes, more than the {} dirty regions hold",
        dirty.len()
    );
    assert!(
        copied * 8 <= member_size,
        "copied {copied} of {member_size}"
    );
    assert_eq!(array.check_mismatches("ra"), 0);

    // Member 0 holds what it missed: read everything written with member
    // 1 gone (its chunks rebuilt from members 0 and 2).
    cluster.nodes[1].kill9();
    for w in a_writes {
        let seed = if b_writes.contains(&w) { 0xb } else { 0xa };
        assert_same(
            &export.read(w.0, w.1),
            &data(seed, w),
            &format!("array bytes {w:?} with member 1 gone"),
        );
    }
}

// ---------------------------------------------------------------------------
// Foreign members and members in the wrong slot.

/// A volume holding another array's superblock, configured into an
/// array, is left out (the array serves degraded) with a message naming
/// it and the other array, and is never written; `create` takes such a
/// member only with `--overwrite`.
#[test]
fn foreign_member_is_left_out_and_create_needs_overwrite() {
    let cluster = Cluster::start(3, &["m:12M", "f:12M"]);
    let m = cluster.members("m", &[0, 1, 2]);
    let f = cluster.members("f", &[0, 1, 2]);

    // Another array, made by another daemon, on f0 and f1.
    let mut other = ArrayDaemon::start(&array_entry("other", "raid1", "64K", &f[..2]));
    let other_uuid = other.status("other")["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    other.terminate();
    drop(other);
    let f0_file = volume_file(&cluster.nodes[0], "f");
    let f1_file = volume_file(&cluster.nodes[1], "f");
    let f0_before = newest(&f0_file);
    assert_eq!(f0_before["array-name"], "other", "{f0_before}");

    let mut array = ArrayDaemon::start(&array_entry("main", "raid5", "64K", &m));
    let status = array.status("main");
    let main_uuid = status["uuid"].as_str().expect("uuid").to_string();
    let size = status["size"].as_u64().expect("size");
    let x = pattern(0x3a, size as usize);
    let export = Export::connect(&array.uri("main"));
    export.write(0, &x);
    drop(export);
    array.terminate();

    // Slot 2 now names a member of "other".
    let with_foreign = [m[0].clone(), m[1].clone(), f[0].clone()];
    array.set_config(&array_entry("main", "raid5", "64K", &with_foreign));
    array.restart();
    let status = array.status("main");
    assert_eq!(status["state"], "degraded", "{status}");
    assert_eq!(member_state(&status, 0), "active", "{status}");
    assert_eq!(member_state(&status, 1), "active", "{status}");
    assert_ne!(member_state(&status, 2), "active", "{status}");
    let note = format!(
        "member 2 ({}): holds array \"other\" ({other_uuid}), expected array \"main\" ({main_uuid})",
        f[0]
    );
    assert!(
        array.log().contains(&note),
        "the daemon should say {note:?}:\n{}",
        array.log_tail(30)
    );
    let export = Export::connect(&array.uri("main"));
    assert_same(&export.read(0, size), &x, "main, degraded");
    drop(export);

    // `create` with a member of "other": refused, naming it, unless overwrite.
    let create = |extra: &[&str]| {
        let mut args = vec![
            "create", "fresh", "--level", "raid1", "--member", &f[1], "--member", &f[2],
        ];
        args.extend_from_slice(extra);
        array.cli(&args)
    };
    let out = create(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&f[1])
            && err.contains("\"other\"")
            && err.contains("overwrite"),
        "create over a member of \"other\" must be refused, naming it and --overwrite:\n{}",
        show(&out)
    );
    eprintln!("create over a foreign member: {}", err.trim());
    assert_eq!(newest(&f1_file)["array-name"], "other");
    assert!(
        !array.cli(&["status", "fresh"]).status.success(),
        "a refused create must not leave an array behind"
    );
    let out = create(&["--overwrite"]);
    assert!(out.status.success(), "create --overwrite: {}", show(&out));
    let fresh = array.status("fresh");
    assert!(
        fresh["state"] == "clean" || fresh["state"] == "active",
        "{fresh}"
    );
    assert_eq!(newest(&f1_file)["array-name"], "fresh");

    // A daemon that has no record of "main" (its state store lost) tells
    // the arrays apart the same way, by the members' superblocks.
    array.terminate();
    let mut again = ArrayDaemon::start(&array_entry("main", "raid5", "64K", &with_foreign));
    let status = again.status("main");
    assert_eq!(status["state"], "degraded", "{status}");
    assert_ne!(member_state(&status, 2), "active", "{status}");
    assert!(
        again.log().contains(&note),
        "the daemon should say {note:?}:\n{}",
        again.log_tail(30)
    );
    again.terminate();

    // All along, the foreign member of "main" was never written.
    assert_eq!(
        newest(&f0_file),
        f0_before,
        "the foreign member was touched"
    );
}

/// Two members swapped in the configuration: the array is refused, the
/// message names each member's configured position and the slot it holds,
/// nothing is written to the members, and with the order put right the
/// array comes back whole.
#[test]
fn members_swapped_in_the_configuration_are_refused_without_harm() {
    let cluster = Cluster::start(3, &["w:12M"]);
    let m = cluster.members("w", &[0, 1, 2]);
    let mut array = ArrayDaemon::start(&array_entry("w", "raid5", "64K", &m));
    let status = array.status("w");
    let uuid = status["uuid"].as_str().expect("uuid").to_string();
    let size = status["size"].as_u64().expect("size");
    let x = pattern(0x5e, size as usize);
    let export = Export::connect(&array.uri("w"));
    export.write(0, &x);
    drop(export);
    array.terminate();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| volume_file(&cluster.nodes[i], "w"))
        .collect();
    let before: Vec<Value> = files.iter().map(|f| newest(f)).collect();

    let swapped = [m[1].clone(), m[0].clone(), m[2].clone()];
    array.set_config(&array_entry("w", "raid5", "64K", &swapped));
    array.restart();
    let log = array.log();
    for (configured, holds) in [(0, 1), (1, 0)] {
        let note = format!(
            "member {configured} ({}): holds slot {holds} of array \"w\" ({uuid}), but is configured as member {configured}",
            swapped[configured]
        );
        assert!(
            log.contains(&note),
            "the daemon should say {note:?}:\n{}",
            array.log_tail(30)
        );
    }
    let refusal = log
        .lines()
        .find(|l| l.contains("array not started") && l.contains("array=w"))
        .unwrap_or_else(|| panic!("no refusal of array w logged:\n{}", array.log_tail(30)));
    eprintln!("swapped members: {refusal}");
    let out = array.cli(&["status", "w"]);
    assert!(
        !out.status.success(),
        "an array missing two of three members must not be served: {}",
        show(&out)
    );
    let after: Vec<Value> = files.iter().map(|f| newest(f)).collect();
    assert_eq!(after, before, "a refused assembly wrote to the members");

    array.set_config(&array_entry("w", "raid5", "64K", &m));
    array.restart();
    let status = array.status("w");
    assert_eq!(status["state"], "clean", "{status}");
    let export = Export::connect(&array.uri("w"));
    assert_same(&export.read(0, size), &x, "w with its members in order");
}

// ---------------------------------------------------------------------------
// Torn superblock copies.

/// The newest superblock copy of two members is damaged (one torn, one
/// overwritten with garbage): the array assembles whole from the older
/// copies, data intact, and the next updates rewrite the damaged slots.
/// Then both copies of a third member are damaged: it is left out with a
/// message, and the array serves degraded.
#[test]
fn torn_superblock_copies_are_survived_and_repaired() {
    let cluster = Cluster::start(3, &["t:12M"]);
    let m = cluster.members("t", &[0, 1, 2]);
    let mut array = ArrayDaemon::start(&array_entry("torn", "raid5", "64K", &m));
    let size = array.status("torn")["size"].as_u64().expect("size");
    let mut d = pattern(0xd, size as usize);
    let export = Export::connect(&array.uri("torn"));
    export.write(0, &d);
    drop(export);
    array.terminate();

    let files: Vec<PathBuf> = (0..3)
        .map(|i| volume_file(&cluster.nodes[i], "t"))
        .collect();
    let events = newest(&files[0])["events"].as_u64().expect("events");
    let torn = newest_slot(&files[0]);
    tear(&files[0], torn);
    let garbage = newest_slot(&files[1]);
    overwrite_with_garbage(&files[1], garbage);
    for f in &files[..2] {
        assert_eq!(
            newest(f)["events"].as_u64(),
            Some(events - 1),
            "{}",
            f.display()
        );
    }

    array.restart();
    let status = array.status("torn");
    assert_ne!(status["state"], "degraded", "{status}");
    for slot in 0..3 {
        assert_eq!(member_state(&status, slot), "active", "{status}");
    }
    let export = Export::connect(&array.uri("torn"));
    assert_same(
        &export.read(0, size),
        &d,
        "array assembled from older copies",
    );

    // A write, then the clean mark: superblock updates, which rewrite the
    // damaged slots (a write goes to the slot not holding the newest
    // valid copy).
    let fresh = pattern(0xd2, MIB as usize);
    export.write(0, &fresh);
    d[..fresh.len()].copy_from_slice(&fresh);
    // Once the array is clean and no update is in flight, every member
    // holds two valid copies, the newest at the array's events and the
    // other one event behind (with a damaged slot never rewritten, this
    // never holds and the hang detector fails the test).
    poll(
        "both copies valid on every member",
        &array,
        hang(120),
        || {
            let status = array.status("torn");
            let events = status["events"].as_u64().expect("events");
            if status["state"] != "clean" {
                return Err(format!("state {}", status["state"]));
            }
            for (i, f) in files.iter().enumerate() {
                let c = copies(f);
                let mut got: Vec<Option<u64>> = c.iter().map(Copy::events).collect();
                got.sort();
                if got != [Some(events - 1), Some(events)] {
                    return Err(format!("array at events {events}, member {i} holds {c:?}"));
                }
            }
            Ok(())
        },
    );
    assert_same(
        &export.read(0, size),
        &d,
        "array after the repairing updates",
    );
    drop(export);

    // Both copies of member 2 destroyed.
    array.terminate();
    tear(&files[2], 0);
    tear(&files[2], 1);
    array.restart();
    let status = array.status("torn");
    assert_eq!(status["state"], "degraded", "{status}");
    assert_ne!(member_state(&status, 2), "active", "{status}");
    let note = format!(
        "member 2 ({}): its superblocks are damaged (copy A: superblock checksum mismatch",
        m[2]
    );
    let log = array.log();
    assert!(
        log.contains(&note) && log.contains("left out"),
        "the daemon should say {note:?}:\n{}",
        array.log_tail(30)
    );
    let export = Export::connect(&array.uri("torn"));
    assert_same(&export.read(0, size), &d, "array without member 2");
}

// ---------------------------------------------------------------------------
// Bad configuration.

/// `nbdraid-array --check-config` on bad arrays exits non-zero with a
/// message naming the array and the rule; the same file with a good
/// array passes (so the refusals are the rules', not the checker's).
#[test]
fn check_config_names_the_array_and_the_rule() {
    let node = Node::start(&["a:8M", "b:8M", "c:8M"]);
    let [a, b, c] = ["a", "b", "c"].map(|v| node.uri(v));
    // A port nothing listens on (the OS picked it; the listener is gone).
    let dead = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let far = format!("nbd://127.0.0.1:{dead}/b");
    let dir = scratch_dir();
    let check = |name: &str, config: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).expect("write config");
        let mut cmd = Command::new(array_binary());
        cmd.arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--check-config");
        run(&mut cmd, hang(60)).unwrap_or_else(|e| panic!("{e:#}"))
    };

    let out = check(
        "good",
        &array_entry("good", "raid5", "64K", &[a.clone(), b.clone(), c.clone()]),
    );
    assert!(out.status.success(), "a good configuration: {}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    let cases: [(&str, String, &[&str]); 4] = [
        (
            "r5two",
            array_entry("r5two", "raid5", "64K", &[a.clone(), b.clone()]),
            &["raid5 needs at least 3 members, got 2"],
        ),
        (
            "oddchunk",
            array_entry(
                "oddchunk",
                "raid5",
                "3000",
                &[a.clone(), b.clone(), c.clone()],
            ),
            &["chunk", "must be a power of two"],
        ),
        (
            "twice",
            array_entry("twice", "raid1", "64K", &[a.clone(), b.clone(), a.clone()]),
            &["listed twice (slots 0 and 2)"],
        ),
        (
            "far",
            array_entry("far", "raid1", "64K", &[a.clone(), far.clone()]),
            &["is unreachable"],
        ),
    ];
    for (name, config, rule) in cases {
        let out = check(name, &config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: --check-config passed:\n{config}\n{}",
            show(&out)
        );
        assert!(
            err.contains(&format!("array \"{name}\"")) && rule.iter().all(|r| err.contains(r)),
            "{name}: the message should name the array and say {rule:?}:\n{}",
            show(&out)
        );
        eprintln!("{name}: {}", err.trim());
    }
    let out = check(
        "far",
        &array_entry("far", "raid1", "64K", &[a.clone(), far.clone()]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("member {far} is unreachable")) && !err.contains(&a),
        "only the unreachable member should be named:\n{err}"
    );
}
