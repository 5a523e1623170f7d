//! The TCP proxy end to end: real HAProxy in front, a real upstream behind, the real
//! kernel's transparent sockets and policy routing, all in namespaces of their own.
//!
//! Every test runs in each [`Mode`]: as given (the kernel side loaded), with
//! `--ebpf off` (plain listeners, the userspace allow-list, loopback-only routing),
//! and with the BPF load forced to fail (`--ebpf auto` must fall back to userspace,
//! say so, and pass the test unchanged).
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mmproxy::proxy_protocol::{encode_v1, V2Builder};
use mmproxy_tests::args::{DaemonArgs, Mode};
use mmproxy_tests::balancer::{connect, proxied};
use mmproxy_tests::client::{connect_from, read_to_eof, roundtrip};
use mmproxy_tests::daemon::{counter, Daemon};
use mmproxy_tests::haproxy::{Frontend, Haproxy, TempDir};
use mmproxy_tests::topology::*;
use mmproxy_tests::upstream::{EchoServer, GreeterServer};
use mmproxy_tests::{tests_per_mode, WAIT};

tests_per_mode!(
    haproxy_v1_and_v2_ipv4_and_ipv6_clients_seen_by_upstream,
    header_split_byte_by_byte_and_header_with_payload_in_one_segment,
    eight_mib_each_way_arrive_intact,
    half_close_propagates_both_ways,
    local_and_unknown_connect_from_the_hosts_own_address,
    malformed_headers_are_closed_without_dialling_and_the_next_good_one_works,
    silent_and_trickling_connections_are_cut_at_the_header_timeout,
    upstream_down_closes_the_client_promptly_and_counts,
    descriptor_pressure_does_not_stop_the_daemon,
    sigterm_exits_zero_and_restores_routing_and_sigkill_restart_adds_no_duplicates,
    live_connections_keep_flowing_during_the_shutdown_grace,
    go_mmproxy_readme_invocation_works_unchanged,
);

const MM: &str = "192.0.2.2:8443";

struct Setup {
    echo: EchoServer,
    daemon: Daemon,
    t: Topology,
}

/// mmproxy on 0.0.0.0:8443 and [::]:8443 forwarding to port 9000 on loopback (both
/// families), `-v 2`, in `mode`; a test may add flags.
fn standard(mode: Mode) -> DaemonArgs {
    DaemonArgs::tcp()
        .mode(mode)
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000")
        .verbose(2)
}

/// Topology, echo upstream on loopback (port 9000, both families), mmproxy with
/// `args`.
fn setup(args: DaemonArgs) -> Result<Setup> {
    let t = Topology::new()?;
    let echo = EchoServer::start_dual(&t.host, 9000)?;
    let daemon = Daemon::start(&t.host, &args)?;
    Ok(Setup { echo, daemon, t })
}

/// Connects as the balancer (from the namespace `lb`, address LB_V4) to [`MM`].
fn as_balancer(t: &Topology) -> Result<TcpStream> {
    connect(t, LB_V4, MM)
}

fn v1(client: &str, dst: &str) -> Result<Vec<u8>> {
    Ok(encode_v1(client.parse()?, dst.parse()?))
}

fn haproxy_v1_and_v2_ipv4_and_ipv6_clients_seen_by_upstream(mode: Mode) -> Result<()> {
    let s = setup(standard(mode))?;
    let frontends = [
        ("8081", "send-proxy", MM.to_string()),
        (
            "8082",
            "send-proxy-v2 proxy-v2-options crc32c,unique-id,authority",
            MM.to_string(),
        ),
        // The balancer may also reach mmproxy over IPv6.
        (
            "8083",
            "send-proxy-v2 proxy-v2-options crc32c,unique-id",
            format!("[{HOST_V6}]:8443"),
        ),
    ];
    let fe: Vec<Frontend> = frontends
        .iter()
        .flat_map(|(port, opts, server)| {
            [FRONT_V4, FRONT_V6].map(|a| Frontend {
                bind: if a.contains(':') {
                    format!("[{a}]:{port}")
                } else {
                    format!("{a}:{port}")
                },
                server: server.clone(),
                options: opts.to_string(),
                source: None,
            })
        })
        .collect();
    let _h = Haproxy::start(&s.t.lb, &fe)?;

    for (port, opts, _) in &frontends {
        for (client, front) in [(CLIENT_V4, FRONT_V4), (CLIENT_V6, FRONT_V6)] {
            let dst = if front.contains(':') {
                format!("[{front}]:{port}")
            } else {
                format!("{front}:{port}")
            };
            let mut c = connect_from(&s.t.client, None, &dst, WAIT)??;
            c.set_read_timeout(Some(WAIT))?;
            roundtrip(&mut c, b"ping over haproxy\n")
                .with_context(|| format!("{client} via {opts} ({dst})\n{}", s.daemon.log_text()))?;
            let seen = s.echo.next_peer(WAIT)?;
            assert_eq!(
                seen,
                c.local_addr()?,
                "{opts}: the upstream must see the client's own address and port"
            );
            assert_eq!(seen.ip().to_string(), client);
        }
    }
    Ok(())
}

