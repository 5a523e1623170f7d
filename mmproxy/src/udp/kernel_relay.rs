//! `--udp-datapath kernel` as the UDP proxy sees it (ARCHITECTURE.md, step 4): a
//! flow with a client is handed to the tc programs ([`crate::ebpf::UdpRelay`]) once
//! its upstream socket is bound and registered, before its first datagram is sent,
//! and taken back when the flow closes. From then on its datagrams and answers
//! normally bypass user space; whatever still arrives here (the kernel refused the
//! flow or punted a datagram) is relayed as in the socket datapath.
//!
//! The registration follows the flow's latest datagram: when the proxy sends to
//! another local address or port, or the header names another destination (and so
//! perhaps another target port), the kernel's entries are replaced. A flow the
//! kernel refused goes on in user space, logged (rate-limited) and counted in
//! `udp_kernel_refused`; it is offered again only when its description changes, so
//! a refused flow costs no map update per datagram.
use std::net::SocketAddr;

use tracing::warn;

use crate::addr::{ClientAddr, OrigDstAddr, UpstreamAddr};
use crate::ebpf::{HeldPunts, RelayError, RelayFlow, RelayRegistration, UdpRelay};
use crate::logging::CONN_TARGET;
use crate::stats::Stats;

use super::limits::LogLimit;
use super::release::Hold;
use super::reply_socket::ReplyKey;
use super::{Clock, UdpContext};

/// How long after handing a flow to the kernel a datagram of it reaching user space
/// with nothing changed makes the daemon look whether the kernel still has it as
/// added. The kernel's LRU map may drop entries before it is full (its free lists
/// are per CPU), and a network change may have taken the interface the entries
/// name (a container's veth made again); the kernel then leaves the flow's
/// datagrams to user space. At most one lookup per flow per this interval, and an
/// update when the entries are gone or older than the routes, puts it back. A flow
/// still current (its datagram came for another reason: too large, a header the
/// kernel leaves to user space) is left as it is, not held anew.
const REOFFER_AFTER_MS: u64 = 1000;

/// Where a datagram came from and was sent to, as the kernel's keys need it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Arrival {
    /// The proxy, as received.
    pub(super) source: SocketAddr,
    /// The local address (PKTINFO) and address and port (ORIGDSTADDR) it was sent to.
    pub(super) reply_key: ReplyKey,
    /// The listening socket's own port (what a missing ORIGDSTADDR means).
    pub(super) listening_port: u16,
    /// The PROXY header's destination; `None` for LOCAL.
    pub(super) header_dst: Option<OrigDstAddr>,
}

/// Why a flow is not even offered to the kernel.
#[derive(Debug, thiserror::Error)]
enum Unrelayable {
    #[error("the kernel did not say which local address the datagram was sent to (no PKTINFO)")]
    NoLocalAddress,
    #[error(transparent)]
    Refused(#[from] RelayError),
}

impl Unrelayable {
    fn kind(&self) -> &'static str {
        match self {
            Unrelayable::NoLocalAddress => "no_pktinfo",
            Unrelayable::Refused(RelayError::MixedFamily) => "mixed_family",
            Unrelayable::Refused(RelayError::NoRoute(_) | RelayError::Route { .. }) => "no_route",
            Unrelayable::Refused(RelayError::Map(_)) => "map",
        }
    }
}

/// A flow's half in the kernel: what it was last offered as, and the registration
/// if the kernel took it. Dropping it removes both halves from the kernel.
#[derive(Debug)]
pub(super) struct KernelHalf {
    /// Where the upstream socket is bound (never changes for a flow).
    bound: SocketAddr,
    /// What the flow was last offered as (`None`: it could not be described).
    offered: Option<RelayFlow>,
    registration: Option<RelayRegistration>,
    /// When it was last handed over ([`Clock`] ms).
    offered_at: u64,
    /// How far the kernel's hold on the inbound half has come (`super::release`).
    pub(super) hold: Hold,
    /// Releases written for the current registration.
    pub(super) release_attempts: u8,
}

impl KernelHalf {
    /// Hands a new flow to the kernel, if the kernel datapath is on and the flow has a
    /// client (LOCAL flows stay in user space). Failures are logged and counted;
    /// the flow then goes on in user space.
    pub(super) fn open(
        ctx: &UdpContext,
        arrival: &Arrival,
        client: ClientAddr,
        bound: SocketAddr,
        target: UpstreamAddr,
        log: &mut LogLimit,
        now: u64,
    ) -> Option<KernelHalf> {
        let relay = ctx.relay.as_ref()?;
        // A client means a PROXY header, which names the destination too.
        arrival.header_dst?;
        let mut half = KernelHalf {
            bound,
            offered: None,
            registration: None,
            offered_at: now,
            hold: Hold::Free,
            release_attempts: 0,
        };
        half.offer(relay, ctx, arrival, client, target, log, now);
        Some(half)
    }

