//! Named cases from the spec summary, streaming behaviour and property tests.

mod props;
mod streaming;
mod tlv;
mod v1;
mod v2;

use super::*;

pub(super) const STREAM: DecodeOptions = DecodeOptions::stream();
pub(super) const DATAGRAM: DecodeOptions = DecodeOptions::datagram();

/// Decodes and insists on a complete header; also checks that every split of the input
/// leads there (see [`streaming::assert_every_split`]).
#[track_caller]
pub(super) fn complete<'a>(buf: &'a [u8], opts: &DecodeOptions) -> (Header<'a>, usize) {
    match decode(buf, opts) {
        Ok(Decoded::Complete { header, len }) => {
            streaming::assert_every_split(buf.get(..len).unwrap(), opts);
            (header, len)
        }
        other => panic!("expected a complete header for {buf:02x?}, got {other:?}"),
    }
}

#[track_caller]
pub(super) fn invalid(buf: &[u8], opts: &DecodeOptions) -> Invalid {
    match decode(buf, opts) {
        Err(e) => {
            // Display and kind must be usable for every reason.
            assert!(!e.to_string().is_empty() && !e.kind().is_empty());
            e
        }
        other => panic!("expected invalid for {buf:02x?}, got {other:?}"),
    }
}

#[track_caller]
pub(super) fn need_more(buf: &[u8], opts: &DecodeOptions) -> usize {
    match decode(buf, opts) {
        Ok(Decoded::NeedMore { at_least }) => {
            assert!(
                at_least > buf.len(),
                "at_least {at_least} for {} bytes",
                buf.len()
            );
            at_least
        }
        other => panic!("expected need-more for {buf:02x?}, got {other:?}"),
    }
}

/// A raw v2 header: signature, the two kind bytes, `len` from the body.
pub(super) fn v2_raw(ver_cmd: u8, fam_proto: u8, body: &[u8]) -> Vec<u8> {
    let mut out = crate::proxy_protocol::v2::SIGNATURE.to_vec();
    out.push(ver_cmd);
    out.push(fam_proto);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub(super) fn inet_block() -> Vec<u8> {
    vec![192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x01, 0xbb]
}

pub(super) fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}
