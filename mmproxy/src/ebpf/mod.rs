//! The kernel side, seen from the daemon: loads the embedded BPF object, attaches the
//! sk_lookup program to the daemon's network namespace and the return-path tc
//! programs to the interfaces [`ifaces`] chose ([`tc_links`], again whenever the
//! choice changes), and keeps the maps in step with the configuration and the live
//! flows ([`flow_map`]).
//!
//! Everything is held by [`KernelSide`]: programs are attached through links owned by
//! this process, so dropping it — or the process dying, even by SIGKILL — detaches
//! them. Nothing is pinned to bpffs.
pub mod flow_map;
pub mod ifaces;
mod loader;
mod neighbour;
mod probe;
pub mod relay_map;
mod rtnl_query;
mod rules;
mod subnets;
mod sysctl;
pub mod tc_links;
pub mod udp_relay;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockMap};
use aya::programs::{ProgramError, SkLookup};
use aya::{Ebpf, EbpfError as AyaError};
use ipnet::{Ipv4Net, Ipv6Net};
use mmproxy_common::{
    map_names, program_names, Config, Counter, FlowKey, ListenRule, RelayAction, RelayKey,
    RelayRelease,
};
use tokio::io::unix::AsyncFd;

use flow_map::KernelFlows;
pub use flow_map::{FlowMapError, FlowProtocol, FlowRegistration, FlowRegistry, ReturnFlow};
pub use ifaces::{ReturnInterfaces, ReturnPolicy};
pub use probe::{has_tcx, object_embedded, probe};
use relay_map::KernelUdpRelay;
pub use rules::listen_rules;
use subnets::{v4_keys, v6_keys, SubnetTrie};
use sysctl::AcceptLocal;
use tc_links::{Direction, TcChanges, TcLinks};
pub use udp_relay::{HeldPunts, RelayError, RelayFlow, RelayRegistration, UdpRelay};

/// Set to 1 to make [`KernelSide::load`] fail, so the userspace fallback of
/// `--ebpf auto` can be tested on a machine where BPF works.
pub const FAIL_ENV: &str = "MMPROXY_TEST_FAIL_BPF";

/// The BPF object built by `cargo xtask build`, or empty when the daemon was built
/// without it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mmproxy.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this mmproxy was built without its BPF object (build it with `cargo xtask build`)")]
    NoObject,
    #[error("loading the BPF object")]
    Load(#[source] Box<AyaError>),
    #[error("the BPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("loading or attaching program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("opening this process's network namespace")]
    Netns(#[source] std::io::Error),
    #[error("{given} listen rules, the kernel side holds at most {max}")]
    TooManyRules { given: usize, max: usize },
    #[error("{given} allowed subnets, the kernel side holds at most {max}")]
    TooManySubnets { given: usize, max: usize },
    #[error("attaching {program} to {iface} ({direction})")]
    Attach {
        program: &'static str,
        iface: String,
        direction: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "setting net.ipv4.conf.lo.accept_local (answers redirected into lo carry a local source address)"
    )]
    Sysctl(#[source] std::io::Error),
    #[error("no interface lo in this network namespace")]
    NoLoopback,
    #[error("BPF disabled for a test by {FAIL_ENV}=1")]
    ForcedFailure,
}

impl EbpfError {
    /// A short hint for the one warning printed when falling back to userspace.
    pub fn hint(&self) -> &'static str {
        if matches!(self, EbpfError::NoObject) {
            return "rebuild with `cargo xtask build`";
        }
        if matches!(self, EbpfError::ForcedFailure) {
            return "unset the variable to use the kernel side";
        }
        // EPERM is a missing capability; EACCES from BPF_PROG_LOAD is the verifier.
        let mut errnos = os_errors(self).filter_map(|e| e.raw_os_error());
        if errnos.any(|n| n == libc::EPERM) {
            "needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root)"
        } else if matches!(self, EbpfError::Program { .. })
            && causes(self).any(|e| e.to_string().contains("Verifier output"))
        {
            "the kernel's verifier rejected the program (see the verifier output above)"
        } else if matches!(self, EbpfError::Attach { .. }) {
            "needs Linux >= 6.6 for tc links (TCX), which go away with the process"
        } else {
            "needs Linux >= 5.9 with BPF sk_lookup support"
        }
    }
}

