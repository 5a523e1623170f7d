//! mmproxy: accepts connections and datagrams from a PROXY-protocol load balancer,
//! strips the header and talks to the service from the original client's address.
//!
//! Packet path (see README "Architecture"): [`listener`] accepts from the balancer
//! (after the kernel's [`ebpf`] sk_lookup policy) → [`tcp`] reads the header with the
//! pure [`proxy_protocol`] decoder → [`upstream`] opens the transparent socket from
//! the client's address → [`relay`] splices bytes both ways. [`routing`] installs the
//! policy routing that brings the service's answers back to that socket.
pub mod addr;
pub mod allowed_subnets;
pub mod cli;
pub mod daemon;
pub mod ebpf;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod relay;
pub mod routing;
pub mod sockopt;
pub mod stats;
pub mod tcp;
#[cfg(test)]
mod testing;
pub mod udp;
pub mod upstream;
