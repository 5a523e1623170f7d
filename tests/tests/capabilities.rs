//! The daemon as the systemd unit runs it, without systemd: the unprivileged test
//! user holding only the unit's ambient capabilities, `NOTIFY_SOCKET` and the
//! runtime directory emulated (tests/src/unprivileged.rs). With one capability
//! taken away, start-up stops (or, for `--ebpf auto`, goes on without the kernel
//! side) with one line naming the capability and the unit directive for it.
use anyhow::{Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::proxied;
use mmproxy_tests::client::roundtrip;
use mmproxy_tests::daemon::Daemon;
use mmproxy_tests::netns::Netns;
use mmproxy_tests::topology::*;
use mmproxy_tests::unprivileged::{unit_capabilities, Privileges};
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

fn accept_local(ns: &Netns) -> Result<String> {
    Ok(ns
        .run("cat", &["/proc/sys/net/ipv4/conf/lo/accept_local"])?
        .trim()
        .to_owned())
}

/// The unit's capabilities are enough for everything at once: the kernel side with
/// tc egress steering (a target on the host's own address, so accept_local is
/// written and recorded in the runtime directory), routing, a port below 1024; the
/// notify socket sees READY=1, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1;
/// SIGTERM puts routing and accept_local back.
#[test]
fn unit_capabilities_run_the_kernel_side_and_speak_sd_notify() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, &sock(HOST_V4, 9000))?;
    let before = t.host.rules_and_routes()?;
    let accept_before = accept_local(&t.host)?;
    let allowed = mmproxy_tests::daemon::AllowedFile::new(&format!("{LB_V4}/32\n"))?;
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:443")
        .target4(sock(HOST_V4, 9000))
        .allowed(&allowed)
        .ebpf(Ebpf::On)
        .privileges(Privileges::User(unit_capabilities()?));
    // Daemon::start checks READY=1 and that the process holds exactly these
    // capabilities as the test user.
    let mut d = Daemon::start(&t.host, &args)?;
    d.wait_for("egress=gw0", WAIT)?;
    assert_eq!(accept_local(&t.host)?, "1");
    let mut c =
        proxied(&t, LB_V4, &sock(HOST_V4, 443), "198.51.100.9:53").with_context(|| d.log_text())?;
    roundtrip(&mut c, b"as the unit's user").with_context(|| d.log_text())?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:53".parse()?);
    drop(c);

    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP: reloaded", WAIT)?;
    let notify = &mut d.unprivileged().context("started unprivileged")?.notify;
    let reloading = notify.wait_for("RELOADING=1", WAIT)?;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    d.signal(libc::SIGTERM);
    let notify = &mut d.unprivileged().context("started unprivileged")?.notify;
    notify.wait_for("STOPPING=1", WAIT)?;
    assert!(d.wait_exit(WAIT)?.success(), "{}", d.log_text());
    assert_eq!(t.host.rules_and_routes()?, before);
    assert_eq!(accept_local(&t.host)?, accept_before);
    Ok(())
}

/// Each of the unit's capabilities taken away in turn, with a configuration that
/// needs it: start-up fails with one line naming it and AmbientCapabilities=, and
/// nothing was installed first.
#[test]
fn a_missing_capability_stops_start_up_with_one_line_naming_it() -> Result<()> {
    require_root!();
    let ns = Netns::new("caps")?;
    let before = ns.rules_and_routes()?;
    for (cap, args, needs) in [
        (
            "CAP_BPF",
            DaemonArgs::tcp().ebpf(Ebpf::On),
            "the kernel side (--ebpf on)",
        ),
        (
            "CAP_PERFMON",
            DaemonArgs::udp()
                .listen("0.0.0.0:20000-20099")
                .target4("127.0.0.1"),
            "the kernel side (port ranges in -l)",
        ),
        (
            "CAP_NET_ADMIN",
            DaemonArgs::tcp().ebpf(Ebpf::Off),
            "IP_TRANSPARENT",
        ),
        (
            "CAP_NET_BIND_SERVICE",
            DaemonArgs::tcp().listen("0.0.0.0:443").ebpf(Ebpf::Off),
            "listening on 0.0.0.0:443",
        ),
    ] {
        let args = args.privileges(Privileges::unit_without(cap)?);
        let mut d = Daemon::spawn(&ns, &args)?;
        let status = d.wait_exit(WAIT)?;
        let log = d.log_text();
        assert!(!status.success(), "{cap}: started anyway:\n{log}");
        let lines: Vec<_> = log.lines().filter(|l| l.contains(cap)).collect();
        assert_eq!(lines.len(), 1, "{cap}: one line naming it:\n{log}");
        for words in [
            &format!("{cap} is missing"),
            needs,
            &format!("AmbientCapabilities={cap}"),
            "CapabilityBoundingSet=",
        ] {
            assert!(
                lines[0].contains(words),
                "{cap}: no {words:?} in {}",
                lines[0]
            );
        }
        assert_eq!(ns.rules_and_routes()?, before, "{cap}: routing was touched");
    }
    Ok(())
}

/// `--ebpf auto` without CAP_BPF: as documented, it runs userspace-only, and says
/// why in one line naming the capability; proxying works.
#[test]
fn ebpf_auto_without_cap_bpf_falls_back_and_names_it() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4("127.0.0.1:9000")
        .privileges(Privileges::unit_without("CAP_BPF")?);
    let d = Daemon::start(&t.host, &args)?;
    let ready = d.wait_for(mmproxy_tests::daemon::READY, WAIT)?;
    assert!(ready.contains("ebpf=false"), "{ready}");
    let log = d.log_text();
    let lines: Vec<_> = log.lines().filter(|l| l.contains("CAP_BPF")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("CAP_BPF is missing") && lines[0].contains("AmbientCapabilities=CAP_BPF"),
        "{}",
        lines[0]
    );
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 8443), "198.51.100.9:40000")?;
    roundtrip(&mut c, b"userspace only")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:40000".parse()?);
    Ok(())
}
