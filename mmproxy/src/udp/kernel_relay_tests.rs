//! The UDP proxy's half of `--udp-datapath kernel`, against a fake kernel that
//! records what it is given.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::ebpf::{HeldPunts, RelayError};
use crate::proxy_protocol::DecodeOptions;
use crate::transparent::Upstream;
use crate::udp::cmsg::LocalDst;
use crate::udp::flow_table::FlowTable;
use mmproxy_common::RELEASE_ANYWAY;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Add(RelayFlow),
    Remove(RelayFlow),
}

/// Records adds and removes; `last_active` as set per client address. Every add
/// holds the flow (the next generation, nothing counted) until the test says
/// otherwise; releases are recorded, not acted on.
#[derive(Debug, Default)]
pub(crate) struct FakeRelay {
    pub(crate) events: Mutex<Vec<Event>>,
    pub(crate) active: Mutex<HashMap<SocketAddr, Duration>>,
    pub(crate) refuse: AtomicBool,
    pub(crate) holds: Mutex<HashMap<SocketAddr, HeldPunts>>,
    pub(crate) releases: Mutex<Vec<(SocketAddr, HeldPunts)>>,
    /// As the kernel's LRU map may do: every flow's entries are gone.
    pub(crate) lost: AtomicBool,
    generation: std::sync::atomic::AtomicU32,
}

impl FakeRelay {
    pub(crate) fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The flows added and not removed since.
    pub(crate) fn live(&self) -> Vec<RelayFlow> {
        let mut live = Vec::new();
        for e in self.events() {
            match e {
                Event::Add(f) => live.push(f),
                Event::Remove(f) => live.retain(|l| *l != f),
            }
        }
        live
    }

    pub(crate) fn releases(&self) -> Vec<(SocketAddr, HeldPunts)> {
        self.releases.lock().unwrap().clone()
    }

    /// As the kernel does for each datagram of a held flow it leaves to user space.
    pub(crate) fn count_punt(&self, client: SocketAddr) {
        if let Some(h) = self.holds.lock().unwrap().get_mut(&client) {
            h.punts += 1;
        }
    }

    /// As the kernel does at the flow's next datagram after a matching release.
    pub(crate) fn let_go(&self, client: SocketAddr) {
        self.holds.lock().unwrap().remove(&client);
    }

    pub(crate) fn set_active(&self, client: SocketAddr, at: Duration) {
        self.active.lock().unwrap().insert(client, at);
    }
}

impl UdpRelay for FakeRelay {
    fn add(&self, flow: &RelayFlow) -> Result<(), RelayError> {
        if self.refuse.load(Ordering::Relaxed) {
            return Err(RelayError::NoRoute(flow.target));
        }
        self.events.lock().unwrap().push(Event::Add(*flow));
        self.lost.store(false, Ordering::Relaxed);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.holds.lock().unwrap().insert(
            flow.client,
            HeldPunts {
                generation,
                punts: 0,
            },
        );
        Ok(())
    }

    fn held(&self, flow: &RelayFlow) -> Option<HeldPunts> {
        self.holds.lock().unwrap().get(&flow.client).copied()
    }

    fn release(&self, flow: &RelayFlow, held: HeldPunts) {
        self.releases.lock().unwrap().push((flow.client, held));
    }

    fn remove(&self, flow: &RelayFlow) {
        self.events.lock().unwrap().push(Event::Remove(*flow));
    }

    fn last_active(&self, flow: &RelayFlow) -> Option<Duration> {
        self.active.lock().unwrap().get(&flow.client).copied()
    }

