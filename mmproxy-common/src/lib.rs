//! Types shared by mmproxy's daemon and its BPF programs.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads it out of BPF
//! maps with the exact layout the daemon wrote, so field order and padding are part
//! of the contract and are pinned by the layout tests at the bottom.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Names of the maps in the BPF object, as the daemon looks them up.
pub mod map_names {
    pub const ALLOWED_V4: &str = "ALLOWED_V4";
    pub const ALLOWED_V6: &str = "ALLOWED_V6";
    pub const LISTEN_RULES: &str = "LISTEN_RULES";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const FLOWS: &str = "FLOWS";
    pub const UDP_RELAY: &str = "UDP_RELAY";
    pub const UDP_RELEASE: &str = "UDP_RELEASE";
}

/// Names of the programs in the BPF object.
pub mod program_names {
    pub const SK_LOOKUP: &str = "mmproxy_sk_lookup";
    /// tc egress on the default-route interface(s): answers generated on this host.
    pub const TC_EGRESS: &str = "mmproxy_tc_egress";
    /// tc ingress on interfaces towards services elsewhere (containers).
    pub const TC_INGRESS: &str = "mmproxy_tc_ingress";
    /// tc ingress on every interface balancer datagrams may arrive on
    /// (`--udp-datapath kernel`): datagrams of live flows relayed to the service.
    pub const TC_UDP_IN: &str = "mmproxy_tc_udp_in";
    /// tc egress on `lo` (`--udp-datapath kernel`): answers of services on this
    /// host that the loopback routing rule sends through `lo`, relayed to the proxy.
    pub const TC_LO_EGRESS: &str = "mmproxy_tc_lo_egress";
}

/// Capacity of each allowed-subnet trie. A BGP full table of a large proxy fleet is
/// far below this; an allowed-subnets file longer than it is refused at start-up.
pub const MAX_ALLOWED_SUBNETS: u32 = 16_384;

/// How many listen rules (`-l` entries × protocol) the kernel side can match.
pub const MAX_LISTEN_RULES: u32 = 64;

/// Slots in the listener SOCKMAP: one per listen rule and family.
pub const MAX_LISTENERS: u32 = MAX_LISTEN_RULES;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ListenRule::flags`: the rule's address is a wildcard (0.0.0.0 / ::).
pub const RULE_ANY_ADDR: u8 = 1;
/// `ListenRule::flags`: steer matching lookups to `LISTENERS[sock_index]`.
pub const RULE_STEER: u8 = 2;

/// One (protocol, address, port range) that mmproxy serves. The sk_lookup program
/// applies the allowed-subnet policy only to lookups that match a rule, so the rest
/// of the namespace's traffic is never touched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenRule {
    /// Local address in network byte order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// Slot in `LISTENERS` holding the socket that serves this rule.
    pub sock_index: u32,
    /// Inclusive port range, host byte order (as `bpf_sk_lookup.local_port`).
    pub port_lo: u16,
    pub port_hi: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    /// `RULE_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Global settings, slot 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Number of valid entries in `LISTEN_RULES`.
    pub rule_count: u32,
    /// Non-zero when an allowed-subnets list is in force; zero allows every source,
    /// as go-mmproxy does without `--allowed-subnets`.
    pub filter_enabled: u32,
    /// Mark the tc programs put on answers of live flows (`--return-mark`); a
    /// `fwmark` rule routes them to the local table.
    pub return_mark: u32,
    /// Index of `lo` in the daemon's namespace: where tc egress redirects answers
    /// generated on this host.
    pub lo_ifindex: u32,
    /// Non-zero with `--udp-datapath kernel`: the tc programs relay the datagrams
    /// and answers of flows in `UDP_RELAY`. Zero spares every packet the lookup.
    pub udp_relay: u32,
    /// `--max-header-size`: longer PROXY headers are left to user space, which
    /// refuses them.
    pub max_header_len: u32,
    /// Bumped by user space whenever the host's routes or links change: an answer's
    /// next hop (`RELAY_NEXTHOP`) chosen under another epoch is not used any more,
    /// and the kernel routes such answers one by one.
    pub route_epoch: u32,
}

/// Default capacity of `FLOWS`; the daemon sizes it from `--max-connections` and
/// `--max-flows` at load time.
pub const MAX_FLOWS: u32 = 131_072;

