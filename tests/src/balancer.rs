//! The balancer's side of a test, in the `lb` namespace: TCP connections that open
//! with a PROXY header, and a UDP socket sending PROXY v2 DGRAM datagrams (HAProxy
//! does not send PROXY over UDP; Cloudflare Spectrum does, one header per datagram).
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::{encode_v1, Transport, V2Builder};

use crate::client::connect_from;
use crate::topology::Topology;
use crate::udp_upstream::answer;
use crate::WAIT;

/// A connection from the balancer's address `src` to mmproxy at `mm`, reads timing
/// out after [`WAIT`].
pub fn connect(t: &Topology, src: &str, mm: &str) -> Result<TcpStream> {
    let c = connect_from(&t.lb, Some(src), mm, WAIT)??;
    c.set_read_timeout(Some(WAIT))?;
    Ok(c)
}

/// [`connect`], then a v1 header for `client` → `mm`.
pub fn proxied(t: &Topology, src: &str, mm: &str, client: &str) -> Result<TcpStream> {
    let mut c = connect(t, src, mm)?;
    c.write_all(&encode_v1(client.parse()?, mm.parse()?))?;
    Ok(c)
}

/// A PROXY v2 DGRAM header for `client`, as a Spectrum-like sender writes it.
pub fn dgram(client: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    V2Builder::proxy(client, dst)
        .transport(Transport::Dgram)
        .build()
        .unwrap_or_default()
}

/// The balancer's UDP socket.
pub struct UdpBalancer(pub UdpSocket);

impl UdpBalancer {
    /// Bound to `src` (any port) in `lb`; waits [`WAIT`] for an answer.
    pub fn new(t: &Topology, src: &str) -> Result<Self> {
        Self::with_timeout(t, src, WAIT)
    }

    /// [`UdpBalancer::new`] waiting `timeout` for an answer: how long a test waits
    /// before it takes silence for "dropped".
    pub fn with_timeout(t: &Topology, src: &str, timeout: Duration) -> Result<Self> {
        let bind: SocketAddr = crate::topology::sock(src, 0).parse()?;
        let s = t.lb.enter(move || UdpSocket::bind(bind))??;
        s.set_read_timeout(Some(timeout))?;
        Ok(Self(s))
    }

    /// Sends one datagram: `header`, then `payload`.
    pub fn send(&self, header: &[u8], payload: &[u8], to: SocketAddr) -> Result<()> {
        let mut d = header.to_vec();
        d.extend_from_slice(payload);
        self.0.send_to(&d, to)?;
        Ok(())
    }

    /// The next answer and where it came from.
    pub fn recv(&self) -> Result<(Vec<u8>, SocketAddr)> {
        self.try_recv()?.context("no answer from mmproxy")
    }

    /// The next answer and where it came from; `None` when none came in time.
    pub fn try_recv(&self) -> Result<Option<(Vec<u8>, SocketAddr)>> {
        let mut buf = vec![0u8; 65536];
        match crate::uninterrupted(|| self.0.recv_from(&mut buf)) {
            Ok((n, from)) => {
                buf.truncate(n);
                Ok(Some((buf, from)))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `payload` for `client` to `to`; the answer, if any, which must come from
    /// `to` (balancers match answers by address and port).
    pub fn exchange(
        &self,
        client: SocketAddr,
        to: SocketAddr,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        self.send(&dgram(client, to), payload, to)?;
        let Some((got, from)) = self.try_recv()? else {
            return Ok(None);
        };
        ensure!(
            from == to,
            "answer came from {from}, the balancer sent to {to}"
        );
        Ok(Some(got))
    }

    /// [`UdpBalancer::exchange`], and the answer must be the echo service's for the
    /// client's own address.
    pub fn roundtrip(&self, client: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<()> {
        let Some(got) = self.exchange(client, to, payload)? else {
            bail!("no answer from mmproxy");
        };
        ensure!(
            got == answer(client, payload),
            "for {client}: got {:?}",
            String::from_utf8_lossy(&got)
        );
        Ok(())
    }
}
