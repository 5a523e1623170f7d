//! `mmproxy check FLAGS` (like `nginx -t`): runs start-up's own validation
//! ([`crate::preflight`]) and capability assessment ([`crate::caps`]), probes what
//! this host offers (the BPF object, loading the programs without attaching them,
//! the tc interfaces, the sysctl, the routing table) and prints what start-up would
//! do as a short table. Nothing on the host is changed: netlink is only dumped, the
//! programs are loaded and dropped unattached, files are only read.
use std::fmt::Write as _;
use std::path::Path;

use crate::caps::{self, Cap};
use crate::cli::{Args, EbpfMode, Protocol, UdpDatapath};
use crate::ebpf;
use crate::netns_lease::DEFAULT_LOCK_DIR;
use crate::preflight;
use crate::routing::{self, RoutingPlan};

const ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ok,
    Off,
    Note,
    Fail,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Off => "off",
            State::Note => "-",
            State::Fail => "FAIL",
        }
    }
}

/// The table `check` prints.
#[derive(Default)]
struct Report {
    rows: Vec<(String, State, String)>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, state: State, detail: impl Into<String>) {
        self.rows.push((what.into(), state, detail.into()));
    }

    fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.1 == State::Fail).count()
    }

    fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (what, state, detail) in &self.rows {
            let _ = writeln!(out, "{what:<width$}  {:<4}  {detail}", state.word());
        }
        let _ = match self.failures() {
            0 => writeln!(out, "mmproxy check: start-up would succeed"),
            n => writeln!(
                out,
                "mmproxy check: start-up would fail ({n} line{} marked FAIL)",
                if n == 1 { "" } else { "s" }
            ),
        };
        out
    }
}

/// Runs the checks, prints the table on stdout; `true` when start-up would succeed.
pub async fn run(args: &Args) -> bool {
    let report = examine(args).await;
    print!("{}", report.render());
    report.failures() == 0
}

async fn examine(args: &Args) -> Report {
    let mut r = Report::default();
    let validated = match preflight::validate(args) {
        Ok(v) => {
            r.row("configuration", State::Ok, describe_flags(args));
            Some(v)
        }
        Err(e) => {
            r.row("configuration", State::Fail, format!("{e:#}"));
            None
        }
    };
    if let Some(v) = &validated {
        r.row("allowed subnets", State::Ok, describe_allowed(args, v));
        for w in &v.warnings {
            r.row("allowed subnets", State::Note, w.clone());
        }
    }

    let (held, assessment) = caps::assess_self(args);
    match held {
        Some(held) => {
            let names = |pred: &dyn Fn(Cap) -> bool| {
                let v: Vec<_> = Cap::RELEVANT
                    .into_iter()
                    .filter(|c| pred(*c))
                    .map(Cap::name)
                    .collect();
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(" ")
                }
            };
            let state = if assessment.fatal.is_empty() {
                State::Ok
            } else {
                State::Fail
            };
            r.row(
                "capabilities",
                state,
                format!(
                    "held: {}; not held: {}",
                    names(&|c| held.has(c)),
                    names(&|c| !held.has(c))
                ),
            );
        }
        None => r.row(
            "capabilities",
            State::Note,
            "cannot read /proc/self/status: not checked",
        ),
    }
    for missing in &assessment.fatal {
        r.row("capabilities", State::Fail, missing.to_string());
    }

    let embedded = ebpf::object_embedded();
    r.row(
        "BPF object",
        if embedded { State::Ok } else { State::Off },
        if embedded {
            "embedded in this binary"
        } else {
            "not embedded: this mmproxy was built without it (build it with `cargo xtask build`)"
        },
    );

    let Some(validated) = validated else {
        return r;
    };
    let kernel_on = kernel_side(args, &assessment, validated.rules.is_some(), &mut r);
    let steering = match kernel_on {
        true => return_path(args, &mut r).await,
        false => false,
    };
    routing_rows(args, steering, &mut r).await;
    listener_rows(args, kernel_on, &mut r);
    r
}