fn header_split_byte_by_byte_and_header_with_payload_in_one_segment(mode: Mode) -> Result<()> {
    let s = setup(standard(mode))?;
    let headers = [
        v1("198.51.100.20:1111", MM)?,
        V2Builder::proxy("198.51.100.21:2222".parse()?, MM.parse()?)
            .unique_id(b"abc")
            .crc32c()
            .build()?,
    ];
    for h in &headers {
        let mut c = as_balancer(&s.t)?;
        for b in h {
            c.write_all(&[*b])?;
            // Separate segments: the point of the test is reads that end mid-header.
            thread::sleep(Duration::from_millis(2));
        }
        roundtrip(&mut c, b"after a trickled header")?;
    }
    assert_eq!(s.echo.next_peer(WAIT)?, "198.51.100.20:1111".parse()?);
    assert_eq!(s.echo.next_peer(WAIT)?, "198.51.100.21:2222".parse()?);

    // Header and payload in one write: the payload must reach the upstream first.
    let mut c = as_balancer(&s.t)?;
    let mut seg = v1("198.51.100.22:3333", MM)?;
    seg.extend_from_slice(b"payload in the header's segment");
    c.write_all(&seg)?;
    let mut back = vec![0u8; 31];
    c.read_exact(&mut back)?;
    assert_eq!(&back, b"payload in the header's segment");
    assert_eq!(s.echo.next_peer(WAIT)?, "198.51.100.22:3333".parse()?);
    Ok(())
}

fn eight_mib_each_way_arrive_intact(mode: Mode) -> Result<()> {
    let s = setup(standard(mode))?;
    let mut c = proxied(&s.t, LB_V4, MM, "198.51.100.30:4444")?;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut writer = c.try_clone()?;
    let sent = data.clone();
    let w = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&sent)?;
        writer.shutdown(Shutdown::Write)
    });
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let back = read_to_eof(&mut c)?;
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "8 MiB came back altered");
    Ok(())
}

fn half_close_propagates_both_ways(mode: Mode) -> Result<()> {
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let greeter = GreeterServer::start(&t.host, "127.0.0.1:9001")?;
    let args = |listen, target| DaemonArgs::tcp().mode(mode).listen(listen).target4(target);
    let d1 = Daemon::start(&t.host, &args("0.0.0.0:8443", "127.0.0.1:9000"))?;
    let _d2 = Daemon::start(&t.host, &args("0.0.0.0:8444", "127.0.0.1:9001"))?;

    // Client → upstream FIN first: the echo of what was sent still comes back after it.
    let mut c = proxied(&t, LB_V4, MM, "198.51.100.40:5555")?;
    c.write_all(b"sent before FIN")?;
    c.shutdown(Shutdown::Write)?;
    assert_eq!(read_to_eof(&mut c)?, b"sent before FIN");
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.40:5555".parse()?);

    // Upstream → client FIN first: the client can still send afterwards.
    let mut c = proxied(&t, LB_V4, "192.0.2.2:8444", "198.51.100.41:5556")?;
    assert_eq!(read_to_eof(&mut c)?, GreeterServer::GREETING);
    c.write_all(b"still talking after the upstream's FIN")?;
    c.shutdown(Shutdown::Write)?;
    assert_eq!(
        greeter.next_received(WAIT)?,
        b"still talking after the upstream's FIN"
    );
    drop(d1);
    Ok(())
}

