//! `nbd://host[:port][/export]` URIs (the TCP subset of the NBD URI
//! specification; the default port is 10809, the default export "").

use crate::error::ClientError;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Splits an NBD URI into `host:port` and the export name.
pub fn parse(uri: &str) -> Result<(String, String), ClientError> {
    let bad = |why: &str| ClientError::Invalid(format!("bad NBD URI {uri:?}: {why}"));
    let rest = uri
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
    Ok((
        addr,
        percent_decode(export).map_err(|_| bad("bad percent-encoding"))?,
    ))
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
        assert!(parse("nbd://h:notaport/x").is_err());
        assert!(parse("nbd:///x").is_err());
    }
}
