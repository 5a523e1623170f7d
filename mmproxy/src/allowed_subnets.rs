//! `--allowed-subnets`: which load balancers may talk to mmproxy.
//!
//! # File format
//! One subnet per line, IPv4 or IPv6, in CIDR notation (`10.0.0.0/8`,
//! `2001:db8::/32`) or as a bare address (`192.0.2.7` = `/32`, `2001:db8::7` =
//! `/128`). Blank lines and `#` comments (whole-line or after an entry) are
//! ignored, surrounding whitespace is trimmed, CRLF line ends are fine.
//!
//! An entry with host bits set (`10.1.2.3/8`) is accepted as its network
//! (`10.0.0.0/8`) with a warning, as go-mmproxy's `net.ParseCIDR` does silently.
//! Anything else that is not a subnet stops loading with an error naming the
//! file, the line number and the text: a typo in an access list must not quietly
//! turn into a narrower or wider list.
//!
//! IPv4-mapped IPv6 entries (`::ffff:192.0.2.0/120`) are stored as the IPv4
//! subnet they denote, and IPv4-mapped peer addresses (a dual-stack listener
//! on `[::]` reports IPv4 peers as `::ffff:a.b.c.d`) are checked as IPv4, so one
//! IPv4 entry covers both ways an IPv4 balancer can show up. The kernel-side
//! tries are built from [`AllowList::v4`] / [`AllowList::v6`] and see the same set.
//!
//! # An empty file allows nobody
//! A file that exists but has no entries yields an empty list that refuses
//! every connection (with a warning). Only the absence of `--allowed-subnets`
//! means "everyone", as in go-mmproxy: access is never widened because a file
//! came out empty (truncated by a failed deploy, all lines commented out…).
//!
//! # Lookup
//! Entries are merged into sorted, non-overlapping, non-adjacent address ranges
//! per family; a lookup is one binary search, so 10k+ entries cost ~15
//! comparisons per accepted connection.
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use ipnet::{Ipv4Net, Ipv4Subnets, Ipv6Net, Ipv6Subnets};

/// Why a file could not become an allow-list.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    /// The file could not be opened or read.
    #[error("allowed-subnets {}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line is neither blank, a comment nor a subnet.
    #[error("allowed-subnets {}:{line}: {text:?} is not a subnet: {reason}", path.display())]
    BadLine {
        path: PathBuf,
        /// 1-based, as editors count.
        line: usize,
        /// The entry as written, comment and surrounding whitespace removed.
        text: String,
        reason: String,
    },
}

/// A parsed file: the list, and warnings the caller should log (one line each).
#[derive(Debug)]
pub struct Loaded {
    pub list: AllowList,
    pub warnings: Vec<String>,
}

/// An immutable set of allowed subnets, both families.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Sorted, disjoint and non-adjacent inclusive ranges.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    /// Entries as read from the file (after host-bit truncation), for `len()`.
    entries: usize,
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 20k ranges in a debug line help nobody; the counts do.
        f.debug_struct("AllowList")
            .field("entries", &self.entries)
            .field("v4_ranges", &self.v4.len())
            .field("v6_ranges", &self.v6.len())
            .finish()
    }
}

