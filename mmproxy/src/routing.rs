//! The return path's policy routing, installed through netlink.
//!
//! The service answers the client's address (the upstream socket is bound to
//! it). Without help the host routes those answers out of its default route.
//! What brings them back to mmproxy's transparent socket:
//!
//! | when | rule | route (table T) |
//! |---|---|---|
//! | an IPv4 target on loopback | `from 127.0.0.0/8 iif lo lookup T` | `local 0.0.0.0/0 dev lo` |
//! | an IPv6 target on loopback | `from ::1/128 iif lo lookup T` | `local ::/0 dev lo` |
//! | kernel-side steering (tc marks answers) | `fwmark M lookup T`, both families | the same `local` routes |
//!
//! These are exactly go-mmproxy's documented commands; see [`install`].
//!
//! # Idempotence and who removes what
//! Existing rules and routes are matched by what they select (family, `from`,
//! `iif`, `fwmark`, table; for routes type `local`, default destination, `dev
//! lo`, table), never by priority. A match is reused and nothing is added.
//!
//! Everything mmproxy adds carries the routing protocol number
//! [`RT_PROTOCOL`] (`ip rule` shows `proto 109`; `ip route show table T` shows
//! `proto 109`), so mmproxy's own entries can be told from an operator's (a
//! go-mmproxy systemd unit's `ip rule add from 127.0.0.1/8 iif lo table 123`,
//! which has the default protocol): an operator's entries are never removed.
//!
//! Several mmproxy processes may share the routes (a TCP and a UDP instance
//! with the same table, as go-mmproxy deployments run them; or a restart after
//! SIGKILL, which finds the killed process's entries). Each process holds a
//! shared `flock` on a per-network-namespace lock file in
//! [`DEFAULT_LOCK_DIR`] while it runs; the kernel drops the lock of a killed
//! process. At exit a process that gets the lock exclusively is the last one
//! running and removes every entry tagged [`RT_PROTOCOL`] — its own and any
//! left by killed predecessors — so the namespace is back to what the operator
//! had. A process that does not get it leaves everything for the others. If
//! the lock file cannot be used, a process removes exactly what it added.
//!
//! # Rule priority
//! Rules are added without a priority, as go-mmproxy's documented commands
//! do: the kernel then places each new rule right after the `local` rule
//! (priority = first existing non-zero priority − 1, 32765 on a default
//! system), i.e. ahead of rules an operator added earlier. That is what the
//! return path needs: answers of proxied flows must not be caught by a broader
//! rule first.
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// Routing protocol number (`/etc/iproute2/rt_protos`) on every rule and route
/// mmproxy adds; not one of the numbers assigned to routing daemons.
pub const RT_PROTOCOL: u8 = 109;

/// Where the per-namespace lock files live (created if missing).
pub const DEFAULT_LOCK_DIR: &str = "/run/mmproxy";

/// How long `install` waits for another mmproxy that is removing the shared
/// routes right now (it holds the lock exclusively for a few milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(5);

const LOOPBACK: &str = "lo";

/// What to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingPlan {
    /// Table for the `local` default routes (`--route-table`).
    pub table: u32,
    /// An IPv4 target is on loopback: `from 127.0.0.0/8 iif lo lookup T`.
    pub v4_loopback: bool,
    /// An IPv6 target is on loopback: `from ::1/128 iif lo lookup T`.
    pub v6_loopback: bool,
    /// Kernel-side steering marks answers with this: `fwmark M lookup T`
    /// for both families.
    pub fwmark: Option<u32>,
}

impl RoutingPlan {
    /// Loopback rules for whichever of the targets are on loopback, no fwmark.
    pub fn for_targets(table: u32, targets: &[IpAddr]) -> Self {
        let is_v4_lo = |a: &IpAddr| match a {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        };
        let is_v6_lo = |a: &IpAddr| matches!(a, IpAddr::V6(v6) if v6.is_loopback());
        Self {
            table,
            v4_loopback: targets.iter().any(is_v4_lo),
            v6_loopback: targets.iter().any(is_v6_lo),
            fwmark: None,
        }
    }

    /// Adds the `fwmark M lookup T` rules (kernel-side steering).
    pub fn with_fwmark(mut self, mark: u32) -> Self {
        self.fwmark = Some(mark);
        self
    }

    /// Nothing to install.
    pub fn is_empty(&self) -> bool {
        self.items().is_empty()
    }

    /// The entries this plan needs, in installation order: a family's route
    /// before its rules, so that no rule points at an empty table.
    fn items(&self) -> Vec<Item> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            let loopback = match family {
                Family::V4 => self.v4_loopback,
                Family::V6 => self.v6_loopback,
            };
            if !loopback && self.fwmark.is_none() {
                continue;
            }
            out.push(Item::Route(RouteSpec {
                family,
                table: self.table,
            }));
            if loopback {
                out.push(Item::Rule(RuleSpec {
                    family,
                    selector: Selector::FromLoopback,
                    table: self.table,
                }));
            }
            if let Some(mark) = self.fwmark {
                out.push(Item::Rule(RuleSpec {
                    family,
                    selector: Selector::FwMark(mark),
                    table: self.table,
                }));
            }
        }
        out
    }
}

