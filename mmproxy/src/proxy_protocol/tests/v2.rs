//! v2 cases from the spec summary, each its own test.

use std::net::{SocketAddrV4, SocketAddrV6};

use super::*;
use crate::addr::{ClientAddr, OrigDstAddr};

const PROXY: u8 = 0x21;
const LOCAL: u8 = 0x20;
const INET_STREAM: u8 = 0x11;

#[test]
fn v2_inet_stream_exact_values() {
    let h = v2_raw(PROXY, INET_STREAM, &inet_block());
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, 28);
    assert_eq!(header.version, Version::V2);
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(header.family, Family::Inet);
    assert_eq!(header.transport, Transport::Stream);
    assert_eq!(
        header.addresses,
        Addresses::Inet {
            source: SocketAddrV4::new([192, 0, 2, 1].into(), 5000),
            destination: SocketAddrV4::new([198, 51, 100, 2].into(), 443),
        }
    );
    assert!(header.tlvs.is_empty());
    assert_eq!(
        header.endpoints(),
        Endpoints::Proxied {
            client: ClientAddr(sa("192.0.2.1:5000")),
            destination: OrigDstAddr(sa("198.51.100.2:443")),
        }
    );
}

#[test]
fn v2_inet6_dgram_exact_values() {
    let mut block = Vec::new();
    block.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    block.extend_from_slice(
        &"2001:db8::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    block.extend_from_slice(&[0, 53, 0xff, 0xff]);
    let h = v2_raw(PROXY, 0x22, &block);
    let (header, len) = complete(&h, &DATAGRAM);
    assert_eq!(len, 16 + 36);
    assert_eq!(header.transport, Transport::Dgram);
    assert_eq!(
        header.addresses,
        Addresses::Inet6 {
            source: SocketAddrV6::new("2001:db8::1".parse().unwrap(), 53, 0, 0),
            destination: SocketAddrV6::new("2001:db8::2".parse().unwrap(), 65535, 0, 0),
        }
    );
    assert_eq!(
        header.endpoints(),
        Endpoints::Proxied {
            client: ClientAddr(sa("[2001:db8::1]:53")),
            destination: OrigDstAddr(sa("[2001:db8::2]:65535")),
        }
    );
}

#[test]
fn v2_truncated_signature() {
    for k in 1..12 {
        assert_eq!(
            need_more(&crate::proxy_protocol::v2::SIGNATURE[..k], &STREAM),
            16
        );
    }
    let mut wrong = crate::proxy_protocol::v2::SIGNATURE.to_vec();
    wrong[7] = b'q';
    assert_eq!(invalid(&wrong[..8], &STREAM), Invalid::NotProxyProtocol);
    assert_eq!(invalid(b"\r\n\r\n\r\n", &STREAM), Invalid::NotProxyProtocol);
}

#[test]
fn v2_signature_only() {
    assert_eq!(
        need_more(&crate::proxy_protocol::v2::SIGNATURE, &STREAM),
        16
    );
}

#[test]
fn v2_version_nibble_1() {
    let h = v2_raw(0x11, INET_STREAM, &inet_block());
    assert_eq!(invalid(&h, &STREAM), Invalid::V2Version(1));
    // Known from the 13th byte.
    assert_eq!(invalid(&h[..13], &STREAM), Invalid::V2Version(1));
    assert_eq!(
        invalid(&v2_raw(0x31, INET_STREAM, &inet_block()), &STREAM),
        Invalid::V2Version(3)
    );
}

#[test]
fn v2_invalid_command() {
    for cmd in 2..16u8 {
        let h = v2_raw(0x20 | cmd, INET_STREAM, &inet_block());
        assert_eq!(invalid(&h[..13], &STREAM), Invalid::V2Command(cmd));
    }
}

#[test]
fn v2_proxy_with_unspec_family_uses_real_endpoints() {
    let h = v2_raw(PROXY, 0x01, &[]);
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, 16);
    assert_eq!(header.family, Family::Unspec);
    assert_eq!(header.addresses, Addresses::None);
    assert_eq!(header.endpoints(), Endpoints::Local);
}

