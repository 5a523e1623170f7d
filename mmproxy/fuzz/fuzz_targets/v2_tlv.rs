//! PROXY v2 headers with TLVs. The input is `ver_cmd`, `fam`, a flags byte and the
//! body; the target frames it (signature, exact length) and, when the body holds a
//! CRC32C TLV, writes the right checksum, so the fuzzer explores the address block
//! and the TLVs. Checked: a complete header is exactly the frame, the typed and raw
//! TLV views agree, and a PROXY header rebuilt by the encoder from what was decoded
//! decodes to the same addresses and TLVs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::frame;
use mmproxy_codec::proxy_protocol::tlv::kind;
use mmproxy_codec::proxy_protocol::{
    decode, Addresses, Command, DecodeOptions, Decoded, Header, RawTlv, Tlv, V2Builder,
    MAX_POSSIBLE_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let [ver_cmd, fam, flags, body @ ..] = data else {
        return;
    };
    let mut header = frame::v2(*ver_cmd, *fam, body);
    if flags & 1 == 0 {
        frame::fix_crc32c(&mut header);
    }
    let max = if flags & 2 == 0 {
        4096
    } else {
        MAX_POSSIBLE_HEADER_LEN
    };
    for opts in [
        DecodeOptions::stream().with_max_header_len(max),
        DecodeOptions::datagram().with_max_header_len(max),
    ] {
        match decode(&header, &opts) {
            Ok(Decoded::Complete { header: h, len }) => {
                assert_eq!(len, header.len());
                check(&h);
            }
            Ok(Decoded::NeedMore { at_least }) => panic!("a whole frame needs {at_least}"),
            Err(e) => assert!(!e.kind().is_empty()),
        }
    }
});

fn check(h: &Header<'_>) {
    let raw: Vec<RawTlv<'_>> = h.tlvs.raw().collect();
    assert_eq!(h.tlvs.iter().count(), raw.len());
    for t in h.tlvs.iter() {
        if let Tlv::Ssl(ssl) = t {
            let _ = (ssl.iter().count(), ssl.version(), ssl.cn());
        }
    }
    let _ = (
        h.tlvs.alpn(),
        h.tlvs.authority(),
        h.tlvs.unique_id(),
        h.tlvs.netns(),
        h.tlvs.ssl(),
    );
    let _ = h.endpoints();

    // Rebuild: same command, transport, addresses and TLVs (the checksum is the
    // encoder's own, placed last).
    let mut b = V2Builder::new(h.command, h.transport);
    b = match h.addresses {
        Addresses::Inet {
            source,
            destination,
        } => b.addresses(source.into(), destination.into()),
        Addresses::Inet6 {
            source,
            destination,
        } => b.addresses(source.into(), destination.into()),
        Addresses::Unix {
            source,
            destination,
        } => b.unix(source.raw(), destination.raw()),
        Addresses::None => return,
    };
    if h.command == Command::Local {
        return;
    }
    let mut had_crc = false;
    for t in &raw {
        if t.kind == kind::CRC32C {
            had_crc = true;
        } else {
            b = b.tlv(t.kind, t.value);
        }
    }
    if had_crc {
        b = b.crc32c();
    }
    let Ok(again) = b.build() else { return };
    let opts = DecodeOptions::stream().with_max_header_len(MAX_POSSIBLE_HEADER_LEN);
    let opts = if matches!(decode(&again, &opts), Err(_)) {
        DecodeOptions::datagram().with_max_header_len(MAX_POSSIBLE_HEADER_LEN)
    } else {
        opts
    };
    match decode(&again, &opts) {
        Ok(Decoded::Complete { header: h2, len }) => {
            assert_eq!(len, again.len());
            assert_eq!(h2.addresses, h.addresses);
            let kinds = |h: &Header<'_>| {
                h.tlvs
                    .raw()
                    .filter(|t| t.kind != kind::CRC32C)
                    .map(|t| (t.kind, t.value.to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(kinds(&h2), kinds(h));
        }
        other => panic!("rebuilt header does not decode: {other:?}"),
    }
}
