//! The kernel's `UDP_RELAY` map behind [`UdpRelay`]: what the tc programs do with
//! each half of a flow the UDP proxy hands over (`--udp-datapath kernel`).
//!
//! The inbound half needs the interface the flow's datagrams leave through. The
//! upstream socket would have let the kernel route them; the tc program cannot
//! route into `lo` for a local target (`bpf_redirect_neigh` looks routes up with
//! the interface as output device, and a local address of eth0 is not on lo), so
//! the choice is made here, once per target, by asking the kernel's routing
//! table (`RTM_GETROUTE`, as `ip route get` does): a `local` route means the
//! target is this host, anything else is sent over the route's interface.
//!
//! A local target is delivered into `lo`'s ingress (`RELAY_TO_LO`), except a
//! loopback one: input routing treats 127.0.0.0/8 arriving from a device as
//! martian (unless `route_localnet`), so those are sent through `lo` as output,
//! `bpf_redirect_neigh` to `lo` (whose own local route matches it), and arrive with
//! the output route attached, as the upstream socket's datagrams do.
//!
//! Answers leave through the interface the proxy's datagram arrived on. Their
//! next hop (the proxy itself when on-link, else the route's gateway, as the
//! kernel routes from the address the proxy sent to) is asked for once per proxy,
//! local address and interface and, when the kernel has already resolved that
//! neighbour (`super::neighbour`, asked at every hand-over), put in the action, so
//! the tc program skips the route lookup `bpf_redirect_neigh` would make for every
//! answer. It holds for the routes of its *epoch*: a change of the host's network
//! bumps `Config::route_epoch` ([`KernelUdpRelay::forget_routes`]), and the tc
//! program routes the answers of flows handed over before one by one again.
use std::collections::HashMap as StdHashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use mmproxy_common::{RelayAction, RelayKey, RelayRelease, RELAY_HELD, RELAY_NEXTHOP, RELAY_TO_LO};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::udp_relay::{key_addr, HeldPunts, RelayError, RelayFlow, UdpRelay};

/// Route answers kept at most; beyond it the cache starts over (a
/// `-dynamic-destination` proxy may see many targets).
const ROUTE_CACHE_MAX: usize = 4096;

/// Where the relay sends a flow's datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The target is this host (loopback or one of its addresses): into `lo`.
    Local,
    /// Out of this interface, to the target or its gateway.
    Via(u32),
}

/// The `UDP_RELAY` and `UDP_RELEASE` maps, and what adding a flow needs to know.
pub struct KernelUdpRelay {
    map: Mutex<HashMap<MapData, RelayKey, RelayAction>>,
    release: Mutex<HashMap<MapData, RelayKey, RelayRelease>>,
    /// The last registration's number ([`RelayAction::generation`]).
    generation: AtomicU32,
    lo_ifindex: u32,
    /// Placement by (target address, mark): a mark can select another table.
    routes: Mutex<StdHashMap<(IpAddr, u32), Placement>>,
    /// Answers' next hop by (proxy address, local address, interface); `None`:
    /// let the kernel route each answer.
    nexthops: Mutex<StdHashMap<(IpAddr, IpAddr, u32), Option<IpAddr>>>,
    /// The routes' epoch the cached next hops belong to (`Config::route_epoch`).
    epoch: AtomicU32,
}

impl fmt::Debug for KernelUdpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelUdpRelay")
            .field("lo_ifindex", &self.lo_ifindex)
            .finish_non_exhaustive()
    }
}

impl KernelUdpRelay {
    pub fn new(
        map: HashMap<MapData, RelayKey, RelayAction>,
        release: HashMap<MapData, RelayKey, RelayRelease>,
        lo_ifindex: u32,
    ) -> Self {
        Self {
            map: Mutex::new(map),
            release: Mutex::new(release),
            generation: AtomicU32::new(0),
            lo_ifindex,
            routes: Mutex::new(StdHashMap::new()),
            nexthops: Mutex::new(StdHashMap::new()),
            epoch: AtomicU32::new(0),
        }
    }

