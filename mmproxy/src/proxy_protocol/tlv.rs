//! v2 TLVs: one validating pass at decode time, then zero-copy typed views.
//!
//! Validation and iteration share [`split`], so the iterators cannot disagree with
//! what was accepted; after validation they simply never meet a malformed entry.

use super::error::Invalid;

/// TLV type codes registered by the spec.
pub mod kind {
    pub const ALPN: u8 = 0x01;
    pub const AUTHORITY: u8 = 0x02;
    pub const CRC32C: u8 = 0x03;
    pub const NOOP: u8 = 0x04;
    pub const UNIQUE_ID: u8 = 0x05;
    pub const SSL: u8 = 0x20;
    pub const SSL_VERSION: u8 = 0x21;
    pub const SSL_CN: u8 = 0x22;
    pub const SSL_CIPHER: u8 = 0x23;
    pub const SSL_SIG_ALG: u8 = 0x24;
    pub const SSL_KEY_ALG: u8 = 0x25;
    pub const NETNS: u8 = 0x30;
}

/// The spec caps UNIQUE_ID so receivers can store it in a fixed buffer.
pub const MAX_UNIQUE_ID_LEN: usize = 128;

/// Bits of [`Ssl::client`].
pub mod ssl_client {
    pub const SSL: u8 = 0x01;
    pub const CERT_CONN: u8 = 0x02;
    pub const CERT_SESS: u8 = 0x04;
}

/// A TLV as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawTlv<'a> {
    pub kind: u8,
    pub value: &'a [u8],
}

