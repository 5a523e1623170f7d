//! The hostile load, interleaved with the good one: malformed, truncated, oversized
//! headers and headers with a bad CRC32C, resets in the middle of a header, sources
//! outside the allow-list, slow-loris senders and connection floods past
//! `--max-connections`; for UDP, datagrams with bad, truncated or misplaced headers
//! and from outside the allow-list.
//!
//! Each kind is tallied under the counter reason the daemon must give it
//! ([`TcpKind::reason`]); nothing may come back on any of them.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mmproxy::proxy_protocol::{encode_v1, Transport, V2Builder};
use socket2::{SockRef, Type};

use super::control::Control;
use super::good::{bound_socket, connect, IO_TIMEOUT};
use super::net::{proxy_addr, STRANGER4, STRANGER6, TCP_PORT, UDP_PORT};

/// Where the daemon must count a rejected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// One `reason` label of `mmproxy_tcp_connections_rejected_total`.
    Exact(&'static str),
    /// Closed before a complete header: `header_eof`, `header_timeout` or
    /// `read_error`, depending on what the daemon saw first.
    ClosedEarly,
    /// Refused by sk_lookup (`mmproxy_kernel_refused_total`) or, in user space,
    /// `not_allowed`.
    NotAllowed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpKind {
    Garbage,
    BadV1,
    Oversized,
    BadCrc,
    Truncated,
    ResetMidHeader,
    Disallowed,
}

impl TcpKind {
    pub const ALL: [TcpKind; 7] = [
        TcpKind::Garbage,
        TcpKind::BadV1,
        TcpKind::Oversized,
        TcpKind::BadCrc,
        TcpKind::Truncated,
        TcpKind::ResetMidHeader,
        TcpKind::Disallowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TcpKind::Garbage => "tcp_hostile_garbage",
            TcpKind::BadV1 => "tcp_hostile_bad_v1",
            TcpKind::Oversized => "tcp_hostile_oversized",
            TcpKind::BadCrc => "tcp_hostile_bad_crc32c",
            TcpKind::Truncated => "tcp_hostile_truncated",
            TcpKind::ResetMidHeader => "tcp_hostile_reset_mid_header",
            TcpKind::Disallowed => "tcp_hostile_disallowed",
        }
    }

    pub fn reason(self) -> Reason {
        match self {
            TcpKind::Garbage => Reason::Exact("not_proxy_protocol"),
            TcpKind::BadV1 => Reason::Exact("v1_bad_address"),
            TcpKind::Oversized => Reason::Exact("too_long"),
            TcpKind::BadCrc => Reason::Exact("v2_crc32c_mismatch"),
            TcpKind::Truncated | TcpKind::ResetMidHeader => Reason::ClosedEarly,
            TcpKind::Disallowed => Reason::NotAllowed,
        }
    }

    /// What the connection sends (for the disallowed one: a valid header and a
    /// request, which must not get through).
    pub fn bytes(self, link_v6: bool) -> Vec<u8> {
        let client: SocketAddr = if link_v6 {
            "[2001:db8:2::9]:4000".parse()
        } else {
            "203.0.113.9:4000".parse()
        }
        .unwrap_or_else(|_| SocketAddr::from(([203, 0, 113, 9], 4000)));
        let dest = proxy_addr(link_v6, TCP_PORT);
        let v2 = |b: V2Builder| b.build().unwrap_or_default();
        match self {
            TcpKind::Garbage => b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n".to_vec(),
            TcpKind::BadV1 => b"PROXY TCP4 198.51.100.300 192.0.2.2 4000 8443\r\nhello".to_vec(),
            // A header whose length field says more than --max-header-size (4096).
            TcpKind::Oversized => v2(V2Builder::proxy(client, dest).noop(8000)),
            TcpKind::BadCrc => {
                let mut h = v2(V2Builder::proxy(client, dest).crc32c());
                if let Some(last) = h.last_mut() {
                    *last ^= 0x5a;
                }
                h.extend_from_slice(b"hello");
                h
            }
            TcpKind::Truncated => {
                let mut h = v2(V2Builder::proxy(client, dest));
                h.truncate(20);
                h
            }
            TcpKind::ResetMidHeader => {
                let mut h = encode_v1(client, dest);
                h.truncate(12);
                h
            }
            TcpKind::Disallowed => {
                let mut h = encode_v1(client, dest);
                h.extend_from_slice(b"must not arrive");
                h
            }
        }
    }
}

