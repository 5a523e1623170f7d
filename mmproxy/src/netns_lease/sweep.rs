//! Removing lease files nobody holds, at every start: those of processes that were
//! killed as the last of their namespace, and of namespaces that are gone.
//!
//! Two kinds of file live in the directory:
//! - `<purpose>-netns-<id>.lock`: a lock and nothing else. Unheld, it means nothing
//!   and goes.
//! - `<purpose>-netns-<id>`: a record (the operator's sysctl value), guarded by the
//!   `.lock` file of the same name. It is looked at only while its guard is held, and
//!   goes when it is empty or its namespace is gone. A record of a live namespace
//!   stays: the next mmproxy there restores the value it holds (a killed last
//!   instance could not).
//!
//! A namespace counts as live while a thread of any process is in it or a mount
//! (`ip netns add`) holds it. When that cannot be told (some process may not be
//! looked at: mmproxy runs as its own user, or a sandbox hides its init), records
//! of other namespaces are kept; a record is small, and only a last instance that
//! was killed leaves one.
use std::collections::HashSet;
use std::io::{self, Read};
use std::path::Path;

use super::{LeaseFile, Lock};

/// Removes the files in `dir` that no process holds and nothing needs. Best effort:
/// a file that cannot be looked at is left.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| netns_of(n.trim_end_matches(".lock")).is_some())
        .collect();
    let mut live = None;
    // Records first: each is removed under its guard, which the second pass may then
    // remove as well.
    for name in names.iter().filter(|n| !n.ends_with(".lock")) {
        if let Err(e) = sweep_record(dir, name, &mut live) {
            tracing::debug!(error = &e as &dyn std::error::Error, "sweeping {name}");
        }
    }
    for name in names.iter().filter(|n| n.ends_with(".lock")) {
        if let Err(e) = remove_if_unheld(dir, name) {
            tracing::debug!(error = &e as &dyn std::error::Error, "sweeping {name}");
        }
    }
}

/// The namespace id in `<purpose>-netns-<id>`.
fn netns_of(name: &str) -> Option<u64> {
    let (_, id) = name.rsplit_once("-netns-")?;
    id.parse().ok()
}

fn remove_if_unheld(dir: &Path, name: &str) -> Result<(), super::LeaseError> {
    let Some(mut lock) = open_existing(dir, name)? else {
        return Ok(());
    };
    if lock.try_lock(Lock::Exclusive)? {
        lock.remove()?;
    }
    Ok(())
}

fn sweep_record(dir: &Path, name: &str, live: &mut Option<Live>) -> Result<(), super::LeaseError> {
    let mut guard = LeaseFile::open(dir.join(format!("{name}.lock")))?;
    if !guard.try_lock(Lock::Exclusive)? {
        return Ok(());
    }
    let result = sweep_guarded_record(dir, name, live);
    // Held exclusively: the guard goes too (the next user makes a new one).
    guard.remove()?;
    result
}

fn sweep_guarded_record(
    dir: &Path,
    name: &str,
    live: &mut Option<Live>,
) -> Result<(), super::LeaseError> {
    let Some(mut record) = open_existing(dir, name)? else {
        return Ok(());
    };
    if !record.try_lock(Lock::Exclusive)? {
        return Ok(());
    }
    let mut content = String::new();
    record
        .file()
        .read_to_string(&mut content)
        .map_err(|source| super::LeaseError::Open {
            path: record.path().to_path_buf(),
            source,
        })?;
    let stale = content.trim().is_empty()
        || reused_here(name, &content)
        || netns_of(name).is_some_and(|ns| live.get_or_insert_with(Live::scan).gone(ns));
    if stale {
        record.remove()?;
    }
    Ok(())
}

/// Whether `name` is a record of a namespace that is gone and whose id this
/// thread's namespace reuses: records start with their namespace's cookie
/// ([`super::netns_cookie`]), which is never reused.
fn reused_here(name: &str, content: &str) -> bool {
    let own = super::netns_cookie();
    let recorded = content
        .split_whitespace()
        .next()
        .and_then(|c| c.parse::<u64>().ok());
    own != 0
        && netns_of(name).is_some()
        && netns_of(name) == super::netns_id().ok()
        && recorded != Some(own)
}

/// Opens `dir/name` if it exists (the sweep must not create files it then judges).
fn open_existing(dir: &Path, name: &str) -> Result<Option<LeaseFile>, super::LeaseError> {
    let path = dir.join(name);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(file) => Ok(Some(LeaseFile { file, path })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(super::LeaseError::Open { path, source }),
    }
}

/// The network namespaces known to be live.
struct Live {
    /// Ids of namespaces a thread is in or a mount holds.
    ids: HashSet<u64>,
    /// Every process could be looked at: a namespace not in `ids` is gone.
    complete: bool,
}