/// A typed view of one TLV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tlv<'a> {
    Alpn(&'a [u8]),
    Authority(&'a str),
    /// Already verified against the header when this is seen.
    Crc32c(u32),
    Noop(&'a [u8]),
    UniqueId(&'a [u8]),
    Ssl(Ssl<'a>),
    Netns(&'a str),
    /// Custom (0xE0-0xEF), experimental, future, or unregistered types.
    Other(RawTlv<'a>),
}

/// The SSL TLV: client flags, verify result and sub-TLVs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ssl<'a> {
    /// [`ssl_client`] bits.
    pub client: u8,
    /// Zero when the client presented a certificate that verified.
    pub verify: u32,
    sub: &'a [u8],
}

/// A typed view of one SSL sub-TLV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SslTlv<'a> {
    Version(&'a str),
    Cn(&'a str),
    Cipher(&'a str),
    SigAlg(&'a str),
    KeyAlg(&'a str),
    Other(RawTlv<'a>),
}

/// The validated TLV area of a v2 header (empty for v1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tlvs<'a> {
    raw: &'a [u8],
}

/// Splits one TLV off the front: `Ok(None)` at the end, `Err((left, None))` when fewer than
/// three bytes remain, `Err((left, Some((kind, len))))` when the value overruns.
#[allow(clippy::type_complexity)]
#[inline]
fn split(buf: &[u8]) -> Result<Option<(RawTlv<'_>, &[u8])>, (usize, Option<(u8, usize)>)> {
    match buf {
        [] => Ok(None),
        [kind, hi, lo, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            match (rest.get(..len), rest.get(len..)) {
                (Some(value), Some(rest)) => Ok(Some((RawTlv { kind: *kind, value }, rest))),
                _ => Err((rest.len(), Some((*kind, len)))),
            }
        }
        _ => Err((buf.len(), None)),
    }
}

fn utf8<'a>(value: &'a [u8], name: &'static str) -> Result<&'a str, Invalid> {
    std::str::from_utf8(value).map_err(|_| Invalid::V2NotUtf8(name))
}

fn parse_ssl(value: &[u8]) -> Result<Ssl<'_>, Invalid> {
    match value {
        [client, v0, v1, v2, v3, sub @ ..] => Ok(Ssl {
            client: *client,
            verify: u32::from_be_bytes([*v0, *v1, *v2, *v3]),
            sub,
        }),
        _ => Err(Invalid::V2SslTooShort(value.len())),
    }
}

#[inline]
fn typed_ssl(raw: RawTlv<'_>) -> Result<SslTlv<'_>, Invalid> {
    Ok(match raw.kind {
        kind::SSL_VERSION => SslTlv::Version(utf8(raw.value, "SSL VERSION")?),
        kind::SSL_CN => SslTlv::Cn(utf8(raw.value, "SSL CN")?),
        kind::SSL_CIPHER => SslTlv::Cipher(utf8(raw.value, "SSL CIPHER")?),
        kind::SSL_SIG_ALG => SslTlv::SigAlg(utf8(raw.value, "SSL SIG_ALG")?),
        kind::SSL_KEY_ALG => SslTlv::KeyAlg(utf8(raw.value, "SSL KEY_ALG")?),
        _ => SslTlv::Other(raw),
    })
}

#[inline]
fn typed(raw: RawTlv<'_>) -> Result<Tlv<'_>, Invalid> {
    Ok(match raw.kind {
        kind::ALPN => Tlv::Alpn(raw.value),
        kind::AUTHORITY => Tlv::Authority(utf8(raw.value, "AUTHORITY")?),
        kind::CRC32C => match raw.value {
            [a, b, c, d] => Tlv::Crc32c(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => return Err(Invalid::V2Crc32cLength(raw.value.len())),
        },
        kind::NOOP => Tlv::Noop(raw.value),
        kind::UNIQUE_ID if raw.value.len() > MAX_UNIQUE_ID_LEN => {
            return Err(Invalid::V2UniqueIdTooLong(raw.value.len()))
        }
        kind::UNIQUE_ID => Tlv::UniqueId(raw.value),
        kind::SSL => Tlv::Ssl(parse_ssl(raw.value)?),
        kind::NETNS => Tlv::Netns(utf8(raw.value, "NETNS")?),
        _ => Tlv::Other(raw),
    })
}

/// Most string TLVs are ASCII; `is_ascii` is much cheaper than full UTF-8 validation.
#[inline]
fn check_utf8(value: &[u8], name: &'static str) -> Result<(), Invalid> {
    if value.is_ascii() || std::str::from_utf8(value).is_ok() {
        Ok(())
    } else {
        Err(Invalid::V2NotUtf8(name))
    }
}

fn check_ssl(value: &[u8]) -> Result<(), Invalid> {
    let ssl = parse_ssl(value)?;
    let mut rest = ssl.sub;
    loop {
        let offset = ssl.sub.len() - rest.len();
        match split(rest) {
            Ok(None) => return Ok(()),
            Ok(Some((raw, tail))) => {
                match raw.kind {
                    kind::SSL_VERSION => check_utf8(raw.value, "SSL VERSION")?,
                    kind::SSL_CN => check_utf8(raw.value, "SSL CN")?,
                    kind::SSL_CIPHER => check_utf8(raw.value, "SSL CIPHER")?,
                    kind::SSL_SIG_ALG => check_utf8(raw.value, "SSL SIG_ALG")?,
                    kind::SSL_KEY_ALG => check_utf8(raw.value, "SSL KEY_ALG")?,
                    _ => {}
                }
                rest = tail;
            }
            Err((left, None)) => return Err(Invalid::V2SslSubTlvTruncated { offset, left }),
            Err((left, Some((kind, len)))) => {
                return Err(Invalid::V2SslSubTlvOverrun { kind, len, left })
            }
        }
    }
}

/// Checks one TLV so that [`typed`] cannot fail on it later. Returns the CRC32C value
/// when this is the checksum TLV.
#[inline]
fn check(raw: RawTlv<'_>) -> Result<Option<u32>, Invalid> {
    match raw.kind {
        kind::AUTHORITY => check_utf8(raw.value, "AUTHORITY")?,
        kind::CRC32C => match raw.value {
            [a, b, c, d] => return Ok(Some(u32::from_be_bytes([*a, *b, *c, *d]))),
            _ => return Err(Invalid::V2Crc32cLength(raw.value.len())),
        },
        kind::UNIQUE_ID if raw.value.len() > MAX_UNIQUE_ID_LEN => {
            return Err(Invalid::V2UniqueIdTooLong(raw.value.len()))
        }
        kind::SSL => check_ssl(raw.value)?,
        kind::NETNS => check_utf8(raw.value, "NETNS")?,
        _ => {}
    }
    Ok(None)
}

/// Checks the TLVs of a complete header, `header[start..]`, and its CRC32C if present.
pub(super) fn validate(header: &[u8], start: usize) -> Result<Tlvs<'_>, Invalid> {
    let area = header.get(start..).unwrap_or_default();
    let mut rest = area;
    let mut crc: Option<(usize, u32)> = None;
    loop {
        let offset = start + (area.len() - rest.len());
        match split(rest) {
            Ok(None) => break,
            Ok(Some((raw, tail))) => {
                if let Some(value) = check(raw)? {
                    if crc.is_some() {
                        return Err(Invalid::V2Crc32cDuplicate);
                    }
                    crc = Some((offset + 3, value));
                }
                rest = tail;
            }
            Err((left, None)) => return Err(Invalid::V2TlvTruncated { offset, left }),
            Err((left, Some((kind, len)))) => {
                return Err(Invalid::V2TlvOverrun {
                    kind,
                    offset,
                    len,
                    left,
                })
            }
        }
    }
    if let Some((at, expected)) = crc {
        let computed = crc32c_with_hole(header, at);
        if computed != expected {
            return Err(Invalid::V2Crc32cMismatch { expected, computed });
        }
    }
    Ok(Tlvs { raw: area })
}

/// Staging buffer for [`crc32c_with_hole`]. The CRC routine works a byte at a time up to
/// the first 8-byte boundary and after the last one, so an aligned copy of the header
/// hashed in one call is about twice as fast as hashing the three unaligned pieces
/// around the hole.
#[repr(align(8))]
struct Aligned([u8; 256]);

/// CRC32C of `header` with the four bytes at `at` taken as zero, without allocating.
pub(super) fn crc32c_with_hole(header: &[u8], at: usize) -> u32 {
    let mut staging = Aligned([0; 256]);
    let mut crc = 0;
    let mut base = 0;
    for part in header.chunks(staging.0.len()) {
        let Some(buf) = staging.0.get_mut(..part.len()) else {
            break;
        };
        buf.copy_from_slice(part);
        for hole in at..at + 4 {
            if let Some(b) = hole.checked_sub(base).and_then(|i| buf.get_mut(i)) {
                *b = 0;
            }
        }
        crc = crc32c::crc32c_append(crc, buf);
        base += part.len();
    }
    crc
}

impl<'a> Tlvs<'a> {
    /// The whole TLV area as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Typed views, in wire order.
    #[inline]
    pub fn iter(&self) -> TlvIter<'a> {
        TlvIter { rest: self.raw }
    }

    /// The TLVs as type and value bytes, in wire order.
    #[inline]
    pub fn raw(&self) -> RawTlvIter<'a> {
        RawTlvIter { rest: self.raw }
    }

    pub fn alpn(&self) -> Option<&'a [u8]> {
        self.iter().find_map(|t| match t {
            Tlv::Alpn(v) => Some(v),
            _ => None,
        })
    }

    pub fn authority(&self) -> Option<&'a str> {
        self.iter().find_map(|t| match t {
            Tlv::Authority(v) => Some(v),
            _ => None,
        })
    }

    pub fn unique_id(&self) -> Option<&'a [u8]> {
        self.iter().find_map(|t| match t {
            Tlv::UniqueId(v) => Some(v),
            _ => None,
        })
    }

    pub fn ssl(&self) -> Option<Ssl<'a>> {
        self.iter().find_map(|t| match t {
            Tlv::Ssl(v) => Some(v),
            _ => None,
        })
    }

    pub fn netns(&self) -> Option<&'a str> {
        self.iter().find_map(|t| match t {
            Tlv::Netns(v) => Some(v),
            _ => None,
        })
    }

    /// The first TLV of the given type, raw.
    pub fn get(&self, kind: u8) -> Option<&'a [u8]> {
        self.raw().find(|t| t.kind == kind).map(|t| t.value)
    }
}

impl<'a> IntoIterator for Tlvs<'a> {
    type Item = Tlv<'a>;
    type IntoIter = TlvIter<'a>;
    fn into_iter(self) -> TlvIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Tlvs<'a> {
    type Item = Tlv<'a>;
    type IntoIter = TlvIter<'a>;
    fn into_iter(self) -> TlvIter<'a> {
        self.iter()
    }
}

#[derive(Clone, Debug)]
pub struct RawTlvIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RawTlvIter<'a> {
    type Item = RawTlv<'a>;
    #[inline]
    fn next(&mut self) -> Option<RawTlv<'a>> {
        let (raw, rest) = split(self.rest).ok().flatten()?;
        self.rest = rest;
        Some(raw)
    }
}

