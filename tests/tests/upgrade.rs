//! Upgrading without refusing a connection (README, "Upgrading without refusing a
//! connection"): a new mmproxy started with the same listen set takes the running
//! one's sockets over, the old one drains and exits, ten times in a row, while a
//! generator opens connections at a steady rate and long-lived streams run
//! through all of it. In both `--ebpf` modes; and a UDP flow across upgrades.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::args::{DaemonArgs, Ebpf, Mode};
use mmproxy_tests::balancer::{dgram, UdpBalancer};
use mmproxy_tests::client::connect_from;
use mmproxy_tests::daemon::Daemon;
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::{answer, UdpEcho};
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, uninterrupted, WAIT};

const UPGRADES: usize = 10;
/// The new instance's log line once the old one has stopped accepting.
const TOOK_OVER: &str = "this one serves alone";
/// The old instance's log line at the handoff.
const HANDED_OVER: &str = "handed over: the new mmproxy serves";

#[test]
fn ten_upgrades_with_the_kernel_side() -> Result<()> {
    require_root!();
    // A port range: only the sk_lookup program (of whichever instance) serves 8444.
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443-8444")
        .target4("127.0.0.1:9000")
        .listeners(2)
        .ebpf(Ebpf::On);
    ten_upgrades(args, &[8443, 8444])
}

#[test]
fn ten_upgrades_with_ebpf_off() -> Result<()> {
    require_root!();
    // One socket, no SO_REUSEPORT: a second instance could not even bind.
    let args = DaemonArgs::tcp()
        .mode(Mode::EbpfOff)
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000");
    ten_upgrades(args, &[8443])
}

/// What the generator saw.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other: Mutex<Vec<String>>,
    /// Longest connect + PROXY header + echo, in microseconds.
    slowest_us: AtomicU64,
}

fn ten_upgrades(args: DaemonArgs, ports: &'static [u16]) -> Result<()> {
    let t = Topology::new()?;
    let before = t.host.rules_and_routes()?;
    let _echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    // The grace outlasts the test: old instances end when their streams do.
    let args = args.shutdown_grace(120).verbose(1);
    let mut daemons = vec![Daemon::start(&t.host, &args)?];
    ensure!(
        !daemons[0].log_text().contains(TOOK_OVER),
        "the first instance took over from someone"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (mut took_ms, mut drained) = (Vec::new(), Vec::new());
    let mut streams = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let generator = {
            let (t, stop, tally) = (&t, stop.clone(), tally.clone());
            scope.spawn(move || generate(t, ports, &stop, &tally))
        };
        let mut run = || -> Result<()> {
            for i in 0..2 {
                streams.push(Stream::start(&t, ports[i % ports.len()], i as u64)?);
            }
            for n in 1..=UPGRADES {
                let old = daemons.len() - 1;
                let ok_before = tally.ok.load(Ordering::Relaxed);
                let new = Daemon::start(&t.host, &args)
                    .with_context(|| format!("upgrade {n}: the new instance"))?;
                let took = new.wait_for(TOOK_OVER, WAIT).with_context(|| {
                    format!("upgrade {n}: no takeover; log:\n{}", new.log_text())
                })?;
                let handed = daemons[old]
                    .wait_for(HANDED_OVER, WAIT)
                    .with_context(|| format!("upgrade {n}: the old instance did not hand over"))?;
                took_ms.push(field(&took, "took_ms"));
                drained.push(field(&handed, "connections"));
                daemons.push(new);
                // Each instance gets a stream of its own to drain later.
                streams.push(Stream::start(&t, ports[n % ports.len()], 100 + n as u64)?);
                wait_until(
                    || tally.ok.load(Ordering::Relaxed) > ok_before + 20,
                    "generator progress",
                )?;
            }
            Ok(())
        };
        let result = run();
        stop.store(true, Ordering::Relaxed);
        generator
            .join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))??;
        result
    })?;

    let ok = tally.ok.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    let reset = tally.reset.load(Ordering::Relaxed);
    let other = tally.other.lock().map(|o| o.clone()).unwrap_or_default();
    eprintln!(
        "upgrade: {UPGRADES} upgrades, generator {ok} ok, {refused} refused, {reset} reset, \
         slowest {} us; {} streams",
        tally.slowest_us.load(Ordering::Relaxed),
        streams.len()
    );
    eprintln!("upgrade: handoff took {took_ms:?} ms; connections left to drain {drained:?}");
    ensure!(
        refused == 0 && reset == 0 && other.is_empty(),
        "refused {refused}, reset {reset}, other {other:?}"
    );
    ensure!(ok > 0);

    // Every byte of every stream back, in order, though most of them were served
    // by instances that had handed over long before.
    let mut bytes = 0;
    for s in streams {
        bytes += s.finish()?;
    }
    eprintln!("upgrade: {bytes} stream bytes intact");

    // The old instances drain their streams and exit cleanly, and leave the routing
    // and the kernel side the last one uses: it still serves every port.
    let last = daemons.pop().context("no daemon")?;
    for (i, d) in daemons.iter_mut().enumerate() {
        let status = d.wait_exit(WAIT)?;
        ensure!(
            status.success(),
            "instance {i} exited with {status}: {}",
            d.log_text()
        );
    }
    let during = t.host.rules_and_routes()?;
    ensure!(
        during != before,
        "the last instance's routing is gone:\n{during}"
    );
    for port in ports {
        let mut c = proxied_to(&t, *port)?;
        echo_once(&mut c, b"after the old ones left")?;
    }
    let mut last = last;
    last.signal(libc::SIGTERM);
    ensure!(last.wait_exit(WAIT)?.success());
    ensure!(t.host.rules_and_routes()? == before, "routing left behind");
    Ok(())
}

