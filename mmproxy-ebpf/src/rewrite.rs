//! Rewriting a relayed datagram's IP and UDP headers into what the socket it
//! stands in for would have sent, with the checksums kept right for every
//! `ip_summed` state the skb may be in.
//!
//! The checksum helpers follow the kernel's own convention (`inet_proto_csum_
//! replace*`): a field change compensated by a checksum change leaves the packet's
//! ones' complement sum alone, so `CHECKSUM_COMPLETE`'s `skb->csum` needs no update;
//! pseudo-header changes (`BPF_F_PSEUDO_HDR`) are the ones the kernel also applies
//! to `skb->csum`, and the only ones it applies to the seed a `CHECKSUM_PARTIAL` skb
//! (a datagram from a local socket, or from one behind a veth) keeps in its check
//! field; the device (or `skb_checksum_help`) later sums the bytes actually there.
//! Bytes written without compensation (moved payload, IPv6 header) are stored with
//! `BPF_F_RECOMPUTE_CSUM` so `skb->csum` follows them.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_update,
    programs::TcContext,
};
use mmproxy_common::{RelayAction, FAMILY_V4, PROTO_UDP};

use crate::parse::{UdpPacket, ETH_HLEN, IPV4_HLEN};

/// Bytes summed by [`csum_diff`] (whole 4-byte words: a length that is not a
/// multiple of 4 is not summed past its last whole word), aligned for the
/// `bpf_csum_diff` buffer that also uses it.
#[repr(C, align(4))]
pub struct Words<const N: usize>(pub [u8; N]);

/// The ones' complement sum of `to` minus that of `from`, added to `seed`: what
/// `bpf_csum_diff` returns (equal modulo 0xffff, all its users need). Summed
/// here: for a few header words a helper call costs more than the additions.
#[inline(always)]
pub fn csum_diff<const A: usize, const B: usize>(from: &Words<A>, to: &Words<B>, seed: u32) -> u32 {
    let mut acc = u64::from(seed);
    let mut i = 0;
    while i + 4 <= A {
        acc += u64::from(!word(&from.0, i));
        i += 4;
    }
    let mut i = 0;
    while i + 4 <= B {
        acc += u64::from(word(&to.0, i));
        i += 4;
    }
    fold32(acc)
}

/// Bytes `i..i + 4` in memory order, as the kernel's checksum code reads them.
#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// A 64-bit ones' complement sum folded to 32 bits.
#[inline(always)]
fn fold32(acc: u64) -> u32 {
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    ((acc & 0xffff_ffff) + (acc >> 32)) as u32
}

