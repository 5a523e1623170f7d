//! The PROXY v2 header of a datagram on a live flow, checked as strictly as the
//! daemon's decoder (`mmproxy/src/proxy_protocol/{v2,tlv}.rs`) for the forms the
//! kernel relays; any other form is left to user space, which decides.
use aya_ebpf::programs::TcContext;
use mmproxy_common::FAMILY_V4;

use crate::parse::{load_array, UdpPacket, UDP_HLEN};

/// `\r\n\r\n\0\r\nQUIT\n`, as three words in packet byte order.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY. LOCAL carries nothing to relay.
const V2_PROXY: u8 = 0x21;
/// INET + DGRAM, INET6 + DGRAM.
const INET_DGRAM: u8 = 0x12;
const INET6_DGRAM: u8 = 0x22;
const FIXED_LEN: usize = 16;

/// Headers longer than this are left to user space: the checksum of the removed
/// bytes is taken in one `bpf_csum_diff` of a 512-byte buffer, the header's
/// length rounded up to whole words.
pub const MAX_RELAYED_HEADER: usize = 508;

/// TLV entries looked at; a header with more goes to user space.
const MAX_TLVS: usize = 8;

/// What a relayable header says; addresses and ports in network order.
pub struct ProxyHeader {
    /// The whole header, fixed part included.
    pub len: usize,
    pub client: [u8; 16],
    pub client_port: u16,
    pub orig_dst: [u8; 16],
    pub orig_dst_port: u16,
}

/// The header at the start of `pkt`'s payload, or `None` if the kernel does not
/// relay it.
#[inline(never)]
pub fn check(ctx: &TcContext, pkt: &UdpPacket, max_header_len: u32) -> Option<ProxyHeader> {
    let p = pkt.l4 + UDP_HLEN;
    let payload = usize::from(pkt.udp_len).checked_sub(UDP_HLEN)?;
    let fixed: [u8; FIXED_LEN] = load_array(ctx, p)?;
    // Word compares: a slice compare would become a memcmp call.
    for i in 0..3 {
        let at = i * 4;
        let got = [fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]];
        let want = [
            SIGNATURE[at],
            SIGNATURE[at + 1],
            SIGNATURE[at + 2],
            SIGNATURE[at + 3],
        ];
        if u32::from_ne_bytes(got) != u32::from_ne_bytes(want) {
            return None;
        }
    }
    let v4 = pkt.family == FAMILY_V4;
    // The header's family must be the packet's: the relay rewrites addresses,
    // never the IP version.
    let family_byte = if v4 { INET_DGRAM } else { INET6_DGRAM };
    if fixed[12] != V2_PROXY || fixed[13] != family_byte {
        return None;
    }
    let body = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let total = FIXED_LEN + body;
    let block = if v4 { 12 } else { 36 };
    // An even length keeps every payload byte at an even or odd offset as
    // before once the header is gone, so the payload's ones' complement sum is
    // unchanged; an odd one goes to user space.
    if body < block
        || total > max_header_len as usize
        || total > payload
        || total > MAX_RELAYED_HEADER
        || total % 2 != 0
    {
        return None;
    }
    let mut client = [0u8; 16];
    let mut orig_dst = [0u8; 16];
    let ports: [u8; 4] = if v4 {
        let a: [u8; 12] = load_array(ctx, p + FIXED_LEN)?;
        client[..4].copy_from_slice(&a[0..4]);
        orig_dst[..4].copy_from_slice(&a[4..8]);
        [a[8], a[9], a[10], a[11]]
    } else {
        let a: [u8; 36] = load_array(ctx, p + FIXED_LEN)?;
        client.copy_from_slice(&a[0..16]);
        orig_dst.copy_from_slice(&a[16..32]);
        [a[32], a[33], a[34], a[35]]
    };
    if !tlvs_skippable(ctx, p, FIXED_LEN + block, total) {
        return None;
    }
    Some(ProxyHeader {
        len: total,
        client,
        client_port: u16::from_ne_bytes([ports[0], ports[1]]),
        orig_dst,
        orig_dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
    })
}

/// Whether the TLV area `[start, end)` of the header at `p` holds only entries the
/// daemon checks no further than their framing, ending exactly at `end`.
#[inline(always)]
fn tlvs_skippable(ctx: &TcContext, p: usize, start: usize, end: usize) -> bool {
    let mut off = start;
    for _ in 0..MAX_TLVS {
        if off >= end {
            break;
        }
        if off + 3 > end {
            return false;
        }
        let Ok(t) = ctx.load::<[u8; 3]>(p + off) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([t[1], t[2]]));
        if off + 3 + len > end {
            return false;
        }
        let ok = if needs_text(t[0]) {
            len <= MAX_TEXT_TLV && ascii(ctx, p + off + 3, len)
        } else {
            skippable(t[0], len)
        };
        if !ok {
            return false;
        }
        off += 3 + len;
    }
    off == end
}

/// TLV kinds the daemon validates purely structurally (tlv.rs `check`): ALPN,
/// NOOP, UNIQUE_ID up to its 128-byte cap, and the custom range. SSL (sub-TLVs),
/// CRC32C (the checksum) and unregistered kinds go to user space; AUTHORITY and
/// NETNS see [`needs_text`].
#[inline(always)]
pub fn skippable(kind: u8, len: usize) -> bool {
    match kind {
        0x01 | 0x04 => true,
        0x05 => len <= 128,
        0xE0..=0xEF => true,
        _ => false,
    }
}

/// AUTHORITY and NETNS, which the daemon requires to be UTF-8. The kernel accepts
/// them only when plain ASCII (a host name, a namespace name): ASCII is UTF-8, so
/// nothing the daemon would refuse gets through, and anything else goes to user
/// space to be judged.
#[inline(always)]
fn needs_text(kind: u8) -> bool {
    kind == 0x02 || kind == 0x30
}

/// Longer AUTHORITY/NETNS values go to user space (a DNS name has at most 253).
const MAX_TEXT_TLV: usize = 256;

/// Whether the `len` bytes at `at` are all ASCII, read eight at a time. The last
/// read may go past the value into the rest of the datagram (masked off); a value
/// that ends within eight bytes of the packet's end is left to user space.
#[inline(never)]
fn ascii(ctx: &TcContext, at: usize, len: usize) -> bool {
    let mut i = 0usize;
    for _ in 0..MAX_TEXT_TLV / 8 {
        if i >= len {
            return true;
        }
        let Ok(w) = ctx.load::<u64>(at + i) else {
            return false;
        };
        let rem = len - i;
        // Packet bytes load little-endian: the value's bytes are the low ones.
        let mask = if rem >= 8 {
            u64::MAX
        } else {
            (1u64 << (rem * 8)) - 1
        };
        if w & mask & 0x8080_8080_8080_8080 != 0 {
            return false;
        }
        i += 8;
    }
    i >= len
}
