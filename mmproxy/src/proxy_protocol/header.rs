//! The decoded header: plain values borrowed from the input buffer.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use super::tlv::Tlvs;
use crate::addr::{ClientAddr, OrigDstAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// The connection was made by the proxy itself (health check): use the real endpoints.
    Local,
    Proxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

impl Family {
    /// Size of the address block this family puts in front of the TLVs.
    pub const fn block_len(self) -> usize {
        match self {
            Family::Unspec => 0,
            Family::Inet => 12,
            Family::Inet6 => 36,
            Family::Unix => 216,
        }
    }

    pub(crate) const fn nibble(self) -> u8 {
        match self {
            Family::Unspec => 0,
            Family::Inet => 1,
            Family::Inet6 => 2,
            Family::Unix => 3,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Unspec => "UNSPEC",
            Family::Inet => "INET",
            Family::Inet6 => "INET6",
            Family::Unix => "UNIX",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Unspec,
    Stream,
    Dgram,
}

impl Transport {
    pub(crate) const fn nibble(self) -> u8 {
        match self {
            Transport::Unspec => 0,
            Transport::Stream => 1,
            Transport::Dgram => 2,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Unspec => "UNSPEC",
            Transport::Stream => "STREAM",
            Transport::Dgram => "DGRAM",
        })
    }
}

/// One side of a v2 UNIX address block: 108 bytes, the path NUL-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixAddr<'a>(&'a [u8]);

impl<'a> UnixAddr<'a> {
    pub(crate) fn new(raw: &'a [u8]) -> Self {
        UnixAddr(raw)
    }

    /// All 108 bytes as sent.
    pub fn raw(&self) -> &'a [u8] {
        self.0
    }

    /// The path up to its first NUL (abstract sockets start with NUL and so come out empty;
    /// use [`UnixAddr::raw`] for those).
    pub fn path(&self) -> &'a [u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        self.0.get(..end).unwrap_or(self.0)
    }
}

/// The addresses a header carries, as sent; [`Header::endpoints`] says whether to use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addresses<'a> {
    /// v1 UNKNOWN, v2 UNSPEC, or v2 LOCAL with an empty body.
    None,
    Inet {
        source: SocketAddrV4,
        destination: SocketAddrV4,
    },
    Inet6 {
        source: SocketAddrV6,
        destination: SocketAddrV6,
    },
    Unix {
        source: UnixAddr<'a>,
        destination: UnixAddr<'a>,
    },
}

/// What the connection or datagram should be treated as coming from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoints {
    Proxied {
        client: ClientAddr,
        destination: OrigDstAddr,
    },
    /// Use the real endpoints of the connection: LOCAL, v1 UNKNOWN, UNSPEC family or
    /// transport, UNIX, or a LOCAL that happens to carry addresses.
    Local,
}

/// A complete, validated header. Borrowed from the decode buffer; copy out what you need
/// before reusing the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub version: Version,
    pub command: Command,
    pub family: Family,
    pub transport: Transport,
    pub addresses: Addresses<'a>,
    /// Always empty for v1.
    pub tlvs: Tlvs<'a>,
}

impl Header<'_> {
    /// Only PROXY over INET/INET6 with a STREAM or DGRAM transport names a client;
    /// everything else valid falls back to the real endpoints, as the spec allows.
    pub fn endpoints(&self) -> Endpoints {
        if self.command != Command::Proxy || self.transport == Transport::Unspec {
            return Endpoints::Local;
        }
        let (client, destination) = match self.addresses {
            Addresses::Inet {
                source,
                destination,
            } => (SocketAddr::V4(source), SocketAddr::V4(destination)),
            Addresses::Inet6 {
                source,
                destination,
            } => (SocketAddr::V6(source), SocketAddr::V6(destination)),
            Addresses::None | Addresses::Unix { .. } => return Endpoints::Local,
        };
        Endpoints::Proxied {
            client: ClientAddr(client),
            destination: OrigDstAddr(destination),
        }
    }
}
