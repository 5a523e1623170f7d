//! The kernel side end to end: one socket for a 1,000-port range, return traffic of
//! services that are not on loopback (placements a and c of design.md), the
//! allow-list swap on SIGHUP, and the lifecycle of what is attached (links owned by
//! the process: gone after SIGTERM and after SIGKILL).
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::client::{connect_from, counter};
use mmproxy_tests::daemon::{AllowedFile, Daemon};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::privileged;
use mmproxy_tests::topology::*;
use mmproxy_tests::upstream::EchoServer;

const WAIT: Duration = Duration::from_secs(10);

fn sock(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().expect("test address"), port).to_string()
}

/// Connects as the balancer to `mm` and sends a v1 header for `client` → `mm`.
fn proxied(t: &Topology, lb_src: &str, mm: &str, client: &str) -> Result<TcpStream> {
    let mut c = connect_from(&t.lb, Some(lb_src), mm, WAIT)??;
    c.set_read_timeout(Some(WAIT))?;
    c.write_all(&encode_v1(client.parse()?, mm.parse()?))?;
    Ok(c)
}

/// mmproxy on 0.0.0.0:8443 and [::]:8443 with the kernel side required, forwarding
/// to port 9000 of `target4` / `target6`.
fn start_with_targets(t: &Topology, target4: &str, target6: &str) -> Result<Daemon> {
    Daemon::start(
        &t.host,
        &[
            "-l",
            "0.0.0.0:8443",
            "-l",
            "[::]:8443",
            "-4",
            &sock(target4, 9000),
            "-6",
            &sock(target6, 9000),
            "--ebpf",
            "on",
        ],
    )
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

fn roundtrip(c: &mut TcpStream, msg: &[u8]) -> Result<()> {
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    ensure!(back == msg, "the echo differs");
    Ok(())
}

/// Sends `len` bytes and reads them back concurrently (large enough for GSO
/// segments on the return path).
fn bulk_roundtrip(c: &mut TcpStream, len: usize) -> Result<()> {
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let mut w = c.try_clone()?;
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; len];
    c.read_exact(&mut back)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(back == data, "{len} bytes came back altered");
    Ok(())
}

// ---------------------------------------------------------------- port ranges

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
    if !privileged("port_range_of_1000_ports_uses_one_socket_per_family_and_the_headers_port") {
        return Ok(());
    }
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
    let range4 = format!("{HOST_V4}:20000-20999");
    let range6 = format!("[{HOST_V6}]:20000-20999");
    let d = Daemon::start(
        &t.host,
        &[
            "-l",
            &range4,
            "-l",
            &range6,
            "-4",
            "127.0.0.1",
            "-6",
            "[::1]",
            "--ebpf",
            "on",
            "-v",
            "2",
        ],
    )?;

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
    if !privileged("port_ranges_without_the_kernel_side_refuse_to_start") {
        return Ok(());
    }
    let t = Topology::new()?;
    for extra in [&["--ebpf", "off"][..], &["--ebpf", "auto"]] {
        let mut args = vec!["-l", "0.0.0.0:20000-20009", "-4", "127.0.0.1"];
        args.extend_from_slice(extra);
        let mut d = if extra[1] == "auto" {
            // auto must not fall back silently when ranges need the kernel.
            Daemon::spawn_env(&t.host, &args, &[("MMPROXY_TEST_FAIL_BPF", "1")])?
        } else {
            Daemon::spawn(&t.host, &args)?
        };
        let status = d.wait_exit(WAIT)?;
        assert!(!status.success(), "{extra:?} started:\n{}", d.log_text());
    }
    Ok(())
}

// ---------------------------------------------------------------- fallback

