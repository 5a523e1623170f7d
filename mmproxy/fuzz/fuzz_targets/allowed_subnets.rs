//! The `--allowed-subnets` file parser, from arbitrary bytes. Checked: an error names
//! a line that exists; a list's CIDR view (what fills the kernel's tries) is sorted,
//! disjoint and agrees with `contains` (IPv4-mapped addresses looked up as IPv4),
//! for the networks' edges and for addresses taken from the input; and writing
//! that view back out parses to the same view.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::allowed_subnets::{AllowList, AllowListError};

fuzz_target!(|data: &[u8]| {
    let origin = Path::new("fuzz.txt");
    let list = match AllowList::parse_bytes(data, origin) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                assert!(w.starts_with("allowed-subnets fuzz.txt"), "{w}");
            }
            loaded.list
        }
        Err(e) => {
            let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
            match &e {
                AllowListError::BadLine { line, .. } => assert!((1..=lines).contains(line), "{e}"),
                AllowListError::Read { .. } => panic!("read error from bytes: {e}"),
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let v4: Vec<_> = list.v4().collect();
    let v6: Vec<_> = list.v6().collect();
    for pair in v4.windows(2) {
        assert!(pair[0].broadcast() < pair[1].network(), "{pair:?}");
    }
    for pair in v6.windows(2) {
        assert!(pair[0].broadcast() < pair[1].network(), "{pair:?}");
    }
    // The model: an IPv4-mapped IPv6 address is looked up as the IPv4 address it
    // carries (so a v6 network covering ::ffff:0:0/96 does not admit it, as in
    // go-mmproxy); every other address is in the list iff one network holds it.
    let in_view = |ip: IpAddr| match ip {
        IpAddr::V4(a) => v4.iter().any(|n| n.contains(&a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => v4.iter().any(|n| n.contains(&a)),
            None => v6.iter().any(|n| n.contains(&a)),
        },
    };
    let mut probes: Vec<IpAddr> = Vec::new();
    for n in &v4 {
        probes.extend([IpAddr::from(n.network()), n.broadcast().into()]);
    }
    for n in &v6 {
        probes.extend([IpAddr::from(n.network()), n.broadcast().into()]);
    }
    // Addresses from the input's last bytes.
    let tail = |k: usize| data.get(data.len().saturating_sub(k)..).unwrap_or_default();
    let mut a4 = [0u8; 4];
    let mut a6 = [0u8; 16];
    a4[..tail(4).len()].copy_from_slice(tail(4));
    a6[..tail(16).len()].copy_from_slice(tail(16));
    probes.extend([
        IpAddr::from(Ipv4Addr::from(a4)),
        IpAddr::from(Ipv6Addr::from(a6)),
    ]);
    for ip in probes {
        assert_eq!(list.contains(ip), in_view(ip), "{ip}");
    }
    let text: String = v4
        .iter()
        .map(ToString::to_string)
        .chain(v6.iter().map(ToString::to_string))
        .map(|n| n + "\n")
        .collect();
    match AllowList::parse(&text, origin) {
        Ok(again) => {
            assert_eq!(again.list.v4().collect::<Vec<_>>(), v4);
            assert_eq!(again.list.v6().collect::<Vec<_>>(), v6);
        }
        Err(e) => panic!("its own CIDR view does not parse: {e}\n{text}"),
    }
});
