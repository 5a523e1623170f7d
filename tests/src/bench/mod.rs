//! `cargo xtask bench`: mmproxy side by side with go-mmproxy, HAProxy and no proxy,
//! in network namespaces of its own (the test topology of `topology.rs`;
//! BENCHMARKS.md has the method and the latest full run).
//!
//! Every workload runs for every configuration in turn, round after round, each
//! measurement with a fresh proxy process; medians over the rounds are reported.
pub mod batch;
pub mod chart;
pub mod cpu;
pub mod cpu_report;
pub mod echo;
pub mod load;
pub mod net;
pub mod proxies;
pub mod report;
pub mod sys;
pub mod udp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use load::Target;
use net::{BenchNet, Tuples, ECHO_PORT, HOST, UDP_ECHO_PORT};
use proxies::{Config, Proto};

/// With `--pin`: the CPU of the generators and the echo servers; the proxy gets the
/// other one. Not the default: the targets were measured with everything
/// sharing both CPUs, and pinning the proxy alone on one CPU made the other
/// (generators + echo) the bottleneck, which hid the differences in the proxies' own
/// costs.
pub const LOAD_CPU: usize = 0;
pub const PROXY_CPU: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    Idle,
    Latency,
    Throughput,
    ConnRate,
    Udp,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Idle,
        Workload::Latency,
        Workload::Throughput,
        Workload::ConnRate,
        Workload::Udp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Latency => "latency",
            Workload::Throughput => "throughput",
            Workload::ConnRate => "conn_rate",
            Workload::Udp => "udp",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }

    /// The unit of work CPU time is divided by, for the workloads that measure CPU.
    pub fn cpu_unit(self) -> Option<CpuUnit> {
        let unit = |key, label, per_unit| {
            Some(CpuUnit {
                key,
                label,
                per_unit,
            })
        };
        match self {
            Workload::Throughput => unit("ms_per_gbit", "ms/Gbit", 1e3),
            Workload::ConnRate => unit("us_per_conn", "µs/conn", 1e6),
            Workload::Latency => unit("us_per_round_trip", "µs/round trip", 1e6),
            Workload::Udp => unit("us_per_reply", "µs/reply", 1e6),
            Workload::Idle => None,
        }
    }

    fn proto(self) -> Proto {
        match self {
            Workload::Udp => Proto::Udp,
            _ => Proto::Tcp,
        }
    }
}

/// How a workload's CPU time is reported: seconds × `per_unit` ÷ units of work, as
/// the metrics `cpu_<key>` (the proxy process) and `machine_cpu_<key>` (all CPUs).
#[derive(Clone, Copy, Debug)]
pub struct CpuUnit {
    pub key: &'static str,
    pub label: &'static str,
    pub per_unit: f64,
}

impl CpuUnit {
    pub fn proxy_metric(self) -> String {
        format!("cpu_{}", self.key)
    }

    pub fn machine_metric(self) -> String {
        format!("machine_cpu_{}", self.key)
    }

    /// The machine's figure less the other processes' CPU in the interval: an
    /// estimate of the benchmark's own share when the machine is shared.
    pub fn less_others_metric(self) -> String {
        format!("machine_less_others_cpu_{}", self.key)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    /// Length of the throughput run (the seed's 10 s).
    pub throughput_secs: f64,
    /// Length of the connection-rate, latency and UDP runs.
    pub secs: f64,
    pub idle_conns: usize,
    /// Generators and echo on CPU 0, the proxy on CPU 1 (`--pin`); otherwise
    /// nothing is pinned.
    pub pin: bool,
    /// Threads of the throughput and UDP generators and of each echo server: one per
    /// CPU, or one when pinned (set by `run`).
    pub threads: usize,
    /// Nice value of the generators, the echo servers and the proxies: on a shared
    /// machine, other work then disturbs the measurement less (the same for all).
    pub nice: i32,
    pub workloads: Vec<Workload>,
    /// Only the configurations with these names (all when empty).
    pub configs: Vec<String>,
    /// RLIMIT_NOFILE in force (set by `run`).
    pub nofile: u64,
    #[serde(skip)]
    pub mmproxy: PathBuf,
    #[serde(skip)]
    pub peers: Vec<PathBuf>,
    #[serde(skip)]
    pub out: PathBuf,
    /// The command line, for the record.
    pub command: String,
}

/// One measurement: a workload against one configuration in one round.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub config: String,
    pub workload: Workload,
    pub round: usize,
    pub metrics: BTreeMap<String, f64>,
    pub error: Option<String>,
    /// Why the configuration cannot run this workload in this build.
    pub skipped: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct Results {
    pub machine: sys::Machine,
    pub options: Options,
    pub versions: BTreeMap<String, String>,
    pub configs: Vec<String>,
    pub samples: Vec<Sample>,
    /// config → workload → metric → median over rounds.
    pub medians: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    pub wall_secs: f64,
}

pub fn configs(opts: &Options) -> Vec<Config> {
    use proxies::Kind;
    let config = |name: &str, kind: Kind, port: u16| Config {
        name: name.into(),
        kind,
        port,
        extra_args: Vec::new(),
        only: None,
    };
    let mut c = vec![
        config(report::NO_PROXY, Kind::NoProxy, ECHO_PORT),
        config("mmproxy", Kind::Mmproxy(opts.mmproxy.clone()), 8443),
        Config {
            extra_args: ["--udp-datapath", "kernel"].map(String::from).to_vec(),
            only: Some(Proto::Udp),
            ..config(
                report::UDP_KERNEL,
                Kind::Mmproxy(opts.mmproxy.clone()),
                8442,
            )
        },
        config(
            report::GO_MMPROXY,
            Kind::GoCompatible(proxies::GO_MMPROXY.into()),
            8444,
        ),
        config("HAProxy TPROXY", Kind::Haproxy, 8445),
    ];
    for (i, p) in opts.peers.iter().enumerate() {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("peer {i}"));
        c.push(config(
            &name,
            Kind::GoCompatible(p.clone()),
            8446 + i as u16,
        ));
    }
    if !opts.configs.is_empty() {
        c.retain(|x| opts.configs.iter().any(|n| n == &x.name));
    }
    c
}

