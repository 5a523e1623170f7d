//! Properties: round trips, no panics, prefixes never invalid, invalid stays invalid.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::prelude::*;

use super::*;
use crate::proxy_protocol::tlv::kind;

#[derive(Clone, Debug)]
enum AddrSpec {
    None,
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
    Unix(Vec<u8>, Vec<u8>),
}

#[derive(Clone, Debug)]
struct V2Spec {
    command: Command,
    transport: Transport,
    addrs: AddrSpec,
    tlvs: Vec<(u8, Vec<u8>)>,
    crc: bool,
}

fn v4() -> impl Strategy<Value = SocketAddrV4> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(ip.into(), port))
}

fn v6() -> impl Strategy<Value = SocketAddrV6> {
    (any::<[u8; 16]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddrV6::new(ip.into(), port, 0, 0))
}

fn unix_path() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1..=255u8, 0..=108)
}

fn addrs() -> impl Strategy<Value = AddrSpec> {
    prop_oneof![
        Just(AddrSpec::None),
        (v4(), v4()).prop_map(|(a, b)| AddrSpec::V4(a, b)),
        (v6(), v6()).prop_map(|(a, b)| AddrSpec::V6(a, b)),
        (unix_path(), unix_path()).prop_map(|(a, b)| AddrSpec::Unix(a, b)),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

fn ssl_value() -> impl Strategy<Value = Vec<u8>> {
    let sub = (any::<u8>(), "[ -~]{0,24}");
    (
        any::<u8>(),
        any::<u32>(),
        proptest::collection::vec(sub, 0..5),
    )
        .prop_map(|(client, verify, subs)| {
            let mut v = vec![client];
            v.extend_from_slice(&verify.to_be_bytes());
            for (k, s) in subs {
                v.push(k);
                v.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
                v.extend_from_slice(s.as_bytes());
            }
            v
        })
}

fn tlv() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let registered = [
        kind::ALPN,
        kind::AUTHORITY,
        kind::CRC32C,
        kind::NOOP,
        kind::UNIQUE_ID,
        kind::SSL,
        kind::NETNS,
    ];
    prop_oneof![
        (
            any::<u8>().prop_filter("registered", move |k| !registered.contains(k)),
            bytes(80)
        ),
        bytes(32).prop_map(|v| (kind::ALPN, v)),
        "\\PC{0,30}".prop_map(|s| (kind::AUTHORITY, s.into_bytes())),
        bytes(16).prop_map(|v| (kind::NOOP, v)),
        bytes(128).prop_map(|v| (kind::UNIQUE_ID, v)),
        "[a-z0-9_-]{0,16}".prop_map(|s| (kind::NETNS, s.into_bytes())),
        ssl_value().prop_map(|v| (kind::SSL, v)),
    ]
}

fn v2_spec() -> impl Strategy<Value = V2Spec> {
    (
        prop_oneof![Just(Command::Local), Just(Command::Proxy)],
        prop_oneof![
            Just(Transport::Unspec),
            Just(Transport::Stream),
            Just(Transport::Dgram)
        ],
        addrs(),
        proptest::collection::vec(tlv(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(command, transport, addrs, tlvs, crc)| V2Spec {
            command,
            transport,
            addrs,
            tlvs,
            crc,
        })
}

fn build(spec: &V2Spec) -> Vec<u8> {
    let mut b = V2Builder::new(spec.command, spec.transport);
    b = match &spec.addrs {
        AddrSpec::None => b,
        AddrSpec::V4(s, d) => b.addresses(SocketAddr::V4(*s), SocketAddr::V4(*d)),
        AddrSpec::V6(s, d) => b.addresses(SocketAddr::V6(*s), SocketAddr::V6(*d)),
        AddrSpec::Unix(s, d) => b.unix(s, d),
    };
    for (k, v) in &spec.tlvs {
        b = b.tlv(*k, v);
    }
    if spec.crc {
        b = b.crc32c();
    }
    b.build().unwrap()
}

fn opts_for(transport: Transport) -> DecodeOptions {
    match transport {
        Transport::Dgram => DATAGRAM,
        Transport::Stream | Transport::Unspec => STREAM,
    }
}

/// Checks what must hold for any input and returns the decoder's answer.
fn check_consistency<'a>(buf: &'a [u8], opts: &DecodeOptions) -> Result<Decoded<'a>, Invalid> {
    let got = decode(buf, opts);
    match &got {
        Ok(Decoded::Complete { len, .. }) => {
            assert!(*len <= buf.len());
            assert_eq!(decode(&buf[..*len], opts), got);
            for k in 0..*len {
                assert!(
                    matches!(decode(&buf[..k], opts), Ok(Decoded::NeedMore { .. })),
                    "prefix {k}"
                );
            }
        }
        Ok(Decoded::NeedMore { at_least }) => {
            assert!(*at_least > buf.len());
            for k in 0..buf.len() {
                assert!(decode(&buf[..k], opts).is_ok(), "prefix {k} invalid");
            }
        }
        Err(_) => {
            let mut longer = buf.to_vec();
            longer.extend_from_slice(b"\r\n\0PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
            assert!(decode(&longer, opts).is_err());
        }
    }
    got
}

/// Inputs that start like a header, so the fuzzing gets past the first byte.
fn header_like() -> impl Strategy<Value = Vec<u8>> {
    let v1_heads = prop_oneof![
        Just(&b"PROXY "[..]),
        Just(&b"PROXY TCP4 "[..]),
        Just(&b"PROXY TCP6 "[..]),
        Just(&b"PROXY TCP4 1.2.3.4 5.6.7.8 "[..]),
        Just(&b"PROXY UNKNOWN"[..]),
    ];
    let v1 = (
        v1_heads,
        proptest::collection::vec(
            prop::sample::select(&b"0123456789abcdef:. \r\nTCPUNK%+"[..]),
            0..60,
        ),
    )
        .prop_map(|(h, t)| [h, &t].concat());
    let v2 = (any::<u8>(), any::<u8>(), any::<u8>(), bytes(300)).prop_map(|(c, f, hi, rest)| {
        let mut v = crate::proxy_protocol::v2::SIGNATURE.to_vec();
        v.extend_from_slice(&[0x20 | (c & 0x01), f, hi & 0x01]);
        let len = u8::try_from(rest.len().min(255)).unwrap();
        v.push(len);
        v.extend_from_slice(&rest);
        v
    });
    prop_oneof![bytes(200), v1, v2]
}

proptest! {
    #[test]
    fn v2_roundtrip(spec in v2_spec()) {
        let h = build(&spec);
        let opts = opts_for(spec.transport);
        let (header, len) = match decode(&h, &opts) {
            Ok(Decoded::Complete { header, len }) => (header, len),
            other => panic!("{spec:?} -> {other:?}"),
        };
        prop_assert_eq!(len, h.len());
        prop_assert_eq!(header.version, Version::V2);
        prop_assert_eq!(header.command, spec.command);
        prop_assert_eq!(header.transport, spec.transport);
        match (&spec.addrs, header.addresses) {
            (AddrSpec::None, Addresses::None) => prop_assert_eq!(header.family, Family::Unspec),
            (AddrSpec::V4(s, d), Addresses::Inet { source, destination }) => {
                prop_assert_eq!((*s, *d), (source, destination));
            }
            (AddrSpec::V6(s, d), Addresses::Inet6 { source, destination }) => {
                prop_assert_eq!((*s, *d), (source, destination));
            }
            (AddrSpec::Unix(s, d), Addresses::Unix { source, destination }) => {
                prop_assert_eq!((&s[..], &d[..]), (source.path(), destination.path()));
            }
            (want, got) => panic!("addresses {want:?} came back as {got:?}"),
        }
        let raw: Vec<(u8, Vec<u8>)> = header.tlvs.raw().map(|t| (t.kind, t.value.to_vec())).collect();
        let (body, crc) = raw.split_at(spec.tlvs.len());
        prop_assert_eq!(body, &spec.tlvs[..]);
        prop_assert_eq!(crc.len(), usize::from(spec.crc));
        prop_assert_eq!(header.tlvs.iter().count(), raw.len());
        let proxied = spec.command == Command::Proxy
            && spec.transport != Transport::Unspec
            && matches!(spec.addrs, AddrSpec::V4(..) | AddrSpec::V6(..));
        prop_assert_eq!(matches!(header.endpoints(), Endpoints::Proxied { .. }), proxied);
        // Every prefix asks for more, with a bound that never overshoots.
        for k in 0..h.len() {
            match decode(&h[..k], &opts) {
                Ok(Decoded::NeedMore { at_least }) => prop_assert!(k < at_least && at_least <= h.len()),
                other => panic!("prefix {k} of {spec:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn v1_roundtrip(v6 in any::<bool>(), a4 in v4(), b4 in v4(), a6 in v6(), b6 in v6()) {
        let (client, dst) = if v6 {
            (SocketAddr::V6(a6), SocketAddr::V6(b6))
        } else {
            (SocketAddr::V4(a4), SocketAddr::V4(b4))
        };
        let line = encode_v1(client, dst);
        let (header, len) = match decode(&line, &STREAM) {
            Ok(Decoded::Complete { header, len }) => (header, len),
            other => panic!("{line:?} -> {other:?}"),
        };
        prop_assert_eq!(len, line.len());
        prop_assert_eq!(header.version, Version::V1);
        prop_assert_eq!(
            header.endpoints(),
            Endpoints::Proxied { client: crate::addr::ClientAddr(client), destination: crate::addr::OrigDstAddr(dst) }
        );
        for k in 0..line.len() {
            match decode(&line[..k], &STREAM) {
                Ok(Decoded::NeedMore { at_least }) => prop_assert!(k < at_least && at_least <= line.len()),
                other => panic!("prefix {k} of {line:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_consistent(
        buf in header_like(),
        datagram in any::<bool>(),
        max in prop_oneof![Just(16usize), Just(40), Just(DEFAULT_MAX_HEADER_LEN), Just(MAX_POSSIBLE_HEADER_LEN)],
    ) {
        let opts = if datagram { DATAGRAM } else { STREAM }.with_max_header_len(max);
        let _ = check_consistency(&buf, &opts);
    }

    #[test]
    fn corrupted_valid_headers_never_panic(spec in v2_spec(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let mut h = build(&spec);
        for (i, x) in flips {
            let n = h.len();
            h[i % n] ^= x;
        }
        let _ = check_consistency(&h, &opts_for(spec.transport));
    }
}

#[test]
fn mixed_family_v1_goes_out_as_tcp6() {
    let line = encode_v1(sa("192.0.2.1:1"), sa("[2001:db8::2]:2"));
    assert_eq!(line, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n");
    complete(&line, &STREAM);
}

#[test]
fn encoder_refuses_what_the_length_field_cannot_say() {
    let b = V2Builder::local().tlv(0xE0, &vec![0; 65536]);
    assert_eq!(
        b.build(),
        Err(EncodeError::TlvTooLong {
            kind: 0xE0,
            len: 65536
        })
    );
    let b = V2Builder::local()
        .tlv(0xE0, &vec![0; 40000])
        .tlv(0xE1, &vec![0; 40000]);
    assert_eq!(b.build(), Err(EncodeError::HeaderTooLong(80006)));
}
