//! IP_PKTINFO / IPV6_PKTINFO control messages: which local address a datagram was sent
//! to (receive side), and which local address an answer must leave from (send side).
//!
//! A listener bound to a wildcard (`0.0.0.0`, `[::]`) answers from whatever source
//! address routing picks for the proxy, which is not always the address the proxy sent
//! to (a VIP, a secondary address); the proxy then drops the answer as coming from an
//! unknown peer. Receiving PKTINFO tells us the address; sending it back in a control
//! message makes the kernel use it as the source (go-mmproxy leaves this out).
//!
//! IP_ORIGDSTADDR / IPV6_ORIGDSTADDR add the destination *port*: a port range is one
//! socket on the range's first port that sk_lookup steers every port of the range to,
//! so the socket's own port does not say which port the proxy sent to.
//!
//! The control buffers are plain byte slices; headers and payloads are read and written
//! with unaligned copies of the libc structs, so this module never trusts the buffer's
//! alignment and never reads outside it, whatever lengths the headers claim.
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The local end of a datagram as the proxy addressed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalDst {
    /// The destination address of the proxy's datagram (a local address).
    pub addr: IpAddr,
    /// The interface it arrived on; only used to send from IPv6 link-local addresses,
    /// which are ambiguous without it.
    pub ifindex: u32,
}

/// Bytes of control buffer each received or sent message gets: room for one
/// `in6_pktinfo` and one `sockaddr_in6` (IPV6_ORIGDSTADDR), the larger of each pair,
/// with slack for another small message the kernel may add. A control message that
/// does not fit sets MSG_CTRUNC and is ignored.
pub const CONTROL_LEN: usize = 128;

/// glibc's CMSG_ALIGN: control messages are padded to `size_t`.
const fn align(len: usize) -> usize {
    (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}

/// CMSG_LEN(0): where a control message's data starts.
const HEADER_LEN: usize = align(size_of::<libc::cmsghdr>());

/// CMSG_SPACE(len): bytes one control message with `len` bytes of data occupies.
pub const fn space(len: usize) -> usize {
    HEADER_LEN + align(len)
}

const _: () = assert!(space(size_of::<libc::in6_pktinfo>()) <= CONTROL_LEN);
const _: () = assert!(space(size_of::<libc::in_pktinfo>()) <= CONTROL_LEN);
const _: () = assert!(
    space(size_of::<libc::in6_pktinfo>()) + space(size_of::<libc::sockaddr_in6>()) <= CONTROL_LEN
);

/// Reads a `T` from `buf` at `offset`, if the whole `T` lies inside `buf`.
fn read<T: Copy>(buf: &[u8], offset: usize) -> Option<T> {
    let bytes = buf.get(offset..offset.checked_add(size_of::<T>())?)?;
    // SAFETY: `bytes` holds exactly size_of::<T>() readable bytes; read_unaligned has
    // no alignment requirement; T is one of the plain-old-data libc structs used
    // below (integers and byte arrays only), for which every bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Writes `value` into `buf` at `offset`; false (nothing written) if it does not fit.
fn write<T: Copy>(buf: &mut [u8], offset: usize, value: T) -> bool {
    let Some(end) = offset.checked_add(size_of::<T>()) else {
        return false;
    };
    let Some(bytes) = buf.get_mut(offset..end) else {
        return false;
    };
    // SAFETY: `bytes` holds exactly size_of::<T>() writable bytes and write_unaligned
    // has no alignment requirement.
    unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<T>(), value) };
    true
}

/// Every control message in `control` as (level, type, data), stopping at the first
/// header that is malformed (shorter than itself, or reaching past the buffer).
fn messages(control: &[u8]) -> impl Iterator<Item = (libc::c_int, libc::c_int, &[u8])> {
    let mut offset = Some(0usize);
    std::iter::from_fn(move || {
        let at = offset?;
        offset = None;
        let hdr = read::<libc::cmsghdr>(control, at)?;
        // size_t on glibc, socklen_t on musl: a no-op conversion on some targets.
        #[allow(clippy::useless_conversion)]
        let len = usize::try_from(hdr.cmsg_len).ok()?;
        if len < HEADER_LEN {
            return None;
        }
        let data = control.get(at.checked_add(HEADER_LEN)?..at.checked_add(len)?)?;
        offset = at.checked_add(align(len));
        Some((hdr.cmsg_level, hdr.cmsg_type, data))
    })
}

