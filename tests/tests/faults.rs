//! Faults around the daemon, end to end (issue #18): the upstream going away and
//! coming back, descriptor exhaustion, the connection and flow limits reached under
//! load, the balancer-facing interface going down and up, and ten thousand idle
//! connections. Each test runs once, with the kernel side as given (`--ebpf auto`),
//! and checks that the daemon is still serving afterwards without a restart.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::args::DaemonArgs;
use mmproxy_tests::balancer::{dgram, proxied, UdpBalancer};
use mmproxy_tests::client::{read_to_eof, roundtrip};
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::faults::{
    fd_targets, open_many, raise_own_nofile, set_nofile_limit, vm_rss_kib, HoldingServer,
    StoppableEcho,
};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

const MM: &str = "192.0.2.2:8443";
const UPSTREAM: &str = "127.0.0.1:9000";

/// `mmproxy -l 0.0.0.0:8443 -4 127.0.0.1:9000 -v 1`.
fn tcp_args() -> DaemonArgs {
    DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4(UPSTREAM)
        .verbose(1)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn v1(client: &str) -> Vec<u8> {
    encode_v1(sa(client), sa(MM))
}

/// The connection ends (EOF or reset) within the read timeout instead of hanging.
fn ends(c: &mut TcpStream) -> Result<()> {
    match read_to_eof(c) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("the connection was still open after {WAIT:?}")
        }
        _ => Ok(()),
    }
}

