//! v1 cases from the spec summary, each its own test.

use std::net::{SocketAddrV4, SocketAddrV6};

use super::*;
use crate::addr::{ClientAddr, OrigDstAddr};

const F_SRC: V1Field = V1Field::SourceAddress;
const F_DST: V1Field = V1Field::DestinationAddress;
const F_SPORT: V1Field = V1Field::SourcePort;
const F_DPORT: V1Field = V1Field::DestinationPort;

fn tcp4(src: &str, dst: &str, sport: &str, dport: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} {dst} {sport} {dport}\r\n").into_bytes()
}

fn tcp6(src: &str, dst: &str, sport: &str, dport: &str) -> Vec<u8> {
    format!("PROXY TCP6 {src} {dst} {sport} {dport}\r\n").into_bytes()
}

#[test]
fn v1_tcp4_exact_values() {
    let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n";
    let (h, len) = complete(line, &STREAM);
    assert_eq!(len, line.len());
    assert_eq!(h.version, Version::V1);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.family, Family::Inet);
    assert_eq!(h.transport, Transport::Stream);
    assert!(h.tlvs.is_empty());
    assert_eq!(
        h.addresses,
        Addresses::Inet {
            source: SocketAddrV4::new([192, 0, 2, 1].into(), 5000),
            destination: SocketAddrV4::new([198, 51, 100, 2].into(), 443),
        }
    );
    assert_eq!(
        h.endpoints(),
        Endpoints::Proxied {
            client: ClientAddr(sa("192.0.2.1:5000")),
            destination: OrigDstAddr(sa("198.51.100.2:443")),
        }
    );
}

#[test]
fn v1_tcp6_exact_values() {
    let line = b"PROXY TCP6 2001:db8::1 2001:DB8::2 0 65535\r\n";
    let (h, len) = complete(line, &STREAM);
    assert_eq!(len, line.len());
    assert_eq!(h.family, Family::Inet6);
    assert_eq!(
        h.addresses,
        Addresses::Inet6 {
            source: SocketAddrV6::new("2001:db8::1".parse().unwrap(), 0, 0, 0),
            destination: SocketAddrV6::new("2001:db8::2".parse().unwrap(), 65535, 0, 0),
        }
    );
}

#[test]
fn v1_no_signature() {
    assert_eq!(
        invalid(b"GET / HTTP/1.1\r\n", &STREAM),
        Invalid::NotProxyProtocol
    );
    assert_eq!(invalid(b"G", &STREAM), Invalid::NotProxyProtocol);
    assert_eq!(invalid(b"PRX", &STREAM), Invalid::NotProxyProtocol);
}

#[test]
fn v1_prox_is_a_prefix() {
    for k in 1..=5 {
        need_more(&b"PROXY"[..k], &STREAM);
    }
}

#[test]
fn v1_proxy_space_lf_only() {
    assert_eq!(invalid(b"PROXY \n", &STREAM), Invalid::V1LoneLf);
    assert_eq!(invalid(b"PROXY\n", &STREAM), Invalid::V1LoneLf);
}

#[test]
fn v1_proxy_space_crlf() {
    assert_eq!(
        invalid(b"PROXY \r\n", &STREAM),
        Invalid::V1EmptyField(V1Field::Protocol)
    );
}

#[test]
fn v1_proxy_something() {
    assert_eq!(
        invalid(b"PROXY SOMETHING\r\n", &STREAM),
        Invalid::V1UnknownProtocol
    );
    // Certain from the first byte that cannot start a known protocol.
    assert_eq!(invalid(b"PROXY S", &STREAM), Invalid::V1UnknownProtocol);
    assert_eq!(invalid(b"PROXY TCP5", &STREAM), Invalid::V1UnknownProtocol);
}

