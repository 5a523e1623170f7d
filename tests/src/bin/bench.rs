//! The benchmark runner behind `cargo xtask bench` (see BENCHMARKS.md). Needs root:
//! it creates network namespaces, and removes them when it ends, also on failure.
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use mmproxy_tests::bench::{self, report, Options, Workload};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "mmproxy side by side with go-mmproxy, HAProxy and no proxy"
)]
struct Cli {
    /// A smoke run of a few seconds: one round, short runs, 200 idle connections.
    #[arg(long)]
    quick: bool,
    /// Rounds (each configuration once per round, interleaved).
    #[arg(long)]
    rounds: Option<usize>,
    /// A go-mmproxy-compatible binary to measure as well (repeatable).
    #[arg(long = "peer")]
    peers: Vec<PathBuf>,
    /// Only these workloads (idle, latency, throughput, conn_rate, udp; repeatable).
    #[arg(long = "only")]
    only: Vec<String>,
    /// Only the configurations with these names ("no proxy", mmproxy,
    /// "mmproxy (udp kernel)", go-mmproxy, "HAProxy TPROXY", a peer's file name;
    /// repeatable).
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Length of the throughput run in seconds (default 10, 1 with --quick).
    #[arg(long)]
    throughput_secs: Option<f64>,
    /// Length of the other runs in seconds (default 5, 0.5 with --quick).
    #[arg(long)]
    secs: Option<f64>,
    /// Idle connections to hold (default 10,000, 200 with --quick; capped by the
    /// descriptor limit).
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Nice value for the generators, echo servers and proxies (0: leave it).
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
    /// Pin the generators and echo servers (one thread each) to CPU 0 and the proxy
    /// to CPU 1. By default nothing is pinned: the targets were measured with
    /// everything sharing both CPUs, and the pinned layout makes CPU 0 the bottleneck.
    #[arg(long)]
    pin: bool,
    /// The default now; accepted so older command lines still work.
    #[arg(long, hide = true)]
    no_pin: bool,
    /// Where results.json, results.md and benchmark.png go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also replace the generated section of this Markdown file (BENCHMARKS.md).
    #[arg(long)]
    update: Option<PathBuf>,
    /// The command line to record (xtask passes its own).
    #[arg(long)]
    command: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark needs root: it creates network namespaces"
    );
    let workloads = if cli.only.is_empty() {
        Workload::ALL.to_vec()
    } else {
        cli.only
            .iter()
            .map(|w| Workload::parse(w).with_context(|| format!("unknown workload {w:?}")))
            .collect::<Result<Vec<_>>>()?
    };
    let opts = Options {
        quick: cli.quick,
        rounds: cli.rounds.unwrap_or(if cli.quick { 1 } else { 3 }),
        throughput_secs: cli
            .throughput_secs
            .unwrap_or(if cli.quick { 1.0 } else { 10.0 }),
        secs: cli.secs.unwrap_or(if cli.quick { 0.5 } else { 5.0 }),
        idle_conns: cli
            .idle_conns
            .unwrap_or(if cli.quick { 200 } else { 10_000 }),
        pin: cli.pin,
        threads: 1,
        nice: cli.nice,
        workloads,
        configs: cli.configs,
        nofile: 0,
        mmproxy: mmproxy_tests::daemon::binary(),
        peers: cli.peers,
        out: cli.out.clone(),
        command: cli
            .command
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
    };
    ensure!(
        opts.mmproxy.exists(),
        "{} is missing: build it with `cargo xtask build` (or set MMPROXY_BIN)",
        opts.mmproxy.display()
    );
    let results = bench::run(opts)?;
    std::fs::create_dir_all(&cli.out)?;
    let md = format!(
        "{}\n{}",
        report::preamble(&results),
        report::markdown(&results)
    );
    report::write_json(&results, &cli.out.join("results.json"))?;
    std::fs::write(cli.out.join("results.md"), &md)?;
    bench::chart::draw(&results, &cli.out.join("benchmark.png"))?;
    if let Some(path) = &cli.update {
        report::update_section(path, &md)?;
    }
    println!("{md}");
    println!(
        "bench: wrote {}/results.json, results.md, benchmark.png",
        cli.out.display()
    );
    let failed: Vec<_> = results
        .samples
        .iter()
        .filter(|s| s.error.is_some())
        .collect();
    if cli.quick {
        // The smoke run's only check: every configuration produced numbers for every
        // workload it supports (no timing is judged).
        ensure!(
            failed.is_empty(),
            "{} measurement(s) failed: {}",
            failed.len(),
            failed
                .iter()
                .map(|s| format!("{}/{}", s.config, s.workload.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
