//! Property tests: every message round-trips through the pair of codecs,
//! and arbitrary bytes never panic a decoder.

use bytes::{Bytes, BytesMut};
use nbdraid_proto::consts::*;
use nbdraid_proto::*;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn option_request() -> impl Strategy<Value = OptionRequest> {
    (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..512)).prop_map(|(option, data)| {
        OptionRequest {
            option,
            data: Bytes::from(data),
        }
    })
}

fn option_reply() -> impl Strategy<Value = OptionReply> {
    (
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(option, reply_type, data)| {
            OptionReply::new(option, reply_type, Bytes::from(data))
        })
}

fn request_header() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

fn reply_header() -> impl Strategy<Value = ReplyHeader> {
    prop_oneof![
        (any::<u32>(), any::<u64>())
            .prop_map(|(error, cookie)| ReplyHeader::Simple { error, cookie }),
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>()).prop_map(
            |(flags, kind, cookie, length)| ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length
            }
        ),
    ]
}

/// Splits `bytes` at `cut` and feeds the two halves one after the other, so
/// decoders are exercised on partial input too.
fn decode_all<D: Decoder>(dec: &mut D, bytes: &[u8], cut: usize) -> Vec<D::Item>
where
    D::Error: std::fmt::Debug,
{
    let cut = cut.min(bytes.len());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in [&bytes[..cut], &bytes[cut..]] {
        buf.extend_from_slice(part);
        while let Some(item) = dec.decode(&mut buf).expect("valid input decodes") {
            out.push(item);
        }
    }
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    out
}

