//! tcp_proxy.rs's whole test list again, with `--ebpf off` appended to every
//! daemon's flags: the userspace-only path (plain listeners, the userspace
//! allow-list, loopback-only routing) must pass it unchanged. Daemons started
//! through `sh -c 'exec mmproxy …'` keep their own flags.
#[path = "tcp_proxy.rs"]
mod tcp_proxy;

/// Sets the harness's mode before the test harness's main runs (an ELF constructor):
/// every test in this binary, on whichever thread, sees it.
#[used]
#[link_section = ".init_array"]
static SET_MODE: extern "C" fn() = set_mode;

extern "C" fn set_mode() {
    std::env::set_var(mmproxy_tests::daemon::EBPF_MODE_ENV, "off");
}
