//! Installing the plan and removing it again at exit: reuse what matches, add
//! what is missing (tagged [`RT_PROTOCOL`](super::RT_PROTOCOL)), and at exit remove mmproxy's entries
//! only when this is the last mmproxy of the network namespace (its lease says
//! so), or else exactly what this process added when it has no lease.
use std::fmt;
use std::path::Path;
use std::time::Duration;

use rtnetlink::Handle;

use super::netlink::{self, Existing, Kind};
use super::plan::{IpFamily, Item, RoutingPlan};
use super::RoutingError;
use crate::netns_lease::{LeaseError, LeaseFile, Lock, NetnsDir, DEFAULT_LOCK_DIR};

/// How long `install` waits for another mmproxy that is removing the shared
/// routes right now (it holds the lock exclusively for a few milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(5);

const IPV6_DISABLED: &str = "IPv6 is disabled in this kernel";

/// What became of one planned entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Added,
    /// Present already; `ours`: tagged by an mmproxy (a live one, or one that
    /// was killed).
    Reused {
        ours: bool,
    },
    /// Not installable here and not needed (IPv6 disabled).
    Skipped(&'static str),
}

/// The routing this process installed or found; hand it back to
/// [`InstalledRoutes::remove`] at exit.
#[derive(Debug)]
pub struct InstalledRoutes {
    pub(super) table: u32,
    pub(super) entries: Vec<(Item, Outcome)>,
    /// Shared lease on the namespace's routing lock file; `None`: no lock could
    /// be taken (then only what this process added is removed).
    pub(super) lock: Option<LeaseFile>,
    pub(super) lock_note: Option<String>,
}

impl InstalledRoutes {
    /// One line for the info log: what was added, reused or skipped.
    pub fn describe(&self) -> String {
        let list = |pred: &dyn Fn(&Outcome) -> bool| {
            self.entries
                .iter()
                .filter(|(_, o)| pred(o))
                .map(|(i, _)| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let added = list(&|o| *o == Outcome::Added);
        if !added.is_empty() {
            parts.push(format!("added {added}"));
        }
        let reused = list(&|o| *o == Outcome::Reused { ours: false });
        if !reused.is_empty() {
            parts.push(format!("reused existing {reused}"));
        }
        let shared = list(&|o| *o == Outcome::Reused { ours: true });
        if !shared.is_empty() {
            parts.push(format!(
                "shared with another or an earlier mmproxy {shared}"
            ));
        }
        for (i, o) in &self.entries {
            if let Outcome::Skipped(why) = o {
                parts.push(format!("skipped `{i}` ({why})"));
            }
        }
        if parts.is_empty() {
            parts.push("nothing to do".into());
        }
        let mut s = format!("table {}: {}", self.table, parts.join("; "));
        if let Some(n) = &self.lock_note {
            s.push_str("; ");
            s.push_str(n);
        }
        s
    }

    /// Whether this process added anything.
    pub fn added_any(&self) -> bool {
        self.entries.iter().any(|(_, o)| *o == Outcome::Added)
    }
    /// Removes mmproxy's entries if this is the last mmproxy using them in
    /// this network namespace (see the module docs); otherwise leaves them.
    /// Never removes an entry mmproxy did not tag. Entries already gone are
    /// fine.
    pub async fn remove(self) -> Result<RemoveReport, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        let task = tokio::spawn(conn);
        let result = self.remove_with(&handle).await;
        task.abort();
        result
    }

    async fn remove_with(self, handle: &Handle) -> Result<RemoveReport, RoutingError> {
        let last = match &self.lock {
            Some(lease) => lease.is_last(),
            None => false,
        };
        if self.lock.is_some() && !last {
            // Another mmproxy in this namespace still relies on the entries.
            return Ok(RemoveReport {
                removed: Vec::new(),
                left_for_others: true,
            });
        }
        let lo_index = netlink::loopback_index(handle).await.unwrap_or(1);
        let mut removed = Vec::new();
        let mut failures = Vec::new();
        // Rules first: no rule may point at a table being emptied.
        for kind in [Kind::Rule, Kind::Route] {
            for family in [IpFamily::V4, IpFamily::V6] {
                let entries = match netlink::dump(handle, kind, family).await {
                    Ok(entries) => entries,
                    Err(e) if netlink::is_af_unsupported(&e) => continue,
                    Err(e) => {
                        failures.push(with_causes(e));
                        continue;
                    }
                };
                for entry in entries.into_iter().filter(Existing::is_ours) {
                    if !last && !self.added().any(|item| entry.matches(&item, lo_index)) {
                        continue;
                    }
                    let desc = entry.describe();
                    match netlink::delete(handle, entry).await {
                        Ok(()) => removed.push(desc),
                        Err(e) if netlink::is_gone(&e) => {}
                        Err(e) => failures.push(with_causes(netlink::nl_error(
                            format!("deleting `{desc}`"),
                            e,
                        ))),
                    }
                }
            }
        }
        // The lock is released (file closed) only now, so that an mmproxy
        // starting meanwhile waits and then sees the final state. The last one
        // removes the file first (an mmproxy waiting for it then opens a new one).
        if let Some(lease) = self.lock.filter(|_| last) {
            if let Err(e) = lease.remove() {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "removing the routing lease"
                );
            }
        }
        if failures.is_empty() {
            Ok(RemoveReport {
                removed,
                left_for_others: false,
            })
        } else {
            Err(RoutingError::Remove(failures))
        }
    }

