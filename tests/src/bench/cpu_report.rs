//! The report's CPU tables: every configuration's machine-wide and process CPU per
//! unit of work, and issue 16's targets for the kernel UDP datapath.
use std::fmt::Write as _;

use super::report::{num, ratio, GO_MMPROXY, NO_PROXY, UDP_KERNEL};
use super::{Results, Workload};

/// Every configuration's CPU per unit of work on every workload that measures CPU:
/// the whole machine's (with what the proxy adds over no proxy) and its process's.
pub fn cpu_table(r: &Results, s: &mut String) {
    let workloads: Vec<Workload> = r
        .options
        .workloads
        .iter()
        .copied()
        .filter(|w| w.cpu_unit().is_some())
        .collect();
    if workloads.is_empty() {
        return;
    }
    s.push_str(
        "### CPU per unit of work: the whole machine and the proxy process\n\n\
         Machine CPU is all CPUs' busy time in `/proc/stat` (user, nice, system, irq, \
         softirq, steal) during the measured interval, divided by the units of work; \
         *extra* is that minus no proxy's figure on the same workload in the same run, \
         the proxy's cost wherever the kernel ran it. *Machine busy* is the share of \
         both CPUs' time that was busy (near 100%: the machine, not the proxy, set the \
         rate). *Others' CPU* is what user processes outside the benchmark used in the \
         interval, other work on a shared machine that the machine figure includes; the \
         last column takes it off both figures, an estimate for when the machine was \
         shared.\n\n",
    );
    s.push_str("| workload (unit) | configuration | machine CPU per unit | extra over no proxy | extra vs go-mmproxy's extra | proxy process CPU per unit | machine busy | others' CPU s | extra, both less others' |\n");
    s.push_str("| --------------- | ------------- | -------------------- | ------------------- | --------------------------- | -------------------------- | ------------ | ------------- | ------------------------ |\n");
    for w in workloads {
        let Some(unit) = w.cpu_unit() else { continue };
        for c in r.configs.iter().filter(|c| r.ran(c, w)) {
            if !r.medians.get(c).is_some_and(|m| m.contains_key(w.name())) {
                continue;
            }
            let busy = r
                .get(c, w, "machine_busy_pct")
                .map_or_else(|| "—".into(), |b| format!("{b:.0}%"));
            let extra = if c == NO_PROXY {
                "— (baseline)".to_owned()
            } else {
                num(r.extra_per_unit(c, w), 2)
            };
            let _ = writeln!(
                s,
                "| {} ({}) | {c} | {} | {extra} | {} | {} | {busy} | {} | {} |",
                w.name(),
                unit.label,
                num(r.machine_per_unit(c, w), 2),
                ratio(r.extra_per_unit(c, w), r.extra_per_unit(GO_MMPROXY, w)),
                num(r.get(c, w, &unit.proxy_metric()), 2),
                num(r.get(c, w, "others_cpu_s"), 2),
                num(r.extra_less_others(c, w), 2),
            );
        }
    }
    s.push('\n');
}

/// Issue 16's targets for the kernel UDP datapath, against this run.
pub fn udp_kernel_targets(r: &Results, s: &mut String) {
    let w = Workload::Udp;
    let k = UDP_KERNEL;
    let Some(rate) = r.get(k, w, "replies_per_s") else {
        return;
    };
    let go = r.get(GO_MMPROXY, w, "replies_per_s");
    let none = r.get(NO_PROXY, w, "replies_per_s");
    let loss = r.get(k, w, "loss_pct");
    let (extra, go_extra) = (r.extra_per_unit(k, w), r.extra_per_unit(GO_MMPROXY, w));
    let holds = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "no",
        None => "—",
    };
    let at_least = |v: Option<f64>, base: Option<f64>, f: f64| Some(v? >= f * base?);
    s.push_str("### Issue 16 targets: the kernel UDP datapath in this run\n\n");
    s.push_str("| target | this run | holds? |\n|---|---|---|\n");
    let _ = writeln!(
        s,
        "| replies/s ≥ 2× go-mmproxy's | {} vs {} ({}) | {} |",
        num(Some(rate), 0),
        num(go, 0),
        ratio(Some(rate), go),
        holds(at_least(Some(rate), go, 2.0)),
    );
    let _ = writeln!(
        s,
        "| replies/s ≥ 0.75× no proxy's | {} vs {} ({}) | {} |",
        num(Some(rate), 0),
        num(none, 0),
        ratio(Some(rate), none),
        holds(at_least(Some(rate), none, 0.75)),
    );
    let _ = writeln!(
        s,
        "| loss < 0.1% | {}% | {} |",
        num(loss, 3),
        holds(loss.map(|l| l < 0.1)),
    );
    let _ = writeln!(
        s,
        "| extra machine CPU per reply ≤ 0.15× go-mmproxy's extra | {} vs {} µs ({}) | {} |",
        num(extra, 2),
        num(go_extra, 2),
        ratio(extra, go_extra),
        holds(match (extra, go_extra) {
            (Some(e), Some(g)) => Some(e <= 0.15 * g),
            _ => None,
        }),
    );
    let (e2, g2) = (
        r.extra_less_others(k, w),
        r.extra_less_others(GO_MMPROXY, w),
    );
    let _ = writeln!(
        s,
        "| the same, both less other processes' CPU | {} vs {} µs ({}) | {} |",
        num(e2, 2),
        num(g2, 2),
        ratio(e2, g2),
        holds(match (e2, g2) {
            (Some(e), Some(g)) => Some(e <= 0.15 * g),
            _ => None,
        }),
    );
    s.push('\n');
}