/// One live mmproxy flow, as its *answers* look: the service (`src`) replying to the
/// client address mmproxy's upstream socket is bound to (`dst`). The tc programs
/// build this key from each packet and act only on packets whose key is in `FLOWS`;
/// sk_lookup uses it to leave answers to mmproxy's own UDP sockets alone.
///
/// Addresses and ports are in network byte order (as in the packet); IPv4 uses the
/// first four bytes of each address. For UDP `src_addr` is all zeros (see
/// [`FlowKey::udp_answer`]). Build keys with the constructors, which both the daemon
/// and the BPF programs use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of a TCP flow's answers: from `service` (address and port the upstream
    /// socket sends to) to `client` (the address and port it is bound to). Addresses
    /// and ports as in [`FlowKey`]'s fields.
    #[inline(always)]
    pub const fn tcp_answer(
        family: u8,
        service: [u8; 16],
        service_port: u16,
        client: [u8; 16],
        client_port: u16,
    ) -> Self {
        Self::answer(
            PROTO_TCP,
            family,
            service,
            service_port,
            client,
            client_port,
        )
    }

    /// The key of a UDP flow's answers. It leaves out the service's address: a
    /// service bound to 0.0.0.0 answers from whatever address routing picks, not
    /// necessarily the one mmproxy sent to.
    #[inline(always)]
    pub const fn udp_answer(
        family: u8,
        service_port: u16,
        client: [u8; 16],
        client_port: u16,
    ) -> Self {
        Self::answer(
            PROTO_UDP,
            family,
            [0; 16],
            service_port,
            client,
            client_port,
        )
    }

    #[inline(always)]
    const fn answer(
        protocol: u8,
        family: u8,
        src_addr: [u8; 16],
        src_port: u16,
        dst_addr: [u8; 16],
        dst_port: u16,
    ) -> Self {
        FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            family,
            protocol,
            _pad: [0; 2],
        }
    }

    /// The key of the flow whose upstream socket sends a packet from `client` to
    /// `service`: the mirror of [`FlowKey::of_packet`]. sk_lookup uses it to
    /// recognise mmproxy's own upstream connections and datagrams, which a wildcard
    /// listen rule would otherwise steer back to mmproxy. Addresses and ports as in
    /// [`FlowKey`]'s fields.
    #[inline(always)]
    pub const fn of_upstream_packet(
        family: u8,
        protocol: u8,
        client: [u8; 16],
        client_port: u16,
        service: [u8; 16],
        service_port: u16,
    ) -> Option<Self> {
        Self::of_packet(family, protocol, service, service_port, client, client_port)
    }

    /// The key a packet from `src` to `dst` would have if it answered a live flow:
    /// [`FlowKey::tcp_answer`] or [`FlowKey::udp_answer`] by `protocol`, `None` for
    /// other protocols.
    #[inline(always)]
    pub const fn of_packet(
        family: u8,
        protocol: u8,
        src: [u8; 16],
        src_port: u16,
        dst: [u8; 16],
        dst_port: u16,
    ) -> Option<Self> {
        match protocol {
            PROTO_TCP => Some(Self::tcp_answer(family, src, src_port, dst, dst_port)),
            PROTO_UDP => Some(Self::udp_answer(family, src_port, dst, dst_port)),
            _ => None,
        }
    }
}

/// `RelayKey::direction`: a datagram from a proxy, on its way to the service.
pub const RELAY_IN: u8 = 1;
/// `RelayKey::direction`: a service's answer, on its way back to the proxy.
pub const RELAY_OUT: u8 = 2;

/// `RelayAction::flags`: deliver by redirecting into `lo`'s ingress (the target is
/// one of this host's addresses, loopback included); the frame's destination MAC
/// is zeroed so `lo` accepts it as addressed to itself.
pub const RELAY_TO_LO: u8 = 1;

/// `RelayAction::flags` (inbound half): the flow's datagrams still go to user
/// space, counted in `held_punts`, because earlier ones may be queued there; the
/// kernel relaying later ones would overtake them. Set when user space adds the
/// half; cleared by the tc program once `UDP_RELEASE` says user space has taken
/// every datagram counted so far (see [`RelayRelease`]).
pub const RELAY_HELD: u8 = 2;

/// `RelayAction::flags`: `nh_addr` is the next hop towards `dst` on `ifindex`
/// (user space asked the routing table once), so `bpf_redirect_neigh` resolves
/// that neighbour directly instead of looking the route up for every packet.
pub const RELAY_NEXTHOP: u8 = 4;

