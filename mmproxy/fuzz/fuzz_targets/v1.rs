//! PROXY v1 lines. Inputs that do not start with `P` get `PROXY ` put in front, so
//! the fuzzer stays in the v1 parser. Beyond "never panics": a complete line ends in
//! CRLF within 107 bytes, its addresses re-encode into a line that decodes to the
//! same addresses, and the datagram listener refuses every v1 line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::proxy_protocol::{
    decode, encode_v1, Addresses, DecodeOptions, Decoded, Endpoints, Invalid, Version, V1_MAX_LEN,
};

fuzz_target!(|data: &[u8]| {
    let owned;
    let line = if data.first() == Some(&b'P') {
        data
    } else {
        owned = [b"PROXY ".as_slice(), data].concat();
        &owned
    };
    let opts = DecodeOptions::stream();
    assert_eq!(
        decode(line, &DecodeOptions::datagram()),
        Err(Invalid::V1OnDatagram)
    );
    let Ok(Decoded::Complete { header, len }) = decode(line, &opts) else {
        return;
    };
    assert_eq!(header.version, Version::V1);
    assert!(len <= V1_MAX_LEN && line[..len].ends_with(b"\r\n"), "{len}");
    assert!(header.tlvs.is_empty());
    if let Endpoints::Proxied {
        client,
        destination,
    } = header.endpoints()
    {
        let again = encode_v1(client.0, destination.0);
        match decode(&again, &opts) {
            Ok(Decoded::Complete { header: h2, len }) => {
                assert_eq!(len, again.len());
                assert_eq!(h2.addresses, header.addresses);
            }
            other => panic!(
                "re-encoded {:?}: {other:?}",
                String::from_utf8_lossy(&again)
            ),
        }
    } else {
        assert_eq!(header.addresses, Addresses::None);
    }
});
