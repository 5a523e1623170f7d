//! The Ethernet/IP/UDP framing of the packets the relay programs look at.
//!
//! Only the plain forms are rewritten: IPv4 without options and unfragmented, IPv6
//! with UDP as the very next header, one datagram per skb (no GSO) whose UDP
//! length agrees with the IP length. Everything else is reported as not
//! [`UdpPacket::simple`], so the caller can leave it to user space and count it.
use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use mmproxy_common::{FAMILY_V4, FAMILY_V6, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;

/// A UDP packet's fields as read once; addresses and ports in network order.
pub struct UdpPacket {
    pub family: u8,
    /// The IP header as it is (the first 20 bytes for IPv4).
    pub ip: [u8; IPV6_HLEN],
    /// The UDP header as it is.
    pub udp: [u8; UDP_HLEN],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The UDP length field, host order.
    pub udp_len: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Offset of the UDP header from the start of the frame.
    pub l4: usize,
    /// The plain form the relay rewrites (see the module comment).
    pub simple: bool,
}

/// The frame's UDP packet, if it is one whose ports can be read: a non-first IPv4
/// fragment or an IPv6 packet with extension headers is `None` (it cannot be told
/// apart from other traffic, so it is not counted either).
///
/// The fields live in a per-CPU map slot, not on the stack: the relay's call chain
/// would not fit the verifier's 512 bytes otherwise. tc programs run with bottom
/// halves off, so one program's use of the slot is never interrupted by another's.
#[inline(never)]
pub fn parse_udp(ctx: &TcContext) -> Option<&'static mut UdpPacket> {
    let ethertype = u16::from_be_bytes(load_array::<2>(ctx, 12)?);
    // SAFETY: a plain read of the context the kernel hands tc programs.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let frame_len = ctx.len() as usize;
    // SAFETY: a per-CPU map value, used by this program run only (see above).
    let pkt = unsafe { &mut *crate::PACKET.get_ptr_mut(0)? };
    let (plain, ip_total) = match ethertype {
        ETH_P_IP => {
            load_into(ctx, ETH_HLEN, &mut pkt.ip[..IPV4_HLEN])?;
            let h = &pkt.ip;
            if h[0] >> 4 != 4 || h[9] != PROTO_UDP {
                return None;
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            if frag & 0x1fff != 0 {
                return None;
            }
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < IPV4_HLEN {
                return None;
            }
            pkt.family = FAMILY_V4;
            pkt.ttl = h[8];
            pkt.l4 = ETH_HLEN + ihl;
            pkt.src = [0; 16];
            pkt.dst = [0; 16];
            pkt.src[..4].copy_from_slice(&pkt.ip[12..16]);
            pkt.dst[..4].copy_from_slice(&pkt.ip[16..20]);
            let tot = usize::from(u16::from_be_bytes([pkt.ip[2], pkt.ip[3]]));
            // Options or "more fragments": not the plain form.
            (ihl == IPV4_HLEN && frag & 0x2000 == 0, tot)
        }
        ETH_P_IPV6 => {
            load_into(ctx, ETH_HLEN, &mut pkt.ip)?;
            if pkt.ip[0] >> 4 != 6 || pkt.ip[6] != PROTO_UDP {
                return None;
            }
            pkt.family = FAMILY_V6;
            pkt.ttl = pkt.ip[7];
            pkt.l4 = ETH_HLEN + IPV6_HLEN;
            pkt.src.copy_from_slice(&pkt.ip[8..24]);
            pkt.dst.copy_from_slice(&pkt.ip[24..40]);
            let tot = IPV6_HLEN + usize::from(u16::from_be_bytes([pkt.ip[4], pkt.ip[5]]));
            (true, tot)
        }
        _ => return None,
    };
    load_into(ctx, pkt.l4, &mut pkt.udp)?;
    let udp = &pkt.udp;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    pkt.sport = u16::from_ne_bytes([udp[0], udp[1]]);
    pkt.dport = u16::from_ne_bytes([udp[2], udp[3]]);
    pkt.udp_len = udp_len;
    let l3_len = pkt.l4 - ETH_HLEN;
    // The UDP length must be exactly what the IP length leaves, and the frame must
    // hold all of it (a longer frame is Ethernet padding, which is fine).
    pkt.simple = plain
        && !gso
        && usize::from(udp_len) >= UDP_HLEN
        && ip_total == l3_len + usize::from(udp_len)
        && ETH_HLEN + ip_total <= frame_len;
    Some(pkt)
}

/// Furthest offset read straight from the packet: past it, and for bytes not in
/// the skb's linear part, `bpf_skb_load_bytes` reads.
const MAX_DIRECT: usize = 256;

/// Copies the packet's bytes at `offset` into `dst`. Headers and small datagrams
/// lie in the skb's linear part, where a plain load reads them: a helper call for
/// each read was a good share of what relaying a datagram cost. Anything else
/// (paged data, a short frame) goes through the helper.
#[inline(always)]
pub fn load_into(ctx: &TcContext, offset: usize, dst: &mut [u8]) -> Option<()> {
    if offset <= MAX_DIRECT {
        let start = ctx.data() + offset;
        if start + dst.len() <= ctx.data_end() {
            // SAFETY: `[start, start + len)` lies inside the linear data (checked
            // against data_end just now), and `dst` is writable for `len`.
            unsafe {
                core::ptr::copy_nonoverlapping(start as *const u8, dst.as_mut_ptr(), dst.len())
            };
            return Some(());
        }
    }
    // SAFETY: `dst` is writable for its length, which the helper is given.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            dst.as_mut_ptr() as *mut _,
            dst.len() as u32,
        )
    };
    (r == 0).then_some(())
}

/// `N` packet bytes at `offset`, read as [`load_into`] does.
#[inline(always)]
pub fn load_array<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let mut a = [0u8; N];
    load_into(ctx, offset, &mut a)?;
    Some(a)
}
