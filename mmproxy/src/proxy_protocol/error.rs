//! Why a byte sequence can never become a valid PROXY header.

use super::header::{Family, Transport};
use super::Expect;

/// A field of a v1 line, named in error messages so an operator can find the bad token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V1Field {
    Protocol,
    SourceAddress,
    DestinationAddress,
    SourcePort,
    DestinationPort,
}

impl std::fmt::Display for V1Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            V1Field::Protocol => "protocol",
            V1Field::SourceAddress => "source address",
            V1Field::DestinationAddress => "destination address",
            V1Field::SourcePort => "source port",
            V1Field::DestinationPort => "destination port",
        })
    }
}

/// The input is not, and can never become, an acceptable PROXY header.
///
/// `Display` is meant for a log line; [`Invalid::kind`] is a short stable label for
/// counters and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not a PROXY protocol header (starts with neither \"PROXY\" nor the v2 signature)")]
    NotProxyProtocol,
    #[error("header longer than the maximum {max} bytes ({len})")]
    TooLong { len: usize, max: usize },

    #[error("v1 header on a datagram listener (only v2 DGRAM is accepted)")]
    V1OnDatagram,
    #[error("v1: expected a space after \"PROXY\"")]
    V1NoSpaceAfterSignature,
    #[error("v1: protocol is not TCP4, TCP6 or UNKNOWN")]
    V1UnknownProtocol,
    #[error("v1: empty {0} (two spaces in a row?)")]
    V1EmptyField(V1Field),
    #[error("v1: line ends before the {0}")]
    V1MissingField(V1Field),
    #[error("v1: {0} is not a valid {1} address")]
    V1BadAddress(V1Field, &'static str),
    #[error("v1: {0} has an octet with a leading zero")]
    V1LeadingZeroOctet(V1Field),
    #[error("v1: {0} does not match the protocol {1}")]
    V1FamilyMismatch(V1Field, &'static str),
    #[error("v1: {0} has an IPv6 zone")]
    V1ZonedAddress(V1Field),
    #[error("v1: {0} is not a decimal number")]
    V1PortNotNumber(V1Field),
    #[error("v1: {0} has a leading zero")]
    V1PortLeadingZero(V1Field),
    #[error("v1: {0} is above 65535")]
    V1PortOutOfRange(V1Field),
    #[error("v1: unexpected data after the destination port")]
    V1TrailingData,
    #[error("v1: CR not followed by LF")]
    V1LoneCr,
    #[error("v1: LF without a preceding CR")]
    V1LoneLf,
    #[error("v1: no CRLF within the first 107 bytes")]
    V1NoCrlf,

    #[error("v2: version {0} is not 2")]
    V2Version(u8),
    #[error("v2: unknown command {0:#x}")]
    V2Command(u8),
    #[error("v2: unknown address family {0:#x}")]
    V2Family(u8),
    #[error("v2: unknown transport protocol {0:#x}")]
    V2Transport(u8),
    #[error("v2: {got} header on a {expected} listener")]
    V2TransportMismatch { got: Transport, expected: Expect },
    #[error("v2: address length {len} is shorter than the {family} block ({need})")]
    V2AddressTooShort {
        len: u16,
        family: Family,
        need: usize,
    },
    #[error("v2: TLV at offset {offset} is truncated ({left} bytes left, a TLV needs 3)")]
    V2TlvTruncated { offset: usize, left: usize },
    #[error(
        "v2: TLV {kind:#04x} at offset {offset} declares {len} bytes but only {left} are left"
    )]
    V2TlvOverrun {
        kind: u8,
        offset: usize,
        len: usize,
        left: usize,
    },
    #[error("v2: CRC32C TLV has length {0}, expected 4")]
    V2Crc32cLength(usize),
    #[error("v2: more than one CRC32C TLV")]
    V2Crc32cDuplicate,
    #[error("v2: CRC32C mismatch (header says {expected:#010x}, computed {computed:#010x})")]
    V2Crc32cMismatch { expected: u32, computed: u32 },
    #[error("v2: UNIQUE_ID is {0} bytes, longer than 128")]
    V2UniqueIdTooLong(usize),
    #[error("v2: {0} TLV is not valid UTF-8")]
    V2NotUtf8(&'static str),
    #[error("v2: SSL TLV is {0} bytes, shorter than its 5-byte fixed part")]
    V2SslTooShort(usize),
    #[error("v2: SSL sub-TLV at offset {offset} is truncated ({left} bytes left)")]
    V2SslSubTlvTruncated { offset: usize, left: usize },
    #[error("v2: SSL sub-TLV {kind:#04x} declares {len} bytes but only {left} are left")]
    V2SslSubTlvOverrun { kind: u8, len: usize, left: usize },
}

