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
///
/// Consecutive datagrams to the same address, from the same source, of the same size
/// (the last of a run may be shorter) share one message with a UDP_SEGMENT control
/// message (UDP GSO, Linux >= 4.18): they cross the stack as one packet and are cut
/// into datagrams at the device or at the receiving socket, so a burst of a flow
/// costs one route lookup and one trip through the stack instead of one per datagram.
pub struct SendBatch {
    names: Box<[libc::sockaddr_storage]>,
    control: Box<[Control]>,
    /// One per datagram: a message's iovecs are consecutive here.
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Datagrams in each message.
    segments: Box<[u16]>,
    /// Cleared for good when the kernel refuses a segmented send (a route through a
    /// device without checksum offload, an IPsec policy, an older kernel).
    gso: bool,
}

// SAFETY: as for RecvBatch; the payload pointers are only set by `Outgoing`, whose
// lifetime ties them to the borrowed payloads, and are cleared when it ends.
unsafe impl Send for SendBatch {}

/// Datagrams per segmented message (the kernel's limit is 64 before Linux 6.x).
const MAX_SEGMENTS: u16 = 64;
/// Largest datagram that is coalesced: segments must fit the path MTU or the send
/// fails (EINVAL), and 1232 bytes fit any IPv6 path (1280 minus headers) and any
/// IPv4 path of a normal MTU.
const MAX_SEGMENT_SIZE: usize = 1232;
/// Payload of one segmented message (an IP packet's limit, with room for headers).
const MAX_SEGMENTED_BYTES: usize = 65_000;

/// What a flush achieved, in datagrams.
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
            segments: vec![0; count].into_boxed_slice(),
            gso: true,
        }
    }

    /// Starts a batch whose payloads borrow `'d` data: the borrow checker then keeps
    /// the payloads alive until the batch is flushed or dropped.
    pub fn start<'d>(&mut self) -> Outgoing<'_, 'd> {
        Outgoing {
            batch: self,
            len: 0,
            datagrams: 0,
            open: None,
            _data: PhantomData,
        }
    }

    #[cfg(test)]
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }
}

/// The last message of a batch while more datagrams may join it.
#[derive(Clone, Copy)]
struct OpenRun {
    to: SocketAddr,
    from: Option<LocalDst>,
    size: usize,
    bytes: usize,
    /// Bytes of control data before the UDP_SEGMENT message is added.
    control_len: usize,
}

/// Datagrams queued for one socket.
pub struct Outgoing<'b, 'd> {
    batch: &'b mut SendBatch,
    /// Messages queued.
    len: usize,
    /// Datagrams queued (iovecs used).
    datagrams: usize,
    open: Option<OpenRun>,
    _data: PhantomData<&'d [u8]>,
}