#[test]
fn v1_incomplete_tcp4() {
    need_more(b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443", &STREAM);
    need_more(b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r", &STREAM);
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1\r\n", &STREAM),
        Invalid::V1MissingField(F_DST)
    );
    assert_eq!(
        invalid(b"PROXY TCP4\r\n", &STREAM),
        Invalid::V1MissingField(F_SRC)
    );
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 198.51.100.2 5000\r\n", &STREAM),
        Invalid::V1MissingField(F_DPORT)
    );
}

#[test]
fn v1_invalid_ip() {
    let bad = |f| Invalid::V1BadAddress(f, "IPv4");
    assert_eq!(
        invalid(&tcp4("192.0.2.256", "192.0.2.2", "1", "2"), &STREAM),
        bad(F_SRC)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2", "192.0.2.2", "1", "2"), &STREAM),
        bad(F_SRC)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "1.2.3.4.5", "1", "2"), &STREAM),
        bad(F_DST)
    );
    assert_eq!(
        invalid(&tcp4("192.0..1", "192.0.2.2", "1", "2"), &STREAM),
        bad(F_SRC)
    );
    assert_eq!(
        invalid(&tcp4("a.b.c.d", "192.0.2.2", "1", "2"), &STREAM),
        bad(F_SRC)
    );
    assert_eq!(
        invalid(&tcp4("+1.2.3.4", "192.0.2.2", "1", "2"), &STREAM),
        bad(F_SRC)
    );
    assert_eq!(
        invalid(&tcp6("2001:db8::g", "::1", "1", "2"), &STREAM),
        Invalid::V1BadAddress(F_SRC, "IPv6")
    );
    assert_eq!(
        invalid(&tcp6("::1", "1:2:3:4:5:6:7:8:9", "1", "2"), &STREAM),
        Invalid::V1BadAddress(F_DST, "IPv6")
    );
}

#[test]
fn v1_tcp4_with_ipv6_addresses() {
    assert_eq!(
        invalid(&tcp4("2001:db8::1", "2001:db8::2", "1", "2"), &STREAM),
        Invalid::V1FamilyMismatch(F_SRC, "TCP4")
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "::1", "1", "2"), &STREAM),
        Invalid::V1FamilyMismatch(F_DST, "TCP4")
    );
}

#[test]
fn v1_tcp4_with_ipv4_mapped_ipv6() {
    assert_eq!(
        invalid(&tcp4("::ffff:192.0.2.1", "192.0.2.2", "1", "2"), &STREAM),
        Invalid::V1FamilyMismatch(F_SRC, "TCP4")
    );
}

#[test]
fn v1_tcp6_with_ipv4_mapped_ipv6_is_fine() {
    let line = tcp6("::ffff:192.0.2.1", "::ffff:192.0.2.2", "1", "2");
    let (h, _) = complete(&line, &STREAM);
    assert_eq!(
        h.addresses,
        Addresses::Inet6 {
            source: SocketAddrV6::new("::ffff:192.0.2.1".parse().unwrap(), 1, 0, 0),
            destination: SocketAddrV6::new("::ffff:192.0.2.2".parse().unwrap(), 2, 0, 0),
        }
    );
}

#[test]
fn v1_tcp6_with_plain_ipv4() {
    assert_eq!(
        invalid(&tcp6("192.0.2.1", "192.0.2.2", "1", "2"), &STREAM),
        Invalid::V1FamilyMismatch(F_SRC, "TCP6")
    );
}

#[test]
fn v1_invalid_port() {
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "http", "2"), &STREAM),
        Invalid::V1PortNotNumber(F_SPORT)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "1", "-2"), &STREAM),
        Invalid::V1PortNotNumber(F_DPORT)
    );
    assert_eq!(
        invalid(
            &tcp4("192.0.2.1", "192.0.2.2", "99999999999999999999", "2"),
            &STREAM
        ),
        Invalid::V1PortOutOfRange(F_SPORT)
    );
}

