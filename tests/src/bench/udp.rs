//! The UDP load: `clients` sockets, each sending a PROXY v2 DGRAM header + 64-byte
//! payload per datagram (only the payload without a proxy), closed loop with at most
//! `WINDOW` datagrams outstanding per client. A client that hears nothing for
//! `STALL` counts its outstanding datagrams as lost and sends a fresh window.
//!
//! The clients are split over `threads` threads, each with its own epoll; a client
//! sends what its window allows with one sendmmsg and takes its replies in recvmmsg
//! batches, so the generator's cost per datagram stays well below the proxy's.
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll};
use mmproxy::proxy_protocol::{Transport, V2Builder};

use super::batch::Batch;
use super::cpu::Used;
use super::load::{CpuProbe, Target};
use super::net::Tuples;

const PAYLOAD: usize = 64;
const WINDOW: u32 = 8;
const STALL: Duration = Duration::from_millis(50);
/// Replies taken per recvmmsg: a window, and late replies to an abandoned one.
const RECV_BATCH: usize = 2 * WINDOW as usize;
/// After the sending time, replies still on their way get this long.
const GRACE: Duration = Duration::from_millis(300);

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Udp {
    pub secs: f64,
    pub sent: u64,
    pub received: u64,
    pub cpu: Used,
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
    /// Sends as many datagrams as the window has room for; returns how many went.
    fn top_up(&mut self, batch: &mut Batch, seq: &mut u64) -> u64 {
        let room = WINDOW.saturating_sub(self.outstanding) as usize;
        if room == 0 {
            return 0;
        }
        let at = self.payload_at;
        let sent = batch.send_copies(self.s.as_raw_fd(), &self.datagram, room, |d| {
            if let Some(p) = d.get_mut(at..at + 8) {
                p.copy_from_slice(&seq.to_le_bytes());
            }
            *seq += 1;
        });
        self.outstanding += sent as u32;
        sent as u64
    }
}

pub fn closed_loop(
    t: &Target,
    clients: usize,
    threads: usize,
    dur: Duration,
    tuples: &Tuples,
    cpu: CpuProbe<'_>,
) -> Result<Udp> {
    let local: SocketAddr = "0.0.0.0:0".parse()?;
    let parts = super::load::deal(clients, threads, |poll, token| {
        let mut s = UdpSocket::bind(local)?;
        s.connect(t.addr)
            .with_context(|| format!("connecting to {}", t.addr))?;
        poll.registry()
            .register(&mut s, token, Interest::READABLE)?;
        let mut datagram = if t.proxied {
            V2Builder::proxy(tuples.next(), t.addr)
                .transport(Transport::Dgram)
                .build()?
        } else {
            Vec::new()
        };
        let payload_at = datagram.len();
        datagram.resize(payload_at + PAYLOAD, 0x5a);
        Ok(Client {
            s,
            datagram,
            payload_at,
            outstanding: 0,
            last_heard: Instant::now(),
        })
    })?;
    let cpu0 = cpu();
    let start = Instant::now();
    let end = start + dur;
    let (sent, received, cpu_end) = thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        // Threads made here are in the client namespace, like this one (setns is per
        // thread, and a new thread inherits its creator's), and inherit its CPU
        // affinity and nice value too.
        let workers: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(i, (poll, cs))| {
                let tx = tx.clone();
                // Sequence numbers distinct across threads.
                let seq = (i as u64) << 48;
                scope.spawn(move || {
                    let _ = tx.send(run(poll, cs, seq, start, end));
                })
            })
            .collect();
        drop(tx);
        // The CPU counters are read when sending stops: the grace period after it
        // only collects the last windows' replies, and would add idle time and other
        // processes' work to the figures.
        thread::sleep(end.saturating_duration_since(Instant::now()));
        let cpu_end = cpu();
        let (mut sent, mut received) = (0, 0);
        let mut failed = None;
        for r in rx.iter() {
            match r {
                Ok((s, r)) => {
                    sent += s;
                    received += r;
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        for w in workers {
            if w.join().is_err() {
                failed = failed.or(Some(anyhow::anyhow!("a generator thread panicked")));
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((sent, received, cpu_end)),
        }
    })?;
    // Replies are counted until the grace period ends; the rate uses the sending time.
    let secs = dur.as_secs_f64().min(start.elapsed().as_secs_f64());
    Ok(Udp {
        secs,
        sent,
        received,
        cpu: cpu0.until(&cpu_end),
    })
}

/// One thread's clients, sending until `end` and counting replies until the grace
/// period after it ends; returns (sent, received).
fn run(
    mut poll: Poll,
    mut cs: Vec<Client>,
    mut seq: u64,
    start: Instant,
    end: Instant,
) -> Result<(u64, u64)> {
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut out = Batch::new(WINDOW as usize);
    let mut replies = Batch::new(RECV_BATCH);
    let mut events = Events::with_capacity(1024);
    for c in &mut cs {
        sent += c.top_up(&mut out, &mut seq);
        c.last_heard = start;
    }
    let mut sending = true;
    let mut stop_at = end + GRACE;
    loop {
        let now = Instant::now();
        if sending && now >= end {
            sending = false;
            stop_at = now + GRACE;
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
                match replies.recv(c.s.as_raw_fd(), libc::MSG_DONTWAIT) {
                    Ok(0) => break,
                    Ok(n) => {
                        received += n as u64;
                        c.outstanding = c.outstanding.saturating_sub(n as u32);
                        c.last_heard = Instant::now();
                        if sending {
                            sent += c.top_up(&mut out, &mut seq);
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
                    sent += c.top_up(&mut out, &mut seq);
                }
            }
        }
    }
    Ok((sent, received))
}