fn local_and_unknown_connect_from_the_hosts_own_address(mode: Mode) -> Result<()> {
    let s = setup(standard(mode))?;
    let headers: [Vec<u8>; 3] = [
        b"PROXY UNKNOWN\r\n".to_vec(),
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
        V2Builder::local().build()?,
    ];
    for h in headers {
        let mut c = as_balancer(&s.t)?;
        c.write_all(&h)?;
        roundtrip(&mut c, b"local")?;
        let seen = s.echo.next_peer(WAIT)?;
        assert!(
            seen.ip().is_loopback(),
            "LOCAL/UNKNOWN must come from the host's own address, saw {seen}"
        );
    }
    Ok(())
}

/// Malformed headers, one per way of breaking the PROXY protocol's rules.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("no signature", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "LF only",
            b"PROXY TCP4 198.51.100.1 192.0.2.2 1 2\n".to_vec(),
        ),
        ("PROXY then CRLF", b"PROXY \r\n".to_vec()),
        ("unknown protocol", b"PROXY SOMETHING\r\n".to_vec()),
        (
            "invalid ip",
            b"PROXY TCP4 198.51.100.300 192.0.2.2 1 2\r\n".to_vec(),
        ),
        (
            "TCP4 with IPv6",
            b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
        ),
        (
            "TCP6 with IPv4",
            b"PROXY TCP6 198.51.100.1 192.0.2.2 1 2\r\n".to_vec(),
        ),
        (
            "port 65536",
            b"PROXY TCP4 198.51.100.1 192.0.2.2 65536 2\r\n".to_vec(),
        ),
        (
            "port with sign",
            b"PROXY TCP4 198.51.100.1 192.0.2.2 +80 2\r\n".to_vec(),
        ),
        (
            "leading zero port",
            b"PROXY TCP4 198.51.100.1 192.0.2.2 080 2\r\n".to_vec(),
        ),
        (
            "leading zero octet",
            b"PROXY TCP4 198.051.100.1 192.0.2.2 80 2\r\n".to_vec(),
        ),
        (
            "double space",
            b"PROXY TCP4  198.51.100.1 192.0.2.2 80 2\r\n".to_vec(),
        ),
        (
            "trailing token",
            b"PROXY TCP4 198.51.100.1 192.0.2.2 80 2 x\r\n".to_vec(),
        ),
        ("PROXYjunk", b"PROXYjunk\r\n".to_vec()),
        (
            "lowercase",
            b"proxy tcp4 198.51.100.1 192.0.2.2 80 2\r\n".to_vec(),
        ),
        (
            "zoned ipv6",
            b"PROXY TCP6 fe80::1%eth0 2001:db8::2 80 2\r\n".to_vec(),
        ),
        ("108 bytes without CRLF", {
            let mut l = b"PROXY UNKNOWN ".to_vec();
            l.resize(108, b'x');
            l
        }),
    ];
    let sig = b"\r\n\r\n\0\r\nQUIT\n";
    let v2 = |b13: u8, b14: u8, body: &[u8]| {
        let mut h = sig.to_vec();
        h.push(b13);
        h.push(b14);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    v.push(("v2 version 1", v2(0x11, 0x11, &[0; 12])));
    v.push(("v2 invalid command", v2(0x2F, 0x11, &[0; 12])));
    v.push(("v2 invalid family", v2(0x21, 0x41, &[0; 12])));
    v.push(("v2 invalid transport", v2(0x21, 0x13, &[0; 12])));
    v.push(("v2 INET short address block", v2(0x21, 0x11, &[0; 8])));
    v.push(("v2 INET6 with IPv4-sized body", v2(0x21, 0x21, &[0; 12])));
    v.push((
        "v2 truncated TLV",
        v2(
            0x21,
            0x11,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0x00],
        ),
    ));
    v.push((
        "v2 TLV longer than header",
        v2(
            0x21,
            0x11,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0x00, 0x09, 0],
        ),
    ));
    v.push((
        "v2 DGRAM on a TCP listener",
        v2(0x21, 0x12, &[198, 51, 100, 1, 192, 0, 2, 2, 0, 80, 0, 80]),
    ));
    let client = SocketAddr::from(([198, 51, 100, 1], 80));
    let mm = SocketAddr::from(([192, 0, 2, 2], 8443));
    let mut bad_crc = V2Builder::proxy(client, mm)
        .crc32c()
        .build()
        .unwrap_or_default();
    if let Some(last) = bad_crc.last_mut() {
        *last ^= 0xff;
    }
    v.push(("v2 CRC32C mismatch", bad_crc));
    let huge = V2Builder::proxy(client, mm)
        .tlv(0xE0, &[7u8; 10 * 1024])
        .build()
        .unwrap_or_default();
    v.push(("v2 10 KiB TLV over the maximum header size", huge));
    v
}

