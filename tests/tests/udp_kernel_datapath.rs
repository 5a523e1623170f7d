//! `--udp-datapath kernel` end to end: a flow's first datagram goes through user
//! space, the rest and their answers through the tc programs, which the tests tell
//! apart by the counters (user space's stay still, the kernel's move) and by what
//! the peers see. Each test chooses its datapath itself; the rest of the UDP suite
//! runs a second time in this datapath (`MMPROXY_TEST_UDP_DATAPATH`, xtask).
use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::{Transport, V2Builder};
use mmproxy_tests::args::{DaemonArgs, Ebpf, Mode, UdpDatapath};
use mmproxy_tests::balancer::{dgram, UdpBalancer};
use mmproxy_tests::daemon::{check, counter, AllowedFile, Daemon, READY};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::tcx::{attached_prog_ids, held_by, tcx_links};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_counts::{answers_relayed, wait_total};
use mmproxy_tests::udp_upstream::{answer, UdpEcho};
use mmproxy_tests::{require_root, uninterrupted, WAIT};

/// How long a test waits before it takes silence for "dropped".
const NO_ANSWER: Duration = Duration::from_secs(3);

/// User space's UDP counters: a datagram or answer the kernel relays moves none.
const USER_SPACE: [&str; 4] = [
    "udp_datagrams",
    "udp_datagrams_sent",
    "udp_replies",
    "udp_flows_created",
];

/// `-p udp --udp-datapath kernel --ebpf on -v 1`, for a test to add its listening
/// addresses, targets and flags to.
fn kernel() -> DaemonArgs {
    DaemonArgs::udp()
        .udp_datapath(UdpDatapath::Kernel)
        .ebpf(Ebpf::On)
        .verbose(1)
}

/// [`kernel`] on 8443 of both wildcards, forwarding to port 9000 of `target4` and
/// `target6`.
fn kernel_to(target4: &str, target6: &str) -> DaemonArgs {
    kernel()
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4(sock(target4, 9000))
        .target6(sock(target6, 9000))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn mm(host: &str) -> SocketAddr {
    sa(&sock(host, 8443))
}

/// How much `name` grew from `before` to `after`.
/// User space ended the kernel's hold on a new flow: from then on the kernel
/// relays its datagrams (before, it leaves them to user space, in order).
const RELEASED: &str = "udp_kernel_released";

/// Waits until `n` more holds than in `before` have been released.
fn released(d: &Daemon, before: &str, n: u64) -> Result<String> {
    d.wait_counter(RELEASED, counter(before, RELEASED) + n, WAIT)
}

fn delta(before: &str, after: &str, name: &str) -> u64 {
    counter(after, name).saturating_sub(counter(before, name))
}

fn assert_unchanged(before: &str, after: &str, names: &[&str]) {
    for n in names {
        assert_eq!(
            counter(before, n),
            counter(after, n),
            "{n} moved:\nbefore {before}\nafter  {after}"
        );
    }
}

/// A service the test answers for by hand: it chooses each answer (its size, or one
/// nobody asked for) and sees each datagram whole.
struct Service(UdpSocket);

impl Service {
    fn bind(ns: &Netns, addr: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse()?;
        let s = ns.enter(move || UdpSocket::bind(addr))??;
        s.set_read_timeout(Some(WAIT))?;
        Ok(Self(s))
    }

    fn recv(&self) -> Result<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        let (n, from) =
            uninterrupted(|| self.0.recv_from(&mut buf)).context("the service received nothing")?;
        buf.truncate(n);
        Ok((buf, from))
    }

    fn send_to(&self, data: &[u8], to: SocketAddr) -> Result<()> {
        self.0.send_to(data, to)?;
        Ok(())
    }
}

/// One datagram of `client`'s flow from `b` to `to` with `payload`, which the
/// service must get whole from the client; its answer `reply` must reach the
/// balancer whole from `to`.
fn exchange(
    b: &UdpBalancer,
    service: &Service,
    (client, to): (SocketAddr, SocketAddr),
    payload: &[u8],
    reply: &[u8],
) -> Result<()> {
    b.send(&dgram(client, to), payload, to)?;
    let (got, from) = service.recv()?;
    ensure!(from == client, "the service saw {from}, not {client}");
    ensure!(
        got == payload,
        "the service got {} bytes, {} sent",
        got.len(),
        payload.len()
    );
    service.send_to(reply, from)?;
    let (back, src) = b.recv().context("the answer did not reach the balancer")?;
    ensure!(
        src == to,
        "answer came from {src}, the balancer sent to {to}"
    );
    ensure!(
        back == reply,
        "the balancer got {} bytes, {} answered",
        back.len(),
        reply.len()
    );
    Ok(())
}

