//! The UDP proxy (`-p udp`): every datagram from a proxy carries one PROXY v2 DGRAM
//! header; the payload is sent to the service from the client's address, and the
//! service's answers go back to the proxy, without a header, from the address the
//! proxy sent to.
//!
//! # Shape
//! - One task per listening socket (`--listeners N` SO_REUSEPORT sockets per `-l`).
//!   It receives with recvmmsg(2) ([`batch`]), checks the proxy against the allow-list,
//!   decodes the header, finds or creates the flow and sends the payloads with
//!   sendmmsg(2), consecutive datagrams of one flow in one call (runs of equal size
//!   in one UDP GSO message, see [`batch::SendBatch`]).
//! - A flow is (proxy address, client address); LOCAL datagrams (health checks) have
//!   no client and share one flow per proxy address. Each listener owns its own
//!   [`FlowTable`]: the kernel hashes a proxy's 4-tuple to one SO_REUSEPORT socket,
//!   so a flow's datagrams all reach the same task, and no lock is shared by
//!   listeners on the per-datagram path. `--max-flows` is split between the
//!   listening sockets; a full table evicts its least recently used flow.
//! - Each flow has its own upstream socket: IP_TRANSPARENT, bound to the client's
//!   address and port, *unconnected*, so a service bound to a wildcard may answer from
//!   any of the host's addresses. Only answers from the port datagrams were sent to
//!   are relayed (anything else reaching the client's address and port on this host
//!   is not the service's answer); they are counted in `udp_replies_foreign`.
//! - Each flow's answers are read by a small task of its own (recvmmsg into a
//!   per-thread buffer, sendmmsg through the listening socket with IP_PKTINFO /
//!   IPV6_PKTINFO naming the local address the proxy used, see [`cmsg`]).
//! - Answers leave from the address *and port* the proxy sent to. A port range is
//!   one socket on its first port that sk_lookup steers the whole range to, so a
//!   datagram may have been sent to another port than the socket's own: the
//!   listening socket receives IP_ORIGDSTADDR / IPV6_ORIGDSTADDR, and when that port
//!   differs, answers leave from a `ReplySocket` bound to exactly that address and
//!   port (one per address and port per listener, shared by its flows, closed with
//!   the last of them) instead of the listening socket. A proxy that sends one
//!   client's datagrams to several ports (one flow) is answered from the port of its
//!   latest datagram, as the address already follows the latest datagram.
//! - Flows idle for `--close-after` seconds in both directions are closed by the
//!   listener task's periodic sweep; closing a flow aborts its task and closes its
//!   socket.
//!
//! Nothing a datagram contains can panic or stall a listener: invalid datagrams are
//! dropped and counted (`udp_dropped_invalid`), and per-datagram log lines are
//! rate-limited so a flood cannot flood the log.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

mod batch;
pub mod cmsg;
pub mod flows;
mod sockaddr;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::addr::{ClientAddr, ProxyAddr, UpstreamAddr};
use crate::cli::{Args, TargetSpec};
use crate::ebpf::{FlowProtocol, FlowRegistration, FlowRegistry, ReturnFlow};
use crate::logging::CONN_TARGET;
use crate::proxy_protocol::{self, DecodeOptions, Decoded, Endpoints, Expect, Invalid};
use crate::sockopt;
use crate::stats::Stats;

use batch::{RecvBatch, SendBatch, MAX_DATAGRAM};
pub use cmsg::LocalDst;
pub use flows::FlowTable;

/// Datagrams moved per recvmmsg/sendmmsg call on a listening socket.
const LISTENER_BATCH: usize = 32;
/// Datagrams moved per call on a flow's answers (per worker thread, shared by flows).
const REPLY_BATCH: usize = 16;
/// Receive buffer asked for on listening sockets: bursts from a balancer arrive
/// faster than flows are set up, and the 208 KiB default holds ~300 small datagrams.
const LISTENER_RCVBUF: usize = 4 << 20;
/// Per-datagram log lines per listener per second; the rest are counted and summed
/// up in one line.
const LOG_LINES_PER_SEC: u32 = 10;
/// Pause after an unexpected receive error, so a persistent one cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Everything the UDP listeners and flows share (read-only).
#[derive(Debug)]
pub struct UdpContext {
    /// `-4`: target for IPv4 clients (and IPv4-mapped IPv6 ones).
    pub target4: TargetSpec,
    /// `-6`: target for IPv6 clients.
    pub target6: TargetSpec,
    /// SO_MARK for transparent upstream sockets; 0 leaves the mark alone.
    pub mark: u32,
    /// `--close-after`: flows idle this long in both directions are closed.
    pub idle: Duration,
    /// Flow table size of each listening socket (`--max-flows` split between them).
    pub flows_per_listener: usize,
    /// Largest v2 header accepted.
    pub max_header_len: usize,
    pub stats: Arc<Stats>,
    /// When the kernel side steers return traffic: every flow is registered here
    /// before its first datagram leaves, for as long as it lives, so answers of a
    /// service that is not on loopback (or bound to a wildcard) find their way back.
    pub flows: Option<Arc<dyn FlowRegistry>>,
    clock: Clock,
}

