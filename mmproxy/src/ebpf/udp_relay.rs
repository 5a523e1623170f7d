//! The UDP flows the kernel relays (`--udp-datapath kernel`): what the UDP proxy
//! hands the kernel side once a flow's first datagram has been through user space.
//!
//! From then on the tc programs relay the flow's datagrams (header checked and
//! stripped, addresses rewritten) and its answers, both halves described by one
//! [`RelayFlow`] and kept in the `UDP_RELAY` map. User space still owns the flow:
//! it removes both halves when the flow expires or is evicted, and reads the
//! kernel's activity through [`UdpRelay::last_active`] for its idle sweep.
//!
//! A flow's inbound half starts *held*: its datagrams that arrived before the
//! flow was added may still wait in the listening socket, and the kernel relaying
//! later ones at once would overtake them. The kernel leaves the flow's datagrams
//! to user space, counting them, until user space releases the count it has
//! taken ([`UdpRelay::held`], [`UdpRelay::release`]; the protocol is in
//! `crate::udp::release`).
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aya::maps::MapError;
use mmproxy_common::{RelayKey, FAMILY_V4, FAMILY_V6};

use crate::addr::canonical;

/// One UDP flow, as the kernel relays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayFlow {
    /// Where the flow's datagrams come from: the proxy's address and port.
    pub proxy: SocketAddr,
    /// The local address and port the proxy sent to (answers leave from it).
    pub local: SocketAddr,
    /// The interface the proxy's datagram arrived on (answers leave through it).
    pub ifindex: u32,
    /// The PROXY header's source: the client.
    pub client: SocketAddr,
    /// The PROXY header's destination.
    pub orig_dst: SocketAddr,
    /// The address and port the flow's upstream socket is bound to (the client's
    /// address, with the port the kernel gave if the header's was 0).
    pub bound: SocketAddr,
    /// Where the flow's datagrams go: the `-4`/`-6` target (or the header's
    /// destination with `-dynamic-destination`).
    pub target: SocketAddr,
    /// `--mark` for relayed datagrams; 0 leaves the mark alone.
    pub mark: u32,
}

impl RelayFlow {
    /// Whether the kernel can relay this flow at all: one family throughout (the
    /// programs rewrite addresses, never the IP version). IPv4-mapped addresses
    /// count as IPv4.
    pub fn family(&self) -> Option<u8> {
        let all = [
            self.proxy,
            self.local,
            self.client,
            self.orig_dst,
            self.bound,
            self.target,
        ];
        let v4 = all.iter().filter(|a| canonical(**a).is_ipv4()).count();
        match v4 {
            6 => Some(FAMILY_V4),
            0 => Some(FAMILY_V6),
            _ => None,
        }
    }

    /// The key of the proxy's datagrams; `None` when [`RelayFlow::family`] is.
    pub fn inbound_key(&self) -> Option<RelayKey> {
        let family = self.family()?;
        let (proxy, proxy_port) = key_addr(self.proxy);
        let (local, local_port) = key_addr(self.local);
        let (client, client_port) = key_addr(self.client);
        let (orig_dst, orig_dst_port) = key_addr(self.orig_dst);
        Some(RelayKey::inbound(
            family,
            proxy,
            proxy_port,
            local,
            local_port,
            client,
            client_port,
            orig_dst,
            orig_dst_port,
        ))
    }

    /// The key of the service's answers; `None` when [`RelayFlow::family`] is.
    pub fn outbound_key(&self) -> Option<RelayKey> {
        let family = self.family()?;
        let (_, service_port) = key_addr(self.target);
        let (bound, bound_port) = key_addr(self.bound);
        Some(RelayKey::outbound(family, service_port, bound, bound_port))
    }
}