/// `flow` has just been closed (expired or evicted; `closed` is the stats line
/// then): the kernel has forgotten both halves. An answer nobody asked for is not
/// relayed, and the flow's next datagram goes through user space (one more
/// `udp_datagrams`, none more `kernel_udp_relayed_in`) and is answered. Returns the
/// stats line after that answer, for the caller's own counts.
fn assert_forgotten_by_the_kernel(
    d: &Daemon,
    b: &UdpBalancer,
    service: &Service,
    flow: (SocketAddr, SocketAddr),
    closed: &str,
) -> Result<String> {
    b.0.set_read_timeout(Some(NO_ANSWER))?;
    service.send_to(b"to a closed flow", flow.0)?;
    assert_eq!(b.try_recv()?, None, "a closed flow's answer was relayed");
    b.0.set_read_timeout(Some(WAIT))?;
    exchange(b, service, flow, b"again", b"new flow")?;
    let line = wait_total(
        d,
        "answers relayed",
        answers_relayed,
        answers_relayed(closed) + 1,
        WAIT,
    )?;
    assert_eq!(delta(closed, &line, "udp_datagrams"), 1, "{line}");
    // (Its answer may be the kernel's: the new flow is registered before its
    // first datagram is sent on.)
    assert_unchanged(closed, &line, &["kernel_udp_relayed_in"]);
    Ok(line)
}

/// `client`'s first datagram through `lb` to `to` (user space), then `n` more,
/// every other one with a TLV the kernel skips (ALPN, checked by framing alone): each reaches the service (`peer`
/// says whom it saw) as the client and is answered, the user-space counters stay
/// as the first one left them and the kernel's relayed counters grow by `n`.
fn first_in_user_space_then_n_in_the_kernel(
    t: &Topology,
    d: &Daemon,
    (lb, client, to): (&str, SocketAddr, SocketAddr),
    n: u64,
    peer: &dyn Fn() -> Result<SocketAddr>,
) -> Result<()> {
    let b = UdpBalancer::new(t, lb)?;
    let start = d.stats()?;
    b.roundtrip(client, to, b"first")
        .with_context(|| format!("{client} via {lb} -> {to}\n{}", d.log_text()))?;
    assert_eq!(peer()?, client, "the service must see the client");
    // The answer is counted after it is sent: wait for it.
    let base = wait_total(
        d,
        "answers relayed",
        answers_relayed,
        answers_relayed(&start) + 1,
        WAIT,
    )?;
    assert_eq!(delta(&start, &base, "udp_datagrams"), 1, "{base}");
    assert_eq!(delta(&start, &base, "udp_flows_created"), 1, "{base}");
    assert_eq!(
        delta(&start, &base, "kernel_udp_relayed_in"),
        0,
        "the first datagram is user space's: {base}"
    );
    // The kernel relays once user space has ended its hold on the new flow.
    let base = released(d, &start, 1)?;
    let tlv = V2Builder::proxy(client, to)
        .transport(Transport::Dgram)
        // 8 bytes: the header stays a whole number of words, as the kernel
        // relays only such headers (one that is not goes to user space).
        .tlv(0x01, b"dns/1")
        .build()?;
    for i in 0..n {
        let payload = format!("kernel {i}");
        if i % 2 == 0 {
            b.roundtrip(client, to, payload.as_bytes())
                .with_context(|| format!("{client}, datagram {i}\n{}", d.log_text()))?;
        } else {
            b.send(&tlv, payload.as_bytes(), to)?;
            let (got, from) = b.recv().with_context(|| format!("{client}, TLV {i}"))?;
            ensure!(from == to, "answer came from {from}");
            ensure!(got == answer(client, payload.as_bytes()), "{got:?}");
        }
        assert_eq!(peer()?, client, "datagram {i}");
    }
    let line = wait_total(
        d,
        "kernel_udp_relayed_out",
        |l| counter(l, "kernel_udp_relayed_out"),
        counter(&base, "kernel_udp_relayed_out") + n,
        WAIT,
    )?;
    assert_eq!(delta(&base, &line, "kernel_udp_relayed_in"), n, "{line}");
    assert_eq!(delta(&base, &line, "kernel_udp_relayed_out"), n, "{line}");
    assert_unchanged(&base, &line, &USER_SPACE);
    assert_unchanged(&base, &line, &["kernel_udp_punted_header"]);
    Ok(())
}