/// The causes of `e`, for telling which hint fits (aya's syscall errors keep the OS
/// error in a cause, not in their own text). Printing the chain is the top level's
/// job.
fn causes(e: &EbpfError) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(e), |e| e.source())
}

fn os_errors(e: &EbpfError) -> impl Iterator<Item = &std::io::Error> {
    causes(e).filter_map(|e| e.downcast_ref::<std::io::Error>())
}

/// What the daemon asks of the kernel side.
pub struct KernelOptions<'a> {
    pub rules: &'a [ListenRule],
    /// `None`: no allow-list, everyone allowed (go-mmproxy's behaviour).
    pub allowed: Option<(&'a [Ipv4Net], &'a [Ipv6Net])>,
    /// Kernel events are only formatted and sent up at this verbosity.
    pub verbose: u8,
    /// Interfaces for the return-path tc programs now.
    pub return_path: &'a ReturnInterfaces,
    /// Answers may need steering, now or after the host's network changes
    /// ([`ReturnPolicy::may_steer`]): flows are registered.
    pub may_steer: bool,
    /// Mark on steered answers (`--return-mark`).
    pub return_mark: u32,
    /// Capacity of the flow table: concurrent TCP connections plus UDP flows.
    pub flow_capacity: u32,
    /// `--udp-datapath kernel`: the tc programs relay established UDP flows.
    pub udp_relay: bool,
    /// `--max-header-size`, for the kernel's PROXY header check.
    pub max_header_len: u32,
    /// Capacity of the UDP relay table with `udp_relay`: two entries per UDP flow.
    pub relay_capacity: u32,
}

/// The loaded, attached kernel side. Dropping it detaches everything.
pub struct KernelSide {
    // Field order matters for drop: the maps and logger before the object.
    allowed_v4: SubnetTrie<[u8; 4]>,
    allowed_v6: SubnetTrie<[u8; 16]>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    listeners: SockMap<MapData>,
    flows: Arc<KernelFlows>,
    /// `UDP_RELAY`, with `--udp-datapath kernel`.
    udp_relay: Option<Arc<KernelUdpRelay>>,
    /// Answers of registered flows may be steered by tc, now or later.
    return_steering: bool,
    /// Which interfaces hold the tc programs.
    tc: TcLinks,
    /// lo's accept_local is on for this process (restored by the last one out).
    accept_local: Option<AcceptLocal>,
    logger: Option<tokio::task::JoinHandle<()>>,
    _ebpf: Ebpf,
}

