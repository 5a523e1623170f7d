// cli.rs names the version in `--version`; the daemon's build.rs sets it from git.
fn main() {
    println!("cargo::rustc-env=MMPROXY_VERSION=fuzz");
}