#[test]
fn after_the_first_datagram_the_kernel_relays_the_rest_and_their_answers_ipv4_and_ipv6(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = UdpEcho::start_dual(&t.host, 9000)?;
    let d = Daemon::start(&t.host, &kernel_to("127.0.0.1", "::1"))?;
    let peer = || echo.next_peer(WAIT);
    for (lb, host, client) in [
        (LB_V4, HOST_V4, "198.51.100.70:7000"),
        (LB_V6, HOST_V6, "[2001:db8:c::70]:7000"),
    ] {
        first_in_user_space_then_n_in_the_kernel(&t, &d, (lb, sa(client), mm(host)), 20, &peer)?;
    }
    Ok(())
}

/// The service on loopback, on one of the host's own non-loopback addresses, and in
/// another namespace behind a veth (the `app` namespace), each family.
#[test]
fn loopback_local_address_and_veth_peer_services_are_relayed_by_the_kernel() -> Result<()> {
    require_root!();
    let t = Topology::with_app()?;
    let app = t.app.as_ref().context("app namespace")?;
    let mut port = 7100;
    for (ns, target4, target6) in [
        (&t.host, "127.0.0.1", "::1"),
        (&t.host, HOST_V4, HOST_V6),
        (app, APP_V4, APP_V6),
    ] {
        let echo = UdpEcho::start(ns, &[&sock(target4, 9000), &sock(target6, 9000)])?;
        let d = Daemon::start(&t.host, &kernel_to(target4, target6))?;
        let peer = || echo.next_peer(WAIT);
        for (lb, host, client_ip) in [(LB_V4, HOST_V4, CLIENT_V4), (LB_V6, HOST_V6, CLIENT_V6)] {
            port += 1;
            let client = sa(&sock(client_ip, port));
            first_in_user_space_then_n_in_the_kernel(&t, &d, (lb, client, mm(host)), 6, &peer)
                .with_context(|| format!("service on {target4} / {target6}"))?;
        }
    }
    Ok(())
}

/// A live flow's balancer sends headers the kernel must not relay, all naming the
/// flow's addresses: malformed ones are dropped by user space and never reach the
/// service; a LOCAL one and one with a CRC32C TLV are handled by user space (LOCAL
/// from the host's own address, the checksummed one as the client).
#[test]
fn malformed_headers_on_a_live_flow_never_reach_the_service_local_and_crc32c_go_through_user_space(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = UdpEcho::start_dual(&t.host, 9000)?;
    let d = Daemon::start(&t.host, &kernel_to("127.0.0.1", "::1"))?;
    let b = UdpBalancer::new(&t, LB_V4)?;
    let client = sa("198.51.100.71:7100");
    let to = mm(HOST_V4);
    b.roundtrip(client, to, b"first")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"second")?;
    for _ in 0..2 {
        assert_eq!(echo.next_peer(WAIT)?, client);
    }
    let base = d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;

    let good = dgram(client, to);
    let mut bad_signature = good.clone();
    bad_signature[0] ^= 0xff;
    let mut bad_command = good.clone();
    bad_command[12] = 0x2f;
    // An address block shorter than the family's addresses (which still follow).
    let mut short_length = good.clone();
    short_length[14..16].copy_from_slice(&4u16.to_be_bytes());
    let crc = V2Builder::proxy(client, to)
        .transport(Transport::Dgram)
        .crc32c()
        .build()?;
    let mut bad_crc = crc.clone();
    if let Some(last) = bad_crc.last_mut() {
        *last ^= 0xff;
    }
    let malformed = [
        ("bad signature", bad_signature),
        ("bad command", bad_command),
        ("STREAM transport", V2Builder::proxy(client, to).build()?),
        ("short address block", short_length),
        ("bad CRC32C", bad_crc),
    ];
    for (name, header) in &malformed {
        b.send(header, b"must not arrive", to)
            .with_context(|| name.to_string())?;
    }
    let n = malformed.len() as u64;
    // User space has looked at every one.
    let line = d.wait_counter(
        "udp_dropped_invalid",
        counter(&base, "udp_dropped_invalid") + n,
        WAIT,
    )?;
    assert_eq!(delta(&base, &line, "udp_dropped_invalid"), n, "{line}");

    // LOCAL: from the host's own address, not as the client.
    b.send(&V2Builder::local().build()?, b"health", to)?;
    let (got, from) = b.recv()?;
    assert_eq!(from, to);
    assert!(got.ends_with(b"|health"), "{got:?}");
    let seen = echo.next_peer(WAIT)?;
    assert!(
        seen.ip().is_loopback(),
        "LOCAL reached the service as {seen}"
    );
    // A valid CRC32C: checked in user space, relayed as the client.
    b.send(&crc, b"checksummed", to)?;
    let (got, from) = b.recv()?;
    assert_eq!(from, to);
    assert_eq!(got, answer(client, b"checksummed"));
    assert_eq!(echo.next_peer(WAIT)?, client);
    // And the flow goes on in the kernel.
    b.roundtrip(client, to, b"after")?;
    assert_eq!(echo.next_peer(WAIT)?, client);

    let line = d.wait_counter(
        "kernel_udp_relayed_in",
        counter(&base, "kernel_udp_relayed_in") + 1,
        WAIT,
    )?;
    assert!(
        echo.take_peers().is_empty(),
        "a malformed datagram reached the service"
    );
    assert_eq!(
        delta(&base, &line, "kernel_udp_punted_header"),
        n + 2,
        "{line}"
    );
    assert_eq!(delta(&base, &line, "kernel_udp_relayed_in"), 1, "{line}");
    assert_eq!(delta(&base, &line, "udp_dropped_invalid"), n, "{line}");
    assert_eq!(delta(&base, &line, "udp_datagrams"), n + 2, "{line}");
    assert_eq!(delta(&base, &line, "udp_datagrams_sent"), 2, "{line}");
    Ok(())
}

