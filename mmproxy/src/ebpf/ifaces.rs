//! Which interfaces the return-path tc programs go on.
//!
//! The service answers the *client's* address, so its answers follow the route to
//! the client — in general the default route:
//! - a target on one of this host's own addresses (and, for UDP, a loopback target:
//!   a service bound to 0.0.0.0 answers from whatever address routing picks) sends
//!   its answers out of the default-route interface(s): tc **egress** there;
//! - a target elsewhere (a container behind a veth, with this host as its gateway)
//!   sends them in through the interface this host routes the target over: tc
//!   **ingress** there.
//!
//! `--return-interface` names further interfaces; both programs go on those. The
//! choice is made from the main routing table by [`ReturnPolicy::choose`], at
//! start-up and again whenever the host's links, addresses or routes change
//! ([`crate::netwatch`]): one function, so the two can never disagree.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkLayerType};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("--return-interface {0}: no such interface")]
    NoSuchInterface(String),
    #[error("--return-interface {0}: not an Ethernet-type interface (the tc programs parse Ethernet frames)")]
    NotEthernet(String),
}

/// Interface names per attach point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReturnInterfaces {
    pub egress: BTreeSet<String>,
    pub ingress: BTreeSet<String>,
    /// For UDP: every Ethernet-type interface, where proxies' datagrams may
    /// arrive (the relay's inbound program); the kernel side attaches it only with
    /// `--udp-datapath kernel`. Not part of [`ReturnInterfaces::is_empty`].
    pub udp_in: BTreeSet<String>,
    /// For UDP: `lo`, whose egress carries the answers of loopback services (the
    /// relay's outbound program); attached only with `--udp-datapath kernel`.
    pub lo_egress: BTreeSet<String>,
    /// Why something that might have been expected is not there, for the log.
    pub notes: Vec<String>,
}

impl ReturnInterfaces {
    pub fn is_empty(&self) -> bool {
        self.egress.is_empty() && self.ingress.is_empty()
    }
}

#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    ether: bool,
}

#[derive(Clone, Debug)]
struct Route {
    dst: IpNet,
    oifs: Vec<u32>,
}

/// What the decision needs to know about this namespace.
#[derive(Clone, Debug, Default)]
struct NetView {
    links: Vec<Link>,
    local: Vec<IpAddr>,
    /// Unicast routes of the main table.
    routes: Vec<Route>,
}

impl NetView {
    fn name(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The main table's longest-prefix route towards `ip`.
    fn route_to(&self, ip: IpAddr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.dst.contains(&ip))
            .max_by_key(|r| r.dst.prefix_len())
    }

    fn default_route(&self, v4: bool) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.dst.prefix_len() == 0 && r.dst.addr().is_ipv4() == v4)
    }
}

/// What the choice depends on besides the namespace's state: fixed by the
/// configuration, the same at start-up and for every later re-evaluation.
#[derive(Clone, Debug)]
pub struct ReturnPolicy {
    /// The `-4` and `-6` addresses.
    pub targets: Vec<IpAddr>,
    pub udp: bool,
    /// `--return-interface`.
    pub explicit: Vec<String>,
}

/// When the choice is made: a `--return-interface` that does not exist stops
/// start-up (a typo), but one that goes away later is only noted (it may come back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    StartUp,
    Running,
}

impl ReturnPolicy {
    /// Whether answers may ever need the tc programs under this configuration,
    /// whatever the host's network becomes: then flows are registered and the
    /// `fwmark` rule is installed from the start, so that an interface chosen later
    /// steers at once. Only TCP with loopback targets never needs them.
    pub fn may_steer(&self) -> bool {
        !self.explicit.is_empty()
            || self
                .targets
                .iter()
                .any(|t| self.udp || !t.to_canonical().is_loopback())
    }

