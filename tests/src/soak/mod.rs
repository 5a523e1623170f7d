//! `cargo xtask soak`: mmproxy under a steady mixed load with hostile traffic
//! interleaved, for minutes or hours, in the benchmark's namespaces
//! (`soak::net`), checked as it runs and at the end (`soak::check`; RELIABILITY.md
//! has the method and the latest long run).
//!
//! Two daemons run side by side, `-p tcp` and `-p udp`, each with an allow-list and
//! `--metrics`. The load threads run in the client namespace; this thread samples
//! the daemons every few seconds (alive, RSS, descriptors, counters), pauses the load
//! once after the warm-up to take a quiet baseline, and takes a quiet measurement
//! again at the end.
pub mod check;
pub mod control;
pub mod good;
pub mod hostile;
pub mod net;
pub mod probe;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::bench::{net::ECHO_PORT, net::UDP_ECHO_PORT, sys};
use crate::daemon::{AllowedFile, Daemon};
use control::Control;
use net::{ClientTuples, SoakNet, HOST6, TCP_METRICS, TCP_PORT, UDP_METRICS, UDP_PORT};
use probe::{Process, Scrape};

/// The TCP daemon's `--max-connections`: small, so that a flood passes it.
pub const MAX_CONNECTIONS: usize = 64;
/// `--header-timeout` in seconds: what the slow-loris senders and floods run into.
pub const HEADER_TIMEOUT_S: u32 = 2;
/// The UDP daemon's `--close-after`: flows of the quiet measurements expire soon.
pub const CLOSE_AFTER_S: u32 = 5;
/// How far a daemon's RSS may rise after the warm-up above its peak during it.
pub const RSS_SLACK_KIB: u64 = 4 * 1024;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long a quiet measurement waits for connections and flows to end.
const QUIET_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    pub mmproxy: PathBuf,
    /// The daemons' `--ebpf` (auto, on, off): off soaks the user-space allow-list
    /// and return path instead of the kernel side's.
    pub ebpf: String,
    /// The command line, for the record.
    pub command: String,
}

/// `mmproxy --version` of the binary soaked, for the record.
pub fn version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Options {
    /// A tenth of the run, at least 30 s: it holds a flood and every kind of load.
    pub fn warm_up(&self) -> Duration {
        (self.duration / 10).max(Duration::from_secs(30))
    }
}

/// Both daemons at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub secs: f64,
    pub tcp: Process,
    pub udp: Process,
    pub tcp_open: u64,
    pub udp_flows: u64,
}

/// Everything the checks look at.
pub struct Run {
    pub opts: Options,
    pub machine: sys::Machine,
    /// The load's tallies (`Control::tally`) and its failures.
    pub tally: std::collections::BTreeMap<String, u64>,
    pub failures: Vec<String>,
    pub samples: Vec<Sample>,
    /// Samples taken before this index belong to the warm-up.
    pub warm_up_samples: usize,
    /// Quiet measurements after the warm-up and at the end.
    pub baseline: Option<Sample>,
    pub end: Option<Sample>,
    pub tcp: Scrape,
    pub udp: Scrape,
    /// Problems seen while running (a daemon gone, a scrape failing, a counter that
    /// must stay 0 moving).
    pub incidents: Vec<String>,
    /// Each daemon's descriptors (`probe::descriptors`) at the two quiet
    /// measurements: (tcp, udp).
    pub quiet_fds: [(Vec<String>, Vec<String>); 2],
    /// Each daemon's log lines that report a panic, an error or a warning.
    pub log_alerts: Vec<String>,
    pub wall: Duration,
}

struct Daemons {
    tcp: Daemon,
    udp: Daemon,
}