#[test]
fn forced_bpf_failure_falls_back_with_one_warning_or_stops_under_ebpf_on() -> Result<()> {
    if !privileged("forced_bpf_failure_falls_back_with_one_warning_or_stops_under_ebpf_on") {
        return Ok(());
    }
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let fail = [("MMPROXY_TEST_FAIL_BPF", "1")];
    let args = ["-l", "0.0.0.0:8443", "-4", "127.0.0.1:9000"];
    let d = Daemon::spawn_env(&t.host, &args, &fail)?;
    d.wait_for(mmproxy_tests::daemon::READY, WAIT)?;
    let log = d.log_text();
    assert_eq!(log.matches("kernel side unavailable").count(), 1, "{log}");
    assert!(
        log.contains("MMPROXY_TEST_FAIL_BPF"),
        "names the cause: {log}"
    );
    assert!(log.contains("ebpf=false"), "{log}");
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 8443), "198.51.100.9:42000")?;
    roundtrip(&mut c, b"userspace only")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:42000".parse()?);

    let on_args = ["-l", "0.0.0.0:8444", "-4", "127.0.0.1:9000", "--ebpf", "on"];
    let mut d = Daemon::spawn_env(&t.host, &on_args, &fail)?;
    let status = d.wait_exit(WAIT)?;
    assert!(!status.success(), "--ebpf on started without BPF");
    assert!(
        d.log_text().contains("loading the kernel side"),
        "{}",
        d.log_text()
    );
    Ok(())
}

// ---------------------------------------------------------------- allow-list

#[test]
fn sighup_swaps_the_kernel_policy_and_keeps_established_connections() -> Result<()> {
    if !privileged("sighup_swaps_the_kernel_policy_and_keeps_established_connections") {
        return Ok(());
    }
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed_file = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let d = Daemon::start(
        &t.host,
        &[
            "-l",
            "0.0.0.0:8443",
            "-4",
            "127.0.0.1:9000",
            "--allowed-subnets",
            &allowed_file.arg(),
            "--ebpf",
            "on",
        ],
    )?;
    let mm = sock(HOST_V4, 8443);
    let mut old = proxied(&t, LB_V4, &mm, "198.51.100.9:43000")?;
    roundtrip(&mut old, b"before")?;
    echo.next_peer(WAIT)?;
    let refused = connect_from(&t.lb, Some(LB_OTHER_V4), &mm, WAIT)?;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(ErrorKind::ConnectionRefused)
    );

    // The new file allows only the other address.
    allowed_file.replace(&format!("{LB_OTHER_V4}/32\n"))?;
    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP: reloaded", WAIT)?;
    let refused = connect_from(&t.lb, Some(LB_V4), &mm, WAIT)?;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(ErrorKind::ConnectionRefused),
        "the old address is still let in"
    );
    let mut new = proxied(&t, LB_OTHER_V4, &mm, "198.51.100.9:43001")?;
    roundtrip(&mut new, b"after")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:43001".parse()?);
    // Established before the swap, from a now-refused address: untouched.
    roundtrip(&mut old, b"still here")?;

    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_refused_v4"), 2, "{line}");
    assert_eq!(counter(&line, "tcp_accepted"), 2, "{line}");
    assert_eq!(counter(&line, "rejected_not_allowed"), 0, "{line}");
    Ok(())
}

// ---------------------------------------------------------------- return path

/// Placement (a): the target is one of the host's own, non-loopback addresses. Its
/// answers are routed towards the default route (gw0) until tc egress sends them
/// into lo.
#[test]
fn placement_a_target_on_a_local_non_loopback_address() -> Result<()> {
    if !privileged("placement_a_target_on_a_local_non_loopback_address") {
        return Ok(());
    }
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
    if !privileged("placement_c_service_in_another_namespace_behind_a_veth") {
        return Ok(());
    }
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

// ---------------------------------------------------------------- lifecycle

/// A BPF link or program held by a process, from /proc/<pid>/fdinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    link_type: Option<String>,
    prog_id: u32,
    ifindex: Option<u32>,
    attach_type: Option<String>,
}

fn held_by(pid: i32) -> Result<Vec<Held>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let Some(prog_id) = field("prog_id:").and_then(|v| v.parse().ok()) else {
            continue;
        };
        out.push(Held {
            link_type: field("link_type:"),
            prog_id,
            ifindex: field("ifindex:").and_then(|v| v.parse().ok()),
            attach_type: field("attach_type:"),
        });
    }
    out.sort();
    Ok(out)
}