/// The TCP kinds in turn, one every `pace`, until the run stops.
pub fn tcp(ctl: &Control, pace: Duration) {
    let mut i = 0u64;
    while let Some(_busy) = ctl.gate() {
        let kind = TcpKind::ALL[(i % TcpKind::ALL.len() as u64) as usize];
        let link_v6 = (i / TcpKind::ALL.len() as u64) % 2 == 1;
        if let Err(e) = tcp_one(ctl, kind, link_v6) {
            ctl.fail(format!("{} (link ipv6 {link_v6}): {e:#}", kind.name()));
        }
        i += 1;
        drop(_busy);
        ctl.sleep(pace);
    }
}

fn tcp_one(ctl: &Control, kind: TcpKind, link_v6: bool) -> Result<()> {
    let to = proxy_addr(link_v6, TCP_PORT);
    let from = match (kind, link_v6) {
        (TcpKind::Disallowed, false) => Some(STRANGER4),
        (TcpKind::Disallowed, true) => Some(STRANGER6),
        _ => None,
    };
    let mut s = match connect(to, from) {
        Ok(s) => s,
        Err(e) if kind == TcpKind::Disallowed && refused(&e) => {
            ctl.add(kind.name(), 1);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    ctl.add(kind.name(), 1);
    // The daemon may close before everything is written: that is its answer.
    let _ = s.write_all(&kind.bytes(link_v6));
    match kind {
        TcpKind::ResetMidHeader => {
            SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            drop(s);
            return Ok(());
        }
        TcpKind::Truncated => {
            let _ = s.shutdown(Shutdown::Write);
        }
        _ => {}
    }
    closed_silently(&mut s)
}

fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::ConnectionRefused)
    })
}

