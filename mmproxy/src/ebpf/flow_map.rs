//! Live flows, as the kernel's return-path programs see them.
//!
//! The proxies (TCP, UDP) register every upstream flow before its first packet
//! leaves, and drop the registration when the flow ends. The tc programs act only on
//! packets whose tuple is registered, so nothing else on the host is touched.
use std::collections::HashMap as StdHashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use mmproxy_common::{FlowKey, FAMILY_V4, FAMILY_V6};

use crate::addr::canonical;

/// How long a flow stays registered after it ended: the service's last ACK (of
/// mmproxy's FIN) and retransmissions of its own FIN are answers too, and lost ones
/// leave sockets behind in LAST_ACK / FIN_WAIT.
const LINGER: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowProtocol {
    Tcp,
    Udp,
}

/// One upstream flow: mmproxy's socket bound to `client`, talking to `upstream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReturnFlow {
    pub protocol: FlowProtocol,
    /// The upstream socket's local address: the client's address and port (with
    /// the port the kernel assigned, if the header's was 0).
    pub client: SocketAddr,
    /// Where the upstream socket sends: the `-4`/`-6` target.
    pub upstream: SocketAddr,
}

impl ReturnFlow {
    /// The key of this flow's answers in the kernel's `FLOWS` map. IPv4-mapped
    /// addresses count as IPv4, as the upstream sockets use them.
    pub fn key(&self) -> FlowKey {
        let client = canonical(self.client);
        let upstream = canonical(self.upstream);
        let (family, client_ip, upstream_ip) = match (client.ip(), upstream.ip()) {
            (IpAddr::V4(c), IpAddr::V4(u)) => (FAMILY_V4, v4_octets(c), v4_octets(u)),
            (c, u) => (FAMILY_V6, v6_octets(c), v6_octets(u)),
        };
        let (service_port, client_port) = (upstream.port().to_be(), client.port().to_be());
        match self.protocol {
            FlowProtocol::Tcp => {
                FlowKey::tcp_answer(family, upstream_ip, service_port, client_ip, client_port)
            }
            FlowProtocol::Udp => FlowKey::udp_answer(family, service_port, client_ip, client_port),
        }
    }
}