/// Descriptors go-mmproxy holds per idle connection (two sockets, two pipes): the
/// most any configuration needs, so it bounds the idle connection count.
const MAX_FDS_PER_CONN: u64 = 6;

pub fn run(mut opts: Options) -> Result<Results> {
    let wall = Instant::now();
    let mut machine = sys::Machine::probe();
    let nofile = sys::raise_nofile(1 << 20)?;
    let fit = usize::try_from(nofile.saturating_sub(300) / MAX_FDS_PER_CONN).unwrap_or(usize::MAX);
    if opts.idle_conns > fit {
        let n = fit / 100 * 100;
        eprintln!(
            "bench: RLIMIT_NOFILE is {nofile} and cannot be raised here (CAP_SYS_RESOURCE); \
             go-mmproxy needs {MAX_FDS_PER_CONN} descriptors per idle connection, so the idle \
             workload opens {n} instead of {}",
            opts.idle_conns
        );
        opts.idle_conns = n;
    }
    machine.nofile = nofile;
    if opts.nice != 0 {
        sys::nice_autogroup(opts.nice);
    }
    opts.nofile = nofile;
    opts.threads = if opts.pin { 1 } else { machine.nproc.max(1) };
    let configs = configs(&opts);
    let net = BenchNet::new().context("creating the benchmark namespaces")?;
    let host: std::net::Ipv4Addr = HOST.parse()?;
    let _echo = echo::Echo::start(
        &net.host,
        SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)),
        &[
            SocketAddr::from(([127, 0, 0, 1], UDP_ECHO_PORT)),
            SocketAddr::from((host, UDP_ECHO_PORT)),
        ],
        opts.threads,
        opts.pin.then_some(LOAD_CPU),
        opts.nice,
    )?;
    let tuples = Tuples::default();
    let mut samples = Vec::new();
    for &w in &opts.workloads {
        for round in 1..=opts.rounds {
            for cfg in configs.iter().filter(|c| c.supports(w.proto())) {
                let t0 = Instant::now();
                let r = measure(&opts, &net, &tuples, cfg, w);
                let (metrics, error, skipped) = match r {
                    Ok(m) => (m, None, None),
                    Err(e) => match e.downcast_ref::<proxies::Unsupported>() {
                        Some(u) => (BTreeMap::new(), None, Some(u.0.clone())),
                        None => (BTreeMap::new(), Some(format!("{e:#}")), None),
                    },
                };
                let outcome = match (&error, &skipped) {
                    (Some(e), _) => format!("FAILED: {e}"),
                    (None, Some(s)) => format!("skipped: {s}"),
                    (None, None) => summary(w, &metrics),
                };
                eprintln!(
                    "bench: {:<10} round {round}/{} {:<16} {:>5.1}s {outcome}",
                    w.name(),
                    opts.rounds,
                    cfg.name,
                    t0.elapsed().as_secs_f64(),
                );
                samples.push(Sample {
                    config: cfg.name.clone(),
                    workload: w,
                    round,
                    metrics,
                    error,
                    skipped,
                });
            }
        }
    }
    machine.load_after = sys::loadavg();
    let medians = medians(&samples);
    Ok(Results {
        machine,
        versions: versions(&opts),
        configs: configs.iter().map(|c| c.name.clone()).collect(),
        options: opts,
        samples,
        medians,
        wall_secs: wall.elapsed().as_secs_f64(),
    })
}

