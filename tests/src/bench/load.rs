//! The TCP load generators. They run on the calling thread, which the runner has
//! put in the client namespace (and pinned when the layout says so), the throughput
//! load on threads it starts from there; each thread drives its connections through
//! epoll, so the generator costs the same CPU whichever proxy it measures.
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use mmproxy::proxy_protocol::encode_v1;
use socket2::{Domain, Socket, Type};

use super::cpu::{Snapshot, Used};
use super::net::Tuples;

/// Where a generator connects, and whether it speaks first with a PROXY header.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub proxied: bool,
}

impl Target {
    /// The PROXY v1 header for a new connection (empty without a proxy), naming a
    /// client tuple never used before in this run.
    fn header(&self, tuples: &Tuples) -> Vec<u8> {
        if self.proxied {
            encode_v1(tuples.next(), self.addr)
        } else {
            Vec::new()
        }
    }
}

/// Reads the CPU counters now: the proxy's and the machine's (see `cpu.rs`).
pub type CpuProbe<'a> = &'a dyn Fn() -> Snapshot;

const PING: &[u8] = b"PING\r\n";
/// How far a connection's writes may run ahead of its echoes: the generator reads as
/// fast as it writes, so no socket buffer grows with the run's length.
const WINDOW: u64 = 256 * 1024;

fn window() -> u64 {
    std::env::var("MMPROXY_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WINDOW)
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Throughput {
    pub secs: f64,
    /// Client → upstream bytes written in the measured interval.
    pub up_bytes: u64,
    /// Echoed bytes read back in the measured interval.
    pub down_bytes: u64,
    pub cpu: Used,
}

struct Streamer {
    s: TcpStream,
    sent: u64,
    recvd: u64,
    eof: bool,
}

/// tcpkali's load: `conns` connections, a header each, then `PING\r\n` streamed in
/// 64 KiB writes while the echoes are read, for `dur`, counted once all connections
/// are up. The connections are split over `threads` threads, each with its own
/// epoll; they are all set up, from the calling thread, before the interval starts.
pub fn throughput(
    t: &Target,
    conns: usize,
    threads: usize,
    dur: Duration,
    tuples: &Tuples,
    cpu: CpuProbe<'_>,
) -> Result<Throughput> {
    let parts = deal(conns, threads, |poll, token| {
        let mut s = std::net::TcpStream::connect_timeout(&t.addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {}", t.addr))?;
        s.set_nodelay(true)?;
        s.write_all(&t.header(tuples))?;
        s.set_nonblocking(true)?;
        let mut s = TcpStream::from_std(s);
        poll.registry()
            .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Streamer {
            s,
            sent: 0,
            recvd: 0,
            eof: false,
        })
    })?;
    let cpu0 = cpu();
    let start = Instant::now();
    let end = start + dur;
    thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        // Threads made here are in the client namespace, like this one (setns is per
        // thread, and a new thread inherits its creator's), and inherit its CPU
        // affinity and nice value too.
        let workers: Vec<_> = parts
            .into_iter()
            .map(|(poll, cs)| {
                let tx = tx.clone();
                scope.spawn(move || stream_until(poll, cs, end, &tx))
            })
            .collect();
        drop(tx);
        // The interval is over once every thread has counted; the CPU probe is read
        // then, before the threads close their connections.
        let mut result = Throughput::default();
        let mut ended = start;
        let mut failed = None;
        for _ in 0..workers.len() {
            match rx.recv() {
                Ok(Ok(p)) => {
                    result.up_bytes += p.up_bytes;
                    result.down_bytes += p.down_bytes;
                    ended = ended.max(p.ended);
                }
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => {
                    failed = failed.or(Some(anyhow::anyhow!("a generator thread panicked")));
                    break;
                }
            }
        }
        result.cpu = cpu0.until(&cpu());
        result.secs = ended.duration_since(start).as_secs_f64();
        for w in workers {
            if w.join().is_err() {
                failed = failed.or(Some(anyhow::anyhow!("a generator thread panicked")));
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(result),
        }
    })
}

/// Makes `items` with `make` and deals them round-robin to `threads` polls (at least
/// one, at most one per item), each item registered (by `make`) with the poll it
/// goes to, under its index there.
pub(super) fn deal<T>(
    items: usize,
    threads: usize,
    mut make: impl FnMut(&Poll, Token) -> Result<T>,
) -> Result<Vec<(Poll, Vec<T>)>> {
    let threads = threads.clamp(1, items.max(1));
    let mut parts = Vec::with_capacity(threads);
    for _ in 0..threads {
        parts.push((Poll::new()?, Vec::with_capacity(items / threads + 1)));
    }
    let n = parts.len();
    for i in 0..items {
        if let Some((poll, part)) = parts.get_mut(i % n) {
            let item = make(poll, Token(part.len()))?;
            part.push(item);
        }
    }
    Ok(parts)
}

/// One thread's counts at the end of the interval.
struct Part {
    up_bytes: u64,
    down_bytes: u64,
    ended: Instant,
}

/// Streams on `cs` until `end`, reports the counts, then ends the connections.
fn stream_until(
    mut poll: Poll,
    mut cs: Vec<Streamer>,
    end: Instant,
    report: &mpsc::Sender<Result<Part>>,
) {
    let chunk = PING.repeat(64 * 1024 / PING.len());
    // Never written to: echoes are discarded in the kernel (MSG_TRUNC).
    let mut rbuf = vec![0u8; 256 * 1024];
    let mut events = Events::with_capacity(1024);
    let mut run = || -> Result<()> {
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            match poll.poll(&mut events, Some(end - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                let Some(c) = cs.get_mut(ev.token().0) else {
                    continue;
                };
                stream(c, &chunk, &mut rbuf)?;
            }
        }
    };
    let outcome = run().map(|()| Part {
        up_bytes: cs.iter().map(|c| c.sent).sum(),
        down_bytes: cs.iter().map(|c| c.recvd).sum(),
        ended: Instant::now(),
    });
    let ok = outcome.is_ok();
    let _ = report.send(outcome);
    if !ok {
        return;
    }
    // A clean end, so the proxies close their flows normally: FIN, then read the
    // rest of the echoes until each connection's EOF (bounded).
    for c in &mut cs {
        let _ = c.s.shutdown(Shutdown::Write);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while cs.iter().any(|c| !c.eof) && Instant::now() < deadline {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        for c in cs.iter_mut().filter(|c| !c.eof) {
            loop {
                match discard(&c.s, &mut rbuf) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.eof = true;
                        break;
                    }
                }
            }
        }
    }
}

