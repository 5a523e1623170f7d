//! `cargo xtask bench`: builds the daemon, then runs the benchmark runner
//! (tests/src/bin/bench.rs) as root. The full run writes bench/ and the generated
//! section of BENCHMARKS.md; `--quick` is the smoke run `cargo xtask test` does,
//! which writes only under target/.
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::compile::{self, host_env};
use crate::util::{cargo, is_root, run, step};

pub struct Args {
    pub quick: bool,
    pub peers: Vec<PathBuf>,
    /// Passed to the runner as they are (`--rounds 5`, `--only throughput`, …).
    pub extra: Vec<String>,
}

pub fn run_full(args: &Args) -> Result<()> {
    crate::setup::all(crate::setup::Needs::Test)?;
    compile::daemon()?;
    runner(args)
}

/// The runner, assuming the daemon is built. Without root it explains and skips,
/// unless CI=true.
pub fn runner(args: &Args) -> Result<()> {
    if !is_root() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("the benchmark needs root (network namespaces), and CI=true forbids skipping");
        }
        step("skipping the benchmark: it needs root (network namespaces)");
        return Ok(());
    }
    let mut shown = String::from("cargo xtask bench");
    if args.quick {
        shown.push_str(" --quick");
    }
    for p in &args.peers {
        shown.push_str(&format!(" --peer {}", p.display()));
    }
    for e in &args.extra {
        shown.push(' ');
        shown.push_str(e);
    }
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "mmproxy-tests",
        "--bin",
        "bench",
        "--",
    ])
    .args(["--command", &shown])
    .env("MMPROXY_BIN", compile::daemon_binary());
    if args.quick {
        cmd.args(["--quick", "--out", "target/bench-quick"]);
    } else {
        cmd.args(["--out", "bench", "--update", "BENCHMARKS.md"]);
    }
    for p in &args.peers {
        cmd.arg("--peer").arg(p);
    }
    cmd.args(&args.extra);
    run(host_env(&mut cmd))
}
