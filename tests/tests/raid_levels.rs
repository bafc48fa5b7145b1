//! Every RAID level end to end, against the array's own export, with every
//! real client the node is tested with: nbdinfo, nbdcopy, qemu-img and
//! qemu-io, fio with crc32c verification, nbdfuse + ext4 (loop-mounted as
//! root), and the conformance suite; then `nbdraid array check` must find
//! zero mismatches, and (where there is redundancy) must find a member
//! corrupted behind the array's back.
//!
//! # One cluster for the file
//! Five nodes, each serving one small volume per array, and one array
//! daemon serving every array: a [`Shared`] fixture, started by the first
//! test that runs and stopped when the test binary exits (its daemons are
//! killed by PID at exit, and die with the binary via `PR_SET_PDEATHSIG`
//! however it ends; see `nbdraid_harness::shared`). Each `#[test]` owns one
//! array and runs the whole client matrix on it, step after step, so the
//! tests run in parallel threads without sharing any data; a failure names
//! its level and step.
//!
//! # Sizes
//! Every array is 72 MiB: `conformance.py` needs a writable export of at
//! least 64 MiB, and nothing here needs more. Members lose 4 MiB each to
//! the reserved region (superblocks, bitmap), so the member volumes are
//! sized per level: 3 × (28 − 4) for RAID 0/5/6 with three data chunks
//! per stripe, 76 − 4 for the mirror, 2 × (40 − 4) and 1.5 × (52 − 4) for
//! RAID 10 over four and three members.
//!
//! # Alignment
//! Chunks are 64 KiB, except RAID 6 with 4 KiB chunks (over five members:
//! a 12 KiB stripe, so every request crosses many stripes and most writes
//! are partial-stripe parity updates). Requests are placed off every
//! boundary on purpose: NBD clients (the Linux client, qemu, libnbd) ignore
//! the preferred block size, so the array must serve any byte range.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use nbdraid_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The size of every array in this file.
const ARRAY_SIZE: u64 = 72 * MIB;

/// Where array data starts on a member (the reserved region's end,
/// `raid-layer/src/meta/mod.rs` `DEFAULT_DATA_OFFSET`).
const DATA_OFFSET: u64 = 4 * MIB;

/// The nodes of the shared cluster.
const NODES: usize = 5;

/// One array of the shared daemon.
struct Spec {
    name: &'static str,
    level: &'static str,
    chunk: &'static str,
    /// The nodes holding its members, in slot order.
    nodes: &'static [usize],
    /// The size of each member volume.
    member_size: &'static str,
}

const ARRAYS: &[Spec] = &[
    Spec {
        name: "r0",
        level: "raid0",
        chunk: "64K",
        nodes: &[0, 1, 2],
        member_size: "28M",
    },
    Spec {
        name: "r1",
        level: "raid1",
        chunk: "64K",
        nodes: &[2, 3, 4],
        member_size: "76M",
    },
    Spec {
        name: "r5",
        level: "raid5",
        chunk: "64K",
        nodes: &[0, 1, 2, 3],
        member_size: "28M",
    },
    Spec {
        name: "r6",
        level: "raid6",
        chunk: "4K",
        nodes: &[0, 1, 2, 3, 4],
        member_size: "28M",
    },
    Spec {
        name: "r10",
        level: "raid10",
        chunk: "64K",
        nodes: &[1, 2, 3, 4],
        member_size: "40M",
    },
    Spec {
        name: "r10-3",
        level: "raid10",
        chunk: "64K",
        nodes: &[4, 0, 1],
        member_size: "52M",
    },
];

fn spec(name: &str) -> &'static Spec {
    ARRAYS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no array {name} in ARRAYS"))
}

/// The shared cluster. Fields drop in order: the array daemon goes before
/// the nodes it uses, so it does not see its members vanish.
struct Fixture {
    array: ArrayDaemon,
    cluster: Cluster,
}

static FIXTURE: Shared<Fixture> = Shared::new();

