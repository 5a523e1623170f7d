//! mmproxy: accepts connections and datagrams from a PROXY-protocol load balancer,
//! strips the header and talks to the service from the original client's address.
//!
//! Packet path (ARCHITECTURE.md): the balancer's connections and datagrams reach a
//! listener of [`tcp`] or [`udp`] (after the kernel's [`ebpf`] sk_lookup policy);
//! the pure [`proxy_protocol`] decoder reads the header; [`transparent`] opens the
//! upstream socket from the client's address; TCP splices bytes both ways, UDP relays
//! datagrams and their answers. [`routing`] installs the policy routing (and
//! [`ebpf`] the tc programs) that bring the service's answers back to that socket.
pub mod addr;
pub mod allowed_subnets;
pub mod caps;
pub mod check;
pub mod cli;
pub mod daemon;
pub mod ebpf;
pub mod handoff;
pub mod logging;
pub mod loop_guard;
pub mod metrics;
pub mod netns_lease;
pub mod netwatch;
pub mod notify;
pub mod preflight;
pub mod proxy_protocol;
pub mod routing;
pub mod sockopt;
pub mod stats;
pub mod tcp;
#[cfg(test)]
mod testing;
pub mod transparent;
pub mod udp;