pub fn run(opts: Options) -> Result<Run> {
    let wall = Instant::now();
    let machine = sys::Machine::probe();
    sys::raise_nofile(65_536)?;
    let sn = SoakNet::new(1)?;
    let net = &sn.net;
    let allowed = AllowedFile::new(&net::allowed_subnets())?;
    let d = Daemons {
        tcp: start(&opts, net, &allowed, "tcp")?,
        udp: start(&opts, net, &allowed, "udp")?,
    };
    let ctl = Control::default();
    let tuples = ClientTuples::default();
    let mut run = Run {
        machine,
        tally: Default::default(),
        failures: Vec::new(),
        samples: Vec::new(),
        warm_up_samples: 0,
        baseline: None,
        end: None,
        tcp: Scrape::default(),
        udp: Scrape::default(),
        incidents: Vec::new(),
        log_alerts: Vec::new(),
        quiet_fds: Default::default(),
        wall: Duration::ZERO,
        opts: opts.clone(),
    };
    net.client.enter(|| {
        thread::scope(|s| {
            let (ctl, tuples) = (&ctl, &tuples);
            for seed in 0..2 {
                s.spawn(move || {
                    good::tcp_short(ctl, tuples, seed * 1_000_003, Duration::from_millis(5))
                });
            }
            for seed in 0..3 {
                s.spawn(move || {
                    good::tcp_stream(
                        ctl,
                        tuples,
                        seed * 7 + 1,
                        Duration::from_secs(5),
                        Duration::from_millis(10),
                    )
                });
            }
            s.spawn(move || good::udp(ctl, tuples, 16, 100, Duration::from_millis(20)));
            s.spawn(move || hostile::tcp(ctl, Duration::from_millis(20)));
            s.spawn(move || hostile::udp(ctl, Duration::from_millis(20)));
            for seed in 0..3 {
                s.spawn(move || hostile::slow_loris(ctl, Duration::from_millis(300), seed));
            }
            s.spawn(move || {
                hostile::flood(
                    ctl,
                    Duration::from_secs(10),
                    Duration::from_secs(40),
                    MAX_CONNECTIONS + 50,
                    Duration::from_secs(3),
                )
            });
            supervise(&mut run, ctl, &sn, &d);
        })
    })?;
    run.tcp = probe::scrape(&net.host, TCP_METRICS).unwrap_or_default();
    run.udp = probe::scrape(&net.host, UDP_METRICS).unwrap_or_default();
    run.tally = ctl.tally();
    run.failures = ctl.failures();
    run.wall = wall.elapsed();
    for (name, daemon) in [("tcp", &d.tcp), ("udp", &d.udp)] {
        run.log_alerts.extend(
            daemon
                .log_text()
                .lines()
                .filter(|l| alarming(l))
                .map(|l| format!("-p {name}: {l}")),
        );
    }
    drop(d);
    Ok(run)
}

/// A log line no soak should produce: a panic, an error, a warning.
fn alarming(line: &str) -> bool {
    line.contains("panicked") || line.contains(" ERROR ") || line.contains(" WARN ")
}

