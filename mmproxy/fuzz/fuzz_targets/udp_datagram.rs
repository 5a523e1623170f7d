//! The UDP listener's per-datagram decision, `split_datagram`, as `udp/receive.rs`
//! calls it. The first byte chooses: bit 0, the kernel cut the datagram; bit 1, the
//! rest is framed as a v2 header (signature, length, CRC32C fixed) followed by a
//! payload; bit 2, a small `--max-header-size`. Checked: a cut datagram is always
//! `Oversized`; otherwise the payload is exactly the bytes after a header that
//! decodes on its own to the same endpoints, and "ends inside its header" happens
//! exactly when the decoder asks for more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::frame;
use mmproxy_codec::proxy_protocol::{
    decode, split_datagram, DatagramError, DecodeOptions, Decoded, MAX_POSSIBLE_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    let framed;
    let datagram = if mode & 2 == 0 {
        rest
    } else {
        // fam, then the body's length inside the frame, then body and payload.
        let [fam, split, more @ ..] = rest else {
            return;
        };
        let cut = usize::from(*split).min(more.len());
        let mut d = frame::v2(0x21, *fam, &more[..cut]);
        frame::fix_crc32c(&mut d);
        d.extend_from_slice(&more[cut..]);
        framed = d;
        &framed
    };
    let max = if mode & 4 == 0 {
        MAX_POSSIBLE_HEADER_LEN
    } else {
        108
    };
    let opts = DecodeOptions::datagram().with_max_header_len(max);
    assert_eq!(
        split_datagram(datagram, true, &opts),
        Err(DatagramError::Oversized)
    );
    match split_datagram(datagram, false, &opts) {
        Ok((endpoints, payload)) => {
            let header_len = datagram.len() - payload.len();
            assert!(std::ptr::eq(payload, &datagram[header_len..]));
            match decode(&datagram[..header_len], &opts) {
                Ok(Decoded::Complete { header, len }) => {
                    assert_eq!(len, header_len);
                    assert_eq!(header.endpoints(), endpoints);
                }
                other => panic!("the header alone: {other:?}"),
            }
        }
        Err(DatagramError::Truncated(n)) => {
            assert_eq!(n, datagram.len());
            assert!(matches!(
                decode(datagram, &opts),
                Ok(Decoded::NeedMore { .. })
            ));
        }
        Err(DatagramError::Invalid(e)) => assert_eq!(decode(datagram, &opts), Err(e)),
        Err(DatagramError::Oversized) => panic!("Oversized without the cut flag"),
    }
});
