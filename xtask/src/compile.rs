//! Builds the BPF object with the nightly, then the daemon with stable.
use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::util::{build_path, root, run, step};

/// Where the BPF object lands; the daemon's build script embeds it from here.
pub fn bpf_object() -> PathBuf {
    root().join("target/bpf/bpfel-unknown-none/release/mmproxy-ebpf")
}

pub fn daemon_binary() -> PathBuf {
    root().join("target/release/mmproxy")
}

pub fn ebpf() -> Result<()> {
    // `rustup run` rather than `cargo +nightly`: under `cargo xtask`, `$CARGO` is the
    // stable toolchain's own cargo, which knows no `+toolchain`. Its own target dir:
    // nightly artefacts would otherwise invalidate the stable ones.
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--quiet",
            "-p",
            "mmproxy-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/bpf"])
        .env("PATH", build_path())
        // `cargo xtask` runs under stable; the nightly must not inherit its pins.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))
}

/// Environment every host cargo call gets, so that build, clippy and test agree on
/// the embedded object and do not rebuild each other's work.
pub fn host_env(cmd: &mut Command) -> &mut Command {
    cmd.env("MMPROXY_BPF_OBJECT", bpf_object())
}

pub fn daemon() -> Result<()> {
    ebpf()?;
    run(host_env(crate::util::cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "mmproxy",
        "--bin",
        "mmproxy",
    ])))?;
    step(&format!("built {}", daemon_binary().display()));
    Ok(())
}