/// One half of a UDP flow relayed by the kernel (`--udp-datapath kernel`), as its
/// packets look when they reach a tc program. Both halves of a flow live in the one
/// `UDP_RELAY` LRU hash; user space adds and removes them together.
///
/// - `RELAY_IN`: the proxy's datagram as it arrives: from `src` (the proxy) to
///   `dst` (the local address and port it sent to), carrying a PROXY v2 header from
///   `client` to `orig_dst`.
/// - `RELAY_OUT`: the service's answer: from port `src_port` (the address left out,
///   as in [`FlowKey::udp_answer`]) to `dst` (the client's address and port the
///   flow's upstream socket is bound to); `client` and `orig_dst` are zero.
///
/// Addresses and ports in network byte order; IPv4 uses the first four bytes of
/// each address. Build keys with the constructors.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct RelayKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub client_addr: [u8; 16],
    pub orig_dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub client_port: u16,
    pub orig_dst_port: u16,
    /// `RELAY_IN` or `RELAY_OUT`.
    pub direction: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}

impl RelayKey {
    /// The key of a proxy's datagrams for one flow (see [`RelayKey`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub const fn inbound(
        family: u8,
        proxy: [u8; 16],
        proxy_port: u16,
        local: [u8; 16],
        local_port: u16,
        client: [u8; 16],
        client_port: u16,
        orig_dst: [u8; 16],
        orig_dst_port: u16,
    ) -> Self {
        RelayKey {
            src_addr: proxy,
            dst_addr: local,
            client_addr: client,
            orig_dst_addr: orig_dst,
            src_port: proxy_port,
            dst_port: local_port,
            client_port,
            orig_dst_port,
            direction: RELAY_IN,
            family,
            _pad: [0; 2],
        }
    }

    /// The key of a flow's answers (see [`RelayKey`]): the same tuple as
    /// [`FlowKey::udp_answer`].
    #[inline(always)]
    pub const fn outbound(
        family: u8,
        service_port: u16,
        client: [u8; 16],
        client_port: u16,
    ) -> Self {
        RelayKey {
            src_addr: [0; 16],
            dst_addr: client,
            client_addr: [0; 16],
            orig_dst_addr: [0; 16],
            src_port: service_port,
            dst_port: client_port,
            client_port: 0,
            orig_dst_port: 0,
            direction: RELAY_OUT,
            family,
            _pad: [0; 2],
        }
    }
}

/// What a tc program does with a packet whose [`RelayKey`] is in `UDP_RELAY`.
///
/// - `RELAY_IN`: strip the PROXY header and send the payload from `src` (the
///   address and port the flow's upstream socket is bound to) to `dst` (the
///   target), as that socket would have.
/// - `RELAY_OUT`: send the answer from `src` (the local address and port the proxy
///   sent to) to `dst` (the proxy), as the listening socket would have.
///
/// Addresses and ports as in [`RelayKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RelayAction {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when this half last relayed a packet,
    /// 0 if never: written by the kernel, read by the idle sweep.
    pub last_ns: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// With `RELAY_TO_LO`, `lo`'s index; otherwise the interface the packet leaves
    /// through (`bpf_redirect_neigh`): for `RELAY_IN` the one the target is routed
    /// over, for `RELAY_OUT` the one the proxy's datagram arrived on.
    pub ifindex: u32,
    /// The packet's mark (`--mark` for `RELAY_IN`); 0 leaves it alone.
    pub mark: u32,
    /// `RELAY_*` bits.
    pub flags: u8,
    /// `FAMILY_V4` or `FAMILY_V6`, the same as the key's.
    pub family: u8,
    pub _pad: [u8; 2],
    /// Which registration this is: user space numbers every add, so a release
    /// written for an earlier registration of the same key never applies.
    pub generation: u32,
    /// With `RELAY_NEXTHOP`: the `Config::route_epoch` the next hop was chosen
    /// under; under any other, the next hop is ignored.
    pub route_epoch: u32,
    /// Datagrams left to user space while `RELAY_HELD` (inbound half): counted by
    /// the kernel (atomically: 64 bits is the width BPF has atomics for), read by
    /// user space.
    pub held_punts: u64,
    /// With `RELAY_NEXTHOP`: the gateway or on-link neighbour to send to, in the
    /// action's family, valid while `route_epoch` is the configuration's.
    pub nh_addr: [u8; 16],
}

