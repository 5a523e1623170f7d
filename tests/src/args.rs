//! How a test starts the daemon: its command line, built flag by flag, and the mode
//! the test runs it in.
use std::fmt::Display;
use std::path::Path;

use crate::unprivileged::Privileges;

/// The daemon's variable that makes its BPF loading fail (mmproxy::ebpf::FAIL_ENV).
pub const FAIL_BPF_ENV: &str = "MMPROXY_TEST_FAIL_BPF";

/// `MMPROXY_TEST_UDP_DATAPATH=kernel`: every `-p udp` daemon that runs with the
/// kernel side gets `--udp-datapath kernel` (the UDP pass of `cargo xtask test`),
/// unless the test chose a datapath itself.
pub const UDP_DATAPATH_ENV: &str = "MMPROXY_TEST_UDP_DATAPATH";

/// The `--udp-datapath` flag's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDatapath {
    Socket,
    Kernel,
}

impl UdpDatapath {
    fn arg(self) -> &'static str {
        match self {
            UdpDatapath::Socket => "socket",
            UdpDatapath::Kernel => "kernel",
        }
    }

    /// What [`UDP_DATAPATH_ENV`] asks for in this run: `None` when unset.
    pub fn from_env() -> Option<Self> {
        match std::env::var(UDP_DATAPATH_ENV).as_deref() {
            Ok("kernel") => Some(UdpDatapath::Kernel),
            Ok("socket") => Some(UdpDatapath::Socket),
            _ => None,
        }
    }
}

/// Whether this run relays established UDP flows in the kernel by default
/// ([`UDP_DATAPATH_ENV`]).
pub fn kernel_udp_datapath() -> bool {
    UdpDatapath::from_env() == Some(UdpDatapath::Kernel)
}

/// How a test runs the daemon; the TCP tests run once in each (see
/// [`tests_per_mode!`](crate::tests_per_mode)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// With the flags the test gives (by default `--ebpf auto`: as root, the kernel
    /// side loads).
    #[default]
    AsGiven,
    /// With `--ebpf off`, whatever the test gives: the userspace-only path (plain
    /// listeners, the userspace allow-list, loopback-only routing).
    EbpfOff,
    /// With the BPF load forced to fail ([`FAIL_BPF_ENV`]): `--ebpf auto` must fall
    /// back to userspace and say so, which [`Daemon::start`](crate::daemon::Daemon::start)
    /// checks.
    BpfFails,
}

/// The `--ebpf` flag's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ebpf {
    Auto,
    On,
    Off,
}

impl Ebpf {
    fn arg(self) -> &'static str {
        match self {
            Ebpf::Auto => "auto",
            Ebpf::On => "on",
            Ebpf::Off => "off",
        }
    }
}

/// The daemon's arguments and environment:
/// `DaemonArgs::tcp().listen("0.0.0.0:8443").target4("127.0.0.1:9000").ebpf(Ebpf::On)`.
#[derive(Clone, Debug)]
#[must_use]
pub struct DaemonArgs {
    args: Vec<String>,
    ebpf: Option<Ebpf>,
    /// `--udp-datapath` as the test chose it; `None`: as [`UDP_DATAPATH_ENV`] says.
    udp_datapath: Option<UdpDatapath>,
    pub(crate) mode: Mode,
    /// Who the daemon runs as ([`crate::unprivileged`]).
    pub(crate) privileges: Privileges,
}

impl DaemonArgs {
    /// A TCP daemon (the daemon's default protocol, so no `-p`).
    pub fn tcp() -> Self {
        Self {
            args: Vec::new(),
            ebpf: None,
            udp_datapath: None,
            mode: Mode::AsGiven,
            privileges: Privileges::Default,
        }
    }

    /// A UDP daemon: `-p udp`.
    pub fn udp() -> Self {
        Self::tcp().flag("-p", "udp")
    }

    /// `-l`: an address and port or port range (repeatable).
    pub fn listen(self, addr: impl Display) -> Self {
        self.flag("-l", addr)
    }

    /// `-4`: the target for IPv4 clients.
    pub fn target4(self, addr: impl Display) -> Self {
        self.flag("-4", addr)
    }

    /// `-6`: the target for IPv6 clients.
    pub fn target6(self, addr: impl Display) -> Self {
        self.flag("-6", addr)
    }

    /// `--allowed-subnets` (an [`AllowedFile`](crate::daemon::AllowedFile) or a path
    /// as written, relative ones included).
    pub fn allowed(self, file: impl AsRef<Path>) -> Self {
        let path = file.as_ref().to_string_lossy().into_owned();
        self.flag("--allowed-subnets", path)
    }

    /// `--ebpf`; under [`Mode::EbpfOff`] `off` is given instead.
    pub fn ebpf(mut self, ebpf: Ebpf) -> Self {
        self.ebpf = Some(ebpf);
        self
    }

    /// `--udp-datapath`, given as chosen whatever the protocol and mode (the
    /// refusal tests need that); overrides [`UDP_DATAPATH_ENV`].
    pub fn udp_datapath(mut self, datapath: UdpDatapath) -> Self {
        self.udp_datapath = Some(datapath);
        self
    }

    /// `-v`.
    pub fn verbose(self, level: u8) -> Self {
        self.flag("-v", level)
    }

    /// `--header-timeout` in seconds.
    pub fn header_timeout(self, seconds: u32) -> Self {
        self.flag("--header-timeout", seconds)
    }

    /// `--close-after` in seconds (UDP flows' idle time).
    pub fn close_after(self, seconds: u32) -> Self {
        self.flag("--close-after", seconds)
    }