#[test]
fn v1_port_65535_ok_65536_bad() {
    let line = tcp4("192.0.2.1", "192.0.2.2", "65535", "0");
    let (h, _) = complete(&line, &STREAM);
    assert_eq!(
        h.endpoints(),
        Endpoints::Proxied {
            client: ClientAddr(sa("192.0.2.1:65535")),
            destination: OrigDstAddr(sa("192.0.2.2:0")),
        }
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "65536", "0"), &STREAM),
        Invalid::V1PortOutOfRange(F_SPORT)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "1", "65536"), &STREAM),
        Invalid::V1PortOutOfRange(F_DPORT)
    );
}

#[test]
fn v1_port_with_plus_sign() {
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "+80", "2"), &STREAM),
        Invalid::V1PortNotNumber(F_SPORT)
    );
}

#[test]
fn v1_port_with_leading_zero() {
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "080", "2"), &STREAM),
        Invalid::V1PortLeadingZero(F_SPORT)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "192.0.2.2", "1", "00"), &STREAM),
        Invalid::V1PortLeadingZero(F_DPORT)
    );
    complete(&tcp4("192.0.2.1", "192.0.2.2", "0", "0"), &STREAM);
}

#[test]
fn v1_octet_with_leading_zero() {
    assert_eq!(
        invalid(&tcp4("192.0.2.01", "192.0.2.2", "1", "2"), &STREAM),
        Invalid::V1LeadingZeroOctet(F_SRC)
    );
    assert_eq!(
        invalid(&tcp4("192.0.2.1", "010.0.2.2", "1", "2"), &STREAM),
        Invalid::V1LeadingZeroOctet(F_DST)
    );
    complete(&tcp4("0.0.0.0", "10.0.0.0", "1", "2"), &STREAM);
}

#[test]
fn v1_empty_token_double_space() {
    assert_eq!(
        invalid(b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", &STREAM),
        Invalid::V1EmptyField(V1Field::Protocol)
    );
    assert_eq!(
        invalid(b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", &STREAM),
        Invalid::V1EmptyField(F_SRC)
    );
}

#[test]
fn v1_more_than_one_space_in_each_position() {
    let tokens = ["PROXY", "TCP4", "192.0.2.1", "192.0.2.2", "1", "2"];
    let fields = [V1Field::Protocol, F_SRC, F_DST, F_SPORT, F_DPORT];
    for (gap, field) in fields.iter().enumerate() {
        let mut line = String::new();
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                line.push_str(if i == gap + 1 { "  " } else { " " });
            }
            line.push_str(t);
        }
        line.push_str("\r\n");
        assert_eq!(
            invalid(line.as_bytes(), &STREAM),
            Invalid::V1EmptyField(*field),
            "{line:?}"
        );
    }
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", &STREAM),
        Invalid::V1TrailingData
    );
}

#[test]
fn v1_trailing_extra_token() {
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 extra\r\n", &STREAM),
        Invalid::V1TrailingData
    );
    // Known as soon as the space after the last port shows.
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 ", &STREAM),
        Invalid::V1TrailingData
    );
}

#[test]
fn v1_proxyjunk() {
    assert_eq!(
        invalid(b"PROXYjunk\r\n", &STREAM),
        Invalid::V1NoSpaceAfterSignature
    );
}

#[test]
fn v1_proxytcp4() {
    assert_eq!(
        invalid(b"PROXYTCP4 192.0.2.1 192.0.2.2 1 2\r\n", &STREAM),
        Invalid::V1NoSpaceAfterSignature
    );
}

#[test]
fn v1_zoned_ipv6() {
    assert_eq!(
        invalid(&tcp6("fe80::1%eth0", "fe80::2", "1", "2"), &STREAM),
        Invalid::V1ZonedAddress(F_SRC)
    );
    assert_eq!(
        invalid(b"PROXY TCP6 fe80::1%", &STREAM),
        Invalid::V1ZonedAddress(F_SRC)
    );
}

