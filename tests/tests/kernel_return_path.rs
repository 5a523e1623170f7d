//! Return traffic of services that are not on loopback, on the kernel side:
//! placement (a), a target on one of the host's own addresses (tc egress on the
//! default-route interface sends the answers into lo); (b), a UDP service bound to
//! the wildcard; (c), a service in another namespace behind a veth (tc ingress
//! there marks its answers).
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{proxied, UdpBalancer};
use mmproxy_tests::client::{bulk_roundtrip, connect_from, roundtrip};
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_counts::answers_by_tc;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// mmproxy on 0.0.0.0:8443 and [::]:8443 with the kernel side required, forwarding
/// to port 9000 of `target4` / `target6`.
fn start_with_targets(t: &Topology, target4: &str, target6: &str) -> Result<Daemon> {
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4(sock(target4, 9000))
        .target6(sock(target6, 9000))
        .ebpf(Ebpf::On);
    Daemon::start(&t.host, &args)
}

/// One proxied connection per family (clients 198.51.100.9 and 2001:db8:c::9, ports
/// `port` and `port + 1`): a message and `bulk` bytes come back intact, and each
/// upstream sees its client's address and port.
fn both_families_reach_the_upstream(
    t: &Topology,
    d: &Daemon,
    [echo4, echo6]: [&EchoServer; 2],
    port: u16,
    bulk: usize,
) -> Result<()> {
    for (lb, host, client, echo) in [
        (LB_V4, HOST_V4, format!("198.51.100.9:{port}"), echo4),
        (
            LB_V6,
            HOST_V6,
            format!("[2001:db8:c::9]:{}", port + 1),
            echo6,
        ),
    ] {
        let mut c = proxied(t, lb, &sock(host, 8443), &client).with_context(|| d.log_text())?;
        roundtrip(&mut c, b"placement").with_context(|| format!("{client}\n{}", d.log_text()))?;
        bulk_roundtrip(&mut c, bulk).with_context(|| client.clone())?;
        assert_eq!(echo.next_peer(WAIT)?, client.parse()?);
    }
    Ok(())
}

/// Placement (a): the target is one of the host's own, non-loopback addresses. Its
/// answers are routed towards the default route (gw0) until tc egress sends them
/// into lo.
#[test]
fn placement_a_target_on_a_local_non_loopback_address() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo4 = EchoServer::start(&t.host, &sock(HOST_V4, 9000))?;
    let echo6 = EchoServer::start(&t.host, &sock(HOST_V6, 9000))?;
    let d = start_with_targets(&t, HOST_V4, HOST_V6)?;
    d.wait_for("egress=gw0", WAIT)?;
    both_families_reach_the_upstream(&t, &d, [&echo4, &echo6], 44000, 4 << 20)?;
    let line = d.stats()?;
    assert!(counter(&line, "kernel_return_redirected") > 0, "{line}");
    assert_eq!(counter(&line, "kernel_return_marked"), 0, "{line}");
    Ok(())
}

/// Placement (c): the service lives in another namespace, reached over app0, with
/// the host as its gateway. tc ingress on app0 marks its answers.
#[test]
fn placement_c_service_in_another_namespace_behind_a_veth() -> Result<()> {
    require_root!();
    let t = Topology::with_app()?;
    let app = t.app.as_ref().context("app namespace")?;
    let echo4 = EchoServer::start(app, &sock(APP_V4, 9000))?;
    let echo6 = EchoServer::start(app, &sock(APP_V6, 9000))?;
    let d = start_with_targets(&t, APP_V4, APP_V6)?;
    d.wait_for("ingress=app0", WAIT)?;
    both_families_reach_the_upstream(&t, &d, [&echo4, &echo6], 45000, 1 << 20)?;
    // The proxied connections' closing handshakes are answers too: wait until they
    // are through and the counter stands still.
    let mut marked = counter(&d.stats()?, "kernel_return_marked");
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = counter(&d.stats()?, "kernel_return_marked");
        if now == marked {
            break;
        }
        marked = now;
    }
    assert!(marked > 0, "no answer was marked");

    // The host's own connection to the same service is not an mmproxy flow: its
    // answers pass untouched (and unmarked: they would otherwise go to the local
    // table and still arrive, so the counter is the evidence).
    let mut own = connect_from(&t.host, None, &sock(APP_V4, 9000), WAIT)??;
    own.set_read_timeout(Some(WAIT))?;
    roundtrip(&mut own, b"the host's own")?;
    bulk_roundtrip(&mut own, 256 << 10)?;
    drop(own);
    echo4.next_peer(WAIT)?;
    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_return_marked"), marked, "{line}");
    Ok(())
}

