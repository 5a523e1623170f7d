//! The kernel side's lifecycle: what a daemon attaches while it runs, the fallback
//! when loading fails, and what is left after it stops (links are owned by the
//! process: gone after SIGTERM and after SIGKILL; the rules and sysctls restored by
//! the last instance that needed them).
use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mmproxy_tests::args::{DaemonArgs, Ebpf, Mode, FAIL_BPF_ENV};
use mmproxy_tests::balancer::{proxied, UdpBalancer};
use mmproxy_tests::client::roundtrip;
use mmproxy_tests::daemon::{Daemon, FALLBACK_WARNING};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::tcx::{attached_prog_ids, held_by};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

// ---------------------------------------------------------------- fallback

#[test]
fn forced_bpf_failure_falls_back_with_one_warning_or_stops_under_ebpf_on() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, "127.0.0.1:9000")?;
    let args = |listen| {
        DaemonArgs::tcp()
            .mode(Mode::BpfFails)
            .listen(listen)
            .target4("127.0.0.1:9000")
    };
    let d = Daemon::start(&t.host, &args("0.0.0.0:8443"))?;
    let log = d.log_text();
    assert_eq!(log.matches(FALLBACK_WARNING).count(), 1, "{log}");
    assert!(log.contains(FAIL_BPF_ENV), "names the cause: {log}");
    assert!(log.contains("ebpf=false"), "{log}");
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 8443), "198.51.100.9:42000")?;
    roundtrip(&mut c, b"userspace only")?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:42000".parse()?);

    let mut d = Daemon::spawn(&t.host, &args("0.0.0.0:8444").ebpf(Ebpf::On))?;
    let status = d.wait_exit(WAIT)?;
    assert!(!status.success(), "--ebpf on started without BPF");
    assert!(
        d.log_text().contains("loading the kernel side"),
        "{}",
        d.log_text()
    );
    Ok(())
}

// ---------------------------------------------------------------- lifecycle

fn ifindex(ns: &Netns, dev: &str) -> Result<u32> {
    let out = ns.ip_output(&["-o", "link", "show", dev])?;
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("index of {dev}: {out}"))
}

fn prog_listed(id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("mmproxy_"))
        .unwrap_or(false)
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
    require_root!();
    let t = Topology::with_app()?;
    let before = t.host.rules_and_routes()?;
    let accept_before = accept_local(&t.host)?;
    // Target on a local address (egress on gw0), and --return-interface app0
    // (both directions there).
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .target4(sock(HOST_V4, 9000))
        .return_interface("app0")
        .ebpf(Ebpf::On);
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
    let during = t.host.rules_and_routes()?;
    assert!(during.contains("fwmark 0x6d6d7078 lookup 123"), "{during}");
    assert_eq!(accept_local(&t.host)?, "1");

    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT)?.success(), "{}", d.log_text());
    wait_detached(&progs)?;
    assert_eq!(t.host.rules_and_routes()?, before, "rules after SIGTERM");
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
    assert_eq!(t.host.rules_and_routes()?, during, "restart after SIGKILL");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT)?.success());
    assert_eq!(
        t.host.rules_and_routes()?,
        before,
        "rules after the restart's SIGTERM"
    );
    // The killed instance's record of accept_local outlived it: restored now.
    assert_eq!(accept_local(&t.host)?, accept_before);
    Ok(())
}

/// A TCP and a UDP instance in one namespace (as go-mmproxy deployments run them):
/// the first to stop leaves accept_local and the rules to the other, which keeps
/// steering; the last one restores everything.
#[test]
fn two_instances_share_the_return_path_and_the_last_one_restores_it() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let echo = EchoServer::start(&t.host, &sock(HOST_V4, 9000))?;
    let service = UdpEcho::start(&t.host, &[&sock(HOST_V4, 9000)])?;
    let before = t.host.rules_and_routes()?;
    let accept_before = accept_local(&t.host)?;
    let target = sock(HOST_V4, 9000);
    let args = |protocol: DaemonArgs| {
        protocol
            .listen("0.0.0.0:8443")
            .target4(&target)
            .ebpf(Ebpf::On)
    };
    let mut tcp = Daemon::start(&t.host, &args(DaemonArgs::tcp()))?;
    let mut udp = Daemon::start(&t.host, &args(DaemonArgs::udp()))?;
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
    let lb = UdpBalancer::new(&t, LB_V4)?;
    let client = "198.51.100.9:49001";
    lb.roundtrip(client.parse()?, sock(HOST_V4, 8443).parse()?, b"udp")
        .with_context(|| udp.log_text())?;
    assert_eq!(service.next_peer(WAIT)?, client.parse()?);

    udp.signal(libc::SIGTERM);
    assert!(udp.wait_exit(WAIT)?.success());
    assert_eq!(accept_local(&t.host)?, accept_before);
    assert_eq!(t.host.rules_and_routes()?, before);
    Ok(())
}

// ---------------------------------------------------------------- SIGKILL under load

mmproxy_tests::tests_per_mode!(sigkill_under_load_then_restart_serves_at_once_and_leaves_nothing);

/// Ids of the BPF maps `pid` holds, from /proc/<pid>/fdinfo.
fn maps_held_by(pid: i32) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        out.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("map_id:"))
                .filter_map(|v| v.trim().parse::<u32>().ok()),
        );
    }
    Ok(out)
}