/// Waits for the daemon to close the connection; nothing may come back.
fn closed_silently(s: &mut TcpStream) -> Result<()> {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => bail!("{n} bytes came back"),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("still open after {IO_TIMEOUT:?}")
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A slow-loris sender at a time: a valid v1 header, one byte every `drip`, until
/// the daemon closes the connection (its header timeout), then the next.
pub fn slow_loris(ctl: &Control, drip: Duration, seed: u64) {
    let mut i = seed;
    while let Some(_busy) = ctl.gate() {
        if let Err(e) = loris_one(ctl, drip, i % 2 == 1) {
            ctl.fail(format!("slow-loris: {e:#}"));
        }
        i += 1;
    }
}

fn loris_one(ctl: &Control, drip: Duration, link_v6: bool) -> Result<()> {
    let to = proxy_addr(link_v6, TCP_PORT);
    let mut s = connect(to, None)?;
    ctl.add("tcp_hostile_slow_loris", 1);
    let client = if link_v6 {
        "[2001:db8:2::7]:4000"
    } else {
        "203.0.113.7:4000"
    };
    let header = encode_v1(client.parse()?, to);
    s.set_read_timeout(Some(drip))?;
    let mut buf = [0u8; 64];
    // The header is 50-odd bytes: at one byte a drip it outlasts the header timeout
    // many times over. A daemon that waited for all of it would be caught here.
    for b in header.iter().chain(std::iter::repeat(&b' ')).take(10_000) {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            return Ok(());
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => bail!("{n} bytes came back"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(()),
        }
    }
    bail!("still open after 10,000 drips")
}

/// Every `every`, `size` connections at once that send nothing, held for `hold`
/// and then closed: more than `--max-connections`, so the rest wait in the backlog
/// (and with them, meanwhile, the good load).
pub fn flood(ctl: &Control, first: Duration, every: Duration, size: usize, hold: Duration) {
    ctl.sleep(first);
    while let Some(_busy) = ctl.gate() {
        let mut conns = Vec::with_capacity(size);
        for i in 0..size {
            match connect(proxy_addr(i % 2 == 1, TCP_PORT), None) {
                Ok(s) => conns.push(s),
                Err(e) => {
                    ctl.fail(format!("flood connection {i}: {e:#}"));
                    break;
                }
            }
        }
        ctl.add("tcp_hostile_flood", conns.len() as u64);
        ctl.add("floods", 1);
        let t = Instant::now();
        while t.elapsed() < hold && !ctl.stopping() {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(conns);
        drop(_busy);
        ctl.sleep(every);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpKind {
    Garbage,
    V1,
    StreamHeader,
    BadCrc,
    Truncated,
    Disallowed,
}

impl UdpKind {
    pub const ALL: [UdpKind; 6] = [
        UdpKind::Garbage,
        UdpKind::V1,
        UdpKind::StreamHeader,
        UdpKind::BadCrc,
        UdpKind::Truncated,
        UdpKind::Disallowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UdpKind::Garbage => "udp_hostile_garbage",
            UdpKind::V1 => "udp_hostile_v1",
            UdpKind::StreamHeader => "udp_hostile_stream_header",
            UdpKind::BadCrc => "udp_hostile_bad_crc32c",
            UdpKind::Truncated => "udp_hostile_truncated",
            UdpKind::Disallowed => "udp_hostile_disallowed",
        }
    }

    /// The `reason` of `mmproxy_udp_datagrams_dropped_total` (or, for the
    /// disallowed, the kernel's refusal or `not_allowed`).
    pub fn reason(self) -> &'static str {
        match self {
            UdpKind::Truncated => "truncated",
            UdpKind::Disallowed => "not_allowed",
            _ => "invalid_header",
        }
    }

    pub fn bytes(self, link_v6: bool) -> Vec<u8> {
        let client: SocketAddr = if link_v6 {
            "[2001:db8:2::8]:5000".parse()
        } else {
            "203.0.113.8:5000".parse()
        }
        .unwrap_or_else(|_| SocketAddr::from(([203, 0, 113, 8], 5000)));
        let dest = proxy_addr(link_v6, UDP_PORT);
        let dgram = || V2Builder::proxy(client, dest).transport(Transport::Dgram);
        let mut d = match self {
            UdpKind::Garbage => vec![0x42; 64],
            UdpKind::V1 => encode_v1(client, dest),
            UdpKind::StreamHeader => V2Builder::proxy(client, dest).build().unwrap_or_default(),
            UdpKind::BadCrc => {
                let mut h = dgram().crc32c().build().unwrap_or_default();
                if let Some(last) = h.last_mut() {
                    *last ^= 0x5a;
                }
                h
            }
            UdpKind::Truncated => {
                let mut h = dgram().build().unwrap_or_default();
                h.truncate(20);
                return h;
            }
            UdpKind::Disallowed => dgram().build().unwrap_or_default(),
        };
        d.extend_from_slice(b"must not arrive");
        d
    }
}

/// The UDP kinds in turn, one every `pace`, each from a fresh socket that must hear
/// nothing back.
pub fn udp(ctl: &Control, pace: Duration) {
    let mut i = 0u64;
    while let Some(_busy) = ctl.gate() {
        let kind = UdpKind::ALL[(i % UdpKind::ALL.len() as u64) as usize];
        let link_v6 = (i / UdpKind::ALL.len() as u64) % 2 == 1;
        if let Err(e) = udp_one(ctl, kind, link_v6) {
            ctl.fail(format!("{} (link ipv6 {link_v6}): {e:#}", kind.name()));
        }
        i += 1;
        drop(_busy);
        ctl.sleep(pace);
    }
}

fn udp_one(ctl: &Control, kind: UdpKind, link_v6: bool) -> Result<()> {
    let from = match (kind, link_v6) {
        (UdpKind::Disallowed, false) => Some(STRANGER4),
        (UdpKind::Disallowed, true) => Some(STRANGER6),
        _ => None,
    };
    let s = bound_socket(link_v6, Type::DGRAM, from)?;
    s.connect(&proxy_addr(link_v6, UDP_PORT).into())?;
    let s: UdpSocket = s.into();
    s.send(&kind.bytes(link_v6))?;
    ctl.add(kind.name(), 1);
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 2048];
    match s.recv(&mut buf) {
        Ok(n) => bail!("{n} bytes came back"),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use mmproxy::proxy_protocol::{decode, DecodeOptions, Decoded, Expect};

    use super::*;

    /// The reasons the soak expects are the ones the daemon's decoder gives.
    #[test]
    fn hostile_headers_are_the_kinds_they_are_counted_as() {
        for v6 in [false, true] {
            for kind in TcpKind::ALL {
                let bytes = kind.bytes(v6);
                let got = decode(&bytes, &DecodeOptions::stream());
                match kind.reason() {
                    Reason::Exact(reason) => {
                        assert_eq!(got.err().map(|e| e.kind()), Some(reason), "{kind:?}")
                    }
                    Reason::ClosedEarly => {
                        assert!(matches!(got, Ok(Decoded::NeedMore { .. })), "{kind:?}")
                    }
                    Reason::NotAllowed => {
                        assert!(matches!(got, Ok(Decoded::Complete { .. })), "{kind:?}")
                    }
                }
            }
            let dgram = DecodeOptions {
                transport: Expect::Datagram,
                ..DecodeOptions::stream()
            };
            for kind in UdpKind::ALL {
                let bytes = kind.bytes(v6);
                let got = decode(&bytes, &dgram);
                match kind.reason() {
                    "invalid_header" => assert!(got.is_err(), "{kind:?}"),
                    "truncated" => {
                        assert!(matches!(got, Ok(Decoded::NeedMore { .. })), "{kind:?}")
                    }
                    _ => assert!(matches!(got, Ok(Decoded::Complete { .. })), "{kind:?}"),
                }
            }
        }
    }
}