fn fixture() -> Arc<Fixture> {
    FIXTURE.get(|| {
        let volumes: Vec<String> = ARRAYS
            .iter()
            .map(|a| format!("{}:{}", a.name, a.member_size))
            .collect();
        let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
        let cluster = Cluster::start(NODES, &volumes);
        let config: String = ARRAYS
            .iter()
            .map(|a| array_entry(a.name, a.level, a.chunk, &cluster.members(a.name, a.nodes)))
            .collect();
        let array = ArrayDaemon::start(&config);
        Fixture { array, cluster }
    })
}

/// Prints the shared daemon's log (what concerns this test's array, and
/// the tail) when the test fails: the daemon outlives the test, so its own
/// guard cannot.
struct LogOnPanic<'a> {
    array: &'a ArrayDaemon,
    name: &'static str,
}

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.array.log();
            let field = format!("array={}", self.name);
            let quoted = format!("{:?}", self.name);
            let mine: Vec<&str> = log
                .lines()
                .filter(|l| l.split_whitespace().any(|w| w == field) || l.contains(&quoted))
                .collect();
            let start = mine.len().saturating_sub(80);
            eprintln!(
                "--- array daemon log, lines naming {} ---\n{}\n{}",
                self.name,
                mine[start..].join("\n"),
                self.array.log_tail(30)
            );
        }
    }
}

/// Names the step a test is at, with the time since the test started (for
/// the reader of a failure; nothing asserts on it).
struct Steps {
    name: &'static str,
    start: Instant,
}

impl Steps {
    fn step(&self, what: &str) {
        let t = self.start.elapsed().as_secs_f64();
        println!("== {} [{t:.1}s]: {what}", self.name);
    }
}

/// The client matrix on array `name`, in order; see the module docs.
fn level_matrix(name: &'static str) {
    require_tools!(
        "nbdinfo",
        "nbdcopy",
        "qemu-img",
        "qemu-io",
        "fio",
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "fsck.ext4",
    );
    if !have_python_libnbd(name) {
        return;
    }
    let steps = Steps {
        name,
        start: Instant::now(),
    };
    let spec = spec(name);
    steps.step("fixture");
    let fx = fixture();
    let array = &fx.array;
    let _log = LogOnPanic { array, name };
    let uri = array.uri(name);
    let dir = scratch_dir();
    let dir = dir.path();

    steps.step("status");
    let size = assert_fresh(array, spec);
    steps.step("nbdinfo");
    nbdinfo(&uri, spec, size);
    steps.step("nbdcopy");
    nbdcopy(&uri, dir, size);
    steps.step("qemu-img");
    let model = qemu_img(&uri, dir, size);
    steps.step("qemu-io and large zeroes against a model");
    qemu_io_against_model(&uri, dir, spec, model);
    steps.step("fio");
    fio_verify(&uri, dir);
    steps.step("nbdfuse + ext4");
    ext4_on_nbdfuse(&uri, dir, size);
    steps.step("conformance.py");
    conformance(array, name);
    steps.step("check");
    check_clean(array, spec);
    if spec.level != "raid0" {
        steps.step("check finds a corrupted member");
        check_finds_corruption(&fx, spec);
    }
    steps.step("done");
}

#[test]
fn raid0_over_three_members() {
    level_matrix("r0");
}

#[test]
fn raid1_three_way_mirror() {
    level_matrix("r1");
}

#[test]
fn raid5_over_four_members() {
    level_matrix("r5");
}

#[test]
fn raid6_over_five_members_4k_chunks() {
    level_matrix("r6");
}

#[test]
fn raid10_over_four_members() {
    level_matrix("r10");
}

/// An odd member count: md's "near" layout wraps each chunk's second copy
/// onto the next row.
#[test]
fn raid10_over_three_members() {
    level_matrix("r10-3");
}

// --- the steps -------------------------------------------------------------------------

/// The array as created: clean, every member active, the size this file
/// planned. Returns the size.
fn assert_fresh(array: &ArrayDaemon, spec: &Spec) -> u64 {
    let st = array.status(spec.name);
    assert_eq!(st["level"], spec.level, "{st:#}");
    assert_eq!(st["state"], "clean", "{st:#}");
    assert_eq!(st["size"], ARRAY_SIZE, "{st:#}");
    assert!(st["sync"].is_null(), "a fresh array is not syncing: {st:#}");
    assert_members_healthy(&st, spec);
    ARRAY_SIZE
}