/// Whether the kernel side would be on, with its row.
fn kernel_side(args: &Args, assessment: &caps::Assessment, wanted: bool, r: &mut Report) -> bool {
    if !wanted {
        r.row("kernel side", State::Off, "--ebpf off: userspace only");
        return false;
    }
    let required = args.ebpf == EbpfMode::On || preflight::needs_kernel(args);
    if let Some(missing) = &assessment.kernel_off {
        r.row(
            "kernel side",
            State::Off,
            format!("userspace only: {missing}"),
        );
        return false;
    }
    if assessment
        .fatal
        .iter()
        .any(|m| m.caps.contains(&Cap::Bpf) || m.caps.contains(&Cap::Perfmon))
    {
        r.row(
            "kernel side",
            State::Fail,
            "cannot load without its capabilities (above)",
        );
        return false;
    }
    match ebpf::probe() {
        Ok(()) => {
            let mut what =
                vec!["sk_lookup and tc programs load; allowed subnets enforced before accept()"];
            if preflight::needs_kernel(args) {
                what.push("port ranges steered to one socket");
            }
            r.row("kernel side", State::Ok, what.join("; "));
            true
        }
        Err(e) => {
            let hint = e.hint();
            let text = format!("{:#} ({hint})", anyhow::Error::new(e));
            if required {
                r.row("kernel side", State::Fail, format!("unavailable: {text}"));
            } else {
                r.row(
                    "kernel side",
                    State::Off,
                    format!("unavailable, --ebpf auto falls back to userspace only: {text}"),
                );
            }
            false
        }
    }
}

/// The tc interfaces and the sysctl; whether answers would be steered by tc.
async fn return_path(args: &Args, r: &mut Report) -> bool {
    // The same choice start-up makes (and the running daemon repeats as the host
    // changes).
    let chosen = crate::netwatch::policy(args)
        .choose(None, ebpf::ifaces::Stage::StartUp)
        .await;
    let ifaces = match chosen {
        Ok(i) => i,
        Err(e) => {
            let e =
                anyhow::Error::new(e).context("choosing the interfaces for return-path steering");
            r.row("tc return path", State::Fail, format!("{e:#}"));
            return false;
        }
    };
    for note in &ifaces.notes {
        r.row("tc return path", State::Note, note.clone());
    }
    if ifaces.is_empty() {
        r.row(
            "tc return path",
            State::Off,
            "not needed: answers of loopback TCP targets come back through the routing rule",
        );
        r.row("sysctl", State::Note, "none changed");
        return false;
    }
    let list = |s: &std::collections::BTreeSet<String>| match s.is_empty() {
        true => "-".to_owned(),
        false => s.iter().cloned().collect::<Vec<_>>().join(","),
    };
    let tcx = ebpf::has_tcx();
    let state = match tcx {
        Some(false) => State::Fail,
        _ => State::Ok,
    };
    let mut detail = format!(
        "would attach tc egress on {}, ingress on {} (TCX links",
        list(&ifaces.egress),
        list(&ifaces.ingress)
    );
    detail.push_str(match tcx {
        Some(true) => ")",
        Some(false) => ": this kernel is older than 6.6 and has none)",
        None => ", Linux 6.6+: kernel release unreadable)",
    });
    r.row("tc return path", state, detail);
    if ifaces.egress.is_empty() {
        r.row("sysctl", State::Note, "none changed");
    } else {
        sysctl_rows(r);
    }
    true
}

/// accept_local, which egress steering turns on, and the directory its record
/// needs.
fn sysctl_rows(r: &mut Report) {
    match std::fs::read_to_string(ACCEPT_LOCAL) {
        Ok(v) => r.row(
            "sysctl",
            State::Ok,
            format!(
                "net.ipv4.conf.lo.accept_local is {}: set to 1 while running, restored by the \
                 last mmproxy of this network namespace",
                v.trim()
            ),
        ),
        Err(e) => r.row(
            "sysctl",
            State::Fail,
            format!("cannot read {ACCEPT_LOCAL}: {e}"),
        ),
    }
    let (state, detail) = runtime_dir();
    r.row("runtime directory", state, detail);
}

/// Whether [`DEFAULT_LOCK_DIR`] can hold the per-namespace records (systemd's
/// `RuntimeDirectory=` makes it for the unit's user).
fn runtime_dir() -> (State, String) {
    let dir = Path::new(DEFAULT_LOCK_DIR);
    let (probe, exists) = match dir.exists() {
        true => (dir, true),
        false => (dir.parent().unwrap_or(dir), false),
    };
    if writable(probe) {
        let how = if exists {
            "writable"
        } else {
            "created at start"
        };
        (State::Ok, format!("{DEFAULT_LOCK_DIR}: {how}"))
    } else {
        (
            State::Fail,
            format!(
                "{DEFAULT_LOCK_DIR} is not writable for this user: the accept_local record \
                 cannot be kept (the units' RuntimeDirectory=mmproxy provides it)"
            ),
        )
    }
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path valid for the call; faccessat only reads it.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    rc == 0
}

