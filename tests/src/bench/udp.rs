//! The UDP load: `clients` sockets, each sending a PROXY v2 DGRAM header + 64-byte
//! payload per datagram (only the payload without a proxy), closed loop with at most
//! `WINDOW` datagrams outstanding per client. A client that hears nothing for
//! `STALL` counts its outstanding datagrams as lost and sends a fresh window.
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use mmproxy::proxy_protocol::{Transport, V2Builder};

use super::load::{CpuProbe, Target};
use super::net::Tuples;

const PAYLOAD: usize = 64;
const WINDOW: u32 = 8;
const STALL: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Udp {
    pub secs: f64,
    pub sent: u64,
    pub received: u64,
    pub cpu_s: Option<f64>,
}

impl Udp {
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - (self.received.min(self.sent) as f64 / self.sent as f64)
    }
}

struct Client {
    s: UdpSocket,
    /// Header followed by the payload; the payload starts at `payload_at`.
    datagram: Vec<u8>,
    payload_at: usize,
    outstanding: u32,
    last_heard: Instant,
}

impl Client {
    fn send(&mut self, seq: &mut u64) -> bool {
        let at = self.payload_at;
        if let Some(p) = self.datagram.get_mut(at..at + 8) {
            p.copy_from_slice(&seq.to_le_bytes());
        }
        match self.s.send(&self.datagram) {
            Ok(_) => {
                *seq += 1;
                self.outstanding += 1;
                true
            }
            Err(_) => false,
        }
    }
}

pub fn closed_loop(
    t: &Target,
    clients: usize,
    dur: Duration,
    tuples: &Tuples,
    cpu: CpuProbe<'_>,
) -> Result<Udp> {
    let mut poll = Poll::new()?;
    let mut cs = Vec::with_capacity(clients);
    let local: SocketAddr = "0.0.0.0:0".parse()?;
    for i in 0..clients {
        let mut s = UdpSocket::bind(local)?;
        s.connect(t.addr)
            .with_context(|| format!("connecting to {}", t.addr))?;
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)?;
        let mut datagram = if t.proxied {
            V2Builder::proxy(tuples.next(), t.addr)
                .transport(Transport::Dgram)
                .build()?
        } else {
            Vec::new()
        };
        let payload_at = datagram.len();
        datagram.resize(payload_at + PAYLOAD, 0x5a);
        cs.push(Client {
            s,
            datagram,
            payload_at,
            outstanding: 0,
            last_heard: Instant::now(),
        });
    }
    let mut seq = 0u64;
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut buf = [0u8; 2048];
    let mut events = Events::with_capacity(1024);
    let cpu0 = cpu();
    let start = Instant::now();
    let end = start + dur;
    for c in &mut cs {
        for _ in 0..WINDOW {
            sent += u64::from(c.send(&mut seq));
        }
        c.last_heard = start;
    }
    let mut sending = true;
    let mut stop_at = end + Duration::from_millis(300);
    loop {
        let now = Instant::now();
        if sending && now >= end {
            sending = false;
            // Replies still on their way get this long.
            stop_at = now + Duration::from_millis(300);
        }
        if !sending && now >= stop_at {
            break;
        }
        match poll.poll(&mut events, Some(Duration::from_millis(5))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            let Some(c) = cs.get_mut(ev.token().0) else {
                continue;
            };
            let mut errors = 0;
            while errors < 64 {
                match c.s.recv(&mut buf) {
                    Ok(_) => {
                        received += 1;
                        c.outstanding = c.outstanding.saturating_sub(1);
                        c.last_heard = Instant::now();
                        if sending && c.outstanding < WINDOW {
                            sent += u64::from(c.send(&mut seq));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ECONNREFUSED from an ICMP error, and the like: reported once,
                    // for a lost datagram; what follows may still be readable.
                    Err(_) => errors += 1,
                }
            }
        }
        if sending {
            let now = Instant::now();
            for c in &mut cs {
                if now.duration_since(c.last_heard) > STALL {
                    c.outstanding = 0;
                    c.last_heard = now;
                    for _ in 0..WINDOW {
                        sent += u64::from(c.send(&mut seq));
                    }
                }
            }
        }
    }
    // Replies are counted until the grace period ends; the rate uses the sending time.
    let secs = dur.as_secs_f64().min(start.elapsed().as_secs_f64());
    Ok(Udp {
        secs,
        sent,
        received,
        cpu_s: match (cpu0, cpu()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
    })
}
