//! The UDP listening sockets and their tasks (ARCHITECTURE.md, steps 1 to 4): receive
//! a batch, check each proxy against the allow-list, decode the header, find or open
//! the flow and send the payloads on, consecutive datagrams of one flow in one
//! sendmmsg(2).
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use socket2::{Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::addr::{canonical, ProxyAddr, Shown, UpstreamAddr};
use crate::logging::CONN_TARGET;
use crate::proxy_protocol::{self, DatagramError, Endpoints};
use crate::sockopt;
use crate::stats::Stats;

use super::batch::{self, Received, RecvBatch, SendBatch, MAX_DATAGRAM};
use super::flow::{open_flow, AnswerRoute, Flow, FlowId};
use super::flow_table::FlowTable;
use super::kernel_relay::Arrival;
use super::limits::LogLimit;
use super::release::Releases;
use super::reply_socket::{reply_for, ReplyKey, ReplySockets};
use super::{UdpContext, ERROR_PAUSE};

/// Datagrams moved per recvmmsg/sendmmsg call on a listening socket.
const LISTENER_BATCH: usize = 32;
/// Flows at the tail of a full table whose kernel activity is read before one is
/// evicted (`--udp-datapath kernel`; each look is two map lookups).
const EVICTION_LOOKS: usize = 4;
/// Receives at most made at once, after a batch, for flows waiting to be released
/// by the kernel (`super::release`); beyond them the next readiness goes on.
const RELEASE_LOOKS: usize = 4;
/// Receive buffer asked for on listening sockets: bursts from a balancer arrive
/// faster than flows are set up, and the 208 KiB default holds ~300 small datagrams.
const LISTENER_RCVBUF: usize = 4 << 20;

/// Opens `count` UDP sockets on `addr` (at least one), sharing it through
/// SO_REUSEPORT when more than one; with port 0 the first socket's port is used for
/// the rest. Each has PKTINFO and ORIGDSTADDR reception on (answers are sent from the
/// address and port the proxy used), a larger receive buffer, and IPv6 ones are
/// IPV6_V6ONLY.
///
/// SO_REUSEADDR is set so a flow whose client uses the listening port itself (NTP
/// clients send from 123, some DNS clients from 53) can still bind its transparent
/// socket to that port on the client's address: without it on both sockets the
/// kernel refuses the bind as overlapping with the wildcard listener.
pub fn bind_udp(addr: SocketAddr, count: u16) -> io::Result<Vec<std::net::UdpSocket>> {
    bind_udp_with(addr, count, false)
}

/// [`bind_udp`], with IP_TRANSPARENT on each socket when `transparent`
/// (`-listen-transparent`, [`sockopt::set_listen_transparent`]).
pub fn bind_udp_with(
    addr: SocketAddr,
    count: u16,
    transparent: bool,
) -> io::Result<Vec<std::net::UdpSocket>> {
    sockopt::bind_group(addr, count, |addr, reuse_port| {
        bind_datagram_listener(addr, reuse_port, transparent)
    })
}

fn bind_datagram_listener(
    addr: SocketAddr,
    reuse_port: bool,
    transparent: bool,
) -> io::Result<Socket> {
    let socket = sockopt::listening_socket(addr, Type::DGRAM, Protocol::UDP, reuse_port)?;
    if transparent {
        sockopt::set_listen_transparent(&socket, addr.is_ipv6())?;
    }
    sockopt::set_recv_pktinfo(&socket, addr.is_ipv6())?;
    sockopt::set_recv_orig_dst_addr(&socket, addr.is_ipv6())?;
    sockopt::set_large_rcvbuf(&socket, LISTENER_RCVBUF);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Serves one listening socket until `shutdown`: see the module docs of
/// [`crate::udp`]. `allowed` is asked about every proxy address (IPv4-mapped ones as
/// IPv4).
pub async fn serve_udp<F>(
    socket: UdpSocket,
    ctx: Arc<UdpContext>,
    allowed: F,
    shutdown: CancellationToken,
) where
    F: Fn(IpAddr) -> bool + Send + Sync + 'static,
{
    // Flows close with the listener.
    let drained = CancellationToken::new();
    drained.cancel();
    serve_udp_draining(socket, ctx, allowed, shutdown, drained).await;
}

/// [`serve_udp`], and after `shutdown` the flows stay open until each has been idle
/// for `--close-after` or `drain` is cancelled: after an upgrade the answers to
/// datagrams already sent still reach the proxy while the new instance receives.
/// Without `drain` cancelled at some point it waits for every flow to go idle.
pub async fn serve_udp_draining<F>(
    socket: UdpSocket,
    ctx: Arc<UdpContext>,
    allowed: F,
    shutdown: CancellationToken,
    drain: CancellationToken,
) where
    F: Fn(IpAddr) -> bool + Send + Sync + 'static,
{
    let local = socket.local_addr().ok();
    let mut listener = DatagramListener {
        recv: RecvBatch::new(LISTENER_BATCH, MAX_DATAGRAM),
        send: SendBatch::new(LISTENER_BATCH),
        flows: ListenerFlows {
            socket: Arc::new(socket),
            local_port: local.map_or(0, |a| a.port()),
            table: FlowTable::new(ctx.flows_per_listener),
            replies: ReplySockets::default(),
            releases: Releases::default(),
            log: LogLimit::default(),
            allowed,
            ctx,
        },
    };
    let mut sweep = tokio::time::interval(listener.flows.ctx.sweep_every());
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => listener.flows.sweep(),
            ready = listener.flows.socket.readable() => {
                if let Err(e) = ready {
                    warn!(listen = ?local, error = &e as &dyn std::error::Error,
                          "UDP listener stopped");
                    break;
                }
                match listener.receive() {
                    Ok(Receive::Batch) => {
                        pause = Duration::ZERO;
                        listener.relay_batch();
                        listener.settle_releases();
                    }
                    Ok(Receive::Empty) => listener.flows.queue_empty(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        pause = (pause * 2).clamp(ERROR_PAUSE, Duration::from_secs(1));
                        let flows = &mut listener.flows;
                        if flows.log.allow(flows.ctx.clock.now_ms()) {
                            warn!(listen = ?local, error = &e as &dyn std::error::Error,
                                  retry_in = ?pause, "receiving on the UDP listener failed");
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
        }
    }
    while !listener.flows.table.is_empty() {
        tokio::select! {
            biased;
            () = drain.cancelled() => break,
            _ = sweep.tick() => listener.flows.sweep(),
        }
    }
    let open = listener.flows.table.len();
    // Dropping the flows aborts their tasks and closes their sockets.
    listener.flows.table.drain().for_each(drop);
    debug!(listen = ?local, flows_closed = open, "UDP listener stopped");
}

/// What a receive on the listening socket found.
enum Receive {
    /// Datagrams, now in the receive batch.
    Batch,
    /// The queue empty.
    Empty,
}

/// One listening socket's task: its batch buffers, and the rest apart from them so a
/// batch can be relayed while the flows change.
struct DatagramListener<F> {
    recv: RecvBatch,
    send: SendBatch,
    flows: ListenerFlows<F>,
}

/// Everything a received datagram is checked against and handed to.
struct ListenerFlows<F> {
    socket: Arc<UdpSocket>,
    local_port: u16,
    table: FlowTable<FlowId, Flow>,
    replies: ReplySockets,
    /// Flows the kernel holds with datagrams of theirs seen here.
    releases: Releases,
    log: LogLimit,
    allowed: F,
    ctx: Arc<UdpContext>,
}

/// A datagram from an allowed proxy with a valid header.
struct Admitted<'d> {
    /// As received, where answers go.
    source: SocketAddr,
    proxy: ProxyAddr,
    endpoints: Endpoints,
    payload: &'d [u8],
}

impl<F: Fn(IpAddr) -> bool> DatagramListener<F> {
    /// One recvmmsg, if tokio still sees the socket readable (WouldBlock if not).
    fn receive(&mut self) -> io::Result<Receive> {
        let fd = self.flows.socket.as_raw_fd();
        let recv = &mut self.recv;
        // Set only by a receive that got datagrams, so a batch is never relayed twice
        // whatever try_io returns.
        let mut fresh = false;
        // Whether recvmmsg ran at all: tokio answers WouldBlock without calling it
        // when it has no readiness, which says nothing about the queue.
        let mut looked = false;
        let received = self.flows.socket.try_io(Interest::READABLE, || {
            looked = true;
            recv.recv(fd)?;
            fresh = true;
            // WouldBlock clears tokio's readiness (only if no newer event arrived
            // meanwhile), sparing the EAGAIN call.
            if recv.drained() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match received {
            Ok(()) => Ok(Receive::Batch),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && fresh => Ok(Receive::Batch),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && looked => Ok(Receive::Empty),
            Err(e) => Err(e),
        }
    }

    /// Handles every datagram of the last receive: consecutive datagrams for one flow
    /// leave in one sendmmsg.
    fn relay_batch(&mut self) {
        let DatagramListener { recv, send, flows } = self;
        let now = flows.ctx.clock.now_ms();
        Stats::add(&flows.ctx.stats.udp_datagrams, recv.len() as u64);
        let mut out = ToUpstream {
            out: send.start(),
            fd: None,
        };
        for d in (0..recv.len()).map_while(|i| recv.get(i)) {
            if let Some((fd, target, payload)) = flows.dispatch(&d, &mut out, now) {
                out.push(fd, target, payload, &flows.ctx.stats, &mut flows.log, now);
            }
        }
        out.flush(&flows.ctx.stats, &mut flows.log, now);
        flows
            .releases
            .after_batch(recv.drained(), &mut flows.table, &flows.ctx.stats);
    }

    /// After a batch that emptied the queue, with flows waiting to be released:
    /// another receive at once, so a flow whose datagrams have all been taken is
    /// released now rather than at its next datagram. It calls recvmmsg directly:
    /// tokio's readiness was cleared by the batch, and anything that arrived since
    /// sets it again, so nothing is left unseen.
    fn settle_releases(&mut self) {
        let fd = self.flows.socket.as_raw_fd();
        for _ in 0..RELEASE_LOOKS {
            if !self.recv.drained() || !self.flows.releases.pending() {
                return;
            }
            match self.recv.recv(fd) {
                Ok(0) => {}
                Ok(_) => {
                    self.relay_batch();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The next receive from the main loop meets it and reports it.
                Err(_) => return,
            }
            self.flows.queue_empty();
            return;
        }
    }
}

impl<F: Fn(IpAddr) -> bool> ListenerFlows<F> {
    /// Where a received datagram's payload goes: its flow's socket (opened if new) and
    /// target. `None` when it is dropped (counted and logged).
    fn dispatch<'d>(
        &mut self,
        d: &Received<'d>,
        out: &mut ToUpstream<'_, '_>,
        now: u64,
    ) -> Option<(RawFd, UpstreamAddr, &'d [u8])> {
        let admitted = self.admit(d, now)?;
        // LOCAL without a target port goes to the port the proxy sent to.
        let sent_to_port = d.orig_dst.map_or(self.local_port, |a| a.port());
        let routed = self
            .ctx
            .upstream
            .route(admitted.endpoints, admitted.proxy, || Ok(sent_to_port));
        let (client, target) = match routed {
            Ok(route) => route,
            Err(e) => {
                Stats::inc(&self.ctx.stats.udp_upstream_errors);
                if self.log.allow(now) {
                    warn!(target: CONN_TARGET, peer = %admitted.proxy, reason = e.kind(),
                          error = &e as &dyn std::error::Error,
                          "no upstream for this datagram's header, dropped");
                }
                return None;
            }
        };
        let id = FlowId {
            proxy: admitted.proxy,
            client,
        };
        let arrival = Arrival {
            source: admitted.source,
            reply_key: ReplyKey {
                local: d.local,
                orig_dst: d.orig_dst,
            },
            listening_port: self.local_port,
            header_dst: match admitted.endpoints {
                Endpoints::Proxied { destination, .. } => Some(destination),
                Endpoints::Local => None,
            },
        };
        let fd = self.flow_fd(id, target, &arrival, out, now)?;
        Some((fd, target, admitted.payload))
    }

    /// The datagram's proxy and header, or `None` (counted and logged) when it is not
    /// to be relayed.
    fn admit<'d>(&mut self, d: &Received<'d>, now: u64) -> Option<Admitted<'d>> {
        let stats = &*self.ctx.stats;
        let Some(source) = d.source else {
            Stats::inc(&stats.udp_dropped_no_source);
            return None;
        };
        let proxy = ProxyAddr(canonical(source));
        if !(self.allowed)(proxy.0.ip()) {
            Stats::inc(&stats.rejected_not_allowed);
            if self.log.allow(now) {
                warn!(target: CONN_TARGET, peer = %proxy, reason = "not_allowed",
                      "datagram from outside --allowed-subnets dropped");
            }
            return None;
        }
        match proxy_protocol::split_datagram(d.data, d.truncated, &self.ctx.header) {
            Ok((endpoints, payload)) => Some(Admitted {
                source,
                proxy,
                endpoints,
                payload,
            }),
            Err(why) => {
                Stats::inc(match why {
                    DatagramError::Oversized => &stats.udp_dropped_oversized,
                    DatagramError::Truncated(_) => &stats.udp_dropped_truncated,
                    DatagramError::Invalid(_) => &stats.udp_dropped_invalid,
                });
                if self.log.allow(now) {
                    warn!(target: CONN_TARGET, peer = %proxy, reason = why.kind(),
                          error = &why as &dyn std::error::Error, "invalid datagram dropped");
                }
                None
            }
        }
    }

    /// The upstream socket of the datagram's flow, opened if new (`None` when that
    /// failed: counted and logged). A new flow may evict another, whose socket `out`
    /// could be holding datagrams for: `out` is flushed first.
    fn flow_fd(
        &mut self,
        id: FlowId,
        target: UpstreamAddr,
        arrival: &Arrival,
        out: &mut ToUpstream<'_, '_>,
        now: u64,
    ) -> Option<RawFd> {
        if let Some(flow) = self.table.get_mut(&id, now) {
            follow_latest_datagram(
                flow,
                target,
                arrival.reply_key,
                self.local_port,
                &mut self.replies,
                &mut self.log,
                now,
            );
            if let (Some(kernel), Some(client)) = (flow.kernel.as_mut(), id.client) {
                kernel.follow(&self.ctx, arrival, client, target, &mut self.log, now);
                self.releases.saw(id, &mut kernel.hold);
            }
            return Some(flow.fd);
        }
        out.flush(&self.ctx.stats, &mut self.log, now);
        let reply_key = arrival.reply_key;
        let reply = reply_for(
            reply_key,
            self.local_port,
            &mut self.replies,
            &mut self.log,
            now,
        );
        let back = AnswerRoute {
            proxy: arrival.source,
            reply,
            reply_key,
        };
        let stats = &*self.ctx.stats;
        let flow = match open_flow(
            id,
            target,
            back,
            arrival,
            &self.socket,
            &self.ctx,
            &mut self.log,
            now,
        ) {
            Ok(flow) => flow,
            Err(e) => {
                Stats::inc(&stats.udp_upstream_errors);
                if self.log.allow(now) {
                    warn!(target: CONN_TARGET, peer = %id.proxy, upstream = %target,
                          reason = e.kind(), error = &e as &dyn std::error::Error,
                          "cannot open UDP flow, datagram dropped");
                }
                return None;
            }
        };
        let mut flow = flow;
        if let Some(kernel) = flow.kernel.as_mut() {
            self.releases.saw(id, &mut kernel.hold);
        }
        let fd = flow.fd;
        Stats::inc(&stats.udp_flows_created);
        debug!(target: CONN_TARGET, peer = %id.proxy, client = %Shown(id.client),
               upstream = %target, "UDP flow created");
        let mut evicted = None;
        if self.ctx.relay.is_some() && self.table.len() >= self.table.capacity() {
            // Kernel-relayed traffic never touches the table: the least recently
            // used flow by the table may be busy in the kernel.
            let clock = self.ctx.clock;
            evicted = self.table.pop_idlest(EVICTION_LOOKS, |used_ms, flow| {
                // In microseconds: flows set up within one millisecond (a burst
                // of new clients) differ only in when the kernel last saw them.
                flow.last_active_us(&clock)
                    .max(used_ms.saturating_mul(1000))
            });
        }
        // With room made above, insert() evicts nothing.
        evicted = self.table.insert(id, flow, now).or(evicted);
        if let Some((old, _flow)) = evicted {
            Stats::inc(&stats.udp_flows_evicted);
            if self.log.allow(now) {
                warn!(target: CONN_TARGET, peer = %old.proxy, client = %Shown(old.client),
                      reason = "flow_table_full", limit = self.table.capacity(),
                      "least recently used UDP flow evicted (raise --max-flows?)");
            }
        }
        Some(fd)
    }

    /// A receive found the socket's queue empty.
    fn queue_empty(&mut self) {
        self.releases.queue_empty(&mut self.table, &self.ctx.stats);
    }

    /// Closes flows idle in both directions for `--close-after`.
    fn sweep(&mut self) {
        let now = self.ctx.clock.now_ms();
        let stats = &*self.ctx.stats;
        let idle = self.ctx.idle_ms();
        let clock = self.ctx.clock;
        self.table.expire(
            now,
            idle,
            |flow| flow.last_active(&clock),
            |id, flow| {
                Stats::inc(&stats.udp_flows_expired);
                debug!(target: CONN_TARGET, peer = %id.proxy, client = %Shown(id.client),
                       "UDP flow closed after {:?} idle", Duration::from_millis(idle));
                drop(flow);
            },
        );
        self.replies.forget_closed();
        self.log.summarise(now);
    }
}

/// An existing flow follows its latest datagram: the target port (when it comes from
/// the header) and where answers leave from.
fn follow_latest_datagram(
    flow: &mut Flow,
    target: UpstreamAddr,
    reply_key: ReplyKey,
    listening_port: u16,
    replies: &mut ReplySockets,
    log: &mut LogLimit,
    now: u64,
) {
    let port = target.0.port();
    if flow.shared.target_port.load(Ordering::Relaxed) != port {
        flow.shared.target_port.store(port, Ordering::Relaxed);
    }
    if flow.reply_key == reply_key {
        return;
    }
    let reply = reply_for(reply_key, listening_port, replies, log, now);
    let old = std::mem::replace(
        &mut *flow
            .shared
            .reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
        reply,
    );
    // The old reply socket (if this was its last flow) closes outside the lock.
    drop(old);
    flow.reply_key = reply_key;
}

/// Payloads waiting to leave through one flow's socket. The descriptor is valid
/// while that flow is in the table, which is why this is flushed before anything is
/// inserted.
struct ToUpstream<'b, 'd> {
    out: batch::Outgoing<'b, 'd>,
    fd: Option<RawFd>,
}

impl<'d> ToUpstream<'_, 'd> {
    fn push(
        &mut self,
        fd: RawFd,
        target: UpstreamAddr,
        payload: &'d [u8],
        stats: &Stats,
        log: &mut LogLimit,
        now: u64,
    ) {
        if self.fd != Some(fd) || self.out.is_full() {
            self.flush(stats, log, now);
            self.fd = Some(fd);
        }
        self.out.push(target.0, None, payload);
    }

    /// Sends what is held, counting what the kernel refused.
    fn flush(&mut self, stats: &Stats, log: &mut LogLimit, now: u64) {
        let Some(fd) = self.fd.filter(|_| !self.out.is_empty()) else {
            return;
        };
        let sent = self.out.flush(fd);
        Stats::add(&stats.udp_datagrams_sent, sent.sent as u64);
        if sent.failed > 0 {
            Stats::add(&stats.udp_upstream_errors, sent.failed as u64);
            if let Some(e) = sent.error {
                if log.allow(now) {
                    warn!(target: CONN_TARGET, dropped = sent.failed,
                          error = &e as &dyn std::error::Error,
                          "sending datagrams to the upstream failed");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "receive_tests.rs"]
mod tests;
