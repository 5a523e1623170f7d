//! Signals and the periodic counters line: what the running daemon does between
//! ready and shutdown.
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use super::kernel::{lock, split_nets, Kernel};
use crate::allowed_subnets::SharedAllowList;
use crate::cli::Args;
use crate::handoff::{self, Offer, Successor};
use crate::stats::Stats;

/// The signals the daemon acts on. Installed before the ready line, so a signal
/// sent right after it is never met by the default action (which, for SIGUSR1 and
/// SIGHUP, kills the process).
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    pub(super) fn install() -> Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
            usr1: install(SignalKind::user_defined1(), "SIGUSR1")?,
            usr2: install(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }
}

/// Waits for SIGTERM/SIGINT, or for a new mmproxy to take over (`Some`); reloads
/// the allow-list on SIGHUP; logs the counters at once on SIGUSR1; starts a new
/// mmproxy to take over on SIGUSR2.
pub(super) async fn signal_loop(
    mut signals: Signals,
    args: &Args,
    allowed: &SharedAllowList,
    kernel: Option<&Kernel>,
    stats: &Stats,
    offer: Option<&Offer>,
) -> Option<Successor> {
    let successor = async {
        match offer {
            Some(o) => o.successor().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(successor);
    loop {
        tokio::select! {
            _ = signals.term.recv() => return None,
            _ = signals.int.recv() => return None,
            s = &mut successor => return Some(s),
            _ = signals.usr2.recv() => {
                if offer.is_none() {
                    warn!("SIGUSR2: this mmproxy offers no handoff (see the warning at start-up); not starting a new one");
                    continue;
                }
                crate::notify::reloading();
                if let Err(e) = handoff::successor::spawn() {
                    error!(error = &e as &dyn std::error::Error, "SIGUSR2: cannot start a new mmproxy");
                    crate::notify::ready();
                }
            }
            _ = signals.hup.recv() => {
                crate::notify::reloading();
                reload(args, allowed, kernel);
                crate::notify::ready();
            }
            _ = signals.usr1.recv() => info!("stats {}", stats_line(stats, kernel)),
        }
    }
}

pub(super) fn reload(args: &Args, allowed: &SharedAllowList, kernel: Option<&Kernel>) {
    let Some(path) = args.allowed_subnets.as_deref() else {
        info!("SIGHUP: no --allowed-subnets file to reload");
        return;
    };
    match allowed.reload(path) {
        Ok((n, warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            if let Some(kernel) = kernel {
                let current = allowed.current();
                let (v4, v6) = split_nets(current.as_deref());
                if let Err(e) = lock(kernel).set_allowed(Some((&v4, &v6))) {
                    error!(
                        error = &e as &dyn std::error::Error,
                        "SIGHUP: updating the kernel's allowed subnets failed"
                    );
                }
            }
            info!("SIGHUP: reloaded {} ({n} subnets)", path.display());
        }
        Err(e) => error!(
            error = &e as &dyn std::error::Error,
            "SIGHUP: keeping the previous allowed subnets"
        ),
    }
}

pub(super) fn spawn_stats_line(
    every: Duration,
    stats: Arc<Stats>,
    kernel: Option<Kernel>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if every.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            info!("stats {}", stats_line(&stats, kernel.as_ref()));
        }
    })
}

/// Userspace and kernel counters, `name=value`, zeros left out.
pub(super) fn stats_line(stats: &Stats, kernel: Option<&Kernel>) -> String {
    let mut line = stats.render();
    if let Some(k) = kernel {
        for (name, v) in lock(k).counters() {
            if v != 0 {
                line.push_str(&format!(" {name}={v}"));
            }
        }
    }
    line
}