proptest! {
    #[test]
    fn client_messages_round_trip(flags in any::<u32>(), opts in proptest::collection::vec(option_request(), 0..8), cut in 0usize..4096) {
        let mut enc = ClientHandshakeCodec::default();
        let mut wire = BytesMut::new();
        enc.encode(ClientMessage::Flags(flags), &mut wire).unwrap();
        for o in &opts {
            enc.encode(ClientMessage::Option(o.clone()), &mut wire).unwrap();
        }
        let got = decode_all(&mut ServerHandshakeCodec::default(), &wire, cut);
        let mut want = vec![ClientMessage::Flags(flags)];
        want.extend(opts.into_iter().map(ClientMessage::Option));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn server_messages_round_trip(flags in any::<u16>(), replies in proptest::collection::vec(option_reply(), 0..8), size in any::<u64>(), tflags in any::<u16>(), zeroes in any::<bool>(), cut in 0usize..4096) {
        let mut enc = ServerHandshakeCodec::default();
        let mut wire = BytesMut::new();
        enc.encode(ServerMessage::Greeting { flags }, &mut wire).unwrap();
        for r in &replies {
            enc.encode(ServerMessage::OptionReply(r.clone()), &mut wire).unwrap();
        }
        let mut dec = ClientHandshakeCodec::default();
        let got = decode_all(&mut dec, &wire, cut);
        let mut want = vec![ServerMessage::Greeting { flags }];
        want.extend(replies.into_iter().map(ServerMessage::OptionReply));
        prop_assert_eq!(got, want);

        let mut wire = BytesMut::new();
        let msg = ServerMessage::ExportName { size, flags: tflags, zeroes };
        enc.encode(msg.clone(), &mut wire).unwrap();
        dec.expect_export_name_reply(zeroes);
        prop_assert_eq!(decode_all(&mut dec, &wire, cut), vec![msg]);
    }

    #[test]
    fn requests_round_trip(hdrs in proptest::collection::vec(request_header(), 0..16), cut in 0usize..512) {
        let mut wire = BytesMut::new();
        for h in &hdrs {
            ClientTransmissionCodec.encode(*h, &mut wire).unwrap();
        }
        prop_assert_eq!(decode_all(&mut ServerTransmissionCodec, &wire, cut), hdrs);
    }

    #[test]
    fn replies_round_trip(hdrs in proptest::collection::vec(reply_header(), 0..16), cut in 0usize..512) {
        let mut wire = BytesMut::new();
        for h in &hdrs {
            ServerTransmissionCodec.encode(*h, &mut wire).unwrap();
        }
        prop_assert_eq!(decode_all(&mut ClientTransmissionCodec, &wire, cut), hdrs);
    }

    #[test]
    fn info_and_meta_requests_round_trip(name in "[a-z0-9/._-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..8), queries in proptest::collection::vec("[a-z]{1,8}:[a-z]{0,16}", 0..6)) {
        let info = InfoRequest { name: name.clone(), requests: reqs };
        prop_assert_eq!(InfoRequest::parse(&info.encode()).unwrap(), info);
        let meta = MetaContextRequest { export: name, queries };
        prop_assert_eq!(MetaContextRequest::parse(&meta.encode()).unwrap(), meta);
    }

    #[test]
    fn info_items_round_trip(size in any::<u64>(), flags in any::<u16>(), a in any::<u32>(), b in any::<u32>(), c in any::<u32>(), text in "\\PC{0,40}") {
        for item in [
            InfoItem::Export { size, flags },
            InfoItem::BlockSize { min: a, preferred: b, max: c },
            InfoItem::Name(text.clone()),
            InfoItem::Description(text.clone()),
        ] {
            let r = OptionReply::info(opt::GO, &item);
            prop_assert_eq!(InfoItem::parse(&r.data).unwrap(), item);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut b = BytesMut::from(&bytes[..]);
        let mut s = ServerHandshakeCodec::new(256);
        while let Ok(Some(_)) = s.decode(&mut b) {}
        let mut b = BytesMut::from(&bytes[..]);
        let mut c = ClientHandshakeCodec::new(256);
        while let Ok(Some(_)) = c.decode(&mut b) {}
        let mut b = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = ServerTransmissionCodec.decode(&mut b) {}
        let mut b = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = ClientTransmissionCodec.decode(&mut b) {}
        let _ = InfoRequest::parse(&bytes);
        let _ = MetaContextRequest::parse(&bytes);
        let _ = InfoItem::parse(&bytes);
        let _ = ErrorChunk::parse(reply::TYPE_ERROR_OFFSET, &bytes);
        let _ = transmission::parse_block_status(&bytes);
        let _ = options::parse_server_reply(&bytes);
    }
}

#[test]
fn oversized_option_is_skipped_without_buffering() {
    let mut dec = ServerHandshakeCodec::new(16);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&0u32.to_be_bytes());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt::LIST.to_be_bytes());
    buf.extend_from_slice(&1000u32.to_be_bytes());
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(ClientMessage::Flags(0)));
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    for _ in 0..9 {
        buf.extend_from_slice(&[7u8; 100]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty(), "skipped data must not stay buffered");
    }
    buf.extend_from_slice(&[7u8; 100]);
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt::ABORT.to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        dec.decode(&mut buf).unwrap(),
        Some(ClientMessage::Oversized {
            option: opt::LIST,
            len: 1000
        })
    );
    assert_eq!(
        dec.decode(&mut buf).unwrap(),
        Some(ClientMessage::Option(OptionRequest {
            option: opt::ABORT,
            data: Bytes::new()
        }))
    );
}

#[test]
fn bad_magic_is_an_error() {
    let mut b = BytesMut::from(&[0u8; 28][..]);
    assert!(matches!(
        ServerTransmissionCodec.decode(&mut b),
        Err(ProtoError::BadMagic { .. })
    ));
    let mut b = BytesMut::from(&[0xffu8; 20][..]);
    assert!(ClientTransmissionCodec.decode(&mut b).is_err());
}

#[test]
fn malformed_info_requests_are_rejected() {
    // Name length larger than the data.
    let mut d = vec![0, 0, 1, 0];
    d.extend_from_slice(&[0, 0]);
    assert!(InfoRequest::parse(&d).is_err());
    // Count of info requests larger than the data.
    let d = [0, 0, 0, 0, 0, 5, 0, 1];
    assert!(InfoRequest::parse(&d).is_err());
    // NUL in the name.
    let d = [0, 0, 0, 1, 0, 0, 0];
    assert!(InfoRequest::parse(&d).is_err());
}
