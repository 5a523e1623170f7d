//! `cargo xtask test`: the whole suite, in order, stopping at the first failure.
use std::process::Command;

use anyhow::Result;

use crate::compile::{self, host_env};
use crate::util::{build_path, cargo, output, run, step, succeeds};

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
        step("fuzzing the PROXY decoder for 60 s");
        crate::fuzz::run_for(60)?;
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