/// The value of `UDP_RELEASE` (keyed by the inbound half's [`RelayKey`]): user
/// space has taken from its listening socket, and sent on, every datagram of that
/// registration the kernel had counted in `held_punts` when it was `taken`. When
/// the kernel's count still equals it, nothing of the flow is queued in user
/// space and the kernel may relay from then on.
///
/// It lives in its own map because the kernel writes the action's `held_punts`
/// concurrently: user space writing the action would overwrite a count it has not
/// seen.
///
/// `taken` = [`RELEASE_ANYWAY`] ends the hold whatever the count: for a flow whose
/// datagrams never pause long enough for an exact release.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RelayRelease {
    pub generation: u32,
    pub _pad: u32,
    pub taken: u64,
}

/// `RelayRelease::taken` that ends a hold whatever the kernel has counted.
pub const RELEASE_ANYWAY: u64 = u64::MAX;

/// Default capacity of `UDP_RELAY` (two entries per flow); the daemon sizes it from
/// `--max-flows` at load time.
pub const MAX_RELAY_ENTRIES: u32 = 2 * MAX_FLOWS;

/// Indices into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// sk_lookup refused an IPv4 source outside the allowed subnets.
    RefusedV4 = 0,
    /// sk_lookup refused an IPv6 source outside the allowed subnets.
    RefusedV6 = 1,
    /// sk_lookup matched a listen rule and let the lookup through (or steered it).
    AllowedV4 = 2,
    AllowedV6 = 3,
    /// sk_lookup assigned the lookup to a listener from `LISTENERS`.
    Steered = 4,
    /// Steering failed (empty slot, family mismatch): the lookup fell through.
    SteerFailed = 5,
    /// tc marked an answer of a live flow arriving from elsewhere (ingress).
    ReturnMarked = 6,
    /// tc marked an answer generated on this host and redirected it into `lo`.
    ReturnRedirected = 7,
    /// sk_lookup let one of mmproxy's own upstream connections (or datagrams) pass
    /// to the service instead of steering it back to mmproxy: its tuple is a live
    /// flow's.
    OwnUpstream = 8,
    /// tc relayed a proxy's datagram of a live flow to the service (`--udp-datapath
    /// kernel`).
    UdpRelayedIn = 9,
    /// tc relayed a service's answer of a live flow to the proxy.
    UdpRelayedOut = 10,
    /// A datagram to a UDP listen rule with a valid PROXY header and no live kernel
    /// flow (a flow's first datagram): left to user space.
    UdpPuntedNoFlow = 11,
    /// A datagram whose PROXY header the kernel does not relay (LOCAL, TLVs it does
    /// not skip, over `--max-header-size`, malformed, another family than the
    /// packet's): left to user space, which decides.
    UdpPuntedHeader = 12,
    /// A packet the kernel does not rewrite: IP options, a fragment, IPv6
    /// extension headers, a TTL or hop limit about to run out.
    UdpPuntedPacket = 13,
    /// A packet that would not fit the outgoing interface's MTU after rewriting,
    /// or whose outgoing interface no longer exists.
    UdpPuntedMtu = 14,
    /// A datagram from a proxy outside the allowed subnets: left to the normal
    /// path, where sk_lookup refuses it.
    UdpPuntedNotAllowed = 15,
    /// A rewrite or redirect helper failed; the packet was dropped if already
    /// changed, left alone otherwise.
    UdpRelayFailed = 16,
    /// A datagram of a flow the kernel holds (`RELAY_HELD`): earlier ones may
    /// still be queued for user space, which takes this one too, in order.
    UdpPuntedHeld = 17,
}

