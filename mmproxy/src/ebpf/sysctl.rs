//! `net.ipv4.conf.lo.accept_local`, which answers redirected into `lo` need (their
//! source is one of the host's own addresses), turned on for as long as any mmproxy
//! in the network namespace steers, and back to what the operator had after the last
//! one stops.
//!
//! Several mmproxy processes may share a namespace (a TCP and a UDP instance), and
//! one may be SIGKILLed. So the original value is kept in a per-namespace file in
//! the lock directory, written by the first instance that changes the setting;
//! every running instance holds a shared lease ([`crate::netns_lease`]) on it; at
//! exit an instance that gets the lock exclusively is the last one and restores
//! the recorded value. A killed instance's lock goes with it, so the next clean
//! exit restores too. The record carries the namespace's cookie first: a file left
//! by a namespace that is gone, whose inode number a new one reuses, is not taken
//! for this namespace's (and is swept: `netns_lease::sweep`). The last instance
//! removes the files once it has restored the value.
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use crate::netns_lease::{netns_cookie, LeaseFile, Lock, NetnsDir, DEFAULT_LOCK_DIR};

const ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

/// Held while this process needs accept_local on; [`AcceptLocal::release`] at exit.
#[derive(Debug)]
pub struct AcceptLocal {
    /// `None`: the record could not be kept (the lock directory is not writable);
    /// then the setting is left on at exit.
    files: Option<Files>,
}

/// The record (its shared lock says "an mmproxy here needs the setting") and a
/// mutex file serialising start-up against the last instance's restore. Both are
/// always locked in this order: mutex, then record.
#[derive(Debug)]
struct Files {
    record: LeaseFile,
    mutex: LeaseFile,
}

impl AcceptLocal {
    /// Turns accept_local on for lo, recording the operator's value first.
    pub fn enable() -> io::Result<Self> {
        match Self::enable_in(Path::new(DEFAULT_LOCK_DIR)) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() != io::ErrorKind::PermissionDenied => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "cannot record {ACCEPT_LOCAL} in {DEFAULT_LOCK_DIR}: \
                     it is turned on and left on at exit"
                );
                if std::fs::read_to_string(ACCEPT_LOCAL)?.trim() != "1" {
                    std::fs::write(ACCEPT_LOCAL, "1")?;
                }
                Ok(Self { files: None })
            }
            Err(e) => Err(e),
        }
    }

    fn enable_in(dir: &Path) -> io::Result<Self> {
        let dir = NetnsDir::open(dir)?;
        let mut mutex = dir.file("accept-local", ".lock")?;
        mutex.lock(Lock::Exclusive)?;
        // Opened only now: the last instance removes the record while it holds
        // the mutex. Immediate: an exiting instance takes the record exclusively
        // only while it holds the mutex, which is ours now.
        let mut record = dir.file("accept-local", "")?;
        record.lock(Lock::Shared)?;
        let mut recorded = String::new();
        record.file().read_to_string(&mut recorded)?;
        let cookie = netns_cookie();
        let current = std::fs::read_to_string(ACCEPT_LOCAL)?;
        if recorded_value(&recorded, cookie).is_none() {
            // No record of this namespace's (a stale one of a namespace that is
            // gone is dropped): the current value is the operator's.
            let file = record.file();
            file.rewind()?;
            file.set_len(0)?;
            if current.trim() != "1" {
                write!(file, "{cookie} {}", current.trim())?;
                file.sync_data()?;
            }
        }
        if current.trim() != "1" {
            std::fs::write(ACCEPT_LOCAL, "1")?;
        }
        mutex.unlock()?;
        Ok(Self {
            files: Some(Files { record, mutex }),
        })
    }

    /// Restores the recorded value if no other mmproxy in the namespace still runs.
    pub fn release(self) -> io::Result<()> {
        let Some(Files {
            mut record,
            mut mutex,
        }) = self.files
        else {
            return Ok(());
        };
        mutex.lock(Lock::Exclusive)?;
        if !record.is_last() {
            return Ok(());
        }
        let mut recorded = String::new();
        let file = record.file();
        file.rewind()?;
        file.read_to_string(&mut recorded)?;
        if let Some(value) = recorded_value(&recorded, netns_cookie()) {
            std::fs::write(ACCEPT_LOCAL, value)?;
        }
        // Restored: nothing to keep. Record before mutex, both while held, so a
        // starting instance finds either both or a fresh start.
        record.remove()?;
        mutex.remove()?;
        Ok(())
    }
}

/// The value recorded for the namespace with `cookie`, if the record is its.
fn recorded_value(record: &str, cookie: u64) -> Option<&str> {
    let (c, value) = record.trim().split_once(' ')?;
    (c.parse::<u64>().ok()? == cookie && !value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_counts_only_for_its_namespace() {
        assert_eq!(recorded_value("42 0", 42), Some("0"));
        assert_eq!(recorded_value("42 0\n", 42), Some("0"));
        assert_eq!(recorded_value("41 0", 42), None);
        assert_eq!(recorded_value("", 42), None);
        assert_eq!(recorded_value("42", 42), None);
    }
}
