//! `nbdfuse` presents an export as a file; `mkfs.ext4` on it, `fsck.ext4 -n` must be clean.
//! As root with loop devices, the file system is also mounted (`mount -o loop`), written,
//! unmounted, checked again and its contents compared after a read-only remount.
//! Every step is bounded; the guard unmounts (loop and FUSE) and kills only the nbdfuse PID
//! it started, even when an assertion fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdraid_tests::{
    Node, assert_files_equal, hang, require_tools, run, run_ok, scratch_dir, show, tool, wait_for,
    write_pattern_file,
};

struct Fuse {
    child: Option<Child>,
    mountpoint: PathBuf,
    loop_mount: Option<PathBuf>,
    log: PathBuf,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Fuse {
        let mountpoint = dir.join("mnt");
        fs::create_dir_all(&mountpoint).expect("mkdir");
        let pidfile = dir.join("nbdfuse.pid");
        let log = dir.join("nbdfuse.log");
        let logf = fs::File::create(&log).expect("log");
        let child = tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(mountpoint.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Fuse {
            child: Some(child),
            mountpoint,
            loop_mount: None,
            log,
        };
        let disk = f.disk();
        let child = f.child.as_mut().expect("child");
        wait_for("nbdfuse pidfile", hang(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("nbdfuse exited early: {st}");
            }
            fs::read_to_string(&pidfile)
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        wait_for("fused disk file", hang(30), || {
            disk.metadata().ok().filter(|m| m.len() > 0)
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        f
    }

    fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(m) = self.loop_mount.take() {
            let _ = run(Command::new("umount").arg(&m), hang(60));
        }
        let _ = run(
            tool("fusermount3").arg("-u").arg(&self.mountpoint),
            hang(60),
        );
        let mut child = self.child.take()?;
        let deadline = Instant::now() + hang(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = run(
                    tool("fusermount3").arg("-uz").arg(&self.mountpoint),
                    hang(30),
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        self.unmount();
        if std::thread::panicking() {
            eprintln!(
                "--- nbdfuse log ---\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn can_loop_mount() -> bool {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/loop-control").exists() && nbdraid_tests::tool_path("mount").is_some()
}

#[test]
fn nbdfuse_mkfs_ext4_fsck_clean() {
    require_tools!("nbdfuse", "fusermount3", "mkfs.ext4", "fsck.ext4");
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP nbdfuse_mkfs_ext4_fsck_clean: /dev/fuse is absent");
        return;
    }
    let node = Node::start(&["vol:64M"]);
    let dir = scratch_dir();
    let mut fuse = Fuse::mount(dir.path(), &node.uri("vol"));
    let disk = fuse.disk();
    assert_eq!(
        disk.metadata().expect("stat").len(),
        64 << 20,
        "fused file size"
    );

    run_ok(
        tool("mkfs.ext4")
            .args(["-F", "-q", "-E", "nodiscard"])
            .arg(&disk),
        hang(120),
    );
    let fsck = run_ok(tool("fsck.ext4").args(["-n", "-f"]).arg(&disk), hang(120));
    assert!(
        String::from_utf8_lossy(&fsck.stdout).contains("11/"),
        "{}",
        show(&fsck)
    );

    if can_loop_mount() {
        let m = dir.path().join("ext4");
        fs::create_dir_all(&m).expect("mkdir");
        let out = run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&disk)
                .arg(&m),
            hang(60),
        )
        .expect("mount");
        if out.status.success() {
            fuse.loop_mount = Some(m.clone());
            let src = dir.path().join("payload.bin");
            write_pattern_file(&src, 0xF00D, 8 << 20);
            fs::copy(&src, m.join("payload.bin")).expect("copy into ext4");
            fs::create_dir_all(m.join("a/b/c")).expect("mkdir in ext4");
            fs::write(m.join("a/b/c/hello.txt"), b"hello nbdraid\n").expect("write");
            run_ok(
                Command::new("sync").arg("-f").arg(m.join("payload.bin")),
                hang(60),
            );
            run_ok(Command::new("umount").arg(&m), hang(60));
            fuse.loop_mount = None;
            let fsck = run_ok(tool("fsck.ext4").args(["-n", "-f"]).arg(&disk), hang(120));
            assert!(fsck.status.success(), "{}", show(&fsck));
            // Read-only remount: the contents survived the unmount.
            run_ok(
                Command::new("mount")
                    .args(["-o", "loop,ro"])
                    .arg(&disk)
                    .arg(&m),
                hang(60),
            );
            fuse.loop_mount = Some(m.clone());
            assert_files_equal(&src, &m.join("payload.bin"));
            assert_eq!(
                fs::read(m.join("a/b/c/hello.txt")).expect("read"),
                b"hello nbdraid\n"
            );
            run_ok(Command::new("umount").arg(&m), hang(60));
            fuse.loop_mount = None;
        } else {
            eprintln!("SKIP loop mount part: mount failed:\n{}", show(&out));
        }
    } else {
        eprintln!("SKIP loop mount part: needs root and /dev/loop-control");
    }

    let st = fuse
        .unmount()
        .expect("nbdfuse did not exit after fusermount3 -u");
    assert!(st.success(), "nbdfuse exit status {st}");
}
