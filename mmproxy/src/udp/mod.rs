//! The UDP proxy (`-p udp`, ARCHITECTURE.md, steps 1 to 5): every datagram from a
//! proxy carries one PROXY v2 DGRAM header; the payload is sent to the service from
//! the client's address, and the service's answers go back to the proxy, without a
//! header, from the address the proxy sent to.
//!
//! # Shape
//! - One task per listening socket (`--listeners N` SO_REUSEPORT sockets per `-l`,
//!   [`receive`]). It receives with recvmmsg(2) ([`batch`]), checks the proxy
//!   against the allow-list, decodes the header, finds or creates the flow and sends
//!   the payloads with sendmmsg(2), consecutive datagrams of one flow in one call
//!   (runs of equal size in one UDP GSO message, see [`batch::SendBatch`]).
//! - A flow is (proxy address, client address); LOCAL datagrams (health checks) have
//!   no client and share one flow per proxy address ([`flow`]). Each listener owns its
//!   own [`FlowTable`]: the kernel hashes a proxy's 4-tuple to one SO_REUSEPORT socket,
//!   so a flow's datagrams all reach the same task, and no lock is shared by
//!   listeners on the per-datagram path. `--max-flows` is split between the
//!   listening sockets; a full table evicts its least recently used flow.
//! - Each flow has its own upstream socket ([`crate::transparent`]): IP_TRANSPARENT,
//!   bound to the client's address and port, *unconnected*, so a service bound to a
//!   wildcard may answer from any of the host's addresses. Only answers from the port
//!   datagrams were sent to are relayed (anything else reaching the client's address
//!   and port on this host is not the service's answer); they are counted in
//!   `udp_replies_foreign`.
//! - Each flow's answers are read by a small task of its own ([`answers`]: recvmmsg
//!   into a per-thread buffer, sendmmsg through the listening socket with
//!   IP_PKTINFO / IPV6_PKTINFO naming the local address the proxy used, see
//!   [`cmsg`]).
//! - Answers leave from the address *and port* the proxy sent to. A port range is
//!   one socket on its first port that sk_lookup steers the whole range to, so a
//!   datagram may have been sent to another port than the socket's own: the
//!   listening socket receives IP_ORIGDSTADDR / IPV6_ORIGDSTADDR, and when that port
//!   differs, answers leave from a [`reply_socket`] bound to exactly that address and
//!   port (one per address and port per listener, shared by its flows, closed with
//!   the last of them) instead of the listening socket. A proxy that sends one
//!   client's datagrams to several ports (one flow) is answered from the port of its
//!   latest datagram, as the address already follows the latest datagram.
//! - Flows idle for `--close-after` seconds in both directions are closed by the
//!   listener task's periodic sweep; closing a flow aborts its task and closes its
//!   socket.
//!
//! Nothing a datagram contains can panic or stall a listener: invalid datagrams are
//! dropped and counted (`udp_dropped_invalid`), and per-datagram log lines are
//! rate-limited ([`limits`]) so a flood cannot flood the log.
mod answers;
mod batch;
pub mod cmsg;
mod flow;
pub mod flow_table;
mod kernel_relay;
mod limits;
mod receive;
mod release;
mod reply_socket;
mod sockaddr;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::Args;
use crate::ebpf::UdpRelay;
use crate::proxy_protocol::DecodeOptions;
use crate::stats::Stats;
use crate::transparent::Upstream;

pub use cmsg::LocalDst;
pub use flow_table::FlowTable;
pub use limits::raise_nofile_limit;
pub use receive::{bind_udp, bind_udp_with, serve_udp, serve_udp_draining};

/// Pause after an unexpected receive error, so a persistent one cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Everything the UDP listeners and flows share (read-only).
#[derive(Debug)]
pub struct UdpContext {
    pub upstream: Upstream,
    /// SO_MARK for transparent upstream sockets; 0 leaves the mark alone.
    pub mark: u32,
    /// `--close-after`: flows idle this long in both directions are closed.
    pub idle: Duration,
    /// Flow table size of each listening socket (`--max-flows` split between them).
    pub flows_per_listener: usize,
    /// The decoder's limits (v2 DGRAM only).
    pub header: DecodeOptions,
    pub stats: Arc<Stats>,
    /// `--udp-datapath kernel`: where flows with a client are handed to the tc
    /// programs after their first datagram ([`kernel_relay`]).
    pub relay: Option<Arc<dyn UdpRelay>>,
    clock: Clock,
}

impl UdpContext {
    pub fn from_args(args: &Args, stats: Arc<Stats>) -> Self {
        let sockets = args
            .listen
            .len()
            .saturating_mul(usize::from(args.listeners))
            .max(1);
        UdpContext {
            upstream: Upstream::from_args(args),
            mark: args.mark,
            // Zero would close every flow before its answer: one second is the least.
            idle: Duration::from_secs(args.close_after.max(1)),
            flows_per_listener: (args.max_flows / sockets).max(1),
            header: DecodeOptions::datagram().with_max_header_len(args.max_header_len),
            stats,
            relay: None,
            clock: Clock::new(),
        }
    }

    fn idle_ms(&self) -> u64 {
        u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX)
    }

    /// How often a listener looks for idle flows: a quarter of the idle time, between
    /// 100 ms and 1 s, so flows close at most ~25 % (or 1 s) late.
    fn sweep_every(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// Milliseconds since the daemon started: one clock for the listener's table and the
/// flows' answer tasks, small enough for an atomic.
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
    /// CLOCK_MONOTONIC at `start`, to put the kernel's `bpf_ktime_get_ns()` times on
    /// this clock ([`Clock::ms_of_monotonic`]).
    monotonic_start: Duration,
}

impl Clock {
    fn new() -> Self {
        // Instant is CLOCK_MONOTONIC on Linux, so reading both together fixes the
        // offset between them once.
        let monotonic_start = monotonic_now();
        Clock {
            start: Instant::now(),
            monotonic_start,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A CLOCK_MONOTONIC time as [`Clock::now_ms`] counts (0 before the start).
    fn ms_of_monotonic(&self, t: Duration) -> u64 {
        u64::try_from(t.saturating_sub(self.monotonic_start).as_millis()).unwrap_or(u64::MAX)
    }

    /// [`Clock::ms_of_monotonic`] in microseconds.
    fn us_of_monotonic(&self, t: Duration) -> u64 {
        u64::try_from(t.saturating_sub(self.monotonic_start).as_micros()).unwrap_or(u64::MAX)
    }
}

/// CLOCK_MONOTONIC now (zero if it cannot be read, which Linux never refuses).
fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}
