//! The handoff as the daemon's start-up sees it: ask before binding, and once
//! serving, finish a takeover and put up the offer for the next instance.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use socket2::{SockRef, Type};
use tracing::{info, warn};

use super::{take_over, ListenSet, Offer, Takeover};
use crate::cli::{Args, Protocol};

/// [`take_over`] off the runtime's threads (it blocks while the old instance
/// answers). Any failure but "nobody offers" stops start-up: binding anyway would
/// fail on the same port, or silently join the old instance's SO_REUSEPORT group.
pub async fn ask(set: &ListenSet) -> Result<Option<Takeover>> {
    let set = set.clone();
    let name = set.socket_name();
    let taken = tokio::task::spawn_blocking(move || take_over(&set))
        .await
        .context("the handoff thread failed")?
        .with_context(|| {
            format!("taking the listening sockets over from the running mmproxy (@{name})")
        })?;
    if let Some(t) = &taken {
        info!(
            old_pid = t.old_pid,
            "handoff: took the listening sockets of the running mmproxy"
        );
    }
    Ok(taken)
}

/// Checks that the sockets handed over are what `args` asks to listen on, and
/// turns them into listeners of the protocol's kind.
pub fn inherit<S: From<OwnedFd>>(args: &Args, groups: Vec<Vec<OwnedFd>>) -> Result<Vec<Vec<S>>> {
    if groups.len() != args.listen.len() {
        bail!(
            "the running mmproxy handed over {} listening addresses, -l names {}",
            groups.len(),
            args.listen.len()
        );
    }
    let kind = match args.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let mut out = Vec::new();
    for (spec, group) in args.listen.iter().zip(groups) {
        if group.len() != usize::from(args.listeners) {
            warn!(
                handed_over = group.len(),
                listeners = args.listeners,
                "handoff: serving the {} sockets handed over for {}; --listeners applies at the next start without an mmproxy running",
                group.len(),
                spec.addr
            );
        }
        let mut sockets = Vec::new();
        for fd in group {
            let sock = SockRef::from(&fd);
            let local = sock.local_addr()?.as_socket();
            let fits =
                local.is_some_and(|a| a.ip() == spec.addr && a.port() == *spec.ports.start());
            if !fits || sock.r#type()? != kind {
                bail!(
                    "the running mmproxy handed over {local:?}, not a socket for -l {}",
                    spec.addr
                );
            }
            sock.set_nonblocking(true)?;
            sockets.push(S::from(fd));
        }
        out.push(sockets);
    }
    Ok(out)
}

/// Duplicates of the listening sockets, kept until the offer holds its own.
pub fn duplicates<S: AsFd>(groups: &[Vec<S>]) -> Vec<Vec<OwnedFd>> {
    groups
        .iter()
        .map(|g| {
            g.iter()
                .filter_map(|s| s.as_fd().try_clone_to_owned().ok())
                .collect()
        })
        .collect()
}

/// Once serving: tells the old instance (if any) to stop accepting, then offers
/// the sockets to the next one. `None`: no offer (upgrades from this instance will
/// bind instead; logged).
pub async fn settle(
    takeover: Option<Takeover>,
    set: &ListenSet,
    sockets: Vec<Vec<OwnedFd>>,
    metrics: Option<BorrowedFd<'_>>,
) -> Option<Offer> {
    let mut control = None;
    if let Some(t) = takeover {
        let old_pid = t.old_pid;
        match tokio::task::spawn_blocking(move || t.finish()).await {
            Ok(Ok((listener, took))) => {
                info!(
                    old_pid,
                    took_ms = took.as_millis() as u64,
                    "handoff: the old mmproxy stopped accepting; this one serves alone"
                );
                control = Some(listener);
            }
            Ok(Err(e)) => warn!(error = &e as &dyn std::error::Error, "handoff: finishing"),
            Err(e) => warn!(error = &e as &dyn std::error::Error, "handoff: finishing"),
        }
    }
    let borrowed: Vec<Vec<BorrowedFd<'_>>> = sockets
        .iter()
        .map(|g| g.iter().map(AsFd::as_fd).collect())
        .collect();
    let offer = match control {
        Some(l) => Offer::inherit(l, set, &borrowed, metrics).map(Some),
        None => Offer::bind(set, &borrowed, metrics),
    };
    match offer {
        Ok(Some(o)) => Some(o),
        Ok(None) => {
            warn!(
                name = %set.socket_name(),
                "handoff: another process holds the handoff socket; a new mmproxy cannot take over from this one"
            );
            None
        }
        Err(e) => {
            warn!(
                error = &e as &dyn std::error::Error,
                "handoff: cannot offer the sockets; a new mmproxy cannot take over from this one"
            );
            None
        }
    }
}
