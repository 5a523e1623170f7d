//! PROXY protocol v1 and v2: a strict, streaming, allocation-free decoder and an encoder.
//!
//! # Decoding
//!
//! Call [`decode`] with *all* the bytes received so far on a connection (or the whole
//! datagram) each time more arrive. It answers one of:
//!
//! - [`Decoded::NeedMore`]: the bytes are a valid prefix of a header. `at_least` is a
//!   lower bound on the total length the buffer must reach before the answer can change
//!   (exact for v2 once its 16 fixed bytes are in). On a datagram listener this means the
//!   datagram is truncated: drop it.
//! - [`Decoded::Complete`]: a valid header used the first `len` bytes; everything after
//!   them is payload and must be forwarded unchanged.
//! - `Err(`[`Invalid`]`)`: no continuation can make these bytes a valid header. This is
//!   reported as soon as it is certain (first byte neither `P` nor `\r`, a stray CR or LF,
//!   107 bytes without CRLF, an unknown v2 version/command/family/transport, a v2 length
//!   over the maximum, ...). A prefix of a valid header is never invalid.
//!
//! The decoder keeps no state between calls: re-decoding the grown buffer costs a few
//! tens of nanoseconds and makes split reads impossible to get wrong. It never
//! allocates, never panics and contains no `unsafe`; the [`Header`] it returns borrows
//! the buffer (UNIX paths and TLVs are views into it).
//!
//! # What is accepted
//!
//! [`DecodeOptions::transport`] states the listener kind ([`Expect`]): a stream listener
//! accepts v1 and v2 STREAM or UNSPEC; a datagram listener accepts only v2 DGRAM, plus
//! UNSPEC for LOCAL. Anything else is [`Invalid::V2TransportMismatch`] /
//! [`Invalid::V1OnDatagram`].
//!
//! [`Header::endpoints`] says which addresses to use: the header's client and
//! destination for PROXY over INET/INET6 with a STREAM or DGRAM transport, otherwise the
//! real endpoints ([`Endpoints::Local`]). In particular PROXY with family UNSPEC is
//! *accepted* and falls back to the real endpoints (the spec lets a receiver either do
//! that or reject; rejecting would break senders that forward unknown protocols), and so
//! do UNIX and v1 UNKNOWN.
//!
//! v2 details decided here: `len` is honoured for every command; after the family's
//! address block (none for UNSPEC) the rest of the header must be well-formed TLVs
//! ending exactly at `16 + len`, for LOCAL too; the one exception is a LOCAL with
//! `len == 0`, valid whatever family it names. A CRC32C TLV is verified (a second one is
//! invalid, since "the" field to zero would be ambiguous). AUTHORITY, NETNS and the SSL
//! string sub-TLVs must be UTF-8 because they are exposed as `&str`. Unregistered,
//! custom (0xE0-0xEF), experimental and future types are kept raw and never rejected.
//!
//! # Encoding
//!
//! [`encode_v1`] and [`V2Builder`] produce headers for tests, the load generator and
//! demos; they allocate and are not on any hot path.

// Peers send arbitrary bytes: a panic here would take the whole proxy down.
#![forbid(unsafe_code)]
mod datagram;
mod encode;
mod error;
mod header;
pub mod tlv;
mod v1;
mod v2;

#[cfg(test)]
mod tests;

pub use datagram::{split_datagram, DatagramError};
pub use encode::{encode_v1, encode_v1_unknown, EncodeError, V2Builder};
pub use error::{Invalid, V1Field};
pub use header::{Addresses, Command, Endpoints, Family, Header, Transport, UnixAddr, Version};
pub use tlv::{RawTlv, Ssl, SslTlv, Tlv, Tlvs};

/// Default bound on a v2 header (16 fixed bytes + `len`). Real senders stay far below
/// it: addresses plus the usual TLVs (CRC32C, UNIQUE_ID, AUTHORITY, SSL with a CN) take a
/// few hundred bytes. Raise it with [`DecodeOptions::max_header_len`] if a sender adds
/// large vendor TLVs; it bounds how much a connection may make the proxy buffer.
pub const DEFAULT_MAX_HEADER_LEN: usize = 4096;

/// The largest v2 header that can exist (16 + 65535); larger maxima change nothing.
pub const MAX_POSSIBLE_HEADER_LEN: usize = v2::MAX_LEN;

/// The longest v1 line, CRLF included (fixed by the spec, not configurable).
pub const V1_MAX_LEN: usize = v1::MAX_LEN;

/// Which kind of listener the header arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expect {
    /// TCP: v1, or v2 with transport STREAM or UNSPEC.
    Stream,
    /// UDP: v2 with transport DGRAM, or UNSPEC with LOCAL.
    Datagram,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expect::Stream => "stream",
            Expect::Datagram => "datagram",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Bound on a v2 header, fixed part included. v1 lines have their own fixed bound,
    /// [`V1_MAX_LEN`].
    pub max_header_len: usize,
    pub transport: Expect,
}

impl DecodeOptions {
    pub const fn stream() -> Self {
        DecodeOptions {
            max_header_len: DEFAULT_MAX_HEADER_LEN,
            transport: Expect::Stream,
        }
    }

    pub const fn datagram() -> Self {
        DecodeOptions {
            max_header_len: DEFAULT_MAX_HEADER_LEN,
            transport: Expect::Datagram,
        }
    }

    pub const fn with_max_header_len(mut self, max_header_len: usize) -> Self {
        self.max_header_len = max_header_len;
        self
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self::stream()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid prefix; the buffer must reach at least `at_least` bytes in total.
    NeedMore { at_least: usize },
    /// The header used `len` bytes; the rest of the buffer is payload.
    Complete { header: Header<'a>, len: usize },
}

/// Decodes a header from the start of `buf`. See the [module docs](self).
#[inline]
pub fn decode<'a>(buf: &'a [u8], opts: &DecodeOptions) -> Result<Decoded<'a>, Invalid> {
    match buf.first() {
        None => Ok(Decoded::NeedMore {
            at_least: v1::MIN_LEN.min(v2::FIXED_LEN),
        }),
        Some(b'P') if opts.transport == Expect::Datagram => Err(Invalid::V1OnDatagram),
        Some(b'P') => v1::decode(buf),
        Some(_) => v2::decode(buf, opts.transport, opts.max_header_len),
    }
}
