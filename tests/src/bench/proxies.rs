//! The configurations compared: no proxy, mmproxy, go-mmproxy, HAProxy in TPROXY
//! mode, and any go-mmproxy-compatible binary. Each measurement gets a fresh
//! process, so no run inherits another's memory or flows.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net::{BenchNet, ECHO_PORT, HOST, UDP_ECHO_PORT};
use crate::daemon::{Daemon, READY};
use crate::haproxy::TempDir;
use crate::netns::KillOnDrop;

pub const GO_MMPROXY: &str = "/usr/bin/go-mmproxy";

/// A configuration that cannot run a workload in this build (mmproxy before its UDP
/// mode landed): reported, not counted as a failure.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Debug)]
pub enum Kind {
    NoProxy,
    Mmproxy(PathBuf),
    /// go-mmproxy itself or a binary with its flags.
    GoCompatible(PathBuf),
    Haproxy,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub kind: Kind,
    /// The port the proxy listens on (TCP and UDP).
    pub port: u16,
    /// Flags added to the proxy's command line (mmproxy only).
    pub extra_args: Vec<String>,
    /// Only this protocol's workloads (a UDP datapath has nothing to do with TCP).
    pub only: Option<Proto>,
}

impl Config {
    pub fn supports(&self, proto: Proto) -> bool {
        !(matches!(self.kind, Kind::Haproxy) && proto == Proto::Udp)
            && self.only.is_none_or(|p| p == proto)
    }

    /// Where generators send to, and whether they send PROXY headers.
    pub fn target(&self, proto: Proto) -> (SocketAddr, bool) {
        let host = HOST.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        match self.kind {
            Kind::NoProxy => {
                let port = match proto {
                    Proto::Tcp => ECHO_PORT,
                    Proto::Udp => UDP_ECHO_PORT,
                };
                (SocketAddr::from((host, port)), false)
            }
            _ => (SocketAddr::from((host, self.port)), true),
        }
    }

    /// Starts a fresh proxy for one measurement (None for "no proxy"), on `cpu` if
    /// given, at nice value `nice`.
    /// `nofile` is the descriptor limit the proxy inherits (HAProxy sizes itself to it).
    pub fn start(
        &self,
        net: &BenchNet,
        proto: Proto,
        cpu: Option<usize>,
        nice: i32,
        nofile: u64,
    ) -> Result<Option<Proxy>> {
        let listen = format!("0.0.0.0:{}", self.port);
        let (t4, t6) = match proto {
            Proto::Tcp => (
                format!("127.0.0.1:{ECHO_PORT}"),
                format!("[::1]:{ECHO_PORT}"),
            ),
            Proto::Udp => (
                format!("127.0.0.1:{UDP_ECHO_PORT}"),
                format!("[::1]:{UDP_ECHO_PORT}"),
            ),
        };
        let p = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let mut argv: Vec<String> = Vec::new();
        if nice != 0 {
            argv.extend(["nice".into(), "-n".into(), nice.to_string()]);
        }
        if let Some(cpu) = cpu {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        match &self.kind {
            Kind::NoProxy => Ok(None),
            Kind::Mmproxy(bin) => {
                argv.push(bin.to_string_lossy().into_owned());
                argv.extend(
                    [
                        "-l",
                        &listen,
                        "-4",
                        &t4,
                        "-6",
                        &t6,
                        "-p",
                        p,
                        // The idle-memory workload holds 10,000 at once.
                        "--max-connections",
                        "30000",
                        "--stats-interval",
                        "0",
                    ]
                    .map(String::from),
                );
                argv.extend(self.extra_args.iter().cloned());
                let args: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
                let d = match Daemon::start_command(&net.host, &argv[0], &args) {
                    Ok(d) => d,
                    Err(e) if unknown_flag(&format!("{e:#}"), &self.extra_args) => {
                        return Err(Unsupported(format!(
                            "this mmproxy has no {}",
                            self.extra_args.join(" ")
                        ))
                        .into());
                    }
                    Err(e) if format!("{e:#}").contains(NO_KERNEL_RELAY) => {
                        return Err(Unsupported(format!(
                            "this mmproxy has the flag, its kernel side no UDP relay ({})",
                            self.extra_args.join(" ")
                        ))
                        .into());
                    }
                    Err(e) if format!("{e:#}").contains("not implemented") => {
                        let line = format!("{e:#}")
                            .lines()
                            .find(|l| l.contains("not implemented"))
                            .map(|l| l.split("ERROR").last().unwrap_or(l).trim().to_owned())
                            .unwrap_or_default();
                        return Err(Unsupported(line).into());
                    }
                    Err(e) => return Err(e.context(format!("starting {}", self.name))),
                };
                let pid = d.pid();
                Ok(Some(Proxy {
                    pid,
                    _daemon: Some(d),
                    _child: None,
                    _dir: None,
                }))
            }
            Kind::GoCompatible(bin) => {
                argv.push(bin.to_string_lossy().into_owned());
                argv.extend(
                    ["-l", &listen, "-4", &t4, "-6", &t6, "-p", p, "-v", "0"].map(String::from),
                );
                let dir = TempDir::new("bench-peer")?;
                let mut child = spawn(net, &argv, &dir)?;
                wait_listening(net, proto, self.port, &mut child, &dir)
                    .with_context(|| format!("starting {}", self.name))?;
                wait_ready_if_mmproxy(&mut child, &dir)
                    .with_context(|| format!("starting {}", self.name))?;
                Ok(Some(Proxy {
                    pid: child.0.id() as i32,
                    _daemon: None,
                    _child: Some(child),
                    _dir: Some(dir),
                }))
            }
            Kind::Haproxy => {
                if proto == Proto::Udp {
                    bail!("HAProxy does not proxy UDP");
                }
                let dir = TempDir::new("bench-haproxy")?;
                let cfg = dir.0.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_config(self.port, nofile))?;
                argv.extend(
                    ["haproxy", "-db", "-q", "-f", &cfg.to_string_lossy()].map(String::from),
                );
                let mut child = spawn(net, &argv, &dir)?;
                wait_listening(net, proto, self.port, &mut child, &dir)
                    .context("starting HAProxy")?;
                Ok(Some(Proxy {
                    pid: child.0.id() as i32,
                    _daemon: None,
                    _child: Some(child),
                    _dir: Some(dir),
                }))
            }
        }
    }
}

