//! `nbd://host[:port][/export][?query]` URIs (the TCP subset of the NBD
//! URI specification; the default port is 10809, the default export "").
//!
//! The query is nbdraid's: `grpc=host:port` names the control plane of the
//! layer serving the export (its `Throttle` service: cost model, grants),
//! for an upstream such as an array daemon. Other query parameters are
//! refused, so a typo is not silently ignored.

use crate::error::ClientError;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// An NBD URI taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// `host:port` of the NBD server.
    pub addr: String,
    /// The export name.
    pub export: String,
    /// `host:port` of the layer's gRPC control plane (`?grpc=`), if given.
    pub grpc: Option<String>,
}

/// Splits an NBD URI into `host:port` and the export name.
pub fn parse(uri: &str) -> Result<(String, String), ClientError> {
    parse_full(uri).map(|u| (u.addr, u.export))
}

/// Parses an NBD URI with its query (see the module docs).
pub fn parse_full(uri: &str) -> Result<NbdUri, ClientError> {
    let bad = |why: &str| ClientError::Invalid(format!("bad NBD URI {uri:?}: {why}"));
    let (uri_part, query) = match uri.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (uri, None),
    };
    let mut grpc = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("grpc", v)) if !v.is_empty() => {
                let port = v.rsplit(':').next().unwrap_or("");
                if !v.contains(':') || port.parse::<u16>().is_err() {
                    return Err(bad("grpc= needs host:port"));
                }
                grpc = Some(v.to_string());
            }
            _ => {
                return Err(bad(&format!(
                    "unknown query parameter {pair:?} (only grpc=host:port)"
                )));
            }
        }
    }
    let rest = uri_part
        .strip_prefix("nbd://")
        .ok_or_else(|| bad("only nbd://host[:port][/export] is supported"))?;
    let (authority, export) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(bad("missing host"));
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    let addr = if has_port {
        let port = authority.rsplit(':').next().unwrap_or("");
        port.parse::<u16>().map_err(|_| bad("bad port"))?;
        authority.to_string()
    } else {
        format!("{authority}:{DEFAULT_PORT}")
    };
    Ok(NbdUri {
        addr,
        export: percent_decode(export).map_err(|_| bad("bad percent-encoding"))?,
        grpc,
    })
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            parse("nbd://127.0.0.1:1234/vol0").unwrap(),
            ("127.0.0.1:1234".into(), "vol0".into())
        );
        assert_eq!(
            parse("nbd://host").unwrap(),
            ("host:10809".into(), "".into())
        );
        assert_eq!(
            parse("nbd://[::1]:99/a%20b").unwrap(),
            ("[::1]:99".into(), "a b".into())
        );
        assert!(parse("http://x").is_err());
        assert_eq!(
            parse_full("nbd://h:1/v?grpc=127.0.0.1:5").unwrap(),
            NbdUri {
                addr: "h:1".into(),
                export: "v".into(),
                grpc: Some("127.0.0.1:5".into())
            }
        );
        assert_eq!(
            parse("nbd://h:1/v?grpc=h:5").unwrap(),
            ("h:1".into(), "v".into())
        );
        assert!(parse("nbd://h/v?grpc=nohost").is_err());
        assert!(parse("nbd://h/v?tls=1").is_err());
        assert!(parse("nbd://h:notaport/x").is_err());
        assert!(parse("nbd:///x").is_err());
    }
}
