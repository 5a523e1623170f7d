//! PROXY header decode time, mmproxy's codec next to the `ppp` crate on the same bytes.
//!
//! Both sides produce the same thing: the addresses and every TLV as (type, bytes). ppp
//! parses TLVs lazily, so its iterator is drained; mmproxy has already validated them
//! (UTF-8 of AUTHORITY and the SSL strings, SSL structure, UNIQUE_ID length) at decode
//! time and walks them again. ppp does not verify CRC32C; mmproxy does, so the TLV case
//! is also measured without a CRC32C TLV to show what the checksum costs.
// A benchmark stops at the first bad input, like a test: the crate's production lints
// (no unwrap, no panic) do not apply to it.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use mmproxy::proxy_protocol::{decode, tlv, DecodeOptions, Decoded, V2Builder};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v1_tcp4() -> Vec<u8> {
    b"PROXY TCP4 192.168.1.10 10.0.0.1 56324 443\r\n".to_vec()
}

fn v2_ipv4() -> Vec<u8> {
    V2Builder::proxy(addr("192.168.1.10:56324"), addr("10.0.0.1:443"))
        .build()
        .unwrap()
}

/// About 200 bytes of what HAProxy and cloud balancers send.
fn v2_tlvs(crc: bool) -> Vec<u8> {
    let b = V2Builder::proxy(addr("192.168.1.10:56324"), addr("10.0.0.1:443"))
        .alpn(b"h2")
        .authority("www.example.com")
        .unique_id(&[0x5a; 64])
        .ssl(
            tlv::ssl_client::SSL | tlv::ssl_client::CERT_CONN,
            0,
            &[
                (tlv::kind::SSL_VERSION, b"TLSv1.3"),
                (tlv::kind::SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"),
                (tlv::kind::SSL_CN, b"client.example.com"),
            ],
        )
        .tlv(0xEA, b"\x01vpce-0123456789abcdef0");
    if crc { b.crc32c() } else { b }.build().unwrap()
}

fn mmproxy_decode(buf: &[u8]) -> usize {
    match decode(buf, &DecodeOptions::stream()) {
        Ok(Decoded::Complete { header, len }) => {
            len + header.tlvs.raw().map(|t| t.value.len()).sum::<usize>()
        }
        other => panic!("{other:?}"),
    }
}

fn ppp_v1(buf: &[u8]) -> usize {
    let header = ppp::v1::Header::try_from(buf).unwrap();
    header.header.len()
}

fn ppp_v2(buf: &[u8]) -> usize {
    let header = ppp::v2::Header::try_from(buf).unwrap();
    header.len() + header.tlvs().map(|t| t.unwrap().value.len()).sum::<usize>()
}

type Decoder = fn(&[u8]) -> usize;

fn bench(c: &mut Criterion) {
    let cases: [(&str, Vec<u8>, Decoder); 4] = [
        ("v1_tcp4", v1_tcp4(), ppp_v1),
        ("v2_ipv4", v2_ipv4(), ppp_v2),
        ("v2_200B_tlvs_crc32c", v2_tlvs(true), ppp_v2),
        ("v2_200B_tlvs_no_crc", v2_tlvs(false), ppp_v2),
    ];
    for (name, bytes, ppp) in &cases {
        let mut group = c.benchmark_group(format!("{name} ({} bytes)", bytes.len()));
        group.bench_function("mmproxy", |b| b.iter(|| mmproxy_decode(black_box(bytes))));
        group.bench_function("ppp", |b| b.iter(|| ppp(black_box(bytes))));
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