/// How much of a UDP run mmproxy's kernel datapath relayed, from its counters
/// (`stats` line) after the run: datagrams relayed in and answers relayed out by the
/// tc programs, against what the generator sent and heard back; the rest went
/// through user space.
pub fn kernel_share(line: &str, m: &mut std::collections::BTreeMap<String, f64>) {
    let c = |name: &str| crate::daemon::counter(line, name) as f64;
    let (relayed_in, relayed_out) = (c("kernel_udp_relayed_in"), c("kernel_udp_relayed_out"));
    let punted: f64 = ["no_flow", "header", "packet", "mtu", "not_allowed", "held"]
        .iter()
        .map(|r| c(&format!("kernel_udp_punted_{r}")))
        .sum();
    let sent = m.get("sent").copied().unwrap_or(0.0);
    let received = m.get("received").copied().unwrap_or(0.0);
    m.insert("kernel_relayed_in".into(), relayed_in);
    m.insert("kernel_relayed_out".into(), relayed_out);
    m.insert("kernel_punted".into(), punted);
    m.insert("kernel_relay_failed".into(), c("kernel_udp_relay_failed"));
    m.insert("user_datagrams".into(), c("udp_datagrams"));
    m.insert("user_replies".into(), c("udp_replies"));
    if sent > 0.0 {
        m.insert(
            "kernel_in_pct".into(),
            (relayed_in / sent * 100.0).min(100.0),
        );
    }
    if received > 0.0 {
        m.insert(
            "kernel_out_pct".into(),
            (relayed_out / received * 100.0).min(100.0),
        );
    }
}

/// mmproxy's refusal when it knows `--udp-datapath kernel` but was built without the
/// BPF programs behind it (a branch with the flag and not the kernel side).
const NO_KERNEL_RELAY: &str = "--udp-datapath kernel: the kernel side has no UDP relay";

/// Whether mmproxy refused to start because it does not know one of `extra`'s
/// flags (clap: "unexpected argument '--flag' found"): a build from before the
/// flag, reported as not in this build rather than as a failure.
fn unknown_flag(log: &str, extra: &[String]) -> bool {
    extra.iter().filter(|a| a.starts_with("--")).any(|flag| {
        log.lines()
            .any(|l| l.contains("unexpected argument") && l.contains(&format!("'{flag}'")))
    })
}

/// HAProxy as a PROXY-protocol terminator in TPROXY mode: `accept-proxy` takes the
/// client from the header, `usesrc clientip` connects from it (IP_TRANSPARENT),
/// and the same loopback rules bring the answers back. Splice as the issue's
/// measurement had it (`splice-auto`). `maxconn` is sized so that its sockets and
/// pipes fit in the descriptor limit, which HAProxy checks at start.
fn haproxy_config(port: u16, nofile: u64) -> String {
    let maxconn = nofile.saturating_sub(1000) / 3;
    format!(
        "global\n  maxconn {maxconn}\n\
         defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend fe\n  bind 0.0.0.0:{port} accept-proxy\n  default_backend be\n\
         backend be\n  server echo 127.0.0.1:{ECHO_PORT} source 0.0.0.0 usesrc clientip\n"
    )
}

