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

/// The one form an address takes inside mmproxy: IPv4-mapped IPv6 (`::ffff:a.b.c.d`)
/// as plain IPv4. A v4 client named in a v6 header is bound on an IPv4 socket, a v4
/// balancer seen on a dual-stack socket is checked against the IPv4 allow-list, and
/// the kernel's flow keys use IPv4 for both.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address of the header for log lines, "local" where it names none. Formatted
/// only when a line is written: at the default verbosity most connections log
/// nothing, and should not pay for two strings each.
#[derive(Clone, Copy)]
pub struct Shown<A>(pub Option<A>);

impl<A: fmt::Display> fmt::Display for Shown<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("local"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_ipv4() {
        let a: SocketAddr = "[::ffff:192.0.2.7]:5".parse().unwrap();
        assert_eq!(canonical(a), "192.0.2.7:5".parse::<SocketAddr>().unwrap());
        let b: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        assert_eq!(canonical(b), b);
    }
}
