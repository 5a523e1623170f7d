//! What keeps a flood from exhausting the process: the descriptor limit raised for
//! `--max-flows`, and per-datagram log lines limited per listener.
use tracing::{debug, warn};

use crate::logging::CONN_TARGET;

/// Per-datagram log lines per listener per second; the rest are counted and summed
/// up in one line.
const LOG_LINES_PER_SEC: u32 = 10;

/// Every flow holds a descriptor, so `--max-flows` flows need that many more than
/// the usual soft limit of 1024. Raises the soft RLIMIT_NOFILE towards
/// `max_flows` plus headroom, up to the hard limit (as Go's runtime does for
/// go-mmproxy), and says so when the hard limit is too low.
pub fn raise_nofile_limit(max_flows: usize) {
    let want = libc::rlim_t::try_from(max_flows)
        .unwrap_or(libc::rlim_t::MAX)
        .saturating_add(1024);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let (cur, max) = (lim.rlim_cur, lim.rlim_max);
    if cur >= want {
        return;
    }
    let new = want.min(max);
    if new > cur {
        lim.rlim_cur = new;
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            debug!("descriptor limit raised from {cur} to {new} for UDP flows");
        }
    }
    if new < want {
        warn!(
            "descriptor limit {new} is below --max-flows + 1024 ({want}): new flows will fail \
             once it is reached (raise LimitNOFILE / ulimit -Hn, or lower --max-flows)"
        );
    }
}

/// At most [`LOG_LINES_PER_SEC`] per-datagram lines per listener per second; the
/// number left out is logged once the second is over.
#[derive(Debug, Default)]
pub(super) struct LogLimit {
    window_start: u64,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    pub(super) fn allow(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.window_start) >= 1000 {
            self.summarise(now_ms);
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new window if the current one is over, logging what it left out.
    pub(super) fn summarise(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.window_start) < 1000 {
            return;
        }
        if self.suppressed > 0 {
            warn!(target: CONN_TARGET, suppressed = self.suppressed,
                  "per-datagram log lines suppressed in the last second");
        }
        *self = LogLimit {
            window_start: now_ms,
            lines: 0,
            suppressed: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_lets_ten_per_second_through() {
        let mut l = LogLimit::default();
        let allowed = (0..100).filter(|i| l.allow(5 + i)).count();
        assert_eq!(allowed, 10);
        assert_eq!(l.suppressed, 90);
        assert!(l.allow(1100), "a new second starts afresh");
        assert_eq!(l.suppressed, 0);
    }
}
