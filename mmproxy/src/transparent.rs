//! The upstream socket of every proxied flow, TCP and UDP alike (ARCHITECTURE.md,
//! step 4): which target a flow goes to ([`Targets`]), and the socket it leaves
//! from ([`UpstreamSocket`]) — bound to the client's address with IP_TRANSPARENT so
//! the service sees the client, or to the host's own address for LOCAL headers.
//!
//! Every failure on the way is an [`UpstreamError`], whose messages end with advice
//! for the errors operators meet while setting up (one table, [`hint`]).
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::addr::{canonical, ClientAddr, ProxyAddr, UpstreamAddr};
use crate::cli::{Args, TargetSpec};
use crate::ebpf::{FlowProtocol, FlowRegistry};
use crate::loop_guard::OwnSockets;
use crate::proxy_protocol::Endpoints;
use crate::sockopt;
use crate::stats::ConnectFailure;

/// Where every flow of a proxy goes, and who is told about it: the part the TCP and
/// UDP contexts share.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub targets: Targets,
    /// When the kernel side steers return traffic: every transparent upstream socket
    /// is registered here after bind and before its first packet leaves, for as long
    /// as its flow lives (ARCHITECTURE.md, step 6).
    pub flows: Option<Arc<dyn FlowRegistry>>,
    /// mmproxy's own listening sockets, which no upstream may be.
    pub own: OwnSockets,
}

impl Upstream {
    pub fn from_args(args: &Args) -> Self {
        Upstream {
            targets: Targets::from_args(args),
            flows: None,
            own: OwnSockets::from_args(args),
        }
    }

    /// [`Targets::choose`], refusing an upstream that is one of mmproxy's own
    /// listening sockets ([`crate::loop_guard`]).
    pub fn route(
        &self,
        endpoints: Endpoints,
        proxy: ProxyAddr,
        sent_to_port: impl FnOnce() -> io::Result<u16>,
    ) -> Result<(Option<ClientAddr>, UpstreamAddr), TargetError> {
        let (client, to) = self.targets.choose(endpoints, proxy, sent_to_port)?;
        if self.own.covers(to.0) {
            return Err(TargetError::IsMmproxy { to });
        }
        Ok((client, to))
    }

    /// Loopback targets and no kernel side, for tests.
    #[cfg(test)]
    pub fn loopback(port4: Option<u16>, port6: Option<u16>) -> Self {
        Upstream {
            targets: Targets::loopback(port4, port6),
            flows: None,
            own: OwnSockets::default(),
        }
    }
}

/// The `-4` and `-6` targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    /// `-4`: target for IPv4 clients (and IPv4-mapped IPv6 ones).
    pub v4: TargetSpec,
    /// `-6`: target for IPv6 clients.
    pub v6: TargetSpec,
    /// `-dynamic-destination`: the header's destination instead of `v4`/`v6` (which
    /// then serve LOCAL headers only).
    pub dynamic: bool,
}

impl Targets {
    /// Targets on loopback, for tests.
    #[cfg(test)]
    pub fn loopback(port4: Option<u16>, port6: Option<u16>) -> Self {
        Targets {
            v4: TargetSpec {
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: port4,
            },
            v6: TargetSpec {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                port: port6,
            },
            dynamic: false,
        }
    }

    pub fn from_args(args: &Args) -> Self {
        Targets {
            v4: args.target4,
            v6: args.target6,
            dynamic: args.dynamic_destination,
        }
    }