fn ifindex(ns: &Netns, dev: &str) -> Result<u32> {
    let out = ns.ip_output(&["-o", "link", "show", dev])?;
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("index of {dev}: {out}"))
}

/// `"prog_id":N` of every BPF link in the system, per `bpftool link show -j`.
fn attached_prog_ids() -> Result<BTreeSet<u32>> {
    // bpftool fails when a link it has just listed goes away before it opens it
    // (other tests' daemons come and go): try again.
    let mut tries = 0;
    let out = loop {
        match mmproxy_tests::netns::output(
            std::process::Command::new("bpftool").args(["link", "show", "-j"]),
        ) {
            Ok(out) => break out,
            Err(e) if tries >= 20 => return Err(e),
            Err(_) => {
                tries += 1;
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    Ok(out
        .split("\"prog_id\":")
        .skip(1)
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect())
}

fn prog_listed(id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("mmproxy_"))
        .unwrap_or(false)
}

/// Policy rules and every route not made by the kernel itself (those come and go by
/// themselves: IPv6 link-local routes appear a moment after a link is up).
fn rules(ns: &Netns) -> Result<String> {
    let mut s = ns.ip_output(&["rule", "show"])?;
    s.push_str(&ns.ip_output(&["-6", "rule", "show"])?);
    for family in ["-4", "-6"] {
        let routes = ns.ip_output(&[family, "route", "show", "table", "all"])?;
        for line in routes.lines().filter(|l| !l.contains("proto kernel")) {
            s.push_str(line);
            s.push('\n');
        }
    }
    Ok(s)
}

fn accept_local(ns: &Netns) -> Result<String> {
    Ok(ns
        .run("cat", &["/proc/sys/net/ipv4/conf/lo/accept_local"])?
        .trim()
        .to_owned())
}

/// Waits until none of `progs` is attached through a link any more.
fn wait_detached(progs: &BTreeSet<u32>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let still: Vec<_> = attached_prog_ids()?.intersection(progs).copied().collect();
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("programs {still:?} still attached");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Everything the kernel-side daemon attaches, checked while it runs; after SIGTERM
/// none of it and none of its rules remain; after SIGKILL the programs are gone at
/// once and the rules at the next start's SIGTERM.
#[test]
fn attached_while_running_and_nothing_left_after_sigterm_or_sigkill() -> Result<()> {
    if !privileged("attached_while_running_and_nothing_left_after_sigterm_or_sigkill") {
        return Ok(());
    }
    let t = Topology::with_app()?;
    let before = rules(&t.host)?;
    let accept_before = accept_local(&t.host)?;
    // Target on a local address (egress on gw0), and --return-interface app0
    // (both directions there).
    let args = [
        "-l",
        "0.0.0.0:8443",
        "-4",
        &sock(HOST_V4, 9000),
        "--return-interface",
        "app0",
        "--ebpf",
        "on",
    ];
    let gw0 = ifindex(&t.host, "gw0")?;
    let app0 = ifindex(&t.host, "app0")?;

    let mut d = Daemon::start(&t.host, &args)?;
    let held = held_by(d.pid())?;
    let links: Vec<_> = held.iter().filter(|h| h.link_type.is_some()).collect();
    let tcx = |ifindex: u32, dir: &str| {
        links.iter().any(|h| {
            h.link_type.as_deref() == Some("tcx")
                && h.ifindex == Some(ifindex)
                && h.attach_type.as_deref().is_some_and(|a| a.contains(dir))
        })
    };
    assert!(
        links
            .iter()
            .any(|h| h.link_type.as_deref() == Some("netns")),
        "no sk_lookup link: {held:#?}"
    );
    assert!(tcx(gw0, "egress"), "no tc egress on gw0: {held:#?}");
    assert!(
        tcx(app0, "egress") && tcx(app0, "ingress"),
        "app0: {held:#?}"
    );
    let progs: BTreeSet<u32> = links.iter().map(|h| h.prog_id).collect();
    for id in &progs {
        assert!(prog_listed(*id), "bpftool prog does not list program {id}");
    }
    let attached = attached_prog_ids()?;
    assert!(
        progs.is_subset(&attached),
        "bpftool link: {attached:?} vs {progs:?}"
    );
    let during = rules(&t.host)?;
    assert!(during.contains("fwmark 0x6d6d7078 lookup 123"), "{during}");
    assert_eq!(accept_local(&t.host)?, "1");

    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT)?.success(), "{}", d.log_text());
    wait_detached(&progs)?;
    assert_eq!(rules(&t.host)?, before, "rules after SIGTERM");
    assert_eq!(accept_local(&t.host)?, accept_before);

    // SIGKILL: no clean-up code runs, yet the links die with the process.
    let mut d = Daemon::start(&t.host, &args)?;
    let progs: BTreeSet<u32> = held_by(d.pid())?
        .iter()
        .filter(|h| h.link_type.is_some())
        .map(|h| h.prog_id)
        .collect();
    assert_eq!(progs.len(), 3, "sk_lookup, tc egress, tc ingress");
    d.signal(libc::SIGKILL);
    d.wait_exit(WAIT)?;
    wait_detached(&progs)?;
    // The restart reuses the killed instance's rules (no duplicates) and its
    // SIGTERM removes them.
    let mut d = Daemon::start(&t.host, &args)?;
    assert_eq!(rules(&t.host)?, during, "restart after SIGKILL");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT)?.success());
    assert_eq!(rules(&t.host)?, before, "rules after the restart's SIGTERM");
    // The killed instance's record of accept_local outlived it: restored now.
    assert_eq!(accept_local(&t.host)?, accept_before);
    Ok(())
}

