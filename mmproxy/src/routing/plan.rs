//! What the return path needs, independent of what the kernel already has: the
//! rules and routes of the table in the module docs, and how each reads as the
//! `ip` command that would add it.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::AddressFamily;

use super::LOOPBACK;

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
    pub(super) fn items(&self) -> Vec<Item> {
        let mut out = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let loopback = match family {
                IpFamily::V4 => self.v4_loopback,
                IpFamily::V6 => self.v6_loopback,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of a dumped message.
    pub(super) fn of(af: AddressFamily) -> Self {
        if af == AddressFamily::Inet6 {
            IpFamily::V6
        } else {
            IpFamily::V4
        }
    }

    pub(super) fn af(self) -> AddressFamily {
        match self {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        }
    }

    pub(super) fn ip_cmd(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip -6",
        }
    }

    pub(super) fn loopback_net(self) -> IpNet {
        match self {
            IpFamily::V4 => IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
            IpFamily::V6 => IpNet::V6(ipnet::Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Selector {
    /// `from 127.0.0.0/8 iif lo` / `from ::1/128 iif lo`
    FromLoopback,
    /// `fwmark M`
    FwMark(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RuleSpec {
    pub(super) family: IpFamily,
    pub(super) selector: Selector,
    pub(super) table: u32,
}

/// `local <default> dev lo table T`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RouteSpec {
    pub(super) family: IpFamily,
    pub(super) table: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Item {
    Rule(RuleSpec),
    Route(RouteSpec),
}

impl Item {
    pub(super) fn family(&self) -> IpFamily {
        match self {
            Item::Rule(r) => r.family,
            Item::Route(r) => r.family,
        }
    }
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
                    IpFamily::V4 => "0.0.0.0/0",
                    IpFamily::V6 => "::/0",
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
