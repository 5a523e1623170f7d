//! `cargo xtask soak [--minutes N]`: builds the daemon, then runs the soak runner
//! (tests/src/bin/soak.rs) as root. It writes target/soak/summary.md and
//! samples.csv and fails when a check fails; RELIABILITY.md records a long run.
use anyhow::Result;

use crate::compile::{self, host_env};
use crate::util::{cargo, run};

pub struct Args {
    pub minutes: f64,
    /// Passed to the runner as they are (`--ebpf off`, `--out DIR`).
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
    if !crate::util::root_or_skip("the soak")? {
        return Ok(());
    }
    let mut shown = format!("cargo xtask soak --minutes {}", args.minutes);
    if !args.extra.is_empty() {
        shown.push_str(" --");
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
        "soak",
        "--",
    ])
    .args(["--command", &shown])
    .args(["--minutes", &args.minutes.to_string()])
    .args(&args.extra)
    .env("MMPROXY_BIN", compile::daemon_binary());
    run(host_env(&mut cmd))
}