/// Waits until none of `maps` exists any more (the kernel frees a map once the last
/// descriptor and program using it are gone, a moment after the process).
fn wait_maps_freed(maps: &BTreeSet<u32>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let still: Vec<u32> = maps
            .iter()
            .copied()
            .filter(|id| {
                std::process::Command::new("bpftool")
                    .args(["map", "show", "id", &id.to_string()])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("maps {still:?} still exist");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The files of `ns` in the daemon's lease directory.
fn lease_files(ns: &Netns) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(format!("/run/netns/{}", ns.name()))?.ino();
    let Ok(dir) = std::fs::read_dir(mmproxy::netns_lease::DEFAULT_LOCK_DIR) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.trim_end_matches(".lock")
                .ends_with(&format!("-netns-{id}"))
        })
        .collect();
    names.sort();
    Ok(names)
}

/// A TCP and a UDP instance with connections and flows live are SIGKILLed and started
/// again: the restarted ones serve new connections and datagrams as soon as they
/// are ready, nothing of the dead ones stays attached or allocated, the rules are
/// the same (not doubled), and when the last one stops the rules, accept_local and
/// the lease files are as before the first start.
fn sigkill_under_load_then_restart_serves_at_once_and_leaves_nothing(mode: Mode) -> Result<()> {
    let t = Topology::new()?;
    // With the kernel side, a local non-loopback target: tc on gw0 and
    // accept_local. Without it, loopback (the only return path userspace has).
    let target = if mode == Mode::AsGiven {
        sock(HOST_V4, 9000)
    } else {
        "127.0.0.1:9000".to_owned()
    };
    let echo = EchoServer::start(&t.host, &target)?;
    let service = UdpEcho::start(&t.host, &[&target])?;
    let before = t.host.rules_and_routes()?;
    let accept_before = accept_local(&t.host)?;
    // Files of a namespace that is gone and had this one's id may be there; the
    // daemon's start sweeps them.
    let args = |protocol: DaemonArgs| protocol.mode(mode).listen("0.0.0.0:8443").target4(&target);
    let start = || -> Result<(Daemon, Daemon)> {
        Ok((
            Daemon::start(&t.host, &args(DaemonArgs::tcp()))?,
            Daemon::start(&t.host, &args(DaemonArgs::udp()))?,
        ))
    };
    let mm = sock(HOST_V4, 8443);
    let lb = UdpBalancer::new(&t, LB_V4)?;

    let (mut tcp, mut udp) = start()?;
    let during = t.host.rules_and_routes()?;
    let mut live = Vec::new();
    for i in 0..4 {
        let client = format!("198.51.100.9:{}", 50000 + i);
        let mut c = proxied(&t, LB_V4, &mm, &client)?;
        roundtrip(&mut c, b"before the kill")?;
        assert_eq!(echo.next_peer(WAIT)?, client.parse()?);
        live.push(c);
    }
    for i in 0..3 {
        let client = format!("198.51.100.9:{}", 51000 + i).parse()?;
        lb.roundtrip(client, mm.parse()?, b"flow before the kill")?;
        assert_eq!(service.next_peer(WAIT)?, client);
    }
    let dead_progs: BTreeSet<u32> = [tcp.pid(), udp.pid()]
        .iter()
        .map(|pid| held_by(*pid))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .filter(|h| h.link_type.is_some())
        .map(|h| h.prog_id)
        .collect();
    let mut dead_maps = maps_held_by(tcp.pid())?;
    dead_maps.extend(maps_held_by(udp.pid())?);
    if mode == Mode::AsGiven {
        assert!(!dead_progs.is_empty() && !dead_maps.is_empty());
        assert_eq!(accept_local(&t.host)?, "1");
    } else {
        assert!(dead_progs.is_empty() && dead_maps.is_empty(), "{mode:?}");
    }

    tcp.signal(libc::SIGKILL);
    udp.signal(libc::SIGKILL);
    tcp.wait_exit(WAIT)?;
    udp.wait_exit(WAIT)?;
    // Nothing of the dead instances stays attached or allocated.
    wait_detached(&dead_progs)?;
    wait_maps_freed(&dead_maps)?;
    if mode == Mode::AsGiven {
        // What the killed instances changed and could not restore: recorded.
        assert!(
            lease_files(&t.host)?.contains(&format!(
                "accept-local-netns-{}",
                std::fs::metadata(format!("/run/netns/{}", t.host.name()))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?
            )),
            "{:?}",
            lease_files(&t.host)?
        );
    }

    // Ready means serving: no retries.
    let (mut tcp, mut udp) = start()?;
    let mut c = proxied(&t, LB_V4, &mm, "198.51.100.9:50100")?;
    roundtrip(&mut c, b"after the restart").with_context(|| tcp.log_text())?;
    assert_eq!(echo.next_peer(WAIT)?, "198.51.100.9:50100".parse()?);
    for client in ["198.51.100.9:51000", "198.51.100.9:51100"] {
        let client = client.parse()?;
        lb.roundtrip(client, mm.parse()?, b"flow after the restart")
            .with_context(|| udp.log_text())?;
        assert_eq!(service.next_peer(WAIT)?, client);
    }
    assert_eq!(
        t.host.rules_and_routes()?,
        during,
        "rules after the restart"
    );
    drop((c, live));

    tcp.signal(libc::SIGTERM);
    assert!(tcp.wait_exit(WAIT)?.success(), "{}", tcp.log_text());
    if mode == Mode::AsGiven {
        assert_eq!(
            accept_local(&t.host)?,
            "1",
            "still needed by the UDP instance"
        );
    }
    udp.signal(libc::SIGTERM);
    assert!(udp.wait_exit(WAIT)?.success(), "{}", udp.log_text());
    assert_eq!(
        t.host.rules_and_routes()?,
        before,
        "rules after the last stop"
    );
    assert_eq!(
        accept_local(&t.host)?,
        accept_before,
        "accept_local after the last stop"
    );
    assert_eq!(
        lease_files(&t.host)?,
        Vec::<String>::new(),
        "lease files after the last stop"
    );
    Ok(())
}
