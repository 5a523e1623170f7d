//! mmproxy's kernel side.
//!
//! `mmproxy_sk_lookup` runs on every socket lookup for a new TCP connection or UDP
//! datagram in the daemon's network namespace. For lookups that match one of
//! mmproxy's listen rules it enforces the allowed-subnet policy before any socket is
//! chosen — a refused proxy never reaches accept() or recvmsg() — and can steer the
//! lookup to a listener held in `LISTENERS`, so one socket serves a whole port range.
//! Lookups that match no rule are passed untouched.
//!
//! `mmproxy_tc_egress` and `mmproxy_tc_ingress` recognise answers of live mmproxy
//! flows (the daemon keeps them in `FLOWS`) on the return path and mark them, so a
//! `fwmark` rule delivers them to mmproxy's transparent upstream socket instead of
//! routing them out; answers generated on this host are also redirected into `lo`,
//! since a mark set after the output route lookup cannot change that route any more.
//! Packets that are not answers of live flows are never modified.
//!
//! With `--udp-datapath kernel` (`Config::udp_relay`) established UDP flows are
//! relayed in both directions by tc programs: [`relay_in`] on the interfaces
//! balancer datagrams arrive on, [`relay_out`] first in every program that sees
//! answers (and alone on `lo` egress). Both halves live in `UDP_RELAY`.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomics offer no fetch_add;
// the intrinsic compiles to the BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod parse;
mod proxy_v2;
mod relay;
mod relay_in;
mod relay_out;
mod rewrite;

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS, BPF_F_NO_PREALLOC, TC_ACT_UNSPEC,
    },
    helpers::bpf_redirect,
    macros::{classifier, map, sk_lookup},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::debug;
use core::ptr::read_volatile;
use mmproxy_common::{
    Config, Counter, FlowKey, ListenRule, RelayAction, RelayKey, RelayRelease, COUNTER_SLOTS,
    FAMILY_V4, FAMILY_V6, MAX_ALLOWED_SUBNETS, MAX_FLOWS, MAX_LISTENERS, MAX_LISTEN_RULES,
    MAX_RELAY_ENTRIES, PROTO_TCP, PROTO_UDP, RULE_ANY_ADDR, RULE_STEER,
};
use relay::Verdict;
use relay_out::relay_out;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[map]
static ALLOWED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOWED_SUBNETS, 0);

#[map]
static ALLOWED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOWED_SUBNETS, 0);

