//! The data layouts of option requests that carry structure: NBD_OPT_INFO /
//! NBD_OPT_GO and NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
//!
//! Parsing is strict: every length must match the option's data exactly,
//! and strings must be UTF-8 without NUL and at most 4096 bytes. A request
//! that breaks any of that is an [`ProtoError::Malformed`], which a server
//! answers with NBD_REP_ERR_INVALID while keeping option framing (the data
//! was already consumed whole by the codec).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ProtoError;
use crate::consts::MAX_STRING_LEN;

/// The data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information types requested.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses option data.
    pub fn parse(mut data: &[u8]) -> Result<Self, ProtoError> {
        let bad = ProtoError::Malformed;
        if data.len() < 6 {
            return Err(bad("INFO/GO data shorter than 6 bytes"));
        }
        let name_len = data.get_u32() as usize;
        if name_len > data.len() - 2 {
            return Err(bad("INFO/GO name length exceeds the option data"));
        }
        let name = parse_string(&data[..name_len])?;
        data.advance(name_len);
        let n = data.get_u16() as usize;
        if data.len() != n * 2 {
            return Err(bad(
                "INFO/GO information request count does not match the data",
            ));
        }
        let requests = (0..n).map(|_| data.get_u16()).collect();
        Ok(Self { name, requests })
    }

    /// Returns the wire form of the option data.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.put_u32(self.name.len() as u32);
        b.put_slice(self.name.as_bytes());
        b.put_u16(self.requests.len() as u16);
        for r in &self.requests {
            b.put_u16(*r);
        }
        b.freeze()
    }
}

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Context queries, each `namespace:leaf` (or a namespace prefix for LIST).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses option data.
    pub fn parse(mut data: &[u8]) -> Result<Self, ProtoError> {
        let bad = ProtoError::Malformed;
        if data.len() < 8 {
            return Err(bad("meta context data shorter than 8 bytes"));
        }
        let name_len = data.get_u32() as usize;
        if name_len > data.len().saturating_sub(4) {
            return Err(bad(
                "meta context export name length exceeds the option data",
            ));
        }
        let export = parse_string(&data[..name_len])?;
        data.advance(name_len);
        let n = data.get_u32() as usize;
        // Each query needs at least its 4-byte length: bound the count before allocating.
        if n > data.len() / 4 {
            return Err(bad("meta context query count exceeds the option data"));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            if data.len() < 4 {
                return Err(bad("meta context query truncated"));
            }
            let len = data.get_u32() as usize;
            if len > data.len() {
                return Err(bad("meta context query length exceeds the option data"));
            }
            queries.push(parse_string(&data[..len])?);
            data.advance(len);
        }
        if data.has_remaining() {
            return Err(bad("meta context data has trailing bytes"));
        }
        Ok(Self { export, queries })
    }

    /// Returns the wire form of the option data.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32(self.export.len() as u32);
        b.put_slice(self.export.as_bytes());
        b.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            b.put_u32(q.len() as u32);
            b.put_slice(q.as_bytes());
        }
        b.freeze()
    }
}

/// Parses an NBD_REP_SERVER reply's data into the export name and description.
pub fn parse_server_reply(mut data: &[u8]) -> Result<(String, String), ProtoError> {
    if data.len() < 4 {
        return Err(ProtoError::Malformed("NBD_REP_SERVER"));
    }
    let len = data.get_u32() as usize;
    if len > data.len() {
        return Err(ProtoError::Malformed("NBD_REP_SERVER name length"));
    }
    let name = String::from_utf8_lossy(&data[..len]).into_owned();
    let desc = String::from_utf8_lossy(&data[len..]).into_owned();
    Ok((name, desc))
}

/// Parses an NBD_REP_META_CONTEXT reply's data into the context id and name.
pub fn parse_meta_context_reply(mut data: &[u8]) -> Result<(u32, String), ProtoError> {
    if data.len() < 4 {
        return Err(ProtoError::Malformed("NBD_REP_META_CONTEXT"));
    }
    let id = data.get_u32();
    Ok((id, String::from_utf8_lossy(data).into_owned()))
}

/// Validates a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(raw: &[u8]) -> Result<String, ProtoError> {
    if raw.len() > MAX_STRING_LEN {
        return Err(ProtoError::Malformed("string longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(ProtoError::Malformed("string contains NUL"));
    }
    String::from_utf8(raw.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}
