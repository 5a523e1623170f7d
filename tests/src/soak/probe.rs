//! What the soak reads from a daemon: its Prometheus metrics (`--metrics`), its
//! resident memory and its open descriptors.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::sys;
use crate::daemon::Daemon;
use crate::netns::Netns;

/// One scrape: each series (`name{labels}`) and its value.
#[derive(Clone, Debug, Default)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut m = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    m.insert(series.to_owned(), v);
                }
            }
        }
        Self(m)
    }

    /// `mmproxy_<name>` (counters: `_total` included in `name`), 0 when absent.
    pub fn get(&self, name: &str) -> u64 {
        self.0
            .get(&format!("mmproxy_{name}"))
            .copied()
            .unwrap_or(0.0) as u64
    }

    /// `mmproxy_<name>{<label>="<value>"}`, 0 when absent.
    pub fn label(&self, name: &str, label: &str, value: &str) -> u64 {
        self.0
            .get(&format!("mmproxy_{name}{{{label}=\"{value}\"}}"))
            .copied()
            .unwrap_or(0.0) as u64
    }

    /// Every `label` value of `mmproxy_<name>` with its count.
    pub fn family(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        let prefix = format!("mmproxy_{name}{{{label}=\"");
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let value = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((value.to_owned(), *v as u64))
            })
            .collect()
    }

    pub fn sum(&self, name: &str, label: &str) -> u64 {
        self.family(name, label).values().sum()
    }
}

/// GET /metrics from inside `ns`.
pub fn scrape(ns: &Netns, addr: &str) -> Result<Scrape> {
    let addr = addr.to_owned();
    let text = ns.enter(move || -> Result<String> {
        let mut s = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })??;
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "/metrics answered {:?}",
            text.lines().next().unwrap_or_default()
        );
    }
    Ok(Scrape::parse(&text))
}

/// A daemon's process at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Process {
    pub alive: bool,
    pub rss_kib: u64,
    pub fds: usize,
    /// Of `fds`, the pipe ends: the TCP relay keeps up to `POOL_MAX` empty pipes per
    /// thread for reuse (mmproxy/src/tcp/relay.rs), so their number may rise with
    /// the load's concurrency up to that bound without being a leak.
    pub pipe_fds: usize,
    pub threads: u64,
}

/// Per-thread pool bound of the daemon's relay (`POOL_MAX` in
/// mmproxy/src/tcp/relay.rs), in pipes.
pub const RELAY_POOL_MAX: usize = 16;

impl Process {
    /// Descriptors other than pipe ends.
    pub fn other_fds(&self) -> usize {
        self.fds - self.pipe_fds.min(self.fds)
    }

    /// The most pipe descriptors the relay's pools may hold with no connection open.
    pub fn pipe_bound(&self) -> usize {
        2 * RELAY_POOL_MAX * self.threads as usize
    }
}

pub fn process(d: &Daemon) -> Process {
    let pid = d.pid();
    let alive = std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ");
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Process {
        alive,
        rss_kib: sys::status_kib(pid, "VmRSS:").unwrap_or(0),
        fds: links.len(),
        pipe_fds: links.iter().filter(|l| l.starts_with("pipe:")).count(),
        threads,
    }
}

/// What each of the process's descriptors is, fd numbers left out, sorted: the
/// target of its /proc link, and for a socket the table of the process's network
/// namespace that holds its inode, with its local address (hex, as the kernel
/// prints it). Two of these, diffed, name what a leak is made of.
pub fn descriptors(pid: i32) -> Vec<String> {
    let mut tables: Vec<(String, String)> = Vec::new();
    for t in [
        "tcp", "tcp6", "udp", "udp6", "raw", "raw6", "netlink", "unix",
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (inode, local) = match t {
                "netlink" => (f.get(9), f.get(1)),
                "unix" => (f.get(6), f.get(7)),
                _ => (f.get(9), f.get(1)),
            };
            if let Some(inode) = inode {
                tables.push((inode.to_string(), format!("{t} {}", local.unwrap_or(&"-"))));
            }
        }
    }
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    let inode = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'));
                    match inode.and_then(|i| tables.iter().find(|(n, _)| n == i)) {
                        Some((_, what)) => what.clone(),
                        None if l.starts_with("pipe:") => "pipe".into(),
                        None => l,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What `after` holds that `before` does not, and the reverse (multisets).
pub fn diff(before: &[String], after: &[String]) -> (Vec<String>, Vec<String>) {
    let mut gone: Vec<String> = before.to_vec();
    let mut added = Vec::new();
    for a in after {
        match gone.iter().position(|b| b == a) {
            Some(i) => {
                gone.swap_remove(i);
            }
            None => added.push(a.clone()),
        }
    }
    (added, gone)
}

#[cfg(test)]
mod tests {
    use super::Scrape;

    #[test]
    fn descriptor_lists_diff_as_multisets() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (added, gone) = super::diff(
            &v(&["pipe", "pipe", "udp a"]),
            &v(&["pipe", "udp a", "udp b"]),
        );
        assert_eq!((added, gone), (v(&["udp b"]), v(&["pipe"])));
        assert!(!super::descriptors(std::process::id() as i32).is_empty());
    }

    #[test]
    fn series_are_read_by_name_and_label() {
        let s = Scrape::parse(
            "# HELP x\nmmproxy_tcp_connections_accepted_total 12\n\
             mmproxy_tcp_connections_rejected_total{reason=\"too_long\"} 3\n\
             mmproxy_tcp_connections_rejected_total{reason=\"header_eof\"} 4\n",
        );
        assert_eq!(s.get("tcp_connections_accepted_total"), 12);
        assert_eq!(
            s.label("tcp_connections_rejected_total", "reason", "too_long"),
            3
        );
        assert_eq!(s.sum("tcp_connections_rejected_total", "reason"), 7);
        assert_eq!(s.get("absent"), 0);
    }
}
