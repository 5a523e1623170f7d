//! Network namespaces owned by a test: created on demand, removed on drop (also when
//! the test panics), with every process started in them killed first.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use anyhow::{bail, Context, Result};

/// Every namespace name starts with this; `cargo xtask test` removes leftovers.
pub const PREFIX: &str = "mmpt-";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace with `lo` up. `role` only makes the name readable.
    pub fn new(role: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n <ns> <args>`, stdout returned.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a command inside the namespace to completion; stdout returned.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        output(self.command(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created there
    /// stay in the namespace wherever they are used afterwards.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
        })
    }

    /// Connects this namespace to `other` with a veth pair named `here` / `there`.
    pub fn link(&self, here: &str, other: &Netns, there: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", here, "up"])?;
        other.ip(&["link", "set", there, "up"])
    }

    /// Adds an address (IPv6 without duplicate address detection, so it is usable at once).
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev])
        }
    }

    /// Policy rules and every route not made by the kernel itself (those come and go
    /// by themselves: IPv6 link-local routes appear a moment after a link is up),
    /// both families: what the daemon's routing changes, to compare before and after.
    pub fn rules_and_routes(&self) -> Result<String> {
        let mut s = self.ip_output(&["rule", "show"])?;
        s.push_str(&self.ip_output(&["-6", "rule", "show"])?);
        for family in ["-4", "-6"] {
            let routes = self.ip_output(&[family, "route", "show", "table", "all"])?;
            for line in routes.lines().filter(|l| !l.contains("proto kernel")) {
                s.push_str(line);
                s.push('\n');
            }
        }
        Ok(s)
    }

    /// PIDs of processes whose network namespace is this one.
    fn pids(&self) -> Vec<i32> {
        output(Command::new("ip").args(["netns", "pids", &self.name]))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: plain kill(2) of a process inside our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SIGKILL is delivered, not done: wait (briefly) until nothing runs there,
        // so that the namespace is gone after `ip netns del`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.pids().is_empty() && std::time::Instant::now() < deadline {
            thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        // A daemon the test SIGKILLed (as `Daemon`'s drop does) leaves its lease
        // files in /run/mmproxy; the next mmproxy start sweeps them. Do now what that
        // start would, so that the suite leaves the directory as it found it
        // (`cargo xtask test` checks).
        mmproxy::netns_lease::sweep(std::path::Path::new(mmproxy::netns_lease::DEFAULT_LOCK_DIR));
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sh(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