fn start(
    opts: &Options,
    net: &crate::bench::net::BenchNet,
    allowed: &AllowedFile,
    proto: &str,
) -> Result<Daemon> {
    let (port, echo, metrics) = match proto {
        "tcp" => (TCP_PORT, ECHO_PORT, TCP_METRICS),
        _ => (UDP_PORT, UDP_ECHO_PORT, UDP_METRICS),
    };
    let host = crate::bench::net::HOST;
    let args: Vec<String> = vec![
        "-l".into(),
        format!("{host}:{port}"),
        "-l".into(),
        format!("[{HOST6}]:{port}"),
        "-4".into(),
        format!("127.0.0.1:{echo}"),
        "-6".into(),
        format!("[::1]:{echo}"),
        "-p".into(),
        proto.into(),
        "--allowed-subnets".into(),
        allowed.as_ref().to_string_lossy().into_owned(),
        "--max-connections".into(),
        MAX_CONNECTIONS.to_string(),
        "--header-timeout".into(),
        HEADER_TIMEOUT_S.to_string(),
        "--close-after".into(),
        CLOSE_AFTER_S.to_string(),
        "--metrics".into(),
        metrics.into(),
        "--stats-interval".into(),
        "0".into(),
        "--ebpf".into(),
        opts.ebpf.clone(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_command(&net.host, &opts.mmproxy.to_string_lossy(), &args)
        .with_context(|| format!("starting mmproxy -p {proto}"))
}

/// Samples until the run's end; pauses once for the baseline after the warm-up.
fn supervise(run: &mut Run, ctl: &Control, sn: &SoakNet, d: &Daemons) {
    let start = Instant::now();
    let warm_up = run.opts.warm_up();
    let mut next = start;
    let mut warmed = false;
    while start.elapsed() < run.opts.duration {
        if !warmed && start.elapsed() >= warm_up {
            warmed = true;
            run.warm_up_samples = run.samples.len();
            ctl.pause();
            run.baseline = quiet(run, sn, d, start);
            eprintln!(
                "soak: warm-up over at {:.0}s; baseline {:?}",
                start.elapsed().as_secs_f64(),
                run.baseline
            );
            ctl.resume();
        }
        if Instant::now() >= next {
            next += SAMPLE_EVERY;
            let s = sample(run, sn, d, start);
            eprintln!(
                "soak: {:>5.0}s tcp rss {} KiB fds {} open {} | udp rss {} KiB fds {} flows {} | {} failures",
                s.secs, s.tcp.rss_kib, s.tcp.fds, s.tcp_open, s.udp.rss_kib, s.udp.fds, s.udp_flows,
                ctl.get("failures")
            );
            if !s.tcp.alive || !s.udp.alive {
                run.incidents
                    .push(format!("{:.0}s: a daemon is gone", s.secs));
                break;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    ctl.stop();
    run.end = quiet(run, sn, d, start);
}

fn sample(run: &mut Run, sn: &SoakNet, d: &Daemons, start: Instant) -> Sample {
    let mut s = Sample {
        secs: start.elapsed().as_secs_f64(),
        tcp: probe::process(&d.tcp),
        udp: probe::process(&d.udp),
        ..Sample::default()
    };
    match probe::scrape(&sn.net.host, TCP_METRICS) {
        Ok(m) => {
            s.tcp_open = m.get("tcp_connections_open");
            for (what, v) in [
                (
                    "upstream connect failures",
                    m.sum("tcp_upstream_connect_failures_total", "error"),
                ),
                ("relay errors", m.get("tcp_relay_errors_total")),
                ("accept errors", m.get("tcp_accept_errors_total")),
            ] {
                if v > 0 {
                    run.incidents.push(format!("{:.0}s: {what} = {v}", s.secs));
                }
            }
        }
        Err(e) => run
            .incidents
            .push(format!("{:.0}s: scraping the TCP daemon: {e:#}", s.secs)),
    }
    match probe::scrape(&sn.net.host, UDP_METRICS) {
        Ok(m) => s.udp_flows = m.get("udp_flows_open"),
        Err(e) => run
            .incidents
            .push(format!("{:.0}s: scraping the UDP daemon: {e:#}", s.secs)),
    }
    run.samples.push(s);
    s
}

/// With the load paused or stopped: waits until no connection is open, every
/// accepted one is accounted for and no flow is left, then samples.
fn quiet(run: &mut Run, sn: &SoakNet, d: &Daemons, start: Instant) -> Option<Sample> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    loop {
        let t = probe::scrape(&sn.net.host, TCP_METRICS);
        let u = probe::scrape(&sn.net.host, UDP_METRICS);
        if let (Ok(t), Ok(u)) = (&t, &u) {
            let settled = t.get("tcp_connections_open") == 0
                && t.get("tcp_pipes_in_use") == 0
                && t.get("tcp_connections_accepted_total") == check::tcp_resolved(t)
                && u.get("udp_flows_open") == 0;
            // A flow's gauge drops before its task has closed the socket: the
            // descriptor lists must also stand still for a second. A leak stands
            // still too, so this hides nothing but the closing in progress.
            let lists = || {
                (
                    probe::descriptors(d.tcp.pid()),
                    probe::descriptors(d.udp.pid()),
                )
            };
            let before = lists();
            thread::sleep(Duration::from_secs(1));
            if settled && lists() == before {
                let p = (probe::process(&d.tcp), probe::process(&d.udp));
                let slot = usize::from(run.baseline.is_some());
                run.quiet_fds[slot] = (
                    probe::descriptors(d.tcp.pid()),
                    probe::descriptors(d.udp.pid()),
                );
                return Some(Sample {
                    secs: start.elapsed().as_secs_f64(),
                    tcp: p.0,
                    udp: p.1,
                    tcp_open: 0,
                    udp_flows: 0,
                });
            }
        }
        if Instant::now() >= deadline {
            run.incidents.push(format!(
                "no quiet moment within {QUIET_TIMEOUT:?} (connections or flows still open)"
            ));
            return None;
        }
        thread::sleep(Duration::from_millis(250));
    }
}