impl UdpContext {
    pub fn from_args(args: &Args, stats: Arc<Stats>) -> Self {
        let sockets = args
            .listen
            .len()
            .saturating_mul(usize::from(args.listeners))
            .max(1);
        UdpContext {
            target4: args.target4,
            target6: args.target6,
            mark: args.mark,
            // Zero would close every flow before its answer: one second is the least.
            idle: Duration::from_secs(args.close_after.max(1)),
            flows_per_listener: (args.max_flows / sockets).max(1),
            max_header_len: args.max_header_len,
            stats,
            flows: None,
            clock: Clock::new(),
        }
    }

    fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            max_header_len: self.max_header_len,
            transport: Expect::Datagram,
        }
    }

    fn idle_ms(&self) -> u64 {
        u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX)
    }

    /// How often a listener looks for idle flows: a quarter of the idle time, between
    /// 100 ms and 1 s, so flows close at most ~25 % (or 1 s) late.
    fn sweep_every(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// Milliseconds since the daemon started: one clock for the listener's table and the
/// flows' answer tasks, small enough for an atomic.
#[derive(Clone, Copy, Debug)]
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Clock(Instant::now())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why a flow's upstream socket could not be opened. Display is a log line fragment.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("cannot create upstream UDP socket: {source}{}", hint(.source))]
    Socket {
        #[source]
        source: io::Error,
    },
    #[error("cannot set {option} on upstream UDP socket: {source}{}", hint(.source))]
    SockOpt {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "client {client} cannot be bound on a socket for upstream {to}: address families differ"
    )]
    FamilyMismatch {
        client: ClientAddr,
        to: UpstreamAddr,
    },
    #[error("cannot bind upstream UDP socket to client address {client}: {source}{}", hint(.source))]
    Bind {
        client: ClientAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot register upstream UDP socket with the runtime: {0}")]
    Register(#[source] io::Error),
}

impl FlowError {
    /// Short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Socket { .. } => "socket",
            Self::SockOpt { .. } => "sockopt",
            Self::FamilyMismatch { .. } => "family_mismatch",
            Self::Bind { .. } => "bind",
            Self::Register(_) => "register",
        }
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN: run as root or grant the capability)"
        }
        Some(libc::EMFILE) => {
            " (descriptor limit: raise LimitNOFILE / ulimit -n, or lower --max-flows)"
        }
        Some(libc::EADDRNOTAVAIL) => {
            " (the address is not local and IP_TRANSPARENT is not in effect)"
        }
        _ => "",
    }
}

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
    let count = count.max(1);
    let mut out = Vec::with_capacity(usize::from(count));
    let mut addr = addr;
    for _ in 0..count {
        let s = bind_one(addr, count > 1)?;
        addr = s.local_addr()?;
        out.push(s);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let ty = Type::DGRAM.nonblocking().cloexec();
    let socket = Socket::new(Domain::for_address(addr), ty, Some(Protocol::UDP))?;
    sockopt::set_reuse_address(&socket)?;
    if reuse_port {
        sockopt::set_reuse_port(&socket)?;
    }
    if addr.is_ipv6() {
        sockopt::set_ipv6_only(&socket)?;
    }
    sockopt::set_recv_pktinfo(&socket, addr.is_ipv6())?;
    sockopt::set_recv_orig_dst_addr(&socket, addr.is_ipv6())?;
    set_large_rcvbuf(&socket);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A socket that sends a range's answers from the address and port the proxy sent
/// to, when that port is not the listening socket's own. It never receives:
/// - it stays unconnected, so it cannot win the kernel's socket lookup over the
///   sk_lookup program (only connected UDP sockets are found before it runs), which
///   keeps steering the whole range to the listening socket;
/// - a classic BPF filter that accepts nothing is attached before the bind, so even a
///   datagram the normal lookup hands it (steering failed: the listener's slot is
///   empty while a daemon restarts) is dropped at once rather than queued on a
///   socket nobody reads. Without this socket that datagram would have found no
///   socket at all, so nothing is taken from anyone.
///
/// It is bound with IP_TRANSPARENT / IPV6_TRANSPARENT so that a destination routed
/// to this host without being configured on it (AnyIP, a VIP) can be the source,
/// and SO_REUSEADDR so each SO_REUSEPORT listener of a group can have its own.
/// Sends are nonblocking; a full buffer drops the answer, as the kernel would.
#[derive(Debug)]
struct ReplySocket {
    socket: std::net::UdpSocket,
}

impl ReplySocket {
    fn bind(at: SocketAddr) -> io::Result<ReplySocket> {
        let ty = Type::DGRAM.nonblocking().cloexec();
        let socket = Socket::new(Domain::for_address(at), ty, Some(Protocol::UDP))?;
        if at.is_ipv6() {
            sockopt::set_ipv6_only(&socket)?;
        }
        sockopt::set_transparent(&socket, at.is_ipv6())?;
        sockopt::set_reuse_address(&socket)?;
        drop_all_received(&socket)?;
        socket.bind(&at.into())?;
        Ok(ReplySocket {
            socket: socket.into(),
        })
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// SO_ATTACH_FILTER with the one-instruction program `ret #0`: every datagram the
/// socket would receive is dropped before it is queued.
fn drop_all_received(fd: &impl AsFd) -> io::Result<()> {
    // BPF_RET | BPF_K: return the constant k (bytes of the packet to keep), 0 = drop.
    const BPF_RET_K: u16 = 0x06;
    let mut program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, one instruction, both alive for the call;
    // the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listener's reply sockets by bound address: shared by every flow answering from
/// that address and port, closed when the last of them closes (the map only holds
/// weak references; dead ones are removed by the sweep).
#[derive(Debug, Default)]
struct ReplySockets(HashMap<SocketAddr, Weak<ReplySocket>>);

impl ReplySockets {
    fn get_or_bind(&mut self, at: SocketAddr) -> io::Result<Arc<ReplySocket>> {
        if let Some(live) = self.0.get(&at).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let socket = Arc::new(ReplySocket::bind(at)?);
        self.0.insert(at, Arc::downgrade(&socket));
        Ok(socket)
    }

    fn forget_closed(&mut self) {
        self.0.retain(|_, w| w.strong_count() > 0);
    }
}

/// SO_RCVBUFFORCE (allowed with CAP_NET_ADMIN, which mmproxy has anyway), else
/// SO_RCVBUF capped by net.core.rmem_max. Best effort: the default still works.
fn set_large_rcvbuf(fd: &impl AsFd) {
    let size = libc::c_int::try_from(LISTENER_RCVBUF).unwrap_or(libc::c_int::MAX);
    // SAFETY: the pointer and length describe a live c_int for the whole call.
    let forced = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = SockRef::from(fd).set_recv_buffer_size(LISTENER_RCVBUF);
    }
}

/// Every flow holds a descriptor, so `--max-flows` flows need that many more than
/// the usual soft limit of 1024. Raises the soft RLIMIT_NOFILE towards
/// `max_flows` plus headroom, up to the hard limit (as Go's runtime does for
/// go-mmproxy), and says so when the hard limit is too low.
pub fn raise_nofile_limit(max_flows: usize) {
    let want = libc::rlim_t::try_from(max_flows)
        .unwrap_or(libc::rlim_t::MAX)
        .saturating_add(1024);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let (cur, max) = (lim.rlim_cur, lim.rlim_max);
    if cur >= want {
        return;
    }
    let new = want.min(max);
    if new > cur {
        lim.rlim_cur = new;
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            debug!("descriptor limit raised from {cur} to {new} for UDP flows");
        }
    }
    if new < want {
        warn!(
            "descriptor limit {new} is below --max-flows + 1024 ({want}): new flows will fail \
             once it is reached (raise LimitNOFILE / ulimit -Hn, or lower --max-flows)"
        );
    }
}

/// A flow's identity: the proxy that sent it and the client the header names (`None`
/// for LOCAL and other headers without a client: one flow per proxy address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proxy: ProxyAddr,
    client: Option<ClientAddr>,
}

/// What a flow's answer task and its listener both see.
#[derive(Debug)]
struct FlowShared {
    /// When an answer was last relayed ([`Clock`] ms): answers keep a flow alive.
    last_answer: AtomicU64,
    /// The port datagrams go to; only answers from it are relayed. Follows the
    /// header's destination port when the target has none.
    target_port: AtomicU16,
    /// Where answers leave from. Changed by the listener only when the proxy's
    /// destination changes; the answer task holds it for one batch.
    reply: Mutex<Reply>,
}

/// Where a flow's answers leave from: the destination of the proxy's latest datagram.
#[derive(Debug, Default)]
struct Reply {
    /// The local address, sent as PKTINFO when answering through the listening socket.
    local: Option<LocalDst>,
    /// Set when the proxy sent to another port than the listening socket's own (a
    /// range): answers leave from this socket, bound to that address and port.
    socket: Option<Arc<ReplySocket>>,
}

/// The destination a flow's [`Reply`] was made for, so the listener rebuilds it only
/// when a datagram arrives somewhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReplyKey {
    local: Option<LocalDst>,
    orig_dst: Option<SocketAddr>,
}