#[test]
fn v2_invalid_family() {
    for fam in 4..16u8 {
        let h = v2_raw(PROXY, fam << 4 | 1, &inet_block());
        assert_eq!(invalid(&h[..14], &STREAM), Invalid::V2Family(fam));
    }
}

#[test]
fn v2_every_value_of_the_family_transport_byte() {
    for b in 0..=255u8 {
        let (fam, tr) = (b >> 4, b & 0x0f);
        let family =
            [Family::Unspec, Family::Inet, Family::Inet6, Family::Unix].get(usize::from(fam));
        let transport =
            [Transport::Unspec, Transport::Stream, Transport::Dgram].get(usize::from(tr));
        let body = vec![0u8; family.map_or(0, |f| f.block_len())];
        for (opts, cmd) in [
            (STREAM, PROXY),
            (DATAGRAM, PROXY),
            (STREAM, LOCAL),
            (DATAGRAM, LOCAL),
        ] {
            let h = v2_raw(cmd, b, &body);
            let got = decode(&h, &opts);
            let (Some(&family), Some(&transport)) = (family, transport) else {
                let want = if family.is_none() {
                    Invalid::V2Family(fam)
                } else {
                    Invalid::V2Transport(tr)
                };
                assert_eq!(got, Err(want), "byte {b:#04x}");
                assert_eq!(decode(&h[..14], &opts), Err(want));
                continue;
            };
            let accepted = match (opts.transport, transport) {
                (Expect::Stream, Transport::Stream | Transport::Unspec) => true,
                (Expect::Datagram, Transport::Dgram) => true,
                (Expect::Datagram, Transport::Unspec) => cmd == LOCAL,
                _ => false,
            };
            if accepted {
                let (header, len) = complete(&h, &opts);
                assert_eq!(
                    (header.family, header.transport, len),
                    (family, transport, h.len())
                );
            } else {
                assert_eq!(
                    got,
                    Err(Invalid::V2TransportMismatch {
                        got: transport,
                        expected: opts.transport
                    }),
                    "byte {b:#04x}"
                );
            }
        }
    }
}

#[test]
fn v2_transport_mismatch_reads_well() {
    let h = v2_raw(PROXY, 0x12, &inet_block());
    let e = invalid(&h, &STREAM);
    assert_eq!(e.to_string(), "v2: DGRAM header on a stream listener");
    let h = v2_raw(PROXY, 0x11, &inet_block());
    assert_eq!(
        invalid(&h, &DATAGRAM).to_string(),
        "v2: STREAM header on a datagram listener"
    );
    // UNSPEC transport on UDP only for LOCAL: a PROXY would have nothing to say.
    assert_eq!(
        invalid(&v2_raw(PROXY, 0x10, &inet_block()), &DATAGRAM).kind(),
        "v2_transport_mismatch"
    );
    complete(&v2_raw(LOCAL, 0x00, &[]), &DATAGRAM);
}

#[test]
fn v2_inet_with_no_address_length() {
    let h = v2_raw(PROXY, INET_STREAM, &[]);
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2AddressTooShort {
            len: 0,
            family: Family::Inet,
            need: 12
        }
    );
}

#[test]
fn v2_inet_with_short_address_length() {
    let h = v2_raw(PROXY, INET_STREAM, &inet_block()[..8]);
    let e = invalid(&h, &STREAM);
    assert_eq!(
        e,
        Invalid::V2AddressTooShort {
            len: 8,
            family: Family::Inet,
            need: 12
        }
    );
    assert_eq!(
        e.to_string(),
        "v2: address length 8 is shorter than the INET block (12)"
    );
    // Known from the length field, before the body arrives.
    assert_eq!(invalid(&h[..16], &STREAM), e);
}

