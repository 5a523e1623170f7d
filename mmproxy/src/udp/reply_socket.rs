//! Where a flow's answers leave from (ARCHITECTURE.md, step 5): the listening
//! socket, naming the local address with PKTINFO, or — when the proxy sent to another
//! port of a steered range — a reply socket bound to exactly that address and port.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Weak};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use crate::logging::CONN_TARGET;
use crate::sockopt;

use super::cmsg::LocalDst;
use super::limits::LogLimit;

/// A socket that sends a range's answers from the address and port the proxy sent
/// to, when that port is not the listening socket's own. It never receives:
/// - it stays unconnected, so it cannot win the kernel's socket lookup over the
///   sk_lookup program (only connected UDP sockets are found before it runs), which
///   keeps steering the whole range to the listening socket;
/// - a classic BPF filter that accepts nothing is attached before the bind, so even a
///   datagram the normal lookup hands it (steering failed: the listener's slot is
///   empty while a daemon restarts) is dropped at once rather than queued on a
///   socket nobody reads. Without this socket that datagram would have found no
///   socket at all, so nothing is taken from anyone.
///
/// It is bound with IP_TRANSPARENT / IPV6_TRANSPARENT so that a destination routed
/// to this host without being configured on it (AnyIP, a VIP) can be the source,
/// and SO_REUSEADDR so each SO_REUSEPORT listener of a group can have its own.
/// Sends are nonblocking; a full buffer drops the answer, as the kernel would.
#[derive(Debug)]
pub(super) struct ReplySocket {
    socket: std::net::UdpSocket,
}

impl ReplySocket {
    fn bind(at: SocketAddr) -> io::Result<ReplySocket> {
        let ty = Type::DGRAM.nonblocking().cloexec();
        let socket = Socket::new(Domain::for_address(at), ty, Some(Protocol::UDP))?;
        if at.is_ipv6() {
            sockopt::set_ipv6_only(&socket)?;
        }
        sockopt::set_transparent(&socket, at.is_ipv6())?;
        sockopt::set_reuse_address(&socket)?;
        drop_all_received(&socket)?;
        socket.bind(&at.into())?;
        Ok(ReplySocket {
            socket: socket.into(),
        })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// SO_ATTACH_FILTER with the one-instruction program `ret #0`: every datagram the
/// socket would receive is dropped before it is queued.
fn drop_all_received(fd: &impl AsFd) -> io::Result<()> {
    // BPF_RET | BPF_K: return the constant k (bytes of the packet to keep), 0 = drop.
    const BPF_RET_K: u16 = 0x06;
    let mut program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // `fprog` points at `program`, alive for the call; the kernel copies the program.
    sockopt::setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

/// A listener's reply sockets by bound address: shared by every flow answering from
/// that address and port, closed when the last of them closes (the map only holds
/// weak references; dead ones are removed by the sweep).
#[derive(Debug, Default)]
pub(super) struct ReplySockets(HashMap<SocketAddr, Weak<ReplySocket>>);

impl ReplySockets {
    fn get_or_bind(&mut self, at: SocketAddr) -> io::Result<Arc<ReplySocket>> {
        if let Some(live) = self.0.get(&at).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let socket = Arc::new(ReplySocket::bind(at)?);
        self.0.insert(at, Arc::downgrade(&socket));
        Ok(socket)
    }

    pub(super) fn forget_closed(&mut self) {
        self.0.retain(|_, w| w.strong_count() > 0);
    }
}

/// Where a flow's answers leave from: the destination of the proxy's latest datagram.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// The local address, sent as PKTINFO when answering through the listening socket.
    pub(super) local: Option<LocalDst>,
    /// Set when the proxy sent to another port than the listening socket's own (a
    /// range): answers leave from this socket, bound to that address and port.
    pub(super) socket: Option<Arc<ReplySocket>>,
}

/// The destination a flow's [`Reply`] was made for, so the listener rebuilds it only
/// when a datagram arrives somewhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ReplyKey {
    pub(super) local: Option<LocalDst>,
    pub(super) orig_dst: Option<SocketAddr>,
}

/// The [`Reply`] for a datagram sent to `key`: through the listening socket when the
/// proxy sent to its own port (or the kernel did not say), else from a reply socket
/// bound to the address and port it sent to. If that socket cannot be bound (another
/// program holds the port without SO_REUSEADDR), answers still go out through the
/// listening socket, from the right address but the range's first port.
pub(super) fn reply_for(
    key: ReplyKey,
    listening_port: u16,
    replies: &mut ReplySockets,
    log: &mut LogLimit,
    now: u64,
) -> Reply {
    let socket = match key.orig_dst {
        Some(at) if at.port() != listening_port && at.port() != 0 => {
            match replies.get_or_bind(at) {
                Ok(s) => Some(s),
                Err(e) => {
                    if log.allow(now) {
                        warn!(target: CONN_TARGET, local = %at,
                              error = &e as &dyn std::error::Error,
                              "cannot bind a reply socket: answers leave from the range's first port");
                    }
                    None
                }
            }
        }
        _ => None,
    };
    Reply {
        local: key.local,
        socket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What keeps a reply socket from ever holding a datagram: the filter drops all.
    #[test]
    fn the_reply_sockets_filter_drops_everything_it_would_receive() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"before", rx.local_addr().unwrap()).unwrap();
        drop_all_received(&rx).unwrap();
        tx.send_to(b"after", rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Queued before the filter: still there. After it: never queued.
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        let e = rx.recv_from(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        // Sending is unaffected.
        tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        rx.send_to(b"out", tx.local_addr().unwrap()).unwrap();
        let (n, _) = tx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"out");
    }
}
