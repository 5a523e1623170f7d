//! A real UDP service: answers every datagram with `<sender>|<payload>` and reports
//! each sender, so a test can check both who the service saw and that each answer
//! went back to the right client.
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// The answer the service sends for `payload` received from `from`.
pub fn answer(from: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = from.to_string().into_bytes();
    out.push(b'|');
    out.extend_from_slice(payload);
    out
}

pub struct UdpEcho {
    pub addr: SocketAddr,
    peers: Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    /// Answers on each of `addrs` inside `ns` (bound exactly there, so answers leave
    /// from that address).
    pub fn start(ns: &Netns, addrs: &[&str]) -> Result<Self> {
        let (tx, peers) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut first = None;
        for a in addrs {
            let addr: SocketAddr = a.parse().context("UDP echo address")?;
            first.get_or_insert(addr);
            let socket = ns.enter(move || UdpSocket::bind(addr))??;
            // Wakes up now and then to notice `stop`, so no thread outlives the test.
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (tx, stop) = (tx.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let _ = tx.send(from);
                    let _ = socket.send_to(&answer(from, buf.get(..n).unwrap_or_default()), from);
                }
            });
        }
        let addr = first.context("no address to listen on")?;
        Ok(Self { addr, peers, stop })
    }

    /// On 127.0.0.1:`port` and [::1]:`port`.
    pub fn start_dual(ns: &Netns, port: u16) -> Result<Self> {
        Self::start(
            ns,
            &[&format!("127.0.0.1:{port}"), &format!("[::1]:{port}")],
        )
    }

    /// The sender of the next datagram the service receives.
    pub fn next_peer(&self, timeout: Duration) -> Result<SocketAddr> {
        self.peers
            .recv_timeout(timeout)
            .context("the UDP upstream received nothing")
    }

    /// Senders seen so far and not yet taken.
    pub fn take_peers(&self) -> Vec<SocketAddr> {
        self.peers.try_iter().collect()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