    /// Where a flow goes from and to. The target is chosen by the client's family (as
    /// go-mmproxy's TCP path does; its UDP path wrongly uses the proxy's), or by the
    /// proxy's for LOCAL headers, which name no client. Without a target port, the
    /// header's destination port is used, and for LOCAL the port the proxy sent to,
    /// which `sent_to_port` is asked for only then. Both addresses come back in
    /// canonical form ([`canonical`]).
    ///
    /// With `-dynamic-destination` the header's destination is the upstream, as in
    /// go-mmproxy's fork: whatever address and port the balancer names, on this host
    /// or elsewhere. It must be a unicast address with a port, of the client's
    /// family (a v2 header can pair an IPv4-mapped client with an IPv6 destination).
    pub fn choose(
        &self,
        endpoints: Endpoints,
        proxy: ProxyAddr,
        sent_to_port: impl FnOnce() -> io::Result<u16>,
    ) -> Result<(Option<ClientAddr>, UpstreamAddr), TargetError> {
        let (client, family_of, port) = match endpoints {
            Endpoints::Proxied {
                client,
                destination,
            } => {
                let client = ClientAddr(canonical(client.0));
                if self.dynamic {
                    let to = UpstreamAddr(canonical(destination.0));
                    return dynamic_destination(client, to).map(|to| (Some(client), to));
                }
                (Some(client), client.0.ip(), destination.0.port())
            }
            Endpoints::Local => (
                None,
                proxy.0.ip().to_canonical(),
                sent_to_port().map_err(TargetError::NoLocalPort)?,
            ),
        };
        let target = if family_of.is_ipv4() {
            self.v4
        } else {
            self.v6
        };
        let to = SocketAddr::new(target.addr, target.port.unwrap_or(port));
        Ok((client, UpstreamAddr(canonical(to))))
    }
}

/// The header's destination as the upstream (`-dynamic-destination`), if usable.
fn dynamic_destination(client: ClientAddr, to: UpstreamAddr) -> Result<UpstreamAddr, TargetError> {
    if client.0.is_ipv4() != to.0.is_ipv4() {
        return Err(TargetError::DestinationFamily { client, to });
    }
    let unicast = match to.0.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    };
    if !unicast || to.0.port() == 0 {
        return Err(TargetError::DestinationUnusable { to });
    }
    Ok(to)
}

/// Why no upstream could be chosen for a header.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot tell which port the LOCAL header's proxy sent to")]
    NoLocalPort(#[source] io::Error),
    #[error(
        "-dynamic-destination: the header's client {client} and destination {to} are of \
         different address families"
    )]
    DestinationFamily {
        client: ClientAddr,
        to: UpstreamAddr,
    },
    #[error(
        "-dynamic-destination: the header's destination {to} is not a unicast address and port"
    )]
    DestinationUnusable { to: UpstreamAddr },
    #[error("upstream {to} is one of mmproxy's own listening sockets: the connection would loop")]
    IsMmproxy { to: UpstreamAddr },
}

impl TargetError {
    /// Short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoLocalPort(_) => "no_local_addr",
            Self::DestinationFamily { .. } => "destination_family",
            Self::DestinationUnusable { .. } => "destination_unusable",
            Self::IsMmproxy { .. } => "upstream_is_mmproxy",
        }
    }
}

/// When the kernel picks an upstream socket's local port: the client's port is 0,
/// or there is no client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChoice {
    /// At bind, so the socket's address is known before its first packet leaves
    /// (to register the flow with the kernel side; UDP sockets are never connected).
    /// Without a client the socket is bound to the host's wildcard address.
    AtBind,
    /// At connect (IP_BIND_ADDRESS_NO_PORT), which can share a port between
    /// different upstreams. Without a client nothing is bound: connect picks the
    /// address and the port.
    AtConnect,
}

/// How the upstream sockets of one protocol are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamSocket {
    pub protocol: FlowProtocol,
    /// SO_MARK for transparent sockets; 0 leaves the mark alone. Sockets of the host's
    /// own address keep theirs, as in go-mmproxy: the mark exists to route answers to
    /// the client's address back to mmproxy.
    pub mark: u32,
}

