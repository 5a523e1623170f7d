//! What the UDP counters add up to in either datapath. With `--udp-datapath kernel`
//! a flow's first datagram goes through user space and the rest through the tc
//! programs, which count in their own counters; a test that asserts "datagrams
//! relayed" or "answers relayed" asserts the sum, so it holds in both datapaths.
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::daemon::{counter, Daemon};

/// Datagrams from proxies the daemon took in: read by user space or relayed by
/// the kernel.
pub fn datagrams_received(line: &str) -> u64 {
    counter(line, "udp_datagrams") + counter(line, "kernel_udp_relayed_in")
}

/// Datagrams sent on to the service: by the flow sockets or by the kernel.
pub fn datagrams_relayed(line: &str) -> u64 {
    counter(line, "udp_datagrams_sent") + counter(line, "kernel_udp_relayed_in")
}

/// Answers sent back to the balancer: by user space or by the kernel.
pub fn answers_relayed(line: &str) -> u64 {
    counter(line, "udp_replies") + counter(line, "kernel_udp_relayed_out")
}

/// Answers the tc programs carried back: the socket datapath's return-path counter
/// `name` (`kernel_return_redirected`, `kernel_return_marked`) plus the answers
/// the kernel relayed itself.
pub fn answers_by_tc(line: &str, name: &str) -> u64 {
    counter(line, name) + counter(line, "kernel_udp_relayed_out")
}

/// Asks for the counters until `total` of the stats line reaches `want`; the last
/// stats line.
pub fn wait_total(
    d: &Daemon,
    what: &str,
    total: impl Fn(&str) -> u64,
    want: u64,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = d.stats()?;
        if total(&line) >= want {
            return Ok(line);
        }
        if Instant::now() >= deadline {
            bail!("{what} did not reach {want} within {timeout:?}: {line}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
