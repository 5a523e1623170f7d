//! A header split over reads: every prefix asks for more, the whole gives the same result.

use super::*;

/// `header` is exactly one valid header. Checks byte-by-byte growth, every two-part
/// split, and the header followed by payload in one read.
#[track_caller]
pub(crate) fn assert_every_split(header: &[u8], opts: &DecodeOptions) {
    let whole = decode(header, opts);
    let Ok(Decoded::Complete { len, .. }) = whole else {
        panic!("not a complete header: {whole:?}");
    };
    assert_eq!(len, header.len());

    // Byte by byte, as a slow sender would deliver it.
    let mut buf = Vec::new();
    for &b in header {
        let at_least = need_more(&buf, opts);
        assert!(
            at_least <= header.len(),
            "at_least {at_least} > {}",
            header.len()
        );
        buf.push(b);
    }
    assert_eq!(decode(&buf, opts), whole);

    // Two reads, split anywhere.
    for k in 1..header.len() {
        let mut buf = header[..k].to_vec();
        need_more(&buf, opts);
        buf.extend_from_slice(&header[k..]);
        assert_eq!(decode(&buf, opts), whole);
    }

    // Payload arriving in the same read must be left alone.
    let mut with_payload = header.to_vec();
    with_payload.extend_from_slice(b"\r\n\r\nPROXY payload \0\xff");
    assert_eq!(decode(&with_payload, opts), whole);
}

#[test]
fn v1_split_at_every_byte() {
    for line in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"[..],
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN whatever comes here\r\n",
    ] {
        assert_every_split(line, &STREAM);
    }
}

#[test]
fn v2_split_at_every_byte() {
    let headers = [
        V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:443"))
            .build()
            .unwrap(),
        V2Builder::proxy(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"))
            .authority("example.com")
            .unique_id(b"id")
            .crc32c()
            .build()
            .unwrap(),
        V2Builder::local().build().unwrap(),
        V2Builder::new(Command::Proxy, Transport::Stream)
            .unix(b"/a", b"/b")
            .build()
            .unwrap(),
    ];
    for h in &headers {
        assert_every_split(h, &STREAM);
    }
    let dgram = V2Builder::proxy(sa("192.0.2.1:5000"), sa("198.51.100.2:53"))
        .transport(Transport::Dgram)
        .build()
        .unwrap();
    assert_every_split(&dgram, &DATAGRAM);
}

#[test]
fn empty_buffer_needs_the_shortest_header() {
    assert_eq!(need_more(b"", &STREAM), 15);
    assert_eq!(need_more(b"\r", &STREAM), 16);
}

#[test]
fn v1_slowloris_one_byte_at_a_time_never_finishing() {
    let mut buf = b"PROXY UNKNOWN ".to_vec();
    while buf.len() < V1_MAX_LEN {
        need_more(&buf, &STREAM);
        buf.push(b'a');
    }
    assert_eq!(invalid(&buf, &STREAM), Invalid::V1NoCrlf);
    buf.push(b'a');
    assert_eq!(invalid(&buf, &STREAM), Invalid::V1NoCrlf);
}

#[test]
fn v2_slowloris_is_bounded_by_len() {
    let h = V2Builder::proxy(sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .noop(100)
        .build()
        .unwrap();
    for k in 16..h.len() {
        assert_eq!(need_more(&h[..k], &STREAM), h.len());
    }
}
