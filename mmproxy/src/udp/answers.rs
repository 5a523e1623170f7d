//! The service's answers of one flow, relayed to its proxy (ARCHITECTURE.md,
//! step 5): one task per flow, receiving on the flow's upstream socket and sending
//! through the listening socket or the flow's reply socket.
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::logging::CONN_TARGET;
use crate::stats::Stats;

use super::batch::{RecvBatch, SendBatch, MAX_DATAGRAM};
use super::flow::FlowShared;
use super::{UdpContext, ERROR_PAUSE};

/// Datagrams moved per call on a flow's answers (per worker thread, shared by flows).
const REPLY_BATCH: usize = 16;

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
pub(super) async fn relay_answers(
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
                debug!(target: CONN_TARGET, peer = %proxy,
                       error = &e as &dyn std::error::Error, "receiving answers failed");
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
                       error = &e as &dyn std::error::Error,
                       "sending answers to the proxy failed");
            }
        }
    }
}
