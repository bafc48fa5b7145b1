//! What every subcommand needs from an NBD export: connecting with a clear
//! error, and walking its allocation map (`base:allocation` block status).

use std::collections::VecDeque;

use anyhow::{Context, Result, bail};
use nbdraid_client::{Client, ClientConfig, ClientError, Extent};
use nbdraid_proto::consts::allocation;

/// Reports whether `arg` names an NBD export rather than a local path.
///
/// Anything that looks like `scheme://` counts, so a mistyped URI is
/// rejected by the URI parser instead of being created as a local file.
pub fn is_uri(arg: &str) -> bool {
    arg.split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(is_scheme_char))
}

fn is_scheme_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
}

/// Connects to `uri` with up to `connections` connections (more than one
/// only when the server advertises multi-conn).
pub async fn connect(uri: &str, connections: usize) -> Result<Client> {
    let config = ClientConfig {
        connections: connections.max(1),
        ..ClientConfig::default()
    };
    Client::connect_uri(uri, config)
        .await
        .with_context(|| format!("cannot open {uri}"))
}

/// Converts a client error into an `anyhow` error naming the operation.
pub fn op_error(e: ClientError, what: &str, offset: u64, len: u64) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("{what} at offset {offset}, length {len}"))
}

/// Reports whether an extent reads as zeroes.
pub fn is_zero(e: &Extent) -> bool {
    e.flags & allocation::ZERO != 0
}

/// Reports whether an extent is unallocated.
pub fn is_hole(e: &Extent) -> bool {
    e.flags & allocation::HOLE != 0
}

/// Walks the block status of `[start, end)` in order, one request at a
/// time, yielding extents clipped to the range.
///
/// The server may answer for less than was asked (the walk asks again from
/// where the answer stopped) or for more (the extent is clipped). An answer
/// that makes no progress is an error rather than an endless loop.
pub struct ExtentWalker<'a> {
    client: &'a Client,
    pos: u64,
    end: u64,
    queue: VecDeque<Extent>,
    /// BLOCK_STATUS requests sent so far.
    pub requests: u64,
}

/// Largest BLOCK_STATUS length asked for (the wire length is 32 bits).
const STATUS_MAX: u64 = 1 << 31;

impl<'a> ExtentWalker<'a> {
    /// Starts a walk of `[start, end)`.
    pub fn new(client: &'a Client, start: u64, end: u64) -> Self {
        Self {
            client,
            pos: start,
            end,
            queue: VecDeque::new(),
            requests: 0,
        }
    }

    /// Returns the offset up to which extents have been fetched.
    pub fn fetched_to(&self) -> u64 {
        self.pos
    }

    /// Returns the next extent, or `None` at the end of the range.
    pub async fn next(&mut self) -> Result<Option<Extent>> {
        if let Some(e) = self.queue.pop_front() {
            return Ok(Some(e));
        }
        if self.pos >= self.end {
            return Ok(None);
        }
        let len = (self.end - self.pos).min(STATUS_MAX);
        let extents = self
            .client
            .block_status(self.pos, len)
            .await
            .map_err(|e| op_error(e, "block status", self.pos, len))?;
        self.requests += 1;
        let mut at = self.pos;
        for e in extents {
            if e.offset != at {
                bail!(
                    "the server's block status extents are not contiguous: expected offset {at}, got {}",
                    e.offset
                );
            }
            let len = e.len.min(self.end - at);
            if len == 0 {
                break;
            }
            self.queue.push_back(Extent {
                offset: at,
                len,
                flags: e.flags,
            });
            at += len;
            if at >= self.end {
                break;
            }
        }
        if at == self.pos {
            bail!(
                "the server's block status at offset {} made no progress",
                self.pos
            );
        }
        self.pos = at;
        Ok(self.queue.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_paths() {
        assert!(is_uri("nbd://127.0.0.1:10809/vol0"));
        assert!(is_uri("nbd+unix:///x?socket=/s"));
        assert!(is_uri("http://x"));
        assert!(!is_uri("/tmp/file"));
        assert!(!is_uri("relative/path"));
        assert!(!is_uri("./odd://name"));
    }
}
