//! Keeps the kernel's allowed-subnet tries equal to the daemon's allow-list.
use std::collections::BTreeSet;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::MapData;
use aya::Pod;
use ipnet::{Ipv4Net, Ipv6Net};

use super::EbpfError;

/// One family's trie plus the prefixes the daemon put in it.
pub struct SubnetTrie<K: Pod + Ord> {
    trie: LpmTrie<MapData, K, u8>,
    present: BTreeSet<(K, u8)>,
    name: &'static str,
}

impl<K: Pod + Ord> SubnetTrie<K> {
    pub fn new(trie: LpmTrie<MapData, K, u8>, name: &'static str) -> Self {
        Self {
            trie,
            present: BTreeSet::new(),
            name,
        }
    }

    /// Adds what is new before removing what is gone, so a prefix in both the old and
    /// the new list is never missing, and one in neither is never present.
    pub fn replace(&mut self, wanted: BTreeSet<(K, u8)>) -> Result<(), EbpfError> {
        for (addr, len) in wanted.difference(&self.present) {
            self.trie
                .insert(&Key::new(u32::from(*len), *addr), 1, 0)
                .map_err(|source| EbpfError::Map {
                    map: self.name,
                    source,
                })?;
        }
        for (addr, len) in self.present.difference(&wanted) {
            self.trie
                .remove(&Key::new(u32::from(*len), *addr))
                .map_err(|source| EbpfError::Map {
                    map: self.name,
                    source,
                })?;
        }
        self.present = wanted;
        Ok(())
    }
}

/// Trie keys for IPv4 networks; host bits cleared, as the trie requires.
pub fn v4_keys<'a>(nets: impl IntoIterator<Item = &'a Ipv4Net>) -> BTreeSet<([u8; 4], u8)> {
    nets.into_iter()
        .map(|n| (n.trunc().network().octets(), n.prefix_len()))
        .collect()
}

/// Trie keys for IPv6 networks; host bits cleared.
pub fn v6_keys<'a>(nets: impl IntoIterator<Item = &'a Ipv6Net>) -> BTreeSet<([u8; 16], u8)> {
    nets.into_iter()
        .map(|n| (n.trunc().network().octets(), n.prefix_len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_clear_host_bits() {
        let n: Ipv4Net = "192.0.2.77/24".parse().unwrap();
        let k = v4_keys([&n]);
        assert_eq!(
            k.into_iter().collect::<Vec<_>>(),
            vec![([192, 0, 2, 0], 24)]
        );
        let n6: Ipv6Net = "2001:db8::1/32".parse().unwrap();
        let k6 = v6_keys([&n6]);
        let (addr, len) = k6.into_iter().next().unwrap();
        assert_eq!(len, 32);
        assert_eq!(&addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert!(addr[4..].iter().all(|b| *b == 0));
    }
}
