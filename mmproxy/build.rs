//! Embeds the BPF object that `cargo xtask build` produced, so the daemon ships as one
//! binary. A plain `cargo build` without it still works: the daemon then runs
//! userspace-only and says so at start-up.
//!
//! Also composes the `--version` line: the package version, the git commit it was
//! built from and whether the BPF object is embedded.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() -> std::io::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(mmproxy_bpf_object)");
    println!("cargo::rerun-if-env-changed=MMPROXY_BPF_OBJECT");

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = env::var_os("MMPROXY_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/mmproxy-ebpf"));
    println!("cargo::rerun-if-changed={}", object.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("mmproxy.bpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if !bytes.is_empty() {
        println!("cargo::rustc-cfg=mmproxy_bpf_object");
    }
    let bpf = if bytes.is_empty() {
        "BPF object not embedded: userspace only"
    } else {
        "BPF object embedded"
    };
    let commit = git_commit(&manifest);
    // Also a label of `mmproxy_build_info` (--metrics).
    println!("cargo::rustc-env=MMPROXY_COMMIT={commit}");
    println!(
        "cargo::rustc-env=MMPROXY_VERSION={} (commit {commit}, {bpf})",
        env::var("CARGO_PKG_VERSION").unwrap_or_default(),
    );
    // Only rewrite when different, so an unchanged object does not relink the daemon.
    if fs::read(&out).ok().as_deref() != Some(&bytes[..]) {
        fs::write(&out, &bytes).map_err(|e| {
            std::io::Error::new(e.kind(), format!("writing {}: {e}", out.display()))
        })?;
    }
    Ok(())
}

/// The commit being built: `MMPROXY_GIT_COMMIT` (for builds from a tarball that
/// know it), else `git rev-parse`, else "unknown".
fn git_commit(dir: &Path) -> String {
    println!("cargo::rerun-if-env-changed=MMPROXY_GIT_COMMIT");
    if let Some(c) = env::var("MMPROXY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        return c;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it names (a
    // commit). Only existing paths: cargo reruns for a missing one on every build.
    let mut watched = vec!["HEAD".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    watched.push("packed-refs".to_owned());
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if Path::new(&path).exists() {
                println!("cargo::rerun-if-changed={path}");
            }
        }
    }
    commit
}