impl AllowList {
    /// Reads and parses `path`. See the module docs for the format.
    pub fn load(path: &Path) -> Result<Loaded, AllowListError> {
        // Bytes, not a String: a stray non-UTF-8 byte should be reported at its
        // line like any other bad entry, not as an unreadable file.
        let bytes = std::fs::read(path).map_err(|source| AllowListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_bytes(&bytes, path)
    }

    /// Parses the text of a file; `origin` only names it in errors and warnings.
    pub fn parse(text: &str, origin: &Path) -> Result<Loaded, AllowListError> {
        parse_bytes(text.as_bytes(), origin)
    }

    /// Parses a file's bytes as [`AllowList::load`] does (a line that is not UTF-8 is
    /// a bad line); the fuzz target's entry point.
    pub fn parse_bytes(bytes: &[u8], origin: &Path) -> Result<Loaded, AllowListError> {
        parse_bytes(bytes, origin)
    }

    /// Builds a list from networks directly (host bits are ignored).
    pub fn from_nets<I>(nets: I) -> Self
    where
        I: IntoIterator<Item = ipnet::IpNet>,
    {
        let mut b = Builder::default();
        for net in nets {
            b.push(net.trunc());
        }
        b.finish()
    }

    /// Whether `ip` falls in an allowed subnet. IPv4-mapped IPv6 addresses are
    /// checked as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => in_ranges(&self.v4, u32::from(v4)),
                None => in_ranges(&self.v6, u128::from(a)),
            },
        }
    }

    /// The IPv4 part as the fewest CIDR networks covering exactly the same
    /// addresses (what an LPM trie should be filled with).
    pub fn v4(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.v4
            .iter()
            .flat_map(|&(s, e)| Ipv4Subnets::new(Ipv4Addr::from(s), Ipv4Addr::from(e), 0))
    }

    /// The IPv6 part, as for [`AllowList::v4`].
    pub fn v6(&self) -> impl Iterator<Item = Ipv6Net> + '_ {
        self.v6
            .iter()
            .flat_map(|&(s, e)| Ipv6Subnets::new(Ipv6Addr::from(s), Ipv6Addr::from(e), 0))
    }

    /// Number of entries the list was built from (duplicates and overlaps
    /// included: this is what the operator wrote).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// No entries: every address is refused.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // First range starting after x; the one before it is the only candidate.
    let i = ranges.partition_point(|&(start, _)| start <= x);
    i.checked_sub(1)
        .and_then(|before| ranges.get(before))
        .is_some_and(|&(_, end)| end >= x)
}

#[derive(Default)]
struct Builder {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    entries: usize,
}

impl Builder {
    fn push(&mut self, net: ipnet::IpNet) {
        self.entries += 1;
        match net {
            ipnet::IpNet::V4(n) => self
                .v4
                .push((u32::from(n.network()), u32::from(n.broadcast()))),
            ipnet::IpNet::V6(n) => match mapped_v4_net(n) {
                Some(n) => self
                    .v4
                    .push((u32::from(n.network()), u32::from(n.broadcast()))),
                None => self
                    .v6
                    .push((u128::from(n.network()), u128::from(n.broadcast()))),
            },
        }
    }

    fn finish(mut self) -> AllowList {
        AllowList {
            v4: merge(std::mem::take(&mut self.v4), |e| e.checked_add(1)),
            v6: merge(std::mem::take(&mut self.v6), |e| e.checked_add(1)),
            entries: self.entries,
        }
    }
}

/// Sorts and merges overlapping or touching ranges so that a binary search on
/// the start finds the only range that can hold an address.
fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>, succ: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        if let Some(last) = out.last_mut() {
            // `None` from succ: the last range already ends at the top address.
            let touches = succ(last.1).is_none_or(|next| start <= next);
            if touches {
                last.1 = last.1.max(end);
                continue;
            }
        }
        out.push((start, end));
    }
    out.shrink_to_fit();
    out
}

/// `::ffff:a.b.c.d/96+n` is the IPv4 subnet `a.b.c.d/n`.
fn mapped_v4_net(n: Ipv6Net) -> Option<Ipv4Net> {
    let v4 = n.network().to_ipv4_mapped()?;
    let len = n.prefix_len().checked_sub(96)?;
    Ipv4Net::new(v4, len).ok()
}

fn parse_bytes(bytes: &[u8], origin: &Path) -> Result<Loaded, AllowListError> {
    let mut b = Builder::default();
    let mut warnings = Vec::new();
    for (idx, raw) in bytes.split(|&c| c == b'\n').enumerate() {
        let line = idx + 1;
        let bad = |text: &str, reason: String| AllowListError::BadLine {
            path: origin.to_path_buf(),
            line,
            text: text.to_owned(),
            reason,
        };
        let raw = match std::str::from_utf8(raw) {
            Ok(s) => s,
            Err(_) => {
                let lossy = String::from_utf8_lossy(raw);
                return Err(bad(lossy.trim(), "the line is not valid UTF-8".into()));
            }
        };
        let entry = match raw.split_once('#') {
            Some((before, _comment)) => before,
            None => raw,
        }
        .trim();
        if entry.is_empty() {
            continue;
        }
        let (net, had_host_bits) = parse_entry(entry).map_err(|reason| bad(entry, reason))?;
        if had_host_bits {
            warnings.push(format!(
                "allowed-subnets {}:{line}: {entry:?} has host bits set; using {net}",
                origin.display()
            ));
        }
        b.push(net);
    }
    if b.entries == 0 {
        warnings.push(format!(
            "allowed-subnets {}: no subnets listed; every proxy will be refused",
            origin.display()
        ));
    }
    Ok(Loaded {
        list: b.finish(),
        warnings,
    })
}