/// Kernel-relayed traffic keeps a flow alive past `--close-after` (datagrams with
/// answers, then answers alone); idle, the flow expires and both halves go: an
/// answer nobody asked for is no longer relayed, and the next datagram opens a new
/// flow in user space.
#[test]
fn an_idle_flow_expires_after_close_after_in_both_directions_and_kernel_traffic_keeps_it_alive(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let service = Service::bind(&t.host, "127.0.0.1:9000")?;
    let args = kernel()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .close_after(2);
    let d = Daemon::start(&t.host, &args)?;
    let b = UdpBalancer::new(&t, LB_V4)?;
    let flow = (sa("198.51.100.72:7200"), mm(HOST_V4));
    exchange(&b, &service, flow, b"first", b"answer")?;
    wait_total(&d, "answers relayed", answers_relayed, 1, WAIT)?;
    let base = d.wait_counter(RELEASED, 1, WAIT)?;

    // Two and a half times --close-after of each kind of traffic.
    let pace = Duration::from_millis(200);
    let rounds = 25;
    for i in 0..rounds {
        exchange(&b, &service, flow, b"kept", format!("alive {i}").as_bytes())
            .with_context(|| format!("round {i}\n{}", d.log_text()))?;
        thread::sleep(pace);
    }
    for i in 0..rounds {
        let reply = format!("unasked {i}");
        service.send_to(reply.as_bytes(), flow.0)?;
        let (got, from) = b
            .recv()
            .with_context(|| format!("answer {i}\n{}", d.log_text()))?;
        assert_eq!((got.as_slice(), from), (reply.as_bytes(), flow.1));
        thread::sleep(pace);
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_flows_expired"), 0, "{line}");
    assert_unchanged(&base, &line, &USER_SPACE);
    assert_eq!(
        delta(&base, &line, "kernel_udp_relayed_in"),
        rounds,
        "{line}"
    );
    assert_eq!(
        delta(&base, &line, "kernel_udp_relayed_out"),
        2 * rounds,
        "{line}"
    );

    let expired = d.wait_counter("udp_flows_expired", 1, WAIT)?;
    let line = assert_forgotten_by_the_kernel(&d, &b, &service, flow, &expired)?;
    assert_eq!(counter(&line, "udp_flows_created"), 2, "{line}");
    Ok(())
}

/// At `--max-flows 1` a second client's flow evicts the first, and the kernel
/// forgets both of its halves: its answers are no longer relayed and its next
/// datagram is user space's again.
#[test]
fn eviction_at_max_flows_removes_both_halves_from_the_kernel() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let service = Service::bind(&t.host, "127.0.0.1:9000")?;
    let args = kernel()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .max_flows(1);
    let d = Daemon::start(&t.host, &args)?;
    let to = mm(HOST_V4);
    let (ba, bb) = (UdpBalancer::new(&t, LB_V4)?, UdpBalancer::new(&t, LB_V4)?);
    let a = (sa("198.51.100.73:7300"), to);
    let b = (sa("198.51.100.74:7400"), to);
    exchange(&ba, &service, a, b"a first", b"a1")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    exchange(&ba, &service, a, b"a in the kernel", b"a2")?;
    d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;
    exchange(&bb, &service, b, b"b first", b"b1")?;
    let evicted = d.wait_counter("udp_flows_evicted", 1, WAIT)?;
    assert_eq!(counter(&evicted, "udp_flows_created"), 2, "{evicted}");

    let line = assert_forgotten_by_the_kernel(&d, &ba, &service, a, &evicted)?;
    assert_eq!(counter(&line, "udp_flows_created"), 3, "{line}");
    assert_eq!(counter(&line, "udp_flows_evicted"), 2, "{line}");
    Ok(())
}

