//! What the benchmark reads from the kernel: a process's CPU time and memory, the
//! kernel's slab memory, and the machine it runs on. Also CPU pinning and limits.
use std::fs;

use anyhow::{Context, Result};

/// Pins the calling thread (and threads it spawns later) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is checked against the set's capacity by CPU_SET's own bound.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid for the call.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        anyhow::bail!(
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sets the calling thread's nice value (Linux: per thread).
pub fn nice_current_thread(nice: i32) -> Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        anyhow::bail!("setpriority({nice}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// With scheduler autogroups (kernel.sched_autogroup_enabled), nice values only
/// order threads within a session: sets this session's group nice as well, so the
/// benchmark's processes get their share against other sessions' builds. Without
/// autogroups the file is absent and this does nothing.
pub fn nice_autogroup(nice: i32) {
    if std::path::Path::new("/proc/self/autogroup").exists() {
        let _ = fs::write("/proc/self/autogroup", nice.to_string());
    }
}

/// Raises the descriptor limit as far as allowed: to `want` (soft and hard) with
/// CAP_SYS_RESOURCE, else the soft limit to the hard one. Children (the proxies)
/// inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads the struct for the call only.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        return Ok(want);
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    cur.rlim_cur = cur.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &cur) } != 0 {
        anyhow::bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    }
    Ok(cur.rlim_cur)
}

/// Ticks per second of /proc/<pid>/stat times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPUs online: what the machine-wide busy time of `/proc/stat` is shared by.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// User + system CPU seconds of process `pid` (all its threads), from /proc.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (1-based) are utime and stime; `rest` starts at field 3.
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc/<pid>/stat")?
            .parse::<u64>()
            .context("utime/stime")
    };
    Ok((get(14)? + get(15)?) as f64 / clock_ticks())
}

/// A `VmXxx:` line of /proc/<pid>/status, in KiB.
pub fn status_kib(pid: i32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    field_kib(&status, key).with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS.
pub fn reset_peak_rss(pid: i32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The kernel's slab memory (reclaimable and not), in KiB: where socket, file,
/// inode, epoll and pipe structures live.
pub fn slab_kib() -> Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    field_kib(&meminfo, "Slab:").context("no Slab: in /proc/meminfo")
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Descriptors the process has open.
pub fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The machine, for the record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub load_before: String,
    pub load_after: String,
    /// RLIMIT_NOFILE the proxies ran with.
    pub nofile: u64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib = field_kib(&meminfo, "MemTotal:").unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpu_model,
            memory_gib: mem_kib as f64 / 1024.0 / 1024.0,
            load_before: loadavg(),
            load_after: String::new(),
            nofile: 0,
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id() as i32;
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(status_kib(pid, "VmRSS:").unwrap() > 0);
        assert!(slab_kib().unwrap() > 0);
    }

    #[test]
    fn field_parsing() {
        assert_eq!(
            field_kib("VmHWM:\t  1234 kB\nVmRSS: 9 kB", "VmRSS:"),
            Some(9)
        );
        assert_eq!(field_kib("", "VmRSS:"), None);
    }
}
