//! Shared pieces of the end-to-end suite: namespaces, the standard topology, the
//! real peers (HAProxy, upstream services, the mmproxy daemon itself), the
//! balancer's side of a connection, and the guard every privileged test starts with.
pub mod args;
pub mod balancer;
pub mod bench;
pub mod client;
pub mod daemon;
pub mod faults;
pub mod haproxy;
pub mod netns;
pub mod tcx;

pub mod soak;
pub mod topology;
pub mod udp_counts;
pub mod udp_upstream;
pub mod unprivileged;
pub mod upstream;

use std::time::Duration;

/// How long a test waits for something that should happen at once (generous: CI
/// has 2 cores).
pub const WAIT: Duration = Duration::from_secs(10);

/// Runs a blocking call again when it was interrupted. A socket with a receive
/// timeout returns `EINTR` rather than restarting after any interruption (a signal,
/// or the task being frozen and thawed), which says nothing about what the test
/// waits for.
pub fn uninterrupted<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Whether privileged tests can run here. Without root they skip with one line —
/// except under `CI=true`, where a skip would hide a broken suite, so they fail.
/// Tests call it through [`require_root!`].
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: needs root (network namespaces, IP_TRANSPARENT, BPF)");
    false
}

/// The first line of every privileged test (a function returning `Result`): returns
/// `Ok(())` early, saying why, unless [`privileged`]. The name it prints is the
/// test function's path.
#[macro_export]
macro_rules! require_root {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        if !$crate::privileged(path.strip_suffix("::here").unwrap_or(path)) {
            return Ok(());
        }
    }};
}

/// Declares, for each listed test body `fn name(mode: Mode) -> Result<()>`, one
/// privileged `#[test]` per [`args::Mode`]: `as_given::name`, `ebpf_off::name` and
/// `bpf_fails::name` (filter on the module to run one mode).
#[macro_export]
macro_rules! tests_per_mode {
    ($($name:ident),+ $(,)?) => {
        $crate::tests_per_mode!(@mode as_given, AsGiven; $($name),+);
        $crate::tests_per_mode!(@mode ebpf_off, EbpfOff; $($name),+);
        $crate::tests_per_mode!(@mode bpf_fails, BpfFails; $($name),+);
    };
    (@mode $module:ident, $mode:ident; $($name:ident),+) => {
        mod $module {
            $(
                #[test]
                fn $name() -> ::anyhow::Result<()> {
                    $crate::require_root!();
                    super::$name($crate::args::Mode::$mode)
                }
            )+
        }
    };
}
