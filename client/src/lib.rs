//! A pipelined, asynchronous NBD client with a syslet-style completion ring.
//!
//! - [`Client`]: connections to one export; many requests in flight per
//!   connection, replies matched by cookie in any order; several
//!   connections when the server allows multi-conn; requests split to the
//!   server's maximum payload; deadlines and stall detection so a dead or
//!   stalled server fails requests instead of hanging them. The `async fn`
//!   API (`read`, `write`, `flush`, ...) is for ordinary Rust callers.
//! - [`CompletionRing`]: the syslet-style API: [`CompletionRing::indirect`]
//!   submits without blocking and returns the final status at once when it
//!   can, completions land in the ring, [`CompletionRing::ring_wait`]
//!   waits without lost wake-ups, and the ring can never overflow.
//!
//! Errors ([`ClientError`]) separate a member's failure from a caller's
//! mistake ([`ClientError::is_member_failure`]), which is what the RAID
//! layer builds on.
//!
//! ```no_run
//! # async fn demo() -> Result<(), nbdraid_client::ClientError> {
//! use nbdraid_client::{Client, ClientConfig, CompletionRing, Indirect, Request};
//! let client = Client::connect_uri("nbd://127.0.0.1:10809/vol0", ClientConfig::default()).await?;
//! let ring = CompletionRing::new(64)?;
//! let req = Request::Read { offset: 0, buf: vec![0; 4096].into() };
//! match ring.indirect(&client, req, 7).map_err(|r| r.error)? {
//!     Indirect::Done(entry) => println!("finished at once: {:?}", entry.status),
//!     Indirect::Pending => {
//!         ring.ring_wait(ring.user_tail()).await;
//!         let entry = ring.pop().expect("an entry is past the tail");
//!         assert_eq!(entry.caller_data, 7);
//!     }
//! }
//! # Ok(()) }
//! ```

mod client;
mod conn;
pub mod error;
pub mod handshake;
mod op;
pub mod ring;
pub mod uri;

pub use client::{Client, ClientConfig, Request, Started};
pub use conn::ConnState;
pub use error::{ClientError, Result};
pub use handshake::{ExportInfo, HandshakeOptions};
pub use op::{Done, Extent};
pub use ring::{CompletionRing, Indirect, Refused, RingEntry, Status};

/// The buffer type of READ requests (from `nbdraid_proto::buf`), so plain
/// callers need not name the wire crate.
pub use nbdraid_proto::buf::IoBuf;