/// One entry → its network and whether host bits had to be cleared. The error
/// is the reason, completed into a full message by the caller.
fn parse_entry(entry: &str) -> Result<(ipnet::IpNet, bool), String> {
    if entry.contains(char::is_whitespace) {
        return Err("one subnet per line, without spaces inside it".into());
    }
    let (addr_text, len_text) = match entry.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (entry, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| format!("{addr_text:?} is not an IP address"))?;
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let len = match len_text {
        None => max,
        Some(l) => {
            // Digits only: `u8::from_str` would take "+8".
            if l.is_empty() || !l.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("prefix length {l:?} is not a number"));
            }
            match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length {l} is over {max}")),
            }
        }
    };
    let net = ipnet::IpNet::new(addr, len).map_err(|e| e.to_string())?;
    let trunc = net.trunc();
    Ok((trunc, trunc.addr() != net.addr()))
}

/// The allow-list in force, read on every accept and swapped on SIGHUP.
///
/// Reads are lock-free (`arc-swap`): a reload never stalls the accept loops,
/// and each check sees either the whole old list or the whole new one.
/// `None` inside means no `--allowed-subnets` was given: everyone is allowed,
/// as in go-mmproxy.
#[derive(Debug, Default)]
pub struct SharedAllowList {
    inner: ArcSwapOption<AllowList>,
}

impl SharedAllowList {
    /// `None`: no file was given, every peer is allowed.
    pub fn new(list: Option<AllowList>) -> Self {
        Self {
            inner: ArcSwapOption::from(list.map(Arc::new)),
        }
    }

    /// Loads `path` if given; `None` allows everyone. Warnings are returned for
    /// the caller to log.
    pub fn from_file(path: Option<&Path>) -> Result<(Self, Vec<String>), AllowListError> {
        match path {
            None => Ok((Self::new(None), Vec::new())),
            Some(p) => {
                let Loaded { list, warnings } = AllowList::load(p)?;
                Ok((Self::new(Some(list)), warnings))
            }
        }
    }

    /// Whether a peer (the load balancer, not the PROXY header's client) may
    /// connect.
    pub fn allows(&self, ip: IpAddr) -> bool {
        match &*self.inner.load() {
            None => true,
            Some(list) => list.contains(ip),
        }
    }

    /// Installs `list` (`None`: allow everyone) for every later check.
    pub fn replace(&self, list: Option<AllowList>) {
        self.inner.store(list.map(Arc::new));
    }

    /// The list in force (`None`: everyone allowed), e.g. to refill the
    /// kernel-side tries after a reload.
    pub fn current(&self) -> Option<Arc<AllowList>> {
        self.inner.load_full()
    }

