//! Follows the host's network while the daemon runs, so the return path stays true:
//! a container's new veth gets the tc ingress program, a deleted interface's link is
//! dropped, a moved default route takes the egress program with it, and a target
//! address added to the host turns placement (c) into (a).
//!
//! Subscribed to rtnetlink's link, address and route groups of both families. An
//! event only says "something changed": [`DEBOUNCE`] after the first event of a
//! burst (later ones join it), the choice is made again from a fresh dump by the very function
//! start-up used ([`ReturnPolicy::choose`]) and the attachments are made equal to it
//! ([`KernelSide::set_return_path`]). A dump rather than the event's contents,
//! because events can be lost (the kernel reports an overrun, which triggers a
//! re-evaluation like any other event) and because the choice depends on the whole
//! table, not on one route.
//!
//! The routing rules do not depend on the host's addresses or routes: the `fwmark`
//! rule is installed whenever steering may ever be needed
//! ([`ReturnPolicy::may_steer`]), the loopback rules only depend on the targets. So
//! only the tc attachments follow the network.
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::AsyncSocket;
use rtnetlink::{Handle, MulticastGroup};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cli::{Args, Protocol};
use crate::ebpf::ifaces::{self, Stage};
use crate::ebpf::tc_links::{Direction, TcChanges};
use crate::ebpf::{KernelSide, ReturnInterfaces, ReturnPolicy};
use crate::stats::Stats;

/// How long after the first event of a burst (a veth pair, its addresses and
/// routes) the choice is made again, the burst's later events included. A window
/// from the first event rather than a wait for quiet: a host that never stops
/// changing still gets its change applied within a second, and at most five
/// re-evaluations a second.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// After a failed re-evaluation (a dump or an attachment failed), the next attempt.
const RETRY: Duration = Duration::from_secs(1);

/// The groups followed: links, addresses and routes of both families.
const GROUPS: [MulticastGroup; 5] = [
    MulticastGroup::Link,
    MulticastGroup::Ipv4Ifaddr,
    MulticastGroup::Ipv6Ifaddr,
    MulticastGroup::Ipv4Route,
    MulticastGroup::Ipv6Route,
];

