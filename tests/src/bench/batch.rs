//! Datagrams in batches (recvmmsg / sendmmsg): one system call serves many
//! datagrams, so the UDP generator and echo cost little per datagram next to the
//! proxy under test.
use std::io;
use std::os::fd::RawFd;

/// Room per datagram: the payloads are 64 bytes (plus a PROXY v2 header on the way
/// in), so larger ones do not occur here; a larger one would arrive truncated.
pub const DATAGRAM: usize = 2048;

const NAME_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// `n` datagram buffers with their headers and peer addresses. The headers point
/// into the boxed slices, which stay where they are when the `Batch` moves.
pub struct Batch {
    bufs: Box<[u8]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl Batch {
    pub fn new(n: usize) -> Batch {
        let mut b = Batch {
            bufs: vec![0u8; n * DATAGRAM].into_boxed_slice(),
            iovs: (0..n)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all
            // zero bytes are valid (null pointers, zero lengths).
            names: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
        };
        let bufs = b.bufs.chunks_exact_mut(DATAGRAM);
        let iovs = b.iovs.iter_mut();
        for ((buf, iov), (name, h)) in bufs
            .zip(iovs)
            .zip(b.names.iter_mut().zip(b.hdrs.iter_mut()))
        {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = DATAGRAM;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = NAME_LEN;
        }
        b
    }

    /// Receives up to `capacity` datagrams with one recvmmsg; returns how many. With
    /// MSG_WAITFORONE it waits (up to SO_RCVTIMEO) for the first one only.
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for (iov, h) in self.iovs.iter_mut().zip(self.hdrs.iter_mut()) {
            iov.iov_len = DATAGRAM;
            h.msg_hdr.msg_namelen = NAME_LEN;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        loop {
            // SAFETY: every header points at its own buffer (DATAGRAM bytes) and its
            // own sockaddr_storage, all owned by self and alive for the call; the
            // count is the length of `hdrs`.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends the first `n` received datagrams back to where each came from.
    pub fn echo(&mut self, fd: RawFd, n: usize) {
        for (iov, h) in self.iovs.iter_mut().zip(self.hdrs.iter()).take(n) {
            iov.iov_len = (h.msg_len as usize).min(DATAGRAM);
        }
        self.send_from(fd, 0, n.min(self.hdrs.len()));
    }

    /// Sends `n` copies of `datagram` with one sendmmsg on the connected socket `fd`,
    /// each marked by `stamp`; returns how many the kernel took.
    pub fn send_copies(
        &mut self,
        fd: RawFd,
        datagram: &[u8],
        n: usize,
        mut stamp: impl FnMut(&mut [u8]),
    ) -> usize {
        let n = n.min(self.hdrs.len());
        let len = datagram.len().min(DATAGRAM);
        let msgs = self.iovs.iter_mut().zip(self.hdrs.iter_mut());
        for (buf, (iov, h)) in self.bufs.chunks_exact_mut(DATAGRAM).zip(msgs).take(n) {
            let copy = buf.get_mut(..len).unwrap_or_default();
            copy.copy_from_slice(datagram.get(..len).unwrap_or_default());
            stamp(copy);
            iov.iov_len = len;
            // Connected: no destination; recv sets the name length again.
            h.msg_hdr.msg_namelen = 0;
        }
        self.send_from(fd, 0, n)
    }

    /// sendmmsg of headers `from..to`, again after a partial send; a datagram the
    /// kernel refuses is skipped (counted as not sent). Returns how many went out.
    fn send_from(&mut self, fd: RawFd, mut from: usize, to: usize) -> usize {
        let mut sent = 0;
        while from < to {
            let Some(rest) = self.hdrs.get_mut(from..to) else {
                break;
            };
            // SAFETY: the headers `from..to` point at buffers and addresses owned by
            // self and alive for the call; the count is the length of that slice.
            let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            if n > 0 {
                from += n as usize;
                sent += n as usize;
            } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                from += 1;
            }
        }
        sent
    }
}
