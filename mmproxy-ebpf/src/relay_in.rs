//! The inbound half: a proxy's datagram on a live relayed flow, its PROXY header
//! checked and removed, rewritten into the datagram the flow's upstream socket
//! would have sent (from the client's address and port to the target) and
//! delivered to the service.
//!
//! The header is not removed with `bpf_skb_adjust_room`: that moves the headers in
//! front of the removed bytes, while a `CHECKSUM_PARTIAL` skb (from a veth or a
//! virtio NIC) keeps pointing its `csum_start` at where the UDP header was, and
//! the device would then write the checksum into the wrong bytes. The payload is
//! moved forward over the header instead and the tail trimmed: the UDP header
//! stays where it was. It costs a copy of the payload, so payloads longer than
//! [`MAX_MOVED`] go to user space.
use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_UNSPEC},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    macros::classifier,
    programs::TcContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use core::ptr::read_volatile;
use mmproxy_common::{
    Config, Counter, RelayAction, RelayKey, PROTO_UDP, RELAY_HELD, RELEASE_ANYWAY,
};

use crate::parse::{parse_udp, ETH_HLEN, UDP_HLEN};
use crate::proxy_v2::{self, MAX_RELAYED_HEADER};
use crate::relay::{deliver, fits, Verdict};
use crate::rewrite::rewrite;
use crate::{count, matching_rule, source_allowed, CONFIG, SCRATCH, UDP_RELAY, UDP_RELEASE};

pub const CHUNK: usize = 512;
const MAX_CHUNKS: usize = 4;
/// The longest payload moved in the kernel.
pub const MAX_MOVED: usize = CHUNK * MAX_CHUNKS;

/// tc ingress on every interface balancer datagrams may arrive on.
#[classifier]
pub fn mmproxy_tc_udp_in(ctx: TcContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    if config.udp_relay == 0 {
        return TC_ACT_UNSPEC;
    }
    match try_relay_in(&ctx, config) {
        Verdict::Done(action) => action,
        Verdict::Punt(c) => {
            count(c);
            TC_ACT_UNSPEC
        }
        Verdict::NotOurs => TC_ACT_UNSPEC,
    }
}

#[inline(always)]
fn try_relay_in(ctx: &TcContext, config: &Config) -> Verdict {
    let Some(pkt) = parse_udp(ctx) else {
        return Verdict::NotOurs;
    };
    // Only datagrams to one of mmproxy's UDP listen rules are looked at (and
    // counted); the rest of the host's traffic passes untouched.
    let local_port = u16::from_be(pkt.dport);
    if matching_rule(
        pkt.family,
        PROTO_UDP,
        &pkt.dst,
        local_port,
        config.rule_count,
    )
    .is_none()
    {
        return Verdict::NotOurs;
    }
    if !pkt.simple {
        return Verdict::Punt(Counter::UdpPuntedPacket);
    }
    // Checked on every datagram, not only when the flow was made: a SIGHUP that
    // drops the proxy's subnet applies at once; sk_lookup then refuses it.
    if config.filter_enabled != 0 && !source_allowed(pkt.family, &pkt.src) {
        return Verdict::Punt(Counter::UdpPuntedNotAllowed);
    }
    let Some(hdr) = proxy_v2::check(ctx, pkt, config.max_header_len) else {
        return Verdict::Punt(Counter::UdpPuntedHeader);
    };
    let key = RelayKey::inbound(
        pkt.family,
        pkt.src,
        pkt.sport,
        pkt.dst,
        pkt.dport,
        hdr.client,
        hdr.client_port,
        hdr.orig_dst,
        hdr.orig_dst_port,
    );
    let Some(action) = UDP_RELAY.get_ptr_mut(&key) else {
        return Verdict::Punt(Counter::UdpPuntedNoFlow);
    };
    if held(&key, action) {
        return Verdict::Punt(Counter::UdpPuntedHeld);
    }
    // SAFETY: a map value, valid while the program runs.
    let a = unsafe { &*action };
    let payload = usize::from(pkt.udp_len) - UDP_HLEN - hdr.len;
    // An empty payload is user space's to judge; a TTL that runs out here is the
    // stack's to answer (ICMP time exceeded).
    if payload == 0 || payload > MAX_MOVED || pkt.ttl <= 1 || a.family != pkt.family {
        return Verdict::Punt(Counter::UdpPuntedPacket);
    }
    if !fits(ctx, a, -(hdr.len as i32), config.lo_ifindex) {
        return Verdict::Punt(Counter::UdpPuntedMtu);
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::Punt(Counter::UdpRelayFailed);
    };
    let p = pkt.l4 + UDP_HLEN;
    let Some(removed_sum) = header_sum(ctx, buf, p, hdr.len) else {
        return Verdict::Punt(Counter::UdpRelayFailed);
    };
    // From here on the packet changes: a failure drops it.
    if move_payload(ctx, buf, p + hdr.len, p, payload).is_err() {
        return Verdict::Punt(Counter::UdpRelayFailed).shot();
    }
    let ip_total = pkt.l4 - ETH_HLEN + usize::from(pkt.udp_len);
    let new_len = (ETH_HLEN + ip_total - hdr.len) as u32;
    // SAFETY: a helper on the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Verdict::Punt(Counter::UdpRelayFailed).shot();
    }
    if rewrite(ctx, pkt, a, hdr.len as u16, removed_sum).is_err() {
        return Verdict::Punt(Counter::UdpRelayFailed).shot();
    }
    deliver(ctx, action, Counter::UdpRelayedIn, config.route_epoch)
}