#[test]
fn v2_inet_with_too_long_address_length() {
    let mut body = inet_block();
    body.extend_from_slice(&[1, 2, 3, 4]);
    let h = v2_raw(PROXY, INET_STREAM, &body);
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2TlvOverrun {
            kind: 1,
            offset: 28,
            len: 0x0203,
            left: 1
        }
    );
}

#[test]
fn v2_inet6_with_ipv4_sized_body() {
    let h = v2_raw(PROXY, 0x21, &inet_block());
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2AddressTooShort {
            len: 12,
            family: Family::Inet6,
            need: 36
        }
    );
}

#[test]
fn v2_unspec_with_len_and_tlvs() {
    let h = V2Builder::new(Command::Proxy, Transport::Unspec)
        .authority("example.com")
        .tlv(0xE0, b"gcp")
        .build()
        .unwrap();
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, h.len());
    assert_eq!(header.family, Family::Unspec);
    assert_eq!(header.endpoints(), Endpoints::Local);
    assert_eq!(header.tlvs.authority(), Some("example.com"));
    assert_eq!(header.tlvs.get(0xE0), Some(&b"gcp"[..]));
}

#[test]
fn v2_local_without_addresses() {
    let h = V2Builder::local().build().unwrap();
    assert_eq!(h, v2_raw(LOCAL, 0x00, &[]));
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(
        (header.command, header.endpoints(), len),
        (Command::Local, Endpoints::Local, 16)
    );
    // A LOCAL with an empty body is fine whatever family it names.
    let h = v2_raw(LOCAL, INET_STREAM, &[]);
    let (header, _) = complete(&h, &STREAM);
    assert_eq!(header.addresses, Addresses::None);
}

#[test]
fn v2_local_with_addresses() {
    let h = v2_raw(LOCAL, INET_STREAM, &inet_block());
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, 28);
    assert!(matches!(header.addresses, Addresses::Inet { .. }));
    assert_eq!(header.endpoints(), Endpoints::Local);
}

#[test]
fn v2_local_honours_len() {
    let h = V2Builder::local().noop(40).crc32c().build().unwrap();
    let mut buf = h.clone();
    buf.extend_from_slice(b"payload");
    let (header, len) = complete(&buf, &STREAM);
    assert_eq!(len, h.len());
    assert_eq!(header.endpoints(), Endpoints::Local);
}

#[test]
fn v2_unix_stream_and_dgram() {
    let h = V2Builder::new(Command::Proxy, Transport::Stream)
        .unix(b"/run/client.sock", b"/run/server.sock")
        .build()
        .unwrap();
    assert_eq!(h.len(), 16 + 216);
    let (header, _) = complete(&h, &STREAM);
    let Addresses::Unix {
        source,
        destination,
    } = header.addresses
    else {
        panic!("{:?}", header.addresses);
    };
    assert_eq!(source.path(), b"/run/client.sock");
    assert_eq!(destination.path(), b"/run/server.sock");
    assert_eq!(source.raw().len(), 108);
    assert_eq!(header.endpoints(), Endpoints::Local);

    let h = V2Builder::new(Command::Proxy, Transport::Dgram)
        .unix(b"/a", b"/b")
        .build()
        .unwrap();
    let (header, _) = complete(&h, &DATAGRAM);
    assert_eq!(
        (header.family, header.transport),
        (Family::Unix, Transport::Dgram)
    );
    // 215 bytes cannot hold the block.
    let h = v2_raw(PROXY, 0x31, &[0; 215]);
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2AddressTooShort {
            len: 215,
            family: Family::Unix,
            need: 216
        }
    );
}

fn with_tlv_bytes(tlvs: &[u8]) -> Vec<u8> {
    let mut body = inet_block();
    body.extend_from_slice(tlvs);
    v2_raw(PROXY, INET_STREAM, &body)
}

#[test]
fn v2_tlv_truncated_in_type() {
    // One byte where a TLV should start.
    assert_eq!(
        invalid(&with_tlv_bytes(&[0x01]), &STREAM),
        Invalid::V2TlvTruncated {
            offset: 28,
            left: 1
        }
    );
}