fn summary(w: Workload, m: &BTreeMap<String, f64>) -> String {
    let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    let machine = w
        .cpu_unit()
        .and_then(|u| Some((m.get(&u.machine_metric())?, u.label)))
        .map(|(v, label)| format!(", machine {v:.2} {label}"))
        .unwrap_or_default();
    let line = match w {
        Workload::Throughput => format!("{:.0} Mbps, cpu {:.2}s", g("total_mbps"), g("cpu_s")),
        Workload::ConnRate => format!(
            "{:.0} conn/s, p99 {:.2} ms, errors {}",
            g("conns_per_s"),
            g("p99_ms"),
            g("errors")
        ),
        Workload::Latency => format!("p50 {:.1} µs, p99 {:.1} µs", g("p50_us"), g("p99_us")),
        Workload::Udp => format!(
            "{:.0} replies/s, loss {:.2}%",
            g("replies_per_s"),
            g("loss_pct")
        ),
        Workload::Idle => format!(
            "{:.0} conns, proxy RSS {:.1} KiB/conn, slab {:.1} KiB/conn",
            g("conns"),
            g("rss_per_conn_kib"),
            g("slab_per_conn_kib")
        ),
    };
    line + &machine
}

fn measure(
    opts: &Options,
    net: &BenchNet,
    tuples: &Tuples,
    cfg: &Config,
    w: Workload,
) -> Result<BTreeMap<String, f64>> {
    let proto = w.proto();
    let proxy = cfg.start(
        net,
        proto,
        opts.pin.then_some(PROXY_CPU),
        opts.nice,
        opts.nofile,
    )?;
    let pid = proxy.as_ref().map(|p| p.pid);
    // The start-up peak (BPF loading, for mmproxy) is reported on its own; the peak
    // RSS of the tables is the measurement's.
    let startup_hwm = pid.and_then(|p| sys::status_kib(p, "VmHWM:").ok());
    if let Some(pid) = pid {
        sys::reset_peak_rss(pid);
    }
    let (addr, proxied) = cfg.target(proto);
    let t = Target { addr, proxied };
    let pin = opts.pin;
    let nice = opts.nice;
    let secs = Duration::from_secs_f64(opts.secs);
    let ncpus = sys::online_cpus() as f64;
    let mut m = net.client.enter(|| -> Result<BTreeMap<String, f64>> {
        if pin {
            sys::pin_current_thread(LOAD_CPU)?;
        }
        sys::nice_current_thread(nice)?;
        let cpu = move || cpu::Snapshot::take(pid);
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_owned(), v);
        };
        // The CPU used in the measured interval, the units of work done in it (as
        // `Workload::cpu_unit` counts them) and its length.
        let work: Option<(cpu::Used, f64, f64)> = match w {
            Workload::Throughput => {
                let r = load::throughput(
                    &t,
                    50,
                    opts.threads,
                    Duration::from_secs_f64(opts.throughput_secs),
                    tuples,
                    &cpu,
                )?;
                let mbps = |b: u64| b as f64 * 8.0 / r.secs / 1e6;
                let msgs = |b: u64| b as f64 / 6.0 / r.secs;
                put("down_mbps", mbps(r.down_bytes));
                put("up_mbps", mbps(r.up_bytes));
                put("total_mbps", mbps(r.down_bytes + r.up_bytes));
                put("down_msgs", msgs(r.down_bytes));
                put("up_msgs", msgs(r.up_bytes));
                let gbit = (r.down_bytes + r.up_bytes) as f64 * 8.0 / 1e9;
                Some((r.cpu, gbit, r.secs))
            }
            Workload::ConnRate => {
                let r = load::conn_rate(&t, 50, secs, tuples, &cpu)?;
                put("conns_per_s", r.completed as f64 / r.secs);
                put("p50_ms", load::quantile(&r.times_us, 0.5) / 1000.0);
                put("p99_ms", load::quantile(&r.times_us, 0.99) / 1000.0);
                put("errors", r.errors as f64);
                Some((r.cpu, r.completed as f64, r.secs))
            }
            Workload::Latency => {
                let r = load::ping_pong(&t, secs, tuples, &cpu)?;
                put("p50_us", load::quantile(&r.rtt_ns, 0.5) / 1000.0);
                put("p99_us", load::quantile(&r.rtt_ns, 0.99) / 1000.0);
                put("p999_us", load::quantile(&r.rtt_ns, 0.999) / 1000.0);
                put("round_trips_per_s", r.round_trips as f64 / r.secs);
                Some((r.cpu, r.round_trips as f64, r.secs))
            }
            Workload::Udp => {
                let r = udp::closed_loop(&t, 50, opts.threads, secs, tuples, &cpu)?;
                put("replies_per_s", r.received as f64 / r.secs);
                put("loss_pct", r.loss() * 100.0);
                put("sent", r.sent as f64);
                put("received", r.received as f64);
                Some((r.cpu, r.received as f64, r.secs))
            }
            Workload::Idle => {
                idle(&t, opts, pid, tuples, &mut put)?;
                None
            }
        };
        if let (Some((used, units, secs)), Some(unit)) = (work, w.cpu_unit()) {
            let per_unit = |s: f64| s * unit.per_unit / units.max(1e-9);
            if let Some(c) = used.proxy_s {
                put("cpu_s", c);
                put(&unit.proxy_metric(), per_unit(c));
            }
            if let Some(c) = used.machine_s {
                put("machine_cpu_s", c);
                put(&unit.machine_metric(), per_unit(c));
                put("machine_busy_pct", c * 100.0 / (secs * ncpus).max(1e-9));
            }
            if let Some(c) = used.others_s {
                put("others_cpu_s", c);
            }
            if let (Some(m), Some(o)) = (used.machine_s, used.others_s) {
                put(&unit.less_others_metric(), per_unit((m - o).max(0.0)));
            }
        }
        Ok(m)
    })??;
    if let (Some(p), Some(pid)) = (&proxy, pid) {
        if !p.alive() {
            anyhow::bail!("the proxy died during the run");
        }
        if let Ok(hwm) = sys::status_kib(pid, "VmHWM:") {
            m.insert("peak_rss_kib".into(), hwm as f64);
        }
        if let Some(hwm) = startup_hwm {
            m.insert("startup_peak_rss_kib".into(), hwm as f64);
        }
        if w == Workload::Udp {
            if let Some(line) = p.stats_line() {
                proxies::kernel_share(&line, &mut m);
            }
        }
    }
    drop(proxy);
    if w == Workload::Idle || w == Workload::ConnRate {
        // Let the kernel finish tearing down thousands of sockets before the next
        // measurement looks at memory or opens connections.
        thread::sleep(Duration::from_millis(if opts.quick { 100 } else { 1000 }));
    }
    Ok(m)
}

