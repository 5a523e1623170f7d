//! Command line: go-mmproxy's flags with their meanings and defaults, plus additive
//! mmproxy flags.
//!
//! Go's `flag` package accepts `-name`, `--name`, `-name=value` and `--name=value`
//! for every flag, short or long. Operators' unit files use all of these, so argv is
//! normalised to clap's conventions before parsing (see [`normalize_go_flags`]).
use std::ffi::OsString;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, ValueEnum};

use crate::proxy_protocol::DEFAULT_MAX_HEADER_LEN;

/// Flags that go-mmproxy defines, as written after the dash(es).
const GO_SHORT: &[&str] = &["l", "4", "6", "p", "v"];
const GO_LONG: &[&str] = &[
    "allowed-subnets",
    "close-after",
    "listeners",
    "mark",
    "dynamic-destination",
    "listen-transparent",
];
/// go-mmproxy's boolean flags (the maintained fork's): Go also accepts
/// `-name=true` / `-name=false`, which clap's switches do not.
const GO_BOOL: &[&str] = &["dynamic-destination", "listen-transparent"];

/// The command line: the daemon's flags, or `check` followed by the same flags.
#[derive(Parser, Debug)]
#[command(
    name = "mmproxy",
    version = env!("MMPROXY_VERSION"),
    about = "Unwraps PROXY protocol v1/v2 and connects to the service from the original client's address",
    long_about = None,
    args_conflicts_with_subcommands = true,
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Subcommand>,
    #[command(flatten)]
    args: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Check the configuration and this host, changing nothing (like `nginx -t`)
    ///
    /// Validates the flags and the allowed-subnets file as start-up does, probes this
    /// host (capabilities held, BPF and sk_lookup, the tc interfaces, the sysctl it
    /// would change, its routing table) and prints what would happen at start as a
    /// table; exits non-zero where start-up would fail. Takes the daemon's flags,
    /// go-mmproxy spellings included: `mmproxy check -l 0.0.0.0:443 -allowed-subnets
    /// /etc/mmproxy/allowed-subnets.txt`.
    Check(Args),
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run the daemon.
    Run(Args),
    /// `mmproxy check FLAGS`: validate and probe, change nothing.
    Check(Args),
}

impl Invocation {
    /// Parses the process's own argv, go-mmproxy spellings included; exits with
    /// clap's message on a bad command line.
    pub fn from_env() -> Self {
        Self::from_cli(Cli::parse_from(normalize_go_flags(std::env::args_os())))
    }

