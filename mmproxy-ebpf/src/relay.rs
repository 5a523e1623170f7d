//! What both relay directions share: the MTU check before any change, and the
//! delivery once the packet is rewritten.
use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use mmproxy_common::{Counter, RelayAction, FAMILY_V4, RELAY_NEXTHOP, RELAY_TO_LO};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// What a relay attempt ended with.
pub enum Verdict {
    /// Not a packet of a live relayed flow: the program goes on as without relay.
    NotOurs,
    /// Left to user space unchanged, counted.
    Punt(Counter),
    /// Relayed: the program returns this action.
    Done(i32),
}

/// Whether the packet, `len_diff` bytes longer or shorter, fits the MTU of
/// `ifindex`. Delivery into or through `lo` (`lo_ifindex`) is not checked (its MTU
/// is 64 KiB, and what a socket could send there the relay can too).
#[inline(always)]
pub fn fits(ctx: &TcContext, action: &RelayAction, len_diff: i32, lo_ifindex: u32) -> bool {
    if action.flags & RELAY_TO_LO != 0 || action.ifindex == lo_ifindex {
        return true;
    }
    let mut mtu_len: u32 = 0;
    // SAFETY: a helper on the program's own skb; mtu_len lives for the call.
    let r = unsafe {
        bpf_check_mtu(
            ctx.skb.skb as *mut _,
            action.ifindex,
            &mut mtu_len,
            len_diff,
            0,
        )
    };
    r == 0
}

/// Marks activity and sends the rewritten packet on its way. The route lookup and
/// neighbour resolution of `bpf_redirect_neigh` need no forwarding sysctl (unlike
/// `bpf_fib_lookup`), and it fills in the MAC addresses itself.
#[inline(always)]
pub fn deliver(
    ctx: &TcContext,
    action: *mut RelayAction,
    relayed: Counter,
    route_epoch: u32,
) -> Verdict {
    // SAFETY: `action` points into a map value the caller looked up just now; the
    // LRU may reuse it concurrently, in which case the write is lost, no more.
    let a = unsafe { &mut *action };
    if a.mark != 0 {
        ctx.set_mark(a.mark);
    }
    // SAFETY: plain helper.
    a.last_ns = unsafe { bpf_ktime_get_ns() };
    let r = if a.flags & RELAY_TO_LO != 0 {
        // lo accepts the frame as addressed to itself with an all-zero MAC.
        if ctx.store(0, &[0u8; 6], 0).is_err() {
            return Verdict::Punt(Counter::UdpRelayFailed).shot();
        }
        // SAFETY: plain helper.
        unsafe { bpf_redirect(a.ifindex, u64::from(BPF_F_INGRESS)) }
    } else if a.flags & RELAY_NEXTHOP != 0 && a.route_epoch == route_epoch {
        // A route lookup per packet was a good part of what relaying cost; the
        // next hop user space found once is the one it would give while the routes
        // have not changed since (the epoch). The packet keeps the route it came
        // with, which matters only if it has to wait for the neighbour: user space
        // sets the flag only for a resolved one.
        let mut nh = next_hop(a);
        // SAFETY: plain helper; `nh` lives on the stack for the call.
        unsafe {
            bpf_redirect_neigh(
                a.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    } else {
        // SAFETY: plain helper; no neighbour parameters, so it looks the route up.
        unsafe { bpf_redirect_neigh(a.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    // Both return TC_ACT_REDIRECT on success and TC_ACT_SHOT on bad arguments.
    if r == i64::from(TC_ACT_SHOT) {
        return Verdict::Punt(Counter::UdpRelayFailed).shot();
    }
    crate::count(relayed);
    Verdict::Done(r as i32)
}

/// `action.nh_addr` as `bpf_redirect_neigh` takes it.
#[inline(always)]
fn next_hop(action: &RelayAction) -> bpf_redir_neigh {
    let b = &action.nh_addr;
    let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if action.family == FAMILY_V4 {
        bpf_redir_neigh {
            nh_family: AF_INET,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: word(0) },
        }
    } else {
        bpf_redir_neigh {
            nh_family: AF_INET6,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv6_nh: [word(0), word(4), word(8), word(12)],
            },
        }
    }
}

impl Verdict {
    /// A failure after the packet was changed: counted, and the packet dropped
    /// rather than delivered half-rewritten.
    #[inline(always)]
    pub fn shot(self) -> Verdict {
        if let Verdict::Punt(c) = self {
            crate::count(c);
        }
        Verdict::Done(TC_ACT_SHOT as i32)
    }
}