    fn current(&self, flow: &RelayFlow) -> bool {
        !self.lost.load(Ordering::Relaxed) && self.live().contains(flow)
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(crate) fn ctx_with(relay: &Arc<FakeRelay>, target_port: u16) -> UdpContext {
    let relay: Arc<dyn UdpRelay> = relay.clone();
    UdpContext {
        upstream: Upstream::loopback(Some(target_port), Some(target_port)),
        mark: 0x17,
        idle: Duration::from_secs(1),
        flows_per_listener: 4,
        header: DecodeOptions::datagram(),
        stats: Arc::new(Stats::default()),
        relay: Some(relay),
        clock: Clock::new(),
    }
}

/// A datagram from 192.0.2.1:5000 to 192.0.2.2 (interface 7), sent to port `port`
/// of a listener on 8443, with a header from `client` to 203.0.113.5:443.
fn arrival(port: Option<u16>) -> Arrival {
    let local: IpAddr = "192.0.2.2".parse().unwrap();
    Arrival {
        source: addr("192.0.2.1:5000"),
        reply_key: ReplyKey {
            local: Some(LocalDst {
                addr: local,
                ifindex: 7,
            }),
            orig_dst: port.map(|p| SocketAddr::new(local, p)),
        },
        listening_port: 8443,
        header_dst: Some(OrigDstAddr(addr("203.0.113.5:443"))),
    }
}

const CLIENT: &str = "198.51.100.9:41000";

fn open(ctx: &UdpContext, arrival: &Arrival) -> Option<KernelHalf> {
    let client = ClientAddr(addr(CLIENT));
    let target = UpstreamAddr(addr("127.0.0.1:9000"));
    KernelHalf::open(
        ctx,
        arrival,
        client,
        client.0,
        target,
        &mut LogLimit::default(),
        0,
    )
}

#[test]
fn proxy_flows_are_registered_with_what_the_kernel_matches_and_local_ones_not() {
    let relay = Arc::new(FakeRelay::default());
    let ctx = ctx_with(&relay, 9000);
    let half = open(&ctx, &arrival(None)).unwrap();
    let want = RelayFlow {
        proxy: addr("192.0.2.1:5000"),
        // No ORIGDSTADDR: the listening socket's own port.
        local: addr("192.0.2.2:8443"),
        ifindex: 7,
        client: addr(CLIENT),
        orig_dst: addr("203.0.113.5:443"),
        bound: addr(CLIENT),
        target: addr("127.0.0.1:9000"),
        mark: 0x17,
    };
    assert_eq!(half.registered(), Some(&want));
    assert_eq!(relay.events(), [Event::Add(want)]);
    drop(half);
    assert_eq!(relay.events(), [Event::Add(want), Event::Remove(want)]);

    // A port of a range: the port the proxy sent to.
    let half = open(&ctx, &arrival(Some(8450))).unwrap();
    assert_eq!(half.registered().unwrap().local, addr("192.0.2.2:8450"));

    // LOCAL (no header addresses): nothing for the kernel.
    let mut local = arrival(None);
    local.header_dst = None;
    assert!(open(&ctx, &local).is_none());
    // The socket datapath: nothing either.
    let mut socket = ctx_with(&relay, 9000);
    socket.relay = None;
    assert!(open(&socket, &arrival(None)).is_none());
    assert_eq!(relay.live().len(), 1, "{:?}", relay.events());
    assert_eq!(ctx.stats.udp_kernel_refused.load(Ordering::Relaxed), 0);
}

#[test]
fn a_new_destination_port_replaces_the_registration() {
    let relay = Arc::new(FakeRelay::default());
    let ctx = ctx_with(&relay, 9000);
    let mut half = open(&ctx, &arrival(None)).unwrap();
    let first = *half.registered().unwrap();
    let client = ClientAddr(addr(CLIENT));
    let target = UpstreamAddr(addr("127.0.0.1:9000"));
    let mut log = LogLimit::default();
    // The same destination again (a punted datagram): nothing changes.
    half.follow(&ctx, &arrival(None), client, target, &mut log, 1);
    assert_eq!(relay.events().len(), 1);
    // Another port: the old entries go before the new ones come (they share the
    // answers' key).
    half.follow(&ctx, &arrival(Some(8444)), client, target, &mut log, 2);
    let second = *half.registered().unwrap();
    assert_eq!(second.local, addr("192.0.2.2:8444"));
    assert_eq!(
        relay.events(),
        [Event::Add(first), Event::Remove(first), Event::Add(second)]
    );
    // Nothing changed, a second later, and the kernel still has it (the datagram
    // came to user space for another reason): left alone, not held anew.
    half.follow(&ctx, &arrival(Some(8444)), client, target, &mut log, 1002);
    assert_eq!(relay.events().len(), 3);
    // The kernel's LRU map dropped it: handed over again, without removing it
    // first, at most once a second.
    relay.lost.store(true, Ordering::Relaxed);
    half.follow(&ctx, &arrival(Some(8444)), client, target, &mut log, 1500);
    assert_eq!(relay.events().len(), 3, "at most once a second");
    half.follow(&ctx, &arrival(Some(8444)), client, target, &mut log, 2003);
    assert_eq!(relay.events().len(), 4);
    assert_eq!(relay.events()[3], Event::Add(second));
    // Another target port (taken from the header): replaced too.
    let target2 = UpstreamAddr(addr("127.0.0.1:9001"));
    half.follow(&ctx, &arrival(Some(8444)), client, target2, &mut log, 2100);
    assert_eq!(half.registered().unwrap().target, target2.0);
    assert_eq!(relay.live(), [*half.registered().unwrap()]);
}

#[test]
fn a_refused_flow_is_counted_once_and_goes_on_in_user_space() {
    let relay = Arc::new(FakeRelay::default());
    relay.refuse.store(true, Ordering::Relaxed);
    let ctx = ctx_with(&relay, 9000);
    let mut half = open(&ctx, &arrival(None)).unwrap();
    assert!(half.registered().is_none());
    let refused = || ctx.stats.udp_kernel_refused.load(Ordering::Relaxed);
    assert_eq!(refused(), 1);
    let client = ClientAddr(addr(CLIENT));
    let target = UpstreamAddr(addr("127.0.0.1:9000"));
    let mut log = LogLimit::default();
    // Not offered again while nothing changed.
    half.follow(&ctx, &arrival(None), client, target, &mut log, 1);
    assert_eq!(refused(), 1);
    // Offered again once something did, and taken.
    relay.refuse.store(false, Ordering::Relaxed);
    half.follow(&ctx, &arrival(Some(8444)), client, target, &mut log, 2);
    assert!(half.registered().is_some());
    assert_eq!(refused(), 1);
    // Without PKTINFO the flow cannot be described: refused, counted.
    let mut blind = arrival(None);
    blind.reply_key.local = None;
    assert!(open(&ctx, &blind).unwrap().registered().is_none());
    assert_eq!(refused(), 2);
}

/// The sweep and the eviction read activity as the listener does
/// (`Flow::last_active`, here on the kernel half alone).
#[test]
fn kernel_activity_keeps_a_flow_alive_and_expiry_and_eviction_remove_it() {
    let relay = Arc::new(FakeRelay::default());
    let mut ctx = ctx_with(&relay, 9000);
    // The daemon started at CLOCK_MONOTONIC 1000 s.
    ctx.clock.monotonic_start = Duration::from_secs(1000);
    let clock = ctx.clock;
    let activity = |k: &KernelHalf| k.last_active(&clock);
    let mut table = FlowTable::new(2);
    let flow = |client: &str| {
        let c = ClientAddr(addr(client));
        KernelHalf::open(
            &ctx,
            &arrival(None),
            c,
            c.0,
            UpstreamAddr(addr("127.0.0.1:9000")),
            &mut LogLimit::default(),
            0,
        )
        .unwrap()
    };
    let (a, b, c) = (
        addr("198.51.100.1:1"),
        addr("198.51.100.2:2"),
        addr("198.51.100.3:3"),
    );
    table.insert(1, flow("198.51.100.1:1"), 0);
    table.insert(2, flow("198.51.100.2:2"), 100);
    let idle = 1000;
    // Flow 1, last seen by the table at 0, was relayed by the kernel at 1000 s +
    // 1.5 s: alive at 2 s although --close-after is 1 s. Flow 2 was idle all along
    // (kernel and table): it goes, both halves with it.
    relay.set_active(a, Duration::from_millis(1_001_500));
    let mut gone = Vec::new();
    table.expire(2000, idle, activity, |k, v| gone.push((k, v)));
    assert_eq!(gone.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [2]);
    drop(gone);
    let live: Vec<_> = relay.live().iter().map(|f| f.client).collect();
    assert_eq!(live, [a]);
    assert_eq!(table.len(), 1);

    // Eviction: the table's least recently used (1, seen at 0 by the table) is busy
    // in the kernel; 3 is the really idle one and goes when 4 comes.
    table.insert(3, flow("198.51.100.3:3"), 2700);
    relay.set_active(a, Duration::from_millis(1_002_800));
    let evicted = table.pop_idlest(8, |used, k| used.max(activity(k)));
    assert_eq!(evicted.as_ref().map(|(k, _)| *k), Some(3));
    drop(evicted);
    assert!(table.insert(4, flow("198.51.100.4:4"), 2900).is_none());
    let live: Vec<_> = relay.live().iter().map(|f| f.client).collect();
    assert!(!live.contains(&c) && !live.contains(&b), "{live:?}");
    assert!(live.contains(&a), "{live:?}");
    // Once the kernel is idle too, expiry takes it.
    let mut gone = Vec::new();
    table.expire(10_000, idle, activity, |k, _| gone.push(k));
    gone.sort();
    assert_eq!(gone, [1, 4]);
    assert!(relay.live().is_empty(), "{:?}", relay.events());
}

#[test]
fn kernel_times_are_put_on_the_listeners_clock() {
    let clock = Clock::new();
    let now = super::super::monotonic_now();
    let ms = clock.ms_of_monotonic(now);
    assert!(ms <= clock.now_ms() + 1, "{ms} vs {}", clock.now_ms());
    assert_eq!(clock.ms_of_monotonic(Duration::ZERO), 0);
}

/// Waits (bounded) until `done` holds; panics with `what` otherwise.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A listener on 0.0.0.0 (an ephemeral port) with the fake kernel, and a proxy
/// socket on 127.0.0.1 sending PROXY v2 datagrams from [`CLIENT`].
struct FakeListener {
    relay: Arc<FakeRelay>,
    ctx: Arc<UdpContext>,
    port: u16,
    proxy: tokio::net::UdpSocket,
    dgram: Vec<u8>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FakeListener {
    async fn start() -> Self {
        use crate::proxy_protocol::{Transport, V2Builder};

        let relay = Arc::new(FakeRelay::default());
        // Nothing listens on the target: the datagrams are sent and lost.
        let ctx = Arc::new(ctx_with(&relay, 9));
        let mut sockets = crate::udp::bind_udp(addr("0.0.0.0:0"), 1).unwrap();
        let port = sockets[0].local_addr().unwrap().port();
        let socket = tokio::net::UdpSocket::from_std(sockets.remove(0)).unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::udp::serve_udp(
            socket,
            ctx.clone(),
            |_| true,
            shutdown.clone(),
        ));
        let proxy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut dgram = V2Builder::proxy(addr(CLIENT), addr("203.0.113.5:443"))
            .transport(Transport::Dgram)
            .build()
            .unwrap();
        dgram.extend_from_slice(b"payload");
        FakeListener {
            relay,
            ctx,
            port,
            proxy,
            dgram,
            shutdown,
            task,
        }
    }

    fn sent(&self) -> u64 {
        self.ctx.stats.udp_datagrams_sent.load(Ordering::Relaxed)
    }

    /// Sends `datagram` to the listener at 127.0.0.`host` and waits until the
    /// listener has sent its payload on.
    async fn send(&self, datagram: &[u8], host: u8) {
        let before = self.sent();
        let to = SocketAddr::new(IpAddr::from([127, 0, 0, host]), self.port);
        self.proxy.send_to(datagram, to).await.unwrap();
        wait_for("the datagram sent on", || self.sent() > before).await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// The whole listener path with the fake kernel, in a network namespace of its own
/// (transparent upstream sockets bound to a documentation client address): a PROXY
/// flow is registered before its first datagram leaves, with the interface and the
/// address the proxy sent to; a datagram to another local address moves the
/// registration; a LOCAL flow is never registered; closing the listener takes
/// every registration back.
#[test]
fn the_listener_hands_proxy_flows_to_the_kernel_and_takes_them_back() {
    crate::testing::in_netns("udp_kernel_relay_listener", |_, _| async move {
        use crate::proxy_protocol::V2Builder;

        let l = FakeListener::start().await;
        let relay = l.relay.clone();
        l.send(&l.dgram, 1).await;
        // SAFETY: a NUL-terminated string.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(lo, 0);
        let first = RelayFlow {
            proxy: l.proxy.local_addr().unwrap(),
            local: SocketAddr::new("127.0.0.1".parse().unwrap(), l.port),
            ifindex: lo,
            client: addr(CLIENT),
            orig_dst: addr("203.0.113.5:443"),
            bound: addr(CLIENT),
            target: addr("127.0.0.1:9"),
            mark: 0x17,
        };
        assert_eq!(relay.events(), [Event::Add(first)]);

        // The same flow sent to another local address: the kernel follows.
        l.send(&l.dgram, 2).await;
        let second = RelayFlow {
            local: SocketAddr::new("127.0.0.2".parse().unwrap(), l.port),
            ..first
        };
        assert_eq!(
            relay.events(),
            [Event::Add(first), Event::Remove(first), Event::Add(second)]
        );

        // LOCAL: a flow of its own, in user space only.
        let mut local = V2Builder::local().build().unwrap();
        local.extend_from_slice(b"health");
        l.send(&local, 1).await;
        assert_eq!(l.ctx.stats.udp_flows_created.load(Ordering::Relaxed), 2);
        assert_eq!(relay.live(), [second]);

        let ctx = l.ctx.clone();
        l.stop().await;
        assert!(relay.live().is_empty(), "{:?}", relay.events());
        assert_eq!(ctx.stats.udp_kernel_refused.load(Ordering::Relaxed), 0);
    });
}

/// The listener ends the kernel's hold on a flow (`super::release`) with exactly
/// what the kernel had counted once it has taken those datagrams and found its
/// queue empty: a new flow with nothing counted, a re-registration under its new
/// generation, and a held flow whose datagrams the kernel counted with that
/// count; a flow counted anew before every release is released anyway after
/// `EXACT_ATTEMPTS`. A flow the kernel has let go is not released again.
#[test]
fn the_listener_releases_held_flows_with_the_kernels_count() {
    crate::testing::in_netns("udp_kernel_relay_release", |_, _| async move {
        let l = FakeListener::start().await;
        let relay = l.relay.clone();
        let client = addr(CLIENT);
        let held = |generation, punts| (client, HeldPunts { generation, punts });
        let released = || l.ctx.stats.udp_kernel_released.load(Ordering::Relaxed);

        l.send(&l.dgram, 1).await;
        wait_for("the new flow released", || released() == 1).await;
        assert_eq!(relay.releases(), [held(1, 0)]);

        // Registered anew (another local address): generation 2, released anew.
        l.send(&l.dgram, 2).await;
        wait_for("the new registration released", || released() == 2).await;
        assert_eq!(relay.releases(), [held(1, 0), held(2, 0)]);

        // The kernel held on and left two more datagrams to user space.
        relay.count_punt(client);
        relay.count_punt(client);
        l.send(&l.dgram, 2).await;
        l.send(&l.dgram, 2).await;
        wait_for("the counted datagrams released", || released() >= 3).await;
        assert_eq!(relay.releases().last(), Some(&held(2, 2)));

        // Counted again before every release: the flow never pauses. After
        // EXACT_ATTEMPTS releases in all, the next ends the hold whatever the count.
        // (The first release was generation 1's.)
        while relay.releases().len() < 1 + usize::from(crate::udp::release::EXACT_ATTEMPTS) {
            relay.count_punt(client);
            let n = released();
            l.send(&l.dgram, 2).await;
            wait_for("released again", || released() > n).await;
        }
        assert!(relay
            .releases()
            .iter()
            .skip(1)
            .all(|(_, h)| h.punts != RELEASE_ANYWAY));
        let n = released();
        l.send(&l.dgram, 2).await;
        wait_for("released anyway", || released() > n).await;
        assert_eq!(
            relay.releases().last(),
            Some(&held(2, RELEASE_ANYWAY)),
            "{:?}",
            relay.releases()
        );

        // Let go: a datagram that still reaches user space (punted for another
        // reason) asks the kernel once and releases nothing.
        relay.let_go(client);
        let before = relay.releases().len();
        l.send(&l.dgram, 2).await;
        l.send(&l.dgram, 2).await;
        assert_eq!(relay.releases().len(), before, "{:?}", relay.releases());
        l.stop().await;
    });
}