#[map]
static LISTEN_RULES: Array<ListenRule> = Array::with_max_entries(MAX_LISTEN_RULES, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(MAX_LISTENERS, 0);

/// Live flows, keyed as their answers look. Not preallocated: most of the time it
/// holds far fewer entries than its capacity.
#[map]
static FLOWS: HashMap<FlowKey, u8> = HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Both halves of every UDP flow the kernel relays (`--udp-datapath kernel`). An LRU
/// so a full table drops the least recently relayed flow's half (which then goes
/// through user space again) rather than refusing new flows.
#[map]
static UDP_RELAY: LruHashMap<RelayKey, RelayAction> =
    LruHashMap::with_max_entries(MAX_RELAY_ENTRIES, 0);

/// What user space has taken of each held flow (`RELAY_HELD`, relay_in.rs). An LRU:
/// entries are not removed when flows close, and one lost early only keeps its
/// flow in user space until the next release.
#[map]
static UDP_RELEASE: LruHashMap<RelayKey, RelayRelease> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Per-CPU room for the packet being relayed (parse.rs).
#[map]
static PACKET: PerCpuArray<parse::UdpPacket> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for the bytes the inbound relay checksums and moves.
#[map]
static SCRATCH: PerCpuArray<[u8; relay_in::CHUNK]> = PerCpuArray::with_max_entries(1, 0);

#[sk_lookup]
pub fn mmproxy_sk_lookup(ctx: SkLookupContext) -> u32 {
    decide(&ctx)
}

/// The lookup's fields, copied out once; addresses stay in network byte order.
struct Lookup {
    family: u8,
    protocol: u8,
    remote: [u8; 16],
    local: [u8; 16],
    local_port: u16,
    /// Network byte order, as in the packet.
    remote_port: u16,
}

fn read_lookup(ctx: &SkLookupContext) -> Option<Lookup> {
    let l = ctx.lookup;
    // Every field is read with its own volatile load at a constant offset from the
    // context pointer: the verifier rejects loads through a context pointer the
    // compiler has offset (which it likes to do when both families share code).
    // SAFETY: the kernel hands sk_lookup programs a valid `bpf_sk_lookup`; every
    // field read here is one the verifier allows for this program type.
    let mut remote = [0u8; 16];
    let mut local = [0u8; 16];
    let family = match unsafe { read_volatile(&raw const (*l).family) } {
        AF_INET => {
            let r = unsafe { read_volatile(&raw const (*l).remote_ip4) };
            let a = unsafe { read_volatile(&raw const (*l).local_ip4) };
            remote[..4].copy_from_slice(&r.to_ne_bytes());
            local[..4].copy_from_slice(&a.to_ne_bytes());
            FAMILY_V4
        }
        AF_INET6 => {
            // The verifier only accepts 4-byte loads of these arrays.
            let r = unsafe {
                [
                    read_volatile(&raw const (*l).remote_ip6[0]),
                    read_volatile(&raw const (*l).remote_ip6[1]),
                    read_volatile(&raw const (*l).remote_ip6[2]),
                    read_volatile(&raw const (*l).remote_ip6[3]),
                ]
            };
            let a = unsafe {
                [
                    read_volatile(&raw const (*l).local_ip6[0]),
                    read_volatile(&raw const (*l).local_ip6[1]),
                    read_volatile(&raw const (*l).local_ip6[2]),
                    read_volatile(&raw const (*l).local_ip6[3]),
                ]
            };
            for i in 0..4 {
                remote[i * 4..i * 4 + 4].copy_from_slice(&r[i].to_ne_bytes());
                local[i * 4..i * 4 + 4].copy_from_slice(&a[i].to_ne_bytes());
            }
            FAMILY_V6
        }
        _ => return None,
    };
    let protocol = unsafe { read_volatile(&raw const (*l).protocol) };
    // Host byte order, unlike remote_port.
    let local_port = unsafe { read_volatile(&raw const (*l).local_port) };
    let remote_port = unsafe { read_volatile(&raw const (*l).remote_port) };
    Some(Lookup {
        family,
        protocol: protocol as u8,
        remote,
        local,
        local_port: local_port as u16,
        remote_port,
    })
}

fn decide(ctx: &SkLookupContext) -> u32 {
    let Some(lookup) = read_lookup(ctx) else {
        return SK_PASS;
    };
    let Some(config) = CONFIG.get(0) else {
        return SK_PASS;
    };
    let Some(rule) = matching_rule(
        lookup.family,
        lookup.protocol,
        &lookup.local,
        lookup.local_port,
        config.rule_count,
    ) else {
        return SK_PASS;
    };
    // A service's answer to one of mmproxy's UDP upstream sockets can match a
    // wildcard listen rule (the client's port inside a listened range): it is not a
    // proxy's datagram, and the normal lookup must find the upstream socket. (TCP
    // answers never get here: the established socket is found before sk_lookup.)
    if lookup.protocol == PROTO_UDP && is_flow_answer(&lookup) {
        return SK_PASS;
    }
    // mmproxy's own upstream connection (or datagram) to a service whose address and
    // port a listen rule covers (a wildcard range, -dynamic-destination): steering it
    // back to mmproxy would loop. The daemon registers each flow before its first
    // packet leaves. (ingress_ifindex cannot tell these from a peer's packets: for a
    // packet this host sends to one of its own addresses the kernel reports the
    // interface that owns the address, e.g. eth0, and lo only for 127.0.0.0/8.)
    if is_own_upstream(&lookup) {
        count(Counter::OwnUpstream);
        return SK_PASS;
    }

    if config.filter_enabled != 0 && !source_allowed(lookup.family, &lookup.remote) {
        if lookup.family == FAMILY_V4 {
            count(Counter::RefusedV4);
            debug!(
                ctx,
                "refused {:i} -> port {}: not in allowed subnets",
                u32::from_be_bytes([
                    lookup.remote[0],
                    lookup.remote[1],
                    lookup.remote[2],
                    lookup.remote[3]
                ]),
                lookup.local_port
            );
        } else {
            count(Counter::RefusedV6);
            debug!(
                ctx,
                "refused {:i} -> port {}: not in allowed subnets", lookup.remote, lookup.local_port
            );
        }
        return SK_DROP;
    }

    count(if lookup.family == FAMILY_V4 {
        Counter::AllowedV4
    } else {
        Counter::AllowedV6
    });

    if rule.flags & RULE_STEER != 0 {
        // A failed assignment (empty slot while the daemon restarts, a socket of the
        // other family) falls through to the normal lookup rather than dropping.
        match LISTENERS.redirect_sk_lookup(ctx, rule.sock_index, 0) {
            Ok(()) => {
                count(Counter::Steered);
                debug!(
                    ctx,
                    "steered port {} to listener {}", lookup.local_port, rule.sock_index
                );
            }
            Err(_) => count(Counter::SteerFailed),
        }
    }
    SK_PASS
}

/// The first listen rule covering `local`:`local_port` (host order).
fn matching_rule(
    family: u8,
    protocol: u8,
    local: &[u8; 16],
    local_port: u16,
    rule_count: u32,
) -> Option<&'static ListenRule> {
    let n = if rule_count < MAX_LISTEN_RULES {
        rule_count
    } else {
        MAX_LISTEN_RULES
    };
    for i in 0..n {
        let rule = LISTEN_RULES.get(i)?;
        if rule.family != family || rule.protocol != protocol {
            continue;
        }
        if local_port < rule.port_lo || local_port > rule.port_hi {
            continue;
        }
        if rule.flags & RULE_ANY_ADDR == 0 && rule.addr != *local {
            continue;
        }
        return Some(rule);
    }
    None
}