/// Why routing could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error(
        "{what}: operation not permitted (needs CAP_NET_ADMIN: run as root or grant the \
         capability, or pass --no-routing and set up the routes yourself)"
    )]
    PermissionDenied { what: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no loopback interface \"lo\" in this network namespace")]
    NoLoopback,
    #[error("removing return-path routing: {}", .0.join("; "))]
    Remove(Vec<String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    fn ip_cmd(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip -6",
        }
    }

    fn loopback_net(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
            Family::V6 => IpNet::V6(ipnet::Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selector {
    /// `from 127.0.0.0/8 iif lo` / `from ::1/128 iif lo`
    FromLoopback,
    /// `fwmark M`
    FwMark(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RuleSpec {
    family: Family,
    selector: Selector,
    table: u32,
}

/// `local <default> dev lo table T`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouteSpec {
    family: Family,
    table: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Rule(RuleSpec),
    Route(RouteSpec),
}

impl fmt::Display for Item {
    /// As the `ip` command that would add it, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Rule(r) => {
                write!(f, "{} rule ", r.family.ip_cmd())?;
                match r.selector {
                    Selector::FromLoopback => {
                        write!(f, "from {} iif {LOOPBACK}", r.family.loopback_net())?
                    }
                    Selector::FwMark(m) => write!(f, "fwmark {m:#x}")?,
                }
                write!(f, " lookup {}", r.table)
            }
            Item::Route(r) => {
                let dst = match r.family {
                    Family::V4 => "0.0.0.0/0",
                    Family::V6 => "::/0",
                };
                write!(
                    f,
                    "{} route local {dst} dev {LOOPBACK} table {}",
                    r.family.ip_cmd(),
                    r.table
                )
            }
        }
    }
}

fn rule_table(msg: &RuleMessage) -> u32 {
    // The kernel always sends FRA_TABLE in dumps; the header byte is the
    // fallback for tables below 256.
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn rule_is_ours(msg: &RuleMessage) -> bool {
    msg.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RT_PROTOCOL))
}

fn route_is_ours(msg: &RouteMessage) -> bool {
    u8::from(msg.header.protocol) == RT_PROTOCOL
}

/// Whether an existing rule selects exactly what `spec` does and sends it to
/// the same table. Anything extra (another selector, `not`, tos, a goto…)
/// makes it a different rule: then ours is added next to it, which is
/// harmless, whereas wrongly reusing a narrower rule would break the return
/// path.
fn rule_matches(spec: &RuleSpec, msg: &RuleMessage) -> bool {
    let h = &msg.header;
    if h.family != spec.family.af()
        || h.action != RuleAction::ToTable
        || h.dst_len != 0
        || h.tos != 0
        || h.flags.contains(RuleFlags::Invert)
        || rule_table(msg) != spec.table
    {
        return false;
    }
    let mut src: Option<IpAddr> = None;
    let mut iif: Option<&str> = None;
    let mut mark: Option<u32> = None;
    let mut mask: Option<u32> = None;
    for a in &msg.attributes {
        match a {
            RuleAttribute::Source(ip) => src = Some(*ip),
            RuleAttribute::Iifname(n) => iif = Some(n),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            // Not selectors: where it sits, who made it, which table.
            RuleAttribute::Priority(_) | RuleAttribute::Protocol(_) | RuleAttribute::Table(_) => {}
            // -1 is "not set"; some kernels dump it anyway.
            RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v)
                if *v == u32::MAX => {}
            _ => return false,
        }
    }
    let src_net = match (src, h.src_len) {
        (None, 0) => None,
        // The kernel keeps the address as written (`from 127.0.0.1/8`
        // dumps as 127.0.0.1/8 on some versions): compare networks.
        (Some(ip), len) => match IpNet::new(ip, len) {
            Ok(n) => Some(n.trunc()),
            Err(_) => return false,
        },
        (None, _) => return false,
    };
    // A mark with the full mask (the kernel's default when none is given).
    let full_mark = |m: u32| mark == Some(m) && mask.is_none_or(|k| k == u32::MAX);
    match spec.selector {
        Selector::FromLoopback => {
            src_net == Some(spec.family.loopback_net()) && iif == Some(LOOPBACK) && mark.is_none()
        }
        Selector::FwMark(m) => src_net.is_none() && iif.is_none() && full_mark(m),
    }
}

/// Whether an existing route is `local <default> dev lo` in the spec's table.
fn route_matches(spec: &RouteSpec, msg: &RouteMessage, lo_index: u32) -> bool {
    let h = &msg.header;
    if h.address_family != spec.family.af()
        || h.kind != RouteType::Local
        || h.destination_prefix_length != 0
        || h.source_prefix_length != 0
        || h.tos != 0
        || route_table(msg) != spec.table
    {
        return false;
    }
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::Encap(_)
            | RouteAttribute::EncapType(_)
            | RouteAttribute::NhId(_)
            | RouteAttribute::Iif(_)
            | RouteAttribute::Source(_) => return false,
            _ => {}
        }
    }
    oif == Some(lo_index)
}

fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = spec.family.af();
    m.header.action = RuleAction::ToTable;
    if spec.table < 256 {
        m.header.table = spec.table as u8;
    } else {
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    m.attributes.push(RuleAttribute::Table(spec.table));
    match spec.selector {
        Selector::FromLoopback => {
            let net = spec.family.loopback_net();
            m.header.src_len = net.prefix_len();
            m.attributes.push(RuleAttribute::Source(net.network()));
            m.attributes.push(RuleAttribute::Iifname(LOOPBACK.into()));
        }
        Selector::FwMark(mark) => m.attributes.push(RuleAttribute::FwMark(mark)),
    }
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RT_PROTOCOL)));
    m
}

