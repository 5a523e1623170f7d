//! `cargo xtask dist`: the release artefacts in target/dist — a stripped binary with
//! the BPF object embedded, the man page and shell completions generated from the
//! clap definition, and the .deb (cargo-deb) — and the checks CI runs on them.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::compile::{self, host_env};
use crate::util::{build_path, cargo, output, root, run, step};

/// Where the artefacts land.
pub fn dir() -> PathBuf {
    root().join("target/dist")
}

/// Where the generated man page and completions go; `[package.metadata.deb]` in
/// mmproxy/Cargo.toml takes them from here.
fn docs_dir() -> PathBuf {
    root().join("target/release/dist-docs")
}

/// `cargo xtask dist`: set-up, build, then [`package`].
pub fn build() -> Result<PathBuf> {
    crate::setup::dist()?;
    compile::daemon()?;
    package()
}

/// The artefacts from the daemon `compile::daemon` built; returns the .deb's path.
pub fn package() -> Result<PathBuf> {
    let out = dir();
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    step("man page and shell completions from the clap definition");
    run(host_env(cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "mmproxy",
        "--example",
        "dist_docs",
        "--",
    ]))
    .arg(docs_dir()))?;

    // cargo-deb compresses no file it takes from the target directory: gzip here,
    // without a timestamp (-n) so the same page gives the same bytes.
    let man = docs_dir().join("mmproxy.1.gz");
    run(Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .arg(docs_dir().join("mmproxy.1"))
        .stdout(fs::File::create(&man)?))?;

    step("stripped binary, man page and completions in target/dist");
    run(Command::new("strip")
        .arg("-o")
        .arg(out.join("mmproxy"))
        .arg(compile::daemon_binary()))?;
    fs::copy(&man, out.join("mmproxy.1.gz"))?;
    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    for f in ["mmproxy.bash", "_mmproxy", "mmproxy.fish"] {
        fs::copy(docs_dir().join("completions").join(f), completions.join(f))
            .with_context(|| format!("copying the completion {f}"))?;
    }

    step("the .deb (cargo deb --no-build)");
    run(cargo()
        .args(["deb", "--manifest-path", "mmproxy/Cargo.toml", "--no-build"])
        .args(["--strip", "--output"])
        .arg(&out)
        .env("PATH", build_path()))?;
    let deb = fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb wrote no .deb into target/dist")?;
    step(&format!("built {}", deb.display()));
    Ok(deb)
}

/// What CI proves about the package on a machine without systemd as PID 1: lintian
/// finds no error, the units verify, their exposure score holds, and the packaged
/// binary runs with its BPF object embedded.
pub fn check(deb: &Path) -> Result<()> {
    step("lintian on the .deb (errors fail)");
    run(Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb))?;

    // A scratch root for the checks: the host's own units first (the targets the
    // package's units are ordered against; no systemd runs here to provide them),
    // then the package's files over them.
    let tree = dir().join("check");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let units = tree.join("lib/systemd/system");
    fs::create_dir_all(&units)?;
    run(Command::new("cp")
        .args(["-a", "/lib/systemd/system/."])
        .arg(&units))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;

    step("the packaged binary runs (--version)");
    let version = output(Command::new(tree.join("usr/bin/mmproxy")).arg("--version"));
    eprintln!("{}", version.trim_end());
    if !version.contains("BPF object embedded") || version.contains("commit unknown") {
        bail!("the packaged mmproxy --version says {version:?}: no BPF object, or no commit");
    }

    step("systemd-analyze verify on the packaged units");
    // verify checks that ExecReload='s /bin/kill exists in the root. A template
    // verifies through an instance, whose env file is the packaged example.
    fs::create_dir_all(tree.join("bin"))?;
    fs::copy("/bin/kill", tree.join("bin/kill")).context("copying /bin/kill")?;
    fs::copy(
        units.join("mmproxy@.service"),
        units.join("mmproxy@example.service"),
    )?;
    for unit in ["mmproxy.service", "mmproxy@example.service"] {
        // verify only warns about unknown or misspelt directives: any message fails.
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", tree.display()))
            .arg(units.join(unit))
            .output()
            .context("running systemd-analyze verify")?;
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !said.trim().is_empty() {
            bail!("systemd-analyze verify {unit}:\n{said}");
        }
    }

    step("systemd-analyze security (offline) on mmproxy.service");
    run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={EXPOSURE_THRESHOLD}"))
        .arg(format!("--root={}", tree.display()))
        .arg(units.join("mmproxy.service")))?;
    fs::remove_dir_all(&tree)?;
    Ok(())
}

/// `systemd-analyze security` exposure, in tenths, above which the check fails: the
/// unit scores 1.9 (README, "Install"): a hardening directive lost in an edit fails.
const EXPOSURE_THRESHOLD: u32 = 19;
