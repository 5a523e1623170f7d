//! The soak's network: the benchmark's two namespaces and loopback rules
//! (`bench::net`), plus an IPv6 link between them, a second address on the client
//! side that the allow-list leaves out, and echo servers on `::1` as well.
//!
//! ```text
//! client 192.0.2.1, 2001:db8:ffff::1   (good load, hostile load; the "balancer")
//!        192.0.2.3, 2001:db8:ffff::3   (not in --allowed-subnets)
//!   ──veth──► host 192.0.2.2, 2001:db8:ffff::2
//!             mmproxy -p tcp on :8443, mmproxy -p udp on :8453 (both families),
//!             echo on 127.0.0.1 and ::1 (:9000 tcp, :9001 udp)
//! ```
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

use crate::bench::echo::Echo;
use crate::bench::net::{BenchNet, Tuples, CLIENT, ECHO_PORT, HOST, UDP_ECHO_PORT};

pub const CLIENT6: &str = "2001:db8:ffff::1";
pub const HOST6: &str = "2001:db8:ffff::2";
/// The client side's addresses outside the allow-list.
pub const STRANGER4: &str = "192.0.2.3";
pub const STRANGER6: &str = "2001:db8:ffff::3";
pub const TCP_PORT: u16 = 8443;
pub const UDP_PORT: u16 = 8453;
pub const TCP_METRICS: &str = "127.0.0.1:9100";
pub const UDP_METRICS: &str = "127.0.0.1:9101";

/// What the allow-list file holds: the balancer's two addresses only.
pub fn allowed_subnets() -> String {
    format!("{CLIENT}/32\n{CLIENT6}/128\n")
}

pub struct SoakNet {
    pub net: BenchNet,
    _echo4: Echo,
    _echo6: Echo,
}

impl SoakNet {
    pub fn new(threads: usize) -> Result<Self> {
        let net = BenchNet::new().context("creating the namespaces")?;
        net.client.addr("eth0", &format!("{CLIENT6}/64"))?;
        net.host.addr("eth0", &format!("{HOST6}/64"))?;
        net.client.addr("eth0", &format!("{STRANGER4}/24"))?;
        net.client.addr("eth0", &format!("{STRANGER6}/64"))?;
        let host4: std::net::Ipv4Addr = HOST.parse()?;
        let echo4 = Echo::start(
            &net.host,
            SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)),
            &[
                SocketAddr::from(([127, 0, 0, 1], UDP_ECHO_PORT)),
                SocketAddr::from((host4, UDP_ECHO_PORT)),
            ],
            threads,
            None,
            0,
        )?;
        let echo6 = Echo::start(
            &net.host,
            SocketAddr::from((Ipv6Addr::LOCALHOST, ECHO_PORT)),
            &[SocketAddr::from((Ipv6Addr::LOCALHOST, UDP_ECHO_PORT))],
            threads,
            None,
            0,
        )?;
        Ok(Self {
            net,
            _echo4: echo4,
            _echo6: echo6,
        })
    }
}

/// The proxy's address on the link of `v6`'s family, at `port`.
pub fn proxy_addr(v6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if v6 {
        HOST6.parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    } else {
        HOST.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    };
    SocketAddr::new(ip, port)
}

/// Client tuples for PROXY headers, both families, never the same twice in a run
/// (see [`Tuples`]): IPv4 from the benchmark's generator, IPv6 from 2001:db8:1::/64.
#[derive(Default)]
pub struct ClientTuples {
    v4: Tuples,
    v6: AtomicU64,
}

impl ClientTuples {
    pub fn next(&self, v6: bool) -> SocketAddr {
        if !v6 {
            return self.v4.next();
        }
        let n = self.v6.fetch_add(1, Ordering::Relaxed);
        let host = 2 + (n % 500) as u16;
        let port = 1024 + ((n / 500) % 64_000) as u16;
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host);
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    }
}