/// A `name=value` number in a log line (0 when absent).
fn field(line: &str, name: &str) -> u64 {
    mmproxy_tests::daemon::counter(line, name)
}

/// A connection from the balancer to mmproxy's `port`, with a v1 header for a
/// client 198.51.100.9 on a port no other connection of the test uses.
fn proxied_to(t: &Topology, port: u16) -> std::io::Result<TcpStream> {
    let mm = sock(HOST_V4, port);
    let c = connect_from(&t.lb, Some(LB_V4), &mm, WAIT)
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    with_header(c, port)
}

/// [`proxied_to`] from a thread that is in the balancer's namespace already.
fn proxied_here(port: u16) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(LB_V4.parse().map_err(std::io::Error::other)?, 0).into())?;
    let mm: SocketAddr = sock(HOST_V4, port).parse().map_err(std::io::Error::other)?;
    socket.connect_timeout(&mm.into(), WAIT)?;
    socket.set_tcp_nodelay(true)?;
    with_header(socket.into(), port)
}

fn with_header(mut c: TcpStream, port: u16) -> std::io::Result<TcpStream> {
    c.set_read_timeout(Some(WAIT))?;
    let mm: SocketAddr = sock(HOST_V4, port).parse().map_err(std::io::Error::other)?;
    // A client port of its own: the upstream 4-tuple of an earlier connection may
    // still be in TIME_WAIT.
    static NEXT_PORT: AtomicU64 = AtomicU64::new(0);
    let client_port = 20_000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 40_000;
    let header = encode_v1(
        SocketAddr::new([198, 51, 100, 9].into(), client_port as u16),
        mm,
    );
    c.write_all(&header)?;
    Ok(c)
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

/// [`GENERATORS`] threads in the balancer's namespace, each opening one short
/// connection every [`GENERATOR_PERIOD`] until `stop`, alternating over `ports`.
fn generate(t: &Topology, ports: &[u16], stop: &AtomicBool, tally: &Tally) -> Result<()> {
    thread::scope(|scope| {
        let threads: Vec<_> = (0..GENERATORS)
            .map(|_| scope.spawn(|| t.lb.enter(|| generate_here(ports, stop, tally))))
            .collect();
        for th in threads {
            th.join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))??;
        }
        Ok(())
    })
}

const GENERATORS: usize = 2;
const GENERATOR_PERIOD: Duration = Duration::from_millis(4);

