//! The benchmark's network: two namespaces joined by a veth pair.
//!
//! ```text
//! client 192.0.2.1 (generators; acts as the balancer) ──veth──► host 192.0.2.2
//!                                                        proxy :8443…, echo on 127.0.0.1
//!                                                        and 192.0.2.2 (:9000 tcp, :9001 udp)
//! ```
//! Headers name clients in 198.51.100.0/24 and 203.0.113.0/24 (documentation
//! ranges); the echo server answers them on loopback, and go-mmproxy's documented
//! rules (set here, as an operator would) deliver the answers to the proxy's
//! transparent sockets. mmproxy finds the rules in place and reuses them.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

use crate::netns::Netns;

pub const CLIENT: &str = "192.0.2.1";
pub const HOST: &str = "192.0.2.2";
/// The echo servers' port (TCP and UDP).
pub const ECHO_PORT: u16 = 9000;
/// The UDP echo's port.
pub const UDP_ECHO_PORT: u16 = 9001;
pub const ROUTE_TABLE: &str = "123";

pub struct BenchNet {
    pub client: Netns,
    pub host: Netns,
}

impl BenchNet {
    pub fn new() -> Result<Self> {
        let n = Self {
            client: Netns::new("bclient")?,
            host: Netns::new("bhost")?,
        };
        n.client.link("eth0", &n.host, "eth0")?;
        n.client.addr("eth0", &format!("{CLIENT}/24"))?;
        n.host.addr("eth0", &format!("{HOST}/24"))?;
        // go-mmproxy's README, "Routing setup".
        n.host.ip(&[
            "rule",
            "add",
            "from",
            "127.0.0.1/8",
            "iif",
            "lo",
            "table",
            ROUTE_TABLE,
        ])?;
        n.host.ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            ROUTE_TABLE,
        ])?;
        n.host.ip(&[
            "-6",
            "rule",
            "add",
            "from",
            "::1/128",
            "iif",
            "lo",
            "table",
            ROUTE_TABLE,
        ])?;
        n.host.ip(&[
            "-6",
            "route",
            "add",
            "local",
            "::/0",
            "dev",
            "lo",
            "table",
            ROUTE_TABLE,
        ])?;
        // The connection-rate generator closes first, so its side holds TIME_WAIT:
        // the whole port range, and reuse of TIME_WAIT ports after a second.
        n.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        n.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        // 10,000 idle connections and bursts of connects: room in the queues.
        for ns in [&n.client, &n.host] {
            ns.sysctl("net.core.somaxconn", "8192")?;
            ns.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")?;
        }
        Ok(n)
    }
}

/// Client addresses for PROXY headers, never the same twice in a run: spoofed
/// tuples of closed flows sit in TIME_WAIT on the host for a minute, so a reused
/// one could not be connected from again. Consecutive connections come from
/// different addresses (500 of them, then the next port), as real clients do:
/// HAProxy's `usesrc clientip` picks an ephemeral port per client address, and
/// one address for thousands of short connections would run out of ports.
#[derive(Default)]
pub struct Tuples {
    next: AtomicU64,
}

const ADDRESSES: u64 = 500;

impl Tuples {
    pub fn next(&self) -> SocketAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let host = n % ADDRESSES;
        let port = 1024 + ((n / ADDRESSES) % 64_000) as u16;
        let last = 2 + (host % 250) as u8;
        let ip = if host < 250 {
            Ipv4Addr::new(198, 51, 100, last)
        } else {
            Ipv4Addr::new(203, 0, 113, last)
        };
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_do_not_repeat_early() {
        let t = Tuples::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            assert!(seen.insert(t.next()));
        }
    }
}
