//! Opening the upstream TCP connection, from the client's address when the PROXY
//! header carried one (design notes, packet path 2).
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::{ClientAddr, UpstreamAddr};
use crate::sockopt;

/// How upstream sockets are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// SO_MARK for transparent upstream sockets; 0 leaves the mark alone.
    pub mark: u32,
    /// Bound on the whole connect, SYN retries included.
    pub connect_timeout: Duration,
}

/// Why the upstream connection could not be opened. Display is a complete log line
/// fragment, with a hint for the errors operators hit while setting up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot create upstream socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot set {option} on upstream socket: {source}{}", hint(.source))]
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
    #[error("cannot bind upstream socket to client address {client}: {source}{}", hint(.source))]
    Bind {
        client: ClientAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to upstream {to} failed: {source}{}", hint(.source))]
    Connect {
        to: UpstreamAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to upstream {to} timed out after {after:?}")]
    Timeout { to: UpstreamAddr, after: Duration },
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
        }
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN: run as root or grant the capability)"
        }
        Some(libc::EADDRINUSE) => {
            " (the client's address and port are still in use by an earlier flow to this upstream)"
        }
        Some(libc::EADDRNOTAVAIL) => {
            " (the 4-tuple is taken, or the address is not local and IP_TRANSPARENT is not in effect)"
        }
        Some(libc::ECONNREFUSED) => " (is the service listening on the -4/-6 target?)",
        _ => "",
    }
}

/// Opens the connection to `to`: from `from` (IP_TRANSPARENT) when the header named
/// a client, from the host's own address otherwise (LOCAL, UNKNOWN, UNSPEC).
///
/// The caller picks the target by the client's family (`-4` for IPv4 clients); a
/// client of the other family cannot be bound on the target's socket and is refused
/// with [`UpstreamError::FamilyMismatch`]. IPv4-mapped IPv6 addresses count as IPv4.
pub async fn connect(
    from: Option<ClientAddr>,
    to: UpstreamAddr,
    opts: &UpstreamOptions,
) -> Result<TcpStream, UpstreamError> {
    let to = UpstreamAddr(canonical(to.0));
    let socket = match from {
        Some(client) => transparent_socket(ClientAddr(canonical(client.0)), to, opts, false)?,
        None => plain_socket(to, opts)?,
    };
    finish(socket, to, opts).await
}

/// [`connect`], calling `on_bound` with the transparent socket's local address
/// after bind and before connect — so whatever it sets up (the kernel's return-path
/// flow entry) is in place before the service's first answer. A header with client
/// port 0 then gets its port at bind time rather than at connect. Not called for
/// connections from the host's own address (no client in the header).
pub async fn connect_then<T>(
    from: Option<ClientAddr>,
    to: UpstreamAddr,
    opts: &UpstreamOptions,
    on_bound: impl FnOnce(SocketAddr) -> T,
) -> Result<(TcpStream, Option<T>), UpstreamError> {
    let to = UpstreamAddr(canonical(to.0));
    let Some(client) = from else {
        return Ok((finish(plain_socket(to, opts)?, to, opts).await?, None));
    };
    let client = ClientAddr(canonical(client.0));
    let socket = transparent_socket(client, to, opts, true)?;
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(client.0);
    let bound = on_bound(local);
    Ok((finish(socket, to, opts).await?, Some(bound)))
}

async fn finish(
    socket: Socket,
    to: UpstreamAddr,
    opts: &UpstreamOptions,
) -> Result<TcpStream, UpstreamError> {
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(opts.connect_timeout, socket.connect(to.0)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect { to, source }),
        Err(_) => Err(UpstreamError::Timeout {
            to,
            after: opts.connect_timeout,
        }),
    }
}

/// `port_at_bind`: with client port 0, let bind choose the port (so it is known
/// before connect) instead of connect (IP_BIND_ADDRESS_NO_PORT, which can share a
/// port between different upstreams).
fn transparent_socket(
    client: ClientAddr,
    to: UpstreamAddr,
    opts: &UpstreamOptions,
    port_at_bind: bool,
) -> Result<Socket, UpstreamError> {
    if client.0.is_ipv4() != to.0.is_ipv4() {
        return Err(UpstreamError::FamilyMismatch { client, to });
    }
    let socket = plain_socket(to, opts)?;
    sockopt::set_transparent(&socket, client.0.is_ipv6()).map_err(opt_err("IP_TRANSPARENT"))?;
    // Several flows from one client (or one client's earlier flow in TIME_WAIT) bind
    // the same ip:port; the kernel still refuses duplicate 4-tuples at connect.
    sockopt::set_reuse_address(&socket).map_err(opt_err("SO_REUSEADDR"))?;
    if client.0.port() == 0 && !port_at_bind {
        sockopt::set_bind_address_no_port(&socket).map_err(opt_err("IP_BIND_ADDRESS_NO_PORT"))?;
    }
    if opts.mark != 0 {
        sockopt::set_mark(&socket, opts.mark).map_err(opt_err("SO_MARK"))?;
    }
    socket
        .bind(&client.0.into())
        .map_err(|source| UpstreamError::Bind { client, source })?;
    Ok(socket)
}