fn generate_here(ports: &[u16], stop: &AtomicBool, tally: &Tally) {
    let period = GENERATOR_PERIOD;
    let start = Instant::now();
    let mut i: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = start + period * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let port = ports[i as usize % ports.len()];
        i += 1;
        let began = Instant::now();
        let result = proxied_here(port).and_then(|mut c| {
            echo_once(&mut c, &i.to_be_bytes())?;
            c.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                let us = began.elapsed().as_micros() as u64;
                tally.slowest_us.fetch_max(us, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                ) =>
            {
                tally.reset.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if let Ok(mut o) = tally.other.lock() {
                    o.push(format!("connection {i} to port {port}: {e}"));
                }
            }
        }
    }
}

/// A long-lived connection streaming pseudo-random bytes through mmproxy to the
/// echo service and checking what comes back.
struct Stream {
    stop: Arc<AtomicBool>,
    writer: thread::JoinHandle<std::io::Result<(u64, u64)>>,
    reader: thread::JoinHandle<std::io::Result<(u64, u64)>>,
    port: u16,
}

/// Bytes and a running FNV-1a hash of them.
fn digest(state: (u64, u64), bytes: &[u8]) -> (u64, u64) {
    let hash = bytes.iter().fold(state.1, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (state.0 + bytes.len() as u64, hash)
}

const FNV_START: (u64, u64) = (0, 0xcbf2_9ce4_8422_2325);

impl Stream {
    fn start(t: &Topology, port: u16, seed: u64) -> Result<Self> {
        let mut w = proxied_to(t, port)?;
        let mut r = w.try_clone()?;
        r.set_read_timeout(Some(Duration::from_secs(30)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut state = FNV_START;
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut chunk = vec![0u8; 8192];
                while !stop.load(Ordering::Relaxed) {
                    for b in chunk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    w.write_all(&chunk)?;
                    state = digest(state, &chunk);
                    thread::sleep(Duration::from_millis(5));
                }
                w.shutdown(Shutdown::Write)?;
                Ok(state)
            })
        };
        let reader = thread::spawn(move || {
            let mut state = FNV_START;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    return Ok(state);
                }
                state = digest(state, &buf[..n]);
            }
        });
        Ok(Self {
            stop,
            writer,
            reader,
            port,
        })
    }

    /// Ends the stream (half-close, echoed back); the bytes it carried.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?
            .context("writing the stream")?;
        let got = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?
            .context("reading the stream back")?;
        ensure!(
            sent == got,
            "stream on port {}: sent {} bytes (hash {:x}), got {} (hash {:x})",
            self.port,
            sent.0,
            sent.1,
            got.0,
            got.1
        );
        ensure!(sent.0 > 0, "nothing streamed");
        Ok(sent.0)
    }
}