impl<'d> Outgoing<'_, 'd> {
    pub fn is_empty(&self) -> bool {
        self.datagrams == 0
    }

    pub fn is_full(&self) -> bool {
        self.datagrams >= self.batch.iovs.len()
    }

    /// Messages the queued datagrams take (fewer when runs are segmented).
    #[cfg(test)]
    pub fn messages(&self) -> usize {
        self.len
    }

    /// Queues `data` for `to`, leaving from `from` when given (PKTINFO). False when the
    /// batch is full (flush first).
    pub fn push(&mut self, to: SocketAddr, from: Option<&LocalDst>, data: &'d [u8]) -> bool {
        if self.is_full() {
            return false;
        }
        if self.join(to, from, data) {
            return true;
        }
        let i = self.len;
        let j = self.datagrams;
        let b = &mut *self.batch;
        let (Some(hdr), Some(iov), Some(name), Some(control), Some(segments)) = (
            b.hdrs.get_mut(i),
            b.iovs.get_mut(j),
            b.names.get_mut(i),
            b.control.get_mut(i),
            b.segments.get_mut(i),
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
        *segments = 1;
        self.open =
            (b.gso && !data.is_empty() && data.len() <= MAX_SEGMENT_SIZE).then_some(OpenRun {
                to,
                from: from.copied(),
                size: data.len(),
                bytes: data.len(),
                control_len: controllen,
            });
        self.len += 1;
        self.datagrams += 1;
        true
    }

    /// Adds `data` to the last message as one more segment, if it can be.
    fn join(&mut self, to: SocketAddr, from: Option<&LocalDst>, data: &'d [u8]) -> bool {
        let Some(run) = self.open else {
            return false;
        };
        let Some(last) = self.len.checked_sub(1) else {
            return false;
        };
        let b = &mut *self.batch;
        let (Some(hdr), Some(iov), Some(control), Some(segments)) = (
            b.hdrs.get_mut(last),
            b.iovs.get_mut(self.datagrams),
            b.control.get_mut(last),
            b.segments.get_mut(last),
        ) else {
            return false;
        };
        if run.to != to
            || run.from.as_ref() != from
            || data.is_empty()
            || data.len() > run.size
            || *segments >= MAX_SEGMENTS
            || run.bytes + data.len() > MAX_SEGMENTED_BYTES
        {
            return false;
        }
        if *segments == 1 {
            let Ok(size) = u16::try_from(run.size) else {
                return false;
            };
            let Some(room) = control.0.get_mut(run.control_len..) else {
                return false;
            };
            let added = cmsg::write_udp_segment(room, size);
            if added == 0 {
                return false;
            }
            hdr.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = (run.control_len + added) as _;
        }
        iov.iov_base = data.as_ptr().cast_mut().cast();
        iov.iov_len = data.len();
        hdr.msg_hdr.msg_iovlen += 1;
        *segments += 1;
        self.datagrams += 1;
        // A shorter datagram can only be the last of a run.
        self.open = (data.len() == run.size).then_some(OpenRun {
            bytes: run.bytes + data.len(),
            ..run
        });
        true
    }

    /// Sends everything queued on the nonblocking socket `fd`, in as few sendmmsg
    /// calls as the kernel allows. A datagram the kernel refuses is skipped and
    /// counted; when the socket buffer is full (WouldBlock) the rest are dropped, as
    /// the kernel itself drops datagrams it has no room for: UDP senders retry.
    pub fn flush(&mut self, fd: RawFd) -> Sent {
        let mut out = Sent::default();
        let mut at = 0;
        let datagrams_in = |b: &SendBatch, from: usize, to: usize| -> usize {
            b.segments
                .get(from..to)
                .map_or(0, |s| s.iter().map(|&n| usize::from(n)).sum())
        };
        while at < self.len {
            let rest = self.batch.hdrs.get_mut(at..self.len).unwrap_or_default();
            let vlen = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
            // SAFETY: headers [at, len) were filled by `push` with pointers to live
            // buffers: names, control and iovecs in the batch, payloads borrowed for 'd.
            let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), vlen, 0) };
            if n > 0 {
                let n = usize::try_from(n).unwrap_or(0);
                out.sent += datagrams_in(self.batch, at, at + n);
                at += n;
                continue;
            }
            let e = io::Error::last_os_error();
            let dropped = if e.kind() == io::ErrorKind::WouldBlock || n == 0 {
                self.len - at
            } else {
                let segmented = self.batch.segments.get(at).is_some_and(|&s| s > 1);
                if segmented && refuses_gso(&e) {
                    self.batch.gso = false;
                }
                1
            };
            out.failed += datagrams_in(self.batch, at, at + dropped);
            at += dropped;
            out.error.get_or_insert(e);
        }
        self.clear();
        out
    }

    fn clear(&mut self) {
        for iov in self.batch.iovs.iter_mut().take(self.datagrams) {
            *iov = EMPTY_IOV;
        }
        self.len = 0;
        self.datagrams = 0;
        self.open = None;
    }
}

