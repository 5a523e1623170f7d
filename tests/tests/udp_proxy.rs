//! The UDP proxy end to end: a "balancer" in its own namespace sending PROXY v2 DGRAM
//! datagrams, mmproxy with the real kernel's transparent sockets and policy routing,
//! and a real UDP service on the host's loopback. Each test runs once, with the
//! flags it gives (`--ebpf auto` unless it says otherwise).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mmproxy::proxy_protocol::{encode_v1, Transport, V2Builder};
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{dgram, UdpBalancer};
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::haproxy::TempDir;
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_counts::{answers_relayed, wait_total};
use mmproxy_tests::udp_upstream::{answer, UdpEcho};
use mmproxy_tests::{require_root, WAIT};

/// Second addresses of the host: a wildcard socket answering the balancer from its
/// primary address (192.0.2.2, 2001:db8:1::2) instead would be dropped by a real
/// balancer, so answers to these show that PKTINFO is honoured.
const HOST2_V4: &str = "192.0.2.4";
const HOST2_V6: &str = "2001:db8:1::4";

struct Setup {
    echo: UdpEcho,
    daemon: Daemon,
    t: Topology,
}

/// `mmproxy -p udp -4 127.0.0.1:9000 -6 [::1]:9000 -v 1`, for a test to add its
/// listening addresses and flags to.
fn standard() -> DaemonArgs {
    DaemonArgs::udp()
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000")
        .verbose(1)
}

/// Both families' wildcards on port 8443.
fn wildcard() -> DaemonArgs {
    standard().listen("0.0.0.0:8443").listen("[::]:8443")
}