/// Every member is active, error-free and in its slot.
fn assert_members_healthy(st: &Value, spec: &Spec) {
    let members = st["members"].as_array().expect("members");
    assert_eq!(members.len(), spec.nodes.len(), "{st:#}");
    for (slot, m) in members.iter().enumerate() {
        assert_eq!(m["slot"], slot, "{st:#}");
        assert_eq!(m["state"], "active", "member {slot}: {st:#}");
        assert_eq!(m["errors"], 0, "member {slot}: {st:#}");
    }
}

/// Exit status of `nbdinfo --can/--is`: 0 true, 2 false, anything else an error.
fn nbdinfo_flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = run(tool("nbdinfo").args([kind, what, uri]), hang(60)).expect("nbdinfo");
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {kind} {what} {uri}: {}\n{}",
            out.status,
            show(&out)
        ),
    }
}

/// What the array advertises: its size, the flags of a writable device
/// with multi-conn (a FLUSH on any connection flushes every member), byte
/// granularity, and a description naming level and geometry. FAST_ZERO is
/// not advertised: the array cannot promise that zeroing is cheap on every
/// member (`raid-layer/src/array/mod.rs`, `can_fast_zero: false`).
fn nbdinfo(uri: &str, spec: &Spec, size: u64) {
    let out = run_ok(tool("nbdinfo").arg("--json").arg(uri), hang(60));
    let j: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{}", show(&out)));
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], spec.name, "{j:#}");
    assert_eq!(e["export-size"], size, "{j:#}");
    assert_eq!(e["is_read_only"], false, "{j:#}");
    for f in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[f], true, "{f}: {j:#}");
    }
    assert_eq!(e["can_fast_zero"], false, "{j:#}");
    assert_eq!(e["block_size_minimum"], 1, "{j:#}");
    assert_eq!(e["block_size_preferred"], 4096, "{j:#}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{j:#}");
    let description = e["description"].as_str().unwrap_or_default();
    let geometry = format!("{} over {} members", spec.level, spec.nodes.len());
    assert!(
        description.starts_with(&geometry),
        "description {description:?} should start with {geometry:?}: {j:#}"
    );
    if spec.level != "raid1" {
        let chunk = format!("chunk {}", spec.chunk);
        assert!(
            description.contains(&chunk),
            "description {description:?} should name {chunk:?}"
        );
    }
    let out = run_ok(tool("nbdinfo").args(["--size", uri]), hang(60));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        size.to_string()
    );
    assert!(nbdinfo_flag("--can", "write", uri));
    assert!(nbdinfo_flag("--can", "structured-reply", uri));
    assert!(!nbdinfo_flag("--is", "read-only", uri));

    // Block status: the extents tile the whole export, whatever each level
    // reports (RAID 5/6: all data; others: what the member reports).
    let out = run_ok(tool("nbdinfo").args(["--json", "--map", uri]), hang(60));
    let map: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map: {e}\n{}", show(&out)));
    let mut covered = 0;
    for x in map.as_array().expect("map is an array") {
        assert_eq!(x["offset"], covered, "extents must be contiguous: {map:#}");
        covered += x["length"].as_u64().expect("length");
    }
    assert_eq!(covered, size, "the map must cover the export: {map:#}");
}

/// nbdcopy both ways, then a source with holes over the data: the holes
/// must come back as zeroes.
fn nbdcopy(uri: &str, dir: &Path, size: u64) {
    let src = dir.join("nbdcopy-src.bin");
    let back = dir.join("nbdcopy-back.bin");
    write_pattern_file(&src, 0xA11CE, size as usize);
    run_ok(tool("nbdcopy").arg("--flush").arg(&src).arg(uri), hang(300));
    run_ok(tool("nbdcopy").arg(uri).arg(&back), hang(300));
    assert_files_equal(&src, &back);

    let sparse = dir.join("nbdcopy-sparse.bin");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&sparse).expect("create");
        f.set_len(size).expect("set_len");
        for (i, off) in [0, 5 * MIB + 4097, size / 2 + 12345, size - 70_000]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&pattern(200 + i as u64, 70_000), off)
                .expect("write");
        }
    }
    run_ok(
        tool("nbdcopy")
            .args(["--flush", "--connections=1"])
            .arg(&sparse)
            .arg(uri),
        hang(300),
    );
    run_ok(tool("nbdcopy").arg(uri).arg(&back), hang(300));
    assert_files_equal(&sparse, &back);
    fs::remove_file(&src).ok();
    fs::remove_file(&sparse).ok();
}