/// Asks for the counters until `name` is exactly `want` (gauges going down).
fn wait_gauge(d: &Daemon, name: &str, want: u64, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = d.stats()?;
        if counter(&line, name) == want {
            return Ok(line);
        }
        if Instant::now() >= deadline {
            bail!("{name} did not come to {want} within {timeout:?}: {line}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A new proxied connection round-trips, retried until `WAIT` is over (the daemon
/// may still be backing off, a link may still be coming up).
fn serves_again(t: &Topology, d: &Daemon, src: &str, mm: &str, client: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let tried = proxied(t, src, mm, client).and_then(|mut c| roundtrip(&mut c, b"again"));
        match tried {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet serving: {e:#}");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => bail!("the daemon did not serve again: {e:#}\n{}", d.log_text()),
        }
    }
}

#[test]
fn upstream_going_away_closes_its_clients_counts_and_is_used_again_when_back() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let up = StoppableEcho::start(&t.host, UPSTREAM)?;
    let d = Daemon::start(&t.host, &tcp_args())?;
    let mut live = proxied(&t, LB_V4, MM, "198.51.100.90:7000")?;
    roundtrip(&mut live, b"before")?;

    up.stop();
    // The live client is told: its connection ends rather than hangs.
    ends(&mut live).context("the live connection when the upstream went away")?;
    // New clients while it is away: each closed at once, each counted.
    for i in 0..5 {
        let mut c = proxied(&t, LB_V4, MM, &format!("198.51.100.91:{}", 7000 + i))?;
        ends(&mut c).with_context(|| format!("connection {i} while the upstream is away"))?;
    }
    // The live one ended towards its client (half-close passed on); once the client
    // closes too, nothing is left open.
    drop(live);
    let line = wait_gauge(&d, "tcp_active", 0, WAIT)?;
    assert_eq!(counter(&line, "upstream_connect_failed"), 5, "{line}");
    assert_eq!(counter(&line, "tcp_proxied"), 1, "{line}");

    // Back on the same port: the same daemon uses it again.
    let _up = StoppableEcho::start(&t.host, UPSTREAM)?;
    let mut c = proxied(&t, LB_V4, MM, "198.51.100.92:7000")?;
    roundtrip(&mut c, b"after")?;
    let line = d.stats()?;
    assert_eq!(counter(&line, "tcp_proxied"), 2, "{line}");
    assert_eq!(counter(&line, "upstream_connect_failed"), 5, "{line}");
    Ok(())
}

#[test]
fn descriptor_exhaustion_is_logged_and_counted_and_serving_resumes_without_a_leak() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = EchoServer::start(&t.host, UPSTREAM)?;
    let d = Daemon::start(&t.host, &tcp_args())?;
    // A first connection, so that what the relay keeps (pooled pipes) is counted in
    // the baseline.
    let mut c = proxied(&t, LB_V4, MM, "198.51.100.93:7000")?;
    roundtrip(&mut c, b"warm")?;
    drop(c);
    wait_gauge(&d, "tcp_active", 0, WAIT)?;
    let baseline = d.open_fds()?;

    // The running daemon's limit lowered to 16 spare descriptors (prlimit), then a
    // burst of 60 connections, each needing two.
    set_nofile_limit(d.pid(), baseline as u64 + 16)?;
    let burst = open_many(&t.lb, LB_V4, MM, 60, |i| {
        v1(&format!("198.51.100.94:{}", 7000 + i))
    })?;
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let line = d.stats()?;
        if counter(&line, "accept_errors") + counter(&line, "upstream_connect_failed") > 0 {
            break line;
        }
        ensure!(
            Instant::now() < deadline,
            "no descriptor shortage reached: {line}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("under the burst: {line}");
    d.wait_for("descriptor limit", WAIT)?;

    // The burst ends; with the limit still low, the daemon serves again.
    drop(burst);
    serves_again(&t, &d, LB_V4, MM, "198.51.100.95:7000")?;
    wait_gauge(&d, "tcp_active", 0, WAIT)?;
    // Every descriptor the burst took is given back (the recovery connection may
    // have left its two pipes in another worker thread's pool).
    d.wait_open_fds_at_most(baseline + 4, WAIT)?;
    Ok(())
}

#[test]
fn udp_descriptor_exhaustion_is_logged_and_counted_and_expired_flows_give_them_back() -> Result<()>
{
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start_dual(&t.host, 9000)?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8443")
        .target4(UPSTREAM)
        .close_after(1)
        .verbose(1);
    let d = Daemon::start(&t.host, &args)?;
    let to = sa(MM);
    UdpBalancer::new(&t, LB_V4)?.roundtrip(sa("198.51.100.96:7000"), to, b"warm")?;
    wait_gauge(&d, "udp_flows_active", 0, WAIT)?;
    let baseline = d.open_fds()?;

    // Eight spare descriptors, then thirty new clients: each flow needs one.
    set_nofile_limit(d.pid(), baseline as u64 + 8)?;
    let b = UdpBalancer::new(&t, LB_V4)?;
    for i in 0..30u16 {
        b.send(
            &dgram(sa(&format!("198.51.100.97:{}", 7000 + i)), to),
            b"x",
            to,
        )?;
    }
    let line = d.wait_counter("udp_upstream_errors", 1, WAIT)?;
    eprintln!("under the burst: {line}");
    assert!(counter(&line, "udp_flows_created") < 31, "{line}");
    d.wait_for("descriptor limit", WAIT)?;

    // The flows expire, their descriptors come back, and new clients are served
    // under the same low limit.
    wait_gauge(&d, "udp_flows_active", 0, WAIT)?;
    d.wait_open_fds_at_most(baseline, WAIT)?;
    UdpBalancer::new(&t, LB_V4)?.roundtrip(sa("198.51.100.98:7000"), to, b"again")?;
    Ok(())
}

#[test]
fn at_max_connections_new_ones_wait_in_the_backlog_live_ones_flow_and_the_waiting_are_served_after(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = EchoServer::start(&t.host, UPSTREAM)?;
    let d = Daemon::start(&t.host, &tcp_args().max_connections(20))?;
    let mut held = Vec::new();
    for i in 0..20 {
        let mut c = proxied(&t, LB_V4, MM, &format!("198.51.100.100:{}", 7000 + i))?;
        roundtrip(&mut c, b"held")?;
        held.push(c);
    }
    // Ten more, header and data sent: the kernel completes their handshakes, the
    // daemon does not accept them while the limit is reached.
    let mut queued = open_many(&t.lb, LB_V4, MM, 10, |i| {
        [
            v1(&format!("198.51.100.101:{}", 7000 + i)),
            b"queued".to_vec(),
        ]
        .concat()
    })?;
    // The live connections keep flowing meanwhile, each several times.
    for round in 0..5 {
        for c in &mut held {
            roundtrip(c, format!("round {round}").as_bytes())?;
        }
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "tcp_accepted"), 20, "{line}");
    assert_eq!(counter(&line, "tcp_active"), 20, "{line}");

    // Ten live ones close: the ten waiting are accepted and relayed, data intact.
    held.truncate(10);
    for c in &mut queued {
        c.set_read_timeout(Some(WAIT))?;
        let mut back = [0u8; 6];
        c.read_exact(&mut back)?;
        assert_eq!(&back, b"queued");
    }
    for c in &mut held {
        roundtrip(c, b"still here")?;
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "tcp_accepted"), 30, "{line}");
    assert_eq!(counter(&line, "tcp_proxied"), 30, "{line}");
    assert_eq!(counter(&line, "tcp_active"), 20, "{line}");
    Ok(())
}