/// A TCP and a UDP instance in one namespace (as go-mmproxy deployments run them):
/// the first to stop leaves accept_local and the rules to the other, which keeps
/// steering; the last one restores everything.
#[test]
fn two_instances_share_the_return_path_and_the_last_one_restores_it() -> Result<()> {
    if !privileged("two_instances_share_the_return_path_and_the_last_one_restores_it") {
        return Ok(());
    }
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, &sock(HOST_V4, 9000))?;
    let service = udp_service(&t.host, &sock(HOST_V4, 9000))?;
    let before = rules(&t.host)?;
    let accept_before = accept_local(&t.host)?;
    let target = sock(HOST_V4, 9000);
    let mut tcp = Daemon::start(
        &t.host,
        &["-l", "0.0.0.0:8443", "-4", &target, "--ebpf", "on"],
    )?;
    let mut udp = Daemon::start(
        &t.host,
        &[
            "-p",
            "udp",
            "-l",
            "0.0.0.0:8443",
            "-4",
            &target,
            "--ebpf",
            "on",
        ],
    )?;
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 8443), "198.51.100.9:49000")?;
    roundtrip(&mut c, b"tcp")?;
    echo.next_peer(WAIT)?;
    drop(c);

    tcp.signal(libc::SIGTERM);
    assert!(tcp.wait_exit(WAIT)?.success());
    assert_eq!(
        accept_local(&t.host)?,
        "1",
        "still needed by the UDP instance"
    );
    let lb = udp_balancer(&t, LB_V4)?;
    let client = "198.51.100.9:49001";
    let got = udp_exchange(&lb, client, &sock(HOST_V4, 8443), b"udp")?;
    assert_eq!(got, Some(udp_answer(client, "udp")), "{}", udp.log_text());
    assert_eq!(udp_peer(&service)?, client.parse()?);

    udp.signal(libc::SIGTERM);
    assert!(udp.wait_exit(WAIT)?.success());
    assert_eq!(accept_local(&t.host)?, accept_before);
    assert_eq!(rules(&t.host)?, before);
    Ok(())
}

// ---------------------------------------------------------------- UDP

/// A UDP service in `ns` bound to `addr` (a wildcard included), answering every
/// datagram with `<sender>|<payload>`. Its thread ends with the namespace's sockets
/// when the test drops everything (recv times out and the channel is gone).
fn udp_service(ns: &Netns, addr: &str) -> Result<std::sync::mpsc::Receiver<SocketAddr>> {
    let addr: SocketAddr = addr.parse()?;
    let socket = ns.enter(move || std::net::UdpSocket::bind(addr))??;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                if tx.send(SocketAddr::from(([0, 0, 0, 0], 0))).is_err() {
                    return;
                }
                continue;
            };
            let mut answer = format!("{from}|").into_bytes();
            answer.extend_from_slice(buf.get(..n).unwrap_or_default());
            let _ = socket.send_to(&answer, from);
            if tx.send(from).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// The next real sender the service saw (skipping its idle ticks).