/// An address and port as the kernel's keys hold them: network byte order, IPv4 in
/// the first four bytes.
pub fn key_addr(a: SocketAddr) -> ([u8; 16], u16) {
    let a = canonical(a);
    let ip = match a {
        SocketAddr::V4(v4) => {
            let [b0, b1, b2, b3] = v4.ip().octets();
            [b0, b1, b2, b3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }
        SocketAddr::V6(v6) => v6.ip().octets(),
    };
    (ip, a.port().to_be())
}

/// Why a flow could not be handed to the kernel. The flow goes on in user space.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the flow changes address family between proxy, client and service")]
    MixedFamily,
    #[error("no route to the service {0}")]
    NoRoute(SocketAddr),
    #[error("cannot look up the route to the service {target}")]
    Route {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot add the flow to the kernel's relay table")]
    Map(#[source] MapError),
}

/// What the kernel had counted of a held inbound half when user space looked:
/// which registration, and how many of its datagrams it had left to user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldPunts {
    pub generation: u32,
    pub punts: u64,
}

/// Where the UDP proxy hands flows to the kernel. The daemon gives one to the UDP
/// listeners with `--udp-datapath kernel`.
pub trait UdpRelay: Send + Sync + fmt::Debug {
    /// Adds (or replaces) both halves of `flow`, the inbound one held.
    fn add(&self, flow: &RelayFlow) -> Result<(), RelayError>;
    /// The inbound half's count while it is held; `None` once the kernel has
    /// released it (or has no such half).
    fn held(&self, flow: &RelayFlow) -> Option<HeldPunts>;
    /// Tells the kernel that user space has taken and sent on every datagram
    /// counted in `held`: if it has counted no more since, it relays the next.
    fn release(&self, flow: &RelayFlow, held: HeldPunts);
    /// Removes both halves of `flow`.
    fn remove(&self, flow: &RelayFlow);
    /// CLOCK_MONOTONIC time of the last packet the kernel relayed for `flow` in
    /// either direction; `None` if it has relayed none (or the flow is unknown).
    fn last_active(&self, flow: &RelayFlow) -> Option<Duration>;
    /// Whether the kernel still has both halves of `flow` (its LRU map may drop
    /// entries before it is full), added under the routes in force now (a changed
    /// network may have moved the target's interface).
    fn current(&self, flow: &RelayFlow) -> bool;
}

/// A flow handed to the kernel, taken back when dropped: keep it as long as the
/// flow lives.
#[derive(Debug)]
pub struct RelayRegistration {
    relay: Arc<dyn UdpRelay>,
    flow: RelayFlow,
}

impl RelayRegistration {
    pub fn new(relay: &Arc<dyn UdpRelay>, flow: RelayFlow) -> Result<Self, RelayError> {
        relay.add(&flow)?;
        Ok(Self {
            relay: relay.clone(),
            flow,
        })
    }

    pub fn flow(&self) -> &RelayFlow {
        &self.flow
    }

    /// See [`UdpRelay::held`].
    pub fn held(&self) -> Option<HeldPunts> {
        self.relay.held(&self.flow)
    }

    /// See [`UdpRelay::current`].
    pub fn current(&self) -> bool {
        self.relay.current(&self.flow)
    }

    /// See [`UdpRelay::release`].
    pub fn release(&self, held: HeldPunts) {
        self.relay.release(&self.flow, held);
    }

    /// See [`UdpRelay::last_active`].
    pub fn last_active(&self) -> Option<Duration> {
        self.relay.last_active(&self.flow)
    }
}

impl Drop for RelayRegistration {
    fn drop(&mut self) {
        self.relay.remove(&self.flow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(proxy: &str, client: &str, target: &str) -> RelayFlow {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        RelayFlow {
            proxy: p(proxy),
            local: p("192.0.2.2:8443"),
            ifindex: 2,
            client: p(client),
            orig_dst: p("192.0.2.2:8443"),
            bound: p(client),
            target: p(target),
            mark: 0,
        }
    }

    #[test]
    fn keys_are_in_network_order_and_a_mixed_family_flow_has_none() {
        let f = flow("192.0.2.1:5000", "198.51.100.9:41000", "127.0.0.1:9000");
        let k = f.inbound_key().unwrap();
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.src_port, 5000u16.to_be());
        assert_eq!(&k.client_addr[..4], &[198, 51, 100, 9]);
        let o = f.outbound_key().unwrap();
        assert_eq!(
            (o.src_port, o.dst_port),
            (9000u16.to_be(), 41000u16.to_be())
        );
        let mixed = flow("192.0.2.1:5000", "[2001:db8::9]:41000", "[::1]:9000");
        assert_eq!(mixed.family(), None);
        assert_eq!(mixed.inbound_key(), None);
        let mapped = flow(
            "[::ffff:192.0.2.1]:5000",
            "198.51.100.9:1",
            "127.0.0.1:9000",
        );
        assert_eq!(mapped.family(), Some(FAMILY_V4));
    }
}
