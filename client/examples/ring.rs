//! The completion ring in use: keep a queue of reads and writes in flight
//! against an export, collect completions from the ring, check the data.
//!
//! ```text
//! cargo run -p nbdraid-client --example ring -- nbd://127.0.0.1:10809/vol0
//! ```

use bytes::Bytes;
use nbdraid_client::{Client, ClientConfig, CompletionRing, Indirect, Request};

const BLOCK: usize = 4096;
const DEPTH: usize = 32;
const BLOCKS: u64 = 1024;

fn pattern(block: u64) -> Bytes {
    Bytes::from(
        (0..BLOCK)
            .map(|i| (block as usize * 31 + i) as u8)
            .collect::<Vec<_>>(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let uri = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nbd://127.0.0.1:10809".into());
    let client = Client::connect_uri(&uri, ClientConfig::default()).await?;
    let blocks = BLOCKS.min(client.info().size / BLOCK as u64);
    // A ring of 64 slots: at most 64 operations pending or unconsumed.
    let ring = CompletionRing::new(64)?;

    // Phase 1: write every block, DEPTH at a time. caller_data = block number.
    let (mut next, mut done) = (0u64, 0u64);
    while done < blocks {
        while next < blocks && (next - done) < DEPTH as u64 {
            let req = Request::Write {
                offset: next * BLOCK as u64,
                data: pattern(next),
                fua: false,
            };
            match ring.indirect(&client, req, next).map_err(|r| r.error)? {
                Indirect::Done(e) => {
                    e.status?;
                    done += 1;
                } // finished without blocking
                Indirect::Pending => {}
            }
            next += 1;
        }
        ring.ring_wait(ring.user_tail()).await;
        while let Some(e) = ring.pop() {
            e.status?;
            done += 1;
        }
    }
    client.flush().await?;

    // Phase 2: read them back through the ring; buffers come back filled.
    let (mut next, mut done) = (0u64, 0u64);
    while done < blocks {
        while next < blocks && (next - done) < DEPTH as u64 {
            let req = Request::Read {
                offset: next * BLOCK as u64,
                buf: vec![0; BLOCK].into(),
            };
            if let Indirect::Done(e) = ring.indirect(&client, req, next).map_err(|r| r.error)? {
                e.status?;
                done += 1;
            }
            next += 1;
        }
        let tail = ring.user_tail();
        ring.ring_wait(tail).await;
        while let Some(e) = ring.pop() {
            e.status?;
            let buf = e.buffer.ok_or("read completed without its buffer")?;
            if buf[..] != pattern(e.caller_data)[..] {
                return Err(format!("block {} read back wrong", e.caller_data).into());
            }
            done += 1;
        }
    }
    println!(
        "wrote and verified {blocks} blocks of {BLOCK} bytes through a {}-slot ring",
        ring.elements()
    );
    client.close(std::time::Duration::from_secs(5)).await;
    Ok(())
}