#[test]
fn v1_lowercase() {
    assert_eq!(
        invalid(b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", &STREAM),
        Invalid::NotProxyProtocol
    );
    assert_eq!(
        invalid(b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", &STREAM),
        Invalid::V1UnknownProtocol
    );
    assert_eq!(
        invalid(b"PROXY unknown\r\n", &STREAM),
        Invalid::V1UnknownProtocol
    );
}

#[test]
fn v1_107_bytes_ok_108_bad() {
    let line = |total: usize| {
        let mut l = b"PROXY UNKNOWN ".to_vec();
        l.resize(total - 2, b'x');
        l.extend_from_slice(b"\r\n");
        l
    };
    let ok = line(107);
    let (h, len) = complete(&ok, &STREAM);
    assert_eq!((len, h.endpoints()), (107, Endpoints::Local));
    assert_eq!(invalid(&line(108), &STREAM), Invalid::V1NoCrlf);
    // The CR in place 107 does not help: its LF would be byte 108.
    let mut cr_last = line(108);
    cr_last.truncate(107);
    assert_eq!(cr_last.last(), Some(&b'\r'));
    assert_eq!(invalid(&cr_last, &STREAM), Invalid::V1NoCrlf);
}

#[test]
fn v1_unknown_without_addresses() {
    let (h, len) = complete(b"PROXY UNKNOWN\r\nGET /", &STREAM);
    assert_eq!(len, 15);
    assert_eq!(h.family, Family::Unspec);
    assert_eq!(h.transport, Transport::Unspec);
    assert_eq!(h.addresses, Addresses::None);
    assert_eq!(h.endpoints(), Endpoints::Local);
}

#[test]
fn v1_unknown_with_addresses() {
    let line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
    let (h, len) = complete(line, &STREAM);
    assert_eq!(len, line.len());
    assert_eq!(h.addresses, Addresses::None);
    assert_eq!(h.endpoints(), Endpoints::Local);
    // The rest of the line is ignored, but a stray LF still breaks the framing.
    assert_eq!(
        invalid(b"PROXY UNKNOWN a\nb\r\n", &STREAM),
        Invalid::V1LoneLf
    );
    assert_eq!(
        invalid(b"PROXY UNKNOWN a\rb\r\n", &STREAM),
        Invalid::V1LoneCr
    );
}

#[test]
fn v1_worst_case_length_line() {
    let max = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let line = tcp6(max, max, "65535", "65535");
    assert_eq!(line.len(), 104);
    let (h, len) = complete(&line, &STREAM);
    assert_eq!(len, 104);
    assert_eq!(h.family, Family::Inet6);
    // The longest IPv6 text (IPv4-mapped tail) cannot fit in 107 bytes twice.
    let mapped = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255";
    let too_long = tcp6(mapped, mapped, "65535", "65535");
    assert_eq!(invalid(&too_long, &STREAM), Invalid::V1NoCrlf);
}

#[test]
fn v1_lone_cr() {
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX", &STREAM),
        Invalid::V1LoneCr
    );
    assert_eq!(
        invalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", &STREAM),
        Invalid::V1LoneLf
    );
}

#[test]
fn v1_header_then_payload_in_one_read() {
    let mut buf = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n".to_vec();
    let header_len = buf.len();
    buf.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let (_, len) = complete(&buf, &STREAM);
    assert_eq!(len, header_len);
}

#[test]
fn v1_on_a_datagram_listener() {
    assert_eq!(invalid(b"P", &DATAGRAM), Invalid::V1OnDatagram);
    assert_eq!(
        invalid(b"PROXY UNKNOWN\r\n", &DATAGRAM),
        Invalid::V1OnDatagram
    );
}

#[test]
fn v1_messages_read_well_in_a_log() {
    assert_eq!(
        Invalid::V1PortLeadingZero(F_SPORT).to_string(),
        "v1: source port has a leading zero"
    );
    assert_eq!(Invalid::V1NoCrlf.kind(), "v1_no_crlf");
}