/// A daemon relaying a flow in the kernel is SIGKILLed: no program of it stays on
/// any interface, and a restarted one relays again (first datagram in user space,
/// the next in the kernel).
#[test]
fn sigkill_leaves_no_relay_program_attached_and_a_restart_relays_again() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = UdpEcho::start_dual(&t.host, 9000)?;
    let args = kernel_to("127.0.0.1", "::1");
    let b = UdpBalancer::new(&t, LB_V4)?;
    let client = sa("198.51.100.75:7500");
    let to = mm(HOST_V4);
    let mut d = Daemon::start(&t.host, &args)?;
    b.roundtrip(client, to, b"first")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"kernel")?;
    d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;
    let links = tcx_links(d.pid(), &t.host)?;
    for want in [("eth0", "ingress"), ("lo", "egress")] {
        assert!(
            links.contains(&(want.0.to_owned(), want.1)),
            "no {want:?} link: {links:?}"
        );
    }
    let progs: BTreeSet<u32> = held_by(d.pid())?
        .iter()
        .filter(|h| h.link_type.is_some())
        .map(|h| h.prog_id)
        .collect();
    assert!(!progs.is_empty(), "no BPF link held");
    let attached = attached_prog_ids()?;
    assert!(progs.is_subset(&attached), "{progs:?} vs {attached:?}");

    d.signal(libc::SIGKILL);
    d.wait_exit(WAIT)?;
    let deadline = Instant::now() + WAIT;
    loop {
        let still: Vec<u32> = attached_prog_ids()?.intersection(&progs).copied().collect();
        if still.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("programs {still:?} still attached after SIGKILL");
        }
        thread::sleep(Duration::from_millis(50));
    }

    let d = Daemon::start(&t.host, &args)?;
    b.roundtrip(client, to, b"after the restart")
        .with_context(|| d.log_text())?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"kernel again")
        .with_context(|| d.log_text())?;
    for _ in 0..4 {
        assert_eq!(echo.next_peer(WAIT)?, client);
    }
    let line = d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;
    assert_eq!(counter(&line, "udp_datagrams"), 1, "{line}");
    assert_eq!(counter(&line, "kernel_udp_relayed_in"), 1, "{line}");
    Ok(())
}

