//! The UDP checksums the kernel datapath leaves on relayed datagrams, checked by
//! the receivers themselves. Over veths a datagram from a local socket normally
//! travels with its checksum still to be computed (`CHECKSUM_PARTIAL`) and is never
//! verified; with checksum offloads off on the balancer's link the balancer's
//! datagrams arrive with a full checksum that nobody vouched for, so the service's
//! stack verifies what the tc program made of it, and the answers leaving the host
//! are checksummed in software from what the program left in the check field, then
//! verified by the balancer's stack. A wrong checksum drops the datagram (and
//! counts `InCsumErrors`), so an answered exchange is the proof.
use std::net::{SocketAddr, UdpSocket};

use anyhow::{ensure, Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf, UdpDatapath};
use mmproxy_tests::balancer::{dgram, UdpBalancer};
use mmproxy_tests::daemon::counter;
use mmproxy_tests::daemon::Daemon;
use mmproxy_tests::netns::Netns;
use mmproxy_tests::topology::*;
use mmproxy_tests::{require_root, uninterrupted, WAIT};

/// Datagrams per flow after the first (which is user space's).
const KERNEL_ROUNDS: u64 = 4;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The UDP checksum errors `ns` has counted, both families.
fn csum_errors(ns: &Netns) -> Result<u64> {
    let snmp = ns.run("cat", &["/proc/net/snmp", "/proc/net/snmp6"])?;
    let mut total = 0;
    // /proc/net/snmp: a header line of names, then a line of values.
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.windows(2) {
        let (names, values) = (pair[0], pair[1]);
        if names.starts_with("Udp: ") && values.starts_with("Udp: ") {
            let at = names.split_whitespace().position(|n| n == "InCsumErrors");
            if let Some(v) = at.and_then(|i| values.split_whitespace().nth(i)) {
                total += v.parse::<u64>()?;
            }
        }
    }
    for line in &lines {
        if let Some(v) = line.strip_prefix("Udp6InCsumErrors") {
            total += v.trim().parse::<u64>()?;
        }
    }
    Ok(total)
}

/// One datagram from the balancer at `lb` for `client`'s flow to `to`, which the
/// service `svc` must receive whole from the client, and its answer, which must
/// reach the balancer whole from `to`.
fn exchange(
    b: &UdpBalancer,
    svc: &UdpSocket,
    client: SocketAddr,
    to: SocketAddr,
    i: u64,
) -> Result<()> {
    let payload = format!("datagram {i} of {client}, odd length.");
    b.send(&dgram(client, to), payload.as_bytes(), to)?;
    let mut buf = vec![0u8; 2048];
    let (n, from) = uninterrupted(|| svc.recv_from(&mut buf))
        .with_context(|| format!("datagram {i} of {client} never reached the service"))?;
    ensure!(from == client, "the service saw {from}, not {client}");
    ensure!(&buf[..n] == payload.as_bytes(), "datagram {i} changed");
    let reply = format!("answer {i}!");
    svc.send_to(reply.as_bytes(), from)?;
    let (got, src) = b
        .recv()
        .with_context(|| format!("answer {i} to {client} never reached the balancer"))?;
    ensure!(
        src == to && got == reply.as_bytes(),
        "answer {i}: {got:?} from {src}"
    );
    Ok(())
}