/// Runs qemu-io on `target` (format `fmt`); panics if it fails or reports
/// a failure (a pattern mismatch is printed, not an exit status).
fn qemu_io(fmt: &str, target: &str, cmds: &[String]) -> Output {
    let mut c = tool("qemu-io");
    c.args(["-f", fmt]).arg(target);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c, hang(300));
    let text = output_text(&out).to_lowercase();
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "qemu-io on {target} reported a failure:\n{}",
        show(&out)
    );
    out
}

/// qemu-img from a qcow2 image with holes into the array, compared by
/// qemu-img and back out as raw; a one-byte change must make compare
/// differ. Returns the array's contents afterwards (the model the next step
/// edits).
fn qemu_img(uri: &str, dir: &Path, size: u64) -> Vec<u8> {
    let qcow = dir.join("src.qcow2");
    let qcow_s = qcow.to_str().expect("utf-8 path");
    run_ok(
        tool("qemu-img")
            .args(["create", "-q", "-f", "qcow2", qcow_s])
            .arg(size.to_string()),
        hang(60),
    );
    let third = size / 3 + 12345;
    qemu_io(
        "qcow2",
        qcow_s,
        &[
            "write -P 0x21 0 1M".into(),
            format!("write -P 0x22 {third} 3M"),
            format!("write -P 0x23 {} 65537", size - 65537),
        ],
    );
    run_ok(
        tool("qemu-img").args(["convert", "-n", "-f", "qcow2", "-O", "raw", qcow_s, uri]),
        hang(300),
    );
    run_ok(
        tool("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", qcow_s, uri]),
        hang(300),
    );
    let want = dir.join("qcow-as-raw.bin");
    let back = dir.join("array-as-raw.bin");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", qcow_s])
            .arg(&want),
        hang(300),
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&back),
        hang(300),
    );
    assert_files_equal(&want, &back);

    // One byte, inside the data written at `third`: compare must notice.
    let byte_at = third + MIB + 7;
    qemu_io("raw", uri, &[format!("write -P 0x5a {byte_at} 1")]);
    let out = run(
        tool("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", qcow_s, uri]),
        hang(300),
    )
    .expect("qemu-img compare");
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must see the changed byte at {byte_at}:\n{}",
        show(&out)
    );
    let mut model = fs::read(&want).expect("read the converted image");
    model[byte_at as usize] = 0x5a;
    for f in [&qcow, &want, &back] {
        fs::remove_file(f).ok();
    }
    model
}

/// One edit of the model and the qemu-io command that makes it.
enum Edit {
    Write { at: u64, len: u64, byte: u8 },
    Zero { at: u64, len: u64 },
}

impl Edit {
    fn apply(&self, model: &mut [u8]) {
        let (at, len, byte) = match *self {
            Edit::Write { at, len, byte } => (at, len, byte),
            Edit::Zero { at, len } => (at, len, 0),
        };
        model[at as usize..(at + len) as usize].fill(byte);
    }
}

