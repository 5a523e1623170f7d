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
use crate::daemon::Daemon;
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
}

impl Config {
    pub fn supports(&self, proto: Proto) -> bool {
        !(matches!(self.kind, Kind::Haproxy) && proto == Proto::Udp)
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
                let args: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
                let d = match Daemon::start_command(&net.host, &argv[0], &args) {
                    Ok(d) => d,
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
