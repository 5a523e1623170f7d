//! `mmproxy check`: the same validation as start-up, host probes, a table, and an
//! exit status that says whether start-up would succeed; it changes nothing.
use anyhow::Result;
use mmproxy_tests::args::{DaemonArgs, Ebpf, Mode};
use mmproxy_tests::daemon::{check, AllowedFile};
use mmproxy_tests::netns::Netns;
use mmproxy_tests::require_root;
use mmproxy_tests::topology::*;
use mmproxy_tests::unprivileged::Privileges;

fn accept_local(ns: &Netns) -> Result<String> {
    Ok(ns
        .run("cat", &["/proc/sys/net/ipv4/conf/lo/accept_local"])?
        .trim()
        .to_owned())
}

/// The row of the table that starts with `item`, whitespace squeezed.
fn row<'a>(out: &'a str, item: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(item)).collect()
}

/// A good set-up, in go-mmproxy's spellings: exit 0, and the table names the
/// kernel side, the tc interface, the sysctl with its value and the routing it
/// would add; the namespace is unchanged afterwards.
#[test]
fn good_setup_exits_zero_names_the_features_and_changes_nothing() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n{LB_V6}/128\n"))?;
    let before = t.host.rules_and_routes()?;
    let accept_before = accept_local(&t.host)?;
    // tc programs of this namespace's interfaces.
    let tc_before = t.host.run("bpftool", &["net", "show"])?;
    let args = DaemonArgs::tcp()
        .flag_raw("-l", "0.0.0.0:20000-20999")
        .flag_raw("-4", sock(HOST_V4, 9000))
        .flag_raw("-allowed-subnets", allowed.as_ref().to_string_lossy())
        .ebpf(Ebpf::On);
    let (status, out) = check(&t.host, &args)?;
    assert!(status.success(), "{out}");
    for (item, words) in [
        ("configuration", "ok"),
        ("allowed subnets", "2 subnets (1 IPv4, 1 IPv6)"),
        ("capabilities", "held: CAP_NET_ADMIN CAP_BPF CAP_PERFMON"),
        ("BPF object", "embedded"),
        ("kernel side", "port ranges steered"),
        ("tc return path", "egress on gw0"),
        ("sysctl", &format!("accept_local is {accept_before}")),
        (
            "routing table 123",
            "`ip rule fwmark 0x6d6d7078 lookup 123`",
        ),
        ("routing table 123", "would add"),
        ("listen", "ports 20000-20999"),
    ] {
        let lines = row(&out, item);
        assert!(
            lines.iter().any(|l| l.contains(words)),
            "{item}: no {words:?} in\n{out}"
        );
    }
    assert!(out.contains("start-up would succeed"), "{out}");
    assert_eq!(t.host.rules_and_routes()?, before);
    assert_eq!(accept_local(&t.host)?, accept_before);
    assert_eq!(t.host.run("bpftool", &["net", "show"])?, tc_before);
    Ok(())
}

/// A bad line in the allowed-subnets file: non-zero, naming the file and line.
#[test]
fn bad_subnets_file_fails_naming_file_and_line() -> Result<()> {
    require_root!();
    let ns = Netns::new("check")?;
    let allowed = AllowedFile::new("# balancers\n192.0.2.0/24\n192.0.2.300/32\n")?;
    let (status, out) = check(&ns, &DaemonArgs::tcp().allowed(&allowed))?;
    assert!(!status.success(), "{out}");
    let path = allowed.as_ref().to_string_lossy().into_owned();
    let fail = row(&out, "configuration");
    assert!(
        fail.iter()
            .any(|l| l.contains("FAIL") && l.contains(&format!("{path}:3"))),
        "{out}"
    );
    assert!(out.contains("start-up would fail"), "{out}");
    Ok(())
}

/// As the unit's user without CAP_BPF, with `--ebpf on`: non-zero, naming it and
/// the directive; the same under `auto` only says the kernel side stays off.
#[test]
fn missing_capability_fails_naming_it() -> Result<()> {
    require_root!();
    let ns = Netns::new("check")?;
    let without = Privileges::unit_without("CAP_BPF")?;
    let args = DaemonArgs::tcp().privileges(without.clone());
    let (status, out) = check(&ns, &args.clone().ebpf(Ebpf::On))?;
    assert!(!status.success(), "{out}");
    assert!(
        row(&out, "capabilities").iter().any(|l| l.contains("FAIL")
            && l.contains("CAP_BPF is missing")
            && l.contains("AmbientCapabilities=CAP_BPF")),
        "{out}"
    );
    let (status, out) = check(&ns, &args.ebpf(Ebpf::Auto))?;
    assert!(status.success(), "{out}");
    assert!(
        row(&out, "kernel side")
            .iter()
            .any(|l| l.contains("off") && l.contains("CAP_BPF is missing")),
        "{out}"
    );
    Ok(())
}

/// `--ebpf on` where BPF cannot load (forced, as the fallback tests do): non-zero
/// with the kernel side marked FAIL; under `auto` the fallback is reported, exit 0.
#[test]
fn ebpf_on_without_bpf_fails_and_auto_reports_the_fallback() -> Result<()> {
    require_root!();
    let ns = Netns::new("check")?;
    let args = DaemonArgs::tcp().mode(Mode::BpfFails);
    let (status, out) = check(&ns, &args.clone().ebpf(Ebpf::On))?;
    assert!(!status.success(), "{out}");
    assert!(
        row(&out, "kernel side")
            .iter()
            .any(|l| l.contains("FAIL") && l.contains("unavailable")),
        "{out}"
    );
    let (status, out) = check(&ns, &args.ebpf(Ebpf::Auto))?;
    assert!(status.success(), "{out}");
    assert!(
        row(&out, "kernel side")
            .iter()
            .any(|l| l.contains("falls back to userspace")),
        "{out}"
    );
    Ok(())
}
