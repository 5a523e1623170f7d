//! recvmmsg(2) / sendmmsg(2) with buffers allocated once: one system call moves up to a
//! batch of datagrams, and nothing is allocated per datagram.
//!
//! The `mmsghdr`/`iovec` arrays hold raw pointers into the batch's own boxed buffers.
//! They are rewritten right before every system call, so they never point anywhere
//! stale, and the boxes never move or resize while the batch lives. The kernel only
//! writes within the lengths given (`msg_namelen`, `iov_len`, `msg_controllen`) and
//! reports what it wrote; everything read back is clamped to those buffers.
use std::io;
use std::marker::PhantomData;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::cmsg::{self, LocalDst, CONTROL_LEN};
use super::sockaddr;

/// Largest datagram payload over IPv4 or IPv6 (without jumbograms), rounded up.
pub const MAX_DATAGRAM: usize = 65_536;

/// Control buffer of one message, aligned for `cmsghdr` as the kernel expects.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

fn zeroed_hdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data (integers and raw pointers); all-zero is a
    // valid value (null pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}

fn zeroed_name() -> libc::sockaddr_storage {
    // SAFETY: as above, sockaddr_storage is plain old data.
    unsafe { std::mem::zeroed() }
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// One received datagram, borrowed from the batch.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub data: &'a [u8],
    /// The sender; `None` only for an address family we do not handle.
    pub source: Option<SocketAddr>,
    /// Where the sender sent it (IP_PKTINFO / IPV6_PKTINFO), when enabled.
    pub local: Option<LocalDst>,
    /// The address and port the sender sent to (IP_ORIGDSTADDR / IPV6_ORIGDSTADDR),
    /// when enabled: another port than the socket's own when sk_lookup steered it.
    pub orig_dst: Option<SocketAddr>,
    /// The datagram did not fit the buffer (cannot happen with [`MAX_DATAGRAM`]
    /// buffers; checked rather than assumed).
    pub truncated: bool,
}

pub struct RecvBatch {
    data: Box<[u8]>,
    slot_len: usize,
    names: Box<[libc::sockaddr_storage]>,
    control: Box<[Control]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Messages filled by the last successful `recv`.
    filled: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` only ever point into this
// struct's own heap buffers, which move with it; no other thread can reach them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Room for `count` datagrams of up to `slot_len` bytes each. The payload memory
    /// is zero-initialised by the allocator lazily (calloc), so untouched slots cost
    /// address space, not resident memory.
    pub fn new(count: usize, slot_len: usize) -> Self {
        let count = count.max(1);
        RecvBatch {
            data: vec![0u8; count * slot_len].into_boxed_slice(),
            slot_len,
            names: vec![zeroed_name(); count].into_boxed_slice(),
            control: vec![Control([0; CONTROL_LEN]); count].into_boxed_slice(),
            iovs: vec![EMPTY_IOV; count].into_boxed_slice(),
            hdrs: vec![zeroed_hdr(); count].into_boxed_slice(),
            filled: 0,
        }
    }

    /// One recvmmsg(2) on the nonblocking socket `fd`: returns how many datagrams were
    /// received (at least 1), or the error (WouldBlock when none was waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.filled = 0;
        let data = self.data.as_mut_ptr();
        for (i, ((hdr, iov), (name, control))) in self
            .hdrs
            .iter_mut()
            .zip(self.iovs.iter_mut())
            .zip(self.names.iter_mut().zip(self.control.iter_mut()))
            .enumerate()
        {
            // SAFETY: i < count, so the offset stays inside `data` (count * slot_len).
            iov.iov_base = unsafe { data.add(i * self.slot_len) }.cast();
            iov.iov_len = self.slot_len;
            hdr.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = CONTROL_LEN as _;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let vlen = libc::c_uint::try_from(self.hdrs.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: every header points at live buffers of the sizes it states (set
        // just above); the kernel writes at most those sizes. The timeout is null.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.filled = usize::try_from(n).unwrap_or(0).min(self.hdrs.len());
        Ok(self.filled)
    }

    /// Datagram `i` of the last `recv` (`None` past the number received).
    pub fn get(&self, i: usize) -> Option<Received<'_>> {
        if i >= self.filled {
            return None;
        }
        let hdr = self.hdrs.get(i)?;
        let len = usize::try_from(hdr.msg_len)
            .unwrap_or(usize::MAX)
            .min(self.slot_len);
        let start = i * self.slot_len;
        let data = self.data.get(start..start + len)?;
        let namelen = usize::try_from(hdr.msg_hdr.msg_namelen).unwrap_or(0);
        let source = self.names.get(i).and_then(|n| sockaddr::to_std(n, namelen));
        // size_t on glibc, socklen_t on musl: a no-op conversion on some targets.
        #[allow(clippy::useless_conversion)]
        let controllen = usize::try_from(hdr.msg_hdr.msg_controllen)
            .unwrap_or(0)
            .min(CONTROL_LEN);
        let control = self.control.get(i).and_then(|c| c.0.get(..controllen));
        let local = control.and_then(cmsg::parse_pktinfo);
        let orig_dst = control.and_then(cmsg::parse_origdst);
        Some(Received {
            data,
            source,
            local,
            orig_dst,
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        })
    }

    /// True when the last receive took fewer datagrams than it had room for: recvmmsg
    /// stops early only at EAGAIN, so the socket's queue was empty at that moment and
    /// another call would only cost a system call to learn so.
    pub fn drained(&self) -> bool {
        self.filled < self.hdrs.len()
    }

    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }
}

/// The headers for one sendmmsg(2), reused from call to call.
pub struct SendBatch {
    names: Box<[libc::sockaddr_storage]>,
    control: Box<[Control]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: as for RecvBatch; the payload pointers are only set by `Outgoing`, whose
// lifetime ties them to the borrowed payloads, and are cleared when it ends.
unsafe impl Send for SendBatch {}

/// What a flush achieved.
#[derive(Debug, Default)]
pub struct Sent {
    pub sent: usize,
    pub failed: usize,
    /// The first error met (WouldBlock when the socket buffer was full).
    pub error: Option<io::Error>,
}

impl SendBatch {
    pub fn new(count: usize) -> Self {
        let count = count.max(1);
        SendBatch {
            names: vec![zeroed_name(); count].into_boxed_slice(),
            control: vec![Control([0; CONTROL_LEN]); count].into_boxed_slice(),
            iovs: vec![EMPTY_IOV; count].into_boxed_slice(),
            hdrs: vec![zeroed_hdr(); count].into_boxed_slice(),
        }
    }

    /// Starts a batch whose payloads borrow `'d` data: the borrow checker then keeps
    /// the payloads alive until the batch is flushed or dropped.
    pub fn start<'d>(&mut self) -> Outgoing<'_, 'd> {
        Outgoing {
            batch: self,
            len: 0,
            _data: PhantomData,
        }
    }
}