    fn added(&self) -> impl Iterator<Item = Item> + '_ {
        self.entries
            .iter()
            .filter(|(_, o)| *o == Outcome::Added)
            .map(|(i, _)| *i)
    }
}

/// What [`InstalledRoutes::remove`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveReport {
    /// Entries deleted, as `ip` would show them.
    pub removed: Vec<String>,
    /// Another mmproxy in this namespace still runs: nothing was removed.
    pub left_for_others: bool,
}

impl fmt::Display for RemoveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.left_for_others {
            f.write_str("return-path routing left in place: another mmproxy in this network namespace uses it")
        } else if self.removed.is_empty() {
            f.write_str("return-path routing: nothing to remove")
        } else {
            write!(
                f,
                "return-path routing removed: {}",
                self.removed.join(", ")
            )
        }
    }
}

/// An error and its causes on one line, for the list of failed removals.
fn with_causes(e: RoutingError) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

/// Takes the namespace's routing lease (shared).
async fn shared_lock(dir: &Path) -> Result<LeaseFile, LeaseError> {
    let mut lease = NetnsDir::open(dir)?.file("routing", ".lock")?;
    lease.lock_within(Lock::Shared, LOCK_WAIT).await?;
    Ok(lease)
}

/// Installs what `plan` needs, reusing what is there. Needs a tokio runtime
/// with I/O and timers; works in the calling thread's network namespace.
/// On error, whatever this call added is removed again.
pub async fn install(plan: &RoutingPlan) -> Result<InstalledRoutes, RoutingError> {
    install_with_lock_dir(plan, Path::new(DEFAULT_LOCK_DIR)).await
}

/// [`install`] with the lock files in `lock_dir` instead of
/// [`DEFAULT_LOCK_DIR`] (tests; hosts where `/run` is not writable).
pub async fn install_with_lock_dir(
    plan: &RoutingPlan,
    lock_dir: &Path,
) -> Result<InstalledRoutes, RoutingError> {
    // Without the lease routing still works; only the cleanup at exit falls back
    // to "what this process added".
    let (lock, lock_note) = match shared_lock(lock_dir).await {
        Ok(lease) => (Some(lease), None),
        Err(e) => (
            None,
            Some(format!(
                "{:#}: at exit only what this process added is removed",
                anyhow::Error::new(e)
            )),
        ),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let task = tokio::spawn(conn);
    let mut installed = InstalledRoutes {
        table: plan.table,
        entries: Vec::new(),
        lock,
        lock_note,
    };
    let result = install_with(&handle, plan, &mut installed).await;
    let result = match result {
        Ok(()) => Ok(installed),
        Err(e) => {
            // Roll back our own additions only: with the lock released first
            // we would not be "last", so remove exactly what we added.
            installed.lock = None;
            if installed.added_any() {
                if let Err(re) = installed.remove_with(&handle).await {
                    tracing::warn!(
                        error = &re as &dyn std::error::Error,
                        "rolling back return-path routing after a failure"
                    );
                }
            }
            Err(e)
        }
    };
    task.abort();
    result
}

async fn install_with(
    handle: &Handle,
    plan: &RoutingPlan,
    out: &mut InstalledRoutes,
) -> Result<(), RoutingError> {
    let items = plan.items();
    if items.is_empty() {
        return Ok(());
    }
    let lo_index = netlink::loopback_index(handle).await?;
    let mut existing = Vec::new();
    let mut v6_disabled = false;
    for kind in [Kind::Rule, Kind::Route] {
        for family in [IpFamily::V4, IpFamily::V6] {
            if family == IpFamily::V6 && v6_disabled {
                continue;
            }
            match netlink::dump(handle, kind, family).await {
                Ok(entries) => existing.extend(entries),
                Err(e) if family == IpFamily::V6 && netlink::is_af_unsupported(&e) => {
                    v6_disabled = true
                }
                Err(e) => return Err(e),
            }
        }
    }

    for item in items {
        let v6 = item.family() == IpFamily::V6;
        if v6 && v6_disabled {
            out.entries.push((item, Outcome::Skipped(IPV6_DISABLED)));
            continue;
        }
        if let Some(found) = existing.iter().find(|e| e.matches(&item, lo_index)) {
            out.entries.push((
                item,
                Outcome::Reused {
                    ours: found.is_ours(),
                },
            ));
            continue;
        }
        match netlink::add(handle, &item, lo_index).await {
            Ok(()) => out.entries.push((item, Outcome::Added)),
            // Someone (another mmproxy starting) added it since the dump.
            Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {
                out.entries.push((item, Outcome::Reused { ours: true }))
            }
            Err(e) if v6 && netlink::errno(&e) == Some(libc::EAFNOSUPPORT) => {
                out.entries.push((item, Outcome::Skipped(IPV6_DISABLED)))
            }
            Err(e) => return Err(netlink::nl_error(format!("adding `{item}`"), e)),
        }
    }
    Ok(())
}