fn malformed_headers_are_closed_without_dialling_and_the_next_good_one_works(
    mode: Mode,
) -> Result<()> {
    let s = setup(standard(mode))?;
    let cases = malformed();
    for (name, bytes) in &cases {
        assert!(!bytes.is_empty(), "{name}: empty test input");
        let mut c = as_balancer(&s.t)?;
        let _ = c.write_all(bytes);
        match read_to_eof(&mut c) {
            Ok(back) => assert!(back.is_empty(), "{name}: got data back"),
            // A reset is a close too (unread data in the daemon's buffer causes one).
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
                "{name}: {e}"
            ),
        }
        assert!(
            s.echo.try_peer().is_none(),
            "{name}: the upstream was dialled"
        );
    }
    let line = s.daemon.stats()?;
    assert_eq!(
        counter(&line, "rejected_invalid_header"),
        cases.len() as u64,
        "{line}"
    );
    assert_eq!(counter(&line, "tcp_proxied"), 0, "{line}");

    let mut c = proxied(&s.t, LB_V4, MM, "198.51.100.50:6000")?;
    roundtrip(&mut c, b"still serving")?;
    assert_eq!(s.echo.next_peer(WAIT)?, "198.51.100.50:6000".parse()?);
    Ok(())
}

fn silent_and_trickling_connections_are_cut_at_the_header_timeout(mode: Mode) -> Result<()> {
    let s = setup(standard(mode).header_timeout(2))?;
    // A silent connection.
    let mut silent = as_balancer(&s.t)?;
    // 100 slowloris connections, each with the first bytes of a valid header.
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut c = as_balancer(&s.t)?;
        c.write_all(b"PROXY TCP4 198.")?;
        slow.push(c);
    }
    // A good connection is served meanwhile.
    let mut good = proxied(&s.t, LB_V4, MM, "198.51.100.60:7000")?;
    roundtrip(&mut good, b"not starved")?;
    assert_eq!(s.echo.next_peer(WAIT)?, "198.51.100.60:7000".parse()?);

    let started = Instant::now();
    assert!(read_to_eof(&mut silent)
        .map(|b| b.is_empty())
        .unwrap_or(true));
    for c in &mut slow {
        let _ = c.write_all(b"5");
        assert!(read_to_eof(c).map(|b| b.is_empty()).unwrap_or(true));
    }
    assert!(
        started.elapsed() < WAIT,
        "connections outlived the header timeout"
    );
    let line = s.daemon.stats()?;
    assert_eq!(counter(&line, "rejected_header_timeout"), 101, "{line}");
    assert!(s.echo.try_peer().is_none());
    Ok(())
}

fn upstream_down_closes_the_client_promptly_and_counts(mode: Mode) -> Result<()> {
    let t = Topology::new()?;
    // Nothing listens on 127.0.0.1:9999.
    let args = DaemonArgs::tcp()
        .mode(mode)
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9999")
        .verbose(1);
    let d = Daemon::start(&t.host, &args)?;
    let mut c = proxied(&t, LB_V4, MM, "198.51.100.70:7100")?;
    let started = Instant::now();
    let _ = read_to_eof(&mut c);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "client kept waiting"
    );
    let line = d.stats()?;
    assert_eq!(counter(&line, "upstream_connect_failed"), 1, "{line}");
    Ok(())
}