fn wait_until(cond: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() > deadline {
            bail!("{what}: not within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A UDP flow sending steadily across three upgrades: every datagram is answered,
/// whichever instance forwarded it; the old instances keep their flows for the
/// answers until the flows idle out (`--close-after`), then exit.
#[test]
fn udp_flow_answered_across_upgrades() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start(&t.host, &["127.0.0.1:9100"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8453")
        .target4("127.0.0.1:9100")
        .close_after(2)
        .shutdown_grace(60)
        .verbose(1);
    let mm: SocketAddr = sock(HOST_V4, 8453).parse()?;
    let client: SocketAddr = "198.51.100.9:41000".parse()?;
    let lb = UdpBalancer::new(&t, LB_V4)?;
    let mut daemons = vec![Daemon::start(&t.host, &args)?];
    lb.0.set_read_timeout(Some(Duration::from_millis(500)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, answered) = thread::scope(|scope| -> Result<(u32, u32)> {
        let lb = &lb;
        let sender = {
            let stop = stop.clone();
            scope.spawn(move || -> Result<u32> {
                let mut n: u32 = 0;
                while !stop.load(Ordering::Relaxed) {
                    lb.send(&dgram(client, mm), &n.to_be_bytes(), mm)?;
                    n += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(n)
            })
        };
        // Answers are read as they come, so none is lost to a full receive buffer.
        let receiver = {
            let stop = stop.clone();
            scope.spawn(move || -> Result<Vec<u32>> {
                let mut got = Vec::new();
                loop {
                    match lb.try_recv()? {
                        Some((data, from)) => {
                            ensure!(from == mm, "answer from {from}");
                            let payload = data
                                .strip_prefix(answer(client, b"").as_slice())
                                .context("an answer for another client")?;
                            got.push(u32::from_be_bytes(payload.try_into()?));
                        }
                        None if stop.load(Ordering::Relaxed) => return Ok(got),
                        None => {}
                    }
                }
            })
        };
        let mut run = || -> Result<()> {
            for n in 1..=3 {
                thread::sleep(Duration::from_millis(300));
                let new = Daemon::start(&t.host, &args)?;
                new.wait_for(TOOK_OVER, WAIT)
                    .with_context(|| format!("UDP upgrade {n}: {}", new.log_text()))?;
                daemons.push(new);
            }
            thread::sleep(Duration::from_millis(300));
            Ok(())
        };
        let result = run();
        stop.store(true, Ordering::Relaxed);
        result?;
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let got = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        let mut seen = vec![false; sent as usize];
        for n in got {
            if let Some(s) = seen.get_mut(n as usize) {
                *s = true;
            }
        }
        Ok((sent, seen.iter().filter(|s| **s).count() as u32))
    })?;
    eprintln!("upgrade: UDP {sent} datagrams across 3 upgrades, {answered} answered");
    ensure!(answered == sent, "{} datagrams unanswered", sent - answered);
    // The old instances close their idle flows and exit well before the grace.
    let last = daemons.pop().context("no daemon")?;
    for d in daemons.iter_mut() {
        d.wait_for(HANDED_OVER, Duration::ZERO)?;
        ensure!(d.wait_exit(WAIT)?.success());
    }
    drop(last);
    Ok(())
}

/// SIGUSR2 (what `systemctl reload` sends): the daemon starts its own binary with
/// its own arguments, which takes over; the old process tells the service manager
/// that the new one is the main process, then exits.
#[test]
fn sigusr2_starts_a_successor_that_becomes_the_main_process() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let dir = mmproxy_tests::haproxy::TempDir::new("notify")?;
    let notify_path = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(WAIT))?;
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .shutdown_grace(30)
        .verbose(1);
    let mut old = Daemon::start_shell(
        &t.host,
        &format!("export NOTIFY_SOCKET='{}'", notify_path.display()),
        &args,
    )?;
    let mut live = proxied_to(&t, 8443)?;
    echo_once(&mut live, b"before")?;
    old.signal(libc::SIGUSR2);
    // The successor writes to the same output as the old process.
    let started = old.wait_for("started a new mmproxy to take over", WAIT)?;
    let child: i32 = started
        .split("pid=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no pid in {started:?}"))?;
    let successor = Successor(child);
    old.wait_for(TOOK_OVER, WAIT)?;
    old.wait_for(HANDED_OVER, WAIT)?;
    let want = format!("MAINPID={child}\nREADY=1");
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m.trim_end() == want) {
        let n = uninterrupted(|| notify.recv(&mut buf))
            .with_context(|| format!("no {want:?} among {seen:?}"))?;
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    ensure!(
        seen.iter().any(|m| m.starts_with("RELOADING=1")),
        "{seen:?}"
    );
    // The connection the old process accepted still works; new ones go to the
    // successor; the old one exits once its connection ends.
    let mut fresh = proxied_to(&t, 8443)?;
    echo_once(&mut fresh, b"to the successor")?;
    echo_once(&mut live, b"still the old one")?;
    drop(live);
    ensure!(old.wait_exit(WAIT)?.success(), "{}", old.log_text());
    echo_once(&mut fresh, b"after the old one left")?;
    drop(successor);
    Ok(())
}

/// A process the test did not start itself: SIGTERM on drop, then wait until gone.
struct Successor(i32);

impl Drop for Successor {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the successor's pid, read from its own log line.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", self.0));
            match state {
                Ok(s) if !s.contains(") Z") => thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
    }
}
