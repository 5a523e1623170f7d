//! Process-wide counters: every accepted flow, every rejection by reason, and the
//! two latency histograms.
//!
//! Plain relaxed atomics: they are read only for the periodic stats line and metrics,
//! so no ordering with other memory is needed. Labelled counts (header errors by kind,
//! connect failures by errno class) are fixed arrays indexed by an enum, so counting
//! stays one `fetch_add` and the label set stays bounded.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::proxy_protocol::Invalid;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// One counter per event; see each field.
        #[derive(Debug)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Headers that can never become valid, by [`Invalid::index`].
            pub rejected_invalid_header: [AtomicU64; Invalid::KINDS.len()],
            /// Upstream connects that failed, by [`ConnectFailure`].
            pub upstream_connect_failed: [AtomicU64; ConnectFailure::ALL.len()],
            /// From accept to a complete header (connections that got one).
            pub header_duration: Histogram,
            /// Upstream connect() calls that succeeded, from the socket's creation.
            pub upstream_connect_duration: Histogram,
        }

        impl Default for Stats {
            fn default() -> Self {
                Self {
                    $($name: AtomicU64::new(0),)*
                    rejected_invalid_header: std::array::from_fn(|_| AtomicU64::new(0)),
                    upstream_connect_failed: std::array::from_fn(|_| AtomicU64::new(0)),
                    header_duration: Histogram::default(),
                    upstream_connect_duration: Histogram::default(),
                }
            }
        }

        impl Stats {
            /// (name, value) for every counter, in declaration order, then the totals
            /// of the labelled arrays.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![
                    $((stringify!($name), self.$name.load(Ordering::Relaxed)),)*
                    ("rejected_invalid_header", sum(&self.rejected_invalid_header)),
                    ("upstream_connect_failed", sum(&self.upstream_connect_failed)),
                ]
            }
        }
    };
}

fn sum(counters: &[AtomicU64]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

counters! {
    /// TCP connections accepted from the listen socket.
    tcp_accepted,
    /// TCP connections whose header was valid and whose upstream connected.
    tcp_proxied,
    /// TCP connections open right now (gauge).
    tcp_active,
    /// accept() failures (EMFILE, ENFILE, ENOBUFS…), each followed by a back-off.
    accept_errors,
    /// Connections or datagrams from a proxy outside --allowed-subnets.
    rejected_not_allowed,
    /// Connections closed before a complete header arrived.
    rejected_header_timeout,
    /// Connections closed by the peer before a complete header arrived.
    rejected_header_eof,
    /// Connections whose read failed (reset…) before a complete header arrived.
    rejected_read_error,
    /// Relays that ended with an I/O error rather than two clean half-closes.
    relay_errors,
    /// Bytes relayed client → upstream.
    bytes_up,
    /// Bytes relayed upstream → client.
    bytes_down,
    /// UDP datagrams received from proxies.
    udp_datagrams,
    /// UDP datagrams dropped: malformed, wrong transport or bad checksum.
    udp_dropped_invalid,
    /// UDP datagrams dropped: larger than the receive buffer (MSG_TRUNC).
    udp_dropped_oversized,
    /// UDP datagrams dropped: shorter than the header they start.
    udp_dropped_truncated,
    /// UDP datagrams dropped because the kernel gave no source address.
    udp_dropped_no_source,
    /// UDP payloads the kernel accepted for sending to the service.
    udp_datagrams_sent,
    /// UDP flows created.
    udp_flows_created,
    /// UDP flows closed for idleness.
    udp_flows_expired,
    /// UDP flows evicted because the flow table was full.
    udp_flows_evicted,
    /// UDP datagrams that could not be relayed upstream.
    udp_upstream_errors,
    /// UDP flows open right now (gauge).
    udp_flows_active,
    /// UDP answers relayed from the service back to a proxy.
    udp_replies,
    /// Datagrams reaching a flow's socket from another port than the one the flow
    /// sends to: not the service's answer, dropped.
    udp_replies_foreign,
    /// UDP answers that could not be sent back to the proxy.
    udp_reply_errors,
    /// UDP flows (or changes of one) the kernel datapath did not take
    /// (`--udp-datapath kernel`): relayed in user space instead.
    udp_kernel_refused,
    /// Releases of the kernel's hold the listeners wrote on flows handed to the
    /// kernel datapath, once the flow's earlier datagrams had been taken from the
    /// listening socket: the kernel relays the next if its count agrees.
    udp_kernel_released,
    /// Re-evaluations of the return path's interfaces after the host's links,
    /// addresses or routes changed (and the one at start-up).
    return_path_evaluations,
    /// Re-evaluations that attached or detached a tc program.
    return_path_updates,
    /// Re-evaluations that failed (netlink or an attachment); each is retried.
    return_path_errors,
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a header that can never become valid, under its kind.
    pub fn invalid_header(&self, e: &Invalid) {
        if let Some(c) = self.rejected_invalid_header.get(e.index()) {
            Self::inc(c);
        }
    }

    /// Counts a failed upstream connect under its class.
    pub fn connect_failed(&self, class: ConnectFailure) {
        if let Some(c) = self.upstream_connect_failed.get(class as usize) {
            Self::inc(c);
        }
    }

    /// `name=value` pairs for one log line, zero counters left out.
    pub fn render(&self) -> String {
        let mut line = String::new();
        for (name, value) in self.snapshot() {
            if value != 0 {
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(name);
                line.push('=');
                line.push_str(&value.to_string());
            }
        }
        line
    }
}

/// Why an upstream connect failed, by errno class: the `error` label of
/// `mmproxy_tcp_upstream_connect_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    HostUnreachable,
    NetUnreachable,
    AddrInUse,
    Permission,
    Other,
}