/// qemu-io writes and zeroes at offsets off every chunk and stripe
/// boundary (one byte, a few bytes straddling a boundary, more than a
/// stripe, the array's last bytes), each read back at once; then
/// concurrent writes into the same stripes; then WRITE_ZEROES requests
/// larger than the 32 MiB maximum payload through libnbd. The whole array
/// is then read back and must equal the model, byte for byte.
fn qemu_io_against_model(uri: &str, dir: &Path, spec: &Spec, mut model: Vec<u8>) {
    let c = parse_size(spec.chunk);
    let size = model.len() as u64;
    let mut edits = vec![
        Edit::Write {
            at: 1,
            len: 1,
            byte: 0x31,
        },
        Edit::Write {
            at: c - 1,
            len: 2,
            byte: 0x32,
        },
        Edit::Write {
            at: 2 * c - 513,
            len: 1027,
            byte: 0x33,
        },
        Edit::Write {
            at: 3 * c - 7,
            len: 13,
            byte: 0x34,
        },
        Edit::Write {
            at: 5 * c + 100,
            len: 3 * c + 333,
            byte: 0x35,
        },
        Edit::Write {
            at: 16 * c + 12345,
            len: 4097,
            byte: 0x36,
        },
        Edit::Write {
            at: 24 * c + 511,
            len: c,
            byte: 0x37,
        },
        Edit::Zero {
            at: 7 * c + 3,
            len: c + 11,
        },
        Edit::Write {
            at: 40 * c - 4097,
            len: 2 * c + 8193,
            byte: 0x38,
        },
        Edit::Write {
            at: size / 2 + 3,
            len: MIB + 5,
            byte: 0x39,
        },
        Edit::Zero {
            at: size / 2 + MIB,
            len: 3,
        },
        Edit::Write {
            at: size - 7,
            len: 7,
            byte: 0x3a,
        },
    ];
    let mut cmds = Vec::new();
    for e in &edits {
        match *e {
            Edit::Write { at, len, byte } => {
                cmds.push(format!("write -P {byte:#x} {at} {len}"));
                cmds.push(format!("read -P {byte:#x} {at} {len}"));
            }
            Edit::Zero { at, len } => {
                cmds.push(format!("write -z {at} {len}"));
                cmds.push(format!("read -P 0 {at} {len}"));
            }
        }
    }
    // Eight writes in flight at once, side by side across a few stripes:
    // parity levels must order their read-modify-writes of shared stripes.
    let base = 64 * c + 17;
    let piece = c / 2 + 3;
    for i in 0..8u64 {
        let byte = 0x60 + i as u8;
        cmds.push(format!(
            "aio_write -P {byte:#x} {} {piece}",
            base + i * piece
        ));
        edits.push(Edit::Write {
            at: base + i * piece,
            len: piece,
            byte,
        });
    }
    cmds.push("aio_flush".into());
    for i in 0..8u64 {
        cmds.push(format!(
            "read -P {:#x} {} {piece}",
            0x60 + i as u8,
            base + i * piece
        ));
    }
    qemu_io("raw", uri, &cmds);

    // WRITE_ZEROES larger than the maximum payload (the conformance check
    // for that needs a 200 MiB export; see `conformance`), punching and
    // with NO_HOLE, from unaligned offsets.
    let big = [
        (5 * MIB + 1, 40 * MIB + 3, false),
        (20 * MIB + 7, 33 * MIB, true),
    ];
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{}h.flush()\nh.shutdown()\n",
        big.iter()
            .map(|&(at, len, no_hole)| format!(
                "h.zero({len}, {at}, {})\n",
                if no_hole { "nbd.CMD_FLAG_NO_HOLE" } else { "0" }
            ))
            .collect::<String>()
    );
    run_ok(Command::new(SYSTEM_PYTHON).args(["-c", &script]), hang(300));
    edits.extend(big.iter().map(|&(at, len, _)| Edit::Zero { at, len }));

    for e in &edits {
        e.apply(&mut model);
    }
    let want = dir.join("model.bin");
    let back = dir.join("model-back.bin");
    fs::write(&want, &model).expect("write the model");
    run_ok(tool("nbdcopy").arg(uri).arg(&back), hang(300));
    assert_files_equal(&want, &back);
    fs::remove_file(&want).ok();
    fs::remove_file(&back).ok();
}

/// fio's NBD engine with crc32c verification: four jobs on disjoint 16 MiB
/// ranges at 4 KiB and at 1 MiB blocks, then three jobs with sizes from 512
/// bytes to 192 KiB at 512-byte alignment (off every chunk boundary).
fn fio_verify(uri: &str, dir: &Path) {
    let runs: [(&str, &[&str], u64); 3] = [
        (
            "bs=4k",
            &[
                "--bs=4k",
                "--numjobs=4",
                "--offset_increment=16M",
                "--iodepth=16",
            ],
            4,
        ),
        (
            "bs=1M",
            &[
                "--bs=1M",
                "--numjobs=4",
                "--offset_increment=16M",
                "--iodepth=4",
            ],
            4,
        ),
        (
            "bsrange=512-192k",
            &[
                "--bsrange=512-192k",
                "--blockalign=512",
                "--numjobs=3",
                "--offset_increment=20M",
                "--iodepth=8",
            ],
            3,
        ),
    ];
    for (i, (what, args, jobs)) in runs.into_iter().enumerate() {
        let json = dir.join(format!("fio-{i}.json"));
        let mut all = vec![
            "--name=verify",
            "--rw=randwrite",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
        ];
        all.extend_from_slice(args);
        let (out, j) = fio(uri, &json, &all);
        assert_fio_clean(&out, &j, what);
        assert_eq!(
            j["jobs"].as_array().map(Vec::len),
            Some(jobs as usize),
            "{what}: {j:#}"
        );
        assert_eq!(fio_io_bytes(&j, "write"), jobs * 16 * MIB, "{what}: {j:#}");
        assert_eq!(
            fio_io_bytes(&j, "read"),
            jobs * 16 * MIB,
            "{what}: the verify pass must read everything back: {j:#}"
        );
    }
}