    /// Re-reads `path` and installs it. On any error the old list stays in
    /// force and the error says why. Ok: (number of entries, warnings).
    pub fn reload(&self, path: &Path) -> Result<(usize, Vec<String>), AllowListError> {
        let Loaded { list, warnings } = AllowList::load(path)?;
        let n = list.len();
        self.replace(Some(list));
        Ok((n, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p() -> &'static Path {
        Path::new("./p.txt")
    }

    fn parse_ok(text: &str) -> Loaded {
        match AllowList::parse(text, p()) {
            Ok(l) => l,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn err_of(text: &str) -> String {
        match AllowList::parse(text, p()) {
            Ok(l) => panic!("{text:?} was accepted: {l:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let l = parse_ok(
            "# proxies\n\n   \n  10.0.0.0/8  \n\t192.0.2.7 # one host\r\n2001:db8::/32#dc\n   # indented comment\n",
        );
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.list.len(), 3);
        assert!(l.list.contains(ip("10.255.1.2")));
        assert!(l.list.contains(ip("192.0.2.7")));
        assert!(!l.list.contains(ip("192.0.2.8")));
        assert!(l.list.contains(ip("2001:db8:ffff::1")));
        assert!(!l.list.contains(ip("2001:db9::1")));
        assert!(!l.list.contains(ip("11.0.0.0")));
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        let l = parse_ok("198.51.100.1\n2001:db8::1\n").list;
        assert_eq!(
            l.v4().collect::<Vec<_>>(),
            vec!["198.51.100.1/32".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(
            l.v6().collect::<Vec<_>>(),
            vec!["2001:db8::1/128".parse::<Ipv6Net>().unwrap()]
        );
        assert!(!l.contains(ip("198.51.100.2")));
        assert!(!l.contains(ip("2001:db8::2")));
    }

    #[test]
    fn host_bits_are_truncated_with_a_warning() {
        let l = parse_ok("\n10.1.2.3/8\n2001:db8::1/32\n");
        assert_eq!(l.warnings.len(), 2);
        assert_eq!(
            l.warnings[0],
            "allowed-subnets ./p.txt:2: \"10.1.2.3/8\" has host bits set; using 10.0.0.0/8"
        );
        assert!(l.warnings[1].contains(":3:"), "{}", l.warnings[1]);
        assert!(
            l.warnings[1].contains("using 2001:db8::/32"),
            "{}",
            l.warnings[1]
        );
        assert!(l.list.contains(ip("10.200.0.1")));
        assert!(l.list.contains(ip("2001:db8:1::")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_checked_as_ipv4() {
        let l = parse_ok("192.0.2.0/24\n").list;
        assert!(l.contains(ip("::ffff:192.0.2.10")));
        assert!(!l.contains(ip("::ffff:198.51.100.10")));
        // The IPv4-compatible (deprecated) form is a plain IPv6 address.
        assert!(!l.contains(ip("::192.0.2.10")));
    }

    #[test]
    fn ipv4_mapped_entries_are_stored_as_ipv4() {
        let l = parse_ok("::ffff:192.0.2.0/120\n").list;
        assert!(l.contains(ip("192.0.2.99")));
        assert!(l.contains(ip("::ffff:192.0.2.99")));
        assert_eq!(l.v6().count(), 0);
        assert_eq!(
            l.v4().collect::<Vec<_>>(),
            vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]
        );
    }

    #[test]
    fn bad_lines_name_file_line_and_text() {
        assert_eq!(
            err_of("# ok\n10.0.0.0/8\n\n\n\n\n10.0.0.0/33\n"),
            "allowed-subnets ./p.txt:7: \"10.0.0.0/33\" is not a subnet: prefix length 33 is over 32"
        );
        assert_eq!(
            err_of("2001:db8::/129"),
            "allowed-subnets ./p.txt:1: \"2001:db8::/129\" is not a subnet: prefix length 129 is over 128"
        );
        assert_eq!(
            err_of("10.0.0.0/8\nexample.com # dns\n"),
            "allowed-subnets ./p.txt:2: \"example.com\" is not a subnet: \"example.com\" is not an IP address"
        );
        assert_eq!(
            err_of("\n\n10.0.0.0/+8"),
            "allowed-subnets ./p.txt:3: \"10.0.0.0/+8\" is not a subnet: prefix length \"+8\" is not a number"
        );
        assert_eq!(
            err_of("10.0.0.0/"),
            "allowed-subnets ./p.txt:1: \"10.0.0.0/\" is not a subnet: prefix length \"\" is not a number"
        );
        assert_eq!(
            err_of("10.0.0.0/8 192.0.2.0/24"),
            "allowed-subnets ./p.txt:1: \"10.0.0.0/8 192.0.2.0/24\" is not a subnet: one subnet per line, without spaces inside it"
        );
        assert!(err_of("10.0.0.256/32").contains("\"10.0.0.256\" is not an IP address"));
        assert!(err_of("10.0.0.0/8/8").contains("prefix length \"8/8\" is not a number"));
        assert!(err_of("10.0.0.0/300").contains("prefix length 300 is over 32"));
        assert!(err_of("fe80::1%eth0").contains("is not an IP address"));
        assert!(err_of("/8").contains("\"\" is not an IP address"));
        assert!(err_of("10.0.0.0-10.0.0.9").contains("is not an IP address"));
    }

    #[test]
    fn non_utf8_line_is_reported_at_its_line() {
        let mut bytes = b"10.0.0.0/8\n".to_vec();
        bytes.extend_from_slice(b"192.0.2.\xff\n");
        let e = parse_bytes(&bytes, p()).unwrap_err().to_string();
        assert!(e.starts_with("allowed-subnets ./p.txt:2: "), "{e}");
        assert!(e.ends_with("not valid UTF-8"), "{e}");
    }

    #[test]
    fn bad_line_error_carries_structured_fields() {
        match AllowList::parse("a\n  b/3 # c", p()) {
            Err(AllowListError::BadLine {
                path, line, text, ..
            }) => {
                assert_eq!(path, p());
                assert_eq!(line, 1);
                assert_eq!(text, "a");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_file_allows_nobody_and_says_so() {
        for text in ["", "\n\n", "# all commented out\n# 10.0.0.0/8\n"] {
            let l = parse_ok(text);
            assert!(l.list.is_empty());
            assert_eq!(l.list.len(), 0);
            assert!(!l.list.contains(ip("10.0.0.1")));
            assert!(!l.list.contains(ip("::1")));
            assert_eq!(l.warnings.len(), 1, "{text:?}");
            assert!(l.warnings[0].contains("every proxy will be refused"));
            // Shared: an empty list is not "no list".
            let s = SharedAllowList::new(Some(l.list));
            assert!(!s.allows(ip("127.0.0.1")));
        }
    }

    #[test]
    fn unreadable_file_names_file_and_os_error() {
        let dir = tempdir();
        let missing = dir.join("nope.txt");
        let e = AllowList::load(&missing).unwrap_err();
        assert!(matches!(e, AllowListError::Read { .. }));
        // As main.rs prints it: the message, then the OS error as its cause.
        let msg = format!("{:#}", anyhow::Error::new(e));
        assert!(
            msg.starts_with(&format!(
                "allowed-subnets {}: cannot read: ",
                missing.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
        // A directory is not a file either.
        let e = AllowList::load(&dir).unwrap_err();
        assert!(matches!(e, AllowListError::Read { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlaps_adjacency_and_extremes_merge() {
        let l = parse_ok(
            "10.0.0.0/24\n10.0.1.0/24\n10.0.0.128/25\n0.0.0.0/32\n255.255.255.255\n::/128\nffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128\n",
        )
        .list;
        assert_eq!(l.len(), 7);
        assert_eq!(
            l.v4().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["0.0.0.0/32", "10.0.0.0/23", "255.255.255.255/32"]
        );
        assert!(l.contains(ip("0.0.0.0")));
        assert!(l.contains(ip("255.255.255.255")));
        assert!(l.contains(ip("10.0.1.255")));
        assert!(!l.contains(ip("10.0.2.0")));
        assert!(l.contains(ip("::")));
        assert!(l.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!l.contains(ip("::2")));

        let all = parse_ok("0.0.0.0/0\n::/0\n128.0.0.0/1\n").list;
        assert!(all.contains(ip("255.255.255.255")));
        assert!(all.contains(ip("2001:db8::1")));
        assert_eq!(all.v4().count(), 1);
    }

    #[test]
    fn shared_list_none_allows_everyone_and_reload_keeps_old_on_error() {
        let (s, w) = SharedAllowList::from_file(None).unwrap();
        assert!(w.is_empty());
        assert!(s.allows(ip("203.0.113.1")));
        assert!(s.current().is_none());

        let dir = tempdir();
        let f = dir.join("allowed.txt");
        std::fs::write(&f, "198.51.100.0/24\n").unwrap();
        let (n, w) = s.reload(&f).unwrap();
        assert_eq!((n, w.len()), (1, 0));
        assert!(s.allows(ip("198.51.100.9")));
        assert!(!s.allows(ip("203.0.113.1")));

        std::fs::write(&f, "198.51.100.0/24\n203.0.113.0/33\n").unwrap();
        let e = s.reload(&f).unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
        assert!(s.allows(ip("198.51.100.9")), "old list must stay");
        assert!(!s.allows(ip("203.0.113.1")));

        std::fs::remove_file(&f).unwrap();
        assert!(matches!(s.reload(&f), Err(AllowListError::Read { .. })));
        assert!(s.allows(ip("198.51.100.9")));

        std::fs::write(&f, "203.0.113.1/24 # host bits\n").unwrap();
        let (n, w) = s.reload(&f).unwrap();
        assert_eq!((n, w.len()), (1, 1));
        assert!(!s.allows(ip("198.51.100.9")));
        assert!(s.allows(ip("203.0.113.200")));
        assert_eq!(s.current().map(|l| l.len()), Some(1));

        s.replace(None);
        assert!(s.allows(ip("198.51.100.9")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn from_nets_matches_parse() {
        let a = AllowList::from_nets([
            "10.1.2.3/8".parse().unwrap(),
            "2001:db8::/48".parse().unwrap(),
        ]);
        let b = parse_ok("10.0.0.0/8\n2001:db8::/48\n").list;
        assert_eq!(a, b);
    }

    /// A directory of our own under the system temp dir (no extra crate).
    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "mmproxy-allowlist-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn naive(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        nets.iter().any(|n| n.contains(&ip))
    }

    fn arb_v4net() -> impl Strategy<Value = ipnet::IpNet> {
        // Short prefixes are rare so that the list is not one big range.
        (any::<u32>(), prop_oneof![1 => 0u8..8, 20 => 8u8..=32])
            .prop_map(|(a, l)| ipnet::IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap()))
    }

    fn arb_v6net() -> impl Strategy<Value = ipnet::IpNet> {
        // Clustered under one /16 so that probes actually hit entries.
        (any::<u128>(), prop_oneof![1 => 16u8..32, 20 => 32u8..=128]).prop_map(|(a, l)| {
            let a = (0x2001_0db8u128 << 96) | (a >> 32);
            ipnet::IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        /// 20k entries: the merged binary search agrees with a linear scan on
        /// every entry's edges (and one past them) and on random addresses.
        #[test]
        fn lookup_matches_naive_scan_20k(
            nets in proptest::collection::vec(prop_oneof![3 => arb_v4net(), 1 => arb_v6net()], 20_000),
            probes in proptest::collection::vec(any::<u32>(), 2_000),
            probes6 in proptest::collection::vec(any::<u128>(), 2_000),
        ) {
            let text: String = nets.iter().map(|n| format!("{n}\n")).collect();
            let l = parse_ok(&text).list;
            prop_assert_eq!(l.len(), nets.len());
            let truncated: Vec<ipnet::IpNet> = nets.iter().map(|n| n.trunc()).collect();

            let mut candidates: Vec<IpAddr> = Vec::new();
            for n in truncated.iter().step_by(7) {
                match n {
                    ipnet::IpNet::V4(n) => {
                        let (s, e) = (u32::from(n.network()), u32::from(n.broadcast()));
                        for x in [Some(s), Some(e), s.checked_sub(1), e.checked_add(1)].into_iter().flatten() {
                            candidates.push(IpAddr::V4(Ipv4Addr::from(x)));
                            candidates.push(IpAddr::V6(Ipv4Addr::from(x).to_ipv6_mapped()));
                        }
                    }
                    ipnet::IpNet::V6(n) => {
                        let (s, e) = (u128::from(n.network()), u128::from(n.broadcast()));
                        for x in [Some(s), Some(e), s.checked_sub(1), e.checked_add(1)].into_iter().flatten() {
                            candidates.push(IpAddr::V6(Ipv6Addr::from(x)));
                        }
                    }
                }
            }
            candidates.extend(probes.iter().map(|&a| IpAddr::V4(Ipv4Addr::from(a))));
            candidates.extend(probes6.iter().map(|&a| IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (a >> 32)))));
            for c in candidates {
                prop_assert_eq!(l.contains(c), naive(&truncated, c), "{}", c);
            }

            // The CIDR view covers exactly the same set.
            let rebuilt = AllowList::from_nets(l.v4().map(ipnet::IpNet::V4).chain(l.v6().map(ipnet::IpNet::V6)));
            prop_assert_eq!(&rebuilt.v4, &l.v4);
            prop_assert_eq!(&rebuilt.v6, &l.v6);
        }
    }
}