fn udp_peer(rx: &std::sync::mpsc::Receiver<SocketAddr>) -> Result<SocketAddr> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match rx.recv_timeout(WAIT) {
            Ok(a) if a.port() != 0 => return Ok(a),
            Ok(_) => continue,
            Err(e) => bail!("the UDP service saw nothing: {e}"),
        }
    }
    bail!("the UDP service saw nothing")
}

/// The balancer's UDP socket in `lb`, bound to `src`.
fn udp_balancer(t: &Topology, src: &str) -> Result<std::net::UdpSocket> {
    let bind: SocketAddr = sock(src, 0).parse()?;
    let s = t.lb.enter(move || std::net::UdpSocket::bind(bind))??;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// Sends one PROXY v2 DGRAM datagram for `client` to `mm`; the answer, if any, which
/// must come from `mm` (balancers match answers by address and port).
fn udp_exchange(
    s: &std::net::UdpSocket,
    client: &str,
    mm: &str,
    payload: &[u8],
) -> Result<Option<Vec<u8>>> {
    let (answer, from) = udp_send(s, client, mm, payload)?;
    if answer.is_some() {
        ensure!(
            from == Some(mm.parse()?),
            "answer from {from:?}, sent to {mm}"
        );
    }
    Ok(answer)
}

/// [`udp_exchange`] without the check on the answer's source.
fn udp_send(
    s: &std::net::UdpSocket,
    client: &str,
    mm: &str,
    payload: &[u8],
) -> Result<(Option<Vec<u8>>, Option<SocketAddr>)> {
    use mmproxy::proxy_protocol::{Transport, V2Builder};
    let mm: SocketAddr = mm.parse()?;
    let mut d = V2Builder::proxy(client.parse()?, mm)
        .transport(Transport::Dgram)
        .build()?;
    d.extend_from_slice(payload);
    s.send_to(&d, mm)?;
    let mut buf = vec![0u8; 65536];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Ok((Some(buf.get(..n).unwrap_or_default().to_vec()), Some(from))),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Ok((None, None))
        }
        Err(e) => Err(e.into()),
    }
}

fn udp_answer(client: &str, payload: &str) -> Vec<u8> {
    format!("{client}|{payload}").into_bytes()
}

#[test]
fn udp_disallowed_proxy_is_dropped_by_the_kernel_and_sighup_swaps_the_policy() -> Result<()> {
    if !privileged("udp_disallowed_proxy_is_dropped_by_the_kernel_and_sighup_swaps_the_policy") {
        return Ok(());
    }
    let t = Topology::new()?;
    let service = udp_service(&t.host, "127.0.0.1:9000")?;
    let allowed_file = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let d = Daemon::start(
        &t.host,
        &[
            "-p",
            "udp",
            "-l",
            "0.0.0.0:8443",
            "-4",
            "127.0.0.1:9000",
            "--allowed-subnets",
            &allowed_file.arg(),
            "--ebpf",
            "on",
        ],
    )?;
    let mm = sock(HOST_V4, 8443);
    let allowed = udp_balancer(&t, LB_V4)?;
    let other = udp_balancer(&t, LB_OTHER_V4)?;
    assert_eq!(
        udp_exchange(&other, "198.51.100.9:46000", &mm, b"x")?,
        None,
        "a refused proxy got an answer"
    );
    let got = udp_exchange(&allowed, "198.51.100.9:46001", &mm, b"ok")?;
    assert_eq!(got, Some(udp_answer("198.51.100.9:46001", "ok")));
    assert_eq!(udp_peer(&service)?, "198.51.100.9:46001".parse()?);
    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_refused_v4"), 1, "{line}");
    assert_eq!(
        counter(&line, "udp_datagrams"),
        1,
        "userspace saw only one: {line}"
    );

    allowed_file.replace(&format!("{LB_OTHER_V4}/32\n"))?;
    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP: reloaded", WAIT)?;
    assert_eq!(
        udp_exchange(&allowed, "198.51.100.9:46001", &mm, b"x")?,
        None
    );
    let got = udp_exchange(&other, "198.51.100.9:46002", &mm, b"now")?;
    assert_eq!(got, Some(udp_answer("198.51.100.9:46002", "now")));
    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_refused_v4"), 2, "{line}");
    assert_eq!(counter(&line, "udp_datagrams"), 2, "{line}");
    Ok(())
}