#[test]
fn with_checksum_offloads_off_relayed_datagrams_and_answers_pass_the_receivers_checks() -> Result<()>
{
    require_root!();
    let t = Topology::new()?;
    for (ns, dev) in [(&t.lb, "back"), (&t.host, "eth0")] {
        ns.run("ethtool", &["-K", dev, "tx", "off", "rx", "off"])
            .with_context(|| format!("ethtool on {dev}"))?;
    }
    // A loopback service (sent through lo; answers leave by lo's egress) and one
    // on the host's own address (delivered into lo; answers leave by the default
    // route's egress), both families.
    let args = DaemonArgs::udp()
        .udp_datapath(UdpDatapath::Kernel)
        .ebpf(Ebpf::On)
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000");
    let cases = [
        (LB_V4, "198.51.100.81:8100", HOST_V4, "127.0.0.1:9000"),
        (LB_V6, "[2001:db8:c::81]:8100", HOST_V6, "[::1]:9000"),
    ];
    let d = Daemon::start(&t.host, &args)?;
    let errors = (csum_errors(&t.host)?, csum_errors(&t.lb)?);
    let start = d.stats()?;
    let mut released = counter(&start, "udp_kernel_released");
    for (lb, client, host, service) in cases {
        let svc_addr = sa(service);
        let svc = t.host.enter(move || UdpSocket::bind(svc_addr))??;
        svc.set_read_timeout(Some(WAIT))?;
        let b = UdpBalancer::new(&t, lb)?;
        let (client, to) = (sa(client), sa(&sock(host, 8443)));
        for i in 0..=KERNEL_ROUNDS {
            exchange(&b, &svc, client, to, i).with_context(|| d.log_text())?;
            if i == 0 {
                // The kernel relays once user space has ended its hold.
                released += 1;
                d.wait_counter("udp_kernel_released", released, WAIT)?;
            }
        }
    }
    let line = d.stats()?;
    let moved = |name| counter(&line, name) - counter(&start, name);
    assert_eq!(
        moved("kernel_udp_relayed_in"),
        2 * KERNEL_ROUNDS,
        "the kernel relayed all but each flow's first datagram: {line}"
    );
    assert!(
        moved("kernel_udp_relayed_out") >= 2 * KERNEL_ROUNDS,
        "the kernel relayed the answers: {line}"
    );
    assert_eq!(
        (csum_errors(&t.host)?, csum_errors(&t.lb)?),
        errors,
        "no receiver saw a bad UDP checksum"
    );
    Ok(())
}

/// The same for a service on the host's own address (placement (a)): delivered
/// into lo's ingress, its answers leaving by the default route's egress.
#[test]
fn with_checksum_offloads_off_a_service_on_the_hosts_address_gets_valid_checksums() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    for (ns, dev) in [(&t.lb, "back"), (&t.host, "eth0")] {
        ns.run("ethtool", &["-K", dev, "tx", "off", "rx", "off"])
            .with_context(|| format!("ethtool on {dev}"))?;
    }
    let args = DaemonArgs::udp()
        .udp_datapath(UdpDatapath::Kernel)
        .ebpf(Ebpf::On)
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4(sock(HOST_V4, 9000))
        .target6(sock(HOST_V6, 9000));
    let d = Daemon::start(&t.host, &args)?;
    let errors = (csum_errors(&t.host)?, csum_errors(&t.lb)?);
    let start = d.stats()?;
    let mut released = counter(&start, "udp_kernel_released");
    for (lb, client, host) in [
        (LB_V4, "198.51.100.82:8200", HOST_V4),
        (LB_V6, "[2001:db8:c::82]:8200", HOST_V6),
    ] {
        let svc_addr = sa(&sock(host, 9000));
        let svc = t.host.enter(move || UdpSocket::bind(svc_addr))??;
        svc.set_read_timeout(Some(WAIT))?;
        let b = UdpBalancer::new(&t, lb)?;
        let (client, to) = (sa(client), sa(&sock(host, 8443)));
        for i in 0..=KERNEL_ROUNDS {
            exchange(&b, &svc, client, to, i).with_context(|| d.log_text())?;
            if i == 0 {
                // The kernel relays once user space has ended its hold.
                released += 1;
                d.wait_counter("udp_kernel_released", released, WAIT)?;
            }
        }
    }
    let line = d.stats()?;
    let moved = |name| counter(&line, name) - counter(&start, name);
    assert_eq!(moved("kernel_udp_relayed_in"), 2 * KERNEL_ROUNDS, "{line}");
    assert!(
        moved("kernel_udp_relayed_out") >= 2 * KERNEL_ROUNDS,
        "{line}"
    );
    assert_eq!(
        (csum_errors(&t.host)?, csum_errors(&t.lb)?),
        errors,
        "no receiver saw a bad UDP checksum"
    );
    Ok(())
}
