//! The Markdown tables (the seed README's shape, with ratios to no proxy and to
//! go-mmproxy) and the JSON file.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Results, Workload};

pub const NO_PROXY: &str = "no proxy";
pub const GO_MMPROXY: &str = "go-mmproxy";
/// mmproxy with `--udp-datapath kernel` (issue 16), measured on the UDP workload.
pub const UDP_KERNEL: &str = "mmproxy (udp kernel)";

/// Marks the generated part of BENCHMARKS.md.
pub const BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench) -->";
pub const END: &str = "<!-- bench:end -->";

impl Results {
    pub fn get(&self, config: &str, w: Workload, metric: &str) -> Option<f64> {
        self.medians
            .get(config)?
            .get(w.name())?
            .get(metric)
            .copied()
            .filter(|v| v.is_finite())
    }

    /// The whole machine's CPU per unit of work (`Workload::cpu_unit`).
    pub fn machine_per_unit(&self, config: &str, w: Workload) -> Option<f64> {
        self.get(config, w, &w.cpu_unit()?.machine_metric())
    }

    /// What the proxy adds to the machine's CPU per unit of work: its figure minus
    /// that of no proxy on the same workload in the same run.
    pub fn extra_per_unit(&self, config: &str, w: Workload) -> Option<f64> {
        if config == NO_PROXY {
            return None;
        }
        Some(self.machine_per_unit(config, w)? - self.machine_per_unit(NO_PROXY, w)?)
    }

    /// The same, with both figures less the other processes' CPU.
    pub fn extra_less_others(&self, config: &str, w: Workload) -> Option<f64> {
        let m = w.cpu_unit()?.less_others_metric();
        if config == NO_PROXY {
            return None;
        }
        Some(self.get(config, w, &m)? - self.get(NO_PROXY, w, &m)?)
    }

    /// Whether `config` was measured on `w` at all (not: a UDP-only configuration on
    /// a TCP workload).
    pub fn ran(&self, config: &str, w: Workload) -> bool {
        self.samples
            .iter()
            .any(|x| x.config == config && x.workload == w)
    }

    /// Kernel memory per idle connection held for the proxy: the slab growth per
    /// connection minus that of no proxy (the generator's and the echo's sockets).
    pub fn kernel_per_conn_kib(&self, config: &str) -> Option<f64> {
        let base = self.get(NO_PROXY, Workload::Idle, "slab_per_conn_kib")?;
        Some(self.get(config, Workload::Idle, "slab_per_conn_kib")? - base)
    }
}

pub(super) fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => {
            let s = format!("{v:.decimals$}");
            group_thousands(&s)
        }
        None => "—".into(),
    }
}

fn group_thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map_or(("", s), |r| ("-", r));
    let (int, frac) = rest
        .split_once('.')
        .map_or((rest, None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

pub(super) fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b != 0.0 => format!("{:.2}×", v / b),
        _ => "—".into(),
    }
}

