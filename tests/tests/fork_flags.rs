//! The maintained go-mmproxy fork's flags (issue #14, item 5), in its own single-dash
//! spelling: `-dynamic-destination` (the header's destination is the upstream) and
//! `-listen-transparent` (IP_TRANSPARENT on the listening sockets), the latter with
//! the fork's documented iptables TPROXY recipe.
use std::io::{Read, Write};
use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{connect, dgram, proxied, UdpBalancer};
use mmproxy_tests::client::{connect_from, roundtrip};
use mmproxy_tests::daemon::{AllowedFile, Daemon};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::{answer, UdpEcho};
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// `-4`/`-6` point where nothing listens: only the header's destination can work.
fn dynamic(args: DaemonArgs, allowed: &AllowedFile) -> DaemonArgs {
    args.listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4("127.0.0.1:9")
        .target6("[::1]:9")
        .dynamic_destination()
        .allowed(allowed)
        .ebpf(Ebpf::On)
        .verbose(1)
}

/// TCP, both families: each connection reaches the service its header names (two
/// services per family, so the choice is the header's), from the client's address;
/// a proxy outside the allowed subnets is still refused; a header naming mmproxy's
/// own listening socket is refused with its reason.
#[test]
fn dynamic_destination_tcp_goes_where_the_header_says() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n{LB_V6}/128\n"))?;
    let d = Daemon::start(&t.host, &dynamic(DaemonArgs::tcp(), &allowed))?;
    let mut port = 43000;
    for (lb, host, client_ip, service_ip) in [
        (LB_V4, HOST_V4, CLIENT_V4, "127.0.0.1"),
        (LB_V6, HOST_V6, CLIENT_V6, "::1"),
    ] {
        for service_port in [9001, 9002] {
            let service = sock(service_ip, service_port);
            let echo = EchoServer::start(&t.host, &service)?;
            port += 1;
            let client: SocketAddr = sock(client_ip, port).parse()?;
            let mut c = connect(&t, lb, &sock(host, 8443))?;
            c.write_all(&encode_v1(client, service.parse()?))?;
            roundtrip(&mut c, b"dynamic")
                .with_context(|| format!("{client} to {service}\n{}", d.log_text()))?;
            assert_eq!(echo.next_peer(WAIT)?, client, "{service}");
        }
    }

    // The allow-list applies before any header is read: sk_lookup refuses.
    let refused = connect_from(&t.lb, Some(LB_OTHER_V4), &sock(HOST_V4, 8443), WAIT)?;
    ensure!(
        refused.is_err(),
        "a proxy outside the allowed subnets connected"
    );

    // mmproxy's own socket as the destination: no connection to itself.
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 8443), &sock(CLIENT_V4, 43100))?;
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    d.wait_for("upstream_is_mmproxy", WAIT)?;
    Ok(())
}

/// UDP, both families: a datagram's header picks the service, the answer comes back
/// from the address the balancer sent to.
#[test]
fn dynamic_destination_udp_goes_where_the_header_says() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n{LB_V6}/128\n"))?;
    let d = Daemon::start(&t.host, &dynamic(DaemonArgs::udp(), &allowed))?;
    for (lb_ip, host, client, service) in [
        (LB_V4, HOST_V4, "198.51.100.9:43200", "127.0.0.1:9001"),
        (LB_V6, HOST_V6, "[2001:db8:c::9]:43201", "[::1]:9001"),
    ] {
        let echo = UdpEcho::start(&t.host, &[service])?;
        let lb = UdpBalancer::new(&t, lb_ip)?;
        let (client, mm): (SocketAddr, SocketAddr) = (client.parse()?, sock(host, 8443).parse()?);
        lb.send(&dgram(client, service.parse()?), b"dynamic", mm)?;
        let (got, from) = lb
            .recv()
            .with_context(|| format!("{client} to {service}\n{}", d.log_text()))?;
        assert_eq!(from, mm);
        assert_eq!(got, answer(client, b"dynamic"));
        assert_eq!(echo.next_peer(WAIT)?, client);
    }
    Ok(())
}