#[test]
fn at_max_flows_two_hundred_clients_are_served_by_eviction_and_the_recent_keep_their_flows(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start_dual(&t.host, 9000)?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8443")
        .target4(UPSTREAM)
        .max_flows(50)
        .close_after(2)
        .verbose(1);
    let d = Daemon::start(&t.host, &args)?;
    let baseline = d.open_fds()?;
    let to = sa(MM);
    let b = UdpBalancer::new(&t, LB_V4)?;
    let client = |i: u16| sa(&format!("198.51.100.{}:{}", 110 + i / 100, 7000 + i));
    for i in 0..200 {
        b.roundtrip(client(i), to, b"load")?;
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_flows_created"), 200, "{line}");
    assert_eq!(counter(&line, "udp_flows_evicted"), 150, "{line}");
    assert_eq!(counter(&line, "udp_flows_active"), 50, "{line}");
    assert!(
        d.open_fds()? <= baseline + 50,
        "more descriptors than flows"
    );
    // The fifty most recent clients still have their flows: no new one is opened.
    for i in 150..200 {
        b.roundtrip(client(i), to, b"again")?;
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_flows_created"), 200, "{line}");
    // Idle, they expire; the table and the descriptors are back to empty.
    wait_gauge(&d, "udp_flows_active", 0, WAIT)?;
    d.wait_open_fds_at_most(baseline, WAIT)?;
    b.roundtrip(client(0), to, b"after")?;
    Ok(())
}

#[test]
fn balancer_facing_interface_down_and_up_the_daemon_survives_and_serves_again() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = EchoServer::start_dual(&t.host, 9000)?;
    let args = tcp_args().listen("[::]:8443").target6("[::1]:9000");
    let d = Daemon::start(&t.host, &args)?;
    let mut live = proxied(&t, LB_V4, MM, "198.51.100.120:7000")?;
    roundtrip(&mut live, b"before")?;

    t.host.ip(&["link", "set", "eth0", "down"])?;
    // Sent while the link is down: TCP keeps it and retransmits.
    live.write_all(b"during")?;
    let line = d.stats()?;
    t.host.ip(&["link", "set", "eth0", "up"])?;
    // Static IPv6 addresses are flushed on link down (keep_addr_on_down=0, the
    // default); an operator's network configuration puts them back.
    let v6 = t.host.ip_output(&["-6", "addr", "show", "dev", "eth0"])?;
    if !v6.contains(HOST_V6) {
        let cidr = format!("{HOST_V6}/64");
        t.host
            .ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
    }
    eprintln!("while down: {line}");

    // The live connection survived the flap, its bytes intact.
    let mut back = [0u8; 6];
    live.read_exact(&mut back)?;
    assert_eq!(&back, b"during");
    // New connections, both families, on the same daemon.
    serves_again(&t, &d, LB_V4, MM, "198.51.100.121:7000")?;
    let mm6 = sock(HOST_V6, 8443);
    serves_again(&t, &d, LB_V6, &mm6, "[2001:db8:c::121]:7000")?;
    let line = d.stats()?;
    assert_eq!(counter(&line, "tcp_proxied"), 3, "{line}");
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    Ok(())
}

/// One daemon's resident memory with `n` idle connections from the balancer's
/// address `lb`: before them (after a warm-up of 100), with them, and after they
/// closed (KiB). `proxied`: each sends
/// its header and is relayed to the holding service; otherwise each sends nothing
/// and waits for its header. Checks that every descriptor is given back.
fn idle_memory(
    t: &Topology,
    upstream: &HoldingServer,
    lb: &str,
    n: usize,
    proxied: bool,
) -> Result<(u64, u64, u64)> {
    let base = upstream.accepted();
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4(UPSTREAM)
        .max_connections(20_000)
        .header_timeout(3600);
    let mut d = Daemon::start_shell(&t.host, "ulimit -n 12000", &args)?;
    let header = |i: usize| {
        v1(&format!(
            "198.51.100.{}:{}",
            130 + i / 1000,
            20_000 + i % 1000
        ))
    };
    // What the runtime keeps once it has served (worker threads' descriptors, the
    // relay's pipe pool, buffers) belongs to the baseline.
    let warm = open_many(&t.lb, lb, MM, 100, header)?;
    upstream.wait_accepted(base + 100, WAIT)?;
    drop(warm);
    upstream.close_all();
    wait_gauge(&d, "tcp_active", 0, WAIT)?;
    let fds = d.open_fds()?;
    let before = vm_rss_kib(d.pid())?;

    let started = Instant::now();
    let conns = open_many(&t.lb, lb, MM, n, |i| {
        if proxied {
            header(i)
        } else {
            Vec::new()
        }
    })?;
    let name = if proxied {
        "tcp_proxied"
    } else {
        "tcp_accepted"
    };
    let line = d.wait_counter(name, 100 + n as u64, Duration::from_secs(60))?;
    assert_eq!(counter(&line, "tcp_active"), n as u64, "{line}");
    if proxied {
        upstream.wait_accepted(base + 100 + n, WAIT)?;
    }
    let with = vm_rss_kib(d.pid())?;
    eprintln!(
        "{n} connections (proxied: {proxied}) open after {:?}",
        started.elapsed()
    );
    drop(conns);
    upstream.close_all();
    wait_gauge(&d, "tcp_active", 0, Duration::from_secs(60))?;
    d.wait_open_fds_at_most(fds, WAIT)
        .with_context(|| format!("left open: {:?}", fd_targets(d.pid())))?;
    let after = vm_rss_kib(d.pid())?;
    d.signal(libc::SIGTERM);
    d.wait_exit(WAIT)?;
    Ok((before, with, after))
}

#[test]
fn ten_thousand_idle_connections_cost_bounded_memory_and_are_all_given_back() -> Result<()> {
    require_root!();
    // 10,000 client sockets here, as many in the daemon. Test machines have a hard
    // limit of 20,000 per process: a proxied connection holds two descriptors in
    // the daemon, so 5,000 of those are measured on their own.
    raise_own_nofile(16_000)?;
    let t = Topology::new()?;
    let upstream = HoldingServer::start(&t.host, UPSTREAM)?;
    let (w0, w1, w2) = idle_memory(&t, &upstream, LB_V4, 10_000, false)?;
    // From the balancer's other address: the first phase's 10,000 connections are in
    // TIME_WAIT on this side, and connect() would search long for a free port.
    let (p0, p1, p2) = idle_memory(&t, &upstream, LB_OTHER_V4, 5_000, true)?;
    let per_waiting = w1.saturating_sub(w0) as f64 / 10_000.0;
    let per_proxied = p1.saturating_sub(p0) as f64 / 5_000.0;
    eprintln!(
        "VmRSS KiB: 10,000 waiting for their header: {w0} -> {w1} -> {w2} closed \
         ({per_waiting:.2} KiB each); 5,000 proxied idle: {p0} -> {p1} -> {p2} closed \
         ({per_proxied:.2} KiB each)"
    );
    // Generous bounds: a waiting connection is a task, a timer and a small buffer;
    // a proxied idle one a task and two sockets (pipes only while bytes move).
    assert!(
        per_waiting < 32.0,
        "{per_waiting:.2} KiB per waiting connection"
    );
    assert!(
        per_proxied < 64.0,
        "{per_proxied:.2} KiB per proxied connection"
    );
    // Closed, nothing grows further: memory is kept for reuse, not piling up.
    assert!(
        w2 <= w1 && p2 <= p1,
        "VmRSS grew after the connections closed"
    );
    Ok(())
}