fn mib(kib: Option<f64>) -> String {
    num(kib.map(|k| k / 1024.0), 1)
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let rounds = r.options.rounds;
    let cfgs = &r.configs;
    let g = |c: &str, w, m: &str| r.get(c, w, m);

    let _ = writeln!(
        s,
        "Medians of {rounds} interleaved round{}; ratios are to no proxy and to go-mmproxy \
         in the same run. Proxy CPU is user+sys of the proxy process during the measured \
         interval, machine CPU all CPUs' busy time in it (see the CPU table); peak RSS \
         is its VmHWM during the measurement (reset once the proxy is ready).\n",
        if rounds == 1 { "" } else { "s" }
    );

    let w = Workload::Throughput;
    if r.options.workloads.contains(&w) {
        let _ = writeln!(
            s,
            "### TCP throughput: 50 connections, PROXY v1 header each, `PING\\r\\n` streamed for {} s\n",
            r.options.throughput_secs
        );
        s.push_str("|                | ⇅ Mbps | ↓ Mbps | ↑ Mbps | ↓ msg/s | ↑ msg/s | ⇅ vs no proxy | ⇅ vs go-mmproxy | proxy CPU s | CPU ms/Gbit | peak RSS MiB |\n");
        s.push_str("| -------------- | ------ | ------ | ------ | ------- | ------- | ------------- | --------------- | ----------- | ----------- | ------------ |\n");
        for c in cfgs.iter().filter(|c| r.ran(c, w)) {
            let t = g(c, w, "total_mbps");
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(t, 0),
                num(g(c, w, "down_mbps"), 0),
                num(g(c, w, "up_mbps"), 0),
                num(g(c, w, "down_msgs"), 0),
                num(g(c, w, "up_msgs"), 0),
                ratio(t, g(NO_PROXY, w, "total_mbps")),
                ratio(t, g(GO_MMPROXY, w, "total_mbps")),
                num(g(c, w, "cpu_s"), 2),
                num(g(c, w, "cpu_ms_per_gbit"), 1),
                mib(g(c, w, "peak_rss_kib")),
            );
        }
        s.push('\n');
    }

    let w = Workload::ConnRate;
    if r.options.workloads.contains(&w) {
        let _ = writeln!(
            s,
            "### Connection rate: 50 workers, connect → header + `PING\\r\\n` round trip → close, {} s\n",
            r.options.secs
        );
        s.push_str("|                | conn/s | vs no proxy | vs go-mmproxy | p50 ms | p99 ms | errors | proxy CPU µs/conn | peak RSS MiB |\n");
        s.push_str("| -------------- | ------ | ----------- | ------------- | ------ | ------ | ------ | ----------------- | ------------ |\n");
        for c in cfgs.iter().filter(|c| r.ran(c, w)) {
            let v = g(c, w, "conns_per_s");
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(v, 0),
                ratio(v, g(NO_PROXY, w, "conns_per_s")),
                ratio(v, g(GO_MMPROXY, w, "conns_per_s")),
                num(g(c, w, "p50_ms"), 2),
                num(g(c, w, "p99_ms"), 2),
                num(g(c, w, "errors"), 0),
                num(g(c, w, "cpu_us_per_conn"), 1),
                mib(g(c, w, "peak_rss_kib")),
            );
        }
        s.push('\n');
    }

    let w = Workload::Latency;
    if r.options.workloads.contains(&w) {
        let _ = writeln!(
            s,
            "### Ping-pong latency: one connection, 64-byte messages, {} s\n",
            r.options.secs
        );
        s.push_str("|                | p50 µs | p99 µs | p999 µs | p99 vs no proxy | p99 vs go-mmproxy | round trips/s |\n");
        s.push_str("| -------------- | ------ | ------ | ------- | --------------- | ----------------- | ------------- |\n");
        for c in cfgs.iter().filter(|c| r.ran(c, w)) {
            let v = g(c, w, "p99_us");
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} | {} | {} |",
                num(g(c, w, "p50_us"), 1),
                num(v, 1),
                num(g(c, w, "p999_us"), 1),
                ratio(v, g(NO_PROXY, w, "p99_us")),
                ratio(v, g(GO_MMPROXY, w, "p99_us")),
                num(g(c, w, "round_trips_per_s"), 0),
            );
        }
        s.push('\n');
    }

    let w = Workload::Udp;
    if r.options.workloads.contains(&w) {
        let _ = writeln!(
            s,
            "### UDP: 50 clients, PROXY v2 DGRAM header + 64-byte payload, closed loop (8 outstanding each), {} s\n",
            r.options.secs
        );
        s.push_str("|                | replies/s | vs no proxy | vs go-mmproxy | loss | machine CPU µs/reply | extra over no proxy µs/reply | extra vs go-mmproxy's extra | proxy CPU µs/reply | proxy CPU s | relayed by tc in / out | peak RSS MiB |\n");
        s.push_str("| -------------- | --------- | ----------- | ------------- | ---- | -------------------- | ---------------------------- | --------------------------- | ------------------ | ----------- | ---------------------- | ------------ |\n");
        for c in cfgs {
            if !r.medians.get(c).is_some_and(|m| m.contains_key(w.name())) {
                let why = failure(r, c, w).unwrap_or_else(|| "not applicable".into());
                let _ = writeln!(s, "| {c} | {why} | | | | | | | | | | |");
                continue;
            }
            let v = g(c, w, "replies_per_s");
            let relayed = match (g(c, w, "kernel_in_pct"), g(c, w, "kernel_out_pct")) {
                (Some(i), Some(o)) => format!("{i:.1}% / {o:.1}%"),
                _ => "—".into(),
            };
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {}% | {} | {} | {} | {} | {} | {relayed} | {} |",
                num(v, 0),
                ratio(v, g(NO_PROXY, w, "replies_per_s")),
                ratio(v, g(GO_MMPROXY, w, "replies_per_s")),
                num(g(c, w, "loss_pct"), 2),
                num(r.machine_per_unit(c, w), 2),
                num(r.extra_per_unit(c, w), 2),
                ratio(r.extra_per_unit(c, w), r.extra_per_unit(GO_MMPROXY, w)),
                num(g(c, w, "cpu_us_per_reply"), 2),
                num(g(c, w, "cpu_s"), 2),
                mib(g(c, w, "peak_rss_kib")),
            );
        }
        s.push('\n');
    }

    super::cpu_report::cpu_table(r, &mut s);
    super::cpu_report::udp_kernel_targets(r, &mut s);

    let w = Workload::Idle;
    if r.options.workloads.contains(&w) {
        let _ = writeln!(
            s,
            "### Idle connections: {} established (one round trip each), then idle\n",
            group_thousands(&r.options.idle_conns.to_string())
        );
        s.push_str("|                | proxy RSS KiB/conn | kernel KiB/conn (proxy's share) | kernel KiB/conn (all, slab) | proxy fds/conn | peak RSS MiB |\n");
        s.push_str("| -------------- | ------------------ | ------------------------------- | --------------------------- | -------------- | ------------ |\n");
        for c in cfgs.iter().filter(|c| r.ran(c, w)) {
            let kernel = if c == NO_PROXY {
                "— (baseline)".to_owned()
            } else {
                num(r.kernel_per_conn_kib(c), 1)
            };
            let _ = writeln!(
                s,
                "| {c} | {} | {kernel} | {} | {} | {} |",
                num(g(c, w, "rss_per_conn_kib"), 1),
                num(g(c, w, "slab_per_conn_kib"), 1),
                num(g(c, w, "fds_per_conn"), 1),
                mib(g(c, w, "peak_rss_kib")),
            );
        }
        s.push('\n');
    }

    // Every workload starts the proxy afresh: the start-up peak of the first one run.
    let startup = |c: &str| {
        r.options
            .workloads
            .iter()
            .find_map(|w| g(c, *w, "startup_peak_rss_kib"))
    };
    if cfgs.iter().any(|c| startup(c).is_some()) {
        s.push_str("### Start-up: peak RSS (VmHWM) when the proxy reports ready\n\n");
        s.push_str("|                | start-up peak RSS MiB |\n");
        s.push_str("| -------------- | --------------------- |\n");
        for c in cfgs.iter().filter(|c| startup(c).is_some()) {
            let _ = writeln!(s, "| {c} | {} |", mib(startup(c)));
        }
        s.push('\n');
    }

    let failed: Vec<String> = r
        .samples
        .iter()
        .filter_map(|x| {
            x.error.as_ref().map(|e| {
                format!(
                    "- {} / {} round {}: {}",
                    x.config,
                    x.workload.name(),
                    x.round,
                    e.lines().next().unwrap_or_default()
                )
            })
        })
        .collect();
    if !failed.is_empty() {
        s.push_str("Failed measurements:\n\n");
        for f in failed {
            s.push_str(&f);
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

fn failure(r: &Results, c: &str, w: Workload) -> Option<String> {
    let sample = r
        .samples
        .iter()
        .find(|x| x.config == c && x.workload == w)?;
    if let Some(s) = &sample.skipped {
        return Some(format!("not in this build ({s})"));
    }
    sample.error.as_ref().map(|e| {
        let first = e.lines().next().unwrap_or_default();
        format!("failed: {}", first.chars().take(80).collect::<String>())
    })
}

/// The machine and the command, for the top of the report.
pub fn preamble(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "- command: `{}`", r.options.command);
    let _ = writeln!(
        s,
        "- machine: {} CPUs ({}), {:.0} GiB, Linux {}",
        m.nproc, m.cpu_model, m.memory_gib, m.kernel
    );
    let _ = writeln!(
        s,
        "- load average (1/5/15 min) before: {}, after: {}",
        m.load_before, m.load_after
    );
    let v = |k: &str| r.versions.get(k).cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "- mmproxy {}, go-mmproxy {}, HAProxy {}",
        v("mmproxy"),
        v("go-mmproxy"),
        v("haproxy")
    );
    let _ = writeln!(
        s,
        "- layout: {}, {} thread(s) each for the throughput and UDP generators and the \
         echo servers, nice {}; whole run {:.0} s",
        if r.options.pin {
            "generators and echo servers pinned to CPU 0, the proxy to CPU 1"
        } else {
            "nothing pinned"
        },
        r.options.threads,
        r.options.nice,
        r.wall_secs
    );
    s
}

pub fn write_json(r: &Results, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(r)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Replaces the generated section of `path` (between [`BEGIN`] and [`END`]) with
/// `body`; appends the section when the markers are missing.
pub fn update_section(path: &Path, body: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN}\n{body}{END}\n");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let tail = old.get(e + END.len()..).unwrap_or_default();
            let tail = tail.strip_prefix('\n').unwrap_or(tail);
            format!("{}{section}{tail}", old.get(..b).unwrap_or_default())
        }
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}{section}")
        }
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands() {
        assert_eq!(group_thousands("1234567.89"), "1,234,567.89");
        assert_eq!(group_thousands("123"), "123");
        assert_eq!(group_thousands("-1234"), "-1,234");
    }

    #[test]
    fn section_is_replaced_in_place() {
        let dir = std::env::temp_dir().join(format!("mmpt-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("B.md");
        std::fs::write(&p, "# B\n\n## Codec\ntext\n").unwrap();
        update_section(&p, "one\n").unwrap();
        update_section(&p, "two\n").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert_eq!(s, format!("# B\n\n## Codec\ntext\n\n{BEGIN}\ntwo\n{END}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