/// Reads up to `buf.len()` bytes and throws them away without copying them out of
/// the kernel (TCP with MSG_TRUNC, Linux 4.x and later); returns how many.
fn discard(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length for the call; with
    // MSG_TRUNC the kernel does not even write to it.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads every echo there is, then writes while the window allows.
fn stream(c: &mut Streamer, chunk: &[u8], rbuf: &mut [u8]) -> Result<()> {
    loop {
        match discard(&c.s, rbuf) {
            Ok(0) => bail!("the connection closed during the throughput run"),
            Ok(n) => c.recvd += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading echoes"),
        }
    }
    let window = window();
    while c.sent - c.recvd.min(c.sent) < window {
        // The chunk repeats PING\r\n, so starting at sent % 6 continues the stream.
        let off = (c.sent % PING.len() as u64) as usize;
        let room = (window - (c.sent - c.recvd.min(c.sent))) as usize;
        let part = chunk.get(off..).unwrap_or_default();
        let part = part.get(..room.min(part.len())).unwrap_or_default();
        match c.s.write(part) {
            Ok(n) => c.sent += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("writing PINGs"),
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConnRate {
    pub secs: f64,
    pub completed: u64,
    pub errors: u64,
    /// Time per connection (connect → header + PING → echo), sorted, in µs.
    #[serde(skip)]
    pub times_us: Vec<u32>,
    pub cpu: Used,
}

/// One connection's progress through connect → header + PING → echo.
enum Slot {
    Idle,
    Connecting {
        s: TcpStream,
        start: Instant,
    },
    Waiting {
        s: TcpStream,
        start: Instant,
        got: usize,
    },
}

/// Opens connections `workers` at a time, each doing one header + PING round trip.
/// `keep`: hold finished connections open (idle memory) instead of closing them.
struct Opener<'a> {
    t: Target,
    tuples: &'a Tuples,
    poll: Poll,
    slots: Vec<Slot>,
    kept: Vec<TcpStream>,
    keep: bool,
    completed: u64,
    errors: u64,
    times_us: Vec<u32>,
}

const CONNECT_GIVE_UP: Duration = Duration::from_secs(5);

impl<'a> Opener<'a> {
    fn new(t: Target, tuples: &'a Tuples, workers: usize, keep: bool) -> Result<Self> {
        Ok(Opener {
            t,
            tuples,
            poll: Poll::new()?,
            slots: (0..workers).map(|_| Slot::Idle).collect(),
            kept: Vec::new(),
            keep,
            completed: 0,
            errors: 0,
            times_us: Vec::new(),
        })
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let start = Instant::now();
        let sock = Socket::new(
            Domain::for_address(self.t.addr),
            Type::STREAM.nonblocking(),
            None,
        )?;
        sock.set_tcp_nodelay(true)?;
        match sock.connect(&self.t.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                self.errors += 1;
                return Err(e).context("connect");
            }
        }
        let mut s = TcpStream::from_std(sock.into());
        self.poll
            .registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Slot::Connecting { s, start };
        }
        Ok(())
    }

    /// Advances slot `i`; true when it is free again.
    fn advance(&mut self, i: usize) -> bool {
        let Some(slot) = self.slots.get_mut(i) else {
            return false;
        };
        match std::mem::replace(slot, Slot::Idle) {
            Slot::Idle => true,
            Slot::Connecting { mut s, start } => {
                if let Ok(Some(_)) | Err(_) = s.take_error() {
                    self.errors += 1;
                    return true;
                }
                match s.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        *slot = Slot::Connecting { s, start };
                        return false;
                    }
                    Err(_) => {
                        self.errors += 1;
                        return true;
                    }
                }
                let mut msg = self.t.header(self.tuples);
                msg.extend_from_slice(PING);
                match s.write(&msg) {
                    Ok(n) if n == msg.len() => {}
                    _ => {
                        self.errors += 1;
                        return true;
                    }
                }
                *slot = Slot::Waiting { s, start, got: 0 };
                // The echo may already be there.
                self.advance(i)
            }
            Slot::Waiting {
                mut s,
                start,
                mut got,
            } => {
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            self.errors += 1;
                            return true;
                        }
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            self.errors += 1;
                            return true;
                        }
                    }
                }
                if got < PING.len() {
                    *slot = Slot::Waiting { s, start, got };
                    return false;
                }
                self.completed += 1;
                let us = start.elapsed().as_micros();
                self.times_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                if self.keep {
                    let _ = self.poll.registry().deregister(&mut s);
                    self.kept.push(s);
                }
                // Otherwise dropped here: close, FIN first from this side.
                true
            }
        }
    }

    fn busy(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !matches!(s, Slot::Idle))
            .count()
    }

    /// Abandons slots stuck longer than the give-up time (counted as errors).
    fn reap_stuck(&mut self) -> Vec<usize> {
        let mut freed = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let start = match slot {
                Slot::Connecting { start, .. } | Slot::Waiting { start, .. } => *start,
                Slot::Idle => continue,
            };
            if start.elapsed() > CONNECT_GIVE_UP {
                *slot = Slot::Idle;
                self.errors += 1;
                freed.push(i);
            }
        }
        freed
    }

    /// Runs until `stop` says so (checked between batches of events), then lets the
    /// connections in flight finish (bounded).
    fn run(&mut self, mut more: impl FnMut(u64) -> bool) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        for i in 0..self.slots.len() {
            if more(self.completed + self.busy() as u64) {
                self.start(i)?;
            }
        }
        let drain_deadline = Instant::now() + Duration::from_secs(3600);
        let mut draining_until: Option<Instant> = None;
        loop {
            if self.busy() == 0 {
                return Ok(());
            }
            if draining_until.is_some_and(|d| Instant::now() > d) || Instant::now() > drain_deadline
            {
                self.errors += self.busy() as u64;
                return Ok(());
            }
            match self.poll.poll(&mut events, Some(Duration::from_millis(20))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let mut freed: Vec<usize> = Vec::new();
            for ev in events.iter() {
                let i = ev.token().0;
                if self.advance(i) {
                    freed.push(i);
                }
            }
            freed.extend(self.reap_stuck());
            for i in freed {
                if more(self.completed + self.busy() as u64) {
                    // A failed connect is counted; the slot tries again next round.
                    let _ = self.start(i);
                } else if draining_until.is_none() {
                    draining_until = Some(Instant::now() + Duration::from_secs(3));
                }
            }
        }
    }
}