#[derive(Clone, Debug)]
pub struct TlvIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Tlv<'a>;
    #[inline]
    fn next(&mut self) -> Option<Tlv<'a>> {
        let (raw, rest) = split(self.rest).ok().flatten()?;
        self.rest = rest;
        // Validated at decode time; a failure here would mean the buffer was not ours.
        typed(raw).ok()
    }
}

impl<'a> Ssl<'a> {
    /// The sub-TLV area as received.
    pub fn sub_tlvs_bytes(&self) -> &'a [u8] {
        self.sub
    }

    pub fn iter(&self) -> SslIter<'a> {
        SslIter { rest: self.sub }
    }

    pub fn version(&self) -> Option<&'a str> {
        self.iter().find_map(|t| match t {
            SslTlv::Version(v) => Some(v),
            _ => None,
        })
    }

    pub fn cn(&self) -> Option<&'a str> {
        self.iter().find_map(|t| match t {
            SslTlv::Cn(v) => Some(v),
            _ => None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct SslIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for SslIter<'a> {
    type Item = SslTlv<'a>;
    #[inline]
    fn next(&mut self) -> Option<SslTlv<'a>> {
        let (raw, rest) = split(self.rest).ok().flatten()?;
        self.rest = rest;
        typed_ssl(raw).ok()
    }
}