#[test]
fn v2_tlv_truncated_in_length() {
    assert_eq!(
        invalid(&with_tlv_bytes(&[0x01, 0x00]), &STREAM),
        Invalid::V2TlvTruncated {
            offset: 28,
            left: 2
        }
    );
}

#[test]
fn v2_tlv_truncated_in_value() {
    assert_eq!(
        invalid(&with_tlv_bytes(&[0x01, 0x00, 0x03, b'h', b'2']), &STREAM),
        Invalid::V2TlvOverrun {
            kind: 1,
            offset: 28,
            len: 3,
            left: 2
        }
    );
}

#[test]
fn v2_tlv_longer_than_header() {
    let e = invalid(&with_tlv_bytes(&[0xE0, 0xff, 0xff, 1, 2, 3]), &STREAM);
    assert_eq!(
        e,
        Invalid::V2TlvOverrun {
            kind: 0xE0,
            offset: 28,
            len: 65535,
            left: 3
        }
    );
    assert_eq!(
        e.to_string(),
        "v2: TLV 0xe0 at offset 28 declares 65535 bytes but only 3 are left"
    );
}

#[test]
fn v2_trailing_bytes_after_last_tlv_inside_len() {
    assert_eq!(
        invalid(
            &with_tlv_bytes(&[0x04, 0x00, 0x01, 0x00, 0xAA, 0xBB]),
            &STREAM
        ),
        Invalid::V2TlvTruncated {
            offset: 32,
            left: 2
        }
    );
}

#[test]
fn v2_zero_length_tlv() {
    let h = with_tlv_bytes(&[0x01, 0x00, 0x00, 0xF8, 0x00, 0x00]);
    let (header, _) = complete(&h, &STREAM);
    let tlvs: Vec<_> = header.tlvs.iter().collect();
    assert_eq!(
        tlvs,
        [
            Tlv::Alpn(b""),
            Tlv::Other(RawTlv {
                kind: 0xF8,
                value: b""
            })
        ]
    );
}

#[test]
fn v2_huge_tlv_above_the_maximum() {
    let h = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .tlv(0xEA, &[7; 10 * 1024])
        .build()
        .unwrap();
    let e = invalid(&h, &STREAM);
    assert_eq!(
        e,
        Invalid::TooLong {
            len: h.len(),
            max: DEFAULT_MAX_HEADER_LEN
        }
    );
    assert_eq!(
        e.to_string(),
        format!("header longer than the maximum 4096 bytes ({})", h.len())
    );
    // Known from byte 16 on: no need to buffer 10 KiB to refuse it.
    assert_eq!(invalid(&h[..16], &STREAM), e);
    let roomy = STREAM.with_max_header_len(MAX_POSSIBLE_HEADER_LEN);
    let (header, len) = complete(&h, &roomy);
    assert_eq!(len, h.len());
    assert_eq!(header.tlvs.get(0xEA).map(<[u8]>::len), Some(10 * 1024));
}

#[test]
fn v2_crc32c_correct() {
    let h = V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:443"))
        .crc32c()
        .build()
        .unwrap();
    let (header, _) = complete(&h, &STREAM);
    let crc = u32::from_be_bytes(h[h.len() - 4..].try_into().unwrap());
    assert_eq!(header.tlvs.iter().collect::<Vec<_>>(), [Tlv::Crc32c(crc)]);
    // A CRC32C before other TLVs is found and checked too.
    let mut h = V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:443"))
        .tlv(crate::proxy_protocol::tlv::kind::CRC32C, &[0; 4])
        .authority("example.com")
        .build()
        .unwrap();
    let crc = crate::proxy_protocol::tlv::crc32c_with_hole(&h, 31);
    h[31..35].copy_from_slice(&crc.to_be_bytes());
    let (header, _) = complete(&h, &STREAM);
    assert_eq!(header.tlvs.authority(), Some("example.com"));
    h[31] ^= 0x80;
    assert!(matches!(
        invalid(&h, &STREAM),
        Invalid::V2Crc32cMismatch { .. }
    ));
}

