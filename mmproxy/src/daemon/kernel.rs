//! The kernel side as start-up loads it, and as the rest of the daemon shares it.
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::allowed_subnets::{AllowList, SharedAllowList};
use crate::cli::{Args, EbpfMode};
use crate::ebpf::{self, KernelOptions, KernelSide};

/// The loaded kernel side, shared by the serving tasks, the signal loop and the
/// network follower.
pub(super) type Kernel = Arc<std::sync::Mutex<KernelSide>>;

/// The kernel side, even after a panic while it was locked: a panic elsewhere does
/// not make the attached programs and maps go away, so "poisoned" is not "absent".
pub(super) fn lock(kernel: &Kernel) -> std::sync::MutexGuard<'_, KernelSide> {
    kernel
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Loads and attaches the kernel side, or explains why not. `sockets[i]` are the
/// listening sockets (TCP or UDP) of `args.listen[i]`; for a port range the first
/// one is put in the SOCKMAP the sk_lookup program steers the whole range to. With
/// `--listeners N` that is the first socket of an SO_REUSEPORT group, and the kernel
/// still spreads steered connections over the whole group.
pub(super) async fn start_kernel_side<S: std::os::fd::AsRawFd>(
    args: &Args,
    allowed: &SharedAllowList,
    rules: Option<&[mmproxy_common::ListenRule]>,
    sockets: &[Vec<S>],
) -> Result<Option<Kernel>> {
    // `None`: --ebpf off, or auto without the capabilities (said above). What
    // needs the kernel side was refused by then (crate::preflight, crate::caps).
    let Some(rules) = rules else {
        return Ok(None);
    };
    let needs_kernel = crate::preflight::needs_kernel(args);
    let policy = crate::netwatch::policy(args);
    let return_path = policy
        .choose(None, ebpf::ifaces::Stage::StartUp)
        .await
        .context("choosing the interfaces for return-path steering")?;
    for note in &return_path.notes {
        warn!("return path: {note}");
    }
    let current = allowed.current();
    let (v4, v6) = split_nets(current.as_deref());
    let opts = KernelOptions {
        rules,
        allowed: current.as_ref().map(|_| (&v4[..], &v6[..])),
        verbose: args.verbose,
        return_path: &return_path,
        may_steer: policy.may_steer(),
        return_mark: args.return_mark,
        relay_capacity: u32::try_from(args.max_flows.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .min(1 << 22),
        flow_capacity: u32::try_from(args.max_connections.saturating_add(args.max_flows))
            .unwrap_or(u32::MAX)
            .min(1 << 22),
        udp_relay: crate::preflight::kernel_udp_datapath(args),
        max_header_len: u32::try_from(args.max_header_len).unwrap_or(u32::MAX),
    };
    match KernelSide::load(&opts) {
        Ok(mut kernel) => {
            for (i, (spec, group)) in args.listen.iter().zip(sockets).enumerate() {
                if let (true, Some(first)) = (spec.is_range(), group.first()) {
                    kernel.register_listener(i as u32, first)?;
                }
            }
            info!("kernel side attached: sk_lookup enforces allowed subnets before accept()");
            if opts.udp_relay {
                info!("UDP datapath: tc programs relay established flows (--udp-datapath kernel)");
            }
            if !return_path.is_empty() {
                let list = |s: &std::collections::BTreeSet<String>| {
                    s.iter().cloned().collect::<Vec<_>>().join(",")
                };
                info!(
                    egress = %list(&return_path.egress),
                    ingress = %list(&return_path.ingress),
                    mark = %format!("{:#x}", args.return_mark),
                    "return path: tc steers answers of live flows to the local table"
                );
            }
            Ok(Some(Arc::new(std::sync::Mutex::new(kernel))))
        }
        Err(e) if args.ebpf == EbpfMode::Auto && !needs_kernel => {
            warn!(
                error = &e as &dyn std::error::Error,
                hint = e.hint(),
                "kernel side unavailable: allowed subnets are enforced in userspace only \
                 and return traffic is routed only for loopback targets"
            );
            Ok(None)
        }
        Err(e) => {
            let hint = e.hint();
            let why = match crate::preflight::kernel_needed_by(args) {
                Some(what) => format!("required by {what}; {hint}"),
                None => hint.to_owned(),
            };
            Err(anyhow::Error::new(e).context(format!("loading the kernel side ({why})")))
        }
    }
}

pub(super) fn split_nets(list: Option<&AllowList>) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv6Net>) {
    match list {
        Some(l) => (l.v4().collect(), l.v6().collect()),
        None => (Vec::new(), Vec::new()),
    }
}