/// Datagrams queued for one socket.
pub struct Outgoing<'b, 'd> {
    batch: &'b mut SendBatch,
    len: usize,
    _data: PhantomData<&'d [u8]>,
}

impl<'d> Outgoing<'_, 'd> {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.batch.hdrs.len()
    }

    /// Queues `data` for `to`, leaving from `from` when given (PKTINFO). False when the
    /// batch is full (flush first).
    pub fn push(&mut self, to: SocketAddr, from: Option<&LocalDst>, data: &'d [u8]) -> bool {
        let i = self.len;
        let b = &mut *self.batch;
        let (Some(hdr), Some(iov), Some(name), Some(control)) = (
            b.hdrs.get_mut(i),
            b.iovs.get_mut(i),
            b.names.get_mut(i),
            b.control.get_mut(i),
        ) else {
            return false;
        };
        let namelen = sockaddr::from_std(to, name);
        // The kernel does not write through a send's iovec; the cast to *mut is what
        // the C struct requires.
        iov.iov_base = data.as_ptr().cast_mut().cast();
        iov.iov_len = data.len();
        let controllen = from.map_or(0, |f| cmsg::write_pktinfo(&mut control.0, f));
        hdr.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
        hdr.msg_hdr.msg_namelen = namelen;
        hdr.msg_hdr.msg_iov = std::ptr::from_mut(iov);
        hdr.msg_hdr.msg_iovlen = 1;
        hdr.msg_hdr.msg_control = if controllen == 0 {
            std::ptr::null_mut()
        } else {
            control.0.as_mut_ptr().cast()
        };
        hdr.msg_hdr.msg_controllen = controllen as _;
        hdr.msg_hdr.msg_flags = 0;
        hdr.msg_len = 0;
        self.len += 1;
        true
    }

    /// Sends everything queued on the nonblocking socket `fd`, in as few sendmmsg
    /// calls as the kernel allows. A datagram the kernel refuses is skipped and
    /// counted; when the socket buffer is full (WouldBlock) the rest are dropped, as
    /// the kernel itself drops datagrams it has no room for: UDP senders retry.
    pub fn flush(&mut self, fd: RawFd) -> Sent {
        let mut out = Sent::default();
        let mut at = 0;
        while at < self.len {
            let rest = self.batch.hdrs.get_mut(at..self.len).unwrap_or_default();
            let vlen = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
            // SAFETY: headers [at, len) were filled by `push` with pointers to live
            // buffers: names and control in the batch, payloads borrowed for 'd.
            let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), vlen, 0) };
            if n > 0 {
                let n = usize::try_from(n).unwrap_or(0);
                out.sent += n;
                at += n;
                continue;
            }
            let e = io::Error::last_os_error();
            let dropped = if e.kind() == io::ErrorKind::WouldBlock || n == 0 {
                self.len - at
            } else {
                1
            };
            out.failed += dropped;
            at += dropped;
            out.error.get_or_insert(e);
        }
        self.clear();
        out
    }

    fn clear(&mut self) {
        for iov in self.batch.iovs.iter_mut().take(self.len) {
            *iov = EMPTY_IOV;
        }
        self.len = 0;
    }
}

