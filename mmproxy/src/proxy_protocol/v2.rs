//! v2: the binary header (16 fixed bytes, an address block, TLVs).
//!
//! Each fixed byte is checked as soon as it is in the buffer, so garbage is rejected
//! without waiting for `len` bytes that may never come.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use super::error::Invalid;
use super::header::{Addresses, Command, Family, Header, Transport, UnixAddr, Version};
use super::{tlv, Decoded, Expect};

pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport and the 2-byte length.
pub const FIXED_LEN: usize = 16;
/// The largest header the length field can describe.
pub const MAX_LEN: usize = FIXED_LEN + u16::MAX as usize;

pub(super) fn decode<'a>(
    buf: &'a [u8],
    expect: Expect,
    max_len: usize,
) -> Result<Decoded<'a>, Invalid> {
    // The fixed-size compare is two loads; a slice compare would call memcmp.
    let signature_ok = match buf.first_chunk::<12>() {
        Some(sig) => *sig == SIGNATURE,
        None => SIGNATURE.starts_with(buf),
    };
    if !signature_ok {
        return Err(Invalid::NotProxyProtocol);
    }
    let command = match buf.get(12) {
        Some(&b) => Some(command(b)?),
        None => None,
    };
    let kind = match (buf.get(13), command) {
        (Some(&b), Some(command)) => Some(family_transport(b, command, expect)?),
        _ => None,
    };
    let (Some(command), Some((family, transport)), Some(&hi), Some(&lo)) =
        (command, kind, buf.get(14), buf.get(15))
    else {
        return Ok(Decoded::NeedMore {
            at_least: FIXED_LEN,
        });
    };
    let body_len = u16::from_be_bytes([hi, lo]);
    let total = FIXED_LEN + usize::from(body_len);
    if total > max_len {
        return Err(Invalid::TooLong {
            len: total,
            max: max_len,
        });
    }
    // A LOCAL with an empty body is how health checks look whatever family they claim.
    let block_len = match (command, body_len) {
        (Command::Local, 0) => 0,
        _ => family.block_len(),
    };
    if usize::from(body_len) < block_len {
        return Err(Invalid::V2AddressTooShort {
            len: body_len,
            family,
            need: block_len,
        });
    }
    let Some(header) = buf.get(..total) else {
        return Ok(Decoded::NeedMore { at_least: total });
    };
    let block = header
        .get(FIXED_LEN..FIXED_LEN + block_len)
        .unwrap_or_default();
    let addresses = addresses(family, block);
    let tlvs = tlv::validate(header, FIXED_LEN + block_len)?;
    let header = Header {
        version: Version::V2,
        command,
        family,
        transport,
        addresses,
        tlvs,
    };
    Ok(Decoded::Complete { header, len: total })
}

fn command(b: u8) -> Result<Command, Invalid> {
    if b >> 4 != 2 {
        return Err(Invalid::V2Version(b >> 4));
    }
    match b & 0x0f {
        0 => Ok(Command::Local),
        1 => Ok(Command::Proxy),
        other => Err(Invalid::V2Command(other)),
    }
}

/// Byte 13, checked against what the listener accepts: a stream listener takes STREAM
/// or UNSPEC; a datagram listener takes DGRAM, and UNSPEC only for LOCAL (nothing to
/// forward then).
fn family_transport(
    b: u8,
    command: Command,
    expect: Expect,
) -> Result<(Family, Transport), Invalid> {
    let family = match b >> 4 {
        0 => Family::Unspec,
        1 => Family::Inet,
        2 => Family::Inet6,
        3 => Family::Unix,
        other => return Err(Invalid::V2Family(other)),
    };
    let transport = match b & 0x0f {
        0 => Transport::Unspec,
        1 => Transport::Stream,
        2 => Transport::Dgram,
        other => return Err(Invalid::V2Transport(other)),
    };
    let accepted = match (expect, transport) {
        (Expect::Stream, Transport::Stream | Transport::Unspec) => true,
        (Expect::Datagram, Transport::Dgram) => true,
        (Expect::Datagram, Transport::Unspec) => command == Command::Local,
        _ => false,
    };
    if !accepted {
        return Err(Invalid::V2TransportMismatch {
            got: transport,
            expected: expect,
        });
    }
    Ok((family, transport))
}

fn addresses(family: Family, block: &[u8]) -> Addresses<'_> {
    match (family, block) {
        (Family::Inet, [s0, s1, s2, s3, d0, d1, d2, d3, sp0, sp1, dp0, dp1]) => Addresses::Inet {
            source: SocketAddrV4::new(
                Ipv4Addr::new(*s0, *s1, *s2, *s3),
                u16::from_be_bytes([*sp0, *sp1]),
            ),
            destination: SocketAddrV4::new(
                Ipv4Addr::new(*d0, *d1, *d2, *d3),
                u16::from_be_bytes([*dp0, *dp1]),
            ),
        },
        (Family::Inet6, block) => match (
            block.get(..16).and_then(|s| <[u8; 16]>::try_from(s).ok()),
            block.get(16..32).and_then(|s| <[u8; 16]>::try_from(s).ok()),
            block.get(32..36),
        ) {
            (Some(src), Some(dst), Some([sp0, sp1, dp0, dp1])) => Addresses::Inet6 {
                source: SocketAddrV6::new(
                    Ipv6Addr::from(src),
                    u16::from_be_bytes([*sp0, *sp1]),
                    0,
                    0,
                ),
                destination: SocketAddrV6::new(
                    Ipv6Addr::from(dst),
                    u16::from_be_bytes([*dp0, *dp1]),
                    0,
                    0,
                ),
            },
            _ => Addresses::None,
        },
        (Family::Unix, block) => match (block.get(..108), block.get(108..216)) {
            (Some(src), Some(dst)) => Addresses::Unix {
                source: UnixAddr::new(src),
                destination: UnixAddr::new(dst),
            },
            _ => Addresses::None,
        },
        _ => Addresses::None,
    }
}