/// Topology with the host's second addresses, a UDP echo service on 127.0.0.1:9000
/// and [::1]:9000, and mmproxy with `args`.
fn setup(args: DaemonArgs) -> Result<Setup> {
    let t = Topology::new()?;
    t.host.addr("eth0", &format!("{HOST2_V4}/24"))?;
    t.host.addr("eth0", &format!("{HOST2_V6}/64"))?;
    let echo = UdpEcho::start_dual(&t.host, 9000)?;
    let daemon = Daemon::start(&t.host, &args)?;
    Ok(Setup { echo, daemon, t })
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn mm(host: &str) -> SocketAddr {
    sa(&sock(host, 8443))
}

#[test]
fn ipv4_and_ipv6_clients_through_ipv4_and_ipv6_proxy_sockets_answered_from_the_address_used(
) -> Result<()> {
    require_root!();
    let s = setup(wildcard())?;
    let mut port = 40000;
    for (lb, host) in [
        (LB_V4, HOST2_V4),
        (LB_V6, HOST2_V6),
        (LB_V4, HOST_V4),
        (LB_V6, HOST_V6),
    ] {
        let b = UdpBalancer::new(&s.t, lb)?;
        let to = mm(host);
        for client in ["198.51.100.20", "2001:db8:c::20"] {
            port += 1;
            let client = SocketAddr::new(client.parse()?, port);
            b.roundtrip(client, to, b"ping")
                .with_context(|| format!("{client} via {lb} -> {to}\n{}", s.daemon.log_text()))?;
            assert_eq!(
                s.echo.next_peer(WAIT)?,
                client,
                "the service must see the client's address and port"
            );
            // A second datagram of the flow takes the same path.
            b.roundtrip(client, to, b"again")?;
            assert_eq!(s.echo.next_peer(WAIT)?, client);
        }
    }
    // An IPv4 client in an INET6 header (IPv4-mapped, as a mixed pair is sent) goes
    // to the -4 target from the IPv4 address.
    let b = UdpBalancer::new(&s.t, LB_V6)?;
    let mapped = sa("[::ffff:198.51.100.21]:41000");
    let to = mm(HOST_V6);
    b.send(&dgram(mapped, to), b"mapped", to)?;
    let (got, from) = b.recv()?;
    assert_eq!(from, to);
    assert_eq!(got, answer(sa("198.51.100.21:41000"), b"mapped"));
    assert_eq!(s.echo.next_peer(WAIT)?, sa("198.51.100.21:41000"));

    // LOCAL (a health check): from the host's own address, one flow per proxy
    // address however many datagrams it sends.
    let line = s.daemon.stats()?;
    let created = counter(&line, "udp_flows_created");
    let local = V2Builder::local().build()?;
    let to = mm(HOST2_V4);
    for _ in 0..3 {
        b.send(&local, b"health", mm(HOST_V6))?;
        let (got, _) = b.recv()?;
        assert!(got.ends_with(b"|health"));
        assert!(s.echo.next_peer(WAIT)?.ip().is_loopback());
    }
    let b4 = UdpBalancer::new(&s.t, LB_V4)?;
    b4.send(&local, b"health", to)?;
    let (_, from) = b4.recv()?;
    assert_eq!(from, to);
    let seen = s.echo.next_peer(WAIT)?;
    assert_eq!(
        seen.ip().to_string(),
        "127.0.0.1",
        "LOCAL from the host, saw {seen}"
    );
    let line = s.daemon.stats()?;
    assert_eq!(counter(&line, "udp_flows_created"), created + 2, "{line}");
    assert_eq!(counter(&line, "udp_dropped_invalid"), 0, "{line}");
    Ok(())
}

#[test]
fn thousand_clients_each_answered_and_idle_expiry_closes_their_descriptors() -> Result<()> {
    require_root!();
    let s = setup(wildcard().close_after(1).listeners(2))?;
    let fds_idle = s.daemon.open_fds()?;

    // Four balancer sockets, so both SO_REUSEPORT sockets get flows.
    let balancers = [LB_V4, LB_V4, LB_V6, LB_V6]
        .iter()
        .map(|lb| UdpBalancer::new(&s.t, lb))
        .collect::<Result<Vec<_>>>()?;
    for b in &balancers {
        b.0.set_read_timeout(Some(Duration::from_millis(500)))?;
    }
    let clients: Vec<SocketAddr> = (0..1000u16)
        .map(|i| {
            if i % 2 == 0 {
                SocketAddr::new(
                    format!("198.51.100.{}", 100 + i / 100).parse().unwrap(),
                    30000 + i,
                )
            } else {
                SocketAddr::new(
                    format!("2001:db8:c::{:x}", 0x100 + i).parse().unwrap(),
                    30000 + i,
                )
            }
        })
        .collect();

    // Windows of 50 clients, as real UDP clients do: resend what was not answered.
    let mut answered = BTreeMap::new();
    for (w, window) in clients.chunks(50).enumerate() {
        let b = &balancers[w % balancers.len()];
        let to = if b.0.local_addr()?.is_ipv4() {
            mm(HOST_V4)
        } else {
            mm(HOST_V6)
        };
        let mut pending: BTreeSet<SocketAddr> = window.iter().copied().collect();
        for _attempt in 0..5 {
            for c in &pending {
                b.send(&dgram(*c, to), c.to_string().as_bytes(), to)?;
            }
            while !pending.is_empty() {
                let Ok((got, from)) = b.recv() else { break };
                assert_eq!(from, to);
                let text = String::from_utf8(got)?;
                let (seen, payload) = text.split_once('|').context("answer format")?;
                assert_eq!(seen, payload, "an answer reached the wrong client");
                let c: SocketAddr = payload.parse()?;
                pending.remove(&c);
                answered.insert(c, ());
            }
            if pending.is_empty() {
                break;
            }
        }
        ensure!(pending.is_empty(), "unanswered: {pending:?}");
    }
    assert_eq!(answered.len(), 1000);
    let seen: BTreeSet<SocketAddr> = s.echo.take_peers().into_iter().collect();
    assert_eq!(
        seen,
        clients.iter().copied().collect(),
        "the service saw every client as itself"
    );

    let line = s.daemon.stats()?;
    assert_eq!(
        counter(&line, "udp_flows_created"),
        1000,
        "one flow per client: {line}"
    );
    let fds_busy = s.daemon.open_fds()?;
    assert!(
        fds_busy >= fds_idle + 1000 || counter(&line, "udp_flows_expired") > 0,
        "each live flow holds its socket: {fds_idle} -> {fds_busy}"
    );

    // Idle for --close-after 1: every flow is closed and its descriptor with it.
    let line = s.daemon.wait_counter("udp_flows_expired", 1000, WAIT)?;
    assert_eq!(counter(&line, "udp_flows_active"), 0, "{line}");
    assert_eq!(counter(&line, "udp_flows_evicted"), 0, "{line}");
    s.daemon
        .wait_open_fds_at_most(fds_idle, WAIT)
        .context("after expiry, as many as before any flow")?;
    Ok(())
}

#[test]
fn full_flow_table_evicts_the_least_recently_used_and_new_clients_are_served() -> Result<()> {
    require_root!();
    let s = setup(standard().listen("0.0.0.0:8443").max_flows(3))?;
    let b = UdpBalancer::new(&s.t, LB_V4)?;
    let to = mm(HOST_V4);
    let [a, bb, c, d] = [
        "198.51.100.31:1",
        "198.51.100.32:2",
        "198.51.100.33:3",
        "198.51.100.34:4",
    ]
    .map(sa);
    let created = |want: u64, evicted: u64| -> Result<()> {
        let line = s.daemon.stats()?;
        assert_eq!(counter(&line, "udp_flows_created"), want, "{line}");
        assert_eq!(counter(&line, "udp_flows_evicted"), evicted, "{line}");
        assert!(counter(&line, "udp_flows_active") <= 3, "{line}");
        Ok(())
    };
    for x in [a, bb, c] {
        b.roundtrip(x, to, b"1")?;
    }
    created(3, 0)?;
    // a is used again, so bb becomes the least recently used.
    b.roundtrip(a, to, b"2")?;
    // A fourth client: served, and bb's flow is evicted.
    b.roundtrip(d, to, b"3")?;
    created(4, 1)?;
    // a kept its flow; bb needs a new one (evicting c, now the oldest).
    b.roundtrip(a, to, b"4")?;
    created(4, 1)?;
    b.roundtrip(bb, to, b"5")?;
    created(5, 2)?;
    b.roundtrip(d, to, b"6")?;
    created(5, 2)?;
    for _ in 0..8 {
        assert!(s.echo.next_peer(WAIT).is_ok());
    }
    Ok(())
}

/// One datagram per way of being invalid on a datagram listener.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let client = sa("198.51.100.40:4000");
    let dst = mm(HOST_V4);
    let good = dgram(client, dst);
    let mut bad_crc = V2Builder::proxy(client, dst)
        .transport(Transport::Dgram)
        .crc32c()
        .build()
        .unwrap_or_default();
    if let Some(last) = bad_crc.last_mut() {
        *last ^= 0xff;
    }
    vec![
        ("v1 text", {
            let mut v = encode_v1(client, dst);
            v.extend_from_slice(b"payload");
            v
        }),
        (
            "v2 STREAM transport",
            V2Builder::proxy(client, dst).build().unwrap_or_default(),
        ),
        ("truncated v2", good[..good.len() - 3].to_vec()),
        ("bad CRC32C", bad_crc),
        ("garbage", b"\x00\x01garbage that is not a header".to_vec()),
        ("empty", Vec::new()),
    ]
}