/// Placement (b): a UDP service bound to 0.0.0.0 answers from the address routing
/// picks for the client (gw0's), not the target's; and a port range whose wildcard
/// rule covers the client's own port must not take the answer for a proxy datagram.
#[test]
fn udp_placement_b_service_bound_to_the_wildcard_and_a_port_range() -> Result<()> {
    if !privileged("udp_placement_b_service_bound_to_the_wildcard_and_a_port_range") {
        return Ok(());
    }
    let t = Topology::new()?;
    let service = udp_service(&t.host, "0.0.0.0:9000")?;
    let d = Daemon::start(
        &t.host,
        &[
            "-p",
            "udp",
            "-l",
            "0.0.0.0:8443",
            "-l",
            "0.0.0.0:20000-20999",
            "-4",
            "127.0.0.1:9000",
            "--ebpf",
            "on",
        ],
    )?;
    let lb = udp_balancer(&t, LB_V4)?;
    for (client, mm) in [
        ("198.51.100.9:47000", sock(HOST_V4, 8443)),
        // The client's port lies inside the listened range.
        ("198.51.100.9:20600", sock(HOST_V4, 8443)),
        // The range's socket; steered like every port of the range.
        ("198.51.100.9:47001", sock(HOST_V4, 20000)),
    ] {
        let got =
            udp_exchange(&lb, client, &mm, b"b").with_context(|| format!("{client} via {mm}"))?;
        assert_eq!(
            got,
            Some(udp_answer(client, "b")),
            "{client} via {mm}\n{}",
            d.log_text()
        );
        assert_eq!(udp_peer(&service)?, client.parse()?);
    }
    // Another port of the range: the kernel steers the datagram to the range's socket
    // and the service gets it; the answer leaves from the port the balancer used
    // (udp_exchange checks the source).
    let client = "198.51.100.9:47002";
    let answer = udp_exchange(&lb, client, &sock(HOST_V4, 20999), b"b")?;
    assert_eq!(answer, Some(udp_answer(client, "b")), "{}", d.log_text());
    assert_eq!(udp_peer(&service)?, client.parse()?);
    let line = d.stats()?;
    assert!(counter(&line, "kernel_return_redirected") >= 4, "{line}");
    assert_eq!(counter(&line, "kernel_steered"), 2, "{line}");
    Ok(())
}