impl UpstreamSocket {
    /// A nonblocking socket of `to`'s family: from `from` with IP_TRANSPARENT when
    /// the header named a client, from the host's own address otherwise (LOCAL,
    /// UNKNOWN, UNSPEC). `protocol_options` sets the protocol's own options before
    /// anything is bound.
    ///
    /// A client of the other family than `to` cannot be bound on its socket and is
    /// refused with [`UpstreamError::FamilyMismatch`] before a socket exists.
    /// IPv4-mapped IPv6 addresses count as IPv4.
    pub fn open(
        &self,
        from: Option<ClientAddr>,
        to: UpstreamAddr,
        port: PortChoice,
        protocol_options: impl FnOnce(&Socket) -> Result<(), UpstreamError>,
    ) -> Result<Socket, UpstreamError> {
        let to = UpstreamAddr(canonical(to.0));
        let from = from.map(|c| ClientAddr(canonical(c.0)));
        if let Some(client) = from {
            if client.0.is_ipv4() != to.0.is_ipv4() {
                return Err(UpstreamError::FamilyMismatch { client, to });
            }
        }
        let (ty, protocol) = match self.protocol {
            FlowProtocol::Tcp => (Type::STREAM, Protocol::TCP),
            FlowProtocol::Udp => (Type::DGRAM, Protocol::UDP),
        };
        let socket = Socket::new(
            Domain::for_address(to.0),
            ty.nonblocking().cloexec(),
            Some(protocol),
        )
        .map_err(UpstreamError::Socket)?;
        protocol_options(&socket)?;
        let at = match from {
            Some(client) => {
                self.make_transparent(&socket, client, port)?;
                client.0
            }
            None if port == PortChoice::AtBind => {
                let any = if to.0.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                SocketAddr::new(any, 0)
            }
            None => return Ok(socket),
        };
        socket
            .bind(&at.into())
            .map_err(|source| UpstreamError::Bind { at, source })?;
        Ok(socket)
    }

    fn make_transparent(
        &self,
        socket: &Socket,
        client: ClientAddr,
        port: PortChoice,
    ) -> Result<(), UpstreamError> {
        sockopt::set_transparent(socket, client.0.is_ipv6()).map_err(opt_err("IP_TRANSPARENT"))?;
        // Several flows from one client (several proxies' UDP flows, an earlier TCP
        // connection in TIME_WAIT) bind the same ip:port; the kernel still refuses
        // duplicate 4-tuples at connect.
        sockopt::set_reuse_address(socket).map_err(opt_err("SO_REUSEADDR"))?;
        if client.0.port() == 0 && port == PortChoice::AtConnect {
            sockopt::set_bind_address_no_port(socket)
                .map_err(opt_err("IP_BIND_ADDRESS_NO_PORT"))?;
        }
        if self.mark != 0 {
            sockopt::set_mark(socket, self.mark).map_err(opt_err("SO_MARK"))?;
        }
        Ok(())
    }
}

/// The address a transparent socket is bound to, with the port the kernel chose if
/// the header's was 0 (the client's address as a fallback: the kernel always knows).
pub fn bound_addr(socket: &Socket, client: ClientAddr) -> SocketAddr {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(client.0, canonical)
}

/// Maps a failed option to [`UpstreamError::SockOpt`].
pub fn opt_err(option: &'static str) -> impl FnOnce(io::Error) -> UpstreamError {
    move |source| UpstreamError::SockOpt { option, source }
}

/// Why an upstream socket could not be opened or connected.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot create the upstream socket{}", hint(.0))]
    Socket(#[source] io::Error),
    #[error("cannot set {option} on the upstream socket{}", hint(.source))]
    SockOpt {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "client {client} cannot be bound on a socket for upstream {to}: address families differ"
    )]
    FamilyMismatch {
        client: ClientAddr,
        to: UpstreamAddr,
    },
    #[error("cannot bind the upstream socket to {at}{}", hint(.source))]
    Bind {
        at: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to upstream {to} failed{}", hint(.source))]
    Connect {
        to: UpstreamAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to upstream {to} timed out after {after:?}")]
    Timeout { to: UpstreamAddr, after: Duration },
    #[error("cannot register the upstream socket with the runtime{}", hint(.0))]
    Register(#[source] io::Error),
}

impl UpstreamError {
    /// Short label for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Socket(_) => "socket",
            Self::SockOpt { .. } => "sockopt",
            Self::FamilyMismatch { .. } => "family_mismatch",
            Self::Bind { .. } => "bind",
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Register(_) => "register",
        }
    }

    /// The errno class counted in `mmproxy_tcp_upstream_connect_failures_total`.
    pub fn class(&self) -> ConnectFailure {
        match self {
            Self::Socket(e)
            | Self::Register(e)
            | Self::SockOpt { source: e, .. }
            | Self::Bind { source: e, .. }
            | Self::Connect { source: e, .. } => ConnectFailure::from_errno(e.raw_os_error()),
            Self::Timeout { .. } => ConnectFailure::Timeout,
            Self::FamilyMismatch { .. } => ConnectFailure::Other,
        }
    }
}