/// `workers` loops of connect → header + PING round trip → close, for `dur`.
pub fn conn_rate(
    t: &Target,
    workers: usize,
    dur: Duration,
    tuples: &Tuples,
    cpu: CpuProbe<'_>,
) -> Result<ConnRate> {
    let mut o = Opener::new(*t, tuples, workers, false)?;
    let cpu0 = cpu();
    let start = Instant::now();
    let end = start + dur;
    o.run(|_| Instant::now() < end)?;
    let secs = start.elapsed().as_secs_f64();
    let used = cpu0.until(&cpu());
    let mut times_us = std::mem::take(&mut o.times_us);
    times_us.sort_unstable();
    Ok(ConnRate {
        secs,
        completed: o.completed,
        errors: o.errors,
        times_us,
        cpu: used,
    })
}

/// Opens `n` connections (`workers` at a time), each with one round trip so the
/// proxy has its upstream up, and returns them open.
pub fn open_idle(
    t: &Target,
    n: usize,
    workers: usize,
    tuples: &Tuples,
) -> Result<(Vec<TcpStream>, u64)> {
    let mut o = Opener::new(*t, tuples, workers, true)?;
    let target = n as u64;
    o.run(|started| started < target)?;
    Ok((std::mem::take(&mut o.kept), o.errors))
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Latency {
    pub secs: f64,
    pub round_trips: u64,
    /// Round-trip times, sorted, in ns.
    #[serde(skip)]
    pub rtt_ns: Vec<u32>,
    pub cpu: Used,
}

/// One connection, 64-byte ping-pong for `dur` after a short warm-up.
pub fn ping_pong(t: &Target, dur: Duration, tuples: &Tuples, cpu: CpuProbe<'_>) -> Result<Latency> {
    let mut s = std::net::TcpStream::connect_timeout(&t.addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {}", t.addr))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&t.header(tuples))?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    for _ in 0..200 {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut rtt_ns = Vec::with_capacity(1 << 20);
    let cpu0 = cpu();
    let start = Instant::now();
    let end = start + dur;
    loop {
        let t0 = Instant::now();
        if t0 >= end || rtt_ns.len() >= 20_000_000 {
            break;
        }
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading the pong")?;
        rtt_ns.push(u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX));
    }
    let secs = start.elapsed().as_secs_f64();
    let used = cpu0.until(&cpu());
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.read(&mut back);
    rtt_ns.sort_unstable();
    Ok(Latency {
        secs,
        round_trips: rtt_ns.len() as u64,
        rtt_ns,
        cpu: used,
    })
}

/// The value at quantile `q` of sorted `v` (nearest rank).
pub fn quantile<T: Copy + Into<f64>>(v: &[T], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).map_or(f64::NAN, |x| (*x).into())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500.0);
        assert_eq!(quantile(&v, 0.99), 990.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert_eq!(quantile(&v, 1.0), 1000.0);
        assert!(quantile::<u32>(&[], 0.5).is_nan());
    }
}