/// A running proxy; killed on drop (then its configuration directory removed).
pub struct Proxy {
    pub pid: i32,
    _daemon: Option<Daemon>,
    _child: Option<KillOnDrop>,
    _dir: Option<TempDir>,
}

impl Proxy {
    /// mmproxy's counters now (its `stats` line, asked for with SIGUSR1); None for
    /// the other proxies.
    pub fn stats_line(&self) -> Option<String> {
        self._daemon.as_ref()?.stats().ok()
    }

    pub fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}/stat", self.pid)).exists()
    }
}

/// `ip netns exec host argv…`: ip, nice and taskset exec, so the child's pid is the
/// proxy's.
/// Its output goes to `dir`/log.
fn spawn(net: &BenchNet, argv: &[String], dir: &TempDir) -> Result<KillOnDrop> {
    let (prog, args) = argv.split_first().context("empty command")?;
    let log = std::fs::File::create(dir.0.join("log"))?;
    let child = net
        .host
        .command(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    Ok(KillOnDrop(child))
}

fn wait_listening(
    net: &BenchNet,
    proto: Proto,
    port: u16,
    child: &mut KillOnDrop,
    dir: &TempDir,
) -> Result<()> {
    let log = || {
        std::fs::read_to_string(dir.0.join("log"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let flag = match proto {
        Proto::Tcp => "-Hltn",
        Proto::Udp => "-Hlun",
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    loop {
        let out = net.host.run("ss", &[flag, &filter]).unwrap_or_default();
        if !out.trim().is_empty() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!(
                "the proxy exited ({status}) before listening on port {port}: {}",
                log()
            );
        }
        if Instant::now() > deadline {
            bail!("nothing listening on port {port} after 10 s: {}", log());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A peer that is an mmproxy (the program running is named `mmproxy`, a wrapper
/// script having exec'd it, or its log has mmproxy's module paths) listens before
/// it has attached its tc programs: measured then, its first round would be partly
/// its start-up. Waits for its ready line; other peers are ready when they listen.
fn wait_ready_if_mmproxy(child: &mut KillOnDrop, dir: &TempDir) -> Result<()> {
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.0.id())).unwrap_or_default();
    let named = exe.file_name().is_some_and(|n| n == "mmproxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(dir.0.join("log")).unwrap_or_default();
        if !(named || is_mmproxy_log(&log)) || log.contains(READY) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!(
                "mmproxy exited ({status}) before it was ready: {}",
                log.trim()
            );
        }
        if Instant::now() > deadline {
            bail!("mmproxy not ready after 10 s: {}", log.trim());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn is_mmproxy_log(log: &str) -> bool {
    log.contains(" mmproxy::")
}

#[cfg(test)]
mod tests {
    use super::{is_mmproxy_log, kernel_share, unknown_flag};

    #[test]
    fn an_mmproxy_peer_is_told_from_go_mmproxy_by_its_log() {
        let ours = "2026-12-02T23:22:17.004684Z  INFO mmproxy::daemon: UDP datapath: tc programs relay established flows";
        assert!(is_mmproxy_log(ours));
        let go = r#"{"time":"2026-12-02T23:22:17Z","level":"INFO","msg":"listening","address":"0.0.0.0:8443"}"#;
        assert!(!is_mmproxy_log(go));
    }
    use std::collections::BTreeMap;

    #[test]
    fn kernel_share_counts_what_the_tc_programs_relayed() {
        let mut m = BTreeMap::from([("sent".to_owned(), 1000.0), ("received".to_owned(), 990.0)]);
        let line = "udp_datagrams=8 udp_flows_created=1 kernel_udp_relayed_in=992 \
                    kernel_udp_relayed_out=990 kernel_udp_punted_no_flow=6 \
                    kernel_udp_punted_header=2";
        kernel_share(line, &mut m);
        assert_eq!(m["kernel_relayed_in"], 992.0);
        assert_eq!(m["kernel_punted"], 8.0);
        assert_eq!(m["user_datagrams"], 8.0);
        assert_eq!(m["user_replies"], 0.0);
        assert!((m["kernel_in_pct"] - 99.2).abs() < 1e-9);
        assert_eq!(m["kernel_out_pct"], 100.0);
    }

    #[test]
    fn a_build_without_the_flag_is_told_apart_from_a_failure() {
        let extra = ["--udp-datapath", "kernel"].map(String::from);
        let clap = "mmproxy did not become ready; log:\n\
                    error: unexpected argument '--udp-datapath' found\n\n  \
                    tip: to pass '--udp-datapath' as a value, use '-- --udp-datapath'";
        assert!(unknown_flag(clap, &extra));
        let refused = "ERROR --udp-datapath kernel needs the kernel side (--ebpf off given)";
        assert!(!unknown_flag(refused, &extra));
        assert!(!unknown_flag(
            "error: unexpected argument '--other' found",
            &extra
        ));
    }
}
