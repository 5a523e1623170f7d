//! The outbound half: a service's answer to a live relayed flow, rewritten into
//! the datagram mmproxy's listening socket would send to the proxy (from the
//! address and port the proxy sent to) and sent out of the interface the proxy's
//! datagrams arrive on.
//!
//! Runs first in every program that sees answers: `mmproxy_tc_egress` (services on
//! this host, answers leaving by the default route), `mmproxy_tc_ingress`
//! (services behind a veth) and `mmproxy_tc_lo_egress` (services on loopback whose
//! answers the loopback rule routes through `lo`). A punted answer goes on down
//! the program's usual path, which steers it to mmproxy's socket.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use mmproxy_common::{Config, Counter, RelayKey};

use crate::parse::parse_udp;
use crate::relay::{deliver, fits, Verdict};
use crate::rewrite::rewrite;
use crate::{CONFIG, UDP_RELAY};

/// Answers of loopback services, on `lo`'s egress. Nothing else happens here.
#[classifier]
pub fn mmproxy_tc_lo_egress(ctx: TcContext) -> i32 {
    // A local service's answer is made here (skb_iif 0). A packet that came in
    // through a device and now leaves through lo is the inbound relay's own
    // datagram on its way to a loopback target (bpf_redirect_neigh into lo): no
    // answer, and looking it up would cost every relayed datagram a parse and a
    // map miss.
    // SAFETY: a plain read of the context the kernel hands tc programs.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_UNSPEC;
    }
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    match relay_out(&ctx, config) {
        Verdict::Done(action) => action,
        _ => TC_ACT_UNSPEC,
    }
}

/// Relays `ctx` if it answers a live relayed flow; counts a punt.
#[inline(always)]
pub fn relay_out(ctx: &TcContext, config: &Config) -> Verdict {
    if config.udp_relay == 0 {
        return Verdict::NotOurs;
    }
    let v = try_relay_out(ctx, config);
    if let Verdict::Punt(c) = v {
        crate::count(c);
    }
    v
}

#[inline(always)]
fn try_relay_out(ctx: &TcContext, config: &Config) -> Verdict {
    let Some(pkt) = parse_udp(ctx) else {
        return Verdict::NotOurs;
    };
    let key = RelayKey::outbound(pkt.family, pkt.sport, pkt.dst, pkt.dport);
    let Some(action) = UDP_RELAY.get_ptr_mut(&key) else {
        return Verdict::NotOurs;
    };
    // SAFETY: a map value, valid while the program runs.
    let a = unsafe { &*action };
    if !pkt.simple || pkt.ttl <= 1 || a.family != pkt.family {
        return Verdict::Punt(Counter::UdpPuntedPacket);
    }
    if !fits(ctx, a, 0, config.lo_ifindex) {
        return Verdict::Punt(Counter::UdpPuntedMtu);
    }
    if rewrite(ctx, pkt, a, 0, 0).is_err() {
        return Verdict::Punt(Counter::UdpRelayFailed).shot();
    }
    deliver(ctx, action, Counter::UdpRelayedOut, config.route_epoch)
}