/// The balancer link's MTU (1500): the largest datagram that fits it and the
/// largest answer that fits it are relayed by the kernel, each family; an answer
/// one byte larger (the service on lo, MTU 65536, can send it) does not fit after
/// rewriting, so the kernel leaves it to user space, which still delivers it.
#[test]
fn datagrams_and_answers_at_the_balancer_links_mtu_are_relayed_and_a_larger_answer_goes_through_user_space(
) -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    t.lb.ip(&["link", "set", "back", "mtu", "1500"])?;
    t.host.ip(&["link", "set", "eth0", "mtu", "1500"])?;
    let service4 = Service::bind(&t.host, "127.0.0.1:9000")?;
    let service6 = Service::bind(&t.host, "[::1]:9000")?;
    let d = Daemon::start(&t.host, &kernel_to("127.0.0.1", "::1"))?;
    for (lb, host, client, ip_header, service) in [
        (LB_V4, HOST_V4, "198.51.100.76:7600", 20, &service4),
        (LB_V6, HOST_V6, "[2001:db8:c::76]:7600", 40, &service6),
    ] {
        let b = UdpBalancer::new(&t, lb)?;
        let flow = (sa(client), mm(host));
        let largest_in = 1500 - ip_header - 8 - dgram(flow.0, flow.1).len();
        let largest_out = 1500 - ip_header - 8;
        let start = d.stats()?;
        exchange(&b, service, flow, b"first", b"small")?;
        wait_total(
            &d,
            "answers relayed",
            answers_relayed,
            answers_relayed(&start) + 1,
            WAIT,
        )?;
        let base = released(&d, &start, 1)?;

        exchange(
            &b,
            service,
            flow,
            &vec![b'i'; largest_in],
            &vec![b'o'; largest_out],
        )
        .with_context(|| format!("{client}: {largest_in} in, {largest_out} out"))?;
        let line = d.wait_counter(
            "kernel_udp_relayed_out",
            counter(&base, "kernel_udp_relayed_out") + 1,
            WAIT,
        )?;
        assert_eq!(delta(&base, &line, "kernel_udp_relayed_in"), 1, "{line}");
        assert_eq!(delta(&base, &line, "kernel_udp_relayed_out"), 1, "{line}");
        assert_unchanged(&base, &line, &USER_SPACE);
        assert_unchanged(&base, &line, &["kernel_udp_punted_mtu"]);

        exchange(&b, service, flow, b"small", &vec![b'x'; largest_out + 1])
            .with_context(|| format!("{client}: an answer of {} bytes", largest_out + 1))?;
        let after = d.wait_counter("udp_replies", counter(&line, "udp_replies") + 1, WAIT)?;
        assert_eq!(delta(&line, &after, "kernel_udp_punted_mtu"), 1, "{after}");
        assert_eq!(delta(&line, &after, "udp_replies"), 1, "{after}");
        assert_eq!(delta(&line, &after, "kernel_udp_relayed_in"), 1, "{after}");
        assert_unchanged(&line, &after, &["kernel_udp_relayed_out"]);
    }
    Ok(())
}

/// `--udp-datapath kernel` where it cannot work stops start-up: with `--ebpf off`
/// and with TCP in one line naming the flag; under `--ebpf auto` when BPF does not
/// load it does not fall back to sockets silently.
#[test]
fn udp_datapath_kernel_without_the_kernel_side_or_with_tcp_is_refused_in_one_line() -> Result<()> {
    require_root!();
    let ns = Netns::new("datapath")?;
    for (args, names_flag) in [
        (kernel().ebpf(Ebpf::Off), true),
        (
            DaemonArgs::tcp()
                .udp_datapath(UdpDatapath::Kernel)
                .ebpf(Ebpf::On),
            true,
        ),
        (kernel().ebpf(Ebpf::Auto).mode(Mode::BpfFails), false),
    ] {
        let args = args.listen("0.0.0.0:8443").target4("127.0.0.1:9000");
        let mut d = Daemon::spawn(&ns, &args)?;
        let status = d.wait_exit(WAIT)?;
        let log = d.log_text();
        assert!(!status.success(), "{args:?} started:\n{log}");
        assert!(!log.contains(READY), "{args:?}:\n{log}");
        if names_flag {
            let lines = log.lines().filter(|l| l.contains("--udp-datapath")).count();
            assert_eq!(lines, 1, "{args:?}: one line naming the flag:\n{log}");
        }
    }
    Ok(())
}

/// `mmproxy check` says which datapath UDP would use, and fails where start-up
/// would refuse it.
#[test]
fn check_shows_the_udp_datapath_and_fails_where_start_up_would() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let args = kernel().listen("0.0.0.0:8443").target4("127.0.0.1:9000");
    let (status, out) = check(&t.host, &args)?;
    assert!(status.success(), "{out}");
    assert!(
        out.lines().any(|l| {
            let l = l.to_lowercase();
            l.contains("datapath") && l.contains("kernel")
        }),
        "no datapath row naming the kernel:\n{out}"
    );
    let (status, out) = check(&t.host, &args.ebpf(Ebpf::Off))?;
    assert!(!status.success(), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("FAIL") && l.contains("--udp-datapath")),
        "{out}"
    );
    Ok(())
}

