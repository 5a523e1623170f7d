//! tcp_proxy.rs's whole test list again, with every daemon's BPF load forced to
//! fail (`MMPROXY_TEST_FAIL_BPF=1`): `--ebpf auto` must fall back to userspace,
//! say so, and pass it unchanged.
#[path = "tcp_proxy.rs"]
mod tcp_proxy;

/// Sets the harness's mode before the test harness's main runs (an ELF constructor):
/// every test in this binary, on whichever thread, sees it.
#[used]
#[link_section = ".init_array"]
static SET_MODE: extern "C" fn() = set_mode;

extern "C" fn set_mode() {
    std::env::set_var(mmproxy_tests::daemon::EBPF_MODE_ENV, "fail");
}