/// Errors with which the kernel refuses a UDP_SEGMENT send as such (not the
/// destination): EIO without checksum offload or under IPsec, EINVAL when a segment
/// does not fit the route's MTU, ENOPROTOOPT/EOPNOTSUPP on kernels without UDP GSO.
fn refuses_gso(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

impl Drop for Outgoing<'_, '_> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
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
    /// Receives `n` datagrams on `rx` (nonblocking), with their sources.
    fn receive(rx: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut b = RecvBatch::new(16, 2048);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n && std::time::Instant::now() < deadline {
            match b.recv(rx.as_raw_fd()) {
                Ok(k) => {
                    for i in 0..k {
                        let d = b.get(i).unwrap();
                        got.push((d.data.to_vec(), d.source.unwrap()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn runs_of_equal_datagrams_share_a_message_and_arrive_one_by_one() {
        for (gso, messages) in [(true, 3), (false, 14)] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            pktinfo_on(&rx);
            let other = UdpSocket::bind("127.0.0.1:0").unwrap();
            pktinfo_on(&other);
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (a, b) = (rx.local_addr().unwrap(), other.local_addr().unwrap());
            // Ten of 100 bytes and a shorter last one (one run), two to another
            // address (a second run), one longer one to the first (a third).
            let mut payloads: Vec<(SocketAddr, Vec<u8>)> =
                (0..10u8).map(|i| (a, vec![i; 100])).collect();
            payloads.push((a, vec![10; 40]));
            payloads.push((b, vec![11; 100]));
            payloads.push((b, vec![12; 100]));
            payloads.push((a, vec![13; 200]));
            let mut out = SendBatch::new(32);
            if !gso {
                out.disable_gso();
            }
            let mut o = out.start();
            for (to, p) in &payloads {
                assert!(o.push(*to, None, p));
            }
            assert_eq!(o.messages(), messages, "gso {gso}");
            let sent = o.flush(tx.as_raw_fd());
            assert_eq!((sent.sent, sent.failed), (14, 0), "{:?}", sent.error);
            drop(o);
            let want_a: Vec<Vec<u8>> = payloads
                .iter()
                .filter(|(to, _)| *to == a)
                .map(|(_, p)| p.clone())
                .collect();
            let got_a = receive(&rx, want_a.len());
            assert_eq!(
                got_a.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
                want_a,
                "gso {gso}: datagrams kept apart, in order"
            );
            assert!(got_a
                .iter()
                .all(|(_, src)| *src == tx.local_addr().unwrap()));
            let got_b = receive(&other, 2);
            assert_eq!(got_b.len(), 2, "gso {gso}");
        }
    }

    #[test]
    fn a_segmented_run_leaves_from_the_pktinfo_source() {
        let wild = UdpSocket::bind("0.0.0.0:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        pktinfo_on(&peer);
        let from = LocalDst {
            addr: "127.0.0.2".parse().unwrap(),
            ifindex: 0,
        };
        let payloads: Vec<[u8; 64]> = (0..5u8).map(|i| [i; 64]).collect();
        let mut out = SendBatch::new(8);
        let mut o = out.start();
        for p in &payloads {
            assert!(o.push(peer.local_addr().unwrap(), Some(&from), p));
        }
        assert_eq!(o.messages(), 1);
        assert_eq!(o.flush(wild.as_raw_fd()).sent, 5);
        drop(o);
        let got = receive(&peer, 5);
        assert_eq!(got.len(), 5);
        for (i, (d, src)) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 64]);
            assert_eq!(src.ip().to_string(), "127.0.0.2");
        }
    }

    #[test]
    fn large_datagrams_are_not_segmented() {
        let mut out = SendBatch::new(4);
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let big = vec![0u8; MAX_SEGMENT_SIZE + 1];
        let mut o = out.start();
        assert!(o.push(to, None, &big));
        assert!(o.push(to, None, &big));
        assert_eq!(o.messages(), 2);
    }
}