impl KernelSide {
    pub fn load(opts: &KernelOptions<'_>) -> Result<Self, EbpfError> {
        if std::env::var(FAIL_ENV).as_deref() == Ok("1") {
            return Err(EbpfError::ForcedFailure);
        }
        if OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        // aya-log levels: 1 error … 4 debug. Per-lookup events only at -v 2, so the
        // program does not even write them to the ring buffer otherwise.
        let log_level: u8 = if opts.verbose >= 2 { 4 } else { 2 };
        let flow_capacity = opts.flow_capacity.max(1);
        // Without the relay the map is never used: one entry instead of its
        // preallocated default (LRU maps cannot be allocated lazily).
        let relay_capacity = if opts.udp_relay {
            opts.relay_capacity.max(2)
        } else {
            1
        };
        let mut ebpf = loader::loader(OBJECT)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .map_max_entries(map_names::FLOWS, flow_capacity)
            .map_max_entries(map_names::UDP_RELAY, relay_capacity)
            .map_max_entries(map_names::UDP_RELEASE, relay_capacity)
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(spawn_log_forwarder(logger)),
            Err(e) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "kernel-side log forwarding unavailable"
                );
                None
            }
        };

        let mut rules_map: Array<MapData, ListenRule> = take(&mut ebpf, map_names::LISTEN_RULES)?;
        let mut config: Array<MapData, Config> = take(&mut ebpf, map_names::CONFIG)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, map_names::COUNTERS)?;
        let listeners: SockMap<MapData> = take(&mut ebpf, map_names::LISTENERS)?;
        let flows_map: HashMap<MapData, FlowKey, u8> = take(&mut ebpf, map_names::FLOWS)?;
        let mut allowed_v4 = SubnetTrie::new(
            take(&mut ebpf, map_names::ALLOWED_V4)?,
            map_names::ALLOWED_V4,
        );
        let mut allowed_v6 = SubnetTrie::new(
            take(&mut ebpf, map_names::ALLOWED_V6)?,
            map_names::ALLOWED_V6,
        );

        // Maps are filled before the program is attached, so the very first lookup it
        // sees already runs with the full policy.
        for (i, rule) in opts.rules.iter().enumerate() {
            rules_map
                .set(i as u32, rule, 0)
                .map_err(|source| map_err(map_names::LISTEN_RULES, source))?;
        }
        if let Some((v4, v6)) = opts.allowed {
            check_subnet_capacity(v4.len() + v6.len())?;
            allowed_v4.replace(v4_keys(v4))?;
            allowed_v6.replace(v6_keys(v6))?;
        }
        let lo_ifindex = if_index("lo").ok_or(EbpfError::NoLoopback)?;
        let udp_relay = if opts.udp_relay {
            let map: HashMap<MapData, RelayKey, RelayAction> =
                take(&mut ebpf, map_names::UDP_RELAY)?;
            let release: HashMap<MapData, RelayKey, RelayRelease> =
                take(&mut ebpf, map_names::UDP_RELEASE)?;
            Some(Arc::new(KernelUdpRelay::new(map, release, lo_ifindex)))
        } else {
            None
        };
        let cfg = Config {
            rule_count: opts.rules.len() as u32,
            filter_enabled: u32::from(opts.allowed.is_some()),
            return_mark: opts.return_mark,
            lo_ifindex,
            udp_relay: u32::from(opts.udp_relay),
            max_header_len: opts.max_header_len,
            route_epoch: 0,
        };
        config
            .set(0, cfg, 0)
            .map_err(|source| map_err(map_names::CONFIG, source))?;

        let program: &mut SkLookup = ebpf
            .program_mut(program_names::SK_LOOKUP)
            .ok_or(EbpfError::Missing {
                kind: "program",
                name: program_names::SK_LOOKUP,
            })?
            .try_into()
            .map_err(|source| prog_err(program_names::SK_LOOKUP, source))?;
        program
            .load()
            .map_err(|source| prog_err(program_names::SK_LOOKUP, source))?;
        let netns = File::open("/proc/self/ns/net").map_err(EbpfError::Netns)?;
        program
            .attach(netns)
            .map_err(|source| prog_err(program_names::SK_LOOKUP, source))?;

        let mut kernel = Self {
            allowed_v4,
            allowed_v6,
            config,
            counters,
            listeners,
            flows: KernelFlows::new(flows_map, flow_capacity),
            udp_relay,
            return_steering: opts.may_steer || !opts.return_path.is_empty(),
            tc: TcLinks::default(),
            accept_local: None,
            logger,
            _ebpf: ebpf,
        };
        // Start-up fails unless every program asked for is attached.
        let changes = kernel.set_return_path(opts.return_path);
        if let Some(e) = changes.failed.into_iter().next() {
            return Err(e);
        }
        Ok(kernel)
    }

    /// Puts the tc programs on exactly the interfaces of `want`. The links are
    /// owned by the programs inside `_ebpf`: they close with it, or with the process
    /// however it ends.
    pub fn set_return_path(&mut self, want: &ReturnInterfaces) -> TcChanges {
        // The relay's programs go on only with the relay; a network change may
        // have moved a target's route, which new flows must follow.
        let mut want = want.clone();
        let mut epoch_failed = None;
        match &self.udp_relay {
            Some(relay) => {
                let epoch = relay.forget_routes();
                epoch_failed = self.set_route_epoch(epoch).err();
            }
            None => {
                want.udp_in.clear();
                want.lo_egress.clear();
            }
        }
        let want = &want;
        // Answers redirected into lo carry one of this host's addresses as their
        // source, which lo drops as martian unless accept_local is on. Once on, it
        // stays on until exit (the last instance restores it).
        let mut sysctl_failed = None;
        if !want.egress.is_empty() && self.accept_local.is_none() {
            match AcceptLocal::enable() {
                Ok(setting) => self.accept_local = Some(setting),
                Err(e) => sysctl_failed = Some(EbpfError::Sysctl(e)),
            }
        }
        let mut changes = self
            .tc
            .apply(&mut self._ebpf, want, sysctl_failed.is_some());
        changes.failed.extend(sysctl_failed);
        changes.failed.extend(epoch_failed);
        changes
    }

    /// Tells the tc programs the routes changed (`Config::route_epoch`): answers'
    /// next hops chosen before are not used any more.
    fn set_route_epoch(&mut self, epoch: u32) -> Result<(), EbpfError> {
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(|source| map_err(map_names::CONFIG, source))?;
        cfg.route_epoch = epoch;
        self.config
            .set(0, cfg, 0)
            .map_err(|source| map_err(map_names::CONFIG, source))
    }

    /// The interfaces holding each tc program now.
    pub fn return_interfaces(&self) -> ReturnInterfaces {
        self.tc.current()
    }

    /// Where the proxies register their upstream flows.
    pub fn flows(&self) -> Arc<dyn FlowRegistry> {
        Arc::new(self.flows.clone())
    }

    /// Where the UDP proxy hands established flows to the kernel; `None` unless
    /// loaded with [`KernelOptions::udp_relay`].
    pub fn udp_relay(&self) -> Option<Arc<dyn UdpRelay>> {
        self.udp_relay.clone().map(|r| r as Arc<dyn UdpRelay>)
    }

    /// Whether tc programs may steer answers of registered flows, now or once the
    /// host's network changes (then the `fwmark` rule is needed, and the proxies
    /// must register their flows).
    pub fn return_steering(&self) -> bool {
        self.return_steering
    }

    /// Swaps the allow-list (SIGHUP). `None` allows everyone.
    pub fn set_allowed(
        &mut self,
        allowed: Option<(&[Ipv4Net], &[Ipv6Net])>,
    ) -> Result<(), EbpfError> {
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(|source| map_err(map_names::CONFIG, source))?;
        match allowed {
            Some((v4, v6)) => {
                check_subnet_capacity(v4.len() + v6.len())?;
                self.allowed_v4.replace(v4_keys(v4))?;
                self.allowed_v6.replace(v6_keys(v6))?;
                // Enabled only once the tries hold the new list.
                cfg.filter_enabled = 1;
                self.config
                    .set(0, cfg, 0)
                    .map_err(|source| map_err(map_names::CONFIG, source))?;
            }
            None => {
                // Disabled before the tries are emptied, so no allowed source is ever refused.
                cfg.filter_enabled = 0;
                self.config
                    .set(0, cfg, 0)
                    .map_err(|source| map_err(map_names::CONFIG, source))?;
                self.allowed_v4.replace(Default::default())?;
                self.allowed_v6.replace(Default::default())?;
            }
        }
        Ok(())
    }

    /// Puts a listening socket where rules with `sock_index == index` steer to.
    pub fn register_listener<S: AsRawFd>(
        &mut self,
        index: u32,
        socket: &S,
    ) -> Result<(), EbpfError> {
        self.listeners
            .set(index, socket, 0)
            .map_err(|source| map_err(map_names::LISTENERS, source))
    }

    /// (program, attached) for every program of the BPF object.
    pub fn attached_programs(&self) -> Vec<(&'static str, bool)> {
        vec![
            (program_names::SK_LOOKUP, true),
            (program_names::TC_EGRESS, self.tc.holds(Direction::Egress)),
            (program_names::TC_INGRESS, self.tc.holds(Direction::Ingress)),
            (program_names::TC_UDP_IN, self.tc.holds(Direction::UdpIn)),
            (
                program_names::TC_LO_EGRESS,
                self.tc.holds(Direction::LoEgress),
            ),
        ]
    }

    /// Kernel counters summed over CPUs, with their names.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

impl Drop for KernelSide {
    fn drop(&mut self) {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
        if let Some(setting) = self.accept_local.take() {
            if let Err(e) = setting.release() {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "restoring net.ipv4.conf.lo.accept_local"
                );
            }
        }
    }
}

fn if_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn check_subnet_capacity(given: usize) -> Result<(), EbpfError> {
    let max = mmproxy_common::MAX_ALLOWED_SUBNETS as usize;
    if given > max {
        return Err(EbpfError::TooManySubnets { given, max });
    }
    Ok(())
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| map_err(name, source))
}

fn map_err(map: &'static str, source: MapError) -> EbpfError {
    EbpfError::Map { map, source }
}

fn prog_err(program: &'static str, source: ProgramError) -> EbpfError {
    EbpfError::Program { program, source }
}

/// Forwards aya-log records from the kernel's ring buffer into the daemon's log as
/// they arrive.
fn spawn_log_forwarder(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // SAFETY: the logger owns the ring buffer's descriptor for as long as the
        // AsyncFd holds it, and nothing else closes or replaces that descriptor.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "kernel-side log forwarding unavailable"
                );
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    })
}