/// A flow relayed by the kernel from a balancer that a SIGHUP takes out of the
/// allowed subnets: its very next datagram is neither relayed nor let in, while the
/// address still allowed is served.
#[test]
fn narrowing_the_allowlist_with_sighup_stops_a_kernel_relayed_flow_at_once() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let allowed = AllowedFile::new("192.0.2.0/24\n")?;
    let args = kernel()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .allowed(&allowed);
    let d = Daemon::start(&t.host, &args)?;
    let to = mm(HOST_V4);
    let b = UdpBalancer::with_timeout(&t, LB_V4, NO_ANSWER)?;
    let client = sa("198.51.100.77:7700");
    b.roundtrip(client, to, b"first")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"kernel")?;
    for _ in 0..2 {
        assert_eq!(echo.next_peer(WAIT)?, client);
    }
    let base = d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;

    allowed.replace(&format!("{LB_OTHER_V4}/32\n"))?;
    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP: reloaded", WAIT)?;
    assert_eq!(
        b.exchange(client, to, b"after the reload")?,
        None,
        "a flow from a balancer no longer allowed was answered"
    );
    let line = d.wait_counter(
        "kernel_udp_punted_not_allowed",
        counter(&base, "kernel_udp_punted_not_allowed") + 1,
        WAIT,
    )?;
    assert!(
        echo.take_peers().is_empty(),
        "the datagram reached the service"
    );
    assert_eq!(delta(&base, &line, "kernel_refused_v4"), 1, "{line}");
    assert_unchanged(&base, &line, &["kernel_udp_relayed_in", "udp_datagrams"]);

    let other = UdpBalancer::new(&t, LB_OTHER_V4)?;
    other.roundtrip(sa("198.51.100.78:7800"), to, b"allowed")?;
    assert_eq!(echo.next_peer(WAIT)?, sa("198.51.100.78:7800"));
    Ok(())
}

/// A flow from a proxy this host has no neighbour entry for (the balancer knows
/// the host's address from another of its addresses, so it never asks): the
/// first answer, relayed by the kernel, waits for the proxy's address to be
/// resolved and still arrives. The kernel may name the answers' next hop only
/// for a resolved neighbour; an answer queued for resolution would be re-sent
/// along the route it carries from `lo` and lost.
#[test]
fn the_first_answer_to_a_proxy_the_host_has_not_resolved_arrives() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let args = kernel().listen("0.0.0.0:8443").target4("127.0.0.1:9000");
    let d = Daemon::start(&t.host, &args)?;
    let to = mm(HOST_V4);
    // The balancer resolves the host, and the host the balancer's first address.
    UdpBalancer::new(&t, LB_V4)?.roundtrip(sa("198.51.100.77:7700"), to, b"resolve")?;
    let before = d.wait_counter("kernel_udp_relayed_out", 1, WAIT)?;
    forget_neighbour(&t, LB_OTHER_V4)?;

    let other = UdpBalancer::new(&t, LB_OTHER_V4)?;
    other
        .roundtrip(sa("198.51.100.78:7800"), to, b"first")
        .with_context(|| d.log_text())?;
    assert_one_answer_relayed_by_the_kernel(&d, &before)
}

/// The host forgets its neighbour entry for `addr` on `eth0`, and is checked to.
fn forget_neighbour(t: &Topology, addr: &str) -> Result<()> {
    t.host.ip(&["neigh", "flush", "to", addr, "dev", "eth0"])?;
    let known = t
        .host
        .ip_output(&["neigh", "show", "to", addr, "dev", "eth0"])?;
    ensure!(known.trim().is_empty(), "the host knows {addr}: {known}");
    Ok(())
}

/// Since the stats line `before`, one answer went the kernel's way and none user
/// space's.
fn assert_one_answer_relayed_by_the_kernel(d: &Daemon, before: &str) -> Result<()> {
    let after = d.stats()?;
    assert_eq!(
        delta(before, &after, "kernel_udp_relayed_out"),
        1,
        "{after}"
    );
    assert_eq!(delta(before, &after, "udp_replies"), 0, "{after}");
    Ok(())
}

