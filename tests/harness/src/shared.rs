//! A fixture shared by every test of one test binary (e.g. one cluster and
//! one array daemon for a whole file), started once and stopped when the
//! binary exits.
//!
//! A `static` is never dropped, so daemons held in one would outlive the
//! test binary. [`Shared`] closes that gap twice:
//!
//! - the fixture is built on a *keeper thread* that lives as long as the
//!   process. Every daemon the harness spawns from that thread gets
//!   `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills it when the thread that
//!   spawned it ends. (The signal follows the spawning *thread*, not the
//!   process; that is why the fixture is not built on the test thread that
//!   happens to ask first, which ends with its test.) This holds however
//!   the binary ends: a failed test, a panic in `main`, or a CI timeout's
//!   SIGKILL.
//! - at a normal exit (libtest returns or calls `exit`), an `atexit`
//!   handler drops the fixture: its daemons are killed by PID and reaped
//!   and their temporary directories removed, as any harness object does
//!   on drop.
//!
//! Tests get an `Arc` of the fixture and may use it from parallel threads,
//! so it offers `&self` methods only. A daemon of the fixture restarted
//! from a test thread would be spawned without the death signal: shared
//! daemons are not for restarting (use a private one for that).

use std::cell::Cell;
use std::sync::{Arc, Mutex, Once, mpsc};
use std::thread;

thread_local! {
    static KEEPER: Cell<bool> = const { Cell::new(false) };
}

/// Reports whether the current thread is a [`Shared`] keeper thread (whose
/// spawned daemons must die with it).
pub(crate) fn on_keeper_thread() -> bool {
    KEEPER.with(Cell::get)
}

/// Makes `cmd`'s process receive SIGKILL when the spawning thread ends
/// (`PR_SET_PDEATHSIG`), and refuse to start if that already happened.
pub(crate) fn die_with_spawning_thread(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe syscalls (prctl, getppid); it allocates only
    // on the error path, where the child is abandoned anyway.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have gone between fork and prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the spawning process is gone"));
            }
            Ok(())
        });
    }
}

type ExitHook = Box<dyn FnOnce() + Send>;

static AT_EXIT: Mutex<Vec<ExitHook>> = Mutex::new(Vec::new());

extern "C" fn run_exit_hooks() {
    let hooks = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for hook in hooks {
        // A panic must not unwind into libc's exit.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook));
    }
}

fn at_exit(hook: ExitHook) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that never unwinds.
        unsafe { libc::atexit(run_exit_hooks) };
    });
    AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
}

enum Slot<T> {
    Empty,
    Ready(Arc<T>),
    /// The start panicked; every later test fails with the same message
    /// instead of trying again.
    Failed(String),
}

/// A fixture started once per test binary; see the module docs.
pub struct Shared<T> {
    slot: Mutex<Slot<T>>,
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// Returns an empty fixture, for a `static`.
    pub const fn new() -> Self {
        Shared {
            slot: Mutex::new(Slot::Empty),
        }
    }

    /// Returns the fixture, starting it with `start` on a keeper thread if
    /// this is the first call. Panics (in every calling test) if `start`
    /// panicked.
    pub fn get(&'static self, start: impl FnOnce() -> T + Send + 'static) -> Arc<T> {
        // Held while starting: concurrent first callers wait for one start.
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Slot::Ready(t) => return t.clone(),
            Slot::Failed(msg) => panic!("the shared fixture failed to start: {msg}"),
            Slot::Empty => {}
        }
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("shared-fixture-keeper".into())
            .spawn(move || {
                KEEPER.with(|k| k.set(true));
                let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(start));
                let ok = started.is_ok();
                let _ = tx.send(started.map(Arc::new).map_err(|p| panic_message(&*p)));
                if ok {
                    // The daemons die when this thread does: at process exit.
                    loop {
                        thread::park();
                    }
                }
            })
            .expect("spawn the keeper thread");
        let started = rx
            .recv()
            .unwrap_or_else(|_| Err("the keeper thread vanished".to_string()));
        match started {
            Ok(t) => {
                *slot = Slot::Ready(t.clone());
                at_exit(Box::new(move || {
                    let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                    // Dropping the last reference stops the daemons.
                    *slot = Slot::Empty;
                }));
                t
            }
            Err(msg) => {
                *slot = Slot::Failed(msg.clone());
                panic!("the shared fixture failed to start: {msg}");
            }
        }
    }
}

impl<T: Send + Sync + 'static> Default for Shared<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".to_string())
}
