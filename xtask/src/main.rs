//! `cargo xtask`: the project's own build, set-up and test driver.
//!
//! Everything a fresh machine needs is installed here, idempotently, so the README's
//! two commands are all a newcomer or CI types.
mod bench;
mod compile;
mod dist;
mod fuzz;
mod setup;
mod soak;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, set up and test mmproxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and the tests need (idempotent)
    Setup,
    /// Build the BPF object, then the daemon at target/release/mmproxy
    Build,
    /// Release artefacts in target/dist: stripped binary (BPF object embedded), man
    /// page, shell completions and the .deb
    Dist,
    /// Show mmproxy's job end to end, in network namespaces (needs root)
    Demo,
    /// fmt, clippy, cargo deny, unit tests, the .deb and its checks, privileged
    /// end-to-end tests (in network namespaces)
    Test {
        /// Skip the short fuzzing run
        #[arg(long)]
        no_fuzz: bool,
        /// Only run tests whose name contains this
        filter: Option<String>,
    },
    /// Benchmark mmproxy side by side with go-mmproxy, HAProxy and no proxy (needs
    /// root; see BENCHMARKS.md)
    Bench {
        /// A smoke run of a few seconds (what `cargo xtask test` runs); writes only
        /// under target/bench-quick
        #[arg(long)]
        quick: bool,
        /// A go-mmproxy-compatible binary to measure as well (repeatable)
        #[arg(long = "peer")]
        peers: Vec<std::path::PathBuf>,
        /// Passed to the runner: --rounds N, --only WORKLOAD, --pin, …
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Soak mmproxy under a steady mixed load with hostile traffic interleaved,
    /// checking bytes, counters, memory and descriptors (needs root; see
    /// RELIABILITY.md); writes target/soak/summary.md
    Soak {
        /// Minutes of load, warm-up included
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Passed to the runner: --ebpf off, --out DIR
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run the fuzz targets (all, or those named), each for --seconds
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// decode, v1, v2_tlv, udp_datagram, allowed_subnets, cli (default: all)
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::all(setup::Needs::Test),
        Command::Build => {
            setup::all(setup::Needs::Build)?;
            compile::daemon()
        }
        Command::Dist => dist::build().map(|_| ()),
        Command::Demo => {
            setup::all(setup::Needs::Test)?;
            compile::daemon()?;
            util::run(compile::host_env(
                util::cargo()
                    .args([
                        "run",
                        "--quiet",
                        "--release",
                        "-p",
                        "mmproxy-tests",
                        "--bin",
                        "demo",
                    ])
                    .env("MMPROXY_BIN", compile::daemon_binary()),
            ))
        }
        Command::Test { no_fuzz, filter } => test::run_all(no_fuzz, filter.as_deref()),
        Command::Bench {
            quick,
            peers,
            extra,
        } => bench::run_full(&bench::Args {
            quick,
            peers,
            extra,
        }),
        Command::Soak { minutes, extra } => soak::run_full(&soak::Args { minutes, extra }),
        Command::Fuzz { seconds, targets } => fuzz::run_for(seconds, &targets),
    }
}
