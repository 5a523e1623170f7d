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
}

/// Names of the programs in the BPF object.
pub mod program_names {
    pub const SK_LOOKUP: &str = "mmproxy_sk_lookup";
    /// tc egress on the default-route interface(s): answers generated on this host.
    pub const TC_EGRESS: &str = "mmproxy_tc_egress";
    /// tc ingress on interfaces towards services elsewhere (containers).
    pub const TC_INGRESS: &str = "mmproxy_tc_ingress";
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
}

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::RefusedV4,
        Counter::RefusedV6,
        Counter::AllowedV4,
        Counter::AllowedV6,
        Counter::Steered,
        Counter::SteerFailed,
        Counter::ReturnMarked,
        Counter::ReturnRedirected,
        Counter::OwnUpstream,
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
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(offset_of!(Config, rule_count), 0);
        assert_eq!(offset_of!(Config, filter_enabled), 4);
        assert_eq!(offset_of!(Config, return_mark), 8);
        assert_eq!(offset_of!(Config, lo_ifindex), 12);
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