    /// A datagram of this flow reached user space: if it was sent somewhere else
    /// than the registration says (or names another destination or target), the
    /// kernel's entries are replaced so the kernel follows the flow.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn follow(
        &mut self,
        ctx: &UdpContext,
        arrival: &Arrival,
        client: ClientAddr,
        target: UpstreamAddr,
        log: &mut LogLimit,
        now: u64,
    ) {
        let Some(relay) = ctx.relay.as_ref() else {
            return;
        };
        let wanted = describe(arrival, client, self.bound, target, ctx.mark);
        let wanted = wanted.ok().flatten();
        // Unchanged: nothing to do, unless the kernel seems to have lost a flow it
        // took. A refused flow is not offered again with the same description.
        if wanted == self.offered {
            if let Some(r) = &self.registration {
                if now.saturating_sub(self.offered_at) >= REOFFER_AFTER_MS {
                    self.offered_at = now;
                    if r.current() {
                        return;
                    }
                    // Added again, held again.
                    self.hold = Hold::Held;
                    self.release_attempts = 0;
                    if let Err(e) = relay.add(r.flow()) {
                        refused(
                            ctx,
                            arrival,
                            client,
                            target,
                            &Unrelayable::Refused(e),
                            log,
                            now,
                        );
                    }
                }
            }
            return;
        }
        self.offer(relay, ctx, arrival, client, target, log, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn offer(
        &mut self,
        relay: &std::sync::Arc<dyn UdpRelay>,
        ctx: &UdpContext,
        arrival: &Arrival,
        client: ClientAddr,
        target: UpstreamAddr,
        log: &mut LogLimit,
        now: u64,
    ) {
        // The old entries go first: the new ones may share a key with them (the
        // answers' key does not depend on where the proxy sent to), and removing
        // the old after adding the new would take the shared one away.
        self.registration = None;
        self.hold = Hold::Free;
        self.release_attempts = 0;
        self.offered_at = now;
        let described = describe(arrival, client, self.bound, target, ctx.mark);
        self.offered = described.as_ref().ok().copied().flatten();
        let result = described.and_then(|flow| match flow {
            Some(flow) => Ok(Some(RelayRegistration::new(relay, flow)?)),
            None => Ok(None),
        });
        match result {
            Ok(registration) => {
                if registration.is_some() {
                    self.hold = Hold::Held;
                }
                self.registration = registration;
            }
            Err(why) => refused(ctx, arrival, client, target, &why, log, now),
        }
    }

    /// The kernel's count while it holds the inbound half (`None`: released).
    pub(super) fn held(&self) -> Option<HeldPunts> {
        self.registration.as_ref().and_then(RelayRegistration::held)
    }

    /// Ends the hold if the kernel has counted nothing beyond `held`.
    pub(super) fn release(&self, held: HeldPunts) {
        if let Some(r) = &self.registration {
            r.release(held);
        }
    }

    /// When the kernel last relayed a datagram of this flow in either direction, on
    /// `clock`'s scale (0: never, or not registered).
    pub(super) fn last_active(&self, clock: &Clock) -> u64 {
        self.registration
            .as_ref()
            .and_then(RelayRegistration::last_active)
            .map_or(0, |t| clock.ms_of_monotonic(t))
    }

    /// [`KernelHalf::last_active`] in microseconds.
    pub(super) fn last_active_us(&self, clock: &Clock) -> u64 {
        self.registration
            .as_ref()
            .and_then(RelayRegistration::last_active)
            .map_or(0, |t| clock.us_of_monotonic(t))
    }

    #[cfg(test)]
    pub(super) fn registered(&self) -> Option<&RelayFlow> {
        self.registration.as_ref().map(RelayRegistration::flow)
    }
}

/// Counts and logs (rate-limited) a flow the kernel did not take.
fn refused(
    ctx: &UdpContext,
    arrival: &Arrival,
    client: ClientAddr,
    target: UpstreamAddr,
    why: &Unrelayable,
    log: &mut LogLimit,
    now: u64,
) {
    Stats::inc(&ctx.stats.udp_kernel_refused);
    if log.allow(now) {
        warn!(target: CONN_TARGET, peer = %arrival.source, client = %client,
              upstream = %target, reason = why.kind(),
              error = why as &dyn std::error::Error,
              "UDP flow not relayed by the kernel, relayed in user space");
    }
}

/// The flow as the kernel's keys describe it: from the proxy to the local address
/// and port it sent to, on the interface it arrived on; the header's endpoints; the
/// upstream socket's address and the target. `None` for a datagram without a
/// PROXY header's addresses (LOCAL), which the kernel never relays.
fn describe(
    arrival: &Arrival,
    client: ClientAddr,
    bound: SocketAddr,
    target: UpstreamAddr,
    mark: u32,
) -> Result<Option<RelayFlow>, Unrelayable> {
    let Some(orig_dst) = arrival.header_dst else {
        return Ok(None);
    };
    let local = arrival.reply_key.local.ok_or(Unrelayable::NoLocalAddress)?;
    let port = arrival
        .reply_key
        .orig_dst
        .map_or(arrival.listening_port, |a| a.port());
    Ok(Some(RelayFlow {
        proxy: arrival.source,
        local: SocketAddr::new(local.addr, port),
        ifindex: local.ifindex,
        client: client.0,
        orig_dst: orig_dst.0,
        bound,
        target: target.0,
        mark,
    }))
}

#[cfg(test)]
#[path = "kernel_relay_tests.rs"]
mod tests;
