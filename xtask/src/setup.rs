//! Installs what the build and the tests need, each step only when it is missing.
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{build_path, cargo, cargo_bin_dir, is_root, output, run, step, succeeds};

/// bpf-linker release known to work with LLVM 22 and this nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// BPF object and daemon.
    Build,
    /// Also the peers and tools the end-to-end tests use.
    Test,
}

/// Debian packages: (package, why).
const BUILD_PACKAGES: &[(&str, &str)] = &[("llvm-22-dev", "bpf-linker links LLVM 22")];
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces, veth, ip rule"),
    ("haproxy", "the real PROXY sender in end-to-end tests"),
    ("bpftool", "checks what BPF programs are attached"),
    (
        "ethtool",
        "turns checksum offloads off so receivers verify the kernel relay's checksums",
    ),
    ("go-mmproxy", "the peer for side-by-side comparison"),
    (
        "openssl",
        "a TLS client and certificate for HAProxy's SSL TLVs",
    ),
    (
        "prometheus",
        "promtool checks the alert rules and a scrape; a real server scrapes mmproxy",
    ),
    ("lintian", "checks the .deb that `cargo xtask dist` builds"),
    ("systemd", "systemd-analyze verifies and scores the units"),
    (
        "iptables",
        "the go-mmproxy fork's TPROXY recipe for -listen-transparent, in a test namespace",
    ),
    (
        "util-linux",
        "setpriv and unshare start the daemon as the unit's unprivileged user",
    ),
    ("passwd", "useradd creates that user (mmpt-daemon)"),
];

/// Cargo subcommands: (crate, version, why). Versions are pinned so a fresh
/// machine builds the same tools with `--locked`.
const CARGO_TOOLS: &[(&str, &str, &str)] = &[
    ("cargo-deb", "3.8.0", "builds the .deb (`cargo xtask dist`)"),
    (
        "cargo-deny",
        "0.20.2",
        "licences, bans and sources of the dependencies",
    ),
];

pub fn all(needs: Needs) -> Result<()> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.iter().map(|(p, _)| *p).collect();
    if needs == Needs::Test {
        packages.extend(TEST_PACKAGES.iter().map(|(p, _)| *p));
    }
    apt(&packages)?;
    rust_src()?;
    bpf_linker()?;
    if needs == Needs::Test {
        for (name, version, why) in CARGO_TOOLS {
            cargo_tool(name, version, why)?;
        }
    }
    Ok(())
}

/// What `cargo xtask dist` needs: the build, and cargo-deb.
pub fn dist() -> Result<()> {
    all(Needs::Build)?;
    for (name, version, why) in CARGO_TOOLS.iter().filter(|t| t.0 == "cargo-deb") {
        cargo_tool(name, version, why)?;
    }
    Ok(())
}

/// `cargo install NAME --locked --version V`, unless `NAME --version` already
/// names V (one-off per machine: about a minute or two each).
fn cargo_tool(name: &str, version: &str, why: &str) -> Result<()> {
    let bin = cargo_bin_dir().join(name);
    // Cargo subcommands print their version when called as `cargo-x x --version`.
    let sub = name.trim_start_matches("cargo-");
    if output(Command::new(&bin).args([sub, "--version"])).contains(version) {
        return Ok(());
    }
    step(&format!("installing {name} {version}: {why}"));
    run(cargo().args(["install", name, "--locked", "--version", version]))
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .contains("install ok installed")
}

fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages; run: sudo apt-get update && sudo apt-get install -y {list}"
        );
    }
    step(&format!("installing Debian packages: {list}"));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> Result<()> {
    let have = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if have.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain (the BPF build compiles core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    let version = output(Command::new(&bin).arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 75 s)"
    ));
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", build_path())
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    if !succeeds(Command::new(&bin).arg("--version")) {
        bail!(
            "bpf-linker was installed but does not run: {}",
            bin.display()
        );
    }
    Ok(())
}
