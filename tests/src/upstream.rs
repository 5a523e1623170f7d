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
        let addr: SocketAddr = addr.parse().context("echo server address")?;
        let listener = ns.enter(move || TcpListener::bind(addr))??;
        let (tx, peers) = channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    let _ = tx.send(peer);
                }
                thread::spawn(move || echo(conn));
            }
        });
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