fn descriptor_pressure_does_not_stop_the_daemon(mode: Mode) -> Result<()> {
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let args = DaemonArgs::tcp()
        .mode(mode)
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .verbose(1);
    // A low descriptor limit, set by the shell that then becomes mmproxy.
    let d = Daemon::start_shell(&t.host, "ulimit -n 64", &args)?;

    // Far more connections than descriptors: each proxied one needs two.
    let mut held = Vec::new();
    for i in 0..80u16 {
        let Ok(Ok(mut c)) = connect_from(&t.lb, Some(LB_V4), MM, WAIT) else {
            continue;
        };
        let _ = c.write_all(&v1(&format!("198.51.100.80:{}", 10000 + i), MM)?);
        held.push(c);
    }
    let line = d.stats()?;
    ensure!(
        counter(&line, "accept_errors") + counter(&line, "upstream_connect_failed") > 0,
        "no pressure was reached: {line}"
    );
    drop(held);
    while echo.try_peer().is_some() {}

    // Pressure over: the daemon serves again.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = proxied(&t, LB_V4, MM, "198.51.100.81:7200")?;
        if roundtrip(&mut c, b"back to normal").is_ok() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "daemon did not recover:\n{}",
            d.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn sigterm_exits_zero_and_restores_routing_and_sigkill_restart_adds_no_duplicates(
    mode: Mode,
) -> Result<()> {
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let before = t.host.rules_and_routes()?;
    let args = DaemonArgs::tcp()
        .mode(mode)
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000");

    let mut d = Daemon::start(&t.host, &args)?;
    let during = t.host.rules_and_routes()?;
    assert!(
        during.contains("lookup 123"),
        "no policy rule installed:\n{during}"
    );
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT)?;
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        t.host.rules_and_routes()?,
        before,
        "routing not restored after SIGTERM"
    );

    // SIGKILL leaves the rules; a restart reuses them and serves.
    let mut d = Daemon::start(&t.host, &args)?;
    d.signal(libc::SIGKILL);
    d.wait_exit(WAIT)?;
    let d = Daemon::start(&t.host, &args)?;
    assert_eq!(
        t.host.rules_and_routes()?,
        during,
        "restart after SIGKILL changed the rules"
    );
    let mut c = proxied(&t, LB_V4, MM, "198.51.100.90:7300")?;
    roundtrip(&mut c, b"after restart")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.90:7300".parse()?);
    drop(d);
    Ok(())
}

/// SIGTERM stops accepting but lets live connections finish: their answers must still
/// come back (the return-path routing stays until they end), and the daemon exits as
/// soon as the last one closes rather than at the end of the grace period.
fn live_connections_keep_flowing_during_the_shutdown_grace(mode: Mode) -> Result<()> {
    let s = setup(standard(mode).shutdown_grace(300))?;
    let mut c = proxied(&s.t, LB_V4, MM, "198.51.100.95:7350")?;
    roundtrip(&mut c, b"before SIGTERM")?;
    let mut d = s.daemon;
    d.signal(libc::SIGTERM);
    d.wait_for("stopping", WAIT)?;
    roundtrip(&mut c, b"during the grace period")
        .context("a live connection's answers were lost after SIGTERM")?;
    ensure!(
        connect(&s.t, LB_V4, MM).is_err(),
        "a new connection was accepted after SIGTERM"
    );
    drop(c);
    // Well inside the 300 s grace: the daemon leaves once its last connection ended.
    let status = d.wait_exit(WAIT)?;
    ensure!(status.success(), "exit status {status}");
    let after = s.t.host.rules_and_routes()?;
    ensure!(
        !after.contains("proto 109"),
        "routing not removed after the last connection ended:\n{after}"
    );
    Ok(())
}

fn go_mmproxy_readme_invocation_works_unchanged(mode: Mode) -> Result<()> {
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:25578")?;
    let dir = TempDir::new("prefixes")?;
    std::fs::write(dir.0.join("path-prefixes.txt"), format!("{LB_V4}/32\n"))?;
    // Exactly go-mmproxy's README example (plus `--ebpf off` in that mode), run from
    // the directory holding the file.
    let args = DaemonArgs::tcp()
        .mode(mode)
        .listen("0.0.0.0:25577")
        .target4("127.0.0.1:25578")
        .target6("[::1]:25578")
        .allowed("./path-prefixes.txt");
    let cd = format!("cd '{}'", dir.0.display());
    let _d = Daemon::start_shell(&t.host, &cd, &args)?;
    let mut c = proxied(&t, LB_V4, "192.0.2.2:25577", "198.51.100.99:7400")?;
    roundtrip(&mut c, b"drop-in")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.99:7400".parse()?);
    Ok(())
}
