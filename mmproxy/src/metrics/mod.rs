//! What mmproxy tells a monitoring system (`--metrics ADDR:PORT`): Prometheus metrics,
//! liveness and readiness, served by [`http`].
//!
//! The data path counts into the plain relaxed atomics of [`Stats`], as it did before
//! there were metrics; [`Metrics`] is a `prometheus-client` [`Collector`] that reads
//! those atomics, and the kernel side's per-CPU counters, only when a scraper asks.
//! Registering prometheus-client's own `Counter`/`Family` types instead would put a
//! second set of counters (and, for labelled families, a lock and a hash lookup)
//! on every connection and datagram; reading at scrape time keeps counting a single
//! uncontended `fetch_add` and keeps one source of truth for the periodic stats line
//! and the metrics alike. The crate is still what writes the exposition formats, so
//! the text (Prometheus 0.0.4 and OpenMetrics 1.0) follows its escaping and suffix
//! rules rather than ours.
pub mod http;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mmproxy_common::{program_names, Counter};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;

use crate::cli::{Args, Protocol};
use crate::ebpf::KernelSide;
use crate::proxy_protocol::Invalid;
use crate::stats::{ConnectFailure, Histogram, Stats};

/// Every metric's name starts with `mmproxy_`.
pub const PREFIX: &str = "mmproxy";

/// The commit the daemon was built from (set by build.rs), or "unknown".
pub const COMMIT: &str = env!("MMPROXY_COMMIT");

/// Whether the process is ready to serve: every listener bound, the kernel side and
/// routing installed as configured. Starts not ready; written by the daemon at each
/// transition, read by `/readyz` and `mmproxy_ready`.
#[derive(Debug)]
pub struct Readiness(ArcSwap<State>);

#[derive(Debug)]
enum State {
    Ready,
    NotReady(Cow<'static, str>),
}

impl Readiness {
    /// Not ready, for `reason` (one line, shown by `/readyz`).
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self(ArcSwap::from_pointee(State::NotReady(reason.into())))
    }

    pub fn set_ready(&self) {
        self.0.store(Arc::new(State::Ready));
    }

    pub fn set_not_ready(&self, reason: impl Into<Cow<'static, str>>) {
        self.0.store(Arc::new(State::NotReady(reason.into())));
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        match &**self.0.load() {
            State::Ready => Ok(()),
            State::NotReady(reason) => Err(reason.to_string()),
        }
    }
}

/// What the metrics read from the kernel side at scrape time.
pub trait KernelView: Send + Sync {
    /// Counters summed over CPUs, named as [`Counter::name`] names them.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// (program name, attached) for every program of the BPF object.
    fn attached(&self) -> Vec<(&'static str, bool)>;
    /// How many interfaces hold the tc egress and the tc ingress program now.
    fn return_interfaces(&self) -> [u64; 2];
}

impl KernelView for Mutex<KernelSide> {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        // A panic elsewhere while holding the lock leaves the maps as they were: the
        // counters are still worth reading.
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters()
    }

    fn attached(&self) -> Vec<(&'static str, bool)> {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .attached_programs()
    }

    fn return_interfaces(&self) -> [u64; 2] {
        let now = self
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .return_interfaces();
        [now.egress.len() as u64, now.ingress.len() as u64]
    }
}

/// The collector: reads [`Stats`], the kernel side and the readiness at each scrape.
pub struct Metrics {
    stats: Arc<Stats>,
    readiness: Arc<Readiness>,
    /// Set once the kernel side is loaded. Weak, so that shutdown detaches the
    /// programs when the daemon lets go of them, whatever a scraper holds.
    kernel: OnceLock<Weak<dyn KernelView>>,
    protocol: Protocol,
    max_connections: u64,
    max_flows: u64,
    start_time: f64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(args: &Args, stats: Arc<Stats>, readiness: Arc<Readiness>) -> Self {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        Self {
            stats,
            readiness,
            kernel: OnceLock::new(),
            protocol: args.protocol,
            max_connections: u64::try_from(args.max_connections).unwrap_or(u64::MAX),
            max_flows: u64::try_from(args.max_flows).unwrap_or(u64::MAX),
            start_time,
        }
    }

    /// From now on scrapes include the kernel side's counters (while it is loaded).
    pub fn set_kernel(&self, kernel: Weak<dyn KernelView>) {
        // Set once at start-up; a second call has nothing new to say.
        let _ = self.kernel.set(kernel);
    }

