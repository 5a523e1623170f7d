//! v1: the text line `PROXY TCP4|TCP6|UNKNOWN ... CRLF`.
//!
//! The parser walks the line once, token by token. Running out of input is not an error
//! by itself: each partial token is checked with rules that no valid continuation could
//! undo, so a prefix of a valid line is never rejected and a hopeless one is rejected as
//! soon as it shows.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use super::error::{Invalid, V1Field};
use super::header::{Addresses, Command, Family, Header, Transport, Version};
use super::tlv::Tlvs;
use super::Decoded;

/// Longest line the spec allows, CRLF included.
pub const MAX_LEN: usize = 107;
/// `PROXY UNKNOWN\r\n`, the shortest valid line.
pub const MIN_LEN: usize = 15;

const SIGNATURE: &[u8] = b"PROXY";
const LONGEST_IPV4: usize = "255.255.255.255".len();
const LONGEST_IPV6: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();

/// Why parsing stopped before a complete line.
enum Stop {
    Incomplete,
    Invalid(Invalid),
}

impl From<Invalid> for Stop {
    fn from(e: Invalid) -> Self {
        Stop::Invalid(e)
    }
}

pub(super) fn decode(buf: &[u8]) -> Result<Decoded<'static>, Invalid> {
    let window = buf.get(..MAX_LEN).unwrap_or(buf);
    match Line::new(window).parse() {
        Ok((header, len)) => Ok(Decoded::Complete { header, len }),
        Err(Stop::Invalid(e)) => Err(e),
        Err(Stop::Incomplete) if buf.len() >= MAX_LEN => Err(Invalid::V1NoCrlf),
        // Only a lower bound: the line's length is unknown until its CRLF.
        Err(Stop::Incomplete) => Ok(Decoded::NeedMore {
            at_least: (buf.len() + 1).max(MIN_LEN),
        }),
    }
}

/// Whether `buf` could still grow into `PROXY` (used by detection before 5 bytes exist).
pub(super) fn is_signature_prefix(buf: &[u8]) -> bool {
    SIGNATURE.starts_with(buf.get(..SIGNATURE.len()).unwrap_or(buf))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp4,
    Tcp6,
    Unknown,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp4 => "TCP4",
            Proto::Tcp6 => "TCP6",
            Proto::Unknown => "UNKNOWN",
        }
    }
}

/// How a token ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Space,
    Crlf,
}