#[test]
fn burst_of_malformed_datagrams_is_dropped_counted_and_the_next_good_one_answered() -> Result<()> {
    require_root!();
    let s = setup(standard().listen("0.0.0.0:8443"))?;
    let b = UdpBalancer::new(&s.t, LB_V4)?;
    let to = mm(HOST_V4);
    let cases = malformed();
    const ROUNDS: usize = 50;
    for _ in 0..ROUNDS {
        for (name, bytes) in &cases {
            b.0.send_to(bytes, to).with_context(|| name.to_string())?;
        }
    }
    // Datagrams from one socket are handled in order: once this is answered, every
    // malformed one before it has been looked at.
    b.roundtrip(sa("198.51.100.41:4100"), to, b"good")?;
    assert_eq!(s.echo.next_peer(WAIT)?, sa("198.51.100.41:4100"));
    let line = s.daemon.stats()?;
    let bad = (ROUNDS * cases.len()) as u64;
    // A datagram that ends inside the header it starts is counted apart.
    let short = cases
        .iter()
        .filter(|(name, _)| matches!(*name, "truncated v2" | "empty"))
        .count();
    let truncated = (ROUNDS * short) as u64;
    assert_eq!(counter(&line, "udp_dropped_truncated"), truncated, "{line}");
    assert_eq!(
        counter(&line, "udp_dropped_invalid"),
        bad - truncated,
        "{line}"
    );
    assert_eq!(counter(&line, "udp_datagrams"), bad + 1, "{line}");
    assert_eq!(counter(&line, "udp_flows_created"), 1, "{line}");
    assert_eq!(counter(&line, "udp_upstream_errors"), 0, "{line}");
    ensure!(
        s.echo.take_peers().is_empty(),
        "a malformed datagram reached the service"
    );

    // Rate-limited: a few lines and then a count, not one line per datagram.
    s.daemon.wait_for("suppressed", WAIT)?;
    let log = s.daemon.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("invalid datagram dropped"))
        .count();
    assert!(
        (1..=20).contains(&lines),
        "{lines} log lines for {bad} invalid datagrams"
    );
    for reason in [
        "v1_on_datagram",
        "v2_transport_mismatch",
        "truncated",
        "v2_crc32c_mismatch",
    ] {
        assert!(log.contains(reason), "no {reason} in the log:\n{log}");
    }
    // Still serving.
    b.roundtrip(sa("198.51.100.42:4200"), to, b"still here")?;
    Ok(())
}