impl Live {
    fn scan() -> Self {
        let mut live = Live {
            ids: HashSet::new(),
            complete: true,
        };
        let Ok(processes) = std::fs::read_dir("/proc") else {
            live.complete = false;
            return live;
        };
        for process in processes.flatten() {
            if !process
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            // A process that ended meanwhile has no tasks to look at.
            let Ok(tasks) = std::fs::read_dir(process.path().join("task")) else {
                continue;
            };
            for task in tasks.flatten() {
                match std::fs::read_link(task.path().join("ns/net")) {
                    Ok(link) => live.ids.extend(ns_inode(&link.to_string_lossy())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => live.complete = false,
                }
            }
        }
        match std::fs::read_to_string("/proc/self/mountinfo") {
            // The fourth field is the mount's root: `net:[<inode>]` for a namespace
            // file.
            Ok(mounts) => live.ids.extend(
                mounts
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(3))
                    .filter_map(ns_inode),
            ),
            Err(_) => live.complete = false,
        }
        live
    }

    /// Whether the namespace `ns` is known to be gone.
    fn gone(&self, ns: u64) -> bool {
        self.complete && !self.ids.contains(&ns)
    }
}

/// The inode in `net:[<inode>]`.
fn ns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::{netns_id, NetnsDir};
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mmproxy-sweep-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_and_links_parse() {
        assert_eq!(netns_of("routing-netns-4026531840"), Some(4026531840));
        assert_eq!(netns_of("accept-local-netns-12"), Some(12));
        assert_eq!(netns_of("notes.txt"), None);
        assert_eq!(ns_inode("net:[4026531840]"), Some(4026531840));
        assert_eq!(ns_inode("/"), None);
    }

    #[test]
    fn the_own_namespace_is_live_and_gone_needs_a_complete_scan() {
        let own = netns_id().unwrap();
        let live = Live::scan();
        assert!(live.ids.contains(&own));
        assert!(!live.gone(own));
        let mut live = Live {
            ids: HashSet::from([own]),
            complete: true,
        };
        assert!(live.gone(1));
        live.complete = false;
        assert!(
            !live.gone(1),
            "a process that could not be looked at may be in it"
        );
    }

    #[test]
    fn unheld_locks_and_empty_records_go_held_and_live_ones_stay() {
        let dir = scratch("sweep");
        let own = netns_id().unwrap();
        std::fs::write(dir.join("routing-netns-1.lock"), b"").unwrap();
        std::fs::write(dir.join("accept-local-netns-1"), b"").unwrap();
        std::fs::write(dir.join("accept-local-netns-1.lock"), b"").unwrap();
        let cookie = super::super::netns_cookie();
        std::fs::write(
            dir.join(format!("accept-local-netns-{own}")),
            format!("{cookie} 0"),
        )
        .unwrap();
        // Left by a namespace that had this one's id before: another cookie.
        std::fs::write(
            dir.join(format!("old-netns-{own}")),
            format!("{} 0", cookie + 1),
        )
        .unwrap();
        std::fs::write(dir.join("unrelated.txt"), b"x").unwrap();
        let mut held = LeaseFile::open(dir.join("routing-netns-2.lock")).unwrap();
        held.lock(Lock::Shared).unwrap();
        let mut empty = LeaseFile::open(dir.join("other-netns-3")).unwrap();
        empty.lock(Lock::Shared).unwrap();

        sweep(&dir);
        assert_eq!(
            listing(&dir),
            vec![
                format!("accept-local-netns-{own}"),
                "other-netns-3".to_owned(),
                "routing-netns-2.lock".to_owned(),
                "unrelated.txt".to_owned(),
            ]
        );
        drop((held, empty));
        sweep(&dir);
        assert_eq!(
            listing(&dir),
            vec![
                format!("accept-local-netns-{own}"),
                "unrelated.txt".to_owned()
            ],
            "a live namespace's record stays for the next mmproxy there"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The race the path check exists for: B opens the file, A (the last holder)
    /// removes it, B locks what it opened. B must end up holding the file the path
    /// names, shared with C who came later.
    #[test]
    fn a_lock_on_a_removed_file_moves_to_the_new_one() {
        let dir = scratch("race");
        let ns = NetnsDir::open(&dir).unwrap();
        let mut a = ns.file("t", ".lock").unwrap();
        a.lock(Lock::Exclusive).unwrap();
        let mut b = ns.file("t", ".lock").unwrap();
        assert!(!b.try_lock(Lock::Shared).unwrap());
        a.remove().unwrap();
        b.lock(Lock::Shared).unwrap();
        let named = std::fs::metadata(b.path()).unwrap();
        let held = b.file().metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((named.dev(), named.ino()), (held.dev(), held.ino()));
        let mut c = ns.file("t", ".lock").unwrap();
        assert!(c.try_lock(Lock::Shared).unwrap());
        assert!(!c.is_last(), "b holds the same file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
