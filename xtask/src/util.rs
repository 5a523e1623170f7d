//! Running commands with one line of output per step.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Runs `cmd` in the workspace root, inheriting output; fails with the command line.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and says whether it succeeded (for probes).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Captures stdout of a probe; empty on failure.
pub fn output(cmd: &mut Command) -> String {
    cmd.stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cargo`, as invoked by `cargo xtask` (so the same toolchain manager is used).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// cargo's bin directory (bpf-linker, cargo-fuzz), added to PATH for child builds.
pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory and LLVM 22 in front.
pub fn build_path() -> std::ffi::OsString {
    let mut paths = vec![cargo_bin_dir(), PathBuf::from("/usr/lib/llvm-22/bin")];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// Whether a suite that needs root (network namespaces) may run: as root, yes;
/// otherwise it explains and skips, except with CI=true, where skipping is an error.
pub fn root_or_skip(what: &str) -> anyhow::Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        anyhow::bail!("{what} needs root (network namespaces), and CI=true forbids skipping");
    }
    step(&format!(
        "skipping {what}: it needs root (network namespaces)"
    ));
    Ok(false)
}
