//! Running processes, bounded: commands to completion with a hang
//! detector, and background processes whose output is collected. Every
//! process is started in its own process group and killed by that group
//! (which the harness created) and by nothing broader.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::data::scratch_dir;

/// Run `cmd` to completion with captured stdout/stderr. The child gets its own process group;
/// if it outlives `timeout` that group (which we created) is SIGKILLed and an error returned.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
    let pid = child.id() as i32;
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // SAFETY: plain syscall; -pid is the process group created above for this child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren could keep the pipes open; after the group kill they are gone too.
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "hang detector: `{desc}` still running after {timeout:?}; killed.\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// [`run`], panicking (with the full output) unless the command exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    let out = run(cmd, timeout).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        panic!("`{desc}` failed: {}\n{}", out.status, show(&out));
    }
    out
}

/// Human-readable stdout + stderr of a finished command.
pub fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Returns stdout followed by stderr as one text (lossy UTF-8), for
/// looking for a message a tool may print on either.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Shell-ish rendering of a command for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Poll `f` every 20 ms until it returns `Some`, or fail after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("hang detector: timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A process running in the background (its own process group) whose stdout lines are
/// collected as they arrive. Dropping it SIGKILLs that process group (the one we created).
pub struct Background {
    child: Option<Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: PathBuf,
    _dir: TempDir,
    desc: String,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        let dir = scratch_dir();
        let stderr = dir.path().join("stderr");
        let desc = describe(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let out = child.stdout.take().expect("piped");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                match line {
                    Ok(l) => l2.lock().expect("lock").push(l),
                    Err(_) => break,
                }
            }
        });
        Background {
            child: Some(child),
            lines,
            stderr,
            _dir: dir,
            desc,
        }
    }

    /// Reports whether the process is still running (reaping it if not).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// Returns the PID of the process (and of its process group).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` to the process's whole group (the one created for it):
    /// what a terminal's Ctrl-C does to a foreground job.
    pub fn signal_group(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall; -pid is the process group created for this child.
            unsafe { libc::kill(-(pid as i32), sig) };
        }
    }

    /// Snapshot of the stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait (bounded) until `pred` holds for the lines so far.
    pub fn wait_lines(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.lines()) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Give the reader thread a moment to drain the pipe.
                thread::sleep(Duration::from_millis(100));
                if pred(&self.lines()) {
                    return;
                }
                panic!(
                    "`{}` exited ({st}) before {what}; stdout tail: {:?}\nstderr: {}",
                    self.desc,
                    self.lines().iter().rev().take(10).collect::<Vec<_>>(),
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "hang detector: {what} not seen within {timeout:?} from `{}`",
                    self.desc
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for the exit; panics on the hang detector.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                thread::sleep(Duration::from_millis(50)); // let the reader drain
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "hang detector: `{}` still running after {timeout:?}",
                    self.desc
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall; -pid is the process group created for this child.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}