/// One live flow, owned by its listener's table. Dropping it aborts the answer task,
/// which drops the last reference to the upstream socket and so closes it.
struct Flow {
    /// Kept so the descriptor stays open while the listener sends through `fd`.
    _socket: Arc<UdpSocket>,
    fd: RawFd,
    shared: Arc<FlowShared>,
    answers: AbortHandle,
    /// What `shared.reply` was made for.
    reply_key: ReplyKey,
    /// Undone (after a short linger) when the flow closes.
    _registration: Option<FlowRegistration>,
    stats: Arc<Stats>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.answers.abort();
        Stats::dec(&self.stats.udp_flows_active);
    }
}

/// Serves one listening socket until `shutdown`: see the module docs. `allowed` is
/// asked about every proxy address (IPv4-mapped ones as IPv4).
pub async fn serve_udp<F>(
    socket: UdpSocket,
    ctx: Arc<UdpContext>,
    allowed: F,
    shutdown: CancellationToken,
) where
    F: Fn(IpAddr) -> bool + Send + Sync + 'static,
{
    let local = socket.local_addr().ok();
    let mut listener = Listener {
        socket: Arc::new(socket),
        local_port: local.map_or(0, |a| a.port()),
        table: FlowTable::new(ctx.flows_per_listener),
        replies: ReplySockets::default(),
        recv: RecvBatch::new(LISTENER_BATCH, MAX_DATAGRAM),
        send: SendBatch::new(LISTENER_BATCH),
        log: LogLimit::default(),
        allowed,
        ctx,
    };
    let mut sweep = tokio::time::interval(listener.ctx.sweep_every());
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => listener.sweep(),
            ready = listener.socket.readable() => {
                if let Err(e) = ready {
                    warn!(listen = ?local, error = %e, "UDP listener stopped");
                    break;
                }
                let fd = listener.socket.as_raw_fd();
                let recv = &mut listener.recv;
                // Set only by a receive that got datagrams, so a batch is never
                // relayed twice whatever try_io returns.
                let mut fresh = false;
                let received = listener.socket.try_io(Interest::READABLE, || {
                    recv.recv(fd)?;
                    fresh = true;
                    // WouldBlock clears tokio's readiness (only if no newer event
                    // arrived meanwhile), sparing the EAGAIN call.
                    if recv.drained() {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                });
                match received {
                    Ok(()) => {
                        pause = Duration::ZERO;
                        listener.relay_batch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if fresh {
                            pause = Duration::ZERO;
                            listener.relay_batch();
                        }
                    }
                    Err(e) => {
                        pause = (pause * 2).clamp(ERROR_PAUSE, Duration::from_secs(1));
                        if listener.log.allow(listener.ctx.clock.now_ms()) {
                            warn!(listen = ?local, error = %e, retry_in = ?pause,
                                  "receiving on the UDP listener failed");
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
    let open = listener.table.len();
    // Dropping the flows aborts their tasks and closes their sockets.
    listener.table.drain().for_each(drop);
    debug!(listen = ?local, flows_closed = open, "UDP listener stopped");
}

struct Listener<F> {
    socket: Arc<UdpSocket>,
    local_port: u16,
    table: FlowTable<FlowKey, Flow>,
    replies: ReplySockets,
    recv: RecvBatch,
    send: SendBatch,
    log: LogLimit,
    allowed: F,
    ctx: Arc<UdpContext>,
}

impl<F: Fn(IpAddr) -> bool> Listener<F> {
    /// Handles every datagram of the last receive: consecutive datagrams for one flow
    /// leave in one sendmmsg.
    fn relay_batch(&mut self) {
        let Listener {
            socket,
            local_port,
            table,
            replies,
            recv,
            send,
            log,
            allowed,
            ctx,
        } = self;
        let allowed: &F = allowed;
        let stats = &*ctx.stats;
        let now = ctx.clock.now_ms();
        let opts = ctx.decode_options();
        Stats::add(&stats.udp_datagrams, recv.len() as u64);
        let mut out = send.start();
        // The flow socket `out` holds datagrams for; valid while the flow is in the
        // table, which is why `out` is flushed before anything is inserted.
        let mut out_fd: RawFd = -1;
        for i in 0..recv.len() {
            let Some(d) = recv.get(i) else { break };
            let Some(source) = d.source else {
                Stats::inc(&stats.udp_dropped_invalid);
                continue;
            };
            let proxy = ProxyAddr(canonical(source));
            if !allowed(proxy.0.ip()) {
                Stats::inc(&stats.rejected_not_allowed);
                if log.allow(now) {
                    warn!(target: CONN_TARGET, peer = %proxy, reason = "not_allowed",
                          "datagram from outside --allowed-subnets dropped");
                }
                continue;
            }
            let decoded = if d.truncated {
                Err(Dropped::Oversized)
            } else {
                match proxy_protocol::decode(d.data, &opts) {
                    Ok(Decoded::Complete { header, len }) => {
                        Ok((header.endpoints(), d.data.get(len..).unwrap_or_default()))
                    }
                    Ok(Decoded::NeedMore { .. }) => Err(Dropped::Truncated(d.data.len())),
                    Err(e) => Err(Dropped::Invalid(e)),
                }
            };
            let (endpoints, payload) = match decoded {
                Ok(v) => v,
                Err(why) => {
                    Stats::inc(&stats.udp_dropped_invalid);
                    if log.allow(now) {
                        warn!(target: CONN_TARGET, peer = %proxy, reason = why.kind(),
                              error = %why, "invalid datagram dropped");
                    }
                    continue;
                }
            };
            // LOCAL without a target port goes to the port the proxy sent to.
            let sent_to_port = d.orig_dst.map_or(*local_port, |a| a.port());
            let (client, target) = route(ctx, endpoints, proxy, sent_to_port);
            let key = FlowKey { proxy, client };
            let reply_key = ReplyKey {
                local: d.local,
                orig_dst: d.orig_dst,
            };
            let fd = match table.get_mut(&key, now) {
                Some(flow) => {
                    let port = target.0.port();
                    if flow.shared.target_port.load(Ordering::Relaxed) != port {
                        flow.shared.target_port.store(port, Ordering::Relaxed);
                    }
                    if flow.reply_key != reply_key {
                        let reply = reply_for(reply_key, *local_port, replies, log, now);
                        let old = std::mem::replace(
                            &mut *flow
                                .shared
                                .reply
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner),
                            reply,
                        );
                        // The old reply socket (if this was its last flow) closes
                        // outside the lock.
                        drop(old);
                        flow.reply_key = reply_key;
                    }
                    flow.fd
                }
                None => {
                    // An eviction below may close the socket `out` sends through.
                    flush(&mut out, out_fd, stats, log, now);
                    let reply = reply_for(reply_key, *local_port, replies, log, now);
                    let back = AnswerRoute {
                        proxy: source,
                        reply,
                        reply_key,
                    };
                    match open_flow(key, target, back, socket, ctx, log, now) {
                        Ok(flow) => {
                            let fd = flow.fd;
                            Stats::inc(&stats.udp_flows_created);
                            debug!(target: CONN_TARGET, peer = %proxy,
                                   client = %client.map_or_else(|| "local".to_owned(), |c| c.to_string()),
                                   upstream = %target, "UDP flow created");
                            if let Some((old, _flow)) = table.insert(key, flow, now) {
                                Stats::inc(&stats.udp_flows_evicted);
                                if log.allow(now) {
                                    warn!(target: CONN_TARGET, peer = %old.proxy,
                                          client = %old.client.map_or_else(|| "local".to_owned(), |c| c.to_string()),
                                          reason = "flow_table_full", limit = table.capacity(),
                                          "least recently used UDP flow evicted (raise --max-flows?)");
                                }
                            }
                            fd
                        }
                        Err(e) => {
                            Stats::inc(&stats.udp_upstream_errors);
                            if log.allow(now) {
                                warn!(target: CONN_TARGET, peer = %proxy, upstream = %target,
                                      reason = e.kind(), error = %e, "cannot open UDP flow, datagram dropped");
                            }
                            continue;
                        }
                    }
                }
            };
            if fd != out_fd || out.is_full() {
                flush(&mut out, out_fd, stats, log, now);
                out_fd = fd;
            }
            out.push(target.0, None, payload);
        }
        flush(&mut out, out_fd, stats, log, now);
    }

    /// Closes flows idle in both directions for `--close-after`.
    fn sweep(&mut self) {
        let now = self.ctx.clock.now_ms();
        let stats = &*self.ctx.stats;
        let idle = self.ctx.idle_ms();
        self.table.expire(
            now,
            idle,
            |flow| flow.shared.last_answer.load(Ordering::Relaxed),
            |key, flow| {
                Stats::inc(&stats.udp_flows_expired);
                debug!(target: CONN_TARGET, peer = %key.proxy,
                       client = %key.client.map_or_else(|| "local".to_owned(), |c| c.to_string()),
                       "UDP flow closed after {:?} idle", Duration::from_millis(idle));
                drop(flow);
            },
        );
        self.replies.forget_closed();
        self.log.summarise(now);
    }
}

/// The [`Reply`] for a datagram sent to `key`: through the listening socket when the
/// proxy sent to its own port (or the kernel did not say), else from a reply socket
/// bound to the address and port it sent to. If that socket cannot be bound (another
/// program holds the port without SO_REUSEADDR), answers still go out through the
/// listening socket, from the right address but the range's first port.
fn reply_for(
    key: ReplyKey,
    listening_port: u16,
    replies: &mut ReplySockets,
    log: &mut LogLimit,
    now: u64,
) -> Reply {
    let socket = match key.orig_dst {
        Some(at) if at.port() != listening_port && at.port() != 0 => {
            match replies.get_or_bind(at) {
                Ok(s) => Some(s),
                Err(e) => {
                    if log.allow(now) {
                        warn!(target: CONN_TARGET, local = %at, error = %e,
                              "cannot bind a reply socket: answers leave from the range's first port");
                    }
                    None
                }
            }
        }
        _ => None,
    };
    Reply {
        local: key.local,
        socket,
    }
}

/// Sends what `out` holds through `fd`, counting what the kernel refused.
fn flush(
    out: &mut batch::Outgoing<'_, '_>,
    fd: RawFd,
    stats: &Stats,
    log: &mut LogLimit,
    now: u64,
) {
    if out.is_empty() || fd < 0 {
        return;
    }
    let sent = out.flush(fd);
    if sent.failed > 0 {
        Stats::add(&stats.udp_upstream_errors, sent.failed as u64);
        if let Some(e) = sent.error {
            if log.allow(now) {
                warn!(target: CONN_TARGET, dropped = sent.failed, error = %e,
                      "sending datagrams to the upstream failed");
            }
        }
    }
}

/// Why a datagram was dropped before reaching a flow.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("{0}")]
    Invalid(Invalid),
    #[error("datagram of {0} bytes ends inside its PROXY header")]
    Truncated(usize),
    #[error("datagram larger than the receive buffer")]
    Oversized,
}

impl Dropped {
    fn kind(&self) -> &'static str {
        match self {
            Dropped::Invalid(e) => e.kind(),
            Dropped::Truncated(_) => "truncated",
            Dropped::Oversized => "oversized",
        }
    }
}

/// Where a new flow's answers go: to the proxy, from where it sent to.
#[derive(Debug)]
struct AnswerRoute {
    proxy: SocketAddr,
    reply: Reply,
    reply_key: ReplyKey,
}

/// Where to send from and to. The target is chosen by the client's family (as
/// go-mmproxy's TCP path does; its UDP path wrongly uses the proxy's), or by the
/// proxy's for LOCAL. Without a target port, the header's destination port is used
/// (for LOCAL: the port the proxy sent to).
fn route(
    ctx: &UdpContext,
    endpoints: Endpoints,
    proxy: ProxyAddr,
    local_port: u16,
) -> (Option<ClientAddr>, UpstreamAddr) {
    let (client, family_of, dst_port) = match endpoints {
        Endpoints::Proxied {
            client,
            destination,
        } => {
            let client = ClientAddr(canonical(client.0));
            (Some(client), client.0.ip(), destination.0.port())
        }
        Endpoints::Local => (None, proxy.0.ip(), local_port),
    };
    let target = if family_of.is_ipv4() {
        ctx.target4
    } else {
        ctx.target6
    };
    let port = target.port.unwrap_or(dst_port);
    (
        client,
        UpstreamAddr(canonical(SocketAddr::new(target.addr, port))),
    )
}

/// IPv4-mapped IPv6 as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Opens the flow's upstream socket and starts its answer task.
fn open_flow(
    key: FlowKey,
    target: UpstreamAddr,
    back: AnswerRoute,
    listener: &Arc<UdpSocket>,
    ctx: &Arc<UdpContext>,
    log: &mut LogLimit,
    now: u64,
) -> Result<Flow, FlowError> {
    let socket = upstream_socket(key.client, target, ctx.mark)?;
    let registration = match (&ctx.flows, key.client) {
        (Some(flows), Some(client)) => register(flows, &socket, client, target, log, now),
        _ => None,
    };
    let socket = Arc::new(UdpSocket::from_std(socket.into()).map_err(FlowError::Register)?);
    let shared = Arc::new(FlowShared {
        last_answer: AtomicU64::new(0),
        target_port: AtomicU16::new(target.0.port()),
        reply: Mutex::new(back.reply),
    });
    let answers = tokio::spawn(relay_answers(
        socket.clone(),
        listener.clone(),
        shared.clone(),
        back.proxy,
        ctx.clone(),
    ))
    .abort_handle();
    Stats::inc(&ctx.stats.udp_flows_active);
    Ok(Flow {
        fd: socket.as_raw_fd(),
        _socket: socket,
        shared,
        answers,
        reply_key: back.reply_key,
        _registration: registration,
        stats: ctx.stats.clone(),
    })
}

/// Registers a transparent flow's answers with the kernel side. A failure (full
/// table) is logged and the flow goes ahead: answers of a loopback service still
/// come back through the loopback rule.
fn register(
    flows: &Arc<dyn FlowRegistry>,
    socket: &Socket,
    client: ClientAddr,
    target: UpstreamAddr,
    log: &mut LogLimit,
    now: u64,
) -> Option<FlowRegistration> {
    // The bound address, with the port the kernel chose if the header said 0.
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(client.0);
    let flow = ReturnFlow {
        protocol: FlowProtocol::Udp,
        client: local,
        upstream: target.0,
    };
    match FlowRegistration::new(flows, flow) {
        Ok(r) => Some(r),
        Err(e) => {
            if log.allow(now) {
                warn!(target: CONN_TARGET, client = %local, upstream = %target,
                      reason = "flow_table", error = %e, "answers of this UDP flow are not steered");
            }
            None
        }
    }
}

/// The upstream socket of a flow: from the client's address (IP_TRANSPARENT,
/// SO_REUSEADDR so several proxies' flows of one client can coexist, SO_MARK if
/// asked), or from the host's own address for LOCAL flows. Left unconnected: see the
/// module docs.
fn upstream_socket(
    client: Option<ClientAddr>,
    to: UpstreamAddr,
    mark: u32,
) -> Result<Socket, FlowError> {
    let ty = Type::DGRAM.nonblocking().cloexec();
    let socket = Socket::new(Domain::for_address(to.0), ty, Some(Protocol::UDP))
        .map_err(|source| FlowError::Socket { source })?;
    let opt = |option: &'static str| move |source| FlowError::SockOpt { option, source };
    let bind_to = match client {
        Some(client) => {
            if client.0.is_ipv4() != to.0.is_ipv4() {
                return Err(FlowError::FamilyMismatch { client, to });
            }
            sockopt::set_transparent(&socket, client.0.is_ipv6()).map_err(opt("IP_TRANSPARENT"))?;
            sockopt::set_reuse_address(&socket).map_err(opt("SO_REUSEADDR"))?;
            if mark != 0 {
                sockopt::set_mark(&socket, mark).map_err(opt("SO_MARK"))?;
            }
            client
        }
        None => {
            let any = if to.0.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            ClientAddr(SocketAddr::new(any, 0))
        }
    };
    socket
        .bind(&bind_to.0.into())
        .map_err(|source| FlowError::Bind {
            client: bind_to,
            source,
        })?;
    Ok(socket)
}

/// Per worker thread: the buffers answer tasks receive into and send from. Tasks use
/// them only between two awaits, so one set per thread serves every flow.
struct AnswerScratch {
    recv: RecvBatch,
    send: SendBatch,
}

thread_local! {
    static SCRATCH: RefCell<Option<AnswerScratch>> = const { RefCell::new(None) };
}

/// Relays a flow's answers to its proxy until aborted (when the flow closes).
async fn relay_answers(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    shared: Arc<FlowShared>,
    proxy: SocketAddr,
    ctx: Arc<UdpContext>,
) {
    let up_fd = upstream.as_raw_fd();
    let down_fd = listener.as_raw_fd();
    let mut pause = Duration::ZERO;
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        let result = upstream.try_io(Interest::READABLE, || {
            SCRATCH.with(|cell| {
                let mut guard = cell
                    .try_borrow_mut()
                    .map_err(|_| io::Error::other("answer buffers busy"))?;
                let scratch = guard.get_or_insert_with(|| AnswerScratch {
                    recv: RecvBatch::new(REPLY_BATCH, MAX_DATAGRAM),
                    send: SendBatch::new(REPLY_BATCH),
                });
                relay_answer_batch(scratch, up_fd, down_fd, &shared, proxy, &ctx)
            })
        });
        match result {
            Ok(()) => pause = Duration::ZERO,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pause = Duration::ZERO,
            Err(e) => {
                // Unconnected UDP sockets report no ICMP errors, so this is rare
                // (ENOMEM…); pause so it cannot spin.
                pause = (pause * 2).clamp(ERROR_PAUSE, Duration::from_secs(1));
                debug!(target: CONN_TARGET, peer = %proxy, error = %e,
                       "receiving answers failed");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// One recvmmsg on the flow's socket, one sendmmsg of the service's answers on the
/// listening socket (or the flow's reply socket).
fn relay_answer_batch(
    scratch: &mut AnswerScratch,
    up_fd: RawFd,
    down_fd: RawFd,
    shared: &FlowShared,
    proxy: SocketAddr,
    ctx: &UdpContext,
) -> io::Result<()> {
    let AnswerScratch { recv, send } = scratch;
    recv.recv(up_fd)?;
    relay_answers_received(recv, send, down_fd, shared, proxy, ctx);
    if recv.drained() {
        // Clears tokio's readiness without another recvmmsg (see the listener).
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(())
}

/// Sends the answers in `recv` that came from the target's port on to the proxy.
fn relay_answers_received(
    recv: &RecvBatch,
    send: &mut SendBatch,
    down_fd: RawFd,
    shared: &FlowShared,
    proxy: SocketAddr,
    ctx: &UdpContext,
) {
    if recv.is_empty() {
        return;
    }
    let stats = &*ctx.stats;
    let port = shared.target_port.load(Ordering::Relaxed);
    // Held until the batch is sent, so the reply socket cannot close under it; the
    // listener takes it only when the proxy's destination changes.
    let reply = shared.reply.lock().unwrap_or_else(PoisonError::into_inner);
    let (send_fd, from) = match &reply.socket {
        // Bound to the exact address and port: no PKTINFO needed.
        Some(s) => (s.fd(), None),
        None => (down_fd, reply.local.as_ref()),
    };
    let mut out = send.start();
    let mut foreign = 0u64;
    for i in 0..recv.len() {
        let Some(d) = recv.get(i) else { break };
        match d.source {
            Some(src) if src.port() == port && !d.truncated => {
                out.push(proxy, from, d.data);
            }
            _ => foreign += 1,
        }
    }
    if foreign > 0 {
        Stats::add(&stats.udp_replies_foreign, foreign);
    }
    if !out.is_empty() {
        shared
            .last_answer
            .store(ctx.clock.now_ms(), Ordering::Relaxed);
        let sent = out.flush(send_fd);
        Stats::add(&stats.udp_replies, sent.sent as u64);
        if sent.failed > 0 {
            Stats::add(&stats.udp_reply_errors, sent.failed as u64);
            if let Some(e) = sent.error {
                debug!(target: CONN_TARGET, peer = %proxy, dropped = sent.failed,
                       error = %e, "sending answers to the proxy failed");
            }
        }
    }
}

/// At most [`LOG_LINES_PER_SEC`] per-datagram lines per listener per second; the
/// number left out is logged once the second is over.
#[derive(Debug, Default)]
struct LogLimit {
    window_start: u64,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    fn allow(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.window_start) >= 1000 {
            self.summarise(now_ms);
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new window if the current one is over, logging what it left out.
    fn summarise(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.window_start) < 1000 {
            return;
        }
        if self.suppressed > 0 {
            warn!(target: CONN_TARGET, suppressed = self.suppressed,
                  "per-datagram log lines suppressed in the last second");
        }
        *self = LogLimit {
            window_start: now_ms,
            lines: 0,
            suppressed: 0,
        };
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;
    use crate::proxy_protocol::V2Builder;

    fn ctx(port4: Option<u16>, port6: Option<u16>) -> UdpContext {
        UdpContext {
            target4: TargetSpec {
                addr: "127.0.0.1".parse().unwrap(),
                port: port4,
            },
            target6: TargetSpec {
                addr: "::1".parse().unwrap(),
                port: port6,
            },
            mark: 0,
            idle: Duration::from_secs(1),
            flows_per_listener: 4,
            max_header_len: proxy_protocol::DEFAULT_MAX_HEADER_LEN,
            stats: Arc::new(Stats::default()),
            flows: None,
            clock: Clock::new(),
        }
    }

    #[test]
    fn target_follows_the_client_family_mapped_is_v4_and_port_falls_back() {
        let c = ctx(None, Some(9000));
        let proxy = ProxyAddr("[2001:db8:1::1]:5000".parse().unwrap());
        let proxied = |client: &str, dst: &str| Endpoints::Proxied {
            client: ClientAddr(client.parse().unwrap()),
            destination: OrigDstAddr(dst.parse().unwrap()),
        };
        let (from, to) = route(
            &c,
            proxied("[::ffff:198.51.100.9]:4000", "[2001:db8::2]:53"),
            proxy,
            8443,
        );
        assert_eq!(
            from.unwrap().0,
            "198.51.100.9:4000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(to.0, "127.0.0.1:53".parse::<SocketAddr>().unwrap());
        let (_, to) = route(
            &c,
            proxied("[2001:db8::9]:4000", "192.0.2.2:53"),
            proxy,
            8443,
        );
        assert_eq!(to.0, "[::1]:9000".parse::<SocketAddr>().unwrap());
        // LOCAL: the proxy's family, the listening port when the target has none.
        let (from, to) = route(
            &c,
            Endpoints::Local,
            ProxyAddr("192.0.2.1:1".parse().unwrap()),
            8443,
        );
        assert!(from.is_none());
        assert_eq!(to.0, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn log_limit_lets_ten_per_second_through() {
        let mut l = LogLimit::default();
        let allowed = (0..100).filter(|i| l.allow(5 + i)).count();
        assert_eq!(allowed, 10);
        assert_eq!(l.suppressed, 90);
        assert!(l.allow(1100), "a new second starts afresh");
        assert_eq!(l.suppressed, 0);
    }

    /// What keeps a reply socket from ever holding a datagram: the filter drops all.
    #[test]
    fn the_reply_sockets_filter_drops_everything_it_would_receive() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"before", rx.local_addr().unwrap()).unwrap();
        drop_all_received(&rx).unwrap();
        tx.send_to(b"after", rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Queued before the filter: still there. After it: never queued.
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        let e = rx.recv_from(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        // Sending is unaffected.
        tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        rx.send_to(b"out", tx.local_addr().unwrap()).unwrap();
        let (n, _) = tx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"out");
    }

    #[test]
    fn family_mismatch_is_refused_before_binding() {
        let e = upstream_socket(
            Some(ClientAddr("192.0.2.1:1000".parse().unwrap())),
            UpstreamAddr("[::1]:53".parse().unwrap()),
            0,
        )
        .unwrap_err();
        assert!(matches!(e, FlowError::FamilyMismatch { .. }), "{e}");
    }

    /// The whole listener path without privileges: LOCAL datagrams (no transparent
    /// socket needed) relayed to an echo service on loopback and answered from the
    /// address the proxy sent to; malformed ones dropped and counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_datagrams_are_relayed_and_answered_and_garbage_is_counted() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let mut answer = from.to_string().into_bytes();
                answer.push(b'|');
                answer.extend_from_slice(&buf[..n]);
                let _ = echo.send_to(&answer, from);
            }
        });
        let ctx = Arc::new(ctx(Some(echo_port), Some(echo_port)));
        let mut sockets = bind_udp("0.0.0.0:0".parse().unwrap(), 1).unwrap();
        let listen = sockets[0].local_addr().unwrap();
        let socket = UdpSocket::from_std(sockets.remove(0)).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_udp(socket, ctx.clone(), |_| true, shutdown.clone()));

        let proxy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Sent to 127.0.0.3: the answer must come from there, not from 127.0.0.1.
        let to = SocketAddr::new("127.0.0.3".parse().unwrap(), listen.port());
        for bad in [
            &b""[..],
            b"PROXY TCP4 198.51.100.1 192.0.2.2 1 2\r\nhi",
            b"garbage",
            &V2Builder::proxy(
                "198.51.100.1:1".parse().unwrap(),
                "192.0.2.2:2".parse().unwrap(),
            )
            .build()
            .unwrap(),
        ] {
            proxy.send_to(bad, to).await.unwrap();
        }
        let mut dgram = V2Builder::local().build().unwrap();
        dgram.extend_from_slice(b"ping");
        proxy.send_to(&dgram, to).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), proxy.recv_from(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        assert_eq!(from, to, "answered from the address the proxy used");
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.ends_with("|ping"), "{text}");
        assert!(
            text.starts_with("127.0.0.1:"),
            "LOCAL comes from the host: {text}"
        );

        // A second LOCAL datagram from the same proxy reuses its flow.
        proxy.send_to(&dgram, to).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), proxy.recv_from(&mut buf))
            .await
            .expect("second answer")
            .unwrap();
        let s = &ctx.stats;
        assert_eq!(s.udp_dropped_invalid.load(Ordering::Relaxed), 4);
        assert_eq!(s.udp_flows_created.load(Ordering::Relaxed), 1);
        assert_eq!(s.udp_replies.load(Ordering::Relaxed), 2);
        assert_eq!(s.udp_datagrams.load(Ordering::Relaxed), 6);

        // Idle: the sweep closes the flow within 2 × close-after.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.udp_flows_expired.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "flow never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(s.udp_flows_active.load(Ordering::Relaxed), 0);
        shutdown.cancel();
        task.await.unwrap();
    }
}