#[test]
fn v2_crc32c_wrong() {
    let mut h = V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:443"))
        .unique_id(b"abc")
        .crc32c()
        .build()
        .unwrap();
    let good = u32::from_be_bytes(h[h.len() - 4..].try_into().unwrap());
    // Any flipped bit anywhere in the header, checksum field included, is caught, except
    // in the CRC32C type byte: that turns the checksum into an unknown TLV, which the
    // protocol cannot tell from a header sent without one.
    let crc_type = h.len() - 7;
    for i in (16..h.len()).filter(|&i| i != crc_type) {
        h[i] ^= 0x40;
        match decode(&h, &STREAM) {
            Err(
                Invalid::V2Crc32cMismatch { .. }
                | Invalid::V2TlvOverrun { .. }
                | Invalid::V2TlvTruncated { .. },
            ) => {}
            other => panic!("byte {i}: {other:?}"),
        }
        h[i] ^= 0x40;
    }
    let last = h.len() - 1;
    h[last] ^= 1;
    let e = invalid(&h, &STREAM);
    assert_eq!(
        e,
        Invalid::V2Crc32cMismatch {
            expected: good ^ 1,
            computed: good
        }
    );
    assert!(e.to_string().starts_with("v2: CRC32C mismatch"));
}

#[test]
fn v2_crc32c_wrong_length() {
    let h = with_tlv_bytes(&[0x03, 0x00, 0x03, 1, 2, 3]);
    assert_eq!(invalid(&h, &STREAM), Invalid::V2Crc32cLength(3));
    let h = with_tlv_bytes(&[0x03, 0x00, 0x05, 1, 2, 3, 4, 5]);
    assert_eq!(invalid(&h, &STREAM), Invalid::V2Crc32cLength(5));
}

#[test]
fn v2_crc32c_twice() {
    let h = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .tlv(crate::proxy_protocol::tlv::kind::CRC32C, &[0; 4])
        .crc32c()
        .build()
        .unwrap();
    assert_eq!(invalid(&h, &STREAM), Invalid::V2Crc32cDuplicate);
}

#[test]
fn v2_2kib_of_tlvs() {
    let mut b = V2Builder::proxy(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
    for i in 0..32u8 {
        b = b.tlv(0xE0 + (i % 16), &[i; 61]);
    }
    let h = b.crc32c().build().unwrap();
    assert!(h.len() > 2048 + 16 + 36);
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, h.len());
    assert_eq!(header.tlvs.raw().count(), 33);
}

#[test]
fn v2_padding_with_noop() {
    let h = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .noop(0)
        .authority("a.example")
        .noop(13)
        .build()
        .unwrap();
    let (header, _) = complete(&h, &STREAM);
    let tlvs: Vec<_> = header.tlvs.iter().collect();
    assert_eq!(
        tlvs,
        [
            Tlv::Noop(&[]),
            Tlv::Authority("a.example"),
            Tlv::Noop(&[0; 13])
        ]
    );
}

#[test]
fn v2_payload_immediately_after_header() {
    let mut buf = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .build()
        .unwrap();
    buf.extend_from_slice(b"\x16\x03\x01 TLS hello");
    let (_, len) = complete(&buf, &STREAM);
    assert_eq!(len, 28);
    assert_eq!(&buf[len..], b"\x16\x03\x01 TLS hello");
}

#[test]
fn v2_max_header_len_is_inclusive() {
    let h = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .noop(100)
        .build()
        .unwrap();
    complete(&h, &STREAM.with_max_header_len(h.len()));
    assert_eq!(
        invalid(&h, &STREAM.with_max_header_len(h.len() - 1)),
        Invalid::TooLong {
            len: h.len(),
            max: h.len() - 1
        }
    );
}
