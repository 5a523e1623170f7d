//! Embeds the BPF object that `cargo xtask build` produced, so the daemon ships as one
//! binary. A plain `cargo build` without it still works: the daemon then runs
//! userspace-only and says so at start-up.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mmproxy_bpf_object)");
    println!("cargo::rerun-if-env-changed=MMPROXY_BPF_OBJECT");

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = env::var_os("MMPROXY_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/mmproxy-ebpf"));
    println!("cargo::rerun-if-changed={}", object.display());

    commit(&manifest);

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("mmproxy.bpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if !bytes.is_empty() {
        println!("cargo::rustc-cfg=mmproxy_bpf_object");
    }
    // Only rewrite when different, so an unchanged object does not relink the daemon.
    if fs::read(&out).ok().as_deref() != Some(&bytes[..]) {
        if let Err(e) = fs::write(&out, &bytes) {
            panic!("writing {}: {e}", out.display());
        }
    }
}

/// `MMPROXY_COMMIT` for `mmproxy_build_info`: the variable when set (a build from a
/// tarball can say where it came from), else the checkout's commit, else "unknown".
fn commit(manifest: &Path) {
    println!("cargo::rerun-if-env-changed=MMPROXY_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = env::var("MMPROXY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=MMPROXY_COMMIT={commit}");
    // Rebuilt when HEAD moves: HEAD itself, the branch it names, packed refs. Only
    // files that exist, since a missing one would rerun this script every build.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = manifest.join(path);
            if path.exists() {
                println!("cargo::rerun-if-changed={}", path.display());
            }
        }
    }
}