    /// A registry holding this collector, every name prefixed with `mmproxy_`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self.clone()));
        registry
    }

    fn kernel(&self) -> Option<Arc<dyn KernelView>> {
        self.kernel.get().and_then(Weak::upgrade)
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

type Fmt = Result<(), std::fmt::Error>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> Fmt {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, unit, MetricType::Counter)?)
}

fn counters(
    e: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<&Unit>),
    label: &str,
    values: &[(&str, u64)],
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (value, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

fn gauge<V>(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: V) -> Fmt
where
    ConstGauge<V>: EncodeMetric,
{
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

/// A [`Histogram`] in seconds, through prometheus-client's histogram encoder.
fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> Fmt {
    let (sum, count, buckets) = h.snapshot();
    e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &*self.stats;
        let e = &mut e;
        let bytes = Some(&Unit::Bytes);
        let seconds = Some(&Unit::Seconds);

        Info::new([
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", COMMIT),
            (
                "bpf_embedded",
                if cfg!(mmproxy_bpf_object) {
                    "true"
                } else {
                    "false"
                },
            ),
        ])
        .encode(e.encode_descriptor(
            "build",
            "Version, commit and whether the BPF object is embedded.",
            None,
            MetricType::Info,
        )?)?;
        gauge(
            e,
            "start_time",
            "When the process started, in seconds since the Unix epoch.",
            seconds,
            self.start_time,
        )?;
        gauge(e, "ready", "1 while every listener is bound and the kernel side and routing are installed as configured (see /readyz).", None, u64::from(self.readiness.check().is_ok()))?;

        // The allow-list counter is shared by both protocols; only one runs.
        let (tcp_not_allowed, udp_not_allowed) = match self.protocol {
            Protocol::Tcp => (load(&s.rejected_not_allowed), 0),
            Protocol::Udp => (0, load(&s.rejected_not_allowed)),
        };

        counter(
            e,
            "tcp_connections_accepted",
            "TCP connections accepted from the listening sockets.",
            None,
            load(&s.tcp_accepted),
        )?;
        counter(
            e,
            "tcp_connections_proxied",
            "TCP connections whose header was valid and whose upstream connected.",
            None,
            load(&s.tcp_proxied),
        )?;
        let mut rejected: Vec<(&str, u64)> = vec![
            ("not_allowed", tcp_not_allowed),
            ("header_timeout", load(&s.rejected_header_timeout)),
            ("header_eof", load(&s.rejected_header_eof)),
            ("read_error", load(&s.rejected_read_error)),
        ];
        rejected.extend(
            Invalid::KINDS
                .iter()
                .zip(&s.rejected_invalid_header)
                .map(|(k, c)| (*k, load(c))),
        );
        counters(
            e,
            ("tcp_connections_rejected", "TCP connections closed before reaching the upstream, by reason: not_allowed (outside --allowed-subnets, in userspace), header_timeout, header_eof (closed by the peer before a complete header), read_error (the read failed, e.g. reset), or the kind of invalid header (not_proxy_protocol, too_long, v1_*, v2_*).", None),
            "reason",
            &rejected,
        )?;
        let failures: Vec<(&str, u64)> = ConnectFailure::ALL
            .iter()
            .zip(&s.upstream_connect_failed)
            .map(|(f, c)| (f.label(), load(c)))
            .collect();
        counters(
            e,
            ("tcp_upstream_connect_failures", "Upstream connects that failed, by errno class: refused, timeout, host_unreachable, net_unreachable, addr_in_use (the client's address and port are taken), permission, other.", None),
            "error",
            &failures,
        )?;
        histogram(
            e,
            "tcp_header_duration",
            "From accept to a complete PROXY header, for connections that sent one.",
            &s.header_duration,
        )?;
        histogram(
            e,
            "tcp_upstream_connect_duration",
            "Successful upstream connects, from opening the socket to connected.",
            &s.upstream_connect_duration,
        )?;
        counter(
            e,
            "tcp_relay_errors",
            "Relays that ended with an I/O error rather than two clean half-closes.",
            None,
            load(&s.relay_errors),
        )?;
        counter(
            e,
            "tcp_accept_errors",
            "accept() failures (EMFILE, ENFILE, ENOBUFS...), each followed by a back-off.",
            None,
            load(&s.accept_errors),
        )?;
        counters(
            e,
            ("tcp_relayed", "Bytes relayed, by direction: to_upstream (from the proxy to the service) or to_proxy.", bytes),
            "direction",
            &[("to_upstream", load(&s.bytes_up)), ("to_proxy", load(&s.bytes_down))],
        )?;
        gauge(
            e,
            "tcp_connections_open",
            "TCP connections open now.",
            None,
            load(&s.tcp_active),
        )?;
        gauge(
            e,
            "tcp_pipes_in_use",
            "Pipes holding in-flight bytes of a splice relay now.",
            None,
            u64::try_from(crate::tcp::relay::pipes_in_use()).unwrap_or(u64::MAX),
        )?;
        gauge(
            e,
            "tcp_connections_max",
            "Most concurrent TCP connections (--max-connections).",
            None,
            self.max_connections,
        )?;

        counter(
            e,
            "udp_datagrams_received",
            "UDP datagrams received from proxies, valid or not.",
            None,
            load(&s.udp_datagrams),
        )?;
        counters(
            e,
            ("udp_datagrams_dropped", "UDP datagrams from proxies not relayed, by reason: not_allowed (outside --allowed-subnets, in userspace), invalid_header, truncated (ends inside its header), oversized (larger than the receive buffer), no_source (no source address), upstream_error (could not be sent to the service).", None),
            "reason",
            &[
                ("not_allowed", udp_not_allowed),
                ("invalid_header", load(&s.udp_dropped_invalid)),
                ("truncated", load(&s.udp_dropped_truncated)),
                ("oversized", load(&s.udp_dropped_oversized)),
                ("no_source", load(&s.udp_dropped_no_source)),
                ("upstream_error", load(&s.udp_upstream_errors)),
            ],
        )?;
        counter(
            e,
            "udp_datagrams_sent",
            "UDP payloads sent to the service.",
            None,
            load(&s.udp_datagrams_sent),
        )?;
        counter(
            e,
            "udp_answers_relayed",
            "UDP answers relayed from the service back to a proxy.",
            None,
            load(&s.udp_replies),
        )?;
        counters(
            e,
            ("udp_answers_dropped", "Datagrams reaching a flow's socket that were not relayed back, by reason: foreign_port (not from the port the flow sends to), send_error.", None),
            "reason",
            &[("foreign_port", load(&s.udp_replies_foreign)), ("send_error", load(&s.udp_reply_errors))],
        )?;
        counter(
            e,
            "udp_flows_opened",
            "UDP flows opened.",
            None,
            load(&s.udp_flows_created),
        )?;
        counter(
            e,
            "udp_flows_expired",
            "UDP flows closed after --close-after idle seconds.",
            None,
            load(&s.udp_flows_expired),
        )?;
        counter(
            e,
            "udp_flows_evicted",
            "UDP flows evicted, least recently used first, because the table was full.",
            None,
            load(&s.udp_flows_evicted),
        )?;
        counter(
            e,
            "udp_flows_kernel_refused",
            "UDP flows (or a flow's new destination) that --udp-datapath kernel could not hand to the kernel: relayed in user space instead.",
            None,
            load(&s.udp_kernel_refused),
        )?;
        counter(
            e,
            "udp_flows_kernel_released",
            "Releases of the kernel's hold on new UDP flows, written once user space had taken their earlier datagrams: the kernel relays a flow from then on if its count agrees.",
            None,
            load(&s.udp_kernel_released),
        )?;
        gauge(
            e,
            "udp_flows_open",
            "UDP flows open now.",
            None,
            load(&s.udp_flows_active),
        )?;
        gauge(
            e,
            "udp_flows_max",
            "Most concurrent UDP flows (--max-flows).",
            None,
            self.max_flows,
        )?;

        counter(
            e,
            "return_path_evaluations",
            "Choices of the return path's interfaces made again after the host's links, addresses or routes changed (and once at start-up).",
            None,
            load(&s.return_path_evaluations),
        )?;
        counter(
            e,
            "return_path_updates",
            "Re-evaluations of the return path that attached or detached a tc program.",
            None,
            load(&s.return_path_updates),
        )?;
        counter(
            e,
            "return_path_errors",
            "Re-evaluations of the return path that failed (netlink, an attachment); each is retried.",
            None,
            load(&s.return_path_errors),
        )?;

        self.encode_kernel(e)
    }
}

impl Metrics {
    /// The kernel side's series. Its counters only exist while it is loaded; whether
    /// each program is attached is always said (0 without a kernel side).
    fn encode_kernel(&self, e: &mut DescriptorEncoder) -> Fmt {
        let kernel = self.kernel();
        let attached = kernel.as_ref().map(|k| k.attached()).unwrap_or_default();
        let programs = [
            program_names::SK_LOOKUP,
            program_names::TC_EGRESS,
            program_names::TC_INGRESS,
        ];
        let mut m = e.encode_descriptor(
            "kernel_program_attached",
            "1 when the BPF program is attached (sk_lookup to the network namespace, tc to at least one interface).",
            None,
            MetricType::Gauge,
        )?;
        for name in programs {
            let on = attached.iter().any(|(p, a)| *p == name && *a);
            let label = name.strip_prefix("mmproxy_").unwrap_or(name);
            ConstGauge::new(u64::from(on)).encode(m.encode_family(&[("program", label)])?)?;
        }
        let [egress, ingress] = kernel
            .as_ref()
            .map(|k| k.return_interfaces())
            .unwrap_or_default();
        let mut m = e.encode_descriptor(
            "return_path_interfaces",
            "Interfaces holding a return-path tc program now, by direction.",
            None,
            MetricType::Gauge,
        )?;
        for (direction, n) in [("egress", egress), ("ingress", ingress)] {
            ConstGauge::new(n).encode(m.encode_family(&[("direction", direction)])?)?;
        }
        let Some(kernel) = kernel else {
            return Ok(());
        };
        let values = kernel.counters();
        let v = |c: Counter| {
            values
                .iter()
                .find(|(name, _)| *name == c.name())
                .map_or(0, |(_, v)| *v)
        };
        let noun = match self.protocol {
            Protocol::Tcp => "connections",
            Protocol::Udp => "datagrams",
        };
        counters(
            e,
            ("kernel_refused", &format!("Proxy {noun} refused by sk_lookup before userspace saw them (outside --allowed-subnets), by family."), None),
            "family",
            &[("ipv4", v(Counter::RefusedV4)), ("ipv6", v(Counter::RefusedV6))],
        )?;
        counters(
            e,
            (
                "kernel_allowed",
                "Socket lookups matching a listen rule that sk_lookup let through, by family.",
                None,
            ),
            "family",
            &[
                ("ipv4", v(Counter::AllowedV4)),
                ("ipv6", v(Counter::AllowedV6)),
            ],
        )?;
        counter(
            e,
            "kernel_steered",
            "Lookups sk_lookup steered to the socket of a port range.",
            None,
            v(Counter::Steered),
        )?;
        counter(
            e,
            "kernel_steer_failures",
            "Lookups sk_lookup could not steer (empty slot, family mismatch).",
            None,
            v(Counter::SteerFailed),
        )?;
        counter(
            e,
            "kernel_own_upstream",
            "Lookups of mmproxy's own upstream connections (or datagrams) that sk_lookup passed to the service instead of steering them back to mmproxy.",
            None,
            v(Counter::OwnUpstream),
        )?;
        counters(
            e,
            ("kernel_return_packets", "Answers of live flows the tc programs handled: marked (arriving on an ingress interface) or redirected (generated here, redirected into lo).", None),
            "action",
            &[("marked", v(Counter::ReturnMarked)), ("redirected", v(Counter::ReturnRedirected))],
        )?;
        counters(
            e,
            ("kernel_udp_relayed", "Datagrams the tc programs relayed for live UDP flows (--udp-datapath kernel): in, from the proxy to the service; out, the service's answers to the proxy.", None),
            "direction",
            &[("in", v(Counter::UdpRelayedIn)), ("out", v(Counter::UdpRelayedOut))],
        )?;
        counters(
            e,
            ("kernel_udp_punted", "Datagrams to a UDP listen rule the tc programs left to user space, by reason (README: The UDP kernel datapath).", None),
            "reason",
            &[
                ("no_flow", v(Counter::UdpPuntedNoFlow)),
                ("header", v(Counter::UdpPuntedHeader)),
                ("packet", v(Counter::UdpPuntedPacket)),
                ("mtu", v(Counter::UdpPuntedMtu)),
                ("not_allowed", v(Counter::UdpPuntedNotAllowed)),
                ("held", v(Counter::UdpPuntedHeld)),
            ],
        )?;
        counter(
            e,
            "kernel_udp_relay_failures",
            "Packets a tc program failed to rewrite or redirect (dropped if already changed).",
            None,
            v(Counter::UdpRelayFailed),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--metrics {addr} is inside the TCP listen range {range}: the kernel side would \
         steer scrapes to the proxy"
    )]
    InListenRange { addr: SocketAddr, range: String },
}

/// What the daemon holds: the readiness it moves along, and the HTTP endpoint when
/// `--metrics` asks for one. Without `--metrics` every method is a no-op apart from
/// keeping the readiness.
pub struct Monitoring {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    endpoint: Option<(tokio::task::JoinHandle<()>, CancellationToken)>,
    /// A duplicate of the endpoint's socket, to hand to a successor (crate::handoff).
    socket: Option<std::os::fd::OwnedFd>,
}

impl Monitoring {
    /// Binds `--metrics` (when given) and starts serving, not ready yet.
    pub async fn start(args: &Args, stats: Arc<Stats>) -> Result<Self, MetricsError> {
        Self::start_with(args, stats, None).await
    }

    /// [`Monitoring::start`] on `inherited`, the previous instance's socket, when it
    /// is bound to the `--metrics` address (an upgrade, crate::handoff).
    pub async fn start_with(
        args: &Args,
        stats: Arc<Stats>,
        inherited: Option<std::net::TcpListener>,
    ) -> Result<Self, MetricsError> {
        let readiness = Arc::new(Readiness::new("starting up"));
        let metrics = Arc::new(Metrics::new(args, stats, readiness.clone()));
        let Some(addr) = args.metrics else {
            return Ok(Self {
                readiness,
                metrics,
                endpoint: None,
                socket: None,
            });
        };
        check_listen_ranges(args, addr)?;
        let inherited = inherited
            .filter(|l| {
                l.local_addr()
                    .is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip()))
            })
            .and_then(|l| {
                l.set_nonblocking(true).ok()?;
                tokio::net::TcpListener::from_std(l).ok()
            });
        let listener = match inherited {
            Some(l) => l,
            None => tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| MetricsError::Bind { addr, source })?,
        };
        let socket = std::os::fd::AsFd::as_fd(&listener)
            .try_clone_to_owned()
            .ok();
        let shown = listener.local_addr().unwrap_or(addr);
        let stop = CancellationToken::new();
        let task = tokio::spawn(http::serve(
            listener,
            Arc::new(metrics.registry()),
            readiness.clone(),
            http::Limits::default(),
            stop.clone(),
        ));
        tracing::info!("metrics: http://{shown}/metrics, /healthz, /readyz");
        Ok(Self {
            readiness,
            metrics,
            endpoint: Some((task, stop)),
            socket,
        })
    }

    /// The endpoint's socket, for a successor to serve on.
    pub fn endpoint_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.socket.as_ref().map(std::os::fd::AsFd::as_fd)
    }

    /// Stops answering scrapes: the successor serves the socket from now on.
    pub fn hand_over_endpoint(&mut self) {
        if let Some((_, stop)) = &self.endpoint {
            stop.cancel();
        }
        self.socket = None;
    }

    /// Scrapes include the kernel side from now on (nothing without one).
    pub fn kernel(&self, kernel: Option<&Arc<Mutex<KernelSide>>>) {
        if let Some(k) = kernel {
            let weak: Weak<dyn KernelView> = Arc::downgrade(k) as Weak<Mutex<KernelSide>>;
            self.metrics.set_kernel(weak);
        }
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Stops serving (after the shutdown grace: until then `/readyz` says why not).
    pub async fn stop(self) {
        if let Some((task, stop)) = self.endpoint {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// A `--metrics` port inside a TCP `-l` range would be steered to the proxy by
/// sk_lookup (a single port in use fails at bind instead).
pub(crate) fn check_listen_ranges(args: &Args, addr: SocketAddr) -> Result<(), MetricsError> {
    if args.protocol != Protocol::Tcp {
        return Ok(());
    }
    for spec in args.listen.iter().filter(|l| l.is_range()) {
        let same_addr =
            spec.addr == addr.ip() || spec.addr.is_unspecified() || addr.ip().is_unspecified();
        if same_addr && spec.ports.contains(&addr.port()) {
            return Err(MetricsError::InListenRange {
                addr,
                range: format!("{}:{}-{}", spec.addr, spec.ports.start(), spec.ports.end()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
