//! Embeds the BPF object that `cargo xtask build` produced, so the daemon ships as one
//! binary. A plain `cargo build` without it still works: the daemon then runs
//! userspace-only and says so at start-up.
use std::path::PathBuf;
use std::{env, fs};

fn main() {
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
    // Only rewrite when different, so an unchanged object does not relink the daemon.
    if fs::read(&out).ok().as_deref() != Some(&bytes[..]) {
        if let Err(e) = fs::write(&out, &bytes) {
            panic!("writing {}: {e}", out.display());
        }
    }
}
