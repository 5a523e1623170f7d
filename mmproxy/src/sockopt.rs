//! Named socket and pipe options, one function per option, each documenting why
//! mmproxy sets it.
//!
//! Every function takes any descriptor owner (`socket2::Socket`, tokio or std
//! streams and listeners, `OwnedFd`), so callers never handle raw descriptors.
//! socket2 is used where it has the option; the rest go through `libc`.
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// IP_TRANSPARENT: lets an IPv4 socket bind to the client's (non-local) address, so
/// the service sees the client rather than mmproxy. Needs CAP_NET_ADMIN.
pub fn set_ip_transparent(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_ip_transparent_v4(true)
}

/// IPV6_TRANSPARENT: the IPv6 counterpart of [`set_ip_transparent`].
pub fn set_ipv6_transparent(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_ip_transparent_v6(true)
}

/// IP_TRANSPARENT or IPV6_TRANSPARENT, whichever the socket's family needs.
pub fn set_transparent(fd: &impl AsFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_ipv6_transparent(fd)
    } else {
        set_ip_transparent(fd)
    }
}

/// IP_TRANSPARENT (IPV6_TRANSPARENT) on a listening socket (`-listen-transparent`):
/// an iptables/nft TPROXY rule only hands connections and datagrams addressed to
/// other ports or addresses to a socket that has it. Needs CAP_NET_ADMIN.
pub fn set_listen_transparent(fd: &impl AsFd, ipv6: bool) -> io::Result<()> {
    set_transparent(fd, ipv6)
}

/// IP_FREEBIND: lets a listener bind an address that is not (yet) configured, e.g. a
/// VIP that keepalived adds later.
pub fn set_freebind(fd: &impl AsFd, ipv6: bool) -> io::Result<()> {
    let sock = SockRef::from(fd);
    if ipv6 {
        sock.set_freebind_v6(true)
    } else {
        sock.set_freebind_v4(true)
    }
}

/// IP_BIND_ADDRESS_NO_PORT: when binding to an address with port 0, defer the port
/// choice to connect(), which can then reuse a port per 4-tuple instead of
/// reserving one per address (avoids exhausting ephemeral ports). Also honoured on
/// IPv6 sockets.
pub fn set_bind_address_no_port(fd: &impl AsFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// SO_MARK: tags outgoing packets so that `ip rule fwmark` policy routing can pick
/// the route for them (go-mmproxy's `--mark`). Needs CAP_NET_ADMIN.
pub fn set_mark(fd: &impl AsFd, mark: u32) -> io::Result<()> {
    SockRef::from(fd).set_mark(mark)
}

/// TCP_SYNCNT: caps SYN retransmissions so the kernel gives up on an unreachable
/// upstream in seconds rather than after the system-wide ~2 minutes.
pub fn set_tcp_syncnt(fd: &impl AsFd, retries: u8) -> io::Result<()> {
    set_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_SYNCNT,
        libc::c_int::from(retries),
    )
}

/// SO_REUSEADDR: lets a listener rebind while old connections sit in TIME_WAIT, and
/// lets transparent upstream sockets share the client's ip:port with earlier flows
/// from the same client that are still closing.
pub fn set_reuse_address(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_reuse_address(true)
}

/// SO_REUSEPORT: several listening sockets on one address, the kernel balancing
/// connections between them (`--listeners N`).
pub fn set_reuse_port(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_reuse_port(true)
}

/// IPV6_V6ONLY: keeps an `[::]` listener to IPv6 so `0.0.0.0` on the same port can
/// be bound too, and IPv4 peers never appear as IPv4-mapped addresses.
pub fn set_ipv6_only(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_only_v6(true)
}

/// TCP_NODELAY: a relay must not add Nagle's delay to small writes the endpoints
/// already chose to send.
pub fn set_nodelay(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_tcp_nodelay(true)
}

/// SO_LINGER with a zero timeout: close() then sends RST, so a peer learns that its
/// flow failed instead of seeing a clean end of stream (a truncated upload must not
/// look complete).
pub fn set_linger_zero(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_linger(Some(Duration::ZERO))
}

