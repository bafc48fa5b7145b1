//! `nbdfuse`: an export presented as a file in a FUSE mount, optionally
//! with a file system on it loop-mounted (as root).
//!
//! [`NbdFuse`] is a guard: dropping it unmounts the loop mount and the FUSE
//! mount and stops the nbdfuse process it started (by its own PID), even
//! when an assertion failed; then it prints nbdfuse's log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bins::hang;
use crate::process::{run, wait_for};
use crate::tools::{tool, tool_path};

/// A running `nbdfuse` serving one export as `<dir>/mnt/disk`.
pub struct NbdFuse {
    child: Option<Child>,
    mountpoint: PathBuf,
    loop_mount: Option<PathBuf>,
    log: PathBuf,
}

impl NbdFuse {
    /// Starts nbdfuse for `uri` under `dir` and waits (bounded) until the
    /// disk file has its size.
    pub fn mount(dir: &Path, uri: &str) -> NbdFuse {
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
        let mut f = NbdFuse {
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

    /// Returns the file presenting the export.
    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    /// Loop-mounts the disk file at `at` with `-o loop[,OPTIONS]`; returns
    /// mount's output (the caller decides what a failure means).
    pub fn mount_loop(&mut self, at: &Path, options: &str) -> Output {
        fs::create_dir_all(at).expect("mkdir");
        let opts = if options.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{options}")
        };
        let out = run(
            Command::new("mount")
                .args(["-o", &opts])
                .arg(self.disk())
                .arg(at),
            hang(60),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        if out.status.success() {
            self.loop_mount = Some(at.to_path_buf());
        }
        out
    }

    /// Unmounts the loop mount; panics if umount fails.
    pub fn umount_loop(&mut self) {
        if let Some(m) = self.loop_mount.take() {
            crate::process::run_ok(Command::new("umount").arg(&m), hang(60));
        }
    }

    /// Unmounts everything and waits (bounded) for nbdfuse to exit; returns
    /// its status, or `None` if it had to be killed.
    pub fn unmount(&mut self) -> Option<ExitStatus> {
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

impl Drop for NbdFuse {
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

/// Reports whether this process can loop-mount (root, `/dev/loop-control`,
/// `mount` present).
pub fn can_loop_mount() -> bool {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/loop-control").exists() && tool_path("mount").is_some()
}