struct Line<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Line<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Line { buf, pos: 0 }
    }

    fn parse(mut self) -> Result<(Header<'static>, usize), Stop> {
        self.signature()?;
        let (proto, end) = self.protocol()?;
        let addresses = match (proto, end) {
            (Proto::Unknown, End::Crlf) => Addresses::None,
            (Proto::Unknown, End::Space) => {
                self.skip_to_crlf()?;
                Addresses::None
            }
            (_, End::Crlf) => return Err(Invalid::V1MissingField(V1Field::SourceAddress).into()),
            (Proto::Tcp4, End::Space) => {
                let src = self.field(V1Field::SourceAddress, |t, done| {
                    ipv4(t, done, V1Field::SourceAddress)
                })?;
                let dst = self.field(V1Field::DestinationAddress, |t, done| {
                    ipv4(t, done, V1Field::DestinationAddress)
                })?;
                let (sport, dport) = self.ports()?;
                Addresses::Inet {
                    source: SocketAddrV4::new(src, sport),
                    destination: SocketAddrV4::new(dst, dport),
                }
            }
            (Proto::Tcp6, End::Space) => {
                let src = self.field(V1Field::SourceAddress, |t, done| {
                    ipv6(t, done, V1Field::SourceAddress)
                })?;
                let dst = self.field(V1Field::DestinationAddress, |t, done| {
                    ipv6(t, done, V1Field::DestinationAddress)
                })?;
                let (sport, dport) = self.ports()?;
                Addresses::Inet6 {
                    source: SocketAddrV6::new(src, sport, 0, 0),
                    destination: SocketAddrV6::new(dst, dport, 0, 0),
                }
            }
        };
        let (family, transport) = match proto {
            Proto::Tcp4 => (Family::Inet, Transport::Stream),
            Proto::Tcp6 => (Family::Inet6, Transport::Stream),
            Proto::Unknown => (Family::Unspec, Transport::Unspec),
        };
        let header = Header {
            version: Version::V1,
            command: Command::Proxy,
            family,
            transport,
            addresses,
            tlvs: Tlvs::default(),
        };
        Ok((header, self.pos))
    }

    fn signature(&mut self) -> Result<(), Stop> {
        let rest = self.buf.get(SIGNATURE.len()..);
        match (rest, rest.and_then(|r| r.first())) {
            (None, _) if is_signature_prefix(self.buf) => Err(Stop::Incomplete),
            (None, _) => Err(Invalid::NotProxyProtocol.into()),
            (Some(_), _) if !self.buf.starts_with(SIGNATURE) => {
                Err(Invalid::NotProxyProtocol.into())
            }
            (Some(_), None) => Err(Stop::Incomplete),
            (Some(_), Some(b' ')) => {
                self.pos = SIGNATURE.len() + 1;
                Ok(())
            }
            (Some(_), Some(b'\n')) => Err(Invalid::V1LoneLf.into()),
            (Some(_), Some(_)) => Err(Invalid::V1NoSpaceAfterSignature.into()),
        }
    }

    /// The next token and how it ended; partial tokens go through `check` first.
    fn token(&mut self, field: V1Field) -> Result<(&'a [u8], End), Stop> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n')) else {
            return Err(Stop::Incomplete);
        };
        let token = rest.get(..len).unwrap_or_default();
        let end = match rest.get(len..) {
            Some([b' ', ..]) => End::Space,
            Some([b'\r', b'\n', ..]) => End::Crlf,
            Some([b'\r']) => return Err(Stop::Incomplete),
            Some([b'\r', ..]) => return Err(Invalid::V1LoneCr.into()),
            _ => return Err(Invalid::V1LoneLf.into()),
        };
        if token.is_empty() {
            return Err(Invalid::V1EmptyField(field).into());
        }
        self.pos += len + if end == End::Space { 1 } else { 2 };
        Ok((token, end))
    }

    /// The remaining input when no delimiter is in sight (for partial checks).
    fn partial(&self) -> &'a [u8] {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
            .unwrap_or(rest.len());
        rest.get(..len).unwrap_or_default()
    }

    /// A token that must be followed by a space, validated by `check(token, complete)`.
    fn field<T>(
        &mut self,
        field: V1Field,
        check: impl Fn(&[u8], bool) -> Result<Option<T>, Invalid>,
    ) -> Result<T, Stop> {
        self.last_field(field, End::Space, check)
    }

    fn last_field<T>(
        &mut self,
        field: V1Field,
        want: End,
        check: impl Fn(&[u8], bool) -> Result<Option<T>, Invalid>,
    ) -> Result<T, Stop> {
        let (token, end) = match self.token(field) {
            Err(Stop::Incomplete) => {
                // `token` does not advance on Incomplete, so this is the same token.
                check(self.partial(), false)?;
                return Err(Stop::Incomplete);
            }
            other => other?,
        };
        let value = check(token, true)?.ok_or(Stop::Incomplete)?;
        match (want, end) {
            (End::Space, End::Crlf) => Err(Invalid::V1MissingField(next(field)).into()),
            (End::Crlf, End::Space) => Err(Invalid::V1TrailingData.into()),
            _ => Ok(value),
        }
    }

    fn protocol(&mut self) -> Result<(Proto, End), Stop> {
        let (token, end) = match self.token(V1Field::Protocol) {
            Err(Stop::Incomplete) => {
                let partial = self.partial();
                let known = [Proto::Tcp4, Proto::Tcp6, Proto::Unknown];
                if known
                    .iter()
                    .any(|p| p.name().as_bytes().starts_with(partial))
                {
                    return Err(Stop::Incomplete);
                }
                return Err(Invalid::V1UnknownProtocol.into());
            }
            other => other?,
        };
        let proto = match token {
            b"TCP4" => Proto::Tcp4,
            b"TCP6" => Proto::Tcp6,
            b"UNKNOWN" => Proto::Unknown,
            _ => return Err(Invalid::V1UnknownProtocol.into()),
        };
        Ok((proto, end))
    }

    fn ports(&mut self) -> Result<(u16, u16), Stop> {
        let sport = self.field(V1Field::SourcePort, |t, _| port(t, V1Field::SourcePort))?;
        let dport = self.last_field(V1Field::DestinationPort, End::Crlf, |t, _| {
            port(t, V1Field::DestinationPort)
        })?;
        Ok((sport, dport))
    }

    /// UNKNOWN: anything up to CRLF, but a stray CR or LF is still a framing error.
    fn skip_to_crlf(&mut self) -> Result<(), Stop> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(at) = rest.iter().position(|&b| matches!(b, b'\r' | b'\n')) else {
            return Err(Stop::Incomplete);
        };
        match rest.get(at..) {
            Some([b'\r', b'\n', ..]) => {
                self.pos += at + 2;
                Ok(())
            }
            Some([b'\r']) => Err(Stop::Incomplete),
            Some([b'\r', ..]) => Err(Invalid::V1LoneCr.into()),
            _ => Err(Invalid::V1LoneLf.into()),
        }
    }
}

