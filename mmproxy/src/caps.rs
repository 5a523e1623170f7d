//! The capabilities each requested feature needs, checked against the process's
//! effective set before anything is set up, so a missing one is reported as one
//! line naming it and the unit directive that grants it, instead of an EPERM from
//! deep inside a netlink or bpf(2) call.
//!
//! Root holds every capability, so this only ever speaks up for a non-root daemon
//! (the shipped units run as the `mmproxy` user with ambient capabilities) or one
//! started with a reduced bounding set.
use std::fmt;
use std::net::SocketAddr;

use crate::cli::{Args, EbpfMode};

/// The capabilities mmproxy's features use (linux/capability.h numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    NetBindService,
    NetAdmin,
    NetRaw,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Cap {
    fn bit(self) -> u32 {
        match self {
            Cap::NetBindService => 10,
            Cap::NetAdmin => 12,
            Cap::NetRaw => 13,
            Cap::SysAdmin => 21,
            Cap::Perfmon => 38,
            Cap::Bpf => 39,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cap::NetBindService => "CAP_NET_BIND_SERVICE",
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::NetRaw => "CAP_NET_RAW",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    /// The ones `check` lists as held or not.
    pub const RELEVANT: [Cap; 4] = [Cap::NetAdmin, Cap::Bpf, Cap::Perfmon, Cap::NetBindService];
}

/// A capability set (a bit mask, as `/proc/<pid>/status` shows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(u64);

impl CapSet {
    /// This process's effective set.
    pub fn effective() -> std::io::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        Self::from_status(&status).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no CapEff line in /proc/self/status",
            )
        })
    }

    /// The `CapEff:` line of a `/proc/<pid>/status` text.
    pub fn from_status(status: &str) -> Option<Self> {
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok().map(Self)
    }

    pub fn of(caps: &[Cap]) -> Self {
        Self(caps.iter().fold(0, |m, c| m | 1 << c.bit()))
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1 << cap.bit()) != 0
    }

    /// Whether `cap` is effectively available: CAP_SYS_ADMIN also grants what
    /// CAP_BPF and CAP_PERFMON split off from it (and is all older kernels know).
    fn grants(self, cap: Cap) -> bool {
        self.has(cap) || (matches!(cap, Cap::Bpf | Cap::Perfmon) && self.has(Cap::SysAdmin))
    }
}