impl Counter {
    pub const ALL: [Counter; 18] = [
        Counter::RefusedV4,
        Counter::RefusedV6,
        Counter::AllowedV4,
        Counter::AllowedV6,
        Counter::Steered,
        Counter::SteerFailed,
        Counter::ReturnMarked,
        Counter::ReturnRedirected,
        Counter::OwnUpstream,
        Counter::UdpRelayedIn,
        Counter::UdpRelayedOut,
        Counter::UdpPuntedNoFlow,
        Counter::UdpPuntedHeader,
        Counter::UdpPuntedPacket,
        Counter::UdpPuntedMtu,
        Counter::UdpPuntedNotAllowed,
        Counter::UdpRelayFailed,
        Counter::UdpPuntedHeld,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::RefusedV4 => "kernel_refused_v4",
            Counter::RefusedV6 => "kernel_refused_v6",
            Counter::AllowedV4 => "kernel_allowed_v4",
            Counter::AllowedV6 => "kernel_allowed_v6",
            Counter::Steered => "kernel_steered",
            Counter::SteerFailed => "kernel_steer_failed",
            Counter::ReturnMarked => "kernel_return_marked",
            Counter::ReturnRedirected => "kernel_return_redirected",
            Counter::OwnUpstream => "kernel_own_upstream",
            Counter::UdpRelayedIn => "kernel_udp_relayed_in",
            Counter::UdpRelayedOut => "kernel_udp_relayed_out",
            Counter::UdpPuntedNoFlow => "kernel_udp_punted_no_flow",
            Counter::UdpPuntedHeader => "kernel_udp_punted_header",
            Counter::UdpPuntedPacket => "kernel_udp_punted_packet",
            Counter::UdpPuntedMtu => "kernel_udp_punted_mtu",
            Counter::UdpPuntedNotAllowed => "kernel_udp_punted_not_allowed",
            Counter::UdpRelayFailed => "kernel_udp_relay_failed",
            Counter::UdpPuntedHeld => "kernel_udp_punted_held",
        }
    }
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are `#[repr(C)]`, `Pod` (no padding holes, every bit pattern valid).
    unsafe impl aya::Pod for super::ListenRule {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::RelayKey {}
    unsafe impl aya::Pod for super::RelayAction {}
    unsafe impl aya::Pod for super::RelayRelease {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn listen_rule_layout() {
        assert_eq!(size_of::<ListenRule>(), 28);
        assert_eq!(align_of::<ListenRule>(), 4);
        assert_eq!(offset_of!(ListenRule, addr), 0);
        assert_eq!(offset_of!(ListenRule, sock_index), 16);
        assert_eq!(offset_of!(ListenRule, port_lo), 20);
        assert_eq!(offset_of!(ListenRule, port_hi), 22);
        assert_eq!(offset_of!(ListenRule, family), 24);
        assert_eq!(offset_of!(ListenRule, protocol), 25);
        assert_eq!(offset_of!(ListenRule, flags), 26);
    }

    #[test]
    fn config_layout() {
        assert_eq!(size_of::<Config>(), 28);
        assert_eq!(offset_of!(Config, rule_count), 0);
        assert_eq!(offset_of!(Config, filter_enabled), 4);
        assert_eq!(offset_of!(Config, return_mark), 8);
        assert_eq!(offset_of!(Config, lo_ifindex), 12);
        assert_eq!(offset_of!(Config, udp_relay), 16);
        assert_eq!(offset_of!(Config, max_header_len), 20);
        assert_eq!(offset_of!(Config, route_epoch), 24);
    }

    #[test]
    fn flow_key_layout() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(align_of::<FlowKey>(), 2);
        assert_eq!(offset_of!(FlowKey, src_addr), 0);
        assert_eq!(offset_of!(FlowKey, dst_addr), 16);
        assert_eq!(offset_of!(FlowKey, src_port), 32);
        assert_eq!(offset_of!(FlowKey, dst_port), 34);
        assert_eq!(offset_of!(FlowKey, family), 36);
        assert_eq!(offset_of!(FlowKey, protocol), 37);
        assert_eq!(offset_of!(FlowKey, _pad), 38);
    }

    #[test]
    fn relay_key_layout() {
        assert_eq!(size_of::<RelayKey>(), 76);
        assert_eq!(align_of::<RelayKey>(), 2);
        assert_eq!(offset_of!(RelayKey, src_addr), 0);
        assert_eq!(offset_of!(RelayKey, dst_addr), 16);
        assert_eq!(offset_of!(RelayKey, client_addr), 32);
        assert_eq!(offset_of!(RelayKey, orig_dst_addr), 48);
        assert_eq!(offset_of!(RelayKey, src_port), 64);
        assert_eq!(offset_of!(RelayKey, dst_port), 66);
        assert_eq!(offset_of!(RelayKey, client_port), 68);
        assert_eq!(offset_of!(RelayKey, orig_dst_port), 70);
        assert_eq!(offset_of!(RelayKey, direction), 72);
        assert_eq!(offset_of!(RelayKey, family), 73);
        assert_eq!(offset_of!(RelayKey, _pad), 74);
    }

    #[test]
    fn relay_action_layout() {
        assert_eq!(size_of::<RelayAction>(), 88);
        assert_eq!(align_of::<RelayAction>(), 8);
        assert_eq!(offset_of!(RelayAction, last_ns), 0);
        assert_eq!(offset_of!(RelayAction, src_addr), 8);
        assert_eq!(offset_of!(RelayAction, dst_addr), 24);
        assert_eq!(offset_of!(RelayAction, src_port), 40);
        assert_eq!(offset_of!(RelayAction, dst_port), 42);
        assert_eq!(offset_of!(RelayAction, ifindex), 44);
        assert_eq!(offset_of!(RelayAction, mark), 48);
        assert_eq!(offset_of!(RelayAction, flags), 52);
        assert_eq!(offset_of!(RelayAction, family), 53);
        assert_eq!(offset_of!(RelayAction, _pad), 54);
        assert_eq!(offset_of!(RelayAction, generation), 56);
        assert_eq!(offset_of!(RelayAction, route_epoch), 60);
        assert_eq!(offset_of!(RelayAction, held_punts), 64);
        assert_eq!(offset_of!(RelayAction, nh_addr), 72);
    }

    #[test]
    fn relay_release_layout() {
        assert_eq!(size_of::<RelayRelease>(), 16);
        assert_eq!(align_of::<RelayRelease>(), 8);
        assert_eq!(offset_of!(RelayRelease, generation), 0);
        assert_eq!(offset_of!(RelayRelease, _pad), 4);
        assert_eq!(offset_of!(RelayRelease, taken), 8);
    }

    #[test]
    fn the_outbound_relay_key_is_the_answer_tuple_and_differs_from_inbound() {
        let client = [198, 51, 100, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let (sp, cp) = (9000u16.to_be(), 41000u16.to_be());
        let out = RelayKey::outbound(FAMILY_V4, sp, client, cp);
        let answer = FlowKey::udp_answer(FAMILY_V4, sp, client, cp);
        assert_eq!(
            (out.src_addr, out.src_port, out.dst_addr, out.dst_port),
            (
                answer.src_addr,
                answer.src_port,
                answer.dst_addr,
                answer.dst_port
            )
        );
        let proxy = [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let local = [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let inbound =
            RelayKey::inbound(FAMILY_V4, proxy, 5000, local, 8443, client, cp, local, 8443);
        assert_eq!(inbound.direction, RELAY_IN);
        assert_eq!(out.direction, RELAY_OUT);
        assert_ne!(inbound, out);
    }

    #[test]
    fn udp_answers_leave_out_the_service_address() {
        let service = [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let client = [198, 51, 100, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let udp = FlowKey::of_packet(FAMILY_V4, PROTO_UDP, service, 53, client, 4000);
        assert_eq!(udp, Some(FlowKey::udp_answer(FAMILY_V4, 53, client, 4000)));
        assert_eq!(udp.map(|k| k.src_addr), Some([0; 16]));
        let tcp = FlowKey::of_packet(FAMILY_V4, PROTO_TCP, service, 443, client, 4000);
        assert_eq!(
            tcp,
            Some(FlowKey::tcp_answer(FAMILY_V4, service, 443, client, 4000))
        );
        assert_eq!(tcp.map(|k| k.src_addr), Some(service));
        assert_eq!(
            FlowKey::of_packet(FAMILY_V4, 1, service, 0, client, 0),
            None
        );
    }

    #[test]
    fn an_upstream_packet_has_its_flows_key_tcp_and_udp() {
        let service = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let client = [198, 51, 100, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let (sp, cp) = (20123u16.to_be(), 41000u16.to_be());
        assert_eq!(
            FlowKey::of_upstream_packet(FAMILY_V4, PROTO_TCP, client, cp, service, sp),
            Some(FlowKey::tcp_answer(FAMILY_V4, service, sp, client, cp))
        );
        assert_eq!(
            FlowKey::of_upstream_packet(FAMILY_V4, PROTO_UDP, client, cp, service, sp),
            Some(FlowKey::udp_answer(FAMILY_V4, sp, client, cp))
        );
        // The service's own answer (the other direction) is not the same key.
        assert_ne!(
            FlowKey::of_upstream_packet(FAMILY_V4, PROTO_TCP, service, sp, client, cp),
            Some(FlowKey::tcp_answer(FAMILY_V4, service, sp, client, cp))
        );
        assert_eq!(
            FlowKey::of_upstream_packet(FAMILY_V4, 1, client, cp, service, sp),
            None
        );
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