    /// Parses the given argv (first element: program name).
    pub fn try_from_iter<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Cli::try_parse_from(normalize_go_flags(args.into_iter().map(Into::into)))
            .map(Self::from_cli)
    }

    fn from_cli(cli: Cli) -> Self {
        match cli.command {
            Some(Subcommand::Check(args)) => Self::Check(args),
            None => Self::Run(cli.args),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address the proxy listens on; repeatable; the port may be a range (20000-20999)
    #[arg(
        short = 'l',
        value_name = "ADDR:PORT[-PORT]",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: Vec<ListenSpec>,

    /// Address to which IPv4 traffic will be forwarded to (port optional: then the
    /// PROXY header's destination port is used)
    #[arg(
        short = '4',
        value_name = "ADDR[:PORT]",
        default_value = "127.0.0.1:443"
    )]
    pub target4: TargetSpec,

    /// Address to which IPv6 traffic will be forwarded to (port optional)
    #[arg(short = '6', value_name = "[ADDR][:PORT]", default_value = "[::1]:443")]
    pub target6: TargetSpec,

    /// Protocol that will be proxied: tcp, udp
    #[arg(short = 'p', value_enum, default_value_t = Protocol::Tcp)]
    pub protocol: Protocol,

    /// Path to a file that contains allowed subnets of the proxy servers
    #[arg(long = "allowed-subnets", value_name = "PATH")]
    pub allowed_subnets: Option<PathBuf>,

    /// Number of seconds after which UDP socket will be cleaned up
    #[arg(long = "close-after", value_name = "SECONDS", default_value_t = 60)]
    pub close_after: u64,

    /// Number of listener sockets that will be opened for the listen address (SO_REUSEPORT)
    #[arg(long = "listeners", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub listeners: u16,

    /// The mark that will be set on outbound packets (0: none)
    #[arg(long = "mark", default_value_t = 0)]
    pub mark: u32,

    /// Forward to the destination address and port named in the PROXY header instead
    /// of the -4/-6 targets (go-mmproxy fork's flag; LOCAL headers still use -4/-6).
    /// Any proxy allowed by --allowed-subnets can then reach any address this host
    /// can: list only trusted balancers
    #[arg(long = "dynamic-destination")]
    pub dynamic_destination: bool,

    /// Set IP_TRANSPARENT on the listening sockets, so connections and datagrams an
    /// iptables/nft TPROXY rule diverts to -l are accepted (go-mmproxy fork's flag)
    #[arg(long = "listen-transparent")]
    pub listen_transparent: bool,

    /// 0 - no logging of individual connections; 1 - log errors occurring in
    /// individual connections; 2 - log all state changes of individual connections
    #[arg(short = 'v', default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub verbose: u8,

    /// Seconds to wait for a complete PROXY header before closing the connection
    #[arg(long = "header-timeout", value_name = "SECONDS", default_value = "5", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Largest PROXY header accepted, in bytes (v2 headers carry TLVs)
    #[arg(long = "max-header-size", value_name = "BYTES", default_value_t = DEFAULT_MAX_HEADER_LEN,
          value_parser = clap::value_parser!(u64).range(108..=65551).map(|v| v as usize))]
    pub max_header_len: usize,

    /// Seconds allowed for connecting to the upstream
    #[arg(long = "connect-timeout", value_name = "SECONDS", default_value = "5", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Most concurrent TCP connections; further ones wait in the listen backlog
    #[arg(long = "max-connections", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most concurrent UDP flows; the least recently used is evicted beyond it
    #[arg(long = "max-flows", default_value_t = 65_536)]
    pub max_flows: usize,

    /// Seconds live connections get to finish after SIGTERM/SIGINT, or after a new
    /// mmproxy took the listening sockets over (upgrade, SIGUSR2)
    #[arg(long = "shutdown-grace", value_name = "SECONDS", default_value = "10", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Do not install the policy routing the return path needs (go-mmproxy behaviour:
    /// you write `ip rule`/`ip route` yourself)
    #[arg(long = "no-routing")]
    pub no_routing: bool,

    /// Routing table for the return-path routes
    #[arg(long = "route-table", default_value_t = 123, value_parser = clap::value_parser!(u32).range(1..=0xffff_fff0))]
    pub route_table: u32,

    /// Firewall mark the kernel side puts on return traffic it steers
    #[arg(long = "return-mark", default_value_t = 0x6d6d_7078)]
    pub return_mark: u32,

    /// Also steer answers of live flows that leave or arrive through this interface
    /// (repeatable; Ethernet-type only). By default mmproxy picks the default-route
    /// interface for targets on this host and the interface towards other targets
    #[arg(long = "return-interface", value_name = "IFACE")]
    pub return_interfaces: Vec<String>,

    /// Kernel-side filtering and steering: auto (use when available), on (require), off
    #[arg(long = "ebpf", value_enum, default_value_t = EbpfMode::Auto)]
    pub ebpf: EbpfMode,

    /// UDP datapath (-p udp): socket (every datagram through user space) or kernel
    /// (established flows relayed both ways by tc programs, user space only for each
    /// flow's first datagram; needs the kernel side). Kernel-relayed datagrams skip
    /// netfilter's OUTPUT/POSTROUTING hooks (and conntrack/NAT there), which is why
    /// it is opt-in
    #[arg(long = "udp-datapath", value_enum, default_value_t = UdpDatapath::Socket)]
    pub udp_datapath: UdpDatapath,

    /// Log line format
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Seconds between statistics log lines (0: never)
    #[arg(long = "stats-interval", value_name = "SECONDS", default_value = "60", value_parser = parse_duration)]
    pub stats_interval: Duration,

    /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this address
    /// (off by default)
    #[arg(long = "metrics", value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// The clap definition of the command line, for the man page and the shell
/// completions (`cargo xtask dist`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

impl Args {
    /// Parses the given argv (first element: program name), go-mmproxy spellings
    /// included; the flags of `check` too.
    pub fn try_from_iter<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Invocation::try_from_iter(args).map(|i| match i {
            Invocation::Run(a) | Invocation::Check(a) => a,
        })
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfMode {
    Auto,
    On,
    Off,
}

/// `--udp-datapath`: who relays the datagrams of established UDP flows.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDatapath {
    /// Every datagram and answer through user space's sockets.
    Socket,
    /// tc programs relay established flows; user space sees each flow's first
    /// datagram and whatever the kernel leaves to it.
    Kernel,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `-l` value: an address and an inclusive port range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: IpAddr,
    pub ports: RangeInclusive<u16>,
}

