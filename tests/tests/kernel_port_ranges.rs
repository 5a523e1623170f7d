//! Port ranges on the kernel side: one listening socket per family serves a range
//! of 1,000 ports (sk_lookup steers every port of it there), the header's
//! destination port picks the target's, UDP answers leave from the port the proxy
//! sent to, and a range without the kernel side refuses to start.
use anyhow::{Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf, Mode};
use mmproxy_tests::balancer::{proxied, UdpBalancer};
use mmproxy_tests::client::roundtrip;
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_counts::{answers_relayed, datagrams_received, wait_total};
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// Lines of `ss -Hltnp` in `ns` that belong to `pid`.
fn listening_of(ns: &Netns, pid: i32) -> Result<Vec<String>> {
    let out = ns.run("ss", &["-Hltnp"])?;
    let tag = format!("pid={pid},");
    Ok(out
        .lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_owned)
        .collect())
}

#[test]
fn port_range_of_1000_ports_uses_one_socket_per_family_and_the_headers_port() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let ports = [20000u16, 20517, 20999];
    // The upstream listens on each tested port: the target port is left out, so the
    // header's destination port picks it.
    let echoes = ports
        .iter()
        .map(|p| EchoServer::start_dual(&t.host, *p))
        .collect::<Result<Vec<_>>>()?;
    // On the host's addresses, not wildcards: the upstreams on loopback use the
    // same ports.
    let args = DaemonArgs::tcp()
        .listen(format!("{HOST_V4}:20000-20999"))
        .listen(format!("[{HOST_V6}]:20000-20999"))
        .target4("127.0.0.1")
        .target6("[::1]")
        .ebpf(Ebpf::On)
        .verbose(2);
    let d = Daemon::start(&t.host, &args)?;

    let mine = listening_of(&t.host, d.pid())?;
    assert_eq!(mine.len(), 2, "one listening socket per family:\n{mine:#?}");
    for first in [sock(HOST_V4, 20000), sock(HOST_V6, 20000)] {
        assert!(
            mine.iter().any(|l| l.contains(&first)),
            "{first}: {mine:#?}"
        );
    }

    for (port, echo) in ports.iter().zip(&echoes) {
        for (lb, host, client) in [
            (LB_V4, HOST_V4, sock("198.51.100.9", 41000)),
            (LB_V6, HOST_V6, sock("2001:db8:c::9", 41001)),
        ] {
            let mm = sock(host, *port);
            let mut c =
                proxied(&t, lb, &mm, &client).with_context(|| format!("{mm}\n{}", d.log_text()))?;
            roundtrip(&mut c, format!("to port {port}").as_bytes())
                .with_context(|| format!("{mm}\n{}", d.log_text()))?;
            let seen = echo.next_peer(WAIT)?;
            assert_eq!(seen.to_string(), client, "upstream on port {port}");
        }
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_steered"), 6, "{line}");
    assert_eq!(counter(&line, "tcp_proxied"), 6, "{line}");
    // Steering events reach the daemon's log at -v 2.
    d.wait_for("steered port 20517", WAIT)?;
    Ok(())
}

#[test]
fn port_ranges_without_the_kernel_side_refuse_to_start() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    // Under auto with the load failing: auto must not fall back silently when
    // ranges need the kernel.
    for (ebpf, mode) in [(Ebpf::Off, Mode::AsGiven), (Ebpf::Auto, Mode::BpfFails)] {
        let args = DaemonArgs::tcp()
            .mode(mode)
            .listen("0.0.0.0:20000-20009")
            .target4("127.0.0.1")
            .ebpf(ebpf);
        let mut d = Daemon::spawn(&t.host, &args)?;
        let status = d.wait_exit(WAIT)?;
        assert!(!status.success(), "{args:?} started:\n{}", d.log_text());
    }
    Ok(())
}

/// A range is one socket on its first port, yet an answer to a datagram sent to any
/// port of it must come from that port (balancers match answers by address and
/// port), IPv4 and IPv6; a flow whose datagrams move to another port is answered
/// from the latest; the sockets answering from other ports never take the range's
/// datagrams, and close with their flows.
#[test]
fn udp_range_answers_leave_from_the_port_the_proxy_sent_to() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let service4 = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let service6 = UdpEcho::start(&t.host, &["[::1]:9000"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:20000-20999")
        .listen("[::]:20000-20999")
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000")
        .close_after(1)
        .ebpf(Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    let fds_before = d.open_fds()?;
    let mut exchanged = 0;
    for (lb_addr, host, client_ip, service) in [
        (LB_V4, HOST_V4, CLIENT_V4, &service4),
        (LB_V6, HOST_V6, CLIENT_V6, &service6),
    ] {
        let lb = UdpBalancer::new(&t, lb_addr)?;
        // The last and a middle port, each a flow of its own; then the first
        // client's flow again on the last port (the socket answering from it must
        // not have taken the datagram from the range's socket), moving to the middle
        // port and to the range's own port: answered from the latest each time.
        for (client_port, port) in [
            (47100u16, 20999u16),
            (47101, 20517),
            (47100, 20999),
            (47100, 20517),
            (47100, 20000),
            (47101, 20517),
        ] {
            let client = sock(client_ip, client_port);
            let mm = sock(host, port);
            let payload = format!("to {port}");
            lb.roundtrip(client.parse()?, mm.parse()?, payload.as_bytes())
                .with_context(|| format!("{client} via {mm}\n{}", d.log_text()))?;
            assert_eq!(service.next_peer(WAIT)?, client.parse()?);
            exchanged += 1;
        }
    }
    let line = wait_total(&d, "answers relayed", answers_relayed, exchanged, WAIT)?;
    assert_eq!(answers_relayed(&line), exchanged, "{line}");
    assert_eq!(datagrams_received(&line), exchanged, "{line}");
    // Idle for --close-after 1: flows close, and the reply sockets with them.
    d.wait_open_fds_at_most(fds_before, WAIT).with_context(|| {
        let stats = d.stats().unwrap_or_default();
        format!("{fds_before} before the flows\n{stats}")
    })?;
    Ok(())
}