    /// Chooses the interfaces from the namespace's current state, over `handle`
    /// (`None`: a netlink socket of its own, for start-up).
    pub async fn choose(
        &self,
        handle: Option<&Handle>,
        stage: Stage,
    ) -> Result<ReturnInterfaces, IfaceError> {
        let view = match handle {
            Some(h) => view(h).await,
            None => {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Socket)?;
                let task = tokio::spawn(conn);
                let view = view(&handle).await;
                task.abort();
                view
            }
        };
        decide(&view?, self, stage)
    }
}

fn decide(
    view: &NetView,
    policy: &ReturnPolicy,
    stage: Stage,
) -> Result<ReturnInterfaces, IfaceError> {
    let ReturnPolicy {
        targets,
        udp,
        explicit,
    } = policy;
    let udp = *udp;
    let mut out = ReturnInterfaces::default();
    let add = |set: &mut BTreeSet<String>, notes: &mut Vec<String>, index: u32| {
        match view.name(index) {
            Some(l) if l.ether => {
                set.insert(l.name.clone());
            }
            Some(l) if l.name == "lo" => {}
            Some(l) => notes.push(format!(
                "{} is not an Ethernet-type interface: answers leaving or arriving there are not steered",
                l.name
            )),
            None => {}
        }
    };
    for target in targets {
        let ip = target.to_canonical();
        let local = view.local.contains(&ip);
        if ip.is_loopback() && !udp {
            // TCP answers come from the target address: the loopback rule suffices.
            continue;
        }
        if ip.is_loopback() || local {
            match view.default_route(ip.is_ipv4()) {
                Some(r) => {
                    for i in &r.oifs {
                        add(&mut out.egress, &mut out.notes, *i);
                    }
                }
                // Loopback targets are the default: a host without, say, an IPv6
                // default route has no IPv6 clients to answer, nothing to warn about.
                None if ip.is_loopback() => {}
                None => out.notes.push(format!(
                    "no default route for {ip}'s family: answers to clients have no way out to steer"
                )),
            }
        } else {
            match view.route_to(ip) {
                Some(r) => {
                    for i in &r.oifs {
                        add(&mut out.ingress, &mut out.notes, *i);
                    }
                }
                None => out.notes.push(format!("no route to the target {ip}")),
            }
        }
    }
    for name in explicit {
        let problem = match view.links.iter().find(|l| &l.name == name) {
            Some(l) if l.ether => {
                out.egress.insert(name.clone());
                out.ingress.insert(name.clone());
                continue;
            }
            Some(_) => IfaceError::NotEthernet(name.clone()),
            None => IfaceError::NoSuchInterface(name.clone()),
        };
        match stage {
            Stage::StartUp => return Err(problem),
            Stage::Running => out.notes.push(problem.to_string()),
        }
    }
    if udp {
        // Balancers may reach this host over any interface; lo carries no
        // balancer traffic but the loopback services' answers.
        out.udp_in = view
            .links
            .iter()
            .filter(|l| l.ether)
            .map(|l| l.name.clone())
            .collect();
        if view.links.iter().any(|l| l.name == "lo") {
            out.lo_egress.insert("lo".to_owned());
        }
    }
    Ok(out)
}

async fn view(handle: &Handle) -> Result<NetView, IfaceError> {
    let nl = |what| move |source| IfaceError::Netlink { what, source };
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing interfaces"))?;
    let links = links
        .into_iter()
        .map(|m| Link {
            index: m.header.index,
            ether: m.header.link_layer_type == LinkLayerType::Ether,
            name: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
        })
        .collect();
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    let local = addrs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    let mut routes = Vec::new();
    for filter in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let v4 = filter.header.address_family == netlink_packet_route::AddressFamily::Inet;
        let msgs: Vec<RouteMessage> = match handle.route().get(filter).execute().try_collect().await
        {
            Ok(m) => m,
            // IPv6 disabled: nothing to steer for it.
            Err(_) if !v4 => Vec::new(),
            Err(source) => {
                return Err(IfaceError::Netlink {
                    what: "listing routes",
                    source,
                })
            }
        };
        routes.extend(msgs.iter().filter_map(|m| unicast_main_route(m, v4)));
    }
    Ok(NetView {
        links,
        local,
        routes,
    })
}