/// The fork's README recipe for many ports, in the host namespace: a local route in
/// table 123 for loopback answers and for marked packets, and a TPROXY rule sending
/// ports 10000-10004 to mmproxy's listener on 127.0.0.1:25577 (::1 for IPv6).
fn tproxy_recipe(host: &Netns, proto: &str) -> Result<()> {
    host.ip(&[
        "rule",
        "add",
        "from",
        "127.0.0.1/8",
        "iif",
        "lo",
        "table",
        "123",
    ])?;
    host.ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "123",
    ])?;
    host.ip(&["rule", "add", "fwmark", "1", "lookup", "123"])?;
    host.ip(&[
        "-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", "123",
    ])?;
    host.ip(&[
        "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "123",
    ])?;
    host.ip(&["-6", "rule", "add", "fwmark", "1", "lookup", "123"])?;
    for (tables, on_ip) in [("iptables", "127.0.0.1"), ("ip6tables", "::1")] {
        host.run(
            tables,
            &[
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                proto,
                "--dport",
                "10000:10004",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                "0x1/0x1",
                "--on-port",
                "25577",
                "--on-ip",
                on_ip,
            ],
        )?;
    }
    Ok(())
}

fn transparent(args: DaemonArgs) -> DaemonArgs {
    // Userspace only: the TPROXY rule, not sk_lookup, brings the ports to mmproxy.
    args.listen("0.0.0.0:25577")
        .listen("[::]:25577")
        .target4("127.0.0.1:25578")
        .target6("[::1]:25578")
        .listen_transparent()
        .ebpf(Ebpf::Off)
}

/// TCP through the TPROXY rule: a connection to any port of 10000-10004 reaches
/// mmproxy's listener, which must be IP_TRANSPARENT for TPROXY to hand it over, and
/// the service sees the client.
#[test]
fn listen_transparent_tcp_with_the_forks_tproxy_recipe() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    tproxy_recipe(&t.host, "tcp")?;
    let echo = EchoServer::start_dual(&t.host, 25578)?;
    let d = Daemon::start(&t.host, &transparent(DaemonArgs::tcp()))?;
    for (i, port) in [10000u16, 10003, 10004].into_iter().enumerate() {
        for (lb, host, client_ip) in [(LB_V4, HOST_V4, CLIENT_V4), (LB_V6, HOST_V6, CLIENT_V6)] {
            let client = sock(client_ip, 43300 + i as u16);
            let mm = sock(host, port);
            let mut c = proxied(&t, lb, &mm, &client).with_context(|| d.log_text())?;
            roundtrip(&mut c, b"tproxy").with_context(|| format!("{mm}\n{}", d.log_text()))?;
            assert_eq!(echo.next_peer(WAIT)?.to_string(), client, "{mm}");
        }
    }
    Ok(())
}

/// UDP through the TPROXY rule: answers leave from the port the balancer sent to.
#[test]
fn listen_transparent_udp_with_the_forks_tproxy_recipe() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    tproxy_recipe(&t.host, "udp")?;
    let echo = UdpEcho::start(&t.host, &["127.0.0.1:25578", "[::1]:25578"])?;
    let d = Daemon::start(&t.host, &transparent(DaemonArgs::udp()))?;
    for (lb_ip, host, client_ip) in [(LB_V4, HOST_V4, CLIENT_V4), (LB_V6, HOST_V6, CLIENT_V6)] {
        let lb = UdpBalancer::new(&t, lb_ip)?;
        for (i, port) in [10001u16, 10004].into_iter().enumerate() {
            let client: SocketAddr = sock(client_ip, 43400 + i as u16).parse()?;
            let mm: SocketAddr = sock(host, port).parse()?;
            lb.roundtrip(client, mm, b"tproxy")
                .with_context(|| format!("{client} via {mm}\n{}", d.log_text()))?;
            assert_eq!(echo.next_peer(WAIT)?, client);
        }
    }
    Ok(())
}
