//! Header encoders for tests, load generators and demos (allocating, not hot-path).

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV6};

use super::header::{Command, Family, Transport};
use super::tlv::{self, kind};
use super::v2::{FIXED_LEN, SIGNATURE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("TLV {kind:#04x} value is {len} bytes, more than a TLV can hold (65535)")]
    TlvTooLong { kind: u8, len: usize },
    #[error("v2 header body is {0} bytes, more than the length field can hold (65535)")]
    HeaderTooLong(usize),
}

/// v1 can only say TCP4 or TCP6 for both sides, so a mixed pair goes out as TCP6 with
/// the IPv4 side IPv4-mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let widen = |s: SocketAddr| match s {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    };
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (a, b),
        _ => (widen(a), widen(b)),
    }
}

/// `PROXY TCP4|TCP6 <client> <destination> <cport> <dport>\r\n`.
pub fn encode_v1(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(super::v1::MAX_LEN);
    let (c, d) = same_family(client, destination);
    let proto = if c.is_ipv4() { "TCP4" } else { "TCP6" };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "PROXY {proto} {} {} {} {}\r\n",
        c.ip(),
        d.ip(),
        c.port(),
        d.port()
    );
    out
}

/// `PROXY UNKNOWN\r\n`.
pub fn encode_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// Builds a v2 header: pick a constructor, chain options, then [`V2Builder::build`].
///
/// ```
/// use mmproxy::proxy_protocol::{V2Builder, Transport};
/// let header = V2Builder::proxy("192.0.2.1:5000".parse().unwrap(), "198.51.100.2:53".parse().unwrap())
///     .transport(Transport::Dgram)
///     .authority("example.com")
///     .crc32c()
///     .build()
///     .unwrap();
/// assert_eq!(header.len(), 16 + 12 + (3 + 11) + (3 + 4));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2Builder {
    command: Command,
    family: Family,
    transport: Transport,
    block: Vec<u8>,
    tlvs: Vec<(u8, Vec<u8>)>,
    crc32c: bool,
}

impl V2Builder {
    /// PROXY over STREAM with INET or INET6 addresses (a mixed pair becomes INET6 with
    /// the IPv4 side mapped).
    pub fn proxy(client: SocketAddr, destination: SocketAddr) -> Self {
        Self::new(Command::Proxy, Transport::Stream).addresses(client, destination)
    }

    /// LOCAL, UNSPEC, no addresses: what a health check sends.
    pub fn local() -> Self {
        Self::new(Command::Local, Transport::Unspec)
    }

    /// Family UNSPEC with no address block, until addresses are set.
    pub fn new(command: Command, transport: Transport) -> Self {
        V2Builder {
            command,
            family: Family::Unspec,
            transport,
            block: Vec::new(),
            tlvs: Vec::new(),
            crc32c: false,
        }
    }

    pub fn command(mut self, command: Command) -> Self {
        self.command = command;
        self
    }

    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    pub fn addresses(mut self, client: SocketAddr, destination: SocketAddr) -> Self {
        self.block.clear();
        match same_family(client, destination) {
            (SocketAddr::V4(c), SocketAddr::V4(d)) => {
                self.family = Family::Inet;
                self.block.extend_from_slice(&c.ip().octets());
                self.block.extend_from_slice(&d.ip().octets());
            }
            (c, d) => {
                self.family = Family::Inet6;
                for ip in [c.ip(), d.ip()] {
                    let v6 = match ip {
                        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                        std::net::IpAddr::V6(v6) => v6,
                    };
                    self.block.extend_from_slice(&v6.octets());
                }
            }
        }
        self.block.extend_from_slice(&client.port().to_be_bytes());
        self.block
            .extend_from_slice(&destination.port().to_be_bytes());
        self
    }

    /// UNIX family; each path is NUL-padded to 108 bytes (longer ones are cut at 108).
    pub fn unix(mut self, source: &[u8], destination: &[u8]) -> Self {
        self.family = Family::Unix;
        self.block.clear();
        for path in [source, destination] {
            let mut raw = [0u8; 108];
            for (slot, b) in raw.iter_mut().zip(path) {
                *slot = *b;
            }
            self.block.extend_from_slice(&raw);
        }
        self
    }

    /// Any TLV, in the order added.
    pub fn tlv(mut self, kind: u8, value: &[u8]) -> Self {
        self.tlvs.push((kind, value.to_vec()));
        self
    }

    pub fn alpn(self, protocol: &[u8]) -> Self {
        self.tlv(kind::ALPN, protocol)
    }

    pub fn authority(self, host: &str) -> Self {
        self.tlv(kind::AUTHORITY, host.as_bytes())
    }

    pub fn unique_id(self, id: &[u8]) -> Self {
        self.tlv(kind::UNIQUE_ID, id)
    }

    pub fn netns(self, name: &str) -> Self {
        self.tlv(kind::NETNS, name.as_bytes())
    }

    /// A NOOP TLV whose value is `len` zero bytes (padding).
    pub fn noop(self, len: usize) -> Self {
        self.tlv(kind::NOOP, &vec![0; len])
    }

    /// SSL with its `client` bits, `verify` result and sub-TLVs as (type, value).
    pub fn ssl(self, client: u8, verify: u32, sub_tlvs: &[(u8, &[u8])]) -> Self {
        let mut value = vec![client];
        value.extend_from_slice(&verify.to_be_bytes());
        for (kind, v) in sub_tlvs {
            push_tlv(&mut value, *kind, v);
        }
        self.tlv(kind::SSL, &value)
    }

    /// Appends a CRC32C TLV, computed over the finished header.
    pub fn crc32c(mut self) -> Self {
        self.crc32c = true;
        self
    }

    pub fn build(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Appends the header to `out` (on error `out` is left unchanged).
    pub fn write_to(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if let Some((kind, v)) = self
            .tlvs
            .iter()
            .find(|(_, v)| v.len() > usize::from(u16::MAX))
        {
            return Err(EncodeError::TlvTooLong {
                kind: *kind,
                len: v.len(),
            });
        }
        let crc_len = if self.crc32c { 3 + 4 } else { 0 };
        let body =
            self.block.len() + self.tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>() + crc_len;
        let body16 = u16::try_from(body).map_err(|_| EncodeError::HeaderTooLong(body))?;
        let start = out.len();
        out.reserve(FIXED_LEN + body);
        out.extend_from_slice(&SIGNATURE);
        let command = match self.command {
            Command::Local => 0x20,
            Command::Proxy => 0x21,
        };
        out.push(command);
        out.push(self.family.nibble() << 4 | self.transport.nibble());
        out.extend_from_slice(&body16.to_be_bytes());
        out.extend_from_slice(&self.block);
        for (kind, v) in &self.tlvs {
            push_tlv(out, *kind, v);
        }
        if self.crc32c {
            push_tlv(out, kind::CRC32C, &[0; 4]);
            let at = out.len() - 4;
            let crc = tlv::crc32c_with_hole(out.get(start..).unwrap_or_default(), at - start);
            if let Some(slot) = out.get_mut(at..) {
                slot.copy_from_slice(&crc.to_be_bytes());
            }
        }
        Ok(())
    }
}

/// Values longer than 65535 bytes are rejected by [`V2Builder::write_to`] before this runs.
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}