/// The destination of a received datagram, from the control messages the kernel
/// filled in (`control` is the `msg_controllen` bytes it reported). `None` when no
/// PKTINFO is present, e.g. the option was not enabled or MSG_CTRUNC cut it off.
pub fn parse_pktinfo(control: &[u8]) -> Option<LocalDst> {
    messages(control).find_map(|(level, kind, data)| match (level, kind) {
        (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
            let info: libc::in_pktinfo = read(data, 0)?;
            Some(LocalDst {
                addr: IpAddr::V4(Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes())),
                ifindex: u32::try_from(info.ipi_ifindex).unwrap_or(0),
            })
        }
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
            let info: libc::in6_pktinfo = read(data, 0)?;
            Some(LocalDst {
                addr: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                ifindex: info.ipi6_ifindex,
            })
        }
        _ => None,
    })
}

/// The original destination (address *and port*) of a received datagram, from
/// IP_ORIGDSTADDR / IPV6_ORIGDSTADDR. A datagram the sk_lookup program steered from
/// another port of a range to the range's socket reports the port the proxy sent to
/// here, while the socket's own port is the range's first. `None` when absent.
pub fn parse_origdst(control: &[u8]) -> Option<SocketAddr> {
    messages(control).find_map(|(level, kind, data)| match (level, kind) {
        (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => {
            let sin: libc::sockaddr_in = read(data, 0)?;
            if libc::c_int::from(sin.sin_family) != libc::AF_INET {
                return None;
            }
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => {
            let sin6: libc::sockaddr_in6 = read(data, 0)?;
            if libc::c_int::from(sin6.sin6_family) != libc::AF_INET6 {
                return None;
            }
            // The kernel fills the scope for link-local destinations: a socket bound
            // to the address needs it.
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    })
}

/// Writes the control message that makes an answer leave from `src`, and returns its
/// length (the `msg_controllen` to use); 0 if `buf` is too small.
///
/// IPv4: IP_PKTINFO with `ipi_spec_dst` = the source and interface 0, so routing still
/// chooses the interface. IPv6: IPV6_PKTINFO with the source; the interface is given
/// only for link-local sources, which need it, so routing stays free for the rest.
pub fn write_pktinfo(buf: &mut [u8], src: &LocalDst) -> usize {
    let (level, kind, data_len) = match src.addr {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    let total = space(data_len);
    let Some(out) = buf.get_mut(..total) else {
        return 0;
    };
    out.fill(0);
    // SAFETY: cmsghdr is plain old data; all-zero is a valid value.
    let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
    hdr.cmsg_len = (HEADER_LEN + data_len) as _;
    hdr.cmsg_level = level;
    hdr.cmsg_type = kind;
    let written = write(out, 0, hdr)
        && match src.addr {
            IpAddr::V4(v4) => write(
                out,
                HEADER_LEN,
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(v6) => write(
                out,
                HEADER_LEN,
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: if v6.is_unicast_link_local() {
                        src.ifindex
                    } else {
                        0
                    },
                },
            ),
        };
    if written {
        total
    } else {
        0
    }
}

/// `UDP_SEGMENT` from linux/udp.h (not in the libc crate for every target).
pub const UDP_SEGMENT: libc::c_int = 103;

const _: () = assert!(space(size_of::<libc::in6_pktinfo>()) + space(2) <= CONTROL_LEN);

/// Writes a UDP_SEGMENT control message (UDP GSO: the payload leaves as datagrams of
/// `size` bytes, the last one possibly shorter) at the start of `buf`. Returns the
/// bytes used (CMSG_SPACE), or 0 if `buf` is too small.
pub fn write_udp_segment(buf: &mut [u8], size: u16) -> usize {
    let total = space(size_of::<u16>());
    let Some(out) = buf.get_mut(..total) else {
        return 0;
    };
    out.fill(0);
    // SAFETY: cmsghdr is plain old data; all-zero is a valid value.
    let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
    hdr.cmsg_len = (HEADER_LEN + size_of::<u16>()) as _;
    hdr.cmsg_level = libc::SOL_UDP;
    hdr.cmsg_type = UDP_SEGMENT;
    if write(out, 0, hdr) && write(out, HEADER_LEN, size) {
        total
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(buf: &[u8]) -> libc::cmsghdr {
        read(buf, 0).unwrap()
    }

    #[test]
    fn v4_roundtrip_uses_spec_dst_for_sending_and_ipi_addr_for_receiving() {
        let mut buf = [0u8; CONTROL_LEN];
        let src = LocalDst {
            addr: "192.0.2.4".parse().unwrap(),
            ifindex: 7,
        };
        let n = write_pktinfo(&mut buf, &src);
        assert_eq!(n, space(size_of::<libc::in_pktinfo>()));
        let h = header(&buf);
        assert_eq!(
            (h.cmsg_level, h.cmsg_type),
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
        );
        let want: libc::cmsghdr = libc::cmsghdr {
            cmsg_len: (HEADER_LEN + 12) as _,
            ..h
        };
        assert_eq!(h.cmsg_len, want.cmsg_len);
        let info: libc::in_pktinfo = read(&buf, HEADER_LEN).unwrap();
        assert_eq!(info.ipi_spec_dst.s_addr.to_ne_bytes(), [192, 0, 2, 4]);
        assert_eq!(info.ipi_ifindex, 0, "routing picks the interface");

        // What the kernel hands us on receive: ipi_addr is the header's destination.
        let mut rx = [0u8; CONTROL_LEN];
        write(&mut rx, 0, h);
        let got = libc::in_pktinfo {
            ipi_ifindex: 3,
            ipi_spec_dst: libc::in_addr { s_addr: 0 },
            ipi_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([198, 51, 100, 1]),
            },
        };
        write(&mut rx, HEADER_LEN, got);
        assert_eq!(
            parse_pktinfo(&rx[..n]),
            Some(LocalDst {
                addr: "198.51.100.1".parse().unwrap(),
                ifindex: 3
            })
        );
    }

    #[test]
    fn v6_roundtrip_and_ifindex_only_for_link_local() {
        for (addr, want_if) in [("2001:db8:1::4", 0), ("fe80::1", 9)] {
            let mut buf = [0u8; CONTROL_LEN];
            let src = LocalDst {
                addr: addr.parse().unwrap(),
                ifindex: 9,
            };
            let n = write_pktinfo(&mut buf, &src);
            assert_eq!(n, space(size_of::<libc::in6_pktinfo>()));
            let h = header(&buf);
            assert_eq!(
                (h.cmsg_level, h.cmsg_type),
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
            );
            let parsed = parse_pktinfo(&buf[..n]).unwrap();
            assert_eq!(parsed.addr, src.addr);
            assert_eq!(parsed.ifindex, want_if, "{addr}");
        }
    }

    #[test]
    fn other_messages_are_skipped_and_pktinfo_found_after_them() {
        let mut buf = [0u8; 2 * CONTROL_LEN];
        // SAFETY: plain old data.
        let mut other: libc::cmsghdr = unsafe { std::mem::zeroed() };
        other.cmsg_len = (HEADER_LEN + 4) as _;
        other.cmsg_level = libc::SOL_SOCKET;
        other.cmsg_type = libc::SO_MARK;
        write(&mut buf, 0, other);
        let second = space(4);
        let src = LocalDst {
            addr: "2001:db8::7".parse().unwrap(),
            ifindex: 0,
        };
        let n = write_pktinfo(&mut buf[second..], &src);
        assert_eq!(parse_pktinfo(&buf[..second + n]), Some(src));
    }

    #[test]
    fn truncated_or_lying_control_data_is_rejected_without_reading_past_it() {
        let mut buf = [0u8; CONTROL_LEN];
        let src = LocalDst {
            addr: "192.0.2.4".parse().unwrap(),
            ifindex: 0,
        };
        let n = write_pktinfo(&mut buf, &src);
        for cut in 0..n {
            // Shorter than the message: never a partial read.
            let got = parse_pktinfo(&buf[..cut]);
            assert!(got.is_none() || cut >= HEADER_LEN + 12, "cut {cut}");
        }
        // A header claiming less than its own size, or a huge length.
        for claimed in [0usize, 3, HEADER_LEN - 1, usize::MAX] {
            let mut h = header(&buf);
            h.cmsg_len = claimed as _;
            let mut b = buf;
            write(&mut b, 0, h);
            assert_eq!(parse_pktinfo(&b[..n]), None, "claimed {claimed}");
        }
        assert_eq!(parse_pktinfo(&[]), None);
    }

    /// What the kernel writes for IP_ORIGDSTADDR / IPV6_ORIGDSTADDR after `offset`.
    fn origdst_message(buf: &mut [u8], offset: usize, addr: SocketAddr) -> usize {
        // SAFETY: plain old data.
        let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                h.cmsg_level = libc::IPPROTO_IP;
                h.cmsg_type = libc::IP_ORIGDSTADDR;
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                assert!(write(buf, offset + HEADER_LEN, sin));
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                h.cmsg_level = libc::IPPROTO_IPV6;
                h.cmsg_type = libc::IPV6_ORIGDSTADDR;
                // SAFETY: plain old data.
                let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                assert!(write(buf, offset + HEADER_LEN, sin6));
                size_of::<libc::sockaddr_in6>()
            }
        };
        h.cmsg_len = (HEADER_LEN + len) as _;
        assert!(write(buf, offset, h));
        space(len)
    }

    #[test]
    fn origdst_is_found_next_to_pktinfo_in_either_order_for_both_families() {
        for (addr, dst) in [
            ("192.0.2.4", "192.0.2.4:20999"),
            ("2001:db8::4", "[2001:db8::4]:20500"),
            ("fe80::4", "[fe80::4%7]:20001"),
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            let src = LocalDst {
                addr: addr.parse().unwrap(),
                ifindex: 7,
            };
            // PKTINFO first (as the kernel orders them), then ORIGDSTADDR.
            let mut buf = [0u8; CONTROL_LEN];
            let n = write_pktinfo(&mut buf, &src);
            let n = n + origdst_message(&mut buf, n, dst);
            assert!(n <= CONTROL_LEN);
            assert_eq!(parse_origdst(&buf[..n]), Some(dst), "{dst}");
            // (A sent IPv4 PKTINFO names ipi_spec_dst, which receiving ignores.)
            assert!(parse_pktinfo(&buf[..n]).is_some(), "{dst}");
            // ORIGDSTADDR alone, and first.
            let mut buf = [0u8; CONTROL_LEN];
            let m = origdst_message(&mut buf, 0, dst);
            assert_eq!(parse_origdst(&buf[..m]), Some(dst));
            assert_eq!(parse_pktinfo(&buf[..m]), None);
            let m = m + write_pktinfo(&mut buf[m..], &src);
            assert_eq!(parse_origdst(&buf[..m]), Some(dst));
            assert!(parse_pktinfo(&buf[..m]).is_some(), "{dst}");
            // PKTINFO alone has no port.
            let mut buf = [0u8; CONTROL_LEN];
            let k = write_pktinfo(&mut buf, &src);
            assert_eq!(parse_origdst(&buf[..k]), None);
        }
    }

    #[test]
    fn truncated_lying_or_mislabelled_origdst_is_rejected() {
        for dst in ["192.0.2.4:20999", "[2001:db8::4]:20500"] {
            let dst: SocketAddr = dst.parse().unwrap();
            let mut buf = [0u8; CONTROL_LEN];
            let n = origdst_message(&mut buf, 0, dst);
            let data_len = if dst.is_ipv4() {
                size_of::<libc::sockaddr_in>()
            } else {
                size_of::<libc::sockaddr_in6>()
            };
            for cut in 0..HEADER_LEN + data_len {
                assert_eq!(parse_origdst(&buf[..cut]), None, "{dst} cut {cut}");
            }
            assert_eq!(parse_origdst(&buf[..n]), Some(dst));
            // A header claiming less data than a sockaddr: never a read past it.
            let mut h = header(&buf);
            h.cmsg_len = (HEADER_LEN + 4) as _;
            let mut b = buf;
            write(&mut b, 0, h);
            assert_eq!(parse_origdst(&b[..n]), None, "{dst}");
            for claimed in [0usize, HEADER_LEN - 1, usize::MAX] {
                let mut h = header(&buf);
                h.cmsg_len = claimed as _;
                let mut b = buf;
                write(&mut b, 0, h);
                assert_eq!(parse_origdst(&b[..n]), None, "{dst} claimed {claimed}");
            }
            // The right level and type with the other family's address inside.
            let mut b = buf;
            b[HEADER_LEN] ^= 0xff;
            b[HEADER_LEN + 1] ^= 0xff;
            assert_eq!(parse_origdst(&b[..n]), None, "{dst} wrong family");
        }
    }

    #[test]
    fn too_small_a_buffer_writes_nothing() {
        let mut buf = [0u8; 8];
        let src = LocalDst {
            addr: "192.0.2.4".parse().unwrap(),
            ifindex: 0,
        };
        assert_eq!(write_pktinfo(&mut buf, &src), 0);
    }
}
