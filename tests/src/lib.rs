//! Shared pieces of the end-to-end suite: namespaces, the standard topology, and the
//! real peers (HAProxy, an upstream server, the mmproxy daemon itself).
pub mod bench;
pub mod client;
pub mod daemon;
pub mod haproxy;
pub mod netns;
pub mod topology;
pub mod udp_upstream;
pub mod upstream;

/// Whether privileged tests can run here. Without root they skip with one line —
/// except under `CI=true`, where a skip would hide a broken suite, so they fail.
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