/// A nonblocking TCP socket of the target's family with the options every upstream
/// socket gets. The mark is left to [`transparent_socket`], as in go-mmproxy: it
/// exists to route answers to the client's address back to mmproxy.
fn plain_socket(to: UpstreamAddr, opts: &UpstreamOptions) -> Result<Socket, UpstreamError> {
    let ty = Type::STREAM.nonblocking().cloexec();
    let socket = Socket::new(Domain::for_address(to.0), ty, Some(Protocol::TCP))
        .map_err(UpstreamError::Socket)?;
    sockopt::set_nodelay(&socket).map_err(opt_err("TCP_NODELAY"))?;
    sockopt::set_tcp_syncnt(&socket, syn_retries(opts.connect_timeout))
        .map_err(opt_err("TCP_SYNCNT"))?;
    Ok(socket)
}

/// The fewest SYN retries whose back-off (1 s, doubling) still outlasts `timeout`, so
/// the timeout and not the kernel decides when to give up, but a dead upstream
/// does not cost SYNs for minutes.
fn syn_retries(timeout: Duration) -> u8 {
    let secs = timeout.as_secs_f64();
    (1u8..=6)
        .find(|&n| f64::from((1u32 << (n + 1)) - 1) >= secs)
        .unwrap_or(6)
}

fn opt_err(option: &'static str) -> impl FnOnce(io::Error) -> UpstreamError {
    move |source| UpstreamError::SockOpt { option, source }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as plain IPv4, so a v4 client named in a v6
/// header is bound on an IPv4 socket.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn opts() -> UpstreamOptions {
        UpstreamOptions {
            mark: 0,
            connect_timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn local_connect_reaches_the_target_with_nodelay() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = UpstreamAddr(l.local_addr().unwrap());
        let o = opts();
        let (up, accepted) = tokio::join!(connect(None, to, &o), l.accept());
        let mut up = up.unwrap();
        let (mut s, _) = accepted.unwrap();
        assert!(up.nodelay().unwrap());
        up.write_all(b"hi").await.unwrap();
        let mut b = [0; 2];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_error_with_a_hint() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = UpstreamAddr(l.local_addr().unwrap());
        drop(l);
        let e = connect(None, to, &opts()).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("is the service listening"), "{e}");
    }

    #[tokio::test]
    async fn family_mismatch_is_refused_before_any_socket_option() {
        let client = ClientAddr("192.0.2.1:1000".parse().unwrap());
        let to = UpstreamAddr("[::1]:443".parse().unwrap());
        let e = connect(Some(client), to, &opts()).await.unwrap_err();
        assert!(matches!(e, UpstreamError::FamilyMismatch { .. }), "{e}");
    }

    /// IP_TRANSPARENT needs CAP_NET_ADMIN and the answers need the loopback
    /// return-path routing: both are set up in a network namespace of the test's own.
    #[test]
    fn transparent_connect_binds_the_client_address() {
        crate::testing::in_netns(
            "transparent_connect_binds_the_client_address",
            |_, lock_dir| async move {
                let targets = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
                let plan = crate::routing::RoutingPlan::for_targets(100, &targets);
                let routes = crate::routing::install_with_lock_dir(&plan, &lock_dir)
                    .await
                    .unwrap();
                let o = UpstreamOptions { mark: 7, ..opts() };
                for (listen, client, seen) in [
                    ("127.0.0.1:0", "198.51.100.9:40000", "198.51.100.9:40000"),
                    (
                        "127.0.0.1:0",
                        "[::ffff:198.51.100.10]:40001",
                        "198.51.100.10:40001",
                    ),
                    ("[::1]:0", "[2001:db8::9]:40002", "[2001:db8::9]:40002"),
                    ("127.0.0.1:0", "203.0.113.5:0", "203.0.113.5:0"),
                ] {
                    let l = TcpListener::bind(listen).await.unwrap();
                    let to = UpstreamAddr(l.local_addr().unwrap());
                    let client = ClientAddr(client.parse().unwrap());
                    let (up, accepted) = tokio::join!(connect(Some(client), to, &o), l.accept());
                    let up = up.unwrap();
                    let (_, peer) = accepted.unwrap();
                    let seen: SocketAddr = seen.parse().unwrap();
                    assert_eq!(peer.ip(), seen.ip());
                    if seen.port() != 0 {
                        assert_eq!(peer.port(), seen.port());
                    }
                    assert_eq!(socket2::SockRef::from(&up).mark().unwrap(), 7);
                }
                routes.remove().await.unwrap();
            },
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let a: SocketAddr = "[::ffff:192.0.2.7]:5".parse().unwrap();
        assert_eq!(canonical(a), "192.0.2.7:5".parse::<SocketAddr>().unwrap());
        let b: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        assert_eq!(canonical(b), b);
    }

    #[test]
    fn syn_retries_cover_the_timeout() {
        assert_eq!(syn_retries(Duration::from_secs(1)), 1);
        assert_eq!(syn_retries(Duration::from_secs(5)), 2);
        assert_eq!(syn_retries(Duration::from_secs(10)), 3);
        assert_eq!(syn_retries(Duration::from_secs(3600)), 6);
    }

    #[test]
    fn bind_hint_names_the_capability() {
        let e = UpstreamError::SockOpt {
            option: "IP_TRANSPARENT",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }
}
