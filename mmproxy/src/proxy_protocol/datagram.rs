//! One received datagram's PROXY header, as the UDP listener judges it
//! (ARCHITECTURE.md, step 3). Pure, so the fuzzer drives exactly what
//! `udp/receive.rs` runs for every datagram.
use super::{decode, DecodeOptions, Decoded, Endpoints, Invalid};

/// Why a datagram is dropped before any flow is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error(transparent)]
    Invalid(Invalid),
    /// The datagram ends inside its header: on a datagram nothing more will come.
    #[error("datagram of {0} bytes ends inside its PROXY header")]
    Truncated(usize),
    /// The kernel cut the datagram to the receive buffer (MSG_TRUNC): whatever the
    /// bytes say, the payload is incomplete.
    #[error("datagram larger than the receive buffer")]
    Oversized,
}

impl DatagramError {
    /// A short stable label for log lines: the decoder's kind for invalid headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DatagramError::Invalid(e) => e.kind(),
            DatagramError::Truncated(_) => "truncated",
            DatagramError::Oversized => "oversized",
        }
    }
}

/// Splits a received datagram into the endpoints its header names and the payload
/// that follows the header (possibly empty). `cut` says the kernel truncated it.
pub fn split_datagram<'d>(
    data: &'d [u8],
    cut: bool,
    opts: &DecodeOptions,
) -> Result<(Endpoints, &'d [u8]), DatagramError> {
    if cut {
        return Err(DatagramError::Oversized);
    }
    match decode(data, opts) {
        Ok(Decoded::Complete { header, len }) => {
            Ok((header.endpoints(), data.get(len..).unwrap_or_default()))
        }
        Ok(Decoded::NeedMore { .. }) => Err(DatagramError::Truncated(data.len())),
        Err(e) => Err(DatagramError::Invalid(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{encode_v1, Transport, V2Builder};

    #[test]
    fn header_payload_truncation_and_cut() {
        let (c, d) = (
            "198.51.100.9:4000".parse().unwrap(),
            "192.0.2.2:53".parse().unwrap(),
        );
        let mut dgram = V2Builder::proxy(c, d)
            .transport(Transport::Dgram)
            .build()
            .unwrap();
        let header_len = dgram.len();
        dgram.extend_from_slice(b"query");
        let opts = DecodeOptions::datagram();
        let (ends, payload) = split_datagram(&dgram, false, &opts).unwrap();
        assert!(matches!(ends, Endpoints::Proxied { client, .. } if client.0 == c));
        assert_eq!(payload, b"query");
        assert_eq!(
            split_datagram(&dgram[..header_len], false, &opts)
                .unwrap()
                .1,
            b""
        );
        assert_eq!(
            split_datagram(&dgram[..header_len - 1], false, &opts),
            Err(DatagramError::Truncated(header_len - 1))
        );
        assert_eq!(
            split_datagram(&dgram, true, &opts),
            Err(DatagramError::Oversized)
        );
        let v1 = encode_v1(c, d);
        let err = split_datagram(&v1, false, &opts).unwrap_err();
        assert_eq!(err, DatagramError::Invalid(Invalid::V1OnDatagram));
        assert_eq!(err.kind(), Invalid::V1OnDatagram.kind());
    }
}
