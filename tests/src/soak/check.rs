//! The soak's verdict: each check with what was expected and what was seen, and the
//! summary written to `summary.md`.
use std::fmt::Write as _;

use super::hostile::{Reason, TcpKind, UdpKind};
use super::probe::Scrape;
use super::{Run, Sample, RSS_SLACK_KIB};

pub struct Check {
    pub name: String,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

fn eq(name: &str, expected: u64, observed: u64) -> Check {
    Check {
        name: name.to_owned(),
        expected: expected.to_string(),
        observed: observed.to_string(),
        ok: expected == observed,
    }
}

const REJECTED: &str = "tcp_connections_rejected_total";
const DROPPED: &str = "udp_datagrams_dropped_total";
const REFUSED: &str = "kernel_refused_total";
/// The TCP rejections a connection closed before its header was complete gets.
const CLOSED_EARLY: [&str; 3] = ["header_eof", "header_timeout", "read_error"];

/// Accepted connections whose fate is known: proxied, rejected for a reason, or
/// failed to reach the upstream.
pub fn tcp_resolved(t: &Scrape) -> u64 {
    t.get("tcp_connections_proxied_total")
        + t.sum(REJECTED, "reason")
        + t.sum("tcp_upstream_connect_failures_total", "error")
}

pub fn checks(run: &Run) -> Vec<Check> {
    let n = |k: &str| run.tally.get(k).copied().unwrap_or(0);
    let (t, u) = (&run.tcp, &run.udp);
    let mut c = Vec::new();

    let gone = run
        .samples
        .iter()
        .filter(|s| !s.tcp.alive || !s.udp.alive)
        .count();
    let alive_at_end = run.end.is_some_and(|e| e.tcp.alive && e.udp.alive);
    c.push(Check {
        name: "daemons alive at every sample and at the end (0 crashes)".into(),
        expected: "0 crashes".into(),
        observed: format!("{gone} samples without a daemon; alive at the end: {alive_at_end}"),
        ok: gone == 0 && alive_at_end,
    });
    c.push(eq(
        "load checks failed (good bytes not echoed intact, hostile connection answered or left open)",
        0,
        n("failures"),
    ));
    c.push(eq(
        "incidents while running (scrape failed, connect/relay/accept error, no quiet moment)",
        0,
        run.incidents.len() as u64,
    ));

    // TCP: every good connection proxied, its bytes and nothing else relayed.
    let good = n("tcp_good_short") + n("tcp_good_stream");
    c.push(eq(
        "tcp: connections proxied = good connections",
        good,
        t.get("tcp_connections_proxied_total"),
    ));
    c.push(eq(
        "tcp: bytes relayed to the upstream = good bytes sent",
        n("tcp_good_bytes_up"),
        t.label("tcp_relayed_bytes_total", "direction", "to_upstream"),
    ));
    c.push(eq(
        "tcp: bytes relayed to the proxy = good bytes echoed",
        n("tcp_good_bytes_down"),
        t.label("tcp_relayed_bytes_total", "direction", "to_proxy"),
    ));

    // TCP: every hostile connection rejected under its reason.
    let mut named = 0;
    for reason in TcpKind::ALL.iter().filter_map(|k| match k.reason() {
        Reason::Exact(r) => Some(r),
        _ => None,
    }) {
        let want: u64 = TcpKind::ALL
            .iter()
            .filter(|k| k.reason() == Reason::Exact(reason))
            .map(|k| n(k.name()))
            .sum();
        named += t.label(REJECTED, "reason", reason);
        c.push(eq(
            &format!("tcp: rejected {reason}"),
            want,
            t.label(REJECTED, "reason", reason),
        ));
    }
    let early_want = n(TcpKind::Truncated.name())
        + n(TcpKind::ResetMidHeader.name())
        + n("tcp_hostile_slow_loris")
        + n("tcp_hostile_flood");
    let early: u64 = CLOSED_EARLY
        .iter()
        .map(|r| t.label(REJECTED, "reason", r))
        .sum();
    named += early;
    c.push(Check {
        name: "tcp: rejected header_eof + header_timeout + read_error = truncated + reset + slow-loris + flood".into(),
        expected: early_want.to_string(),
        observed: format!(
            "{early} ({})",
            CLOSED_EARLY
                .iter()
                .map(|r| format!("{r} {}", t.label(REJECTED, "reason", r)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        ok: early == early_want,
    });
    let refused = t.sum(REFUSED, "family");
    let not_allowed = t.label(REJECTED, "reason", "not_allowed");
    named += not_allowed;
    c.push(Check {
        name: "tcp: refused by sk_lookup + rejected not_allowed = disallowed sources".into(),
        expected: n(TcpKind::Disallowed.name()).to_string(),
        observed: format!("{} ({refused} + {not_allowed})", refused + not_allowed),
        ok: refused + not_allowed == n(TcpKind::Disallowed.name()),
    });
    c.push(eq(
        "tcp: rejected for any other reason",
        0,
        t.sum(REJECTED, "reason").saturating_sub(named),
    ));
    c.push(eq(
        "tcp: upstream connect failures",
        0,
        t.sum("tcp_upstream_connect_failures_total", "error"),
    ));
    c.push(eq("tcp: relay errors", 0, t.get("tcp_relay_errors_total")));
    c.push(eq(
        "tcp: accepted = proxied + rejected (all reasons) + connect failures",
        t.get("tcp_connections_accepted_total"),
        tcp_resolved(t),
    ));

    // UDP.
    let hostile_udp: u64 = UdpKind::ALL.iter().map(|k| n(k.name())).sum();
    let refused_udp = u.sum(REFUSED, "family");
    c.push(eq(
        "udp: datagrams received = good sent + hostile sent − refused by sk_lookup",
        n("udp_good_sent") + hostile_udp - refused_udp.min(hostile_udp),
        u.get("udp_datagrams_received_total"),
    ));
    c.push(eq(
        "udp: datagrams sent to the upstream = good sent",
        n("udp_good_sent"),
        u.get("udp_datagrams_sent_total"),
    ));
    let mut named = 0;
    for reason in ["invalid_header", "truncated"] {
        let want: u64 = UdpKind::ALL
            .iter()
            .filter(|k| k.reason() == reason)
            .map(|k| n(k.name()))
            .sum();
        named += u.label(DROPPED, "reason", reason);
        c.push(eq(
            &format!("udp: dropped {reason}"),
            want,
            u.label(DROPPED, "reason", reason),
        ));
    }
    let not_allowed = u.label(DROPPED, "reason", "not_allowed");
    named += not_allowed;
    c.push(Check {
        name: "udp: refused by sk_lookup + dropped not_allowed = disallowed sources".into(),
        expected: n(UdpKind::Disallowed.name()).to_string(),
        observed: format!(
            "{} ({refused_udp} + {not_allowed})",
            refused_udp + not_allowed
        ),
        ok: refused_udp + not_allowed == n(UdpKind::Disallowed.name()),
    });
    c.push(eq(
        "udp: dropped for any other reason",
        0,
        u.sum(DROPPED, "reason").saturating_sub(named),
    ));
    let relayed = u.get("udp_answers_relayed_total");
    c.push(Check {
        name: "udp: answers relayed ≥ echoes the good flows received".into(),
        expected: format!("≥ {}", n("udp_good_replies")),
        observed: relayed.to_string(),
        ok: relayed >= n("udp_good_replies"),
    });

    // Memory and descriptors.
    for (name, pick) in [("tcp", 0), ("udp", 1)] {
        let proc_of = |s: &Sample| if pick == 0 { s.tcp } else { s.udp };
        let (warm, after) = run
            .samples
            .split_at(run.warm_up_samples.min(run.samples.len()));
        let warm_peak = warm.iter().map(|s| proc_of(s).rss_kib).max().unwrap_or(0);
        let after_peak = after.iter().map(|s| proc_of(s).rss_kib).max().unwrap_or(0);
        c.push(Check {
            name: format!(
                "{name} daemon: RSS after the warm-up ≤ its peak during the warm-up + {} MiB",
                RSS_SLACK_KIB / 1024
            ),
            expected: format!("≤ {} KiB", warm_peak + RSS_SLACK_KIB),
            observed: format!("{after_peak} KiB"),
            ok: warm_peak > 0 && after_peak <= warm_peak + RSS_SLACK_KIB,
        });
        let (b, e) = (
            run.baseline.map(|s| proc_of(&s)),
            run.end.map(|s| proc_of(&s)),
        );
        c.push(Check {
            name: format!(
                "{name} daemon: descriptors other than pipes when quiet, end = after the warm-up"
            ),
            expected: b.map_or("a quiet baseline".into(), |b| b.other_fds().to_string()),
            observed: e.map_or("no quiet end".into(), |e| e.other_fds().to_string()),
            ok: matches!((b, e), (Some(b), Some(e)) if b.other_fds() == e.other_fds()),
        });
        c.push(Check {
            name: format!(
                "{name} daemon: pipe descriptors when quiet ≤ the relay's pools (2 × {} × threads)",
                super::probe::RELAY_POOL_MAX
            ),
            expected: e.map_or("a quiet end".into(), |e| format!("≤ {}", e.pipe_bound())),
            observed: e.map_or("no quiet end".into(), |e| e.pipe_fds.to_string()),
            ok: e.is_some_and(|e| e.pipe_fds <= e.pipe_bound()),
        });
    }
    c
}

/// The summary: the run, the load, the checks, the daemons' memory.
pub fn markdown(run: &Run, checks: &[Check]) -> String {
    let m = &run.machine;
    let passed = checks.iter().all(|c| c.ok);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Soak: {}\n",
        if passed {
            "all checks passed"
        } else {
            "FAILED"
        }
    );
    let _ = writeln!(s, "- Command: `{}`", run.opts.command);
    let _ = writeln!(
        s,
        "- Daemons: `mmproxy -p tcp` and `mmproxy -p udp`, `--ebpf {}` ({})",
        run.opts.ebpf,
        super::version(&run.opts.mmproxy).replace('\n', "; ")
    );
    let _ = writeln!(
        s,
        "- Length: {:.1} min of load ({:.1} min wall), warm-up {:.0} s",
        run.opts.duration.as_secs_f64() / 60.0,
        run.wall.as_secs_f64() / 60.0,
        run.opts.warm_up().as_secs_f64()
    );
    let _ = writeln!(
        s,
        "- Machine: {} CPUs ({}), Linux {}, {:.1} GiB; load average at the start {}\n",
        m.nproc, m.cpu_model, m.kernel, m.memory_gib, m.load_before
    );
    let _ = writeln!(s, "| check | expected | observed | |\n|---|---|---|---|");
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            c.name,
            c.expected,
            c.observed,
            if c.ok { "ok" } else { "**FAIL**" }
        );
    }
    let _ = writeln!(s, "\n| load | count |\n|---|---:|");
    for (k, v) in &run.tally {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n| daemon | RSS after warm-up, quiet | RSS at the end, quiet | peak RSS | fds after warm-up, quiet | fds at the end, quiet |\n|---|---:|---:|---:|---:|---:|");
    for (name, pick) in [("tcp", 0), ("udp", 1)] {
        let p = |s: &Sample| if pick == 0 { s.tcp } else { s.udp };
        let peak = run.samples.iter().map(|x| p(x).rss_kib).max().unwrap_or(0);
        let kib = |x: Option<Sample>| x.map_or("-".into(), |x| format!("{} KiB", p(&x).rss_kib));
        let fds = |x: Option<Sample>| {
            x.map_or("-".into(), |x| {
                format!("{} ({} pipe ends)", p(&x).fds, p(&x).pipe_fds)
            })
        };
        let _ = writeln!(
            s,
            "| mmproxy -p {name} | {} | {} | {peak} KiB | {} | {} |",
            kib(run.baseline),
            kib(run.end),
            fds(run.baseline),
            fds(run.end)
        );
    }
    for (title, list) in [
        ("Incidents", &run.incidents),
        ("Failures (first 20)", &run.failures),
    ] {
        if !list.is_empty() {
            let _ = writeln!(s, "\n{title}:\n");
            for l in list {
                let _ = writeln!(s, "- {l}");
            }
        }
    }
    s
}

/// One line per sample, for a plot of memory and descriptors over time.
pub fn csv(run: &Run) -> String {
    let mut s = String::from("secs,tcp_rss_kib,tcp_fds,tcp_open,udp_rss_kib,udp_fds,udp_flows\n");
    for x in &run.samples {
        let _ = writeln!(
            s,
            "{:.1},{},{},{},{},{},{}",
            x.secs, x.tcp.rss_kib, x.tcp.fds, x.tcp_open, x.udp.rss_kib, x.udp.fds, x.udp_flows
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::bench::sys::Machine;
    use crate::soak::probe::Process;
    use crate::soak::{Options, Run};

    const TCP: &str = "mmproxy_tcp_connections_accepted_total 13\n\
        mmproxy_tcp_connections_proxied_total 10\n\
        mmproxy_tcp_connections_rejected_total{reason=\"not_proxy_protocol\"} 2\n\
        mmproxy_tcp_connections_rejected_total{reason=\"header_eof\"} 1\n\
        mmproxy_kernel_refused_total{family=\"ipv4\"} 1\n\
        mmproxy_tcp_relayed_bytes_total{direction=\"to_upstream\"} 100\n\
        mmproxy_tcp_relayed_bytes_total{direction=\"to_proxy\"} 100\n";
    const UDP: &str = "mmproxy_udp_datagrams_received_total 6\n\
        mmproxy_udp_datagrams_sent_total 5\n\
        mmproxy_udp_datagrams_dropped_total{reason=\"invalid_header\"} 1\n\
        mmproxy_udp_answers_relayed_total 5\n";

    fn run(tcp: &str, udp: &str) -> Run {
        let tally: BTreeMap<String, u64> = [
            ("tcp_good_short", 10),
            ("tcp_good_bytes_up", 100),
            ("tcp_good_bytes_down", 100),
            ("tcp_hostile_garbage", 2),
            ("tcp_hostile_truncated", 1),
            ("tcp_hostile_disallowed", 1),
            ("udp_good_sent", 5),
            ("udp_good_replies", 5),
            ("udp_hostile_garbage", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let p = |rss_kib, fds| Process {
            alive: true,
            rss_kib,
            fds,
            pipe_fds: 0,
            threads: 3,
        };
        let sample = |secs, rss| Sample {
            secs,
            tcp: p(rss, 30),
            udp: p(rss, 20),
            tcp_open: 0,
            udp_flows: 0,
        };
        Run {
            opts: Options {
                duration: Duration::from_secs(60),
                mmproxy: "mmproxy".into(),
                ebpf: "auto".into(),
                command: "test".into(),
            },
            machine: Machine::probe(),
            tally,
            failures: Vec::new(),
            samples: vec![sample(0.0, 9000), sample(40.0, 9100)],
            warm_up_samples: 1,
            baseline: Some(sample(30.0, 9000)),
            end: Some(sample(60.0, 9000)),
            tcp: Scrape::parse(tcp),
            udp: Scrape::parse(udp),
            incidents: Vec::new(),
            log_alerts: Vec::new(),
            quiet_fds: Default::default(),
            wall: Duration::from_secs(61),
        }
    }

    fn failed(run: &Run) -> Vec<String> {
        checks(run)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn consistent_counters_pass() {
        assert_eq!(failed(&run(TCP, UDP)), Vec::<String>::new());
    }

    #[test]
    fn a_rejection_under_the_wrong_reason_fails() {
        let tcp = TCP.replace(
            "{reason=\"not_proxy_protocol\"} 2",
            "{reason=\"not_proxy_protocol\"} 1\nmmproxy_tcp_connections_rejected_total{reason=\"too_long\"} 1",
        );
        assert_eq!(
            failed(&run(&tcp, UDP)),
            ["tcp: rejected not_proxy_protocol", "tcp: rejected too_long"]
        );
    }

    #[test]
    fn hostile_bytes_reaching_the_upstream_fail() {
        let tcp = TCP.replace(
            "{direction=\"to_upstream\"} 100",
            "{direction=\"to_upstream\"} 115",
        );
        assert_eq!(
            failed(&run(&tcp, UDP)),
            ["tcp: bytes relayed to the upstream = good bytes sent"]
        );
    }

    #[test]
    fn growth_and_leaks_after_the_warm_up_fail() {
        let mut r = run(TCP, UDP);
        r.samples[1].tcp.rss_kib = 9000 + RSS_SLACK_KIB + 1;
        if let Some(end) = r.end.as_mut() {
            end.udp.fds += 1;
        }
        let f = failed(&r);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("tcp daemon: RSS"), "{f:?}");
        assert!(
            f[1].starts_with("udp daemon: descriptors other than pipes"),
            "{f:?}"
        );
    }

    #[test]
    fn pooled_pipes_pass_up_to_their_bound_and_fail_beyond() {
        let mut r = run(TCP, UDP);
        if let Some(end) = r.end.as_mut() {
            end.tcp.fds += 2 * 16 * 3;
            end.tcp.pipe_fds = 2 * 16 * 3;
        }
        assert_eq!(failed(&r), Vec::<String>::new());
        if let Some(end) = r.end.as_mut() {
            end.tcp.fds += 2;
            end.tcp.pipe_fds += 2;
        }
        let f = failed(&r);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("tcp daemon: pipe descriptors"), "{f:?}");
    }

    #[test]
    fn a_dead_daemon_or_an_unaccounted_connection_fails() {
        let mut r = run(&TCP.replace("accepted_total 13", "accepted_total 14"), UDP);
        r.samples[1].udp.alive = false;
        let f = failed(&r);
        assert!(f[0].starts_with("daemons alive"), "{f:?}");
        assert!(f.iter().any(|n| n.starts_with("tcp: accepted =")), "{f:?}");
    }
}
