//! `cargo xtask demo`: mmproxy's job in one screen. In namespaces of its own: a
//! client at a documentation address, a real HAProxy sending PROXY v1 and v2, mmproxy,
//! and a service on loopback that reports who it sees. Everything is removed at exit.
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mmproxy_tests::args::DaemonArgs;
use mmproxy_tests::client::connect_from;
use mmproxy_tests::daemon::Daemon;
use mmproxy_tests::haproxy::{Frontend, Haproxy};
use mmproxy_tests::topology::*;
use mmproxy_tests::upstream::EchoServer;

const WAIT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the demo needs root: it creates network namespaces"
    );
    let t = Topology::new()?;
    let echo = EchoServer::start_dual(&t.host, 9000)?;
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .target6("[::1]:9000");
    let _d = Daemon::start(&t.host, &args).context("starting mmproxy")?;

    let versions = [
        ("v1", "8081", "send-proxy"),
        (
            "v2",
            "8082",
            "send-proxy-v2 proxy-v2-options crc32c,unique-id",
        ),
    ];
    let mut frontends = Vec::new();
    for (_, port, opts) in versions {
        for front in [FRONT_V4, FRONT_V6] {
            frontends.push(Frontend {
                bind: bracket(front, port),
                server: format!("{HOST_V4}:8443"),
                options: opts.into(),
                source: None,
            });
        }
    }
    let _h = Haproxy::start(&t.lb, &frontends)?;

    println!();
    println!(
        "  client ─► HAProxy ({LB_V4}) ─PROXY─► mmproxy ({HOST_V4}:8443) ─► service on loopback"
    );
    println!();
    println!(
        "  {:<8} {:<34} {:<34} result",
        "PROXY", "client connected from", "service saw a connection from"
    );
    for (version, port, _) in versions {
        for (client, front) in [(CLIENT_V4, FRONT_V4), (CLIENT_V6, FRONT_V6)] {
            let mut c = connect_from(&t.client, Some(client), &bracket(front, port), WAIT)??;
            c.set_read_timeout(Some(WAIT))?;
            c.write_all(b"hello")?;
            let mut back = [0u8; 5];
            c.read_exact(&mut back)?;
            let sent = c.local_addr()?;
            let seen = echo.next_peer(WAIT)?;
            let verdict = if sent == seen { "same" } else { "DIFFERENT" };
            println!("  {version:<8} {sent:<34} {seen:<34} {verdict}");
        }
    }
    println!();
    println!("  (namespaces, HAProxy and mmproxy are removed on exit)");
    Ok(())
}

fn bracket(addr: &str, port: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}
