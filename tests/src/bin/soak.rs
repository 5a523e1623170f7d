//! The soak runner behind `cargo xtask soak` (see RELIABILITY.md). Needs root: it
//! creates network namespaces, and removes them when it ends, also on failure.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use mmproxy_tests::soak::{self, check};

#[derive(Parser)]
#[command(
    name = "soak",
    about = "mmproxy under mixed good and hostile load, checked"
)]
struct Cli {
    /// Minutes of load (the warm-up included).
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// The daemons' --ebpf: auto, on, or off (the user-space allow-list and return
    /// path).
    #[arg(long, default_value = "auto")]
    ebpf: String,
    /// Where summary.md and samples.csv go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// The command line to record (xtask passes its own).
    #[arg(long)]
    command: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the soak needs root: it creates network namespaces"
    );
    ensure!(cli.minutes > 0.0, "--minutes must be positive");
    let opts = soak::Options {
        duration: Duration::from_secs_f64(cli.minutes * 60.0),
        mmproxy: mmproxy_tests::daemon::binary(),
        ebpf: cli.ebpf,
        command: cli
            .command
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
    };
    ensure!(
        opts.mmproxy.exists(),
        "{} is missing: build it with `cargo xtask build` (or set MMPROXY_BIN)",
        opts.mmproxy.display()
    );
    let run = soak::run(opts)?;
    let checks = check::checks(&run);
    let md = check::markdown(&run, &checks);
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join("summary.md"), &md)?;
    std::fs::write(cli.out.join("samples.csv"), check::csv(&run))?;
    println!("{md}");
    println!(
        "soak: wrote {}/summary.md and samples.csv",
        cli.out.display()
    );
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    ensure!(
        failed.is_empty(),
        "{} check(s) failed: {}",
        failed.len(),
        failed.join("; ")
    );
    Ok(())
}
