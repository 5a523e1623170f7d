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

/// Issue 16's targets for the kernel UDP datapath, against this run: on the medians,
/// and round by round (each round's configurations ran back to back, so a round's
/// ratio is less exposed to the host's drift than a ratio of medians).
pub fn udp_kernel_targets(r: &Results, s: &mut String) {
    let w = Workload::Udp;
    let k = UDP_KERNEL;
    if r.get(k, w, "replies_per_s").is_none() {
        return;
    }
    let Some(unit) = w.cpu_unit() else { return };
    let (machine, less) = (unit.machine_metric(), unit.less_others_metric());
    let (machine, less) = (machine.as_str(), less.as_str());
    // A value from a lookup of (configuration, metric), given the configuration
    // or metric the row compares against.
    type Value = fn(&dyn Fn(&str, &str) -> Option<f64>, &str) -> Option<f64>;
    let rate_vs: Value =
        |g, base| Some(g(UDP_KERNEL, "replies_per_s")? / g(base, "replies_per_s")?);
    let loss: Value = |g, _| g(UDP_KERNEL, "loss_pct");
    let extra_vs: Value = |g, m| {
        let e = |c| Some(g(c, m)? - g(NO_PROXY, m)?);
        Some(e(UDP_KERNEL)? / e(GO_MMPROXY)?)
    };
    // (target, comparison, bound, value, what it compares against)
    let rows: [(&str, char, f64, Value, &str); 5] = [
        ("replies/s ≥ 2× go-mmproxy's", '≥', 2.0, rate_vs, GO_MMPROXY),
        ("replies/s ≥ 0.75× no proxy's", '≥', 0.75, rate_vs, NO_PROXY),
        ("loss < 0.1%", '<', 0.1, loss, ""),
        (
            "extra machine CPU per reply ≤ 0.15× go-mmproxy's extra",
            '≤',
            0.15,
            extra_vs,
            machine,
        ),
        (
            "the same, all figures less other processes' CPU",
            '≤',
            0.15,
            extra_vs,
            less,
        ),
    ];
    s.push_str("### Issue 16 targets: the kernel UDP datapath in this run\n\n");
    s.push_str("| target | on the medians | round by round | holds? |\n|---|---|---|---|\n");
    let rounds: Vec<usize> = (1..=r.options.rounds).collect();
    for (name, cmp, bound, value, against) in rows {
        let ok = |v: f64| match cmp {
            '≥' => v >= bound,
            '<' => v < bound,
            _ => v <= bound,
        };
        let fmt = |v: f64| {
            if name.starts_with("loss") {
                format!("{v:.3}%")
            } else {
                format!("{v:.3}×")
            }
        };
        let med = value(&|c, m| r.get(c, w, m), against);
        let each: Vec<f64> = rounds
            .iter()
            .filter_map(|&round| value(&|c, m| round_metric(r, c, w, round, m), against))
            .collect();
        let held = each.iter().filter(|v| ok(**v)).count();
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} on the medians; {held} of {} rounds |",
            med.map_or_else(|| "—".into(), fmt),
            each.iter().map(|v| fmt(*v)).collect::<Vec<_>>().join(", "),
            match med.map(ok) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            },
            each.len(),
        );
    }
    s.push('\n');
}

/// One round's value of a metric (the sample of that round, when it succeeded).
fn round_metric(r: &Results, c: &str, w: Workload, round: usize, m: &str) -> Option<f64> {
    r.samples
        .iter()
        .find(|x| x.config == c && x.workload == w && x.round == round && x.error.is_none())?
        .metrics
        .get(m)
        .copied()
        .filter(|v| v.is_finite())
}
