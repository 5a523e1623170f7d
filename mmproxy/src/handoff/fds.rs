//! Passing descriptors over a unix stream socket (SCM_RIGHTS) and asking the kernel
//! who is at the other end (SO_PEERCRED): the two system calls the handoff needs
//! that std does not offer on stable Rust.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Descriptors per message: well under the kernel's SCM_MAX_FD (253).
pub const MAX_FDS: usize = 200;

const FD_SIZE: usize = std::mem::size_of::<libc::c_int>();

/// A control buffer for `count` descriptors, aligned for `cmsghdr`.
fn control_buffer(count: usize) -> (Vec<u64>, usize) {
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    let space = unsafe { libc::CMSG_SPACE((count * FD_SIZE) as u32) } as usize;
    (vec![0u64; space.div_ceil(8)], space)
}

/// Sends `data` (a few bytes) with `fds` attached; at most [`MAX_FDS`].
pub fn send_with_fds(socket: &impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let (mut control, space) = control_buffer(fds.len());
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one header with
        // fds.len() descriptors (CMSG_SPACE), so the first header and its data lie
        // inside the buffer; descriptors are written unaligned.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&raw const msg);
            if header.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN((fds.len() * FD_SIZE) as u32) as _;
            let out = libc::CMSG_DATA(header).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                out.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg, its iovec and its control buffer are alive for the call.
    let sent = unsafe {
        libc::sendmsg(
            socket.as_fd().as_raw_fd(),
            &raw const msg,
            libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(sent) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short handoff message",
        )),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Receives into `buf`, appending any descriptors that came with the bytes to
/// `fds` (close-on-exec). Returns the number of bytes; 0 at end of stream.
pub fn recv_with_fds(
    socket: &impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let (mut control, space) = control_buffer(MAX_FDS);
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg, its iovec and its control buffer are alive for the call.
    let got = unsafe {
        libc::recvmsg(
            socket.as_fd().as_raw_fd(),
            &raw mut msg,
            libc::MSG_CMSG_CLOEXEC,
        )
    };
    let Ok(n) = usize::try_from(got) else {
        return Err(io::Error::last_os_error());
    };
    // SAFETY: the kernel filled msg_controllen bytes of the control buffer with
    // well-formed headers; CMSG_NXTHDR never walks past msg_controllen. Each
    // SCM_RIGHTS descriptor is now ours and owned exactly once.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data_len =
                    ((*header).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
                for i in 0..data_len / FD_SIZE {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&raw const msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than expected in one handoff message",
        ));
    }
    Ok(n)
}

/// The user id and process id of the peer of a connected unix socket, as the
/// kernel recorded them at connect() or socketpair().
pub fn peer_credentials(socket: &impl AsFd) -> io::Result<(u32, i32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the pointer and length describe a live ucred for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok((cred.uid, cred.pid))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_with_their_bytes_and_still_work() {
        let (a, b) = UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let fds: Vec<BorrowedFd<'_>> = vec![udp.as_fd(); 3];
        send_with_fds(&a, b"x\n", &fds).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let n = recv_with_fds(&b, &mut buf, &mut got).unwrap();
        assert_eq!(&buf[..n], b"x\n");
        assert_eq!(got.len(), 3);
        let same = std::net::UdpSocket::from(got.remove(0));
        assert_eq!(
            same.local_addr().unwrap(),
            addr,
            "the same socket, not a copy"
        );
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = vec![a.as_fd(); MAX_FDS + 1];
        assert!(send_with_fds(&a, b"x", &fds).is_err());
    }

    #[test]
    fn the_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (uid, pid) = peer_credentials(&a).unwrap();
        assert_eq!(uid, effective_uid());
        assert_eq!(pid, std::process::id() as i32);
    }
}
