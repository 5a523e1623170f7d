//! The kernel side's allowed-subnet policy: sk_lookup refuses a proxy outside the
//! allowed subnets before userspace sees the connection (a datagram: drops it), the
//! userspace check still applies without the kernel side, and SIGHUP swaps the
//! policy without touching established connections.
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{connect, proxied, UdpBalancer};
use mmproxy_tests::client::{connect_from, roundtrip};
use mmproxy_tests::daemon::{counter, AllowedFile, Daemon};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// How long a UDP test waits before it takes silence for "dropped".
const NO_ANSWER: Duration = Duration::from_secs(3);

/// `protocol` on 0.0.0.0:8443, forwarding to 127.0.0.1:9000, letting in what
/// `allowed` lists.
fn allowing(protocol: DaemonArgs, allowed: &AllowedFile, ebpf: Ebpf) -> DaemonArgs {
    protocol
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .allowed(allowed)
        .ebpf(ebpf)
}

#[test]
fn kernel_refuses_disallowed_proxy_before_accept() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed = AllowedFile::new(&format!("# the balancer\n{LB_V4}/32\n{LB_V6}/128\n"))?;
    let args = allowing(DaemonArgs::tcp(), &allowed, Ebpf::On)
        .target6("[::1]:9000")
        .verbose(2);
    let d = Daemon::start(&t.host, &args)?;
    d.wait_for("kernel side attached", WAIT)?;

    // Outside the allowed subnets: refused by the kernel, at once.
    let refused = connect_from(&t.lb, Some(LB_OTHER_V4), &format!("{HOST_V4}:8443"), WAIT)?;
    match refused {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a connection from {LB_OTHER_V4} was accepted"),
    }
    // The refusal came from the BPF program, and its aya-log event reached the log.
    d.wait_for(&format!("refused {LB_OTHER_V4}"), WAIT)
        .context("kernel-side log line")?;

    // Allowed: reaches the listener and, through it, the upstream.
    let mut conn = connect(&t, LB_V4, &sock(HOST_V4, 8443))?;
    conn.write_all(format!("PROXY TCP4 {CLIENT_V4} {HOST_V4} 40000 8443\r\nhello").as_bytes())?;
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hello");
    assert_eq!(echo.next_peer(WAIT)?, format!("{CLIENT_V4}:40000").parse()?);

    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_refused_v4"), 1, "{line}");
    // Userspace accepted only the allowed connection.
    assert_eq!(counter(&line, "tcp_accepted"), 1, "{line}");
    assert_eq!(counter(&line, "rejected_not_allowed"), 0, "{line}");
    Ok(())
}

#[test]
fn userspace_check_still_applies_without_the_kernel_side() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let args = allowing(DaemonArgs::tcp(), &allowed, Ebpf::Off);
    let d = Daemon::start(&t.host, &args)?;
    // The kernel lets it in; userspace closes it before reading a header.
    let mut conn = connect(&t, LB_OTHER_V4, &sock(HOST_V4, 8443))?;
    let _ =
        conn.write_all(format!("PROXY TCP4 {CLIENT_V4} {HOST_V4} 40001 8443\r\nhello").as_bytes());
    let mut buf = [0u8; 16];
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the refused proxy got data back");
    assert!(
        echo.try_peer().is_none(),
        "the upstream was dialled for a refused proxy"
    );
    let line = d.stats()?;
    assert_eq!(counter(&line, "rejected_not_allowed"), 1, "{line}");
    Ok(())
}

#[test]
fn sighup_swaps_the_kernel_policy_and_keeps_established_connections() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed_file = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let args = allowing(DaemonArgs::tcp(), &allowed_file, Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
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

#[test]
fn udp_disallowed_proxy_is_dropped_by_the_kernel_and_sighup_swaps_the_policy() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let service = UdpEcho::start(&t.host, &["127.0.0.1:9000"])?;
    let allowed_file = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let args = allowing(DaemonArgs::udp(), &allowed_file, Ebpf::On);
    let d = Daemon::start(&t.host, &args)?;
    let mm = sock(HOST_V4, 8443);
    let allowed = UdpBalancer::with_timeout(&t, LB_V4, NO_ANSWER)?;
    let other = UdpBalancer::with_timeout(&t, LB_OTHER_V4, NO_ANSWER)?;
    assert_eq!(
        other.exchange("198.51.100.9:46000".parse()?, mm.parse()?, b"x")?,
        None,
        "a refused proxy got an answer"
    );
    allowed.roundtrip("198.51.100.9:46001".parse()?, mm.parse()?, b"ok")?;
    assert_eq!(service.next_peer(WAIT)?, "198.51.100.9:46001".parse()?);
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
        allowed.exchange("198.51.100.9:46001".parse()?, mm.parse()?, b"x")?,
        None
    );
    other.roundtrip("198.51.100.9:46002".parse()?, mm.parse()?, b"now")?;
    let line = d.stats()?;
    assert_eq!(counter(&line, "kernel_refused_v4"), 2, "{line}");
    assert_eq!(counter(&line, "udp_datagrams"), 2, "{line}");
    Ok(())
}
