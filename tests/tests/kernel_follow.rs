//! The return path follows the host's network while mmproxy runs: a container's veth
//! created after start-up, a target address added to the host, a moved default route
//! and a deleted veth each change where the tc programs sit, without a restart, and
//! traffic takes the new path. Interfaces on no return path never get a program.
//!
//! Each step waits for the daemon's "return path updated" line naming the whole new
//! state, then checks the links the process holds (its descriptors, not its word)
//! and proxies a connection through the new path.
use std::time::Instant;

use anyhow::{Context, Result};
use mmproxy_tests::args::{kernel_udp_datapath, DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{proxied, UdpBalancer};
use mmproxy_tests::client::{bulk_roundtrip, roundtrip};
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::tcx::{links, tcx_links};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_counts::answers_by_tc;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// The IPv6 target: an address the host only gets in the middle of the test, on lo
/// (placement (a) once it is there).
const LATE_V6: &str = "2001:db8:e::7";

/// The second default gateway's namespace, behind the host's gw1 (a /26 inside
/// gw0's /24, so more specific than it).
const GW1_HOST_V4: &str = "203.0.113.66";
const GW1_V4: &str = "203.0.113.65";
const GW1_HOST_V6: &str = "2001:db8:f1::2";
const GW1_V6: &str = "2001:db8:f1::1";

/// Waits for the update line describing exactly this state, logged after line
/// `since` (intermediate states of a burst that outlasted the debounce are passed
/// over); returns the number of lines up to it.
fn updated(d: &Daemon, since: usize, egress: &str, ingress: &str) -> Result<usize> {
    let state = format!("egress={egress} ingress={ingress} attached=");
    let mut skip = since;
    loop {
        d.wait_for_after("return path updated", skip, WAIT)
            .with_context(|| format!("waiting for {state}\n{}", d.log_text()))?;
        let log = d.log_text();
        for (i, line) in log.lines().enumerate().skip(skip) {
            if line.contains("return path updated") {
                if line.contains(&state) {
                    return Ok(i + 1);
                }
                skip = i + 1;
            }
        }
    }
}

/// From the first command of a change to the daemon's line saying it is applied:
/// printed for BENCHMARKS.md, never asserted.
fn shown(change: &str, started: Instant) {
    eprintln!(
        "return path follow: {change} applied after {:?}",
        started.elapsed()
    );
}

/// One proxied connection from `client` through the balancer's `lb` address to
/// mmproxy on `host`:8443; the echo must come back intact and the service must see
/// the client.
fn proxied_roundtrip(
    t: &Topology,
    d: &Daemon,
    (lb, host): (&str, &str),
    client: &str,
    echo: &EchoServer,
) -> Result<()> {
    let mut c = proxied(t, lb, &sock(host, 8443), client).with_context(|| d.log_text())?;
    roundtrip(&mut c, b"follow").with_context(|| format!("{client}\n{}", d.log_text()))?;
    bulk_roundtrip(&mut c, 256 << 10).with_context(|| client.to_owned())?;
    assert_eq!(echo.next_peer(WAIT)?, client.parse()?);
    Ok(())
}

#[test]
fn follows_a_new_container_an_added_address_a_moved_default_route_and_a_deleted_veth() -> Result<()>
{
    require_root!();
    let t = Topology::new()?;
    // Neither target exists yet: both are routed over the default route (gw0), so
    // ingress there is what start-up chooses.
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4(sock(APP_V4, 9000))
        .target6(sock(LATE_V6, 9000))
        .ebpf(Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    d.wait_for("following the host's links", WAIT)?;
    assert_eq!(tcx_links(d.pid(), &t.host)?, links(&[("gw0", "ingress")]));

    // 1. A container behind a new veth, the host its gateway: placement (c).
    let since = d.log_len();
    let app = Netns::new("app")?;
    let started = Instant::now();
    t.host.link("app0", &app, "eth0")?;
    t.host.addr("app0", &format!("{APP_GW_V4}/25"))?;
    app.addr("eth0", &format!("{APP_V4}/25"))?;
    app.ip(&["route", "add", "default", "via", APP_GW_V4])?;
    let echo4 = EchoServer::start(&app, &sock(APP_V4, 9000))?;
    let since = updated(&d, since, "none", "app0,gw0")?;
    shown("a container's veth", started);
    assert_eq!(
        tcx_links(d.pid(), &t.host)?,
        links(&[("app0", "ingress"), ("gw0", "ingress")])
    );
    proxied_roundtrip(&t, &d, (LB_V4, HOST_V4), "198.51.100.9:46000", &echo4)?;
    assert!(counter(&d.stats()?, "kernel_return_marked") > 0);

    // An interface on no return path: the next update's evaluation sees it and
    // leaves it alone (checked with step 2's links).
    let side = Netns::new("side")?;
    t.host.link("side0", &side, "eth0")?;
    t.host.addr("side0", "2001:db8:5::1/64")?;

    // 2. The IPv6 target becomes one of the host's own addresses: placement (a),
    // tc egress on the default route's interface, nothing on ingress for it.
    let started = Instant::now();
    t.host.addr("lo", &format!("{LATE_V6}/128"))?;
    let echo6 = EchoServer::start(&t.host, &sock(LATE_V6, 9000))?;
    let since = updated(&d, since, "gw0", "app0")?;
    shown("an added address", started);
    assert_eq!(
        tcx_links(d.pid(), &t.host)?,
        links(&[("app0", "ingress"), ("gw0", "egress")])
    );
    let redirected = counter(&d.stats()?, "kernel_return_redirected");
    proxied_roundtrip(&t, &d, (LB_V6, HOST_V6), "[2001:db8:c::9]:46001", &echo6)?;
    let now = counter(&d.stats()?, "kernel_return_redirected");
    assert!(now > redirected, "{now} after {redirected}");

    // 3. The default routes move to a new interface, gw1: so does tc egress.
    let gw1 = Netns::new("gw1")?;
    t.host.link("gw1", &gw1, "eth0")?;
    t.host.addr("gw1", &format!("{GW1_HOST_V4}/26"))?;
    t.host.addr("gw1", &format!("{GW1_HOST_V6}/64"))?;
    gw1.addr("eth0", &format!("{GW1_V4}/26"))?;
    gw1.addr("eth0", &format!("{GW1_V6}/64"))?;
    let started = Instant::now();
    t.host
        .ip(&["route", "replace", "default", "via", GW1_V4, "dev", "gw1"])?;
    t.host.ip(&[
        "-6", "route", "replace", "default", "via", GW1_V6, "dev", "gw1",
    ])?;
    let since = updated(&d, since, "gw1", "app0")?;
    shown("moved default routes", started);
    assert_eq!(
        tcx_links(d.pid(), &t.host)?,
        links(&[("app0", "ingress"), ("gw1", "egress")])
    );
    let redirected = counter(&d.stats()?, "kernel_return_redirected");
    proxied_roundtrip(&t, &d, (LB_V6, HOST_V6), "[2001:db8:c::9]:46002", &echo6)?;
    let now = counter(&d.stats()?, "kernel_return_redirected");
    assert!(now > redirected, "{now} after {redirected}");

    // 4. The container's veth is deleted: its link goes (no defunct link stays
    // held), and the IPv4 target is routed over gw0's /24 again.
    let started = Instant::now();
    t.host.ip(&["link", "del", "app0"])?;
    updated(&d, since, "gw1", "gw0")?;
    shown("a deleted veth", started);
    assert_eq!(
        tcx_links(d.pid(), &t.host)?,
        links(&[("gw0", "ingress"), ("gw1", "egress")])
    );
    let line = d.stats()?;
    assert!(counter(&line, "return_path_updates") >= 4, "{line}");
    assert_eq!(counter(&line, "return_path_errors"), 0, "{line}");
    Ok(())
}

/// UDP to a service bound to the wildcard (placement (b)) on a host that has no
/// default route when mmproxy starts: nothing is attached, yet the `fwmark` rule is
/// there and flows are registered, so the default route added later gets tc egress
/// and the answers come back at once.
#[test]
fn udp_a_default_route_added_after_start_up_gets_the_egress_program() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    t.host.ip(&["route", "del", "default"])?;
    t.host.ip(&["-6", "route", "del", "default"])?;
    let service = UdpEcho::start(&t.host, &["0.0.0.0:9000"])?;
    let args = DaemonArgs::udp()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .ebpf(Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    d.wait_for("following the host's links", WAIT)?;
    // The return path has no link yet; under `--udp-datapath kernel` the relay's
    // own links (balancer-facing ingress, lo egress) are there from the start.
    let relay = tcx_links(d.pid(), &t.host)?;
    if !kernel_udp_datapath() {
        assert_eq!(relay, links(&[]));
    }
    assert!(!relay.contains(&("gw0".to_owned(), "egress")), "{relay:?}");
    let rules = t.host.rules_and_routes()?;
    assert!(rules.contains("fwmark 0x6d6d7078 lookup 123"), "{rules}");

    let since = d.log_len();
    t.host.ip(&["route", "add", "default", "via", GW_V4])?;
    updated(&d, since, "gw0", "none")?;
    let mut want = relay.clone();
    want.extend(links(&[("gw0", "egress")]));
    assert_eq!(tcx_links(d.pid(), &t.host)?, want);
    let lb = UdpBalancer::new(&t, LB_V4)?;
    let client = "198.51.100.9:47100";
    lb.roundtrip(client.parse()?, sock(HOST_V4, 8443).parse()?, b"late route")
        .with_context(|| d.log_text())?;
    assert_eq!(service.next_peer(WAIT)?, client.parse()?);
    let line = d.stats()?;
    assert!(
        answers_by_tc(&line, "kernel_return_redirected") > 0,
        "{line}"
    );
    Ok(())
}