/// nbdfuse presents the array as a file; mkfs.ext4 on it, fsck.ext4 -n
/// clean. As root: loop-mount it, write files, unmount, fsck clean again,
/// and compare the contents after a read-only remount.
fn ext4_on_nbdfuse(uri: &str, dir: &Path, size: u64) {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP ext4 on nbdfuse: /dev/fuse is absent");
        return;
    }
    let mut fuse = NbdFuse::mount(dir, uri);
    let disk = fuse.disk();
    assert_eq!(
        disk.metadata().expect("stat").len(),
        size,
        "fused file size"
    );
    run_ok(
        tool("mkfs.ext4")
            .args(["-F", "-q", "-E", "nodiscard"])
            .arg(&disk),
        hang(120),
    );
    let fsck = || run_ok(tool("fsck.ext4").args(["-n", "-f"]).arg(&disk), hang(120));
    let out = fsck();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("11/"),
        "a fresh ext4 has 11 inodes in use:\n{}",
        show(&out)
    );

    if can_loop_mount() {
        let m = dir.join("ext4");
        let out = fuse.mount_loop(&m, "");
        assert!(out.status.success(), "mount -o loop: {}", show(&out));
        let payload = dir.join("payload.bin");
        write_pattern_file(&payload, 0xF00D, 8 << 20);
        fs::copy(&payload, m.join("payload.bin")).expect("copy into ext4");
        fs::create_dir_all(m.join("a/b/c")).expect("mkdir in ext4");
        for i in 0..32u64 {
            fs::write(
                m.join(format!("a/b/c/f{i}")),
                pattern(i, 1000 + 777 * i as usize),
            )
            .expect("write");
        }
        run_ok(
            Command::new("sync").arg("-f").arg(m.join("payload.bin")),
            hang(60),
        );
        fuse.umount_loop();
        let out = fsck();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("files"),
            "{}",
            show(&out)
        );
        let out = fuse.mount_loop(&m, "ro");
        assert!(out.status.success(), "mount -o loop,ro: {}", show(&out));
        assert_files_equal(&payload, &m.join("payload.bin"));
        for i in 0..32u64 {
            let got = fs::read(m.join(format!("a/b/c/f{i}"))).expect("read");
            assert_same(&got, &pattern(i, 1000 + 777 * i as usize), "ext4 file");
        }
        fuse.umount_loop();
    } else {
        eprintln!("SKIP loop mount part: needs root and /dev/loop-control");
    }
    let st = fuse
        .unmount()
        .expect("nbdfuse did not exit after fusermount3 -u");
    assert!(st.success(), "nbdfuse exit status {st}");
}

/// The checks `conformance.py` may skip here, each for a reason that is
/// about the array daemon's configuration, not a failure:
///
/// - `read_only_export`: arrays are always writable (no `--ro-uri`);
/// - `default_export`: the daemon serves several arrays and has no default
///   export (no `--default-is`);
/// - `write_zeroes_larger_than_64mib`: needs a 200 MiB export (no
///   `--big-uri`); WRITE_ZEROES beyond the maximum payload is covered by
///   `qemu_io_against_model` (40 and 33 MiB requests, checked by content);
/// - `fast_zero`: the array does not advertise FAST_ZERO (asserted by
///   `nbdinfo`).
const EXPECTED_SKIPS: [&str; 4] = [
    "read_only_export",
    "default_export",
    "write_zeroes_larger_than_64mib",
    "fast_zero",
];

