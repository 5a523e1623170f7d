//! A real upstream service: a TCP echo server that reports who connected to it.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

pub struct EchoServer {
    pub addr: SocketAddr,
    peers: Receiver<SocketAddr>,
}

impl EchoServer {
    /// Listens on `addr` inside `ns`; every connection is echoed until the peer's
    /// FIN, which is then passed on (so half-close is visible end to end).
    pub fn start(ns: &Netns, addr: &str) -> Result<Self> {
        Self::start_on(ns, &[addr])
    }

    /// One server on 127.0.0.1:`port` and [::1]:`port`, reporting both families' peers.
    pub fn start_dual(ns: &Netns, port: u16) -> Result<Self> {
        Self::start_on(
            ns,
            &[&format!("127.0.0.1:{port}"), &format!("[::1]:{port}")],
        )
    }

    fn start_on(ns: &Netns, addrs: &[&str]) -> Result<Self> {
        let (tx, peers) = channel();
        let mut first = None;
        for a in addrs {
            let addr: SocketAddr = a.parse().context("echo server address")?;
            first.get_or_insert(addr);
            let listener = ns.enter(move || TcpListener::bind(addr))??;
            let tx = tx.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if let Ok(peer) = conn.peer_addr() {
                        let _ = tx.send(peer);
                    }
                    thread::spawn(move || echo(conn));
                }
            });
        }
        let addr = first.context("no address to listen on")?;
        Ok(Self { addr, peers })
    }

    /// The source address of the next connection the server accepts.
    pub fn next_peer(&self, timeout: Duration) -> Result<SocketAddr> {
        self.peers
            .recv_timeout(timeout)
            .context("the upstream saw no connection")
    }

    /// Whether a connection arrived (without waiting).
    pub fn try_peer(&self) -> Option<SocketAddr> {
        self.peers.try_recv().ok()
    }
}

fn echo(mut conn: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// A service that speaks first and closes its sending side at once, then reads
/// until the client's FIN: shows half-close in the upstream → client direction.
pub struct GreeterServer {
    pub addr: SocketAddr,
    received: Receiver<Vec<u8>>,
}

impl GreeterServer {
    pub const GREETING: &'static [u8] = b"220 hello, then FIN\r\n";

    pub fn start(ns: &Netns, addr: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse().context("greeter address")?;
        let listener = ns.enter(move || TcpListener::bind(addr))??;
        let (tx, received) = channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = conn.write_all(Self::GREETING);
                    let _ = conn.shutdown(Shutdown::Write);
                    let mut all = Vec::new();
                    let _ = conn.read_to_end(&mut all);
                    let _ = tx.send(all);
                });
            }
        });
        Ok(Self { addr, received })
    }

    /// Everything one connection sent before its FIN.
    pub fn next_received(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.received
            .recv_timeout(timeout)
            .context("the greeter saw no complete connection")
    }
}
