//! The real NBD servers the client runs against, behind one type: the
//! storage node (`nbdraid_harness::Node`), `nbdkit memory` and `qemu-nbd`
//! (`nbdraid_harness::Peer`). Starting, readiness, restarts on the same
//! port and killing by PID are the harness's; this adapter only adds what
//! the client tests ask of "a server": its address, the export it serves
//! and whether data survives a restart.
//!
//! A missing external tool skips the test with a printed `SKIP` line,
//! unless `NBDRAID_TEST_REQUIRE_TOOLS` is set (CI), where it fails.

use nbdraid_harness::{Node, Peer};

/// Which server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `nbdraid-node` from this workspace, one volume `vol0`.
    Node,
    /// `nbdkit memory size=...` (export "").
    Nbdkit,
    /// `qemu-nbd` over a raw sparse file (export `vol0`).
    Qemu,
}

/// The process behind a [`Server`].
enum Daemon {
    Node(Node),
    Peer(Peer),
}

/// A running (or stopped) server with one export of a given size.
pub struct Server {
    kind: Kind,
    daemon: Daemon,
}

impl Server {
    /// Starts a server of `kind` with an export of `size` bytes; `extra`
    /// arguments go to the server (before the nbdkit plugin name). Returns
    /// `None` (the test skips) if the server is not installed.
    pub fn start(test: &str, kind: Kind, size: u64, extra: &[&str]) -> Option<Server> {
        let daemon = match kind {
            Kind::Node => Daemon::Node(
                extra
                    .iter()
                    .fold(Node::builder().volume(&format!("vol0:{size}")), |b, a| {
                        b.arg(a)
                    })
                    .start(),
            ),
            Kind::Nbdkit => Daemon::Peer(Peer::nbdkit_memory(test, size, extra)?),
            Kind::Qemu => Daemon::Peer(Peer::qemu_nbd(test, size, extra)?),
        };
        Some(Server { kind, daemon })
    }

    /// Returns `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        match &self.daemon {
            Daemon::Node(n) => n.addr().to_string(),
            Daemon::Peer(p) => p.addr(),
        }
    }

    /// Returns the export name the server serves.
    pub fn export(&self) -> &'static str {
        match self.kind {
            Kind::Nbdkit => "",
            Kind::Node | Kind::Qemu => "vol0",
        }
    }

    /// Returns which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Reports whether data survives a restart (nbdkit memory loses it).
    pub fn persistent(&self) -> bool {
        self.kind != Kind::Nbdkit
    }

    /// Freezes the server with SIGSTOP: it accepts nothing and answers
    /// nothing until killed.
    pub fn freeze(&self) {
        match &self.daemon {
            Daemon::Node(n) => n.freeze(),
            Daemon::Peer(p) => p.freeze(),
        }
    }

    /// Asks the server to shut down with SIGTERM and reaps it (a hang
    /// detector bounds the wait).
    pub fn terminate(&mut self) {
        match &mut self.daemon {
            Daemon::Node(n) => {
                n.terminate();
            }
            Daemon::Peer(p) => p.terminate(),
        }
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        match &mut self.daemon {
            Daemon::Node(n) => {
                if n.is_running() {
                    n.kill9();
                }
            }
            Daemon::Peer(p) => p.kill(),
        }
    }

    /// Starts the server again on the same port (and the same data, for the
    /// node and qemu-nbd).
    pub fn restart(&mut self) {
        match &mut self.daemon {
            Daemon::Node(n) => n.restart(),
            Daemon::Peer(p) => p.restart(),
        }
    }
}
