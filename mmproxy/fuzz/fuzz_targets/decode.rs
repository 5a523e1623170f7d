//! Arbitrary bytes into the PROXY header decoder, under both listener kinds and several
//! size limits. Beyond "never panics" it checks the streaming contract: a complete
//! header decodes the same on its own, its prefixes only ask for more, and an answer of
//! "need more" is never contradicted by a shorter input being invalid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::proxy_protocol::{decode, DecodeOptions, Decoded, MAX_POSSIBLE_HEADER_LEN};

/// A handful of prefix lengths spread over `0..n`, always including `n - 1`: checking
/// every prefix would make each run quadratic.
fn sample_prefixes(n: usize) -> impl Iterator<Item = usize> {
    let step = (n / 16).max(1);
    (0..n).step_by(step).chain(n.checked_sub(1))
}

fuzz_target!(|data: &[u8]| {
    let options = [
        DecodeOptions::stream(),
        DecodeOptions::datagram(),
        DecodeOptions::stream().with_max_header_len(16),
        DecodeOptions::stream().with_max_header_len(300),
        DecodeOptions::datagram().with_max_header_len(MAX_POSSIBLE_HEADER_LEN),
    ];
    for opts in &options {
        let got = decode(data, opts);
        match got {
            Ok(Decoded::Complete { header, len }) => {
                assert!(len <= data.len());
                assert_eq!(decode(&data[..len], opts), got);
                assert_eq!(header.tlvs.iter().count(), header.tlvs.raw().count());
                let _ = header.endpoints();
                for k in sample_prefixes(len) {
                    let prefix = decode(&data[..k], opts);
                    assert!(
                        matches!(prefix, Ok(Decoded::NeedMore { at_least }) if at_least > k && at_least <= len),
                        "prefix {k} of a {len}-byte header: {prefix:?}"
                    );
                }
            }
            Ok(Decoded::NeedMore { at_least }) => {
                assert!(at_least > data.len());
                for k in sample_prefixes(data.len()) {
                    assert!(decode(&data[..k], opts).is_ok(), "prefix {k} invalid");
                }
            }
            Err(e) => {
                assert!(!e.to_string().is_empty() && !e.kind().is_empty());
            }
        }
    }
});
