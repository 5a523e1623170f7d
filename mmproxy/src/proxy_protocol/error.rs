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
    /// A short label that does not change between releases, for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Invalid::NotProxyProtocol => "not_proxy_protocol",
            Invalid::TooLong { .. } => "too_long",
            Invalid::V1OnDatagram => "v1_on_datagram",
            Invalid::V1NoSpaceAfterSignature => "v1_no_space_after_signature",
            Invalid::V1UnknownProtocol => "v1_unknown_protocol",
            Invalid::V1EmptyField(_) => "v1_empty_field",
            Invalid::V1MissingField(_) => "v1_missing_field",
            Invalid::V1BadAddress(..) => "v1_bad_address",
            Invalid::V1LeadingZeroOctet(_) => "v1_leading_zero_octet",
            Invalid::V1FamilyMismatch(..) => "v1_family_mismatch",
            Invalid::V1ZonedAddress(_) => "v1_zoned_address",
            Invalid::V1PortNotNumber(_) => "v1_port_not_number",
            Invalid::V1PortLeadingZero(_) => "v1_port_leading_zero",
            Invalid::V1PortOutOfRange(_) => "v1_port_out_of_range",
            Invalid::V1TrailingData => "v1_trailing_data",
            Invalid::V1LoneCr => "v1_lone_cr",
            Invalid::V1LoneLf => "v1_lone_lf",
            Invalid::V1NoCrlf => "v1_no_crlf",
            Invalid::V2Version(_) => "v2_version",
            Invalid::V2Command(_) => "v2_command",
            Invalid::V2Family(_) => "v2_family",
            Invalid::V2Transport(_) => "v2_transport",
            Invalid::V2TransportMismatch { .. } => "v2_transport_mismatch",
            Invalid::V2AddressTooShort { .. } => "v2_address_too_short",
            Invalid::V2TlvTruncated { .. } => "v2_tlv_truncated",
            Invalid::V2TlvOverrun { .. } => "v2_tlv_overrun",
            Invalid::V2Crc32cLength(_) => "v2_crc32c_length",
            Invalid::V2Crc32cDuplicate => "v2_crc32c_duplicate",
            Invalid::V2Crc32cMismatch { .. } => "v2_crc32c_mismatch",
            Invalid::V2UniqueIdTooLong(_) => "v2_unique_id_too_long",
            Invalid::V2NotUtf8(_) => "v2_not_utf8",
            Invalid::V2SslTooShort(_) => "v2_ssl_too_short",
            Invalid::V2SslSubTlvTruncated { .. } => "v2_ssl_sub_tlv_truncated",
            Invalid::V2SslSubTlvOverrun { .. } => "v2_ssl_sub_tlv_overrun",
        }
    }
}
