//! The return path's policy routing, installed through netlink.
//!
//! The service answers the client's address (the upstream socket is bound to
//! it). Without help the host routes those answers out of its default route.
//! What brings them back to mmproxy's transparent socket:
//!
//! | when | rule | route (table T) |
//! |---|---|---|
//! | an IPv4 target on loopback | `from 127.0.0.0/8 iif lo lookup T` | `local 0.0.0.0/0 dev lo` |
//! | an IPv6 target on loopback | `from ::1/128 iif lo lookup T` | `local ::/0 dev lo` |
//! | kernel-side steering (tc marks answers) | `fwmark M lookup T`, both families | the same `local` routes |
//!
//! These are exactly go-mmproxy's documented commands; see [`install()`].
//!
//! # Idempotence and who removes what
//! Existing rules and routes are matched by what they select (family, `from`,
//! `iif`, `fwmark`, table; for routes type `local`, default destination, `dev
//! lo`, table), never by priority. A match is reused and nothing is added.
//!
//! Everything mmproxy adds carries the routing protocol number
//! [`RT_PROTOCOL`] (`ip rule` shows `proto 109`; `ip route show table T` shows
//! `proto 109`), so mmproxy's own entries can be told from an operator's (a
//! go-mmproxy systemd unit's `ip rule add from 127.0.0.1/8 iif lo table 123`,
//! which has the default protocol): an operator's entries are never removed.
//!
//! Several mmproxy processes may share the routes (a TCP and a UDP instance
//! with the same table, as go-mmproxy deployments run them; or a restart after
//! SIGKILL, which finds the killed process's entries). Each process holds a
//! shared lease ([`crate::netns_lease`]: a `flock` on a per-network-namespace
//! lock file in [`DEFAULT_LOCK_DIR`]) while it runs; the kernel drops the lock
//! of a killed process. At exit a process that gets the lock exclusively is the last one
//! running and removes every entry tagged [`RT_PROTOCOL`] — its own and any
//! left by killed predecessors — so the namespace is back to what the operator
//! had. A process that does not get it leaves everything for the others. If
//! the lock file cannot be used, a process removes exactly what it added.
//!
//! # Rule priority
//! Rules are added without a priority, as go-mmproxy's documented commands
//! do: the kernel then places each new rule right after the `local` rule
//! (priority = first existing non-zero priority − 1, 32765 on a default
//! system), i.e. ahead of rules an operator added earlier. That is what the
//! return path needs: answers of proxied flows must not be caught by a broader
//! rule first.
//!
//! # Layout
//! `plan.rs` says what is needed, `netlink.rs` what the kernel has and how to
//! change it (one code path for rules and routes), `install.rs` puts the two
//! together and takes it all away again at exit.
mod install;
mod netlink;
mod plan;
mod preview;
#[cfg(test)]
mod tests;

use std::io;

pub use crate::netns_lease::DEFAULT_LOCK_DIR;
pub use install::{install, install_with_lock_dir, InstalledRoutes, RemoveReport};
pub use plan::RoutingPlan;
pub use preview::{preview, Preview};

/// Routing protocol number (`/etc/iproute2/rt_protos`) on every rule and route
/// mmproxy adds; not one of the numbers assigned to routing daemons.
pub const RT_PROTOCOL: u8 = 109;

const LOOPBACK: &str = "lo";

/// Why routing could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error(
        "{what}: operation not permitted (needs CAP_NET_ADMIN: run as root or grant the \
         capability, or pass --no-routing and set up the routes yourself)"
    )]
    PermissionDenied { what: String },
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no loopback interface \"lo\" in this network namespace")]
    NoLoopback,
    /// Each failure with its causes; the others were still tried.
    #[error("removing return-path routing: {}", .0.join("; "))]
    Remove(Vec<String>),
}
