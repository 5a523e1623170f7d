//! The kernel side's allowed-subnet policy: sk_lookup refuses a proxy outside the
//! allowed subnets before userspace sees the connection.
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use mmproxy_tests::client::{connect_from, counter};
use mmproxy_tests::daemon::{AllowedFile, Daemon};
use mmproxy_tests::privileged;
use mmproxy_tests::topology::*;
use mmproxy_tests::upstream::EchoServer;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn kernel_refuses_disallowed_proxy_before_accept() -> Result<()> {
    if !privileged("kernel_refuses_disallowed_proxy_before_accept") {
        return Ok(());
    }
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed = AllowedFile::new(&format!("# the balancer\n{LB_V4}/32\n{LB_V6}/128\n"))?;
    let d = Daemon::start(
        &t.host,
        &[
            "-l",
            "0.0.0.0:8443",
            "-4",
            "127.0.0.1:9000",
            "-6",
            "[::1]:9000",
            "--allowed-subnets",
            &allowed.arg(),
            "--ebpf",
            "on",
            "-v",
            "2",
        ],
    )?;
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
    let mut conn = connect_from(&t.lb, Some(LB_V4), &format!("{HOST_V4}:8443"), WAIT)??;
    conn.set_read_timeout(Some(WAIT))?;
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
    if !privileged("userspace_check_still_applies_without_the_kernel_side") {
        return Ok(());
    }
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let d = Daemon::start(
        &t.host,
        &[
            "-l",
            "0.0.0.0:8443",
            "-4",
            "127.0.0.1:9000",
            "--allowed-subnets",
            &allowed.arg(),
            "--ebpf",
            "off",
        ],
    )?;
    // The kernel lets it in; userspace closes it before reading a header.
    let mut conn = connect_from(&t.lb, Some(LB_OTHER_V4), &format!("{HOST_V4}:8443"), WAIT)??;
    conn.set_read_timeout(Some(WAIT))?;
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