/// The host's routes change while a flow's answers are relayed with their next hop
/// (the balancer's address, resolved when the flow was handed over): the kernel
/// stops using that next hop (`Config::route_epoch`) and routes each answer again,
/// so an answer still arrives after the balancer's neighbour entry is gone. With
/// the old next hop, the answer waiting for the neighbour's resolution would be
/// re-sent along `lo`'s route and lost.
#[test]
fn after_a_route_change_answers_are_routed_again_and_survive_a_lost_neighbour() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let args = kernel().listen("0.0.0.0:8443").target4("127.0.0.1:9000");
    let d = Daemon::start(&t.host, &args)?;
    let (client, to) = (sa("198.51.100.79:7900"), mm(HOST_V4));
    let b = UdpBalancer::new(&t, LB_V4)?;
    b.roundtrip(client, to, b"first")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"kernel")?;
    let before = d.wait_counter("kernel_udp_relayed_out", 1, WAIT)?;

    // A route no flow uses: the host's network changed all the same.
    t.host
        .ip(&["route", "add", "blackhole", "203.0.113.250/32"])?;
    d.wait_counter(
        "return_path_evaluations",
        counter(&before, "return_path_evaluations") + 1,
        WAIT,
    )?;
    forget_neighbour(&t, LB_V4)?;

    b.roundtrip(client, to, b"after the change")
        .with_context(|| d.log_text())?;
    // Still the kernel's: relayed without its next hop, not handed back.
    assert_one_answer_relayed_by_the_kernel(&d, &before)
}

/// A container's veth is deleted and made again while a flow to its service is
/// relayed by the kernel (the new veth has another interface index): the flow's
/// datagrams are not lost to the old index. The kernel leaves them to user space,
/// which relays them over the new veth and hands the flow to the kernel again with
/// the new route, and the kernel relays it from then on.
#[test]
fn a_relayed_flow_follows_its_services_veth_when_it_is_made_again() -> Result<()> {
    require_root!();
    let t = Topology::with_app()?;
    let app = t.app.as_ref().context("app namespace")?;
    let echo = UdpEcho::start(app, &[&sock(APP_V4, 9000)])?;
    let d = Daemon::start(&t.host, &kernel_to(APP_V4, APP_V6))?;
    let b = UdpBalancer::new(&t, LB_V4)?;
    let (client, to) = (sa("198.51.100.78:7800"), mm(HOST_V4));
    b.roundtrip(client, to, b"first")?;
    d.wait_counter(RELEASED, 1, WAIT)?;
    b.roundtrip(client, to, b"kernel")?;
    let before = d.wait_counter("kernel_udp_relayed_in", 1, WAIT)?;
    for _ in 0..2 {
        assert_eq!(echo.next_peer(WAIT)?, client);
    }

    t.host.ip(&["link", "del", "app0"])?;
    t.host.link("app0", app, "eth0")?;
    t.host.addr("app0", &format!("{APP_GW_V4}/25"))?;
    app.addr("eth0", &format!("{APP_V4}/25"))?;
    app.ip(&["route", "add", "default", "via", APP_GW_V4])?;
    // The answers of a service behind a veth need its tc ingress program.
    let deadline = Instant::now() + WAIT;
    while !tcx_links(d.pid(), &t.host)?.contains(&("app0".to_owned(), "ingress")) {
        ensure!(
            Instant::now() < deadline,
            "app0 never got its ingress program\n{}",
            d.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }

    // Through user space, until the flow is handed over again (the daemon offers
    // a flow whose datagrams reach it anyway at most once a second).
    let deadline = Instant::now() + WAIT;
    let line = loop {
        b.roundtrip(client, to, b"over the new veth")
            .with_context(|| d.log_text())?;
        assert_eq!(echo.next_peer(WAIT)?, client);
        let line = d.stats()?;
        if delta(&before, &line, RELEASED) > 0 {
            break line;
        }
        ensure!(Instant::now() < deadline, "never handed over again: {line}");
        thread::sleep(Duration::from_millis(50));
    };
    b.roundtrip(client, to, b"in the kernel again")
        .with_context(|| d.log_text())?;
    let after = d.wait_counter(
        "kernel_udp_relayed_in",
        counter(&line, "kernel_udp_relayed_in") + 1,
        WAIT,
    )?;
    assert_eq!(echo.next_peer(WAIT)?, client);
    assert_eq!(delta(&before, &after, "udp_flows_created"), 0, "{after}");
    assert_eq!(counter(&after, "kernel_udp_relay_failed"), 0, "{after}");
    Ok(())
}
