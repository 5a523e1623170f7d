//! Turns `-l` specs into the kernel's listen rules.
use std::net::IpAddr;

use mmproxy_common::{
    ListenRule, FAMILY_V4, FAMILY_V6, MAX_LISTEN_RULES, PROTO_TCP, PROTO_UDP, RULE_ANY_ADDR,
    RULE_STEER,
};

use super::EbpfError;
use crate::cli::{ListenSpec, Protocol};

/// One rule per `-l` entry. Ranges are steered to `LISTENERS[index]` (the daemon
/// listens on the range's first port and registers that socket there); single ports
/// are found by the kernel's normal lookup, which keeps SO_REUSEPORT balancing.
pub fn listen_rules(
    specs: &[ListenSpec],
    protocol: Protocol,
) -> Result<Vec<ListenRule>, EbpfError> {
    if specs.len() > MAX_LISTEN_RULES as usize {
        return Err(EbpfError::TooManyRules {
            given: specs.len(),
            max: MAX_LISTEN_RULES as usize,
        });
    }
    Ok(specs
        .iter()
        .enumerate()
        .map(|(i, spec)| rule(spec, protocol, i as u32))
        .collect())
}

fn rule(spec: &ListenSpec, protocol: Protocol, sock_index: u32) -> ListenRule {
    let (family, addr) = match spec.addr {
        IpAddr::V4(a) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, addr)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    };
    let mut flags = 0;
    if spec.addr.is_unspecified() {
        flags |= RULE_ANY_ADDR;
    }
    if spec.is_range() {
        flags |= RULE_STEER;
    }
    ListenRule {
        addr,
        sock_index,
        port_lo: *spec.ports.start(),
        port_hi: *spec.ports.end(),
        family,
        protocol: match protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        flags,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ListenSpec {
        s.parse().unwrap()
    }

    #[test]
    fn wildcard_single_port() {
        let r = listen_rules(&[spec("0.0.0.0:8443")], Protocol::Tcp).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].port_lo, r[0].port_hi), (8443, 8443));
        assert_eq!(r[0].family, FAMILY_V4);
        assert_eq!(r[0].protocol, PROTO_TCP);
        assert_eq!(r[0].flags, RULE_ANY_ADDR);
    }

    #[test]
    fn specific_v6_range_is_steered() {
        let r = listen_rules(
            &[spec("0.0.0.0:1"), spec("[2001:db8::1]:20000-20999")],
            Protocol::Udp,
        )
        .unwrap();
        assert_eq!(r[1].family, FAMILY_V6);
        assert_eq!(r[1].protocol, PROTO_UDP);
        assert_eq!(r[1].flags, RULE_STEER);
        assert_eq!(r[1].sock_index, 1);
        assert_eq!(
            r[1].addr,
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!((r[1].port_lo, r[1].port_hi), (20000, 20999));
    }

    #[test]
    fn v4_address_in_network_order() {
        let r = listen_rules(&[spec("192.0.2.7:80")], Protocol::Tcp).unwrap();
        assert_eq!(&r[0].addr[..4], &[192, 0, 2, 7]);
        assert_eq!(&r[0].addr[4..], &[0u8; 12]);
    }
}
