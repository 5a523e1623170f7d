//! `cargo xtask bench`: builds the daemon, then runs the benchmark runner
//! (tests/src/bin/bench.rs) as root. The full run writes bench/ and the generated
//! section of BENCHMARKS.md; `--quick` is the smoke run `cargo xtask test` does,
//! which writes only under target/.
use std::path::PathBuf;

use anyhow::Result;

use crate::compile::{self, host_env};
use crate::util::{cargo, run};

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
    if !crate::util::root_or_skip("the benchmark")? {
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
        cmd.arg("--quick");
    }
    cmd.args(destination(args.quick, &args.extra));
    for p in &args.peers {
        cmd.arg("--peer").arg(p);
    }
    cmd.args(&args.extra);
    run(host_env(&mut cmd))
}

/// Runner flags that measure less than the full run: such a run must not replace
/// the recorded one in bench/ and BENCHMARKS.md.
const PARTIAL: &[&str] = &[
    "--only",
    "--config",
    "--secs",
    "--throughput-secs",
    "--idle-conns",
];

/// Where the runner writes: the smoke run and partial runs under target/, a full
/// run to bench/ and the generated section of BENCHMARKS.md; nothing when the
/// caller names `--out` itself.
fn destination(quick: bool, extra: &[String]) -> Vec<&'static str> {
    let names = |flag: &str| {
        extra
            .iter()
            .any(|e| e == flag || e.starts_with(&format!("{flag}=")))
    };
    if names("--out") {
        vec![]
    } else if quick {
        vec!["--out", "target/bench-quick"]
    } else if PARTIAL.iter().any(|f| names(f)) {
        vec!["--out", "target/bench-partial"]
    } else {
        vec!["--out", "bench", "--update", "BENCHMARKS.md"]
    }
}

#[cfg(test)]
mod tests {
    use super::destination;

    fn extra(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn only_a_full_run_replaces_the_recorded_one() {
        assert_eq!(
            destination(false, &extra(&["--rounds", "5"])),
            ["--out", "bench", "--update", "BENCHMARKS.md"]
        );
        for partial in [
            &["--only", "udp"][..],
            &["--config", "mmproxy"],
            &["--secs=2"],
            &["--rounds", "3", "--idle-conns", "100"],
        ] {
            assert_eq!(
                destination(false, &extra(partial)),
                ["--out", "target/bench-partial"],
                "{partial:?}"
            );
        }
    }

    #[test]
    fn the_smoke_run_and_an_explicit_out_stay_where_they_are_told() {
        assert_eq!(destination(true, &[]), ["--out", "target/bench-quick"]);
        assert!(destination(false, &extra(&["--out", "/tmp/x", "--only", "udp"])).is_empty());
        assert!(destination(true, &extra(&["--out=/tmp/x"])).is_empty());
    }
}
