//! The good load: PROXY v1 and v2 (with and without CRC32C) over TCP, IPv4 and IPv6
//! on the balancer's link and in the header, short connections closed by a
//! half-close or a full close, streaming connections; UDP flows with v2 DGRAM
//! headers. Every byte is pseudo-random and checksummed on the way out and back
//! (the upstream is an echo server, so what returns crossed the proxy both ways).
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mmproxy::proxy_protocol::{encode_v1, Transport, V2Builder};
use socket2::{Domain, Socket, Type};

use super::control::Control;
use super::net::{proxy_addr, ClientTuples, CLIENT6, TCP_PORT, UDP_PORT};
use crate::bench::net::CLIENT;

/// Generous: a connection may wait in the backlog through a flood.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A reproducible byte stream (xorshift64*).
pub struct Bytes(u64);

impl Bytes {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// FNV-1a over a stream, with its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sum {
    pub len: u64,
    hash: u64,
}

impl Default for Sum {
    fn default() -> Self {
        Self {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Sum {
    pub fn update(&mut self, buf: &[u8]) {
        for b in buf {
            self.hash = (self.hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.len += buf.len() as u64;
    }
}

/// One good connection's make-up, cycled through every combination.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub link_v6: bool,
    pub client_v6: bool,
    pub v2: bool,
    pub crc: bool,
    pub half_close: bool,
}

impl Shape {
    pub fn nth(i: u64) -> Self {
        Self {
            link_v6: i & 1 != 0,
            client_v6: i & 2 != 0,
            v2: i & 4 != 0,
            crc: i & 8 != 0,
            half_close: i & 16 != 0,
        }
    }

    /// The header for a fresh client tuple, naming the proxy's address as destination
    /// (of the client's family, as v1 needs).
    fn header(&self, tuples: &ClientTuples, port: u16, transport: Transport) -> Result<Vec<u8>> {
        let client = tuples.next(self.client_v6);
        let dest = proxy_addr(self.client_v6, port);
        if !self.v2 && transport == Transport::Stream {
            return Ok(encode_v1(client, dest));
        }
        let mut b = V2Builder::proxy(client, dest).transport(transport);
        if self.crc {
            b = b.crc32c();
        }
        Ok(b.build()?)
    }

    fn tally(&self, ctl: &Control, kind: &str) {
        ctl.add(kind, 1);
        ctl.add(
            if self.v2 {
                "tcp_good_v2"
            } else {
                "tcp_good_v1"
            },
            1,
        );
        if self.link_v6 {
            ctl.add("tcp_good_link_ipv6", 1);
        }
        if self.client_v6 {
            ctl.add("tcp_good_client_ipv6", 1);
        }
        if self.half_close {
            ctl.add("tcp_good_half_close", 1);
        }
    }
}

/// A socket bound to the balancer's address of `v6`'s family (the client namespace
/// also holds addresses outside the allow-list, which must not be picked).
pub fn bound_socket(v6: bool, ty: Type, from: Option<&str>) -> Result<Socket> {
    let ip = from.unwrap_or(if v6 { CLIENT6 } else { CLIENT });
    let local: SocketAddr = SocketAddr::new(ip.parse()?, 0);
    let s = Socket::new(Domain::for_address(local), ty, None)?;
    s.bind(&local.into())?;
    Ok(s)
}

pub fn connect(to: SocketAddr, from: Option<&str>) -> Result<TcpStream> {
    let s = bound_socket(to.is_ipv6(), Type::STREAM, from)?;
    s.connect_timeout(&to.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Short connections, one after another, `pace` apart, until the run stops.
pub fn tcp_short(ctl: &Control, tuples: &ClientTuples, seed: u64, pace: Duration) {
    let mut i = seed;
    while let Some(_busy) = ctl.gate() {
        let shape = Shape::nth(i);
        let len = 1 + (i.wrapping_mul(7919) % (16 * 1024)) as usize;
        match short(ctl, tuples, shape, len, i) {
            Ok(()) => ctl.add("tcp_good_ok", 1),
            Err(e) => ctl.fail(format!("short TCP connection {shape:?}: {e:#}")),
        }
        i += 1;
        drop(_busy);
        ctl.sleep(pace);
    }
}

fn short(ctl: &Control, tuples: &ClientTuples, shape: Shape, len: usize, seed: u64) -> Result<()> {
    let mut s = connect(proxy_addr(shape.link_v6, TCP_PORT), None)?;
    let header = shape.header(tuples, TCP_PORT, Transport::Stream)?;
    shape.tally(ctl, "tcp_good_short");
    let mut payload = vec![0; len];
    Bytes::new(seed).fill(&mut payload);
    let mut msg = header;
    msg.extend_from_slice(&payload);
    s.write_all(&msg)?;
    ctl.add("tcp_good_bytes_up", len as u64);
    let mut back = Vec::with_capacity(len);
    if shape.half_close {
        s.shutdown(Shutdown::Write)?;
        s.read_to_end(&mut back)
            .context("reading the echo to EOF after a half-close")?;
    } else {
        back.resize(len, 0);
        s.read_exact(&mut back).context("reading the echo")?;
    }
    ctl.add("tcp_good_bytes_down", back.len() as u64);
    if back != payload {
        bail!("{} bytes sent, {} different bytes echoed", len, back.len());
    }
    Ok(())
}

/// Streaming connections of about `length` each, 16 KiB every `tick`, one after
/// another until the run stops.
pub fn tcp_stream(
    ctl: &Control,
    tuples: &ClientTuples,
    seed: u64,
    length: Duration,
    tick: Duration,
) {
    let mut i = seed;
    while let Some(_busy) = ctl.gate() {
        let shape = Shape::nth(i);
        match stream(ctl, tuples, shape, i, length, tick) {
            Ok(()) => ctl.add("tcp_good_ok", 1),
            Err(e) => ctl.fail(format!("streaming TCP connection {shape:?}: {e:#}")),
        }
        i += 1;
    }
}

fn stream(
    ctl: &Control,
    tuples: &ClientTuples,
    shape: Shape,
    seed: u64,
    length: Duration,
    tick: Duration,
) -> Result<()> {
    let s = connect(proxy_addr(shape.link_v6, TCP_PORT), None)?;
    let header = shape.header(tuples, TCP_PORT, Transport::Stream)?;
    shape.tally(ctl, "tcp_good_stream");
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || -> Result<Sum> {
        let mut sum = Sum::default();
        let mut bytes = Bytes::new(seed);
        let mut buf = vec![0; 16 * 1024];
        w.write_all(&header)?;
        let end = Instant::now() + length;
        while Instant::now() < end {
            bytes.fill(&mut buf);
            w.write_all(&buf)?;
            sum.update(&buf);
            thread::sleep(tick);
        }
        // Every stream ends with a half-close: the echo's EOF follows the last byte.
        w.shutdown(Shutdown::Write)?;
        Ok(sum)
    });
    let mut r = s;
    let mut got = Sum::default();
    let mut buf = vec![0; 64 * 1024];
    let read = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.update(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    ctl.add("tcp_good_bytes_up", sent.len);
    ctl.add("tcp_good_bytes_down", got.len);
    read.context("reading the echo")?;
    if sent != got {
        bail!(
            "sent {} bytes, echoed {} bytes, checksums {}",
            sent.len,
            got.len,
            if sent.hash == got.hash {
                "equal"
            } else {
                "differ"
            }
        );
    }
    Ok(())
}

struct Flow {
    sock: UdpSocket,
    header: Vec<u8>,
}

const UDP_PAYLOAD: usize = 64;
/// Sends of one datagram before its flow is declared broken.
const UDP_TRIES: u32 = 4;

/// `flows` UDP flows in rounds (one datagram per flow, each answered before the next
/// round), `pace` apart; the flows are replaced by fresh ones every `renew` rounds.
pub fn udp(ctl: &Control, tuples: &ClientTuples, flows: usize, renew: u64, pace: Duration) {
    let mut round = 0u64;
    let mut set: Vec<Flow> = Vec::new();
    let mut bytes = Bytes::new(0x5eed);
    while let Some(_busy) = ctl.gate() {
        if round.is_multiple_of(renew) {
            set = match (0..flows).map(|j| open_flow(tuples, j as u64)).collect() {
                Ok(s) => s,
                Err(e) => {
                    ctl.fail(format!("opening UDP flows: {e:#}"));
                    ctl.sleep(Duration::from_secs(1));
                    continue;
                }
            };
            ctl.add("udp_good_flows", flows as u64);
        }
        for (j, f) in set.iter().enumerate() {
            let mut payload = [0u8; UDP_PAYLOAD];
            bytes.fill(&mut payload);
            payload[..8].copy_from_slice(&round.to_le_bytes());
            payload[8] = j as u8;
            if let Err(e) = exchange(ctl, f, &payload) {
                ctl.fail(format!("UDP flow {j} round {round}: {e:#}"));
            }
        }
        round += 1;
        drop(_busy);
        ctl.sleep(pace);
    }
}

fn open_flow(tuples: &ClientTuples, j: u64) -> Result<Flow> {
    let shape = Shape::nth(j);
    let s = bound_socket(shape.link_v6, Type::DGRAM, None)?;
    s.connect(&proxy_addr(shape.link_v6, UDP_PORT).into())?;
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let shape = Shape { v2: true, ..shape };
    Ok(Flow {
        sock,
        header: shape.header(tuples, UDP_PORT, Transport::Dgram)?,
    })
}

/// Sends the datagram until its echo comes back (late echoes of earlier rounds
/// are skipped); an echo with the right sequence number but other bytes fails.
fn exchange(ctl: &Control, f: &Flow, payload: &[u8; UDP_PAYLOAD]) -> Result<()> {
    let mut dgram = f.header.clone();
    dgram.extend_from_slice(payload);
    let mut buf = [0u8; 2048];
    for _ in 0..UDP_TRIES {
        f.sock.send(&dgram)?;
        ctl.add("udp_good_sent", 1);
        loop {
            match f.sock.recv(&mut buf) {
                Ok(n) => {
                    ctl.add("udp_good_replies", 1);
                    let got = buf.get(..n).unwrap_or_default();
                    if got.get(..9) != payload.get(..9) {
                        continue;
                    }
                    if got != payload {
                        bail!("the echo of {UDP_PAYLOAD} bytes came back as {n} different bytes");
                    }
                    ctl.add("udp_good_ok", 1);
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    ctl.add("udp_good_resent", 1);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    bail!("no echo after {UDP_TRIES} sends, a second apart")
}