/// Whether the flow's datagram must still go to user space (`RELAY_HELD`): when
/// user space adds a flow, datagrams of it that arrived before may be waiting in
/// its listening socket, and relaying this one would overtake them. Every
/// datagram left to user space while held is counted; once user space has
/// released exactly that count (it has taken them all), the hold ends here, and
/// from then on the check costs one flag test.
#[inline(always)]
fn held(key: &RelayKey, action: *mut RelayAction) -> bool {
    // SAFETY: a map value, valid while the program runs. The LRU may reuse the
    // element for another flow meanwhile (no grace period), and then these writes
    // land in that flow's fresh value: its hold could end early or count one more.
    // The window is a program run's, as for every LRU map value.
    let a = unsafe { &mut *action };
    if a.flags & RELAY_HELD == 0 {
        return false;
    }
    // SAFETY: a map value, read only.
    if let Some(r) = unsafe { UDP_RELEASE.get(key) } {
        // SAFETY: an aligned u64 of the map value; other CPUs add to it.
        let punts = unsafe { read_volatile(&a.held_punts) };
        if r.generation == a.generation && (r.taken == punts || r.taken == RELEASE_ANYWAY) {
            a.flags &= !RELAY_HELD;
            return false;
        }
    }
    // SAFETY: as above; concurrent CPUs must not lose each other's counts.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut a.held_punts, 1) };
    true
}

/// `bpf_csum_diff(header → nothing)` of the `len` header bytes at `p`.
#[inline(never)]
fn header_sum(ctx: &TcContext, buf: *mut [u8; CHUNK], p: usize, len: usize) -> Option<u32> {
    if len == 0 || len > MAX_RELAYED_HEADER {
        return None;
    }
    // bpf_csum_diff takes whole words: the header's last one is completed with
    // zeros, which add nothing to the sum.
    let last_word = len & 0x1fc;
    // SAFETY: last_word + 4 ≤ 512, inside the map value.
    unsafe { core::ptr::write_unaligned((buf as *mut u8).add(last_word) as *mut u32, 0) };
    let words = ((len + 3) & 0x1fc) as u32;
    let n = len as u32;
    // SAFETY: `buf` is a CHUNK-byte map value and n ≤ CHUNK.
    let r = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, p as u32, buf as *mut _, n) };
    if r != 0 {
        return None;
    }
    // SAFETY: as above; read only.
    let sum = unsafe { bpf_csum_diff(buf as *mut u32, words, core::ptr::null_mut(), 0, 0) };
    if sum < 0 {
        None
    } else {
        Some(sum as u32)
    }
}

/// Copies `len` bytes at `from` to `to` (< `from`), front to back, so every chunk
/// is read before anything overwrites it.
#[inline(never)]
fn move_payload(
    ctx: &TcContext,
    buf: *mut [u8; CHUNK],
    from: usize,
    to: usize,
    len: usize,
) -> Result<(), ()> {
    let mut done = 0usize;
    for _ in 0..MAX_CHUNKS {
        if done >= len {
            break;
        }
        let mut n = len - done;
        if n > CHUNK {
            n = CHUNK;
        }
        // The verifier must see 0 < n ≤ CHUNK on its own: the compiler drops an
        // `n == 0` test it can prove false, so clamp through a volatile reload.
        // SAFETY: a read of a local.
        let n = unsafe { core::ptr::read_volatile(&n) };
        let n = (n.wrapping_sub(1) & (CHUNK - 1)) + 1;
        // SAFETY: `buf` is a CHUNK-byte map value and 0 < n ≤ CHUNK.
        let r = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                (from + done) as u32,
                buf as *mut _,
                n as u32,
            )
        };
        if r != 0 {
            return Err(());
        }
        // RECOMPUTE: skb->csum (CHECKSUM_COMPLETE) follows the moved bytes.
        // SAFETY: as above.
        let r = unsafe {
            bpf_skb_store_bytes(
                ctx.skb.skb,
                (to + done) as u32,
                buf as *const _,
                n as u32,
                u64::from(BPF_F_RECOMPUTE_CSUM),
            )
        };
        if r != 0 {
            return Err(());
        }
        done += n;
    }
    if done < len {
        Err(())
    } else {
        Ok(())
    }
}