/// A large receive buffer makes overruns (lost events) rare on a host that creates
/// many containers at once; they are handled anyway.
const RECV_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetwatchError {
    #[error("subscribing to rtnetlink's link, address and route events")]
    Subscribe(#[source] std::io::Error),
}

/// The running follower; dropping it stops following.
pub struct Follower {
    task: JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The return-path policy of a configuration: what start-up chooses with and what
/// the follower chooses with again.
pub fn policy(args: &Args) -> ReturnPolicy {
    ReturnPolicy {
        targets: vec![args.target4.addr, args.target6.addr],
        udp: args.protocol == Protocol::Udp,
        explicit: args.return_interfaces.clone(),
    }
}

/// Follows the network when the kernel side is loaded and answers may ever need
/// steering. Without a subscription the daemon keeps working with the interfaces
/// chosen at start-up, and says so.
pub async fn start(
    args: &Args,
    kernel: Option<&Arc<Mutex<KernelSide>>>,
    stats: &Arc<Stats>,
) -> Option<Follower> {
    let policy = policy(args);
    let kernel = kernel?;
    if !policy.may_steer() {
        return None;
    }
    match follow(policy, Arc::downgrade(kernel), stats.clone()).await {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(
                error = &e as &dyn std::error::Error,
                "return path: not following the host's network; the interfaces chosen \
                 at start-up stay as they are"
            );
            None
        }
    }
}

/// Subscribes, makes the choice once more (whatever changed between start-up's
/// choice and the subscription is caught here) and follows from then on. The
/// kernel side is held weakly: it goes away at shutdown whatever this task does.
pub async fn follow(
    policy: ReturnPolicy,
    kernel: Weak<Mutex<KernelSide>>,
    stats: Arc<Stats>,
) -> Result<Follower, NetwatchError> {
    let subscription = Subscription::open()?;
    let mut watch = Watch {
        policy,
        kernel,
        stats,
        notes: None,
    };
    let first = watch.evaluate(&subscription.handle).await;
    info!("return path: following the host's links, addresses and routes");
    Ok(Follower {
        task: tokio::spawn(watch.run(subscription, first)),
    })
}

type Messages = futures::channel::mpsc::UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

struct Subscription {
    handle: Handle,
    messages: Messages,
    connection: JoinHandle<()>,
}

impl Subscription {
    fn open() -> Result<Self, NetwatchError> {
        let (mut conn, handle, messages) =
            rtnetlink::new_multicast_connection(&GROUPS).map_err(NetwatchError::Subscribe)?;
        if let Err(e) = conn.socket_mut().socket_mut().set_rx_buf_sz(RECV_BUFFER) {
            debug!(
                error = &e as &dyn std::error::Error,
                "netlink receive buffer"
            );
        }
        Ok(Self {
            handle,
            messages,
            connection: tokio::spawn(conn),
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// What a re-evaluation ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Something failed: try again after [`RETRY`].
    Retry,
    /// The kernel side is gone (shutting down).
    Stop,
}

struct Watch {
    policy: ReturnPolicy,
    kernel: Weak<Mutex<KernelSide>>,
    stats: Arc<Stats>,
    /// The choice's notes last seen, so that each is warned about once; `None`
    /// before the first evaluation, whose notes start-up already logged.
    notes: Option<Vec<String>>,
}

impl Watch {
    async fn run(mut self, mut sub: Subscription, first: Outcome) {
        let mut due = match first {
            Outcome::Done => None,
            Outcome::Retry => Some(Instant::now() + RETRY),
            Outcome::Stop => return,
        };
        loop {
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = sub.messages.next() => match message {
                    Some((m, _)) => {
                        if triggers(&m) && due.is_none() {
                            due = Some(Instant::now() + DEBOUNCE);
                        }
                    }
                    None => {
                        warn!("return path: the netlink subscription ended; subscribing again");
                        sub = self.resubscribe().await;
                        due = Some(Instant::now());
                    }
                },
                () = sleep => {
                    due = match self.evaluate(&sub.handle).await {
                        Outcome::Done => None,
                        Outcome::Retry => Some(Instant::now() + RETRY),
                        Outcome::Stop => return,
                    };
                }
            }
        }
    }

    async fn resubscribe(&self) -> Subscription {
        loop {
            match Subscription::open() {
                Ok(s) => return s,
                Err(e) => {
                    Stats::inc(&self.stats.return_path_errors);
                    warn!(error = &e as &dyn std::error::Error, "return path");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Makes the choice from the namespace as it is now and applies it.
    async fn evaluate(&mut self, handle: &Handle) -> Outcome {
        if self.kernel.strong_count() == 0 {
            return Outcome::Stop;
        }
        Stats::inc(&self.stats.return_path_evaluations);
        let want = match self.policy.choose(Some(handle), Stage::Running).await {
            Ok(want) => want,
            Err(e) => {
                Stats::inc(&self.stats.return_path_errors);
                warn!(
                    error = &e as &dyn std::error::Error,
                    "return path: reading the host's network failed; trying again"
                );
                return Outcome::Retry;
            }
        };
        if let Some(seen) = &self.notes {
            for note in want.notes.iter().filter(|n| !seen.contains(n)) {
                warn!("return path: {note}");
            }
        }
        self.notes = Some(want.notes.clone());
        let Some(kernel) = self.kernel.upgrade() else {
            return Outcome::Stop;
        };
        let (changes, now) = {
            let mut k = kernel.lock().unwrap_or_else(PoisonError::into_inner);
            let changes = k.set_return_path(&want);
            (changes, k.return_interfaces())
        };
        self.report(&changes, &now)
    }

    fn report(&self, changes: &TcChanges, now: &ReturnInterfaces) -> Outcome {
        if !changes.is_empty() {
            Stats::inc(&self.stats.return_path_updates);
            info!(
                egress = %names(&now.egress),
                ingress = %names(&now.ingress),
                attached = %moves(&changes.attached),
                detached = %moves(&changes.detached),
                "return path updated"
            );
        } else {
            debug!("return path: unchanged");
        }
        if changes.failed.is_empty() {
            return Outcome::Done;
        }
        Stats::inc(&self.stats.return_path_errors);
        for e in &changes.failed {
            warn!(
                error = e as &dyn std::error::Error,
                "return path: trying again in {RETRY:?}"
            );
        }
        Outcome::Retry
    }
}

/// Whether a notification may change the choice. Routes of other tables (mmproxy's
/// own, the local table) do not; an overrun means events were lost.
fn triggers(m: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
    match &m.payload {
        NetlinkPayload::Overrun(_) => true,
        NetlinkPayload::InnerMessage(inner) => match inner {
            RouteNetlinkMessage::NewLink(_)
            | RouteNetlinkMessage::DelLink(_)
            | RouteNetlinkMessage::NewAddress(_)
            | RouteNetlinkMessage::DelAddress(_) => true,
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                ifaces::in_main_table(r)
            }
            _ => false,
        },
        _ => false,
    }
}

/// `a,b` or `none`, for the log line tests and operators read.
pub fn names(set: &std::collections::BTreeSet<String>) -> String {
    if set.is_empty() {
        return "none".to_owned();
    }
    set.iter().cloned().collect::<Vec<_>>().join(",")
}

fn moves(list: &[(Direction, String)]) -> String {
    if list.is_empty() {
        return "none".to_owned();
    }
    list.iter()
        .map(|(d, n)| format!("{n}/{}", d.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::neighbour::NeighbourMessage;
    use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};

    fn message(inner: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(inner)
    }

    fn route(table: u32) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.attributes.push(RouteAttribute::Table(table));
        r
    }

    #[test]
    fn links_addresses_and_main_table_routes_trigger_others_do_not() {
        assert!(triggers(&message(RouteNetlinkMessage::NewLink(
            LinkMessage::default()
        ))));
        assert!(triggers(&message(RouteNetlinkMessage::DelLink(
            LinkMessage::default()
        ))));
        assert!(triggers(&message(RouteNetlinkMessage::NewRoute(route(
            254
        )))));
        assert!(triggers(&message(RouteNetlinkMessage::DelRoute(route(
            254
        )))));
        // mmproxy's own table and the local table change when it installs its
        // routes or an address is added; the address event covers the latter.
        assert!(!triggers(&message(RouteNetlinkMessage::NewRoute(route(
            123
        )))));
        assert!(!triggers(&message(RouteNetlinkMessage::NewRoute(route(
            255
        )))));
        assert!(!triggers(&message(RouteNetlinkMessage::NewNeighbour(
            NeighbourMessage::default()
        ))));
        let overrun: NetlinkMessage<RouteNetlinkMessage> =
            NetlinkMessage::new(Default::default(), NetlinkPayload::Overrun(Vec::new()));
        assert!(triggers(&overrun));
    }

    #[test]
    fn log_fields_name_interfaces_and_directions() {
        let set = ["gw1", "app0"].iter().map(|s| s.to_string()).collect();
        assert_eq!(names(&set), "app0,gw1");
        assert_eq!(names(&Default::default()), "none");
        assert_eq!(
            moves(&[
                (Direction::Egress, "gw1".into()),
                (Direction::Ingress, "app0".into())
            ]),
            "gw1/egress,app0/ingress"
        );
    }
}