fn open_fds(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// A range is one socket on its first port, yet an answer to a datagram sent to any
/// port of it must come from that port (balancers match answers by address and
/// port), IPv4 and IPv6; a flow whose datagrams move to another port is answered
/// from the latest; the sockets answering from other ports never take the range's
/// datagrams, and close with their flows.
#[test]
fn udp_range_answers_leave_from_the_port_the_proxy_sent_to() -> Result<()> {
    if !privileged("udp_range_answers_leave_from_the_port_the_proxy_sent_to") {
        return Ok(());
    }
    let t = Topology::new()?;
    let service4 = udp_service(&t.host, "127.0.0.1:9000")?;
    let service6 = udp_service(&t.host, "[::1]:9000")?;
    let d = Daemon::start(
        &t.host,
        &[
            "-p",
            "udp",
            "-l",
            "0.0.0.0:20000-20999",
            "-l",
            "[::]:20000-20999",
            "-4",
            "127.0.0.1:9000",
            "-6",
            "[::1]:9000",
            "--close-after",
            "1",
            "--ebpf",
            "on",
        ],
    )?;
    let fds_before = open_fds(d.pid())?;
    let mut exchanged = 0;
    for (lb_addr, host, client_ip, service) in [
        (LB_V4, HOST_V4, CLIENT_V4, &service4),
        (LB_V6, HOST_V6, CLIENT_V6, &service6),
    ] {
        let lb = udp_balancer(&t, lb_addr)?;
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
            let got = udp_exchange(&lb, &client, &mm, payload.as_bytes())
                .with_context(|| format!("{client} via {mm}\n{}", d.log_text()))?;
            assert_eq!(
                got,
                Some(udp_answer(&client, &payload)),
                "{client} via {mm}\n{}",
                d.log_text()
            );
            assert_eq!(udp_peer(service)?, client.parse()?);
            exchanged += 1;
        }
    }
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_replies"), exchanged, "{line}");
    assert_eq!(counter(&line, "udp_datagrams"), exchanged, "{line}");
    // Idle for --close-after 1: flows close, and the reply sockets with them.
    let deadline = Instant::now() + WAIT;
    loop {
        let fds = open_fds(d.pid())?;
        if fds <= fds_before {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{fds} descriptors open, {fds_before} before the flows\n{}",
            d.stats()?
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Placements (a) and (c) for UDP: a service on the host's own address, and one in
/// the `app` namespace behind app0.
#[test]
fn udp_placements_a_and_c() -> Result<()> {
    if !privileged("udp_placements_a_and_c") {
        return Ok(());
    }
    let t = Topology::with_app()?;
    let app = t.app.as_ref().context("app namespace")?;
    for (ns, target, counter_name) in [
        (&t.host, sock(HOST_V4, 9000), "kernel_return_redirected"),
        (app, sock(APP_V4, 9000), "kernel_return_marked"),
    ] {
        let service = udp_service(ns, &target)?;
        let d = Daemon::start(
            &t.host,
            &[
                "-p",
                "udp",
                "-l",
                "0.0.0.0:8443",
                "-4",
                &target,
                "--ebpf",
                "on",
            ],
        )?;
        let lb = udp_balancer(&t, LB_V4)?;
        let client = "198.51.100.9:48000";
        let got = udp_exchange(&lb, client, &sock(HOST_V4, 8443), b"ac")?;
        assert_eq!(
            got,
            Some(udp_answer(client, "ac")),
            "{target}\n{}",
            d.log_text()
        );
        assert_eq!(udp_peer(&service)?, client.parse()?);
        let line = d.stats()?;
        assert!(counter(&line, counter_name) > 0, "{target}: {line}");
    }
    Ok(())
}

/// Without a default route nothing is steered by tc, yet sk_lookup must still tell a
/// loopback service's answer to a client port inside a wildcard range from a proxy's
/// datagram (the flow table is filled whenever the kernel side is loaded).
#[test]
fn udp_answer_to_a_client_port_inside_a_wildcard_range_without_tc_steering() -> Result<()> {
    if !privileged("udp_answer_to_a_client_port_inside_a_wildcard_range_without_tc_steering") {
        return Ok(());
    }
    let t = Topology::new()?;
    t.host.ip(&["route", "del", "default"])?;
    t.host.ip(&["-6", "route", "del", "default"])?;
    let service = udp_service(&t.host, "127.0.0.1:9000")?;
    let d = Daemon::start(
        &t.host,
        &[
            "-p",
            "udp",
            "-l",
            "0.0.0.0:20000-20999",
            "-4",
            "127.0.0.1:9000",
            "--ebpf",
            "on",
        ],
    )?;
    assert!(
        !d.log_text().contains("return path: tc"),
        "{}",
        d.log_text()
    );
    let lb = udp_balancer(&t, LB_V4)?;
    let client = "198.51.100.9:20600";
    let got = udp_exchange(&lb, client, &sock(HOST_V4, 20000), b"in range")?;
    assert_eq!(
        got,
        Some(udp_answer(client, "in range")),
        "{}",
        d.log_text()
    );
    assert_eq!(udp_peer(&service)?, client.parse()?);
    let line = d.stats()?;
    assert_eq!(counter(&line, "udp_datagrams"), 1, "{line}");
    Ok(())
}
