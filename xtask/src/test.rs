//! `cargo xtask test`: the whole suite, in order, stopping at the first failure.
use std::process::Command;

use anyhow::Result;

use crate::compile::{self, host_env};
use crate::util::{build_path, cargo, output, run, step, succeeds};

/// The end-to-end tests run a second time with the daemon started as the systemd
/// unit would start it (tests/src/unprivileged.rs): TCP v1/v2 over IPv4 and IPv6 in
/// every mode, UDP, the kernel allowlist (with a reload), a port range (TCP and
/// UDP), each return-path placement, and the clean-up of routing and accept_local.
const UNPRIVILEGED_TESTS: &[&str] = &[
    "haproxy_v1_and_v2_ipv4_and_ipv6_clients_seen_by_upstream",
    "ipv4_and_ipv6_clients_through_ipv4_and_ipv6_proxy_sockets",
    "kernel_refuses_disallowed_proxy_before_accept",
    "sighup_swaps_the_kernel_policy",
    "udp_disallowed_proxy_is_dropped_by_the_kernel",
    "port_range_of_1000_ports",
    "udp_range_answers_leave_from_the_port",
    "placement",
    "attached_while_running_and_nothing_left",
    "two_instances_share_the_return_path",
];

/// The UDP end-to-end tests run once more with `--udp-datapath kernel` on every
/// `-p udp` daemon that has the kernel side (MMPROXY_TEST_UDP_DATAPATH=kernel,
/// tests/src/args.rs), with the same assertions: every test that starts a UDP
/// daemon with the kernel side on. (udp_kernel_datapath.rs chooses its datapath
/// itself and runs in the first pass.)
const UDP_TESTS: &[&str] = &[
    "ipv4_and_ipv6_clients_through_ipv4_and_ipv6_proxy_sockets_answered_from",
    "thousand_clients_each_answered_and_idle_expiry",
    "full_flow_table_evicts_the_least_recently_used",
    "burst_of_malformed_datagrams_is_dropped",
    "go_mmproxy_udp_invocation_works_unchanged",
    "service_on_a_wildcard_answering_from_another_address",
    "a_burst_of_one_flow_arrives_as_separate_datagrams",
    "udp_placement_b_service_bound_to_the_wildcard",
    "udp_placements_a_and_c",
    "udp_answer_to_a_client_port_inside_a_wildcard_range",
    "udp_range_answers_leave_from_the_port",
    "udp_disallowed_proxy_is_dropped_by_the_kernel",
    "two_instances_share_the_return_path",
    "as_given::sigkill_under_load_then_restart",
    "udp_a_default_route_added_after_start_up",
    "udp_descriptor_exhaustion_is_logged",
    "at_max_flows_two_hundred_clients",
    "dynamic_destination_udp_goes_where_the_header_says",
    "udp_mix_gives_exact_series",
    "upstream_connections_reach_the_service_not_mmproxy",
    "udp_flow_answered_across_upgrades",
    "a_target_on_mmproxys_own_socket_refuses_to_start",
    "a_missing_capability_stops_start_up_with_one_line_naming_it",
];

/// Prefix of every network namespace the end-to-end tests create (tests/src/netns.rs).
const NETNS_PREFIX: &str = "mmpt-";