/// `tests/python/conformance.py` against the array's export, run as
/// `tests/tests/conformance.rs` runs it, with the spec-level checks only:
/// without `--node`, which adds what nbdraid-node promises beyond the spec
/// and the array does not: the node's exact transmission flags (with
/// SEND_FAST_ZERO, which the array leaves out), FAST_ZERO succeeding, and
/// trimmed or zeroed ranges reported as ZERO by block status (RAID 5/6
/// report every extent as data, which is always correct). What `--node`
/// asserts and does apply to the array (its block sizes, CAN_MULTI_CONN)
/// is asserted by `nbdinfo`. `--server-pid` makes the suite check after
/// every check that the array daemon is alive and did not balloon.
fn conformance(array: &ArrayDaemon, name: &str) {
    let exports: Vec<&str> = ARRAYS.iter().map(|a| a.name).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/conformance.py");
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg(&script)
        .args(["--rw-uri", &array.uri(name)])
        .args(["--exports", &exports.join(",")])
        .args(["--server-pid", &array.pid().to_string()]);
    let filtered = std::env::var("NBDRAID_CONFORMANCE_FILTER").ok();
    for f in filtered
        .iter()
        .flat_map(|f| f.split(','))
        .filter(|f| !f.is_empty())
    {
        cmd.args(["-k", f]);
    }
    let out = run(&mut cmd, hang(900)).unwrap_or_else(|e| panic!("{e:#}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{}", show(&out));
    let lines = |status: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.starts_with(status))
            .map(str::to_string)
            .collect()
    };
    assert!(
        out.status.success(),
        "conformance suite against {name} failed ({}); FAIL lines:\n{}",
        out.status,
        lines("FAIL ").join("\n")
    );
    assert!(lines("FAIL ").is_empty(), "{stdout}");
    assert!(lines("PASS ").len() > 40, "too few checks ran:\n{stdout}");
    if filtered.is_none() {
        let mut skipped: Vec<String> = lines("SKIP ")
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        skipped.sort();
        let mut expected: Vec<String> = EXPECTED_SKIPS.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(skipped, expected, "unexpected SKIPs:\n{stdout}");
    }
}

/// `nbdraid array check` after everything above: exit 0, a finished check
/// over every member byte with zero mismatches, and no member failed or
/// counted an error on the way (the conformance suite's bad requests are
/// the client's mistakes, never a member's).
fn check_clean(array: &ArrayDaemon, spec: &Spec) {
    let out = array.cli(&["check", spec.name, "--json", "--quiet"]);
    assert!(out.status.success(), "check {}: {}", spec.name, show(&out));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}\n{}", show(&out)));
    assert_eq!(report["running"], false, "{report:#}");
    assert_eq!(report["mismatches"], 0, "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    let progress = &report["progress"];
    assert!(
        progress["total"].as_u64().is_some_and(|t| t > 0) && progress["done"] == progress["total"],
        "the check must cover every member byte: {report:#}"
    );
    let st = array.status(spec.name);
    assert_eq!(st["check"]["mismatches"], 0, "{st:#}");
    assert_eq!(st["check"]["running"], false, "{st:#}");
    assert!(
        st["state"] == "clean" || st["state"] == "active",
        "state after the matrix: {st:#}"
    );
    assert_members_healthy(&st, spec);
}

/// The zero above means something: 4 KiB changed on one member behind the
/// array's back (straight on the node) is a mismatch the check reports,
/// and it exits non-zero.
fn check_finds_corruption(fx: &Fixture, spec: &Spec) {
    let member = fx.cluster.nodes[spec.nodes[0]].uri(spec.name);
    qemu_io(
        "raw",
        &member,
        &[format!("write -P 0xee {} 4096", DATA_OFFSET + 8 * MIB)],
    );
    let out = fx.array.cli(&["check", spec.name, "--json", "--quiet"]);
    assert!(
        !out.status.success(),
        "check of {} missed a corrupted member:\n{}",
        spec.name,
        show(&out)
    );
    let st = fx.array.status(spec.name);
    assert!(
        st["check"]["mismatches"].as_u64().is_some_and(|m| m >= 1),
        "{st:#}"
    );
}