#[test]
fn go_mmproxy_udp_invocation_works_unchanged_and_sigterm_exits_cleanly() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = UdpEcho::start(&t.host, &["127.0.0.1:25578", "[::1]:25578"])?;
    let dir = TempDir::new("prefixes")?;
    std::fs::write(
        dir.0.join("path-prefixes.txt"),
        format!("{LB_V4}/32\n{LB_V6}/128\n"),
    )?;
    // Exactly go-mmproxy's example, run from the directory holding the file.
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:25577")
        .target4("127.0.0.1:25578")
        .target6("[::1]:25578")
        .allowed("./path-prefixes.txt");
    let cd = format!("cd '{}'", dir.0.display());
    let mut d = Daemon::start_shell(&t.host, &cd, &args)?;
    let to = sa("192.0.2.2:25577");
    // go-mmproxy's example listens on IPv4 only; IPv6 clients arrive over it too.
    let b = UdpBalancer::new(&t, LB_V4)?;
    for client in ["198.51.100.50:5000", "[2001:db8:c::50]:5000"] {
        b.roundtrip(sa(client), to, b"drop-in")
            .with_context(|| format!("{client}\n{}", d.log_text()))?;
        assert_eq!(echo.next_peer(WAIT)?, sa(client));
    }
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT)?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[test]
fn service_on_a_wildcard_answering_from_another_address_is_relayed_and_other_ports_are_not(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    // Bound to 0.0.0.0: it answers 198.51.100.x from the address routing picks for
    // it (the default route's, 203.0.113.2), not from 127.0.0.1 where it was reached.
    let echo = UdpEcho::start(&t.host, &["0.0.0.0:9001"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9001")
        .ebpf(Ebpf::On)
        .verbose(1);
    let d = Daemon::start(&t.host, &args)?;
    let b = UdpBalancer::new(&t, LB_V4)?;
    let client = sa("198.51.100.60:6000");
    let to = mm(HOST_V4);
    b.roundtrip(client, to, b"from anywhere")
        .with_context(|| d.log_text())?;
    assert_eq!(echo.next_peer(WAIT)?, client);

    // Something else on the host sending to the client's address and port (here from
    // loopback, which the return-path rule delivers locally) is not the service.
    let intruder = t.host.enter(|| UdpSocket::bind("127.0.0.1:0"))??;
    intruder.send_to(b"not the service", client)?;
    d.wait_counter("udp_replies_foreign", 1, WAIT)?;
    // The balancer's next datagram is the service's answer, not the intruder's.
    b.roundtrip(client, to, b"still the service")?;
    // Counted after the send: the balancer may have the answer first.
    let line = wait_total(&d, "answers relayed", answers_relayed, 2, WAIT)?;
    assert_eq!(answers_relayed(&line), 2, "{line}");
    Ok(())
}

#[test]
fn a_burst_of_one_flow_arrives_as_separate_datagrams_in_order_both_ways() -> Result<()> {
    require_root!();
    // Equal-sized datagrams sent back to back are what mmproxy hands to the kernel
    // as one segmented (UDP GSO) send, towards the service and back to the
    // balancer: each must still arrive on its own, whole and in order.
    let s = setup(wildcard())?;
    let b = UdpBalancer::new(&s.t, LB_V4)?;
    let to = mm(HOST_V4);
    let client = sa("198.51.100.30:42000");
    let header = dgram(client, to);
    let payloads: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("burst-{i:03}").into_bytes())
        .collect();
    for p in &payloads {
        b.send(&header, p, to)?;
    }
    for p in &payloads {
        let (got, from) = b.recv()?;
        ensure!(from == to, "answer came from {from}");
        ensure!(
            got == answer(client, p),
            "expected the answer to {:?}, got {:?}\n{}",
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(&got),
            s.daemon.log_text()
        );
    }
    for _ in &payloads {
        assert_eq!(s.echo.next_peer(WAIT)?, client);
    }
    // The counter follows the send: the balancer may have the answers first.
    let line = wait_total(&s.daemon, "answers relayed", answers_relayed, 40, WAIT)?;
    assert_eq!(answers_relayed(&line), 40, "{line}");
    assert_eq!(counter(&line, "udp_upstream_errors"), 0, "{line}");
    Ok(())
}
