//! One UDP flow (ARCHITECTURE.md, step 4): its upstream socket, bound to the
//! client's address through [`crate::transparent`] and left unconnected, its
//! registration with the kernel side, and the task relaying its answers.
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use socket2::Socket;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::warn;

use crate::addr::{ClientAddr, ProxyAddr, UpstreamAddr};
use crate::ebpf::{FlowProtocol, FlowRegistration, FlowRegistry, ReturnFlow};
use crate::logging::CONN_TARGET;
use crate::stats::Stats;
use crate::transparent::{self, PortChoice, UpstreamError, UpstreamSocket};

use super::answers::relay_answers;
use super::kernel_relay::{Arrival, KernelHalf};
use super::limits::LogLimit;
use super::reply_socket::{Reply, ReplyKey};
use super::{Clock, UdpContext};

/// A flow's identity: the proxy that sent it and the client the header names (`None`
/// for LOCAL and other headers without a client: one flow per proxy address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FlowId {
    pub(super) proxy: ProxyAddr,
    pub(super) client: Option<ClientAddr>,
}

/// What a flow's answer task and its listener both see.
#[derive(Debug)]
pub(super) struct FlowShared {
    /// When an answer was last relayed ([`Clock`] ms): answers keep a flow alive.
    pub(super) last_answer: AtomicU64,
    /// The port datagrams go to; only answers from it are relayed. Follows the
    /// header's destination port when the target has none.
    pub(super) target_port: AtomicU16,
    /// Where answers leave from. Changed by the listener only when the proxy's
    /// destination changes; the answer task holds it for one batch.
    pub(super) reply: Mutex<Reply>,
}

/// One live flow, owned by its listener's table. Dropping it aborts the answer task,
/// which drops the last reference to the upstream socket and so closes it.
pub(super) struct Flow {
    /// With `--udp-datapath kernel`: the flow's entries in the kernel, removed first
    /// when the flow closes.
    pub(super) kernel: Option<KernelHalf>,
    /// Kept so the descriptor stays open while the listener sends through `fd`.
    _socket: Arc<UdpSocket>,
    pub(super) fd: RawFd,
    pub(super) shared: Arc<FlowShared>,
    answers: AbortHandle,
    /// What `shared.reply` was made for.
    pub(super) reply_key: ReplyKey,
    /// Undone (after a short linger) when the flow closes.
    _registration: Option<FlowRegistration>,
    stats: Arc<Stats>,
}

impl Flow {
    /// When the flow was last used outside the listener's sight: an answer relayed
    /// by its task, or a datagram either way relayed by the kernel ([`Clock`] ms).
    pub(super) fn last_active(&self, clock: &Clock) -> u64 {
        let answered = self.shared.last_answer.load(Ordering::Relaxed);
        let kernel = self.kernel.as_ref().map_or(0, |k| k.last_active(clock));
        answered.max(kernel)
    }

    /// [`Flow::last_active`] in microseconds, as finely as the kernel tells.
    pub(super) fn last_active_us(&self, clock: &Clock) -> u64 {
        let answered = self.shared.last_answer.load(Ordering::Relaxed);
        let kernel = self.kernel.as_ref().map_or(0, |k| k.last_active_us(clock));
        answered.saturating_mul(1000).max(kernel)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.answers.abort();
        Stats::dec(&self.stats.udp_flows_active);
    }
}

/// Where a new flow's answers go: to the proxy, from where it sent to.
#[derive(Debug)]
pub(super) struct AnswerRoute {
    pub(super) proxy: SocketAddr,
    pub(super) reply: Reply,
    pub(super) reply_key: ReplyKey,
}

/// Opens the flow's upstream socket, hands it to the kernel datapath if that is on,
/// and starts its answer task.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_flow(
    id: FlowId,
    target: UpstreamAddr,
    back: AnswerRoute,
    arrival: &Arrival,
    listener: &Arc<UdpSocket>,
    ctx: &Arc<UdpContext>,
    log: &mut LogLimit,
    now: u64,
) -> Result<Flow, UpstreamError> {
    let upstream = UpstreamSocket {
        protocol: FlowProtocol::Udp,
        mark: ctx.mark,
    };
    // Unconnected, so never a port shared with other upstreams: chosen at bind.
    let socket = upstream.open(id.client, target, PortChoice::AtBind, |_| Ok(()))?;
    let registration = match (&ctx.upstream.flows, id.client) {
        (Some(flows), Some(client)) => register(flows, &socket, client, target, log, now),
        _ => None,
    };
    // After the registration above (sk_lookup and the return path know the flow),
    // before the first datagram is sent.
    let kernel = id
        .client
        .filter(|_| ctx.relay.is_some())
        .and_then(|client| {
            let bound = transparent::bound_addr(&socket, client);
            KernelHalf::open(ctx, arrival, client, bound, target, log, now)
        });
    let socket = Arc::new(UdpSocket::from_std(socket.into()).map_err(UpstreamError::Register)?);
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
        kernel,
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
    let local = transparent::bound_addr(socket, client);
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
                      reason = "flow_table", error = &e as &dyn std::error::Error,
                      "answers of this UDP flow are not steered");
            }
            None
        }
    }
}