impl Invalid {
    /// Every [`Invalid::kind`] label, indexed by [`Invalid::index`]: a fixed set, so
    /// counters can keep one slot per kind.
    pub const KINDS: [&'static str; 34] = [
        "not_proxy_protocol",
        "too_long",
        "v1_on_datagram",
        "v1_no_space_after_signature",
        "v1_unknown_protocol",
        "v1_empty_field",
        "v1_missing_field",
        "v1_bad_address",
        "v1_leading_zero_octet",
        "v1_family_mismatch",
        "v1_zoned_address",
        "v1_port_not_number",
        "v1_port_leading_zero",
        "v1_port_out_of_range",
        "v1_trailing_data",
        "v1_lone_cr",
        "v1_lone_lf",
        "v1_no_crlf",
        "v2_version",
        "v2_command",
        "v2_family",
        "v2_transport",
        "v2_transport_mismatch",
        "v2_address_too_short",
        "v2_tlv_truncated",
        "v2_tlv_overrun",
        "v2_crc32c_length",
        "v2_crc32c_duplicate",
        "v2_crc32c_mismatch",
        "v2_unique_id_too_long",
        "v2_not_utf8",
        "v2_ssl_too_short",
        "v2_ssl_sub_tlv_truncated",
        "v2_ssl_sub_tlv_overrun",
    ];

    /// A short label that does not change between releases, for counters.
    pub fn kind(&self) -> &'static str {
        Self::KINDS.get(self.index()).copied().unwrap_or("invalid")
    }

    /// This error's position in [`Invalid::KINDS`].
    pub fn index(&self) -> usize {
        match self {
            Invalid::NotProxyProtocol => 0,
            Invalid::TooLong { .. } => 1,
            Invalid::V1OnDatagram => 2,
            Invalid::V1NoSpaceAfterSignature => 3,
            Invalid::V1UnknownProtocol => 4,
            Invalid::V1EmptyField(_) => 5,
            Invalid::V1MissingField(_) => 6,
            Invalid::V1BadAddress(..) => 7,
            Invalid::V1LeadingZeroOctet(_) => 8,
            Invalid::V1FamilyMismatch(..) => 9,
            Invalid::V1ZonedAddress(_) => 10,
            Invalid::V1PortNotNumber(_) => 11,
            Invalid::V1PortLeadingZero(_) => 12,
            Invalid::V1PortOutOfRange(_) => 13,
            Invalid::V1TrailingData => 14,
            Invalid::V1LoneCr => 15,
            Invalid::V1LoneLf => 16,
            Invalid::V1NoCrlf => 17,
            Invalid::V2Version(_) => 18,
            Invalid::V2Command(_) => 19,
            Invalid::V2Family(_) => 20,
            Invalid::V2Transport(_) => 21,
            Invalid::V2TransportMismatch { .. } => 22,
            Invalid::V2AddressTooShort { .. } => 23,
            Invalid::V2TlvTruncated { .. } => 24,
            Invalid::V2TlvOverrun { .. } => 25,
            Invalid::V2Crc32cLength(_) => 26,
            Invalid::V2Crc32cDuplicate => 27,
            Invalid::V2Crc32cMismatch { .. } => 28,
            Invalid::V2UniqueIdTooLong(_) => 29,
            Invalid::V2NotUtf8(_) => 30,
            Invalid::V2SslTooShort(_) => 31,
            Invalid::V2SslSubTlvTruncated { .. } => 32,
            Invalid::V2SslSubTlvOverrun { .. } => 33,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_distinct_and_each_error_finds_its_own() {
        let mut seen = std::collections::HashSet::new();
        assert!(Invalid::KINDS.iter().all(|k| seen.insert(*k)));
        for (e, kind) in [
            (Invalid::NotProxyProtocol, "not_proxy_protocol"),
            (Invalid::TooLong { len: 1, max: 1 }, "too_long"),
            (Invalid::V1NoCrlf, "v1_no_crlf"),
            (Invalid::V2Crc32cDuplicate, "v2_crc32c_duplicate"),
            (
                Invalid::V2SslSubTlvOverrun {
                    kind: 1,
                    len: 2,
                    left: 1,
                },
                "v2_ssl_sub_tlv_overrun",
            ),
        ] {
            assert_eq!(e.kind(), kind);
            assert_eq!(Invalid::KINDS.get(e.index()), Some(&kind));
        }
        // What the e2e metrics test sends.
        let opts = crate::proxy_protocol::DecodeOptions::default();
        let kind = |b: &[u8]| {
            crate::proxy_protocol::decode(b, &opts)
                .err()
                .map(|e| e.kind())
        };
        assert_eq!(kind(b"GET / HTTP/1.1\r\n\r\n"), Some("not_proxy_protocol"));
        assert_eq!(
            kind(b"PROXY TCP4 not-an-address\r\n"),
            Some("v1_bad_address")
        );
    }
}
