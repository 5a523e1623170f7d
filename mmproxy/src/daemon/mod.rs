//! Start-up, the signal loop and shutdown: the order in which the parts come up and
//! go down.
//!
//! Start-up fails (non-zero exit) on anything that would leave the daemon weaker than
//! asked: an unreadable allow-list, a listen address in use, `--ebpf on` without
//! BPF, routing that cannot be installed. Once ready, nothing a peer does ends it.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::allowed_subnets::SharedAllowList;
use crate::cli::{Args, Protocol};
use crate::ebpf::{FlowRegistry, UdpRelay};
use crate::handoff::{self, ListenSet};
use crate::metrics::Monitoring;
use crate::routing::{self, RoutingPlan};
use crate::stats::Stats;
use crate::tcp::{self, TcpContext};
use crate::udp;

mod kernel;
mod signals;

use kernel::{lock, start_kernel_side};
use signals::{signal_loop, spawn_stats_line, Signals};

/// How long shutdown waits for the accept loops to drop their listening sockets (they
/// end at their next poll; this only bounds a stuck one).
const ACCEPT_LOOPS_END: Duration = Duration::from_secs(2);

pub async fn run(args: Args) -> Result<()> {
    // The same checks as `mmproxy check`, before anything is changed: the
    // capabilities first (a low --metrics port needs one), then, with /readyz
    // already answering "starting up", the flags and the allowed-subnets file.
    let (_, capabilities) = crate::caps::assess_self(&args);
    if let Some(missing) = capabilities.fatal.into_iter().next() {
        return Err(missing.into());
    }
    if let Some(missing) = &capabilities.kernel_off {
        warn!("kernel side unavailable, running userspace-only: {missing}");
    }
    let kernel_possible = capabilities.kernel_off.is_none();

    let stats = Arc::new(Stats::default());
    let signals = Signals::install()?;
    // A running mmproxy with the same listen set hands its sockets over (an
    // upgrade): asked before anything is bound.
    let listen_set = ListenSet::of(&args);
    let mut takeover = handoff::start::ask(&listen_set).await?;
    let inherited_metrics = takeover
        .as_mut()
        .and_then(|t| t.metrics.take())
        .map(std::net::TcpListener::from);
    let mut monitoring = Monitoring::start_with(&args, stats.clone(), inherited_metrics).await?;
    let validated = crate::preflight::validate(&args)?;

    for w in validated.warnings {
        warn!("{w}");
    }
    let allowed = Arc::new(validated.allowed);
    let rules = validated.rules.filter(|_| kernel_possible);

    // Listening sockets first: a port in use is the commonest start-up error and
    // should be reported before anything is installed in the kernel.
    let bound = match takeover.as_mut() {
        Some(t) => Bound::inherit(&args, std::mem::take(&mut t.groups))?,
        None => Bound::bind(&args)?,
    };
    let offered = bound.duplicates();
    let kernel = match &bound {
        Bound::Tcp(groups) => start_kernel_side(&args, &allowed, rules.as_deref(), groups).await?,
        Bound::Udp(groups) => start_kernel_side(&args, &allowed, rules.as_deref(), groups).await?,
    };
    monitoring.kernel(kernel.as_ref());
    let follower = crate::netwatch::start(&args, kernel.as_ref(), &stats).await;
    let steering = kernel
        .as_ref()
        .map(lock)
        .filter(|k| k.return_steering())
        .map(|k| k.flows());
    // sk_lookup tells mmproxy's own upstream connections from proxies' by their
    // registered flow, when a listen rule may cover the upstream.
    let tcp_flows = steering.clone().or_else(|| {
        kernel
            .as_ref()
            .filter(|_| crate::loop_guard::upstream_may_match_a_listen_rule(&args))
            .map(|k| lock(k).flows())
    });

    let routes = if args.no_routing {
        None
    } else {
        let mut plan = RoutingPlan::for_targets(args.route_table, &routed_targets(&args));
        if steering.is_some() {
            plan = plan.with_fwmark(args.return_mark);
        }
        let installed = routing::install(&plan)
            .await
            .context("installing return-path routing (use --no-routing to manage it yourself)")?;
        info!("return-path routing: {}", installed.describe());
        Some(installed)
    };

    let shutdown = CancellationToken::new();
    // UDP flows outlive `shutdown` until this is cancelled (after a handoff: at the
    // end of the grace period).
    let drain = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The TCP accept loops alone: they own the listening sockets, so once they have
    // ended nothing more can be accepted here.
    let accepting = TaskTracker::new();
    let serving = Serving {
        args: &args,
        stats: &stats,
        allowed: &allowed,
        shutdown: &shutdown,
        drain: &drain,
        tracker: &tracker,
        accepting: &accepting,
    };
    let listening = match bound {
        Bound::Tcp(groups) => serving.tcp(groups, tcp_flows)?,
        // Whenever the kernel side is loaded, not only when tc steers: sk_lookup also
        // consults the flow table, so that an answer to a client port inside a
        // wildcard listen range is not taken for a proxy's datagram.
        Bound::Udp(groups) => {
            let (flows, relay) = match kernel.as_ref().map(lock) {
                Some(k) => (Some(k.flows()), k.udp_relay()),
                None => (None, None),
            };
            // Loaded at all with --udp-datapath kernel means loaded with the relay;
            // never run weaker than asked.
            if crate::preflight::kernel_udp_datapath(&args) && relay.is_none() {
                anyhow::bail!("--udp-datapath kernel: the kernel side has no UDP relay");
            }
            serving.udp(groups, flows, relay)?
        }
    };
    // Before the ready line: after an upgrade, ready means the old instance has
    // stopped accepting, and the offer to the next one is up.
    let offer =
        handoff::start::settle(takeover, &listen_set, offered, monitoring.endpoint_socket()).await;
    monitoring.readiness().set_ready();
    info!(
        listen = %listening.join(","),
        ebpf = kernel.is_some(),
        "mmproxy ready"
    );
    crate::notify::ready();
    let _watchdog = crate::notify::spawn_watchdog();

    let stats_task = spawn_stats_line(args.stats_interval, stats.clone(), kernel.clone());
    let successor = signal_loop(
        signals,
        &args,
        &allowed,
        kernel.as_ref(),
        &stats,
        offer.as_ref(),
    )
    .await;
    monitoring.readiness().set_not_ready("shutting down");
    // Withdrawn first: its duplicates would keep the listening sockets open.
    drop(offer);

    shutdown.cancel();
    accepting.close();
    // Announced only once true: a connection made after the "stopping" line is
    // refused, not accepted and then dropped.
    if tokio::time::timeout(ACCEPT_LOOPS_END, accepting.wait())
        .await
        .is_err()
    {
        warn!("the accept loops had not ended {ACCEPT_LOOPS_END:?} after shutdown");
    }
    match &successor {
        Some(s) => {
            monitoring.hand_over_endpoint();
            info!(
                new_pid = s.pid,
                connections = stats.tcp_active.load(std::sync::atomic::Ordering::Relaxed),
                udp_flows = stats
                    .udp_flows_active
                    .load(std::sync::atomic::Ordering::Relaxed),
                "handed over: the new mmproxy serves; live connections and flows here get {:?}",
                args.shutdown_grace
            );
            crate::notify::handed_over(s.pid.unsigned_abs());
        }
        None => {
            info!(
                "stopping: no new connections; live ones get {:?}",
                args.shutdown_grace
            );
            crate::notify::stopping();
            drain.cancel();
        }
    }
    if let Some(s) = successor {
        s.release();
    }
    tracker.close();
    // Live connections and flows still need the return path: their answers come
    // back through the routing rules and the tc programs. Both go only once the
    // connections have ended or the grace period is over.
    if tokio::time::timeout(args.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        drain.cancel();
        warn!(
            "{} connections and {} UDP flows still open after the grace period; closing them",
            stats.tcp_active.load(std::sync::atomic::Ordering::Relaxed),
            stats
                .udp_flows_active
                .load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if let Some(routes) = routes {
        match routes.remove().await {
            Ok(report) => info!("return-path routing: {report}"),
            Err(e) => error!(
                error = &e as &dyn std::error::Error,
                "return-path routing not fully removed"
            ),
        }
    }
    drop(follower);
    drop(kernel);
    stats_task.abort();
    monitoring.stop().await;
    info!("stopped; {}", stats.render());
    Ok(())
}

/// The targets the return-path routing is planned for. With `-dynamic-destination`
/// the header names the service, most often on loopback (go-mmproxy fork's set-ups),
/// so loopback is served whatever `-4`/`-6` say.
fn routed_targets(args: &Args) -> Vec<std::net::IpAddr> {
    let mut targets = vec![args.target4.addr, args.target6.addr];
    if args.dynamic_destination {
        targets.extend([
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ]);
    }
    targets
}

/// The listening sockets of every `-l`, one group of `--listeners` sockets each.
enum Bound {
    Tcp(Vec<Vec<std::net::TcpListener>>),
    Udp(Vec<Vec<std::net::UdpSocket>>),
}

impl Bound {
    /// The sockets a running mmproxy handed over, checked against `args`.
    fn inherit(args: &Args, groups: Vec<Vec<std::os::fd::OwnedFd>>) -> Result<Self> {
        Ok(match args.protocol {
            Protocol::Tcp => Bound::Tcp(handoff::start::inherit(args, groups)?),
            Protocol::Udp => Bound::Udp(handoff::start::inherit(args, groups)?),
        })
    }

    fn duplicates(&self) -> Vec<Vec<std::os::fd::OwnedFd>> {
        match self {
            Bound::Tcp(g) => handoff::start::duplicates(g),
            Bound::Udp(g) => handoff::start::duplicates(g),
        }
    }

    /// Binds each `-l` on its first port (a range is steered there by the kernel).
    fn bind(args: &Args) -> Result<Self> {
        let addrs = args
            .listen
            .iter()
            .map(|spec| SocketAddr::new(spec.addr, *spec.ports.start()));
        let listening = |addr: SocketAddr| move || format!("listening on {addr}");
        Ok(match args.protocol {
            Protocol::Tcp => Bound::Tcp(
                addrs
                    .map(|a| {
                        tcp::bind_tcp_with(a, args.listeners, args.listen_transparent)
                            .with_context(listening(a))
                    })
                    .collect::<Result<_>>()?,
            ),
            Protocol::Udp => Bound::Udp(
                addrs
                    .map(|a| {
                        udp::bind_udp_with(a, args.listeners, args.listen_transparent)
                            .with_context(listening(a))
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// What every serving task shares; each method spawns one task per socket and
/// returns the addresses now served.
struct Serving<'a> {
    args: &'a Args,
    stats: &'a Arc<Stats>,
    allowed: &'a Arc<SharedAllowList>,
    shutdown: &'a CancellationToken,
    drain: &'a CancellationToken,
    tracker: &'a TaskTracker,
    accepting: &'a TaskTracker,
}

impl Serving<'_> {
    fn tcp(
        &self,
        groups: Vec<Vec<std::net::TcpListener>>,
        flows: Option<Arc<dyn FlowRegistry>>,
    ) -> Result<Vec<String>> {
        let mut ctx = TcpContext::from_args(self.args, self.stats.clone());
        ctx.upstream.flows = flows;
        let ctx = Arc::new(ctx);
        let limits = Arc::new(Semaphore::new(self.args.max_connections));
        let mut listening = Vec::new();
        for socket in groups.into_iter().flatten() {
            let socket =
                tokio::net::TcpListener::from_std(socket).context("registering listener")?;
            listening.push(shown(socket.local_addr()));
            let allowed = self.allowed.clone();
            self.accepting.spawn(tcp::serve_tcp(
                socket,
                ctx.clone(),
                move |ip| allowed.allows(ip),
                limits.clone(),
                self.shutdown.clone(),
                self.tracker.clone(),
            ));
        }
        Ok(listening)
    }

    fn udp(
        &self,
        groups: Vec<Vec<std::net::UdpSocket>>,
        flows: Option<Arc<dyn FlowRegistry>>,
        relay: Option<Arc<dyn UdpRelay>>,
    ) -> Result<Vec<String>> {
        udp::raise_nofile_limit(self.args.max_flows);
        let mut ctx = udp::UdpContext::from_args(self.args, self.stats.clone());
        ctx.upstream.flows = flows;
        ctx.relay = relay;
        let ctx = Arc::new(ctx);
        let mut listening = Vec::new();
        for socket in groups.into_iter().flatten() {
            let socket =
                tokio::net::UdpSocket::from_std(socket).context("registering UDP socket")?;
            listening.push(shown(socket.local_addr()));
            let allowed = self.allowed.clone();
            self.tracker.spawn(udp::serve_udp_draining(
                socket,
                ctx.clone(),
                move |ip| allowed.allows(ip),
                self.shutdown.clone(),
                self.drain.clone(),
            ));
        }
        Ok(listening)
    }
}

fn shown(addr: std::io::Result<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_default()
}