fn next(field: V1Field) -> V1Field {
    match field {
        V1Field::Protocol => V1Field::SourceAddress,
        V1Field::SourceAddress => V1Field::DestinationAddress,
        V1Field::DestinationAddress => V1Field::SourcePort,
        V1Field::SourcePort | V1Field::DestinationPort => V1Field::DestinationPort,
    }
}

/// Strict dotted quad: four decimal octets, no leading zeros, no sign, nothing else.
/// With `done == false` only rules that a longer token could not fix are applied.
fn ipv4(token: &[u8], done: bool, field: V1Field) -> Result<Option<Ipv4Addr>, Invalid> {
    let bad = Invalid::V1BadAddress(field, "IPv4");
    if token.contains(&b':') {
        return Err(Invalid::V1FamilyMismatch(field, "TCP4"));
    }
    if token.len() > LONGEST_IPV4 {
        return Err(bad);
    }
    // One pass over the token: it sits on every v1 connection's path.
    let mut octets = [0u8; 4];
    let mut index = 0;
    let mut value: u16 = 0;
    let mut digits = 0;
    for &b in token {
        match b {
            b'0'..=b'9' => {
                if digits == 1 && value == 0 {
                    return Err(Invalid::V1LeadingZeroOctet(field));
                }
                value = value * 10 + u16::from(b - b'0');
                digits += 1;
                if value > 255 {
                    return Err(bad);
                }
            }
            b'.' => {
                let (Some(slot), Ok(v), true) =
                    (octets.get_mut(index), u8::try_from(value), digits > 0)
                else {
                    return Err(bad);
                };
                *slot = v;
                index += 1;
                value = 0;
                digits = 0;
            }
            _ => return Err(bad),
        }
    }
    // A fifth octet is already hopeless; anything else may still be typed.
    if index > 3 {
        return Err(bad);
    }
    if !done {
        return Ok(None);
    }
    match (octets.get_mut(3), u8::try_from(value)) {
        (Some(last), Ok(v)) if index == 3 && digits > 0 => *last = v,
        _ => return Err(bad),
    }
    Ok(Some(Ipv4Addr::from(octets)))
}

/// IPv6 text as std parses it (which includes the IPv4-mapped forms), minus zones, and
/// never a bare dotted quad: that is TCP4's job.
fn ipv6(token: &[u8], done: bool, field: V1Field) -> Result<Option<Ipv6Addr>, Invalid> {
    let bad = Invalid::V1BadAddress(field, "IPv6");
    if token.contains(&b'%') {
        return Err(Invalid::V1ZonedAddress(field));
    }
    if token.len() > LONGEST_IPV6
        || !token
            .iter()
            .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
    {
        return Err(bad);
    }
    if !done {
        return Ok(None);
    }
    if !token.contains(&b':') {
        return Err(if token.contains(&b'.') {
            Invalid::V1FamilyMismatch(field, "TCP6")
        } else {
            bad
        });
    }
    let text = std::str::from_utf8(token).map_err(|_| bad)?;
    text.parse().map(Some).map_err(|_| bad)
}

/// Decimal 0..=65535, no sign, no leading zero. Every rule holds for prefixes too.
fn port(token: &[u8], field: V1Field) -> Result<Option<u16>, Invalid> {
    if token.len() > 1 && token.first() == Some(&b'0') {
        return Err(Invalid::V1PortLeadingZero(field));
    }
    let mut value: u32 = 0;
    for &b in token {
        if !b.is_ascii_digit() {
            return Err(Invalid::V1PortNotNumber(field));
        }
        value = value * 10 + u32::from(b - b'0');
        if value > u32::from(u16::MAX) {
            return Err(Invalid::V1PortOutOfRange(field));
        }
    }
    Ok(u16::try_from(value).ok())
}
