//! CPU time spent during a measured interval, three ways:
//!
//! - the proxy process's own (user + sys of all its threads, `/proc/<pid>/stat`);
//! - the whole machine's: every CPU's busy time from the first line of `/proc/stat`
//!   (user, nice, system, irq, softirq, steal; idle and iowait left out). Work the
//!   kernel does in softirq context or in tc programs is charged to whichever task
//!   was running, or to no task at all, so once a proxy moves work into the kernel
//!   its process time no longer tells its cost; the machine's busy time does, taken
//!   against the same workload without a proxy;
//! - everything else's: the CPU time of user processes other than the benchmark and
//!   the proxy, as a measure of how much other work on a shared machine went into
//!   the machine-wide figure (kernel threads are left out of it: ksoftirqd does the
//!   benchmark's own softirq work when it overflows).
use std::collections::BTreeMap;
use std::fs;

use super::sys;

/// The counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    proxy_s: Option<f64>,
    machine_s: Option<f64>,
    /// pid → (parent pid, CPU seconds of the process and of its reaped children).
    others: BTreeMap<i32, (i32, f64)>,
}

/// CPU seconds spent between two snapshots.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Used {
    /// The proxy process (None without a proxy).
    pub proxy_s: Option<f64>,
    /// All CPUs' busy time.
    pub machine_s: Option<f64>,
    /// User processes other than the benchmark's own and the proxy.
    pub others_s: Option<f64>,
}

impl Snapshot {
    /// Reads the counters now; `proxy` is the proxy's pid, if there is one.
    pub fn take(proxy: Option<i32>) -> Snapshot {
        Snapshot {
            proxy_s: proxy.and_then(|p| sys::cpu_seconds(p).ok()),
            machine_s: fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| machine_busy_ticks(&s))
                .map(|t| t as f64 / sys::clock_ticks()),
            others: others(proxy),
        }
    }

    /// What was spent from `self` to `later`.
    pub fn until(&self, later: &Snapshot) -> Used {
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        Used {
            proxy_s: delta(self.proxy_s, later.proxy_s),
            machine_s: delta(self.machine_s, later.machine_s),
            others_s: Some(others_delta(&self.others, &later.others)),
        }
    }
}

/// Busy ticks of all CPUs together from the text of `/proc/stat`: user, nice,
/// system, irq, softirq and steal of the `cpu` line (guest time is already inside
/// user and nice).
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied())
        .sum::<Option<u64>>()
}

/// Every user process but this one and `proxy`: its parent and its CPU seconds with
/// those of the children it has reaped (so the compiler a build ran and waited for
/// during the interval is counted in the build's figure).
fn others(proxy: Option<i32>) -> BTreeMap<i32, (i32, f64)> {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    let ticks = sys::clock_ticks();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && Some(pid) != proxy)
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, t) = parse_stat(&stat)?;
            // Kernel threads (children of kthreadd, pid 2) and kthreadd itself.
            (ppid != 2 && pid != 2).then_some((pid, (ppid, t as f64 / ticks)))
        })
        .collect()
}

/// (ppid, utime + stime + cutime + cstime) of a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); ppid is field 4, utime..cstime 14..17.
    let field = |n: usize| f.get(n - 3).copied();
    let ppid = field(4)?.parse().ok()?;
    let t = (14..=17)
        .map(|n| field(n)?.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((ppid, t))
}

/// CPU seconds the other processes spent between two scans. A process gone by the
/// second scan had its total added to its parent's reaped-children time when it was
/// waited for: what it had spent before the interval is taken off its parent's
/// figure again. A process new in the second scan started during the interval.
fn others_delta(before: &BTreeMap<i32, (i32, f64)>, after: &BTreeMap<i32, (i32, f64)>) -> f64 {
    let mut total = 0.0;
    for (pid, (_, t1)) in after {
        total += t1 - before.get(pid).map_or(0.0, |(_, t0)| *t0);
    }
    for (pid, (ppid, t0)) in before {
        if !after.contains_key(pid) && after.contains_key(ppid) {
            total -= t0;
        }
    }
    total.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_idle_and_iowait_out() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 9 0\ncpu0 5 0 2 500 3 1 1 2 4 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(10 + 1 + 5 + 2 + 3 + 4));
        assert_eq!(machine_busy_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(machine_busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn stat_fields_follow_the_last_parenthesis() {
        let line = "42 (a) b) (c) S 7 42 42 0 -1 4194560 100 0 0 0 11 12 13 14 20 0 1 0";
        assert_eq!(parse_stat(line), Some((7, 11 + 12 + 13 + 14)));
        assert_eq!(parse_stat("42 (x) S 7"), None);
    }

    #[test]
    fn a_reaped_childs_earlier_time_is_not_counted_twice() {
        let before = BTreeMap::from([(10, (1, 5.0)), (11, (10, 3.0))]);
        // 11 ran 1 s more, exited and was reaped by 10 (cutime += 4); 10 ran 0.5 s;
        // 12 started and ran 2 s.
        let after = BTreeMap::from([(10, (1, 9.5)), (12, (10, 2.0))]);
        let d = others_delta(&before, &after);
        assert!((d - 3.5).abs() < 1e-9, "{d}");
    }

    #[test]
    fn a_snapshot_reads_the_machine_and_the_other_processes() {
        let a = Snapshot::take(Some(std::process::id() as i32));
        let used = a.until(&Snapshot::take(None));
        assert!(used.machine_s.is_some_and(|m| m >= 0.0));
        assert!(used.others_s.is_some_and(|o| o >= 0.0));
        // The proxy's counter needs both ends.
        assert_eq!(used.proxy_s, None);
    }
}