/// F_SETPIPE_SZ: enlarges a pipe so one splice moves more per wake-up. Returns the
/// size the kernel granted (rounded up to a power-of-two number of pages).
/// Unprivileged processes are limited by `/proc/sys/fs/pipe-max-size` and
/// `pipe-user-pages-soft`.
pub fn set_pipe_size(fd: &impl AsFd, bytes: usize) -> io::Result<usize> {
    let want =
        libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    let got = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(got).unwrap_or(bytes))
}

/// IP_PKTINFO / IPV6_RECVPKTINFO: each datagram carries the local address it was sent
/// to, which a wildcard UDP listener needs to answer from that same address.
pub fn set_recv_pktinfo(fd: &impl AsFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR: each datagram carries the address and
/// port it was sent to, which for a steered port range is not the socket's own port.
pub fn set_recv_orig_dst_addr(fd: &impl AsFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR, 1)
    }
}

/// SO_RCVBUFFORCE (allowed with CAP_NET_ADMIN, which mmproxy has anyway), else
/// SO_RCVBUF capped by net.core.rmem_max: a larger receive buffer for sockets that
/// take bursts. Best effort: the default still works.
pub fn set_large_rcvbuf(fd: &impl AsFd, bytes: usize) {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = SockRef::from(fd).set_recv_buffer_size(bytes);
    }
}

/// A nonblocking listening socket for `addr` with what TCP and UDP listeners share:
/// SO_REUSEADDR (a restart while old flows are closing must not fail to bind),
/// SO_REUSEPORT only for `--listeners` > 1 (otherwise a second mmproxy started by
/// mistake on the same port would silently share the traffic instead of failing to
/// start), and IPV6_V6ONLY for IPv6. Not bound yet: each protocol adds its own
/// options first.
pub fn listening_socket(
    addr: SocketAddr,
    ty: Type,
    protocol: Protocol,
    reuse_port: bool,
) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(protocol),
    )?;
    set_reuse_address(&socket)?;
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    if addr.is_ipv6() {
        set_ipv6_only(&socket)?;
    }
    Ok(socket)
}

/// Opens `count` sockets on `addr` (at least one) with `bind_one(addr, reuse_port)`,
/// sharing it through SO_REUSEPORT when more than one; with port 0 the first
/// socket's port is used for the rest.
pub fn bind_group<S: From<Socket>>(
    addr: SocketAddr,
    count: u16,
    bind_one: impl Fn(SocketAddr, bool) -> io::Result<Socket>,
) -> io::Result<Vec<S>> {
    let count = count.max(1);
    let mut out = Vec::with_capacity(usize::from(count));
    let mut addr = addr;
    for _ in 0..count {
        let socket = bind_one(addr, count > 1)?;
        if let Some(bound) = socket.local_addr()?.as_socket() {
            addr = bound;
        }
        out.push(S::from(socket));
    }
    Ok(out)
}

fn set_int(
    fd: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &value)
}

/// setsockopt(2) with `value` as the option's bytes. The caller names an option
/// whose kernel type is `T`.
pub fn setsockopt<T>(
    fd: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the pointer and length describe `value`, alive for the whole call; the
    // kernel only reads (copies) it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_int(fd: &impl AsFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are live for the call and len is v's size.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_fd().as_raw_fd(),
                level,
                name,
                std::ptr::from_mut(&mut v).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn unprivileged_options_take_effect() {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
        set_tcp_syncnt(&s, 2).unwrap();
        assert_eq!(get_int(&s, libc::IPPROTO_TCP, libc::TCP_SYNCNT), 2);
        set_bind_address_no_port(&s).unwrap();
        assert_eq!(
            get_int(&s, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT),
            1
        );
        set_nodelay(&s).unwrap();
        assert!(s.tcp_nodelay().unwrap());
        set_reuse_address(&s).unwrap();
        set_reuse_port(&s).unwrap();
        assert!(s.reuse_port().unwrap());
        set_ipv6_only(&s).unwrap();
        assert!(s.only_v6().unwrap());
        set_linger_zero(&s).unwrap();
        assert_eq!(s.linger().unwrap(), Some(Duration::ZERO));
    }

    #[test]
    fn pipe_size_is_granted_or_refused_cleanly() {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned these descriptors and nothing else owns them.
        let (r, _w) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        let got = set_pipe_size(&r, 128 * 1024).unwrap();
        assert!(got >= 128 * 1024);
        assert!(set_pipe_size(&r, usize::MAX).is_err());
    }
}