/// An IPv4 address as the kernel's keys hold it: in the first four bytes.
fn v4_octets(ip: Ipv4Addr) -> [u8; 16] {
    let [a, b, c, d] = ip.octets();
    [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Why a flow could not be registered with the kernel.
#[derive(Debug, thiserror::Error)]
pub enum FlowMapError {
    #[error(
        "the kernel's flow table is full ({0} flows); answers of this flow may not reach mmproxy"
    )]
    Full(u32),
    #[error("cannot register the flow in the kernel's flow table")]
    Map(#[source] MapError),
}

/// Where the proxies register their upstream flows. The daemon hands one to the
/// TCP and UDP paths when the kernel side steers return traffic.
pub trait FlowRegistry: Send + Sync + fmt::Debug {
    /// Makes the flow's answers recognisable. Call before the first packet to the
    /// upstream leaves (the SYN, the first datagram), so the first answer is caught.
    fn add(&self, flow: &ReturnFlow) -> Result<(), FlowMapError>;
    /// Undoes one `add` (possibly a little later, see [`LINGER`]).
    fn remove(&self, flow: &ReturnFlow);
}

/// A registration that is undone when dropped: keep it as long as the flow lives.
#[derive(Debug)]
pub struct FlowRegistration {
    registry: Arc<dyn FlowRegistry>,
    flow: ReturnFlow,
}

impl FlowRegistration {
    pub fn new(registry: &Arc<dyn FlowRegistry>, flow: ReturnFlow) -> Result<Self, FlowMapError> {
        registry.add(&flow)?;
        Ok(Self {
            registry: registry.clone(),
            flow,
        })
    }

    pub fn flow(&self) -> &ReturnFlow {
        &self.flow
    }
}

impl Drop for FlowRegistration {
    fn drop(&mut self) {
        self.registry.remove(&self.flow);
    }
}

/// The kernel's `FLOWS` map. Two flows can share a key (a UDP flow re-created while
/// the old one lingers; TCP flows to the same upstream from one client address and
/// port are impossible): entries are reference-counted so the first removal does not
/// unregister the second.
pub struct KernelFlows {
    inner: Mutex<Inner>,
    capacity: u32,
}

struct Inner {
    map: HashMap<MapData, FlowKey, u8>,
    refs: StdHashMap<FlowKey, u32>,
}

impl fmt::Debug for KernelFlows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelFlows")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl KernelFlows {
    pub fn new(map: HashMap<MapData, FlowKey, u8>, capacity: u32) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                map,
                refs: StdHashMap::new(),
            }),
            capacity,
        })
    }

    /// The map and its counts stay consistent whatever panicked while holding the
    /// lock: each change is one insert or remove.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, key: &FlowKey) {
        let mut inner = self.lock();
        let Some(n) = inner.refs.get_mut(key) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            inner.refs.remove(key);
            // Already gone is fine; any other error leaves a stale entry that only
            // matches packets to this exact client address and port.
            if let Err(e) = inner.map.remove(key) {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "removing a flow from the kernel's flow table failed"
                );
            }
        }
    }

    /// Registered keys (tests, diagnostics).
    pub fn len(&self) -> usize {
        self.lock().refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FlowRegistry for Arc<KernelFlows> {
    fn add(&self, flow: &ReturnFlow) -> Result<(), FlowMapError> {
        let key = flow.key();
        let mut inner = self.lock();
        if let Some(n) = inner.refs.get_mut(&key) {
            *n += 1;
            return Ok(());
        }
        match inner.map.insert(key, 1, 0) {
            Ok(()) => {
                inner.refs.insert(key, 1);
                Ok(())
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(FlowMapError::Full(self.capacity))
            }
            Err(e) => Err(FlowMapError::Map(e)),
        }
    }

    fn remove(&self, flow: &ReturnFlow) {
        let key = flow.key();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let this = self.clone();
                rt.spawn(async move {
                    tokio::time::sleep(LINGER).await;
                    this.release(&key);
                });
            }
            Err(_) => self.release(&key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmproxy_common::{PROTO_TCP, PROTO_UDP};

    fn flow(p: FlowProtocol, client: &str, upstream: &str) -> ReturnFlow {
        ReturnFlow {
            protocol: p,
            client: client.parse().unwrap(),
            upstream: upstream.parse().unwrap(),
        }
    }

    #[test]
    fn tcp_key_is_the_answers_tuple_in_network_order() {
        let k = flow(FlowProtocol::Tcp, "198.51.100.9:40000", "192.0.2.2:9000").key();
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.protocol, PROTO_TCP);
        assert_eq!(&k.src_addr[..4], &[192, 0, 2, 2]);
        assert_eq!(&k.dst_addr[..4], &[198, 51, 100, 9]);
        assert!(k.src_addr[4..]
            .iter()
            .chain(&k.dst_addr[4..])
            .all(|b| *b == 0));
        assert_eq!(k.src_port.to_ne_bytes(), 9000u16.to_be_bytes());
        assert_eq!(k.dst_port.to_ne_bytes(), 40000u16.to_be_bytes());
    }

    #[test]
    fn udp_key_leaves_out_the_service_address() {
        let k = flow(FlowProtocol::Udp, "[2001:db8::9]:5000", "[::1]:53").key();
        assert_eq!(k.family, FAMILY_V6);
        assert_eq!(k.protocol, PROTO_UDP);
        assert_eq!(k.src_addr, [0; 16]);
        assert_eq!(
            k.dst_addr,
            "2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4_keys() {
        let a = flow(FlowProtocol::Tcp, "[::ffff:198.51.100.9]:1", "127.0.0.1:2").key();
        let b = flow(FlowProtocol::Tcp, "198.51.100.9:1", "127.0.0.1:2").key();
        assert_eq!(a, b);
    }
}