/// Advice for the errors operators meet while setting up upstream sockets, appended
/// to the message (the error itself stays the source).
pub fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            " (IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN: run as root or grant the capability)"
        }
        Some(libc::EADDRINUSE) => {
            " (the client's address and port are still in use by an earlier flow to this upstream)"
        }
        Some(libc::EADDRNOTAVAIL) => {
            " (the 4-tuple is taken, or the address is not local and IP_TRANSPARENT is not in effect)"
        }
        Some(libc::ECONNREFUSED) => " (is the service listening on the -4/-6 target?)",
        _ => descriptor_hint(e),
    }
}

/// Advice for running out of descriptors, wherever a socket is made (accept too).
pub fn descriptor_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => {
            " (descriptor limit: raise LimitNOFILE / ulimit -n, or lower --max-connections / --max-flows)"
        }
        Some(libc::ENFILE) => " (system-wide descriptor limit: fs.file-max)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;

    fn choose(
        t: &Targets,
        endpoints: Endpoints,
        proxy: &str,
        port: u16,
    ) -> (Option<ClientAddr>, UpstreamAddr) {
        let proxy = ProxyAddr(proxy.parse().unwrap());
        t.choose(endpoints, proxy, || Ok(port)).unwrap()
    }

    fn proxied(client: &str, dst: &str) -> Endpoints {
        Endpoints::Proxied {
            client: ClientAddr(client.parse().unwrap()),
            destination: OrigDstAddr(dst.parse().unwrap()),
        }
    }

    #[test]
    fn dynamic_destination_is_the_headers_and_local_keeps_the_targets() {
        let t = Targets {
            dynamic: true,
            ..Targets::loopback(Some(9000), Some(9000))
        };
        let proxy = ProxyAddr("192.0.2.1:1".parse().unwrap());
        let (from, to) = t
            .choose(proxied("198.51.100.9:4000", "192.0.2.2:53"), proxy, || {
                Err(io::Error::other("asked"))
            })
            .unwrap();
        assert_eq!(from.unwrap().0.to_string(), "198.51.100.9:4000");
        assert_eq!(to.0.to_string(), "192.0.2.2:53");
        // Mapped on both sides: IPv4.
        let (_, to) = choose(
            &t,
            proxied("[::ffff:198.51.100.9]:4000", "[::ffff:192.0.2.2]:53"),
            "192.0.2.1:1",
            1,
        );
        assert_eq!(to.0.to_string(), "192.0.2.2:53");
        let (from, to) = choose(&t, Endpoints::Local, "192.0.2.1:1", 1);
        assert!(from.is_none());
        assert_eq!(to.0.to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn dynamic_destination_refuses_other_families_and_non_unicast() {
        let t = Targets {
            dynamic: true,
            ..Targets::loopback(None, None)
        };
        let proxy = ProxyAddr("192.0.2.1:1".parse().unwrap());
        for (client, dst, kind) in [
            (
                "[::ffff:198.51.100.9]:4000",
                "[2001:db8::2]:53",
                "destination_family",
            ),
            ("198.51.100.9:4000", "0.0.0.0:53", "destination_unusable"),
            (
                "198.51.100.9:4000",
                "255.255.255.255:53",
                "destination_unusable",
            ),
            ("198.51.100.9:4000", "224.0.0.1:53", "destination_unusable"),
            ("198.51.100.9:4000", "192.0.2.2:0", "destination_unusable"),
            ("[2001:db8::9]:4000", "[ff02::1]:53", "destination_unusable"),
            ("[2001:db8::9]:4000", "[::]:53", "destination_unusable"),
        ] {
            let e = t
                .choose(proxied(client, dst), proxy, || Ok(1))
                .expect_err(dst);
            assert_eq!(e.kind(), kind, "{client} -> {dst}: {e}");
        }
    }

    #[test]
    fn an_upstream_on_mmproxys_own_socket_is_refused() {
        let mut u = Upstream::loopback(None, None);
        u.own = OwnSockets::from_args(
            &Args::try_from_iter(["mmproxy", "-l", "0.0.0.0:20000-20999"]).unwrap(),
        );
        let proxy = ProxyAddr("192.0.2.1:1".parse().unwrap());
        let e = u
            .route(
                proxied("198.51.100.9:4000", "192.0.2.2:20000"),
                proxy,
                || Ok(1),
            )
            .unwrap_err();
        assert_eq!(e.kind(), "upstream_is_mmproxy", "{e}");
        let (_, to) = u
            .route(
                proxied("198.51.100.9:4000", "192.0.2.2:20001"),
                proxy,
                || Ok(1),
            )
            .unwrap();
        assert_eq!(to.0.to_string(), "127.0.0.1:20001");
    }

    #[test]
    fn target_follows_the_client_family_mapped_is_v4_and_port_falls_back() {
        let t = Targets::loopback(None, Some(9000));
        let proxied = |client: &str, dst: &str| Endpoints::Proxied {
            client: ClientAddr(client.parse().unwrap()),
            destination: OrigDstAddr(dst.parse().unwrap()),
        };
        let proxy = "[2001:db8:1::1]:5000";
        let (from, to) = choose(
            &t,
            proxied("[::ffff:198.51.100.9]:4000", "[2001:db8::2]:53"),
            proxy,
            8443,
        );
        assert_eq!(
            from.unwrap().0,
            "198.51.100.9:4000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(to.0, "127.0.0.1:53".parse::<SocketAddr>().unwrap());
        let (_, to) = choose(
            &t,
            proxied("[2001:db8::9]:4000", "192.0.2.2:53"),
            proxy,
            8443,
        );
        assert_eq!(to.0, "[::1]:9000".parse::<SocketAddr>().unwrap());
        // LOCAL: the proxy's family, the listening port when the target has none.
        let (from, to) = choose(&t, Endpoints::Local, "192.0.2.1:1", 8443);
        assert!(from.is_none());
        assert_eq!(to.0, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn the_sent_to_port_is_asked_for_only_for_local() {
        let t = Targets::loopback(Some(1), Some(1));
        let proxied = Endpoints::Proxied {
            client: ClientAddr("198.51.100.9:4000".parse().unwrap()),
            destination: OrigDstAddr("192.0.2.2:53".parse().unwrap()),
        };
        let proxy = ProxyAddr("192.0.2.1:1".parse().unwrap());
        let asked = || Err(io::Error::other("asked"));
        assert!(t.choose(proxied, proxy, asked).is_ok());
        assert!(t.choose(Endpoints::Local, proxy, asked).is_err());
    }

    #[test]
    fn family_mismatch_is_refused_before_binding() {
        for protocol in [FlowProtocol::Tcp, FlowProtocol::Udp] {
            let e = UpstreamSocket { protocol, mark: 0 }
                .open(
                    Some(ClientAddr("192.0.2.1:1000".parse().unwrap())),
                    UpstreamAddr("[::1]:53".parse().unwrap()),
                    PortChoice::AtBind,
                    |_| panic!("no socket for a family mismatch"),
                )
                .unwrap_err();
            assert!(matches!(e, UpstreamError::FamilyMismatch { .. }), "{e}");
        }
    }

    #[test]
    fn local_sockets_bind_the_wildcard_only_when_the_port_is_chosen_at_bind() {
        let to = UpstreamAddr("127.0.0.1:9".parse().unwrap());
        let udp = UpstreamSocket {
            protocol: FlowProtocol::Udp,
            mark: 0,
        };
        let bound = udp.open(None, to, PortChoice::AtBind, |_| Ok(())).unwrap();
        let local = bound.local_addr().unwrap().as_socket().unwrap();
        assert!(local.ip().is_unspecified() && local.port() != 0, "{local}");
        let tcp = UpstreamSocket {
            protocol: FlowProtocol::Tcp,
            ..udp
        };
        let unbound = tcp
            .open(None, to, PortChoice::AtConnect, |_| Ok(()))
            .unwrap();
        let local = unbound.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local.port(), 0);
    }

    #[test]
    fn bind_hint_names_the_capability() {
        let e = UpstreamError::SockOpt {
            option: "IP_TRANSPARENT",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }

    #[test]
    fn descriptor_limits_are_explained_for_every_socket() {
        let e = UpstreamError::Socket(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(e.to_string().contains("LimitNOFILE"), "{e}");
        assert_eq!(
            descriptor_hint(&io::Error::from_raw_os_error(libc::EPERM)),
            ""
        );
    }
}