impl ListenSpec {
    /// A range needs the kernel side to steer it; a single port is a plain listener.
    pub fn is_range(&self) -> bool {
        self.ports.start() != self.ports.end()
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = split_host_port(s)?;
        let addr = parse_host(host)?;
        let port = port.ok_or_else(|| format!("{s:?}: a listen address needs a port"))?;
        let ports = match port.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse_port(lo)?, parse_port(hi)?);
                if lo > hi {
                    return Err(format!("{s:?}: port range {lo}-{hi} is empty"));
                }
                lo..=hi
            }
            None => {
                let p = parse_port(port)?;
                p..=p
            }
        };
        if *ports.start() == 0 {
            return Err(format!("{s:?}: port 0 cannot be listened on"));
        }
        Ok(Self { addr, ports })
    }
}

/// `-4` / `-6` value: the service's address, with an optional port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub addr: IpAddr,
    /// `None`: use the destination port from the PROXY header.
    pub port: Option<u16>,
}

impl FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = split_host_port(s)?;
        let addr = parse_host(host)?;
        let port = port.map(parse_port).transpose()?;
        if port == Some(0) {
            return Err(format!("{s:?}: target port 0 is not connectable"));
        }
        Ok(Self { addr, port })
    }
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 address.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']'"))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host, Some(p))),
                None => Err(format!("{s:?}: expected ':' after ']'")),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            Ok((h, Some(p)))
        }
        // A bare IPv6 address without brackets has no port.
        _ => Ok((s, None)),
    }
}

