//! Every start-up refusal that follows from the flags and the files alone, in one
//! place: [`crate::daemon::run`] calls [`validate`] before it changes anything, and
//! `mmproxy check` calls the same function, so a configuration that start-up
//! refuses is refused by `check` with the same words. A new refusal of that kind
//! belongs here (not in the daemon's start-up steps), so that both see it.
//!
//! What depends on the host instead (capabilities, BPF, interfaces) is measured by
//! [`crate::caps`] and the kernel side's own loading; `check` probes those too.
use anyhow::{bail, Result};
use mmproxy_common::ListenRule;

use crate::allowed_subnets::SharedAllowList;
use crate::cli::{Args, EbpfMode, Protocol, UdpDatapath};

/// What validation produced, for start-up to use as it is.
#[derive(Debug)]
pub struct Validated {
    /// The parsed `--allowed-subnets` (everyone allowed without the flag).
    pub allowed: SharedAllowList,
    /// Entries used with a change (host bits set), for the log.
    pub warnings: Vec<String>,
    /// The kernel side's listen rules; `None` with `--ebpf off`.
    pub rules: Option<Vec<ListenRule>>,
}

/// Whether a feature asked for cannot do without the kernel side (then `--ebpf
/// auto` may not fall back to userspace).
pub fn needs_kernel(args: &Args) -> bool {
    kernel_needed_by(args).is_some()
}

/// What makes the kernel side required, for start-up's error when it cannot load.
pub fn kernel_needed_by(args: &Args) -> Option<&'static str> {
    if args.listen.iter().any(|l| l.is_range()) {
        Some("port ranges in -l")
    } else if kernel_udp_datapath(args) {
        Some("--udp-datapath kernel")
    } else {
        None
    }
}

/// `--udp-datapath kernel`: the tc programs relay established UDP flows.
pub fn kernel_udp_datapath(args: &Args) -> bool {
    args.udp_datapath == UdpDatapath::Kernel
}

/// The flags' combinations and the allowed-subnets file; an error names the flag
/// or the file and line.
pub fn validate(args: &Args) -> Result<Validated> {
    crate::loop_guard::check_config(args)?;
    let (allowed, warnings) = SharedAllowList::from_file(args.allowed_subnets.as_deref())?;
    if let Some(addr) = args.metrics {
        crate::metrics::check_listen_ranges(args, addr)?;
    }
    if kernel_udp_datapath(args) && args.protocol != Protocol::Udp {
        bail!("--udp-datapath kernel relays UDP flows: it needs -p udp");
    }
    if args.ebpf == EbpfMode::Off {
        if kernel_udp_datapath(args) {
            bail!("--udp-datapath kernel needs the kernel side, but --ebpf off was given");
        }
        if args.listen.iter().any(|l| l.is_range()) {
            bail!("port ranges in -l need the kernel side, but --ebpf off was given");
        }
        if !args.return_interfaces.is_empty() {
            bail!("--return-interface needs the kernel side, but --ebpf off was given");
        }
        return Ok(Validated {
            allowed,
            warnings,
            rules: None,
        });
    }
    if args.mark != 0 && args.mark == args.return_mark {
        bail!(
            "--mark and --return-mark are both {:#x}: upstream packets would be routed back to this host",
            args.mark
        );
    }
    let rules = crate::ebpf::listen_rules(&args.listen, args.protocol)?;
    Ok(Validated {
        allowed,
        warnings,
        rules: Some(rules),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["mmproxy"];
        v.extend_from_slice(extra);
        Args::try_from_iter(v).unwrap()
    }

    #[test]
    fn refusals_name_the_flags() {
        for (flags, words) in [
            (
                &["-l", "0.0.0.0:2000-2010", "--ebpf", "off"][..],
                "port ranges",
            ),
            (
                &["--return-interface", "eth0", "--ebpf", "off"],
                "--return-interface",
            ),
            (&["--mark", "7", "--return-mark", "7"], "--return-mark"),
            (
                &["-l", "0.0.0.0:9000-9100", "--metrics", "0.0.0.0:9090"],
                "--metrics",
            ),
            (&["--udp-datapath", "kernel"], "-p udp"),
            (&["-p", "tcp", "--udp-datapath", "kernel"], "-p udp"),
            (
                &["-p", "udp", "--udp-datapath", "kernel", "--ebpf", "off"],
                "--ebpf off",
            ),
        ] {
            let e = validate(&args(flags)).unwrap_err();
            assert!(format!("{e:#}").contains(words), "{flags:?}: {e:#}");
        }
        assert!(validate(&args(&[])).unwrap().rules.is_some());
        assert!(validate(&args(&["--ebpf", "off"])).unwrap().rules.is_none());
    }

    #[test]
    fn the_kernel_udp_datapath_makes_the_kernel_side_required() {
        let kernel = args(&["-p", "udp", "--udp-datapath", "kernel"]);
        assert!(validate(&kernel).unwrap().rules.is_some());
        assert!(needs_kernel(&kernel), "--ebpf auto may not fall back");
        assert_eq!(kernel_needed_by(&kernel), Some("--udp-datapath kernel"));
        let on = args(&["-p", "udp", "--udp-datapath", "kernel", "--ebpf", "on"]);
        assert!(validate(&on).is_ok());
        assert!(!needs_kernel(&args(&["-p", "udp"])));
        assert!(!needs_kernel(&args(&[
            "-p",
            "udp",
            "--udp-datapath",
            "socket"
        ])));
    }

    #[test]
    fn a_bad_subnets_file_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("mmproxy-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("allowed.txt");
        std::fs::write(&file, "# ok\n10.0.0.0/8\nnot-a-net\n").unwrap();
        let e = validate(&args(&["--allowed-subnets", file.to_str().unwrap()])).unwrap_err();
        let text = format!("{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains("allowed.txt:3"), "{text}");
    }
}
