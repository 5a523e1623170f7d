//! `cargo xtask fuzz [--seconds N] [TARGET…]`: the fuzz targets of `mmproxy/fuzz/`,
//! each for a bounded time, one after the other.
//!
//! Each target starts from its seed corpus in the repository
//! (`mmproxy/fuzz/seeds/<target>/`, read only) and grows a working corpus in
//! `mmproxy/fuzz/corpus/<target>/` (not in git; kept between runs). A dictionary in
//! `mmproxy/fuzz/dicts/<target>.dict` is used when there is one.
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{build_path, cargo, cargo_bin_dir, root, run, step};

/// Every target, in the order they run: the decoder as a whole, then each input the
/// daemon parses from outside.
pub const TARGETS: &[&str] = &[
    "decode",
    "v1",
    "v2_tlv",
    "udp_datagram",
    "allowed_subnets",
    "cli",
];

/// Fuzzes `targets` (all when empty) for `seconds` each. Crash inputs land in
/// mmproxy/fuzz/artifacts/<target>; a crash fails the run.
pub fn run_for(seconds: u64, targets: &[String]) -> Result<()> {
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = chosen.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    if !cargo_bin_dir().join("cargo-fuzz").exists() {
        step("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in chosen {
        step(&format!("fuzzing {target} for {seconds} s"));
        one(target, seconds).with_context(|| {
            format!("fuzzing {target} failed; crash inputs are in mmproxy/fuzz/artifacts/{target}")
        })?;
    }
    Ok(())
}

fn one(target: &str, seconds: u64) -> Result<()> {
    let fuzz = Path::new("mmproxy/fuzz");
    let corpus = fuzz.join("corpus").join(target);
    std::fs::create_dir_all(root().join(&corpus))
        .with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = Command::new("rustup");
    // `rustup run nightly` for the same reason as the BPF build: `$CARGO` is stable's.
    cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
        .arg("--fuzz-dir")
        .arg(fuzz)
        // New inputs go to the first directory; the seeds are only read.
        .arg(&corpus)
        .arg(fuzz.join("seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1");
    let dict = fuzz.join("dicts").join(format!("{target}.dict"));
    if root().join(&dict).exists() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    run(cmd
        .env("PATH", build_path())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))
}