fn route_message(spec: &RouteSpec, lo_index: u32) -> RouteMessage {
    let builder = match spec.family {
        // iproute2 gives IPv4 local routes host scope and IPv6 ones universe.
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .scope(RouteScope::Host)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .scope(RouteScope::Universe)
            .build(),
    };
    let mut m = builder;
    m.header.kind = RouteType::Local;
    m.header.protocol = RouteProtocol::from(RT_PROTOCOL);
    if spec.table < 256 {
        m.header.table = spec.table as u8;
    } else {
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    m.attributes.push(RouteAttribute::Table(spec.table));
    m.attributes.push(RouteAttribute::Oif(lo_index));
    m
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_error(what: String, source: rtnetlink::Error) -> RoutingError {
    if errno(&source) == Some(libc::EPERM) || errno(&source) == Some(libc::EACCES) {
        RoutingError::PermissionDenied { what }
    } else {
        RoutingError::Netlink { what, source }
    }
}

/// What became of one planned entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Added,
    /// Present already; `ours`: tagged by an mmproxy (a live one, or one that
    /// was killed).
    Reused {
        ours: bool,
    },
    /// Not installable here and not needed (IPv6 disabled).
    Skipped(&'static str),
}

/// The routing this process installed or found; hand it back to
/// [`InstalledRoutes::remove`] at exit.
#[derive(Debug)]
pub struct InstalledRoutes {
    table: u32,
    entries: Vec<(Item, Outcome)>,
    /// Shared flock on the namespace's lock file; `None`: no lock could be
    /// taken (then only what this process added is removed).
    lock: Option<File>,
    lock_note: Option<String>,
}

impl InstalledRoutes {
    /// One line for the info log: what was added, reused or skipped.
    pub fn describe(&self) -> String {
        let list = |pred: &dyn Fn(&Outcome) -> bool| {
            self.entries
                .iter()
                .filter(|(_, o)| pred(o))
                .map(|(i, _)| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let added = list(&|o| *o == Outcome::Added);
        if !added.is_empty() {
            parts.push(format!("added {added}"));
        }
        let reused = list(&|o| *o == Outcome::Reused { ours: false });
        if !reused.is_empty() {
            parts.push(format!("reused existing {reused}"));
        }
        let shared = list(&|o| *o == Outcome::Reused { ours: true });
        if !shared.is_empty() {
            parts.push(format!(
                "shared with another or an earlier mmproxy {shared}"
            ));
        }
        for (i, o) in &self.entries {
            if let Outcome::Skipped(why) = o {
                parts.push(format!("skipped `{i}` ({why})"));
            }
        }
        if parts.is_empty() {
            parts.push("nothing to do".into());
        }
        let mut s = format!("table {}: {}", self.table, parts.join("; "));
        if let Some(n) = &self.lock_note {
            s.push_str("; ");
            s.push_str(n);
        }
        s
    }

    /// Whether this process added anything.
    pub fn added_any(&self) -> bool {
        self.entries.iter().any(|(_, o)| *o == Outcome::Added)
    }

    /// Removes mmproxy's entries if this is the last mmproxy using them in
    /// this network namespace (see the module docs); otherwise leaves them.
    /// Never removes an entry mmproxy did not tag. Entries already gone are
    /// fine.
    pub async fn remove(self) -> Result<RemoveReport, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        let task = tokio::spawn(conn);
        let result = self.remove_with(&handle).await;
        task.abort();
        result
    }

    async fn remove_with(self, handle: &Handle) -> Result<RemoveReport, RoutingError> {
        let last = match &self.lock {
            Some(f) => try_flock(f, libc::LOCK_EX | libc::LOCK_NB).is_ok(),
            None => false,
        };
        if self.lock.is_some() && !last {
            // Another mmproxy in this namespace still relies on the entries.
            return Ok(RemoveReport {
                removed: Vec::new(),
                left_for_others: true,
            });
        }
        let lo_index = loopback_index(handle).await.unwrap_or(1);
        let mut removed = Vec::new();
        let mut failures = Vec::new();
        // Rules first: no rule may point at a table being emptied.
        for ver in [IpVersion::V4, IpVersion::V6] {
            let rules = match dump_rules(handle, ver.clone()).await {
                Ok(r) => r,
                Err(e) if is_af_unsupported(&e) => continue,
                Err(e) => {
                    failures.push(e.to_string());
                    continue;
                }
            };
            for msg in rules.into_iter().filter(rule_is_ours) {
                let wanted = if last {
                    true
                } else {
                    self.added()
                        .any(|i| matches!(i, Item::Rule(spec) if rule_matches(&spec, &msg)))
                };
                if !wanted {
                    continue;
                }
                let desc = describe_rule(&msg);
                match handle.rule().del(msg).execute().await {
                    Ok(()) => removed.push(desc),
                    Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                    Err(e) => failures.push(nl_error(format!("deleting `{desc}`"), e).to_string()),
                }
            }
        }
        for family in [Family::V4, Family::V6] {
            let routes = match dump_routes(handle, family).await {
                Ok(r) => r,
                Err(e) if is_af_unsupported(&e) => continue,
                Err(e) => {
                    failures.push(e.to_string());
                    continue;
                }
            };
            for msg in routes.into_iter().filter(route_is_ours) {
                let wanted = if last {
                    true
                } else {
                    self.added().any(
                        |i| matches!(i, Item::Route(spec) if route_matches(&spec, &msg, lo_index)),
                    )
                };
                if !wanted {
                    continue;
                }
                let desc = format!(
                    "{} route local default table {}",
                    family.ip_cmd(),
                    route_table(&msg)
                );
                match handle.route().del(msg).execute().await {
                    Ok(()) => removed.push(desc),
                    Err(e) if errno(&e) == Some(libc::ESRCH) || errno(&e) == Some(libc::ENOENT) => {
                    }
                    Err(e) => failures.push(nl_error(format!("deleting `{desc}`"), e).to_string()),
                }
            }
        }
        // The lock is released (file closed) only now, so that an mmproxy
        // starting meanwhile waits and then sees the final state.
        drop(self.lock);
        if failures.is_empty() {
            Ok(RemoveReport {
                removed,
                left_for_others: false,
            })
        } else {
            Err(RoutingError::Remove(failures))
        }
    }

    fn added(&self) -> impl Iterator<Item = Item> + '_ {
        self.entries
            .iter()
            .filter(|(_, o)| *o == Outcome::Added)
            .map(|(i, _)| *i)
    }
}

/// What [`InstalledRoutes::remove`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveReport {
    /// Entries deleted, as `ip` would show them.
    pub removed: Vec<String>,
    /// Another mmproxy in this namespace still runs: nothing was removed.
    pub left_for_others: bool,
}

impl fmt::Display for RemoveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.left_for_others {
            f.write_str("return-path routing left in place: another mmproxy in this network namespace uses it")
        } else if self.removed.is_empty() {
            f.write_str("return-path routing: nothing to remove")
        } else {
            write!(
                f,
                "return-path routing removed: {}",
                self.removed.join(", ")
            )
        }
    }
}

