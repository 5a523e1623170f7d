//! Process-wide counters: every accepted flow, every rejection by reason.
//!
//! Plain relaxed atomics: they are read only for the periodic stats line and metrics,
//! so no ordering with other memory is needed.
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// One counter per event; see each field.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Stats {
            /// (name, value) for every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
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
    /// Headers that can never become valid.
    rejected_invalid_header,
    /// Connections closed before a complete header arrived.
    rejected_header_timeout,
    /// Connections closed by the peer before a complete header arrived.
    rejected_header_eof,
    /// Upstream connect() refused, unreachable or timed out.
    upstream_connect_failed,
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
}
