//! Talking to the kernel over rtnetlink: dumping the rules and routes there are,
//! telling whether one of them is what a planned [`Item`] asks for (and whether
//! mmproxy made it), building the messages that add ours, and reading errnos.
//!
//! Rules and routes are handled alike through [`Existing`] (one dumped entry of
//! either kind): install and remove each run one loop over both kinds.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::plan::{IpFamily, Item, RouteSpec, RuleSpec, Selector};
use super::{RoutingError, LOOPBACK, RT_PROTOCOL};

pub(super) fn rule_table(msg: &RuleMessage) -> u32 {
    let attribute = msg.attributes.iter().find_map(|a| match a {
        RuleAttribute::Table(t) => Some(*t),
        _ => None,
    });
    table(attribute, msg.header.table)
}

pub(super) fn route_table(msg: &RouteMessage) -> u32 {
    let attribute = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    table(attribute, msg.header.table)
}

/// The kernel always sends the table attribute in dumps; the header byte is the
/// fallback for tables below 256.
fn table(attribute: Option<u32>, header: u8) -> u32 {
    attribute.unwrap_or(u32::from(header))
}

/// The header byte for `table`: itself below 256, else "see the attribute".
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

pub(super) fn rule_is_ours(msg: &RuleMessage) -> bool {
    msg.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RT_PROTOCOL))
}

pub(super) fn route_is_ours(msg: &RouteMessage) -> bool {
    u8::from(msg.header.protocol) == RT_PROTOCOL
}

/// Whether an existing rule selects exactly what `spec` does and sends it to
/// the same table. Anything extra (another selector, `not`, tos, a goto…)
/// makes it a different rule: then ours is added next to it, which is
/// harmless, whereas wrongly reusing a narrower rule would break the return
/// path.
pub(super) fn rule_matches(spec: &RuleSpec, msg: &RuleMessage) -> bool {
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
pub(super) fn route_matches(spec: &RouteSpec, msg: &RouteMessage, lo_index: u32) -> bool {
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

pub(super) fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = spec.family.af();
    m.header.action = RuleAction::ToTable;
    m.header.table = header_table(spec.table);
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

pub(super) fn route_message(spec: &RouteSpec, lo_index: u32) -> RouteMessage {
    let builder = match spec.family {
        // iproute2 gives IPv4 local routes host scope and IPv6 ones universe.
        IpFamily::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .scope(RouteScope::Host)
            .build(),
        IpFamily::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .scope(RouteScope::Universe)
            .build(),
    };
    let mut m = builder;
    m.header.kind = RouteType::Local;
    m.header.protocol = RouteProtocol::from(RT_PROTOCOL);
    m.header.table = header_table(spec.table);
    m.attributes.push(RouteAttribute::Table(spec.table));
    m.attributes.push(RouteAttribute::Oif(lo_index));
    m
}

/// The errno of a request the kernel refused.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A failed request as a [`RoutingError`]; a refusal for lack of privilege gets
/// its own message, which says what to do.
pub(super) fn nl_error(what: String, source: rtnetlink::Error) -> RoutingError {
    if errno(&source) == Some(libc::EPERM) || errno(&source) == Some(libc::EACCES) {
        RoutingError::PermissionDenied { what }
    } else {
        RoutingError::Netlink { what, source }
    }
}

fn describe_rule(msg: &RuleMessage) -> String {
    let mut s = format!("{} rule", IpFamily::of(msg.header.family).ip_cmd());
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

pub(super) async fn loopback_index(handle: &Handle) -> Result<u32, RoutingError> {
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

/// The kernel has no such address family (IPv6 disabled).
pub(super) fn is_af_unsupported(e: &RoutingError) -> bool {
    matches!(e, RoutingError::Netlink { source, .. } if errno(source) == Some(libc::EAFNOSUPPORT))
}

/// A delete found nothing to delete: someone else removed the entry first.
pub(super) fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ENOENT | libc::ESRCH))
}

/// Rules or routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Rule,
    Route,
}

/// One rule or route the kernel has, as dumped.
#[derive(Clone, Debug)]
pub(super) enum Existing {
    Rule(RuleMessage),
    Route(RouteMessage),
}

impl Existing {
    /// Tagged by an mmproxy (this one, another one, or one that was killed).
    pub(super) fn is_ours(&self) -> bool {
        match self {
            Existing::Rule(m) => rule_is_ours(m),
            Existing::Route(m) => route_is_ours(m),
        }
    }

    /// Whether this entry is what `item` asks for (see [`rule_matches`] and
    /// [`route_matches`]); never across kinds.
    pub(super) fn matches(&self, item: &Item, lo_index: u32) -> bool {
        match (self, item) {
            (Existing::Rule(m), Item::Rule(spec)) => rule_matches(spec, m),
            (Existing::Route(m), Item::Route(spec)) => route_matches(spec, m, lo_index),
            _ => false,
        }
    }

    /// As `ip` would show it, for logs.
    pub(super) fn describe(&self) -> String {
        match self {
            Existing::Rule(m) => describe_rule(m),
            Existing::Route(m) => format!(
                "{} route local default table {}",
                IpFamily::of(m.header.address_family).ip_cmd(),
                route_table(m)
            ),
        }
    }
}

/// Every entry of one kind and family. Routes of every table: without strict
/// checking the kernel ignores a table filter, so [`route_matches`] filters.
pub(super) async fn dump(
    handle: &Handle,
    kind: Kind,
    family: IpFamily,
) -> Result<Vec<Existing>, RoutingError> {
    match kind {
        Kind::Rule => {
            let version = match family {
                IpFamily::V4 => IpVersion::V4,
                IpFamily::V6 => IpVersion::V6,
            };
            handle
                .rule()
                .get(version)
                .execute()
                .map_ok(Existing::Rule)
                .try_collect()
                .await
                .map_err(|e| nl_error("listing rules".into(), e))
        }
        Kind::Route => {
            let filter = match family {
                IpFamily::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpFamily::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            handle
                .route()
                .get(filter)
                .execute()
                .map_ok(Existing::Route)
                .try_collect()
                .await
                .map_err(|e| nl_error("listing routes".into(), e))
        }
    }
}

/// Adds the entry `item` asks for, tagged [`RT_PROTOCOL`].
pub(super) async fn add(
    handle: &Handle,
    item: &Item,
    lo_index: u32,
) -> Result<(), rtnetlink::Error> {
    match item {
        Item::Rule(spec) => {
            let mut req = handle.rule().add();
            *req.message_mut() = rule_message(spec);
            req.execute().await
        }
        Item::Route(spec) => {
            handle
                .route()
                .add(route_message(spec, lo_index))
                .execute()
                .await
        }
    }
}

/// Deletes a dumped entry.
pub(super) async fn delete(handle: &Handle, entry: Existing) -> Result<(), rtnetlink::Error> {
    match entry {
        Existing::Rule(m) => handle.rule().del(m).execute().await,
        Existing::Route(m) => handle.route().del(m).execute().await,
    }
}
