//! `sockaddr_storage` ⇄ `SocketAddr` without allocating (socket2's `SockAddr` would
//! do, but it is a separate value per call; the batches keep theirs in place).
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The address the kernel wrote into `storage` (`len` bytes of it); `None` for other
/// families or a length too short for the family.
pub fn to_std(storage: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: sockaddr_storage is at least as large and as aligned as
            // sockaddr_in, and the family says the kernel wrote one.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `storage`; returns the length to pass as `msg_namelen`.
pub fn from_std(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is at least as large and as aligned as
            // sockaddr_in; every field is written below (zeroed first for sin_zero).
            let s = unsafe { &mut *std::ptr::from_mut(storage).cast::<libc::sockaddr_in>() };
            // SAFETY: plain old data.
            *s = unsafe { std::mem::zeroed() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s = unsafe { &mut *std::ptr::from_mut(storage).cast::<libc::sockaddr_in6>() };
            // SAFETY: plain old data.
            *s = unsafe { std::mem::zeroed() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_short_lengths() {
        for a in ["192.0.2.1:53", "[2001:db8::1]:443", "[fe80::1%3]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: plain old data.
            let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = from_std(a, &mut s) as usize;
            assert_eq!(to_std(&s, len), Some(a));
            assert_eq!(to_std(&s, len - 1), None);
        }
        // SAFETY: plain old data.
        let s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(to_std(&s, size_of::<libc::sockaddr_storage>()), None);
    }
}