fn describe_rule(msg: &RuleMessage) -> String {
    let fam = if msg.header.family == AddressFamily::Inet6 {
        Family::V6
    } else {
        Family::V4
    };
    let mut s = format!("{} rule", fam.ip_cmd());
    for a in &msg.attributes {
        match a {
            RuleAttribute::Source(ip) => s.push_str(&format!(" from {ip}/{}", msg.header.src_len)),
            RuleAttribute::Iifname(n) => s.push_str(&format!(" iif {n}")),
            RuleAttribute::FwMark(m) => s.push_str(&format!(" fwmark {m:#x}")),
            _ => {}
        }
    }
    s.push_str(&format!(" lookup {}", rule_table(msg)));
    s
}

fn is_af_unsupported(e: &RoutingError) -> bool {
    matches!(e, RoutingError::Netlink { source, .. } if errno(source) == Some(libc::EAFNOSUPPORT))
}

async fn dump_rules(handle: &Handle, ver: IpVersion) -> Result<Vec<RuleMessage>, RoutingError> {
    handle
        .rule()
        .get(ver)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("listing rules".into(), e))
}

async fn dump_routes(handle: &Handle, family: Family) -> Result<Vec<RouteMessage>, RoutingError> {
    let filter = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    // Without strict checking the kernel dumps every table; filtering
    // happens in route_matches.
    handle
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("listing routes".into(), e))
}

async fn loopback_index(handle: &Handle) -> Result<u32, RoutingError> {
    let links: Vec<_> = handle
        .link()
        .get()
        .match_name(LOOPBACK)
        .execute()
        .try_collect()
        .await
        .map_err(|e| match errno(&e) {
            Some(libc::ENODEV) => RoutingError::NoLoopback,
            _ => nl_error("looking up interface lo".into(), e),
        })?;
    links
        .first()
        .map(|l| l.header.index)
        .ok_or(RoutingError::NoLoopback)
}

fn try_flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's network namespace: a test may have unshared it on
/// its own thread, so `/proc/self` (the main thread's) is not good enough.
pub(crate) fn netns_id() -> io::Result<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .map(|m| m.ino())
}

/// Takes the shared lock; `Err` is a note for the log (routing still works,
/// only the cleanup falls back to "what this process added").
async fn shared_lock(dir: &Path) -> Result<File, String> {
    let ns = netns_id().map_err(|e| format!("cannot identify the network namespace ({e})"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
    let path = dir.join(format!("routing-netns-{ns}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {} ({e})", path.display()))?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match try_flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => return Ok(file),
            Err(e)
                if e.raw_os_error() == Some(libc::EWOULDBLOCK)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("cannot lock {} ({e})", path.display())),
        }
    }
}

/// Installs what `plan` needs, reusing what is there. Needs a tokio runtime
/// with I/O and timers; works in the calling thread's network namespace.
/// On error, whatever this call added is removed again.
pub async fn install(plan: &RoutingPlan) -> Result<InstalledRoutes, RoutingError> {
    install_with_lock_dir(plan, Path::new(DEFAULT_LOCK_DIR)).await
}