/// One feature that is short of capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub caps: Vec<Cap>,
    /// What needs them, as a noun phrase ("the kernel side").
    pub needed_for: String,
    /// What else the operator can do, if anything ("run with --ebpf off").
    pub instead: Option<&'static str>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.caps.iter().map(|c| c.name()).collect();
        let (verb, it) = if names.len() == 1 {
            ("is", "it")
        } else {
            ("are", "them")
        };
        let list = names.join(" ");
        write!(
            f,
            "{} {verb} missing: {} needs {it}; grant {it} with AmbientCapabilities={list} \
             (and the same in CapabilityBoundingSet=)",
            names.join(" and "),
            self.needed_for
        )?;
        if let Some(instead) = self.instead {
            write!(f, " or {instead}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Missing {}

/// What the configuration asks for, measured against what the process holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    /// Start-up cannot succeed: each of these would fail it.
    pub fatal: Vec<Missing>,
    /// `--ebpf auto` without the kernel side's capabilities: it stays off.
    pub kernel_off: Option<Missing>,
}

/// Measures `args` against `held` (`None`: unknown, nothing is reported).
/// `unprivileged_port_start` is the namespace's `net.ipv4.ip_unprivileged_port_start`.
pub fn assess(args: &Args, held: Option<CapSet>, unprivileged_port_start: u16) -> Assessment {
    let mut out = Assessment::default();
    let Some(held) = held else {
        return out;
    };
    let missing =
        |caps: &[Cap]| -> Vec<Cap> { caps.iter().copied().filter(|c| !held.grants(*c)).collect() };
    // IP_TRANSPARENT takes CAP_NET_RAW as well as CAP_NET_ADMIN.
    if !held.has(Cap::NetAdmin) && !held.has(Cap::NetRaw) {
        out.fatal.push(Missing {
            caps: vec![Cap::NetAdmin],
            needed_for: "connecting upstream from the client's address (IP_TRANSPARENT)".into(),
            instead: None,
        });
    }
    if !args.no_routing {
        let caps = missing(&[Cap::NetAdmin]);
        if !caps.is_empty() && !out.fatal.iter().any(|m| m.caps == caps) {
            out.fatal.push(Missing {
                caps,
                needed_for: "installing the return-path routing".into(),
                instead: Some("run with --no-routing and install the routes yourself"),
            });
        }
    }
    if args.ebpf != EbpfMode::Off {
        let caps = missing(&[Cap::Bpf, Cap::Perfmon, Cap::NetAdmin]);
        if !caps.is_empty() {
            let ranges = args.listen.iter().any(|l| l.is_range());
            let udp_kernel = crate::preflight::kernel_udp_datapath(args);
            let required = ranges || udp_kernel || args.ebpf == EbpfMode::On;
            let (needed_for, instead) = if ranges {
                ("the kernel side (port ranges in -l)", None)
            } else if udp_kernel {
                (
                    "the kernel side (--udp-datapath kernel)",
                    Some("run with --udp-datapath socket"),
                )
            } else if args.ebpf == EbpfMode::On {
                ("the kernel side (--ebpf on)", Some("run with --ebpf off"))
            } else {
                ("the kernel side", Some("run with --ebpf off"))
            };
            let m = Missing {
                caps,
                needed_for: needed_for.into(),
                instead,
            };
            if required {
                out.fatal.push(m);
            } else {
                out.kernel_off = Some(m);
            }
        }
    }
    if !held.has(Cap::NetBindService) {
        let low = |port: u16| port < unprivileged_port_start;
        let listens = args.listen.iter().filter(|l| low(*l.ports.start()));
        for spec in listens {
            let addr = SocketAddr::new(spec.addr, *spec.ports.start());
            out.fatal.push(Missing {
                caps: vec![Cap::NetBindService],
                needed_for: format!("listening on {addr} (-l)"),
                instead: None,
            });
        }
        if let Some(addr) = args.metrics.filter(|a| low(a.port())) {
            out.fatal.push(Missing {
                caps: vec![Cap::NetBindService],
                needed_for: format!("serving --metrics on {addr}"),
                instead: None,
            });
        }
    }
    out
}

/// `net.ipv4.ip_unprivileged_port_start` of this network namespace (1024 when it
/// cannot be read).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// [`assess`] for this process, as start-up and `check` run it.
pub fn assess_self(args: &Args) -> (Option<CapSet>, Assessment) {
    let held = match CapSet::effective() {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "cannot read the effective capabilities; not checking them up front"
            );
            None
        }
    };
    (held, assess(args, held, unprivileged_port_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["mmproxy"];
        v.extend_from_slice(extra);
        Args::try_from_iter(v).unwrap()
    }

    const UNIT: [Cap; 4] = [Cap::NetAdmin, Cap::Bpf, Cap::Perfmon, Cap::NetBindService];

    #[test]
    fn parses_the_effective_set_from_proc_status() {
        let status = "Name:\tmmproxy\nCapInh:\t0000000000000000\nCapEff:\t000000c000001400\n";
        let set = CapSet::from_status(status).unwrap();
        assert_eq!(set, CapSet::of(&UNIT));
        assert!(set.has(Cap::Bpf) && !set.has(Cap::SysAdmin));
        assert_eq!(CapSet::from_status("Name: x\n"), None);
    }

    #[test]
    fn the_units_set_is_enough_for_everything() {
        let held = Some(CapSet::of(&UNIT));
        for a in [
            args(&["-l", "0.0.0.0:443", "--ebpf", "on"]),
            args(&["-l", "0.0.0.0:20000-20999", "-4", "127.0.0.1"]),
            args(&["--metrics", "127.0.0.1:99"]),
        ] {
            assert_eq!(assess(&a, held, 1024), Assessment::default(), "{a:?}");
        }
    }

    #[test]
    fn each_missing_capability_is_named_with_its_directive() {
        let without = |cap: Cap| {
            Some(CapSet::of(&UNIT.map(|c| {
                if c == cap {
                    Cap::NetRaw
                } else {
                    c
                }
            })))
        };
        let on = args(&["--ebpf", "on"]);
        let a = assess(&on, without(Cap::Bpf), 1024);
        assert_eq!(a.fatal.len(), 1, "{a:?}");
        assert_eq!(
            a.fatal[0].to_string(),
            "CAP_BPF is missing: the kernel side (--ebpf on) needs it; grant it with \
             AmbientCapabilities=CAP_BPF (and the same in CapabilityBoundingSet=) or run \
             with --ebpf off"
        );
        // auto: the kernel side stays off, start-up goes on.
        let a = assess(&args(&[]), without(Cap::Perfmon), 1024);
        assert!(a.fatal.is_empty(), "{a:?}");
        assert_eq!(a.kernel_off.unwrap().caps, [Cap::Perfmon]);
        // ... unless a port range needs it.
        let a = assess(&args(&["-l", "0.0.0.0:2000-2001"]), without(Cap::Bpf), 1024);
        assert_eq!(a.fatal[0].caps, [Cap::Bpf]);
        assert!(a.fatal[0].to_string().contains("port ranges"));
        // ... or the kernel UDP datapath (tc programs: CAP_NET_ADMIN too).
        let udp = args(&["-p", "udp", "--udp-datapath", "kernel"]);
        let a = assess(&udp, without(Cap::NetAdmin), 1024);
        let kernel = a
            .fatal
            .iter()
            .find(|m| m.needed_for.contains("--udp-datapath kernel"))
            .unwrap_or_else(|| panic!("{a:?}"));
        assert_eq!(kernel.caps, [Cap::NetAdmin]);
        assert!(kernel
            .to_string()
            .contains("or run with --udp-datapath socket"));
        assert!(a.kernel_off.is_none());
        // A low port, as the unprivileged port start says.
        let low = args(&["-l", "0.0.0.0:443", "--ebpf", "off"]);
        let a = assess(&low, without(Cap::NetBindService), 1024);
        assert_eq!(a.fatal[0].caps, [Cap::NetBindService]);
        assert!(a.fatal[0].to_string().contains("listening on 0.0.0.0:443"));
        assert!(assess(&low, without(Cap::NetBindService), 80)
            .fatal
            .is_empty());
    }

    #[test]
    fn without_net_admin_routing_and_transparency_are_named_once() {
        let held = Some(CapSet::of(&[Cap::Bpf, Cap::Perfmon]));
        let a = assess(&args(&["--ebpf", "off"]), held, 1024);
        assert_eq!(a.fatal.len(), 1, "{a:?}");
        assert_eq!(a.fatal[0].caps, [Cap::NetAdmin]);
        // CAP_NET_RAW is enough for IP_TRANSPARENT, not for the routing.
        let raw = Some(CapSet::of(&[Cap::NetRaw]));
        let a = assess(&args(&["--ebpf", "off"]), raw, 1024);
        assert!(a.fatal[0].needed_for.contains("routing"), "{a:?}");
        let a = assess(&args(&["--ebpf", "off", "--no-routing"]), raw, 1024);
        assert!(a.fatal.is_empty(), "{a:?}");
        // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON.
        let admin = Some(CapSet::of(&[Cap::NetAdmin, Cap::SysAdmin]));
        assert_eq!(
            assess(&args(&["--ebpf", "on"]), admin, 1024),
            Assessment::default()
        );
    }
}