impl Drop for Outgoing<'_, '_> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn pktinfo_on(s: &UdpSocket) {
        socket2::SockRef::from(s).set_nonblocking(true).unwrap();
        let v6 = s.local_addr().unwrap().is_ipv6();
        crate::sockopt::set_recv_pktinfo(s, v6).unwrap();
        crate::sockopt::set_recv_orig_dst_addr(s, v6).unwrap();
    }

    #[test]
    fn batch_roundtrip_with_pktinfo_on_loopback() {
        for (bind, to) in [("0.0.0.0:0", "127.0.0.1"), ("[::]:0", "::1")] {
            let rx = UdpSocket::bind(bind).unwrap();
            pktinfo_on(&rx);
            let port = rx.local_addr().unwrap().port();
            let dst: SocketAddr = SocketAddr::new(to.parse().unwrap(), port);
            let tx = UdpSocket::bind(SocketAddr::new(dst.ip(), 0)).unwrap();
            let mut out = SendBatch::new(8);
            let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; usize::from(i)]).collect();
            let mut o = out.start();
            for p in &payloads {
                assert!(o.push(dst, None, p));
            }
            let sent = o.flush(tx.as_raw_fd());
            assert_eq!(sent.sent, 5, "{:?}", sent.error);
            drop(o);

            let mut b = RecvBatch::new(4, 2048);
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while got.len() < 5 && std::time::Instant::now() < deadline {
                match b.recv(rx.as_raw_fd()) {
                    Ok(n) => {
                        assert!(n <= 4);
                        for i in 0..n {
                            let d = b.get(i).unwrap();
                            assert_eq!(d.source, Some(tx.local_addr().unwrap()));
                            assert_eq!(d.local.unwrap().addr, dst.ip(), "{bind}");
                            assert_eq!(d.orig_dst, Some(dst), "{bind}");
                            assert!(!d.truncated);
                            got.push(d.data.to_vec());
                        }
                        assert!(b.get(n).is_none());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, payloads, "{bind}: order and contents kept");
        }
    }

    #[test]
    fn replies_leave_from_the_pktinfo_source() {
        // 127.0.0.2 is local on lo without configuration; a socket bound to the
        // wildcard would answer 127.0.0.1 from 127.0.0.1 unless told otherwise.
        let wild = UdpSocket::bind("0.0.0.0:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut out = SendBatch::new(2);
        let from = LocalDst {
            addr: "127.0.0.2".parse().unwrap(),
            ifindex: 0,
        };
        let mut o = out.start();
        assert!(o.push(peer.local_addr().unwrap(), Some(&from), b"hi"));
        assert_eq!(o.flush(wild.as_raw_fd()).sent, 1);
        let mut buf = [0u8; 8];
        let (n, src) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(src.ip().to_string(), "127.0.0.2");
        assert_eq!(src.port(), wild.local_addr().unwrap().port());
    }

    #[test]
    fn truncation_is_reported_and_full_batches_refuse_more() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&rx).set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 100], rx.local_addr().unwrap()).unwrap();
        let mut b = RecvBatch::new(1, 10);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let n = loop {
            match b.recv(rx.as_raw_fd()) {
                Ok(n) => break n,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, 1);
        let d = b.get(0).unwrap();
        assert!(d.truncated);
        assert_eq!(d.data.len(), 10, "clamped to the buffer");

        let mut out = SendBatch::new(1);
        let mut o = out.start();
        assert!(o.push(rx.local_addr().unwrap(), None, b"a"));
        assert!(o.is_full());
        assert!(!o.push(rx.local_addr().unwrap(), None, b"b"));
    }
}