/// Placement (b): a UDP service bound to 0.0.0.0 answers from the address routing
/// picks for the client (gw0's), not the target's; and a port range whose wildcard
/// rule covers the client's own port must not take the answer for a proxy datagram.
#[test]
fn udp_placement_b_service_bound_to_the_wildcard_and_a_port_range() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let service = UdpEcho::start(&t.host, &["0.0.0.0:9000"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8443")
        .listen("0.0.0.0:20000-20999")
        .target4("127.0.0.1:9000")
        .ebpf(Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    let lb = UdpBalancer::new(&t, LB_V4)?;
    for (client, mm) in [
        ("198.51.100.9:47000", sock(HOST_V4, 8443)),
        // The client's port lies inside the listened range.
        ("198.51.100.9:20600", sock(HOST_V4, 8443)),
        // The range's socket; steered like every port of the range.
        ("198.51.100.9:47001", sock(HOST_V4, 20000)),
    ] {
        lb.roundtrip(client.parse()?, mm.parse()?, b"b")
            .with_context(|| format!("{client} via {mm}\n{}", d.log_text()))?;
        assert_eq!(service.next_peer(WAIT)?, client.parse()?);
    }
    // Another port of the range: the kernel steers the datagram to the range's socket
    // and the service gets it; the answer leaves from the port the balancer used
    // (`exchange` checks the source).
    let client = "198.51.100.9:47002";
    lb.roundtrip(client.parse()?, sock(HOST_V4, 20999).parse()?, b"b")
        .with_context(|| d.log_text())?;
    assert_eq!(service.next_peer(WAIT)?, client.parse()?);
    let line = d.stats()?;
    assert!(
        answers_by_tc(&line, "kernel_return_redirected") >= 4,
        "{line}"
    );
    assert_eq!(counter(&line, "kernel_steered"), 2, "{line}");
    Ok(())
}

/// Placements (a) and (c) for UDP: a service on the host's own address, and one in
/// the `app` namespace behind app0.
#[test]
fn udp_placements_a_and_c() -> Result<()> {
    require_root!();
    let t = Topology::with_app()?;
    let app = t.app.as_ref().context("app namespace")?;
    for (ns, target, counter_name) in [
        (&t.host, sock(HOST_V4, 9000), "kernel_return_redirected"),
        (app, sock(APP_V4, 9000), "kernel_return_marked"),
    ] {
        let service = UdpEcho::start(ns, &[&target])?;
        let args = DaemonArgs::udp()
            .listen("0.0.0.0:8443")
            .target4(&target)
            .ebpf(Ebpf::On);
        let d = Daemon::start(&t.host, &args)?;
        let lb = UdpBalancer::new(&t, LB_V4)?;
        let client = "198.51.100.9:48000";
        lb.roundtrip(client.parse()?, sock(HOST_V4, 8443).parse()?, b"ac")
            .with_context(|| format!("{target}\n{}", d.log_text()))?;
        assert_eq!(service.next_peer(WAIT)?, client.parse()?);
        let line = d.stats()?;
        assert!(answers_by_tc(&line, counter_name) > 0, "{target}: {line}");
    }
    Ok(())
}

/// Without a default route nothing is steered by tc, yet sk_lookup must still tell a
/// loopback service's answer to a client port inside a wildcard range from a proxy's
/// datagram (the flow table is filled whenever the kernel side is loaded).
#[test]
fn udp_answer_to_a_client_port_inside_a_wildcard_range_without_tc_steering() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    t.host.ip(&["route", "del", "default"])?;
    t.host.ip(&["-6", "route", "del", "default"])?;
    let service = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:20000-20999")
        .target4("127.0.0.1:9000")
        .ebpf(Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    assert!(
        !d.log_text().contains("return path: tc"),
        "{}",
        d.log_text()
    );
    let lb = UdpBalancer::new(&t, LB_V4)?;
    let client = "198.51.100.9:20600";
    lb.roundtrip(client.parse()?, sock(HOST_V4, 20000).parse()?, b"in range")
        .with_context(|| d.log_text())?;
    assert_eq!(service.next_peer(WAIT)?, client.parse()?);
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_datagrams"), 1, "{line}");
    Ok(())
}
