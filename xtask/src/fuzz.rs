//! `cargo xtask fuzz --seconds N`: the codec's fuzz target for a bounded time.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs cargo-fuzz if needed, then fuzzes the PROXY header decoder for `seconds`.
pub fn run(seconds: u64) -> Result<()> {
    if !cargo_fuzz_installed() {
        println!("cargo-fuzz not found; installing it with `cargo install cargo-fuzz --locked`");
        let status = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("running cargo install cargo-fuzz")?;
        if !status.success() {
            bail!("cargo install cargo-fuzz failed: {status}");
        }
    }
    let status = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "+nightly",
            "fuzz",
            "run",
            "decode",
            "--fuzz-dir",
            "mmproxy/fuzz",
            "--",
        ])
        .arg(format!("-max_total_time={seconds}"))
        .status()
        .context("running cargo +nightly fuzz")?;
    if !status.success() {
        bail!("fuzzing failed ({status}); crash inputs are in mmproxy/fuzz/artifacts/decode");
    }
    Ok(())
}
