//! Whether an answer may name its next hop to `bpf_redirect_neigh`
//! (`RELAY_NEXTHOP`): only when the kernel already knows that neighbour's
//! link-layer address on the interface.
//!
//! With a next hop, `bpf_redirect_neigh` skips its route lookup and leaves the
//! skb's own route (dst) in place. An answer caught at `lo`'s egress carries
//! `lo`'s local route to the client address. While the neighbour is resolved
//! the packet leaves at once with its cached address, and that route never
//! matters. While it is not (no entry, `INCOMPLETE`, `FAILED`), the packet
//! waits in the neighbour's queue, and when the address arrives Linux sends
//! the queued packets on through the neighbour of each packet's *route*
//! (`neigh_update` → `dst_neigh_lookup_skb`), here one on `lo`: the answer is
//! lost. Without a next hop the helper routes the packet first, so its route
//! names the right interface and queued answers leave where they should; that
//! is what a flow gets until its proxy's neighbour is resolved.
//!
//! The state is asked (`RTM_GETNEIGH`, one round trip) every time a flow is
//! handed to the kernel, not cached: a proxy seen for the first time has no
//! entry yet, and the answer must not outlive the entry it describes.
//!
//! Left open: a flow handed over with a resolved neighbour keeps its next hop
//! until the host's network changes (`Config::route_epoch`). Should that
//! neighbour fail or be removed meanwhile (the proxy stops answering ARP or
//! neighbour discovery, `ip neigh flush`) and be resolved again, the few answers
//! queued meanwhile are lost rather than delivered late.
use std::io;
use std::net::IpAddr;

use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

// `NUD_*` (include/uapi/linux/neighbour.h): the states in which the kernel sends
// to a neighbour without queueing the packet.
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// A neighbour in `state` takes packets at once: it has a link-layer address
/// (`REACHABLE`, `STALE`, `DELAY`, `PROBE`, `PERMANENT`) or needs none
/// (`NOARP`). `INCOMPLETE`, `FAILED` and `NONE` would queue them.
pub fn sends_at_once(state: u16) -> bool {
    state & (NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT) != 0
}

/// Whether the kernel's neighbour `ip` on `ifindex` takes packets at once. Any
/// doubt (no entry, a kernel without single-entry `RTM_GETNEIGH`, an error) is
/// `false`: the answers are then routed per packet, as without a next hop.
pub fn resolved(ip: IpAddr, ifindex: u32) -> bool {
    matches!(state(ip, ifindex), Ok(Some(s)) if sends_at_once(s))
}

/// The `NUD_*` state of neighbour `ip` on `ifindex`; `Ok(None)` when it has no
/// entry.
pub fn state(ip: IpAddr, ifindex: u32) -> io::Result<Option<u16>> {
    let mut msg = NeighbourMessage::default();
    let (family, dst) = match ip {
        IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
    };
    msg.header.family = family;
    msg.header.ifindex = ifindex;
    msg.attributes.push(NeighbourAttribute::Destination(dst));
    match super::rtnl_query::ask(RouteNetlinkMessage::GetNeighbour(msg), &[libc::ENOENT])? {
        Some(RouteNetlinkMessage::NewNeighbour(n)) => Ok(Some(u16::from(n.header.state))),
        None => Ok(None),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected answer to RTM_GETNEIGH",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_neighbour_that_sends_at_once_may_be_named() {
        for s in [
            NUD_REACHABLE,
            NUD_STALE,
            NUD_DELAY,
            NUD_PROBE,
            NUD_NOARP,
            NUD_PERMANENT,
            NUD_NOARP | NUD_PERMANENT,
        ] {
            assert!(sends_at_once(s), "{s:#x}");
        }
        // NONE, INCOMPLETE, FAILED: the packet would wait in the neighbour's queue.
        for s in [0x00, 0x01, 0x20] {
            assert!(!sends_at_once(s), "{s:#x}");
        }
    }

    #[test]
    fn the_kernel_tells_a_known_neighbour_from_an_unknown_one() {
        crate::testing::in_netns("neighbour_state", |_, _| async {
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(st.success(), "ip {args:?}");
            };
            ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
            ip(&["addr", "add", "192.0.2.2/24", "dev", "d0"]);
            ip(&["addr", "add", "2001:db8::2/64", "dev", "d0", "nodad"]);
            ip(&["link", "set", "d1", "up"]);
            ip(&["link", "set", "d0", "up"]);
            let mac = "02:00:00:00:00:01";
            for (a, nud) in [
                ("192.0.2.1", "permanent"),
                ("192.0.2.3", "stale"),
                ("2001:db8::1", "reachable"),
            ] {
                ip(&["neigh", "add", a, "lladdr", mac, "dev", "d0", "nud", nud]);
            }
            let name = std::ffi::CString::new("d0").unwrap();
            // SAFETY: a NUL-terminated name; the lookup is in this thread's namespace.
            let d0 = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(d0, 0);
            let at = |s: &str| s.parse::<IpAddr>().unwrap();
            assert_eq!(state(at("192.0.2.1"), d0).unwrap(), Some(NUD_PERMANENT));
            assert_eq!(state(at("192.0.2.3"), d0).unwrap(), Some(NUD_STALE));
            for a in ["192.0.2.1", "192.0.2.3", "2001:db8::1"] {
                assert!(resolved(at(a), d0), "{a}");
            }
            // No entry yet: the first answer must not wait in a neighbour queue.
            assert_eq!(state(at("192.0.2.9"), d0).unwrap(), None);
            assert!(!resolved(at("192.0.2.9"), d0));
            assert!(!resolved(at("2001:db8::9"), d0));
            // The same address known on another interface is not known on this one.
            ip(&["link", "add", "e0", "type", "veth", "peer", "name", "e1"]);
            ip(&["link", "set", "e0", "up"]);
            let name = std::ffi::CString::new("e0").unwrap();
            // SAFETY: as above.
            let e0 = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(!resolved(at("192.0.2.1"), e0));
        });
    }
}