/// The checksum field `check` updated by `diff`, as `bpf_l3_csum_replace(0, diff)`
/// (the kernel's `csum_replace_by_diff`) leaves it.
#[inline(always)]
fn csum_replaced(check: [u8; 2], diff: u32) -> [u8; 2] {
    let c = u32::from(u16::from_ne_bytes(check));
    let s = fold32(u64::from(diff) + u64::from(!c));
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// Rewrites `pkt` (whose UDP payload already lost its first `removed` bytes, their
/// sum being `removed_sum` as `bpf_csum_diff(bytes → nothing)`) into a datagram
/// from `action.src` to `action.dst` with TTL/hop limit one less. `Err` once the
/// packet may be half-rewritten: drop it.
#[inline(never)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &UdpPacket,
    action: &RelayAction,
    removed: u16,
    removed_sum: u32,
) -> Result<(), ()> {
    let udp_len = pkt.udp_len - removed;
    let v4 = pkt.family == FAMILY_V4;
    if v4 {
        let mut old = Words([0u8; IPV4_HLEN]);
        old.0.copy_from_slice(&pkt.ip[..IPV4_HLEN]);
        let mut new = Words(old.0);
        let tot = u16::from_be_bytes([old.0[2], old.0[3]]) - removed;
        new.0[2..4].copy_from_slice(&tot.to_be_bytes());
        new.0[8] = old.0[8] - 1;
        new.0[12..16].copy_from_slice(&action.src_addr[..4]);
        new.0[16..20].copy_from_slice(&action.dst_addr[..4]);
        // The header checksum compensates every change (the old checksum is in
        // both, so it cancels out of the difference), so the packet's sum, and
        // CHECKSUM_COMPLETE's skb->csum, stay as they are. Updated, not recomputed:
        // a header that arrived with a bad checksum keeps failing ip_rcv's check.
        let d = csum_diff(&old, &new, 0);
        let check = csum_replaced([old.0[10], old.0[11]], d);
        new.0[10] = check[0];
        new.0[11] = check[1];
        ctx.store(ETH_HLEN, &new.0, 0).map_err(drop)?;
    } else {
        let mut new = Words(pkt.ip);
        // No extension headers (parse.rs): the payload is the UDP datagram.
        new.0[4..6].copy_from_slice(&udp_len.to_be_bytes());
        new.0[7] = pkt.ip[7] - 1;
        new.0[8..24].copy_from_slice(&action.src_addr);
        new.0[24..40].copy_from_slice(&action.dst_addr);
        // No header checksum compensates these: skb->csum must follow them.
        ctx.store(ETH_HLEN, &new.0, u64::from(BPF_F_RECOMPUTE_CSUM))
            .map_err(drop)?;
    }

    let l4 = pkt.l4;
    let check = [pkt.udp[6], pkt.udp[7]];
    let old_hdr = Words([
        pkt.udp[0], pkt.udp[1], pkt.udp[2], pkt.udp[3], pkt.udp[4], pkt.udp[5], 0, 0,
    ]);
    let sport = action.src_port.to_ne_bytes();
    let dport = action.dst_port.to_ne_bytes();
    let len = udp_len.to_be_bytes();
    let mut new_hdr = Words([
        sport[0], sport[1], dport[0], dport[1], len[0], len[1], check[0], check[1],
    ]);
    // With the removal, these bytes replace payload bytes: a real content change.
    ctx.store(l4, &new_hdr.0, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(drop)?;
    new_hdr.0[6] = 0;
    new_hdr.0[7] = 0;
    let d = csum_diff(&old_hdr, &new_hdr, removed_sum);
    // MARK_MANGLED_0: an IPv4 datagram without checksum (0) keeps none, and a
    // computed 0 is sent as 0xffff.
    ctx.l4_csum_replace(l4 + 6, 0, u64::from(d), u64::from(BPF_F_MARK_MANGLED_0))
        .map_err(drop)?;
    // The check field itself changed without compensation (the removed bytes are
    // gone, not rewritten): tell CHECKSUM_COMPLETE's skb->csum. Any other state
    // refuses the update, and needs none.
    let after: [u8; 2] = ctx.load(l4 + 6).map_err(drop)?;
    if after != check {
        let from = Words([0, 0, check[0], check[1]]);
        let to = Words([0, 0, after[0], after[1]]);
        let fix = csum_diff(&from, &to, 0);
        // SAFETY: a helper on the program's own skb.
        unsafe { bpf_csum_update(ctx.skb.skb, fix) };
    }

    let old_len = pkt.udp_len.to_be_bytes();
    let d = if v4 {
        let mut old = Words([0u8; 12]);
        let mut new = Words([0u8; 12]);
        old.0[..8].copy_from_slice(&pkt.ip[12..20]);
        new.0[..4].copy_from_slice(&action.src_addr[..4]);
        new.0[4..8].copy_from_slice(&action.dst_addr[..4]);
        pseudo_tail(&mut old.0[8..], old_len);
        pseudo_tail(&mut new.0[8..], len);
        csum_diff(&old, &new, 0)
    } else {
        let mut old = Words([0u8; 36]);
        let mut new = Words([0u8; 36]);
        old.0[..32].copy_from_slice(&pkt.ip[8..40]);
        new.0[..16].copy_from_slice(&action.src_addr);
        new.0[16..32].copy_from_slice(&action.dst_addr);
        pseudo_tail(&mut old.0[32..], old_len);
        pseudo_tail(&mut new.0[32..], len);
        csum_diff(&old, &new, 0)
    };
    ctx.l4_csum_replace(
        l4 + 6,
        0,
        u64::from(d),
        u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0),
    )
    .map_err(drop)
}

/// The pseudo header's last word: zero, protocol, UDP length.
#[inline(always)]
fn pseudo_tail(word: &mut [u8], len: [u8; 2]) {
    if word.len() >= 4 {
        word[0] = 0;
        word[1] = PROTO_UDP;
        word[2] = len[0];
        word[3] = len[1];
    }
}