/// Opens the idle connections and measures the proxy's RSS and the kernel's slab
/// growth per connection. The slab figure includes the generator's and the echo
/// server's sockets; the report subtracts the no-proxy figure to get the proxy's.
fn idle(
    t: &Target,
    opts: &Options,
    pid: Option<i32>,
    tuples: &Tuples,
    put: &mut dyn FnMut(&str, f64),
) -> Result<()> {
    let settle = Duration::from_millis(if opts.quick { 200 } else { 1000 });
    thread::sleep(settle);
    let rss = || pid.and_then(|p| sys::status_kib(p, "VmRSS:").ok());
    let fds = || pid.map(sys::open_fds);
    let (rss0, fds0, slab0) = (rss(), fds(), sys::slab_kib()?);
    let (conns, errors) = load::open_idle(t, opts.idle_conns, 100, tuples)?;
    thread::sleep(settle);
    let (rss1, fds1, slab1) = (rss(), fds(), sys::slab_kib()?);
    let n = conns.len().max(1) as f64;
    put("conns", conns.len() as f64);
    put("errors", errors as f64);
    put("slab_per_conn_kib", (slab1 as f64 - slab0 as f64) / n);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        put("rss_per_conn_kib", (b as f64 - a as f64) / n);
    }
    if let (Some(a), Some(b)) = (fds0, fds1) {
        put("fds_per_conn", (b as f64 - a as f64) / n);
    }
    // Reset rather than FIN: no TIME_WAIT left to expire (and free slab) while the
    // next measurement is looking at the slab.
    for c in &conns {
        let _ = socket2::SockRef::from(c).set_linger(Some(Duration::ZERO));
    }
    drop(conns);
    Ok(())
}

fn medians(samples: &[Sample]) -> BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> {
    let mut all: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.error.is_none()) {
        for (k, v) in &s.metrics {
            if v.is_finite() {
                all.entry((s.config.clone(), s.workload.name().to_owned(), k.clone()))
                    .or_default()
                    .push(*v);
            }
        }
    }
    let mut out: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    for ((c, w, k), mut v) in all {
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let med = if v.len() % 2 == 1 {
            v.get(mid).copied().unwrap_or(f64::NAN)
        } else {
            (v.get(mid - 1).copied().unwrap_or(f64::NAN) + v.get(mid).copied().unwrap_or(f64::NAN))
                / 2.0
        };
        out.entry(c)
            .or_default()
            .entry(w)
            .or_default()
            .insert(k, med);
    }
    out
}

fn versions(opts: &Options) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let dpkg = |p: &str| {
        std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", p])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    v.insert("go-mmproxy".into(), dpkg("go-mmproxy"));
    v.insert("haproxy".into(), dpkg("haproxy"));
    let git = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    v.insert(
        "mmproxy".into(),
        format!("{} ({})", git, opts.mmproxy.display()),
    );
    v
}
