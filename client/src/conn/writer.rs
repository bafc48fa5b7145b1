//! The writer task: drains the connection's queue and sends requests in
//! batches with vectored writes.
//!
//! A batch is up to [`BATCH`] requests taken from the queue at once; their
//! headers are encoded into one buffer and each WRITE's payload goes out
//! as its own slice of the caller's [`Bytes`](bytes::Bytes), so a payload
//! is never copied on its way to the socket (at most [`IOV_MAX`] slices
//! per system call). The batch, and with it the writer's share of each
//! payload, is dropped as soon as the whole batch is in the socket.
//!
//! NBD_CMD_DISC is the last request ever queued (see
//! [`Shared::soft_disconnect`]): after sending it the writer shuts down
//! our side of the socket and ends.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use nbdraid_proto::consts::cmd;

use super::{Outgoing, Shared};
use crate::error::ClientError;

/// Requests the writer takes from its queue for one batch.
const BATCH: usize = 256;
/// Most slices passed to one vectored write.
const IOV_MAX: usize = 1024;

/// Sends queued requests in batches until the queue closes, the
/// connection stops, or NBD_CMD_DISC has gone out; a send error fails the
/// connection.
pub(super) async fn writer(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let mut heads = BytesMut::with_capacity(BATCH * 28);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shared.stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        heads.clear();
        let mut disc = false;
        for o in &batch {
            o.header.put(&mut heads);
            disc |= o.header.command == cmd::DISC;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for (i, o) in batch.iter().enumerate() {
            slices.push(IoSlice::new(&heads[i * 28..(i + 1) * 28]));
            if let Some(p) = &o.payload {
                slices.push(IoSlice::new(p));
            }
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let upto = rest.len().min(IOV_MAX);
            let written = tokio::select! {
                w = wr.write_vectored(&rest[..upto]) => w,
                _ = shared.stop.cancelled() => return,
            };
            match written {
                Ok(0) => {
                    shared.fail(ClientError::ConnectionLost {
                        reason: "server closed the connection".into(),
                        possibly_applied: false,
                    });
                    return;
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) => {
                    shared.fail(ClientError::ConnectionLost {
                        reason: format!("send: {e}"),
                        possibly_applied: false,
                    });
                    return;
                }
            }
        }
        batch.clear();
        if disc {
            let _ = wr.shutdown().await;
            return;
        }
    }
}