pub fn run_all(no_fuzz: bool, filter: Option<&str>) -> Result<()> {
    crate::setup::all(crate::setup::Needs::Test)?;

    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;

    step("promtool: the example alert rules parse and fire as their tests say");
    // Paths from the workspace root, where `run` starts every command.
    run(Command::new("promtool").args([
        "check",
        "rules",
        "packaging/prometheus/mmproxy-alerts.yml",
    ]))?;
    run(Command::new("promtool").args([
        "test",
        "rules",
        "packaging/prometheus/mmproxy-alerts.test.yml",
    ]))?;

    step("cargo clippy -D warnings (host crates)");
    run(host_env(cargo().args([
        "clippy",
        "--quiet",
        "--release",
        "--workspace",
        "--exclude",
        "mmproxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])))?;

    if filter.is_none() {
        // Offline: the advisory database cannot be fetched here (see deny.toml).
        step("cargo deny check licenses bans sources");
        run(cargo()
            .args(["deny", "--locked", "check", "licenses", "bans", "sources"])
            .env("PATH", build_path()))?;
    }

    step("building the BPF object and the daemon");
    compile::daemon()?;

    step("unit tests");
    let mut unit = cargo();
    unit.args(["test", "--release", "--workspace"]).args([
        "--exclude",
        "mmproxy-ebpf",
        "--exclude",
        "mmproxy-tests",
    ]);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    run(host_env(&mut unit))?;

    if filter.is_none() {
        step("the package: cargo xtask dist's artefacts, then lintian and systemd-analyze");
        let deb = crate::dist::package()?;
        crate::dist::check(&deb)?;
    }

    step("end-to-end tests (network namespaces, real kernel, real HAProxy)");
    remove_stale_namespaces();
    let leases_before = lease_files();
    let mut e2e = cargo();
    e2e.args(["test", "--release", "-p", "mmproxy-tests", "--"])
        .args(["--test-threads", "2"])
        .env("MMPROXY_BIN", compile::daemon_binary());
    if let Some(f) = filter {
        e2e.arg(f);
    }
    let result = run(host_env(&mut e2e));
    // Tests remove their namespaces on drop; this catches a test process that was
    // killed before it could.
    remove_stale_namespaces();
    result?;
    step("the end-to-end tests left /run/mmproxy as they found it");
    check_no_lease_left(&leases_before)?;

    if filter.is_none() {
        step("end-to-end tests again, the daemon as an unprivileged user with the unit's capabilities");
        let mut unprivileged = cargo();
        unprivileged
            .args(["test", "--release", "-p", "mmproxy-tests", "--"])
            .args(["--test-threads", "2"])
            .args(UNPRIVILEGED_TESTS)
            .env("MMPROXY_BIN", compile::daemon_binary())
            .env("MMPROXY_TEST_UNPRIVILEGED", "1");
        let result = run(host_env(&mut unprivileged));
        remove_stale_namespaces();
        result?;
    }

    if filter.is_none() {
        step("UDP end-to-end tests again, established flows relayed by the kernel (--udp-datapath kernel)");
        let mut kernel = cargo();
        kernel
            .args(["test", "--release", "-p", "mmproxy-tests", "--"])
            .args(["--test-threads", "2"])
            .args(UDP_TESTS)
            .env("MMPROXY_BIN", compile::daemon_binary())
            .env("MMPROXY_TEST_UDP_DATAPATH", "kernel");
        let result = run(host_env(&mut kernel));
        remove_stale_namespaces();
        result?;
    }

    if filter.is_none() {
        // Only that the harness works end to end; no timing is judged.
        step("benchmark smoke run (cargo xtask bench --quick)");
        crate::bench::runner(&crate::bench::Args {
            quick: true,
            peers: Vec::new(),
            extra: Vec::new(),
        })?;

        // Bytes, counters, memory and descriptors under mixed good and hostile load
        // (RELIABILITY.md); fails on any check.
        step("soak, 2 minutes (cargo xtask soak --minutes 2)");
        crate::soak::runner(&crate::soak::Args {
            minutes: 2.0,
            extra: Vec::new(),
        })?;
    }

    if !no_fuzz {
        // About 90 s in all: each target briefly, from its seed corpus.
        let each = 90 / crate::fuzz::TARGETS.len() as u64;
        step(&format!("fuzzing each target for {each} s"));
        crate::fuzz::run_for(each, &[])?;
    }
    step("all tests passed");
    Ok(())
}

/// Removes namespaces left by test processes that are gone. Names carry the creating
/// process's PID (`mmpt-<pid>-…`), so a concurrent run's namespaces are left alone.
fn remove_stale_namespaces() {
    let list = output(Command::new("ip").args(["netns", "list"]));
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        let alive = !owner.is_empty() && std::path::Path::new("/proc").join(owner).exists();
        if !alive {
            step(&format!("removing leftover namespace {name}"));
            succeeds(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

/// The daemon's lease directory (mmproxy::netns_lease::DEFAULT_LOCK_DIR).
const LEASE_DIR: &str = "/run/mmproxy";

/// File names in the lease directory with their inode numbers.
fn lease_files() -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(LEASE_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.metadata().ok()?.ino())))
        .collect()
}

/// Fails if files appeared in the lease directory during the end-to-end run that no
/// process holds (the daemons remove their namespace's files at the last exit, and
/// each start removes those of killed ones). Files held by a process are left out:
/// another run's live daemons may share the machine.
fn check_no_lease_left(before: &[(String, u64)]) -> Result<()> {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    // `1: FLOCK  ADVISORY  READ  1234 00:1a:5678 0 EOF`: the inode ends the sixth field.
    let held: std::collections::HashSet<u64> = locks
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(5)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let left: Vec<String> = lease_files()
        .into_iter()
        .filter(|(name, ino)| !held.contains(ino) && !before.iter().any(|(b, _)| b == name))
        .map(|(name, _)| name)
        .collect();
    if !left.is_empty() {
        anyhow::bail!(
            "left in {LEASE_DIR} by the end-to-end tests: {}",
            left.join(", ")
        );
    }
    Ok(())
}