fn parse_host(host: &str) -> Result<IpAddr, String> {
    if host.is_empty() {
        // Go's net.Listen(":8443") means every address.
        return Ok(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    }
    host.parse()
        .map_err(|_| format!("{host:?} is not an IP address"))
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{p:?} is not a port number"));
    }
    p.parse().map_err(|_| format!("port {p} is out of range"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("{s:?} is not a sensible number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Rewrites Go-style flag spellings into clap's: `-allowed-subnets x` and
/// `--allowed-subnets=x` → `--allowed-subnets x`; `--l x` / `-l=x` → `-l x`.
/// Everything after `--` is left alone.
pub fn normalize_go_flags<I>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = OsString>,
{
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for arg in args {
        if rest_verbatim {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        let body = s.strip_prefix("--").or_else(|| s.strip_prefix('-'));
        let Some(body) = body.filter(|b| !b.is_empty()) else {
            out.push(arg);
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let flag = if GO_SHORT.contains(&name) {
            format!("-{name}")
        } else if GO_LONG.contains(&name) || s.starts_with("--") {
            format!("--{name}")
        } else {
            // An unknown single-dash word: leave it for clap to report.
            out.push(arg);
            continue;
        };
        if GO_BOOL.contains(&name) {
            match value.map(go_bool) {
                None | Some(Some(true)) => out.push(flag.into()),
                Some(Some(false)) => {}
                // Not a Go boolean: left for clap to report.
                Some(None) => out.push(arg),
            }
            continue;
        }
        out.push(flag.into());
        if let Some(v) = value {
            out.push(v.into());
        }
    }
    out
}

/// A boolean as Go's `strconv.ParseBool` reads it.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        let mut v = vec!["mmproxy"];
        v.extend_from_slice(args);
        match Args::try_from_iter(v) {
            Ok(a) => a,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn defaults_match_go_mmproxy() {
        let a = parse(&[]);
        assert_eq!(
            a.listen,
            vec!["0.0.0.0:8443".parse::<ListenSpec>().unwrap()]
        );
        assert_eq!(a.target4, "127.0.0.1:443".parse().unwrap());
        assert_eq!(a.target6, "[::1]:443".parse().unwrap());
        assert_eq!(a.protocol, Protocol::Tcp);
        assert_eq!(a.allowed_subnets, None);
        assert_eq!(a.close_after, 60);
        assert_eq!(a.listeners, 1);
        assert_eq!(a.mark, 0);
        assert_eq!(a.verbose, 0);
        assert_eq!(a.metrics, None);
    }

    #[test]
    fn metrics_takes_an_address_and_port() {
        let a = parse(&["--metrics", "127.0.0.1:9100"]);
        assert_eq!(a.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        let a = parse(&["--metrics=[::1]:9100"]);
        assert_eq!(a.metrics, Some("[::1]:9100".parse().unwrap()));
        for bad in ["9100", "localhost:9100", "127.0.0.1"] {
            assert!(
                Args::try_from_iter(["mmproxy", "--metrics", bad]).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn seed_readme_example_parses() {
        let a = parse(&[
            "-l",
            "0.0.0.0:25577",
            "-4",
            "127.0.0.1:25578",
            "-6",
            "[::1]:25578",
            "--allowed-subnets",
            "./path-prefixes.txt",
        ]);
        assert_eq!(a.listen[0].ports, 25577..=25577);
        assert_eq!(a.target4.port, Some(25578));
        assert_eq!(a.target6.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            a.allowed_subnets,
            Some(PathBuf::from("./path-prefixes.txt"))
        );
    }

    #[test]
    fn udp_datapath_defaults_to_socket() {
        assert_eq!(parse(&[]).udp_datapath, UdpDatapath::Socket);
        let a = parse(&["-p", "udp", "--udp-datapath", "kernel"]);
        assert_eq!(a.udp_datapath, UdpDatapath::Kernel);
        assert!(Args::try_from_iter(["mmproxy", "--udp-datapath", "xdp"]).is_err());
    }

    #[test]
    fn go_spellings_are_accepted() {
        let a = parse(&[
            "-allowed-subnets",
            "a.txt",
            "-close-after=30",
            "--listeners=4",
            "-mark",
            "7",
            "--l",
            "127.0.0.1:1",
            "-p=udp",
            "--v=2",
        ]);
        assert_eq!(a.allowed_subnets, Some(PathBuf::from("a.txt")));
        assert_eq!(a.close_after, 30);
        assert_eq!(a.listeners, 4);
        assert_eq!(a.mark, 7);
        assert_eq!(a.listen[0].addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(a.protocol, Protocol::Udp);
        assert_eq!(a.verbose, 2);
    }

    #[test]
    fn the_forks_switches_in_every_go_spelling() {
        let a = parse(&[]);
        assert!(!a.dynamic_destination && !a.listen_transparent);
        for on in [
            &["-dynamic-destination", "-listen-transparent"][..],
            &["--dynamic-destination", "--listen-transparent"],
            &["-dynamic-destination=true", "--listen-transparent=1"],
        ] {
            let a = parse(on);
            assert!(a.dynamic_destination && a.listen_transparent, "{on:?}");
        }
        let a = parse(&["-dynamic-destination=false", "-listen-transparent=F"]);
        assert!(!a.dynamic_destination && !a.listen_transparent);
        // A switch takes no separate value: the next word is not eaten.
        let a = parse(&["-dynamic-destination", "-l", "127.0.0.1:1"]);
        assert!(a.dynamic_destination);
        assert_eq!(a.listen[0].ports, 1..=1);
        assert!(Args::try_from_iter(["mmproxy", "-dynamic-destination=yes"]).is_err());
    }

    #[test]
    fn listen_ranges_and_repeats() {
        let a = parse(&["-l", "0.0.0.0:20000-20999", "-l", "[::]:443"]);
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.listen[0].ports, 20000..=20999);
        assert!(a.listen[0].is_range());
        assert_eq!(a.listen[1].addr, "::".parse::<IpAddr>().unwrap());
        assert!(!a.listen[1].is_range());
    }

    #[test]
    fn target_port_is_optional() {
        let a = parse(&["-4", "127.0.0.1", "-6", "[::1]"]);
        assert_eq!(a.target4.port, None);
        assert_eq!(a.target6.port, None);
        let t: TargetSpec = "::1".parse().unwrap();
        assert_eq!(t.port, None);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["-l", "0.0.0.0:70000"][..],
            &["-l", "0.0.0.0:2000-1000"],
            &["-l", "0.0.0.0"],
            &["-l", "0.0.0.0:0"],
            &["-4", "not-an-ip:1"],
            &["-4", "127.0.0.1:+80"],
            &["-6", "[::1:443"],
            &["-v", "3"],
            &["-p", "sctp"],
            &["--listeners", "0"],
        ] {
            let mut v = vec!["mmproxy"];
            v.extend_from_slice(bad);
            assert!(Args::try_from_iter(v).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn version_names_the_commit_and_the_bpf_object() {
        let version = command().render_version();
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        assert!(version.contains("(commit "), "{version}");
        assert!(version.contains("BPF object"), "{version}");
    }

    #[test]
    fn check_takes_the_daemons_flags_in_go_spellings_too() {
        let inv = Invocation::try_from_iter([
            "mmproxy",
            "check",
            "-l",
            "0.0.0.0:25577",
            "-allowed-subnets",
            "a.txt",
            "-mark=7",
        ])
        .unwrap();
        let Invocation::Check(a) = inv else {
            panic!("not check: {inv:?}")
        };
        assert_eq!(a.allowed_subnets, Some(PathBuf::from("a.txt")));
        assert_eq!(a.mark, 7);
        assert!(matches!(
            Invocation::try_from_iter(["mmproxy", "-v", "1"]).unwrap(),
            Invocation::Run(_)
        ));
        let help = command().render_long_help().to_string();
        assert!(help.contains("check"), "{help}");
    }

    #[test]
    fn values_after_double_dash_are_untouched() {
        let v = normalize_go_flags(["x", "--", "-mark"].map(OsString::from));
        assert_eq!(v, ["x", "--", "-mark"].map(OsString::from));
    }
}