/// Whether a route (dumped or announced) belongs to the main table, the only one
/// the choice reads.
pub fn in_main_table(m: &RouteMessage) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    table == MAIN_TABLE
}

fn unicast_main_route(m: &RouteMessage, v4: bool) -> Option<Route> {
    if !in_main_table(m) || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst: IpAddr = if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let mut oifs = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = (*ip).into(),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = (*ip).into(),
            RouteAttribute::Oif(i) => oifs.push(*i),
            RouteAttribute::MultiPath(hops) => {
                oifs.extend(hops.iter().map(|h| h.interface_index));
            }
            _ => {}
        }
    }
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    Some(Route { dst, oifs })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test topology's host: eth0 towards the balancer, gw0 the default route,
    /// app0 a container's veth, tun0 a non-Ethernet device.
    fn host() -> NetView {
        let link = |index, name: &str, ether| Link {
            index,
            name: name.into(),
            ether,
        };
        let route = |dst: &str, oif| Route {
            dst: dst.parse().unwrap(),
            oifs: vec![oif],
        };
        NetView {
            links: vec![
                link(1, "lo", false),
                link(2, "eth0", true),
                link(3, "gw0", true),
                link(4, "app0", true),
                link(5, "tun0", false),
            ],
            local: [
                "127.0.0.1",
                "::1",
                "192.0.2.2",
                "203.0.113.2",
                "203.0.113.129",
            ]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
            routes: vec![
                route("192.0.2.0/24", 2),
                route("203.0.113.0/24", 3),
                route("203.0.113.128/25", 4),
                route("0.0.0.0/0", 3),
                route("2001:db8:1::/64", 2),
                route("::/0", 3),
                route("10.9.0.0/16", 5),
            ],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn decide(
        view: &NetView,
        targets: &[IpAddr],
        udp: bool,
        explicit: &[String],
    ) -> Result<ReturnInterfaces, IfaceError> {
        let policy = ReturnPolicy {
            targets: targets.to_vec(),
            udp,
            explicit: explicit.to_vec(),
        };
        super::decide(view, &policy, Stage::StartUp)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn loopback_tcp_targets_need_nothing() {
        let r = decide(&host(), &[ip("127.0.0.1"), ip("::1")], false, &[]).unwrap();
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn loopback_udp_and_local_targets_use_the_default_route_egress() {
        let r = decide(&host(), &[ip("127.0.0.1")], true, &[]).unwrap();
        assert_eq!(r.egress, set(&["gw0"]));
        let r = decide(&host(), &[ip("192.0.2.2")], false, &[]).unwrap();
        assert_eq!(r.egress, set(&["gw0"]));
        assert!(r.ingress.is_empty());
    }

    #[test]
    fn missing_default_route_is_noted_only_for_non_loopback_targets() {
        let mut v = host();
        v.routes.retain(|r| r.dst.prefix_len() != 0);
        let r = decide(&v, &[ip("::1")], true, &[]).unwrap();
        assert!(r.is_empty() && r.notes.is_empty(), "{r:?}");
        let r = decide(&v, &[ip("192.0.2.2")], true, &[]).unwrap();
        assert_eq!(r.notes.len(), 1, "{r:?}");
    }

    #[test]
    fn remote_target_uses_ingress_of_its_route() {
        let r = decide(&host(), &[ip("203.0.113.130"), ip("::1")], false, &[]).unwrap();
        assert_eq!(r.ingress, set(&["app0"]));
        assert!(r.egress.is_empty());
        let r = decide(&host(), &[ip("10.9.0.1")], false, &[]).unwrap();
        assert!(r.is_empty() && r.notes.len() == 1, "{r:?}");
    }

    #[test]
    fn explicit_interfaces_get_both_and_are_checked() {
        let r = decide(&host(), &[], false, &["eth0".into()]).unwrap();
        assert_eq!(r.egress, set(&["eth0"]));
        assert_eq!(r.ingress, set(&["eth0"]));
        assert!(matches!(
            decide(&host(), &[], false, &["nope".into()]),
            Err(IfaceError::NoSuchInterface(_))
        ));
        assert!(matches!(
            decide(&host(), &[], false, &["tun0".into()]),
            Err(IfaceError::NotEthernet(_))
        ));
    }

    #[test]
    fn a_new_veth_a_moved_default_route_and_a_new_address_change_the_choice() {
        let targets = [ip("203.0.113.140"), ip("2001:db8:e::7")];
        let mut v = host();
        // Before the container's veth exists the default route carries both.
        v.routes.retain(|r| r.oifs != vec![4]);
        let r = decide(&v, &targets, false, &[]).unwrap();
        assert_eq!(r.ingress, set(&["gw0"]));
        // The veth and its /25: the IPv4 target moves there.
        v.routes.push(Route {
            dst: "203.0.113.128/25".parse().unwrap(),
            oifs: vec![4],
        });
        let r = decide(&v, &targets, false, &[]).unwrap();
        assert_eq!(r.ingress, set(&["app0", "gw0"]));
        // The IPv6 target becomes one of the host's own addresses: placement (a).
        v.local.push(ip("2001:db8:e::7"));
        let r = decide(&v, &targets, false, &[]).unwrap();
        assert_eq!((r.egress, r.ingress), (set(&["gw0"]), set(&["app0"])));
        // The default route moves to eth0: so does the egress program.
        for r in v.routes.iter_mut().filter(|r| r.dst.prefix_len() == 0) {
            r.oifs = vec![2];
        }
        let r = decide(&v, &targets, false, &[]).unwrap();
        assert_eq!((r.egress, r.ingress), (set(&["eth0"]), set(&["app0"])));
    }

    #[test]
    fn a_vanished_return_interface_is_fatal_at_start_up_only() {
        let policy = ReturnPolicy {
            targets: vec![],
            udp: false,
            explicit: vec!["gone0".into()],
        };
        assert!(super::decide(&host(), &policy, Stage::StartUp).is_err());
        let r = super::decide(&host(), &policy, Stage::Running).unwrap();
        assert!(r.is_empty() && r.notes.len() == 1, "{r:?}");
    }

    #[test]
    fn udp_offers_the_relay_every_ethernet_interface_and_lo_egress() {
        let r = decide(&host(), &[ip("127.0.0.1")], true, &[]).unwrap();
        assert_eq!(r.udp_in, set(&["app0", "eth0", "gw0"]));
        assert_eq!(r.lo_egress, set(&["lo"]));
        let r = decide(&host(), &[ip("127.0.0.1")], false, &[]).unwrap();
        assert!(r.udp_in.is_empty() && r.lo_egress.is_empty(), "{r:?}");
    }

    #[test]
    fn only_tcp_with_loopback_targets_never_steers() {
        let policy = |targets: &[&str], udp, explicit: &[&str]| ReturnPolicy {
            targets: targets.iter().map(|t| ip(t)).collect(),
            udp,
            explicit: explicit.iter().map(|s| s.to_string()).collect(),
        };
        assert!(!policy(&["127.0.0.1", "::1"], false, &[]).may_steer());
        assert!(!policy(&["::ffff:127.0.0.1"], false, &[]).may_steer());
        assert!(policy(&["127.0.0.1", "::1"], true, &[]).may_steer());
        assert!(policy(&["127.0.0.1", "::1"], false, &["eth0"]).may_steer());
        assert!(policy(&["127.0.0.1", "203.0.113.130"], false, &[]).may_steer());
    }
}
