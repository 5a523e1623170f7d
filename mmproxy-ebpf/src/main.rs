//! mmproxy's kernel side.
//!
//! `mmproxy_sk_lookup` runs on every socket lookup for a new TCP connection or UDP
//! datagram in the daemon's network namespace. For lookups that match one of
//! mmproxy's listen rules it enforces the allowed-subnet policy before any socket is
//! chosen — a refused proxy never reaches accept() or recvmsg() — and can steer the
//! lookup to a listener held in `LISTENERS`, so one socket serves a whole port range.
//! Lookups that match no rule are passed untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::{map, sk_lookup},
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray, SockMap},
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use core::ptr::read_volatile;
use mmproxy_common::{
    Config, Counter, ListenRule, COUNTER_SLOTS, FAMILY_V4, FAMILY_V6, MAX_ALLOWED_SUBNETS,
    MAX_LISTENERS, MAX_LISTEN_RULES, RULE_ANY_ADDR, RULE_STEER,
};

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
    Some(Lookup {
        family,
        protocol: protocol as u8,
        remote,
        local,
        local_port: local_port as u16,
    })
}

fn decide(ctx: &SkLookupContext) -> u32 {
    let Some(lookup) = read_lookup(ctx) else {
        return SK_PASS;
    };
    let Some(config) = CONFIG.get(0) else {
        return SK_PASS;
    };
    let Some(rule) = matching_rule(&lookup, config.rule_count) else {
        return SK_PASS;
    };

    if config.filter_enabled != 0 && !source_allowed(&lookup) {
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
            Ok(()) => count(Counter::Steered),
            Err(_) => count(Counter::SteerFailed),
        }
    }
    SK_PASS
}

fn matching_rule(lookup: &Lookup, rule_count: u32) -> Option<&'static ListenRule> {
    let n = if rule_count < MAX_LISTEN_RULES {
        rule_count
    } else {
        MAX_LISTEN_RULES
    };
    for i in 0..n {
        let rule = LISTEN_RULES.get(i)?;
        if rule.family != lookup.family || rule.protocol != lookup.protocol {
            continue;
        }
        if lookup.local_port < rule.port_lo || lookup.local_port > rule.port_hi {
            continue;
        }
        if rule.flags & RULE_ANY_ADDR == 0 && rule.addr != lookup.local {
            continue;
        }
        return Some(rule);
    }
    None
}

fn source_allowed(lookup: &Lookup) -> bool {
    if lookup.family == FAMILY_V4 {
        let addr = [
            lookup.remote[0],
            lookup.remote[1],
            lookup.remote[2],
            lookup.remote[3],
        ];
        ALLOWED_V4.get(Key::new(32, addr)).is_some()
    } else {
        ALLOWED_V6.get(Key::new(128, lookup.remote)).is_some()
    }
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and sk_lookup runs with preemption disabled, so
        // nothing else writes it concurrently.
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