fn source_allowed(family: u8, remote: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        let addr = [remote[0], remote[1], remote[2], remote[3]];
        ALLOWED_V4.get(Key::new(32, addr)).is_some()
    } else {
        ALLOWED_V6.get(Key::new(128, *remote)).is_some()
    }
}

fn is_flow_answer(lookup: &Lookup) -> bool {
    let key = FlowKey::udp_answer(
        lookup.family,
        lookup.remote_port,
        lookup.local,
        lookup.local_port.to_be(),
    );
    FLOWS.get_ptr(&key).is_some()
}

fn is_own_upstream(lookup: &Lookup) -> bool {
    match FlowKey::of_upstream_packet(
        lookup.family,
        lookup.protocol,
        lookup.remote,
        lookup.remote_port,
        lookup.local,
        lookup.local_port.to_be(),
    ) {
        Some(key) => FLOWS.get_ptr(&key).is_some(),
        None => false,
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// Answers generated on this host, leaving through the default-route interface:
/// mark, make the frame addressed to `lo` (all-zero MAC), and redirect it into `lo`'s
/// ingress, where the `fwmark` rule and the local route deliver it.
#[classifier]
pub fn mmproxy_tc_egress(ctx: TcContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    if let Verdict::Done(action) = relay_out(&ctx, config) {
        return action;
    }
    if !is_live_answer(&ctx) {
        return TC_ACT_UNSPEC;
    }
    ctx.set_mark(config.return_mark);
    if ctx.store(0, &[0u8; 6], 0).is_err() {
        return TC_ACT_UNSPEC;
    }
    count(Counter::ReturnRedirected);
    // SAFETY: a plain helper call; on failure the packet continues unchanged but
    // for its mark and MAC, and is routed out as it would have been.
    unsafe { bpf_redirect(config.lo_ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}

/// Answers arriving from a service elsewhere (a container behind a veth, with this
/// host as its gateway): marking is enough, routing input happens after tc ingress.
#[classifier]
pub fn mmproxy_tc_ingress(ctx: TcContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    if let Verdict::Done(action) = relay_out(&ctx, config) {
        return action;
    }
    if is_live_answer(&ctx) {
        ctx.set_mark(config.return_mark);
        count(Counter::ReturnMarked);
    }
    TC_ACT_UNSPEC
}

/// Whether the (Ethernet) frame is a TCP or UDP packet whose tuple is in `FLOWS`.
/// IPv6 extension headers and non-first IPv4 fragments are not parsed: answers of a
/// local service carry neither in practice, and such packets are left alone.
fn is_live_answer(ctx: &TcContext) -> bool {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return false;
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (family, protocol, l4) = match u16::from_be(ethertype) {
        ETH_P_IP => {
            let Ok(ver_ihl) = ctx.load::<u8>(ETH_HLEN) else {
                return false;
            };
            let Ok(frag) = ctx.load::<u16>(ETH_HLEN + 6) else {
                return false;
            };
            // Fragment offset non-zero: no ports in this packet.
            if u16::from_be(frag) & 0x1fff != 0 {
                return false;
            }
            let Ok(proto) = ctx.load::<u8>(ETH_HLEN + 9) else {
                return false;
            };
            let Ok(s4) = ctx.load::<[u8; 4]>(ETH_HLEN + 12) else {
                return false;
            };
            let Ok(d4) = ctx.load::<[u8; 4]>(ETH_HLEN + 16) else {
                return false;
            };
            src[..4].copy_from_slice(&s4);
            dst[..4].copy_from_slice(&d4);
            (FAMILY_V4, proto, ETH_HLEN + usize::from(ver_ihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let Ok(next) = ctx.load::<u8>(ETH_HLEN + 6) else {
                return false;
            };
            let Ok(s6) = ctx.load::<[u8; 16]>(ETH_HLEN + 8) else {
                return false;
            };
            let Ok(d6) = ctx.load::<[u8; 16]>(ETH_HLEN + 24) else {
                return false;
            };
            src = s6;
            dst = d6;
            (FAMILY_V6, next, ETH_HLEN + 40)
        }
        _ => return false,
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return false;
    }
    let Ok(ports) = ctx.load::<[u16; 2]>(l4) else {
        return false;
    };
    match FlowKey::of_packet(family, protocol, src, ports[0], dst, ports[1]) {
        Some(key) => FLOWS.get_ptr(&key).is_some(),
        None => false,
    }
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs run with migration disabled; a
        // lost increment from a nested program on the same CPU is acceptable.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel grants some helpers only to GPL-compatible programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