    /// Forgets the cached routes: the host's network changed (`crate::netwatch`),
    /// and new flows must see the new routes. Returns the new routes' epoch, for
    /// `Config::route_epoch`: answers of flows relayed already keep their
    /// interface, but not a next hop chosen before.
    pub fn forget_routes(&self) -> u32 {
        lock(&self.routes).clear();
        lock(&self.nexthops).clear();
        // After the clear: an add that reads the new epoch looks its next hop up anew.
        self.epoch.fetch_add(1, Ordering::SeqCst).wrapping_add(1)
    }

    /// Each change is one map call: nothing to repair after a panic elsewhere.
    fn map(&self) -> MutexGuard<'_, HashMap<MapData, RelayKey, RelayAction>> {
        lock(&self.map)
    }

    fn placement(&self, target: SocketAddr, mark: u32) -> Result<Placement, RelayError> {
        let ip = crate::addr::canonical(target).ip();
        if let Some(p) = lock(&self.routes).get(&(ip, mark)) {
            return Ok(*p);
        }
        let p = match route_get(ip, mark) {
            Ok(Some(Placement::Local)) if ip.is_loopback() => Placement::Via(self.lo_ifindex),
            Ok(Some(p)) => p,
            Ok(None) => return Err(RelayError::NoRoute(target)),
            Err(source) => return Err(RelayError::Route { target, source }),
        };
        let mut routes = lock(&self.routes);
        if routes.len() >= ROUTE_CACHE_MAX {
            routes.clear();
        }
        routes.insert((ip, mark), p);
        Ok(p)
    }

    /// The next hop of answers from `local` to `proxy` out of `ifindex` (from
    /// `local`: source-based rules may pick another gateway). Any doubt (no route,
    /// another interface, a lookup error) leaves it to the kernel's per-packet
    /// lookup, which is what the relay did without it.
    fn answer_nexthop(&self, proxy: SocketAddr, local: SocketAddr, ifindex: u32) -> Option<IpAddr> {
        let ip = crate::addr::canonical(proxy).ip();
        let src = crate::addr::canonical(local).ip();
        if let Some(nh) = lock(&self.nexthops).get(&(ip, src, ifindex)) {
            return *nh;
        }
        let nh = route_query(ip, 0, Some(ifindex), Some(src))
            .ok()
            .flatten()
            .and_then(|r| nexthop_of(&r, ip, ifindex));
        let mut cache = lock(&self.nexthops);
        if cache.len() >= ROUTE_CACHE_MAX {
            cache.clear();
        }
        cache.insert((ip, src, ifindex), nh);
        nh
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The two halves of `flow`, delivered by `placement` (`lo_ifindex` for
/// [`Placement::Local`]), registration number `generation`, the inbound half held,
/// answers through `answer_nh` (chosen under routes' epoch `route_epoch`) when
/// known. `None` for a flow that changes family.
pub fn actions(
    flow: &RelayFlow,
    placement: Placement,
    lo_ifindex: u32,
    generation: u32,
    answer_nh: Option<IpAddr>,
    route_epoch: u32,
) -> Option<[(RelayKey, RelayAction); 2]> {
    let family = flow.family()?;
    let inbound = flow.inbound_key()?;
    let outbound = flow.outbound_key()?;
    let (flags, ifindex) = match placement {
        Placement::Local => (RELAY_TO_LO, lo_ifindex),
        Placement::Via(i) => (0, i),
    };
    let action = |src: SocketAddr, dst: SocketAddr, ifindex, mark, flags| {
        let (src_addr, src_port) = key_addr(src);
        let (dst_addr, dst_port) = key_addr(dst);
        RelayAction {
            last_ns: 0,
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            ifindex,
            mark,
            flags,
            family,
            _pad: [0; 2],
            generation,
            route_epoch,
            held_punts: 0,
            nh_addr: [0; 16],
        }
    };
    let mut answer = action(flow.local, flow.proxy, flow.ifindex, 0, 0);
    if let Some(nh) = answer_nh {
        let (nh_addr, _) = key_addr(SocketAddr::new(nh, 0));
        answer.flags |= RELAY_NEXTHOP;
        answer.nh_addr = nh_addr;
    }
    Some([
        // As the upstream socket sends: from the client's address it is bound to.
        (
            inbound,
            action(
                flow.bound,
                flow.target,
                ifindex,
                flow.mark,
                flags | RELAY_HELD,
            ),
        ),
        // As the listening socket answers: from where the proxy sent to, back out
        // of the interface its datagram came in on.
        (outbound, answer),
    ])
}

impl UdpRelay for KernelUdpRelay {
    fn add(&self, flow: &RelayFlow) -> Result<(), RelayError> {
        if flow.family().is_none() {
            return Err(RelayError::MixedFamily);
        }
        let placement = self.placement(flow.target, flow.mark)?;
        // Before the next hop is looked up: a network change in between then makes
        // the kernel ignore it rather than use a stale one.
        let epoch = self.epoch.load(Ordering::SeqCst);
        // Named only while the kernel has the neighbour's address (see
        // `super::neighbour`): an answer queued for resolution would be lost.
        let nh = self
            .answer_nexthop(flow.proxy, flow.local, flow.ifindex)
            .filter(|nh| super::neighbour::resolved(*nh, flow.ifindex));
        // A release left from an earlier registration of the same key names
        // another generation, so the new one starts held whatever the LRU kept.
        let generation = self
            .generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let halves = actions(flow, placement, self.lo_ifindex, generation, nh, epoch)
            .ok_or(RelayError::MixedFamily)?;
        let mut map = self.map();
        // The answers' half first: once the inbound half is in, answers come.
        for (key, action) in halves.iter().rev() {
            map.insert(key, action, 0).map_err(RelayError::Map)?;
        }
        Ok(())
    }

    fn held(&self, flow: &RelayFlow) -> Option<HeldPunts> {
        let key = flow.inbound_key()?;
        let action = self.map().get(&key, 0).ok()?;
        (action.flags & RELAY_HELD != 0).then_some(HeldPunts {
            generation: action.generation,
            punts: action.held_punts,
        })
    }

    fn release(&self, flow: &RelayFlow, held: HeldPunts) {
        let Some(key) = flow.inbound_key() else {
            return;
        };
        let value = RelayRelease {
            generation: held.generation,
            _pad: 0,
            taken: held.punts,
        };
        // A failed write (the LRU is busy) leaves the flow held: its next datagram
        // comes to user space, which releases again.
        let _ = lock(&self.release).insert(key, value, 0);
    }

    fn remove(&self, flow: &RelayFlow) {
        let mut map = self.map();
        for key in [flow.inbound_key(), flow.outbound_key()]
            .into_iter()
            .flatten()
        {
            // Already gone (the LRU evicted it) is fine.
            let _ = map.remove(&key);
        }
    }

    fn last_active(&self, flow: &RelayFlow) -> Option<Duration> {
        let map = self.map();
        let last = [flow.inbound_key(), flow.outbound_key()]
            .into_iter()
            .flatten()
            .filter_map(|k| map.get(&k, 0).ok())
            .map(|a| a.last_ns)
            .max()
            .unwrap_or(0);
        (last != 0).then(|| Duration::from_nanos(last))
    }

    fn current(&self, flow: &RelayFlow) -> bool {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let map = self.map();
        [flow.inbound_key(), flow.outbound_key()]
            .into_iter()
            .all(|k| k.is_some_and(|k| map.get(&k, 0).is_ok_and(|a| a.route_epoch == epoch)))
    }
}

/// Where the kernel would route a datagram to `ip` with `mark`: `Ok(None)` when
/// it has no route (unreachable, prohibited, blackhole).
pub fn route_get(ip: IpAddr, mark: u32) -> io::Result<Option<Placement>> {
    Ok(route_query(ip, mark, None, None)?.and_then(|r| classify(&r)))
}

/// The kernel's route to `ip` with `mark` (out of `oif`, from `src`, if given), as
/// `ip route get` asks for it; `Ok(None)` when there is none.
fn route_query(
    ip: IpAddr,
    mark: u32,
    oif: Option<u32>,
    src: Option<IpAddr>,
) -> io::Result<Option<RouteMessage>> {
    let mut msg = RouteMessage::default();
    let (family, prefix, dst) = match ip {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = prefix;
    msg.attributes.push(RouteAttribute::Destination(dst));
    if mark != 0 {
        msg.attributes.push(RouteAttribute::Mark(mark));
    }
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(src) = src {
        msg.header.source_prefix_length = prefix;
        msg.attributes.push(RouteAttribute::Source(match src {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        }));
    }
    let absent = [
        libc::ENETUNREACH,
        libc::EHOSTUNREACH,
        libc::EACCES,
        libc::EINVAL,
    ];
    match super::rtnl_query::ask(RouteNetlinkMessage::GetRoute(msg), &absent)? {
        Some(RouteNetlinkMessage::NewRoute(r)) => Ok(Some(r)),
        None => Ok(None),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected answer to RTM_GETROUTE",
        )),
    }
}

/// A route's answer as a placement: `local` is this host, a unicast route its
/// output interface; anything else cannot be relayed.
pub fn classify(r: &RouteMessage) -> Option<Placement> {
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    match r.header.kind {
        RouteType::Local => Some(Placement::Local),
        RouteType::Unicast => oif.map(Placement::Via),
        _ => None,
    }
}

/// The neighbour a route to `dst` out of `ifindex` sends to: its gateway, or `dst`
/// itself on-link. `None` unless it is a plain unicast route out of `ifindex` whose
/// gateway is of `dst`'s family.
pub fn nexthop_of(r: &RouteMessage, dst: IpAddr, ifindex: u32) -> Option<IpAddr> {
    if r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    let mut gateway = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            // An IPv4 route via an IPv6 gateway, or anything else unusual.
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => return None,
            _ => {}
        }
    }
    if oif != Some(ifindex) {
        return None;
    }
    let nh = gateway.unwrap_or(dst);
    (nh.is_ipv4() == dst.is_ipv4()).then_some(nh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmproxy_common::{FAMILY_V4, FAMILY_V6, RELAY_IN, RELAY_OUT};

    fn flow(proxy: &str, local: &str, client: &str, target: &str) -> RelayFlow {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        RelayFlow {
            proxy: p(proxy),
            local: p(local),
            ifindex: 7,
            client: p(client),
            orig_dst: p(local),
            bound: p(client),
            target: p(target),
            mark: 0x42,
        }
    }

    #[test]
    fn inbound_goes_from_the_client_to_the_target_outbound_from_local_to_the_proxy() {
        let f = flow(
            "192.0.2.1:5000",
            "192.0.2.2:8443",
            "198.51.100.9:41000",
            "203.0.113.130:9000",
        );
        let [(ik, ia), (ok, oa)] = actions(&f, Placement::Via(4), 1, 9, None, 0).unwrap();
        assert_eq!((ik.direction, ok.direction), (RELAY_IN, RELAY_OUT));
        assert_eq!(Some(ik), f.inbound_key());
        assert_eq!(Some(ok), f.outbound_key());
        assert_eq!(&ia.src_addr[..4], &[198, 51, 100, 9]);
        assert_eq!(ia.src_port, 41000u16.to_be());
        assert_eq!(&ia.dst_addr[..4], &[203, 0, 113, 130]);
        assert_eq!(ia.dst_port, 9000u16.to_be());
        // The inbound half starts held (earlier datagrams may be queued in user
        // space); the answers' half never is.
        assert_eq!(
            (ia.ifindex, ia.flags, ia.mark, ia.family),
            (4, RELAY_HELD, 0x42, FAMILY_V4)
        );
        assert_eq!((ia.generation, ia.held_punts), (9, 0));
        assert_eq!((oa.generation, oa.held_punts), (9, 0));
        assert_eq!(&oa.src_addr[..4], &[192, 0, 2, 2]);
        assert_eq!(oa.src_port, 8443u16.to_be());
        assert_eq!(&oa.dst_addr[..4], &[192, 0, 2, 1]);
        assert_eq!(oa.dst_port, 5000u16.to_be());
        // Answers leave where the proxy's datagram came in; --mark is for the
        // upstream side only.
        assert_eq!((oa.ifindex, oa.flags, oa.mark, oa.last_ns), (7, 0, 0, 0));
    }

    #[test]
    fn a_local_target_is_delivered_into_lo() {
        let f = flow(
            "[2001:db8::1]:5000",
            "[2001:db8::2]:8443",
            "[2001:db8:9::9]:41000",
            "[::1]:9000",
        );
        let [(_, ia), (_, oa)] = actions(&f, Placement::Local, 1, 9, None, 0).unwrap();
        assert_eq!(
            (ia.flags, ia.ifindex, ia.family),
            (RELAY_TO_LO | RELAY_HELD, 1, FAMILY_V6)
        );
        assert_eq!(
            ia.dst_addr,
            "::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(oa.flags, 0);
    }

    #[test]
    fn a_flow_that_changes_family_has_no_actions() {
        let f = flow(
            "192.0.2.1:5000",
            "192.0.2.2:8443",
            "[2001:db8::9]:41000",
            "[::1]:9000",
        );
        assert!(actions(&f, Placement::Local, 1, 9, None, 0).is_none());
    }

    #[test]
    fn key_and_action_survive_the_byte_round_trip_the_map_makes() {
        let f = flow(
            "192.0.2.1:5000",
            "192.0.2.2:8443",
            "198.51.100.9:41000",
            "127.0.0.1:9000",
        );
        for (k, a) in actions(&f, Placement::Local, 1, 9, None, 0).unwrap() {
            let kb = bytemuck::bytes_of(&k).to_vec();
            let ab = bytemuck::bytes_of(&a).to_vec();
            assert_eq!(*bytemuck::from_bytes::<RelayKey>(&kb), k);
            assert_eq!(*bytemuck::from_bytes::<RelayAction>(&ab), a);
        }
    }

    #[test]
    fn local_routes_go_into_lo_unicast_out_of_their_interface_others_nowhere() {
        let route = |kind, oif: Option<u32>| {
            let mut r = RouteMessage::default();
            r.header.kind = kind;
            r.attributes.extend(oif.map(RouteAttribute::Oif));
            r
        };
        assert_eq!(
            classify(&route(RouteType::Local, Some(1))),
            Some(Placement::Local)
        );
        assert_eq!(
            classify(&route(RouteType::Unicast, Some(5))),
            Some(Placement::Via(5))
        );
        assert_eq!(classify(&route(RouteType::Unicast, None)), None);
        assert_eq!(classify(&route(RouteType::BlackHole, None)), None);
        assert_eq!(classify(&route(RouteType::Unreachable, None)), None);
    }

    #[test]
    fn answers_carry_the_next_hop_when_one_is_known() {
        let f = flow(
            "192.0.2.1:5000",
            "192.0.2.2:8443",
            "198.51.100.9:41000",
            "127.0.0.1:9000",
        );
        let gw: IpAddr = "192.0.2.254".parse().unwrap();
        let [(_, ia), (_, oa)] = actions(&f, Placement::Local, 1, 9, Some(gw), 5).unwrap();
        assert_eq!(oa.flags, RELAY_NEXTHOP);
        assert_eq!(&oa.nh_addr[..4], &[192, 0, 2, 254]);
        assert_eq!(&oa.nh_addr[4..], &[0; 12]);
        // Valid only under the routes it was chosen with.
        assert_eq!(oa.route_epoch, 5);
        // The inbound half is untouched.
        assert_eq!((ia.flags, ia.nh_addr), (RELAY_TO_LO | RELAY_HELD, [0; 16]));
        let [_, (_, oa)] = actions(&f, Placement::Local, 1, 9, None, 0).unwrap();
        assert_eq!((oa.flags, oa.nh_addr), (0, [0; 16]));
    }

    #[test]
    fn the_next_hop_is_the_gateway_or_the_proxy_on_link_and_only_out_of_its_interface() {
        let route = |kind, oif: u32, gw: Option<IpAddr>| {
            let mut r = RouteMessage::default();
            r.header.kind = kind;
            r.attributes.push(RouteAttribute::Oif(oif));
            r.attributes
                .extend(gw.map(|g| RouteAttribute::Gateway(RouteAddress::from(g))));
            r
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("192.0.2.1");
        assert_eq!(
            nexthop_of(&route(RouteType::Unicast, 7, None), proxy, 7),
            Some(proxy)
        );
        assert_eq!(
            nexthop_of(
                &route(RouteType::Unicast, 7, Some(ip("192.0.2.254"))),
                proxy,
                7
            ),
            Some(ip("192.0.2.254"))
        );
        let proxy6 = ip("2001:db8::1");
        assert_eq!(
            nexthop_of(
                &route(RouteType::Unicast, 7, Some(ip("fe80::1"))),
                proxy6,
                7
            ),
            Some(ip("fe80::1"))
        );
        // Another interface than the answers leave through, a local proxy, an IPv4
        // route through an IPv6 gateway: the kernel routes those answers itself.
        assert_eq!(
            nexthop_of(&route(RouteType::Unicast, 8, None), proxy, 7),
            None
        );
        assert_eq!(
            nexthop_of(&route(RouteType::Local, 7, None), proxy, 7),
            None
        );
        assert_eq!(
            nexthop_of(&route(RouteType::Unicast, 7, Some(ip("fe80::1"))), proxy, 7),
            None
        );
    }

    /// Loopback is local in every namespace; run in one of its own anyway, as
    /// every privileged test does.
    #[test]
    fn the_kernel_says_loopback_is_local() {
        crate::testing::in_netns("the_kernel_says_loopback_is_local", |_, _| async {
            let lo = route_get("127.0.0.1".parse().unwrap(), 0).unwrap();
            assert_eq!(lo, Some(Placement::Local));
            // lo is up in the test namespace, but nothing else is: no route.
            assert_eq!(route_get("192.0.2.77".parse().unwrap(), 0).unwrap(), None);
        });
    }

    #[test]
    fn the_kernel_gives_answers_the_proxy_on_link_and_the_gateway_beyond() {
        crate::testing::in_netns("answers_next_hop", |_, _| async {
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(st.success(), "ip {args:?}");
            };
            ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
            ip(&["addr", "add", "192.0.2.2/24", "dev", "d0"]);
            ip(&["link", "set", "d1", "up"]);
            ip(&["link", "set", "d0", "up"]);
            ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.254"]);
            let name = std::ffi::CString::new("d0").unwrap();
            // SAFETY: a NUL-terminated name; the lookup is in this thread's namespace.
            let d0 = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(d0, 0);
            // Answers from a second address leave through another gateway.
            ip(&["addr", "add", "192.0.2.3/24", "dev", "d0"]);
            ip(&[
                "route",
                "add",
                "198.51.100.0/24",
                "via",
                "192.0.2.253",
                "table",
                "77",
            ]);
            ip(&["rule", "add", "from", "192.0.2.3", "table", "77"]);
            let nh_from = |dst: &str, oif, src: Option<&str>| {
                let dst: IpAddr = dst.parse().unwrap();
                let src = src.map(|s| s.parse::<IpAddr>().unwrap());
                route_query(dst, 0, Some(oif), src)
                    .unwrap()
                    .and_then(|r| nexthop_of(&r, dst, oif))
            };
            let nh = |dst: &str, oif| nh_from(dst, oif, None);
            assert_eq!(nh("192.0.2.1", d0), Some("192.0.2.1".parse().unwrap()));
            assert_eq!(nh("198.51.100.7", d0), Some("192.0.2.254".parse().unwrap()));
            assert_eq!(
                nh_from("198.51.100.7", d0, Some("192.0.2.2")),
                Some("192.0.2.254".parse().unwrap())
            );
            assert_eq!(
                nh_from("198.51.100.7", d0, Some("192.0.2.3")),
                Some("192.0.2.253".parse().unwrap())
            );
            // This host's own address: delivered locally, no neighbour to send to.
            assert_eq!(nh("192.0.2.2", d0), None);
        });
    }
}
