//! `cargo xtask fuzz --seconds N`: the codec's fuzz target for a bounded time.
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{build_path, cargo, cargo_bin_dir, run, step};

/// Installs cargo-fuzz if needed, then fuzzes the PROXY header decoder for `seconds`.
/// Crash inputs land in mmproxy/fuzz/artifacts/decode.
pub fn run_for(seconds: u64) -> Result<()> {
    if !cargo_bin_dir().join("cargo-fuzz").exists() {
        step("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    // `rustup run nightly` for the same reason as the BPF build: `$CARGO` is stable's.
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "run", "decode"])
        .args(["--fuzz-dir", "mmproxy/fuzz", "--"])
        .arg(format!("-max_total_time={seconds}"))
        .env("PATH", build_path())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))
    .context("fuzzing the decoder failed; crash inputs are in mmproxy/fuzz/artifacts/decode")
}