impl ConnectFailure {
    /// Every class, in the order of their slots.
    pub const ALL: [Self; 7] = [
        Self::Refused,
        Self::Timeout,
        Self::HostUnreachable,
        Self::NetUnreachable,
        Self::AddrInUse,
        Self::Permission,
        Self::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::HostUnreachable => "host_unreachable",
            Self::NetUnreachable => "net_unreachable",
            Self::AddrInUse => "addr_in_use",
            Self::Permission => "permission",
            Self::Other => "other",
        }
    }

    /// The class of an OS error number (`None`: not an OS error, `Other`).
    pub fn from_errno(errno: Option<i32>) -> Self {
        match errno {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::ETIMEDOUT) => Self::Timeout,
            Some(libc::EHOSTUNREACH | libc::EHOSTDOWN) => Self::HostUnreachable,
            Some(libc::ENETUNREACH | libc::ENETDOWN) => Self::NetUnreachable,
            // EADDRNOTAVAIL: the client's 4-tuple to this upstream is taken.
            Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL) => Self::AddrInUse,
            Some(libc::EPERM | libc::EACCES) => Self::Permission,
            _ => Self::Other,
        }
    }
}

/// Upper bounds of the duration histograms' buckets, in nanoseconds: 0.5 ms to 5 s.
/// A last bucket (+Inf) takes the rest.
pub const DURATION_BUCKETS_NS: [u64; 13] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// A lock-free histogram of durations: one atomic per bucket (not cumulative) and
/// the sum in nanoseconds; the count is the buckets' total. An observation is two
/// relaxed `fetch_add`s, so a scrape between them may see the count one ahead of
/// the sum, which the next scrape corrects.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = DURATION_BUCKETS_NS
            .iter()
            .position(|&le| ns <= le)
            .unwrap_or(DURATION_BUCKETS_NS.len());
        if let Some(b) = self.buckets.get(i) {
            Stats::inc(b);
        }
        Stats::add(&self.sum_ns, ns);
    }

    /// (sum in seconds, count, [(upper bound in seconds, count in that bucket)]), the
    /// last bound +Inf: what prometheus-client's histogram encoder takes.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bounds = DURATION_BUCKETS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(le, c)| (le, c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_non_zero_counters() {
        let s = Stats::default();
        Stats::inc(&s.tcp_accepted);
        Stats::add(&s.bytes_up, 10);
        assert_eq!(s.render(), "tcp_accepted=1 bytes_up=10");
    }

    #[test]
    fn labelled_counts_add_up_in_the_stats_line() {
        let s = Stats::default();
        s.invalid_header(&Invalid::NotProxyProtocol);
        s.invalid_header(&Invalid::V1NoCrlf);
        s.connect_failed(ConnectFailure::Refused);
        s.connect_failed(ConnectFailure::Other);
        s.connect_failed(ConnectFailure::Other);
        let slot = |i: usize| {
            s.rejected_invalid_header
                .get(i)
                .map(|c| c.load(Ordering::Relaxed))
        };
        assert_eq!(slot(Invalid::V1NoCrlf.index()), Some(1));
        assert_eq!(
            s.upstream_connect_failed
                .get(ConnectFailure::Other as usize)
                .map(|c| c.load(Ordering::Relaxed)),
            Some(2)
        );
        assert_eq!(
            s.render(),
            "rejected_invalid_header=2 upstream_connect_failed=3"
        );
    }

    #[test]
    fn errno_classes() {
        for (errno, class) in [
            (libc::ECONNREFUSED, ConnectFailure::Refused),
            (libc::ETIMEDOUT, ConnectFailure::Timeout),
            (libc::EHOSTUNREACH, ConnectFailure::HostUnreachable),
            (libc::ENETUNREACH, ConnectFailure::NetUnreachable),
            (libc::EADDRINUSE, ConnectFailure::AddrInUse),
            (libc::EADDRNOTAVAIL, ConnectFailure::AddrInUse),
            (libc::EPERM, ConnectFailure::Permission),
            (libc::EACCES, ConnectFailure::Permission),
            (libc::EMFILE, ConnectFailure::Other),
        ] {
            assert_eq!(ConnectFailure::from_errno(Some(errno)), class, "{errno}");
        }
        assert_eq!(ConnectFailure::from_errno(None), ConnectFailure::Other);
        for (i, c) in ConnectFailure::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn histogram_buckets_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // on the first bound: first bucket
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10)); // beyond the last bound: +Inf
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 10.0035).abs() < 1e-9, "{sum}");
        assert_eq!(buckets.len(), DURATION_BUCKETS_NS.len() + 1);
        assert_eq!(buckets.first(), Some(&(0.0005, 1)));
        assert_eq!(buckets.get(3), Some(&(0.005, 1)));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(buckets.iter().map(|(_, c)| c).sum::<u64>(), 3);
    }
}