/// The return-path routing start-up would install, against what the table holds.
async fn routing_rows(args: &Args, steering: bool, r: &mut Report) {
    let what = format!("routing table {}", args.route_table);
    if args.no_routing {
        r.row(what, State::Off, "--no-routing: nothing installed");
        return;
    }
    let mut plan =
        RoutingPlan::for_targets(args.route_table, &[args.target4.addr, args.target6.addr]);
    if steering {
        plan = plan.with_fwmark(args.return_mark);
    }
    if plan.is_empty() {
        r.row(what, State::Note, "nothing needed for these targets");
        return;
    }
    match routing::preview(&plan).await {
        Ok(p) => {
            let quoted = |v: &[String]| {
                v.iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !p.to_add.is_empty() {
                r.row(&what, State::Ok, format!("would add {}", quoted(&p.to_add)));
            }
            if !p.present.is_empty() {
                r.row(
                    &what,
                    State::Ok,
                    format!("present, reused: {}", quoted(&p.present)),
                );
            }
            if !p.others.is_empty() {
                r.row(
                    &what,
                    State::Note,
                    format!("also in this table, left alone: {}", quoted(&p.others)),
                );
            }
        }
        Err(e) => r.row(what, State::Fail, format!("{:#}", anyhow::Error::new(e))),
    }
}

fn listener_rows(args: &Args, kernel_on: bool, r: &mut Report) {
    let proto = match args.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    for spec in &args.listen {
        let first = std::net::SocketAddr::new(spec.addr, *spec.ports.start());
        let mut detail = format!("{proto} {first}, {} socket(s)", args.listeners);
        if spec.is_range() {
            let _ = write!(
                detail,
                "; ports {}-{} steered there by the kernel side",
                spec.ports.start(),
                spec.ports.end()
            );
        }
        let state = if spec.is_range() && !kernel_on {
            State::Fail
        } else {
            State::Ok
        };
        r.row("listen", state, detail);
    }
    if args.protocol == Protocol::Udp {
        udp_datapath_row(args, kernel_on, r);
    }
    if let Some(addr) = args.metrics {
        r.row(
            "metrics",
            State::Ok,
            format!("http://{addr}/metrics, /healthz, /readyz"),
        );
    }
}

/// Who relays established UDP flows (`--udp-datapath`).
fn udp_datapath_row(args: &Args, kernel_on: bool, r: &mut Report) {
    match (args.udp_datapath, kernel_on) {
        (UdpDatapath::Socket, _) => r.row(
            "udp datapath",
            State::Ok,
            "socket: every datagram and answer through user space",
        ),
        (UdpDatapath::Kernel, true) => r.row(
            "udp datapath",
            State::Ok,
            "kernel: tc relays established flows both ways, user space sees each flow's \
             first datagram; relayed datagrams skip netfilter's OUTPUT/POSTROUTING",
        ),
        (UdpDatapath::Kernel, false) => r.row(
            "udp datapath",
            State::Fail,
            "kernel: needs the kernel side, which is off or would not load (above)",
        ),
    }
}

fn describe_flags(args: &Args) -> String {
    let target = |t: &crate::cli::TargetSpec| match (t.addr, t.port) {
        (a, Some(p)) => std::net::SocketAddr::new(a, p).to_string(),
        (std::net::IpAddr::V6(a), None) => format!("[{a}] (port from the header)"),
        (a, None) => format!("{a} (port from the header)"),
    };
    format!(
        "flags valid; -4 {}, -6 {}",
        target(&args.target4),
        target(&args.target6)
    )
}

fn describe_allowed(args: &Args, v: &preflight::Validated) -> String {
    let Some(path) = &args.allowed_subnets else {
        return "no --allowed-subnets: every proxy may connect".to_owned();
    };
    match v.allowed.current() {
        Some(list) if list.is_empty() => format!("{}: empty, allows nobody", path.display()),
        Some(list) => format!(
            "{}: {} subnets ({} IPv4, {} IPv6)",
            path.display(),
            list.len(),
            list.v4().count(),
            list.v6().count()
        ),
        None => format!("{}: not loaded", path.display()),
    }
}