/// [`install`] with the lock files in `lock_dir` instead of
/// [`DEFAULT_LOCK_DIR`] (tests; hosts where `/run` is not writable).
pub async fn install_with_lock_dir(
    plan: &RoutingPlan,
    lock_dir: &Path,
) -> Result<InstalledRoutes, RoutingError> {
    let (lock, lock_note) = match shared_lock(lock_dir).await {
        Ok(f) => (Some(f), None),
        Err(note) => (
            None,
            Some(format!(
                "{note}: at exit only what this process added is removed"
            )),
        ),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let task = tokio::spawn(conn);
    let mut installed = InstalledRoutes {
        table: plan.table,
        entries: Vec::new(),
        lock,
        lock_note,
    };
    let result = install_with(&handle, plan, &mut installed).await;
    let result = match result {
        Ok(()) => Ok(installed),
        Err(e) => {
            // Roll back our own additions only: with the lock released first
            // we would not be "last", so remove exactly what we added.
            installed.lock = None;
            if installed.added_any() {
                if let Err(re) = installed.remove_with(&handle).await {
                    tracing::warn!("rolling back return-path routing after a failure: {re}");
                }
            }
            Err(e)
        }
    };
    task.abort();
    result
}

async fn install_with(
    handle: &Handle,
    plan: &RoutingPlan,
    out: &mut InstalledRoutes,
) -> Result<(), RoutingError> {
    let items = plan.items();
    if items.is_empty() {
        return Ok(());
    }
    let lo_index = loopback_index(handle).await?;
    let mut v6_unsupported = false;
    let rules4 = dump_rules(handle, IpVersion::V4).await?;
    let rules6 = match dump_rules(handle, IpVersion::V6).await {
        Ok(r) => r,
        Err(e) if is_af_unsupported(&e) => {
            v6_unsupported = true;
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let routes4 = dump_routes(handle, Family::V4).await?;
    let routes6 = if v6_unsupported {
        Vec::new()
    } else {
        dump_routes(handle, Family::V6).await?
    };

    for item in items {
        let v6 = matches!(
            item,
            Item::Rule(RuleSpec {
                family: Family::V6,
                ..
            }) | Item::Route(RouteSpec {
                family: Family::V6,
                ..
            })
        );
        if v6 && v6_unsupported {
            out.entries
                .push((item, Outcome::Skipped("IPv6 is disabled in this kernel")));
            continue;
        }
        let existing_ours = match item {
            Item::Rule(spec) => {
                let rules = if v6 { &rules6 } else { &rules4 };
                rules
                    .iter()
                    .find(|m| rule_matches(&spec, m))
                    .map(rule_is_ours)
            }
            Item::Route(spec) => {
                let routes = if v6 { &routes6 } else { &routes4 };
                routes
                    .iter()
                    .find(|m| route_matches(&spec, m, lo_index))
                    .map(route_is_ours)
            }
        };
        if let Some(ours) = existing_ours {
            out.entries.push((item, Outcome::Reused { ours }));
            continue;
        }
        let res = match item {
            Item::Rule(spec) => {
                let mut req = handle.rule().add();
                *req.message_mut() = rule_message(&spec);
                req.execute().await
            }
            Item::Route(spec) => {
                handle
                    .route()
                    .add(route_message(&spec, lo_index))
                    .execute()
                    .await
            }
        };
        match res {
            Ok(()) => out.entries.push((item, Outcome::Added)),
            // Someone (another mmproxy starting) added it since the dump.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                out.entries.push((item, Outcome::Reused { ours: true }))
            }
            Err(e) if v6 && errno(&e) == Some(libc::EAFNOSUPPORT) => out
                .entries
                .push((item, Outcome::Skipped("IPv6 is disabled in this kernel"))),
            Err(e) => return Err(nl_error(format!("adding `{item}`"), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(v4: bool, v6: bool, mark: Option<u32>) -> RoutingPlan {
        RoutingPlan {
            table: 123,
            v4_loopback: v4,
            v6_loopback: v6,
            fwmark: mark,
        }
    }

    #[test]
    fn plan_items_and_their_ip_commands() {
        let lines: Vec<String> = plan(true, true, Some(0x10))
            .items()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            lines,
            [
                "ip route local 0.0.0.0/0 dev lo table 123",
                "ip rule from 127.0.0.0/8 iif lo lookup 123",
                "ip rule fwmark 0x10 lookup 123",
                "ip -6 route local ::/0 dev lo table 123",
                "ip -6 rule from ::1/128 iif lo lookup 123",
                "ip -6 rule fwmark 0x10 lookup 123",
            ]
        );
        assert!(plan(false, false, None).is_empty());
        let only6: Vec<String> = plan(false, true, None)
            .items()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            only6,
            [
                "ip -6 route local ::/0 dev lo table 123",
                "ip -6 rule from ::1/128 iif lo lookup 123"
            ]
        );
    }

    #[test]
    fn for_targets_detects_loopback_families() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let p = RoutingPlan::for_targets(7, &[ip("127.0.0.1"), ip("::1")]);
        assert!(p.v4_loopback && p.v6_loopback && p.fwmark.is_none());
        assert_eq!(p.table, 7);
        let p = RoutingPlan::for_targets(7, &[ip("192.0.2.1"), ip("2001:db8::1")]);
        assert!(!p.v4_loopback && !p.v6_loopback && p.is_empty());
        let p = RoutingPlan::for_targets(7, &[ip("127.8.9.10"), ip("2001:db8::1")]).with_fwmark(5);
        assert!(p.v4_loopback && !p.v6_loopback);
        assert_eq!(p.fwmark, Some(5));
        assert!(RoutingPlan::for_targets(7, &[ip("::ffff:127.0.0.1")]).v4_loopback);
    }

    fn spec(family: Family, selector: Selector) -> RuleSpec {
        RuleSpec {
            family,
            selector,
            table: 123,
        }
    }

    /// The rule go-mmproxy's README has the operator type, as the kernel
    /// dumps it: default protocol, address as written, kernel-chosen priority.
    fn go_mmproxy_rule(src: &str, len: u8, table: u32) -> RuleMessage {
        let ip: IpAddr = src.parse().unwrap();
        let mut m = RuleMessage::default();
        m.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.action = RuleAction::ToTable;
        m.header.src_len = len;
        m.header.table = if table < 256 { table as u8 } else { 252 };
        m.attributes = vec![
            RuleAttribute::Table(table),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Priority(32765),
            RuleAttribute::Source(ip),
            RuleAttribute::Iifname("lo".into()),
        ];
        m
    }

    #[test]
    fn own_rule_messages_match_their_spec() {
        for s in [
            spec(Family::V4, Selector::FromLoopback),
            spec(Family::V6, Selector::FromLoopback),
            spec(Family::V4, Selector::FwMark(0x6d6d_7078)),
            spec(Family::V6, Selector::FwMark(1)),
            RuleSpec {
                table: 1000,
                ..spec(Family::V4, Selector::FromLoopback)
            },
        ] {
            let m = rule_message(&s);
            assert!(rule_matches(&s, &m), "{s:?}");
            assert!(rule_is_ours(&m));
            // And nothing else.
            for other in [
                RuleSpec {
                    table: s.table + 1,
                    ..s
                },
                RuleSpec {
                    family: if s.family == Family::V4 {
                        Family::V6
                    } else {
                        Family::V4
                    },
                    ..s
                },
                RuleSpec {
                    selector: Selector::FwMark(99),
                    ..s
                },
            ] {
                assert!(!rule_matches(&other, &m), "{other:?} matched {s:?}");
            }
        }
        let big = rule_message(&RuleSpec {
            table: 1000,
            ..spec(Family::V4, Selector::FromLoopback)
        });
        assert_eq!(rule_table(&big), 1000);
    }

    #[test]
    fn go_mmproxy_rules_are_recognised() {
        let s4 = spec(Family::V4, Selector::FromLoopback);
        // As typed (127.0.0.1/8) and as a kernel that masks it stores it.
        assert!(rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 8, 123)));
        assert!(rule_matches(&s4, &go_mmproxy_rule("127.0.0.0", 8, 123)));
        assert!(!rule_is_ours(&go_mmproxy_rule("127.0.0.0", 8, 123)));
        assert!(!rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 32, 123)));
        assert!(!rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 8, 124)));
        let s6 = spec(Family::V6, Selector::FromLoopback);
        assert!(rule_matches(&s6, &go_mmproxy_rule("::1", 128, 123)));
        assert!(!rule_matches(&s6, &go_mmproxy_rule("::1", 127, 123)));
        assert!(!rule_matches(&s4, &go_mmproxy_rule("::1", 128, 123)));
    }

    #[test]
    fn narrower_or_different_rules_are_not_reused() {
        let s4 = spec(Family::V4, Selector::FromLoopback);
        let base = go_mmproxy_rule("127.0.0.1", 8, 123);

        let mut inverted = base.clone();
        inverted.header.flags.insert(RuleFlags::Invert);
        let mut with_mark = base.clone();
        with_mark.attributes.push(RuleAttribute::FwMark(1));
        let mut other_iif = base.clone();
        other_iif
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Iifname(_)));
        other_iif
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        let mut no_iif = base.clone();
        no_iif
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Iifname(_)));
        let mut with_oif = base.clone();
        with_oif
            .attributes
            .push(RuleAttribute::Oifname("lo".into()));
        let mut blackhole = base.clone();
        blackhole.header.action = RuleAction::Blackhole;
        let mut with_tos = base.clone();
        with_tos.header.tos = 0x10;
        let mut with_dst = base.clone();
        with_dst.header.dst_len = 24;
        with_dst
            .attributes
            .push(RuleAttribute::Destination("192.0.2.0".parse().unwrap()));
        let mut suppress = base.clone();
        suppress
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::SuppressPrefixLen(_)));
        suppress
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(0));
        for (name, m) in [
            ("not", inverted),
            ("fwmark", with_mark),
            ("iif eth0", other_iif),
            ("no iif", no_iif),
            ("oif", with_oif),
            ("blackhole", blackhole),
            ("tos", with_tos),
            ("to", with_dst),
            ("suppress_prefixlength 0", suppress),
        ] {
            assert!(!rule_matches(&s4, &m), "{name}");
        }

        let sm = spec(Family::V4, Selector::FwMark(7));
        let mut mark = RuleMessage::default();
        mark.header.family = AddressFamily::Inet;
        mark.header.action = RuleAction::ToTable;
        mark.attributes = vec![RuleAttribute::Table(123), RuleAttribute::FwMark(7)];
        assert!(rule_matches(&sm, &mark));
        mark.attributes.push(RuleAttribute::FwMask(u32::MAX));
        assert!(rule_matches(&sm, &mark));
        mark.attributes.pop();
        mark.attributes.push(RuleAttribute::FwMask(0xff));
        assert!(!rule_matches(&sm, &mark), "a partial mask selects more");
    }

    #[test]
    fn route_matching() {
        let s = RouteSpec {
            family: Family::V4,
            table: 123,
        };
        let m = route_message(&s, 1);
        assert!(route_matches(&s, &m, 1));
        assert!(route_is_ours(&m));
        assert!(!route_matches(&s, &m, 2), "other device");
        assert!(!route_matches(&RouteSpec { table: 124, ..s }, &m, 1));
        assert!(!route_matches(
            &RouteSpec {
                family: Family::V6,
                ..s
            },
            &m,
            1
        ));
        let mut unicast = m.clone();
        unicast.header.kind = RouteType::Unicast;
        assert!(!route_matches(&s, &unicast, 1));
        let mut via = m.clone();
        via.attributes
            .push(RouteAttribute::Gateway(IpAddr::from([192, 0, 2, 1]).into()));
        assert!(!route_matches(&s, &via, 1));
        // An operator's (iproute2's default protocol "boot") counts, not ours.
        let mut boot = m.clone();
        boot.header.protocol = RouteProtocol::Boot;
        assert!(route_matches(&s, &boot, 1) && !route_is_ours(&boot));
        let big = route_message(&RouteSpec { table: 70000, ..s }, 1);
        assert_eq!(route_table(&big), 70000);
        let s6 = RouteSpec {
            family: Family::V6,
            table: 123,
        };
        assert!(route_matches(&s6, &route_message(&s6, 1), 1));
    }

    #[test]
    fn describe_and_report_texts() {
        let r = InstalledRoutes {
            table: 123,
            entries: vec![
                (plan(true, false, None).items()[0], Outcome::Added),
                (
                    plan(true, false, None).items()[1],
                    Outcome::Reused { ours: false },
                ),
                (
                    plan(false, true, None).items()[0],
                    Outcome::Skipped("IPv6 is disabled in this kernel"),
                ),
            ],
            lock: None,
            lock_note: None,
        };
        assert_eq!(
            r.describe(),
            "table 123: added `ip route local 0.0.0.0/0 dev lo table 123`; \
             reused existing `ip rule from 127.0.0.0/8 iif lo lookup 123`; \
             skipped `ip -6 route local ::/0 dev lo table 123` (IPv6 is disabled in this kernel)"
        );
        assert!(r.added_any());
        let rep = RemoveReport {
            removed: vec![],
            left_for_others: true,
        };
        assert!(rep.to_string().contains("another mmproxy"));
    }

    #[test]
    fn permission_error_has_a_hint() {
        let e = RoutingError::PermissionDenied {
            what: "adding `ip rule from 127.0.0.0/8 iif lo lookup 123`".into(),
        };
        assert!(e.to_string().contains("needs CAP_NET_ADMIN"), "{e}");
    }

    /// Privileged tests: each runs in a network namespace of its own, made by
    /// unshare(CLONE_NEWNET) on a dedicated thread. The namespace dies with the
    /// thread, so nothing survives a failing test, and the host's rules and
    /// routes are never touched.
    mod netns {
        use super::super::*;
        use crate::testing::in_netns;
        use std::process::Command;

        fn plan(v4: bool, v6: bool, mark: Option<u32>) -> RoutingPlan {
            RoutingPlan {
                table: 123,
                v4_loopback: v4,
                v6_loopback: v6,
                fwmark: mark,
            }
        }

        /// Every install in these tests keeps its lock files in the test's
        /// own directory.
        async fn install(p: &RoutingPlan, dir: &Path) -> Result<InstalledRoutes, RoutingError> {
            install_with_lock_dir(p, dir).await
        }

        /// Everything rule- and route-related in the namespace, comparable
        /// across calls (sorted debug forms).
        async fn snapshot(h: &Handle) -> Vec<String> {
            let mut out = Vec::new();
            for v in [IpVersion::V4, IpVersion::V6] {
                for r in dump_rules(h, v).await.unwrap() {
                    out.push(format!("{r:?}"));
                }
            }
            for f in [Family::V4, Family::V6] {
                for r in dump_routes(h, f).await.unwrap() {
                    // Cache info carries counters that change by themselves.
                    let mut r = r;
                    r.attributes
                        .retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
                    out.push(format!("{r:?}"));
                }
            }
            out.sort();
            out
        }

        async fn count_matching(h: &Handle, p: &RoutingPlan) -> usize {
            let lo = loopback_index(h).await.unwrap();
            let mut n = 0;
            for item in p.items() {
                n += match item {
                    Item::Rule(s) => {
                        let v = if s.family == Family::V4 {
                            IpVersion::V4
                        } else {
                            IpVersion::V6
                        };
                        dump_rules(h, v)
                            .await
                            .unwrap()
                            .iter()
                            .filter(|m| rule_matches(&s, m))
                            .count()
                    }
                    Item::Route(s) => dump_routes(h, s.family)
                        .await
                        .unwrap()
                        .iter()
                        .filter(|m| route_matches(&s, m, lo))
                        .count(),
                };
            }
            n
        }

        /// `ip` run from this thread: a child inherits the thread's namespace.
        fn ip(args: &[&str]) -> Option<String> {
            let out = Command::new("ip").args(args).output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }

        async fn add_go_mmproxy_rules(h: &Handle, lo: u32) {
            // What the go-mmproxy README has the operator type, proto boot.
            let mut r4 = rule_message(&RuleSpec {
                family: Family::V4,
                selector: Selector::FromLoopback,
                table: 123,
            });
            r4.attributes
                .retain(|a| !matches!(a, RuleAttribute::Protocol(_) | RuleAttribute::Source(_)));
            r4.attributes
                .push(RuleAttribute::Source("127.0.0.1".parse().unwrap()));
            let mut req = h.rule().add();
            *req.message_mut() = r4;
            req.execute().await.unwrap();
            let mut r6 = rule_message(&RuleSpec {
                family: Family::V6,
                selector: Selector::FromLoopback,
                table: 123,
            });
            r6.attributes
                .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
            let mut req = h.rule().add();
            *req.message_mut() = r6;
            req.execute().await.unwrap();
            for f in [Family::V4, Family::V6] {
                let mut m = route_message(
                    &RouteSpec {
                        family: f,
                        table: 123,
                    },
                    lo,
                );
                m.header.protocol = RouteProtocol::Boot;
                h.route().add(m).execute().await.unwrap();
            }
        }

        #[test]
        fn install_reuse_remove_in_netns() {
            in_netns("install_reuse_remove_in_netns", |h, dir| async move {
                let before = snapshot(&h).await;
                let p = plan(true, true, Some(0x6d6d_7078));

                let first = install(&p, &dir).await.unwrap();
                let d = first.describe();
                assert!(d.contains("added") && !d.contains("reused"), "{d}");
                assert_eq!(count_matching(&h, &p).await, 6, "one of each");
                if let Some(rules) = ip(&["rule", "show"]) {
                    assert!(
                        rules.contains("from 127.0.0.0/8 iif lo lookup 123 proto 109"),
                        "{rules}"
                    );
                    assert!(
                        rules.contains("fwmark 0x6d6d7078 lookup 123 proto 109"),
                        "{rules}"
                    );
                }
                if let Some(routes) = ip(&["-6", "route", "show", "table", "123"]) {
                    assert!(
                        routes.contains("local default dev lo proto 109"),
                        "{routes}"
                    );
                }

                // Second instance (e.g. the UDP one): adds nothing.
                let second = install(&p, &dir).await.unwrap();
                assert!(!second.added_any(), "{}", second.describe());
                assert!(
                    second.describe().contains("shared with"),
                    "{}",
                    second.describe()
                );
                assert_eq!(count_matching(&h, &p).await, 6, "no duplicates");

                // The first to stop leaves everything for the other.
                let rep = first.remove().await.unwrap();
                assert!(rep.left_for_others, "{rep}");
                assert_eq!(count_matching(&h, &p).await, 6);

                // The last one cleans up, including what the first added.
                let rep = second.remove().await.unwrap();
                assert!(!rep.left_for_others && rep.removed.len() == 6, "{rep}");
                assert_eq!(snapshot(&h).await, before);
            });
        }

        #[test]
        fn go_mmproxy_setup_is_reused_and_left_alone() {
            in_netns(
                "go_mmproxy_setup_is_reused_and_left_alone",
                |h, dir| async move {
                    let lo = loopback_index(&h).await.unwrap();
                    add_go_mmproxy_rules(&h, lo).await;
                    if let Some(rules) = ip(&["rule", "show"]) {
                        eprintln!(
                            "kernel shows the go-mmproxy rule as: {}",
                            rules
                                .lines()
                                .find(|l| l.contains("lookup 123"))
                                .unwrap_or("?")
                        );
                    }
                    let before = snapshot(&h).await;
                    let p = plan(true, true, None);
                    let got = install(&p, &dir).await.unwrap();
                    assert!(!got.added_any(), "{}", got.describe());
                    assert!(
                        got.describe().contains("reused existing"),
                        "{}",
                        got.describe()
                    );
                    assert_eq!(snapshot(&h).await, before);
                    let rep = got.remove().await.unwrap();
                    assert!(rep.removed.is_empty(), "{rep}");
                    assert_eq!(snapshot(&h).await, before, "the operator's entries stay");

                    // With an fwmark the missing rules are added, and only they go.
                    let p = plan(true, true, Some(9));
                    let got = install(&p, &dir).await.unwrap();
                    assert_eq!(
                        got.entries
                            .iter()
                            .filter(|(_, o)| *o == Outcome::Added)
                            .count(),
                        2,
                        "{}",
                        got.describe()
                    );
                    got.remove().await.unwrap();
                    assert_eq!(snapshot(&h).await, before);
                },
            );
        }

        #[test]
        fn leftovers_of_a_killed_instance_are_adopted_then_removed() {
            in_netns(
                "leftovers_of_a_killed_instance_are_adopted_then_removed",
                |h, dir| async move {
                    let before = snapshot(&h).await;
                    let p = plan(true, false, None);
                    let killed = install(&p, &dir).await.unwrap();
                    // SIGKILL: no remove(); the kernel drops the process's lock.
                    drop(killed);
                    let after_kill = snapshot(&h).await;
                    assert_ne!(after_kill, before);

                    let restarted = install(&p, &dir).await.unwrap();
                    assert!(!restarted.added_any(), "{}", restarted.describe());
                    assert_eq!(snapshot(&h).await, after_kill, "no duplicates");
                    let rep = restarted.remove().await.unwrap();
                    assert_eq!(rep.removed.len(), 2, "{rep}");
                    assert_eq!(snapshot(&h).await, before);
                },
            );
        }

        #[test]
        fn without_a_lock_only_own_additions_are_removed() {
            in_netns(
                "without_a_lock_only_own_additions_are_removed",
                |h, dir| async move {
                    let before = snapshot(&h).await;
                    // A file where the lock directory should be: no lock.
                    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
                    std::fs::write(&dir, b"not a directory").unwrap();
                    let p = plan(true, false, None);
                    let got = install(&p, &dir).await.unwrap();
                    assert!(
                        got.describe().contains("only what this process added"),
                        "{}",
                        got.describe()
                    );
                    assert!(got.added_any());
                    got.remove().await.unwrap();
                    assert_eq!(snapshot(&h).await, before);
                    let _ = std::fs::remove_file(&dir);
                },
            );
        }

        #[test]
        fn large_table_ids_work() {
            in_netns("large_table_ids_work", |h, dir| async move {
                let before = snapshot(&h).await;
                let p = RoutingPlan {
                    table: 70_000,
                    ..plan(true, true, None)
                };
                let got = install(&p, &dir).await.unwrap();
                assert_eq!(count_matching(&h, &p).await, 4);
                if let Some(rules) = ip(&["rule", "show"]) {
                    assert!(rules.contains("lookup 70000"), "{rules}");
                }
                got.remove().await.unwrap();
                assert_eq!(snapshot(&h).await, before);
            });
        }
    }
}