    /// `--listeners`: sockets per listening address.
    pub fn listeners(self, n: u32) -> Self {
        self.flag("--listeners", n)
    }

    /// `--max-flows`.
    pub fn max_flows(self, n: u32) -> Self {
        self.flag("--max-flows", n)
    }

    /// `--max-connections`.
    pub fn max_connections(self, n: u32) -> Self {
        self.flag("--max-connections", n)
    }

    /// `--shutdown-grace` in seconds.
    pub fn shutdown_grace(self, seconds: u32) -> Self {
        self.flag("--shutdown-grace", seconds)
    }

    /// `--metrics`: where the HTTP endpoint listens.
    pub fn metrics(self, addr: impl Display) -> Self {
        self.flag("--metrics", addr)
    }

    /// `--return-interface` (repeatable).
    pub fn return_interface(self, iface: &str) -> Self {
        self.flag("--return-interface", iface)
    }

    /// `-dynamic-destination` (go-mmproxy fork's spelling): the header's destination
    /// is the upstream.
    pub fn dynamic_destination(mut self) -> Self {
        self.args.push("-dynamic-destination".to_owned());
        self
    }

    /// `-listen-transparent` (go-mmproxy fork's spelling): IP_TRANSPARENT on the
    /// listening sockets, for a TPROXY rule.
    pub fn listen_transparent(mut self) -> Self {
        self.args.push("-listen-transparent".to_owned());
        self
    }

    /// Run as root, or as the unprivileged test user with chosen capabilities
    /// (by default: as `MMPROXY_TEST_UNPRIVILEGED` says).
    pub fn privileges(mut self, privileges: Privileges) -> Self {
        self.privileges = privileges;
        self
    }

    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Any flag as written (a go-mmproxy spelling such as `-allowed-subnets`).
    pub fn flag_raw(self, name: &str, value: impl Display) -> Self {
        self.flag(name, value)
    }

    fn flag(mut self, name: &str, value: impl Display) -> Self {
        self.args.push(name.to_owned());
        self.args.push(value.to_string());
        self
    }

    /// The argument list, without the program.
    pub fn to_vec(&self) -> Vec<String> {
        let mut all = self.args.clone();
        let ebpf = match self.mode {
            Mode::EbpfOff => Some(Ebpf::Off),
            _ => self.ebpf,
        };
        if let Some(e) = ebpf {
            all.extend(["--ebpf".to_owned(), e.arg().to_owned()]);
        }
        if let Some(d) = self.udp_datapath.or_else(|| self.datapath_from_env(ebpf)) {
            all.extend(["--udp-datapath".to_owned(), d.arg().to_owned()]);
        }
        all
    }

    /// The datapath [`UDP_DATAPATH_ENV`] gives this daemon: only to `-p udp` with
    /// the kernel side meant to load (not `--ebpf off`, not a forced BPF failure),
    /// where `--udp-datapath kernel` is valid.
    fn datapath_from_env(&self, ebpf: Option<Ebpf>) -> Option<UdpDatapath> {
        let udp = self.args.windows(2).any(|w| w[0] == "-p" && w[1] == "udp");
        if !udp || ebpf == Some(Ebpf::Off) || self.mode != Mode::AsGiven {
            return None;
        }
        UdpDatapath::from_env().filter(|d| *d == UdpDatapath::Kernel)
    }

    /// The environment the mode adds.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self.mode {
            Mode::BpfFails => vec![(FAIL_BPF_ENV, "1")],
            Mode::AsGiven | Mode::EbpfOff => Vec::new(),
        }
    }

    /// `program` and the arguments as one `sh` command line, each word quoted.
    pub fn shell_line(&self, program: &Path) -> String {
        std::iter::once(program.to_string_lossy().into_owned())
            .chain(self.to_vec())
            .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_in_order_and_the_mode_decides_ebpf() {
        let a = DaemonArgs::udp()
            .listen("0.0.0.0:8443")
            .target4("127.0.0.1:9000")
            .ebpf(Ebpf::On)
            .verbose(1);
        let want = "-p udp -l 0.0.0.0:8443 -4 127.0.0.1:9000 -v 1 --ebpf on";
        assert_eq!(a.to_vec().join(" "), want);
        assert!(a.env().is_empty());
        let off = a.clone().mode(Mode::EbpfOff);
        assert!(off.to_vec().join(" ").ends_with("-v 1 --ebpf off"));
        let fails = a.mode(Mode::BpfFails);
        assert!(fails.to_vec().join(" ").ends_with("--ebpf on"));
        assert_eq!(fails.env(), [(FAIL_BPF_ENV, "1")]);
    }

    #[test]
    fn the_chosen_udp_datapath_is_given_as_is() {
        let a = DaemonArgs::tcp()
            .ebpf(Ebpf::Off)
            .udp_datapath(UdpDatapath::Kernel);
        assert_eq!(a.to_vec().join(" "), "--ebpf off --udp-datapath kernel");
        let s = DaemonArgs::udp().udp_datapath(UdpDatapath::Socket);
        assert_eq!(s.to_vec().join(" "), "-p udp --udp-datapath socket");
    }

    #[test]
    fn shell_line_quotes_every_word() {
        let a = DaemonArgs::tcp()
            .target6("[::1]:9000")
            .allowed("./it's.txt");
        assert_eq!(
            a.shell_line(Path::new("/bin/mm")),
            r"'/bin/mm' '-6' '[::1]:9000' '--allowed-subnets' './it'\''s.txt'"
        );
    }
}
