//! Upstream identity: which throttle share each NBD connection draws from.
//!
//! NBD connections carry no identity. An upstream (an array daemon, or any
//! client that asks) holds a grant as a lease over gRPC and registers the
//! local address of each NBD connection it opened under it; the node
//! matches accepted connections by peer address. Connections nobody
//! registered draw from the foreground pool.
//!
//! A registration may arrive before or after the node accepts the
//! connection, so the table maps addresses to a shared cell that both the
//! connection and the lease update; a connection reads its share from the
//! cell for every request (one atomic load).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::throttle::{FOREGROUND, ShareId};

/// The share a connection draws from, shared by the connection and its lease.
#[derive(Debug)]
pub struct ConnShare(AtomicU64);

impl ConnShare {
    /// Returns the share id.
    pub fn get(&self) -> ShareId {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, share: ShareId) {
        self.0.store(share, Ordering::Relaxed);
    }
}

/// The table of connection addresses and their shares.
#[derive(Debug, Default)]
pub struct Upstreams {
    table: Mutex<HashMap<SocketAddr, Arc<ConnShare>>>,
}

impl Upstreams {
    /// Returns an empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ConnShare>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the share cell for an accepted connection from `peer`.
    pub fn attach(&self, peer: SocketAddr) -> Arc<ConnShare> {
        self.lock()
            .entry(peer)
            .or_insert_with(|| Arc::new(ConnShare(AtomicU64::new(FOREGROUND))))
            .clone()
    }

    /// Forgets a closed connection's cell unless a lease still names it.
    pub fn detach(&self, peer: SocketAddr, cell: Arc<ConnShare>) {
        let mut t = self.lock();
        // Two owners left (the table and us) and no lease assignment: drop it.
        if Arc::strong_count(&cell) <= 2 && cell.get() == FOREGROUND {
            t.remove(&peer);
        }
    }

    /// Assigns the connection from `addr` (now or later) to `share`.
    pub fn assign(&self, addr: SocketAddr, share: ShareId) {
        self.lock()
            .entry(addr)
            .or_insert_with(|| Arc::new(ConnShare(AtomicU64::new(FOREGROUND))))
            .set(share);
    }

    /// Returns the connection from `addr` to the foreground pool.
    pub fn unassign(&self, addr: SocketAddr) {
        let mut t = self.lock();
        if let Some(cell) = t.get(&addr) {
            cell.set(FOREGROUND);
            if Arc::strong_count(cell) == 1 {
                t.remove(&addr);
            }
        }
    }

    /// Returns the share assigned to `addr`, if any.
    pub fn share_of(&self, addr: SocketAddr) -> Option<ShareId> {
        self.lock().get(&addr).map(|c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_before_and_after_accept() {
        let u = Upstreams::new();
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        u.assign(a, 7);
        let ca = u.attach(a);
        assert_eq!(ca.get(), 7, "registered before the connection was accepted");
        let cb = u.attach(b);
        assert_eq!(cb.get(), FOREGROUND);
        u.assign(b, 9);
        assert_eq!(cb.get(), 9, "registered after");
        u.unassign(b);
        assert_eq!(cb.get(), FOREGROUND);
        u.detach(b, cb);
        assert_eq!(u.share_of(b), None);
        u.detach(a, ca);
        assert_eq!(u.share_of(a), Some(7), "still named by its lease");
    }
}
