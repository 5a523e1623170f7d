//! The TCP connection to the service (ARCHITECTURE.md, step 4): the transparent
//! socket of [`crate::transparent`] with TCP's own options, connected within
//! `--connect-timeout`.
use std::net::SocketAddr;
use std::time::Duration;

use socket2::Socket;
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::{ClientAddr, UpstreamAddr};
use crate::ebpf::FlowProtocol;
use crate::sockopt;
use crate::transparent::{self, opt_err, PortChoice, UpstreamError, UpstreamSocket};

/// How upstream connections are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// SO_MARK for transparent upstream sockets; 0 leaves the mark alone.
    pub mark: u32,
    /// Bound on the whole connect, SYN retries included.
    pub connect_timeout: Duration,
}

/// Opens the connection to `to`: from `from` (IP_TRANSPARENT) when the header named
/// a client, from the host's own address otherwise (LOCAL, UNKNOWN, UNSPEC).
///
/// The caller picks the target by the client's family ([`transparent::Targets`]); a
/// client of the other family is refused with [`UpstreamError::FamilyMismatch`].
pub async fn connect(
    from: Option<ClientAddr>,
    to: UpstreamAddr,
    opts: &ConnectOptions,
) -> Result<TcpStream, UpstreamError> {
    let socket = open_socket(from, to, opts, PortChoice::AtConnect)?;
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
    opts: &ConnectOptions,
    on_bound: impl FnOnce(SocketAddr) -> T,
) -> Result<(TcpStream, Option<T>), UpstreamError> {
    let Some(client) = from else {
        return Ok((connect(None, to, opts).await?, None));
    };
    let socket = open_socket(Some(client), to, opts, PortChoice::AtBind)?;
    let bound = on_bound(transparent::bound_addr(&socket, client));
    Ok((finish(socket, to, opts).await?, Some(bound)))
}

fn open_socket(
    from: Option<ClientAddr>,
    to: UpstreamAddr,
    opts: &ConnectOptions,
    port: PortChoice,
) -> Result<Socket, UpstreamError> {
    let upstream = UpstreamSocket {
        protocol: FlowProtocol::Tcp,
        mark: opts.mark,
    };
    upstream.open(from, to, port, |socket| {
        sockopt::set_nodelay(socket).map_err(opt_err("TCP_NODELAY"))?;
        sockopt::set_tcp_syncnt(socket, syn_retries(opts.connect_timeout))
            .map_err(opt_err("TCP_SYNCNT"))
    })
}

async fn finish(
    socket: Socket,
    to: UpstreamAddr,
    opts: &ConnectOptions,
) -> Result<TcpStream, UpstreamError> {
    let to = UpstreamAddr(crate::addr::canonical(to.0));
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

/// The fewest SYN retries whose back-off (1 s, doubling) still outlasts `timeout`, so
/// the timeout and not the kernel decides when to give up, but a dead upstream
/// does not cost SYNs for minutes.
fn syn_retries(timeout: Duration) -> u8 {
    let secs = timeout.as_secs_f64();
    (1u8..=6)
        .find(|&n| f64::from((1u32 << (n + 1)) - 1) >= secs)
        .unwrap_or(6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn opts() -> ConnectOptions {
        ConnectOptions {
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
                let o = ConnectOptions { mark: 7, ..opts() };
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
    fn syn_retries_cover_the_timeout() {
        assert_eq!(syn_retries(Duration::from_secs(1)), 1);
        assert_eq!(syn_retries(Duration::from_secs(5)), 2);
        assert_eq!(syn_retries(Duration::from_secs(10)), 3);
        assert_eq!(syn_retries(Duration::from_secs(3600)), 6);
    }
}
