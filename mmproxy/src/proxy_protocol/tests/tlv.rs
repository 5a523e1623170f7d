//! Typed TLV views and their validation.

use super::*;
use crate::proxy_protocol::tlv::{kind, ssl_client, MAX_UNIQUE_ID_LEN};

fn base() -> V2Builder {
    V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:443"))
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn crc32c_with_the_field_zeroed_matches_zeroing_by_hand() {
    // Every hole position, including across the staging buffer's 256-byte chunks.
    let data: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    for at in 0..data.len() - 4 {
        let mut zeroed = data.clone();
        zeroed[at..at + 4].fill(0);
        assert_eq!(
            crate::proxy_protocol::tlv::crc32c_with_hole(&data, at),
            crc32c::crc32c(&zeroed),
            "hole at {at}"
        );
    }
}

#[test]
fn alpn_authority_unique_id_netns() {
    let h = base()
        .alpn(b"h2")
        .authority("www.example.com")
        .unique_id(&[0xAB; 32])
        .netns("blue")
        .build()
        .unwrap();
    let (header, _) = complete(&h, &STREAM);
    let t = header.tlvs;
    assert_eq!(t.alpn(), Some(&b"h2"[..]));
    assert_eq!(t.authority(), Some("www.example.com"));
    assert_eq!(t.unique_id(), Some(&[0xAB; 32][..]));
    assert_eq!(t.netns(), Some("blue"));
    assert_eq!(t.ssl(), None);
    assert_eq!(
        t.raw().map(|r| r.kind).collect::<Vec<_>>(),
        [kind::ALPN, kind::AUTHORITY, kind::UNIQUE_ID, kind::NETNS]
    );
    assert_eq!(t.as_bytes(), &h[28..]);
}

#[test]
fn authority_must_be_utf8() {
    let h = base().tlv(kind::AUTHORITY, b"caf\xe9").build().unwrap();
    let e = invalid(&h, &STREAM);
    assert_eq!(e, Invalid::V2NotUtf8("AUTHORITY"));
    assert_eq!(e.to_string(), "v2: AUTHORITY TLV is not valid UTF-8");
    let h = base().authority("café.example").build().unwrap();
    complete(&h, &STREAM);
}

#[test]
fn unique_id_up_to_128_bytes() {
    let h = base().unique_id(&[1; MAX_UNIQUE_ID_LEN]).build().unwrap();
    complete(&h, &STREAM);
    let h = base()
        .unique_id(&[1; MAX_UNIQUE_ID_LEN + 1])
        .build()
        .unwrap();
    assert_eq!(invalid(&h, &STREAM), Invalid::V2UniqueIdTooLong(129));
    let h = base().unique_id(b"").build().unwrap();
    let (header, _) = complete(&h, &STREAM);
    assert_eq!(header.tlvs.unique_id(), Some(&b""[..]));
}

#[test]
fn ssl_with_sub_tlvs() {
    let h = base()
        .ssl(
            ssl_client::SSL | ssl_client::CERT_CONN,
            0,
            &[
                (kind::SSL_VERSION, b"TLSv1.3"),
                (kind::SSL_CN, b"client.example"),
                (kind::SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
                (kind::SSL_SIG_ALG, b"ECDSA-SHA256"),
                (kind::SSL_KEY_ALG, b"EC256"),
                (0x26, b"\x00\x01"),
            ],
        )
        .build()
        .unwrap();
    let (header, _) = complete(&h, &STREAM);
    let ssl = header.tlvs.ssl().unwrap();
    assert_eq!(ssl.client, 0x03);
    assert_eq!(ssl.verify, 0);
    assert_eq!(ssl.version(), Some("TLSv1.3"));
    assert_eq!(ssl.cn(), Some("client.example"));
    assert_eq!(
        ssl.iter().collect::<Vec<_>>(),
        [
            SslTlv::Version("TLSv1.3"),
            SslTlv::Cn("client.example"),
            SslTlv::Cipher("TLS_AES_128_GCM_SHA256"),
            SslTlv::SigAlg("ECDSA-SHA256"),
            SslTlv::KeyAlg("EC256"),
            SslTlv::Other(RawTlv {
                kind: 0x26,
                value: b"\x00\x01"
            }),
        ]
    );
}

#[test]
fn ssl_without_sub_tlvs_and_verify_failed() {
    let h = base().ssl(ssl_client::SSL, 21, &[]).build().unwrap();
    let (header, _) = complete(&h, &STREAM);
    let ssl = header.tlvs.ssl().unwrap();
    assert_eq!((ssl.client, ssl.verify, ssl.iter().count()), (1, 21, 0));
}

#[test]
fn ssl_shorter_than_its_fixed_part() {
    let h = base().tlv(kind::SSL, &[1, 0, 0, 0]).build().unwrap();
    assert_eq!(invalid(&h, &STREAM), Invalid::V2SslTooShort(4));
}

#[test]
fn ssl_sub_tlv_overrun_and_truncated() {
    let h = base()
        .tlv(kind::SSL, &[1, 0, 0, 0, 0, kind::SSL_CN, 0, 9, b'x'])
        .build()
        .unwrap();
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2SslSubTlvOverrun {
            kind: kind::SSL_CN,
            len: 9,
            left: 1
        }
    );
    let h = base()
        .tlv(kind::SSL, &[1, 0, 0, 0, 0, kind::SSL_CN, 0])
        .build()
        .unwrap();
    assert_eq!(
        invalid(&h, &STREAM),
        Invalid::V2SslSubTlvTruncated { offset: 0, left: 2 }
    );
    let h = base()
        .ssl(1, 0, &[(kind::SSL_CN, b"\xff")])
        .build()
        .unwrap();
    assert_eq!(invalid(&h, &STREAM), Invalid::V2NotUtf8("SSL CN"));
}

#[test]
fn custom_experimental_and_future_types_are_kept_raw() {
    let mut b = base();
    let kinds: Vec<u8> = (0x00..=0x00)
        .chain(0x06..=0x1F)
        .chain(0x26..=0x2F)
        .chain(0x31..=0xFF)
        .collect();
    for &k in &kinds {
        b = b.tlv(k, &[k, 0xFF]);
    }
    let h = b.build().unwrap();
    let (header, _) = complete(&h, &DecodeOptions::stream().with_max_header_len(8192));
    let seen: Vec<_> = header.tlvs.iter().collect();
    assert_eq!(seen.len(), kinds.len());
    for (tlv, &k) in seen.iter().zip(&kinds) {
        assert_eq!(
            *tlv,
            Tlv::Other(RawTlv {
                kind: k,
                value: &[k, 0xFF]
            })
        );
    }
}

#[test]
fn aws_azure_gcp_vendor_tlvs() {
    let h = base()
        .tlv(0xEA, b"\x01vpce-0123456789abcdef")
        .tlv(0xEE, b"\x01\x00\x00\x00\x2a")
        .tlv(0xE0, b"\x00\x00\x00\x00\x00\x00\x00\x07")
        .crc32c()
        .build()
        .unwrap();
    let (header, _) = complete(&h, &STREAM);
    assert_eq!(
        header.tlvs.get(0xEA),
        Some(&b"\x01vpce-0123456789abcdef"[..])
    );
    assert_eq!(header.tlvs.get(0xEE), Some(&b"\x01\x00\x00\x00\x2a"[..]));
    assert_eq!(header.tlvs.get(0xE0).map(<[u8]>::len), Some(8));
}

#[test]
fn haproxy_style_header_with_everything() {
    // What `send-proxy-v2` with `proxy-v2-options crc32c,unique-id,authority,ssl` sends.
    let h = base()
        .alpn(b"h2")
        .authority("www.example.com")
        .unique_id(b"7F000001:C350_7F000001:01BB_5F5E1000_0001:0001")
        .ssl(
            ssl_client::SSL,
            0,
            &[
                (kind::SSL_VERSION, b"TLSv1.3"),
                (kind::SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"),
            ],
        )
        .crc32c()
        .build()
        .unwrap();
    let (header, len) = complete(&h, &STREAM);
    assert_eq!(len, h.len());
    assert_eq!(header.tlvs.iter().count(), 5);
    assert_eq!(header.tlvs.ssl().and_then(|s| s.version()), Some("TLSv1.3"));
}
