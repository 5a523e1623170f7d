//! Newtypes for the roles an address plays in a proxied flow.
//!
//! A flow has four socket addresses and mixing any two of them up is a security bug
//! (binding the upstream socket to the balancer's address, checking the client's
//! address against the proxies' allow-list…). Each role gets its own type so the
//! compiler keeps them apart.
use std::fmt;
use std::net::SocketAddr;

macro_rules! addr_role {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl $name {
            pub fn get(self) -> SocketAddr {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

addr_role!(
    /// The original client, as the PROXY header's source: the address the upstream
    /// socket is bound to so the service sees it.
    ClientAddr
);
addr_role!(
    /// The load balancer: the peer of the accepted connection or datagram. This is the
    /// address checked against `--allowed-subnets`.
    ProxyAddr
);
addr_role!(
    /// The address the client originally connected to, as the PROXY header's
    /// destination (used when the target port is taken from the header).
    OrigDstAddr
);
addr_role!(
    /// The service mmproxy connects to (`-4` / `-6`).
    UpstreamAddr
);
addr_role!(
    /// A local address mmproxy listens on (`-l`).
    ListenAddr
);
