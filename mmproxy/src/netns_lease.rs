//! Per-network-namespace leases: lock files that tell the mmproxy processes of one
//! network namespace whether they are the last one running there.
//!
//! Two parts of mmproxy change state that belongs to the whole namespace and must
//! be put back by the last process that needs it: the return path's policy routing
//! ([`crate::routing`]) and `net.ipv4.conf.lo.accept_local` (`ebpf::sysctl`). A TCP
//! and a UDP instance may share a namespace, and any of them may be SIGKILLed, so
//! "last" cannot be counted in memory. Instead every running process holds a
//! shared `flock` on a file named after the namespace; the kernel drops the lock
//! of a process however it ends. At exit, a process that can turn its shared lock
//! into an exclusive one is the last one; a process that cannot leaves the state
//! for the others.
//!
//! The files are `<dir>/<purpose>-netns-<id><ext>` in [`DEFAULT_LOCK_DIR`], where
//! `<id>` is the namespace's inode number ([`netns_id`]). Inode numbers are reused
//! once a namespace is gone, so anything written *into* a file that must not be
//! mistaken for another namespace's carries the namespace's cookie
//! ([`netns_cookie`]), which is unique until reboot.
//!
//! Nothing is left behind: the last process of a namespace removes the namespace's
//! files ([`LeaseFile::remove`]) while it holds them exclusively, and every start
//! sweeps files nobody holds ([`sweep`]). A file may thus be unlinked between
//! someone's open and their lock (the classic unlink-vs-open race), so every lock
//! taken here is checked afterwards: if the path no longer names the locked file,
//! the lock is dropped and the path opened and locked again ([`LeaseFile::lock`],
//! [`LeaseFile::try_lock`], [`LeaseFile::lock_within`]). Only a holder of the
//! exclusive lock unlinks, so a checked lock stays valid for as long as it is held.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod sweep;
pub use sweep::sweep;

/// Where the per-namespace lock files live (created if missing).
pub const DEFAULT_LOCK_DIR: &str = "/run/mmproxy";

/// How often [`LeaseFile::lock_within`] retries.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Why a lease file could not be set up or locked.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot identify the network namespace")]
    Namespace(#[source] io::Error),
    #[error("cannot create {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LeaseError {
    /// The kind of the underlying OS error.
    pub fn kind(&self) -> io::ErrorKind {
        self.io().kind()
    }

    fn io(&self) -> &io::Error {
        match self {
            LeaseError::Namespace(source)
            | LeaseError::CreateDir { source, .. }
            | LeaseError::Open { source, .. }
            | LeaseError::Lock { source, .. }
            | LeaseError::Remove { source, .. } => source,
        }
    }
}

impl From<LeaseError> for io::Error {
    /// Keeps the OS error's kind (callers tell "permission denied" apart) and the
    /// lease's context as the message, with the OS error as its source.
    fn from(e: LeaseError) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// The calling thread's network namespace id (the inode number of its
/// `/proc/.../ns/net`). A test may have unshared the namespace on its own thread,
/// so `/proc/self` (the main thread's) is only the fallback for kernels without
/// `/proc/thread-self`.
pub fn netns_id() -> io::Result<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .map(|m| m.ino())
}

/// The calling thread's network namespace cookie (unique until reboot; Linux >=
/// 5.14), 0 if unknown.
pub fn netns_cookie() -> u64 {
    let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the pointer and length describe a live u64 for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cookie
    } else {
        0
    }
}

/// The lock directory as seen from the calling thread's network namespace.
#[derive(Clone, Debug)]
pub struct NetnsDir {
    dir: PathBuf,
    netns: u64,
}

impl NetnsDir {
    /// Identifies the calling thread's namespace, creates `dir` if missing and
    /// removes the files there that no process holds and nothing needs ([`sweep`]).
    pub fn open(dir: &Path) -> Result<Self, LeaseError> {
        let netns = netns_id().map_err(LeaseError::Namespace)?;
        std::fs::create_dir_all(dir).map_err(|source| LeaseError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        sweep(dir);
        Ok(Self {
            dir: dir.to_path_buf(),
            netns,
        })
    }

    /// Opens (creating, never truncating) `<dir>/<purpose>-netns-<id><ext>`.
    pub fn file(&self, purpose: &str, ext: &str) -> Result<LeaseFile, LeaseError> {
        let path = self
            .dir
            .join(format!("{purpose}-netns-{}{ext}", self.netns));
        LeaseFile::open(path)
    }
}

/// How a [`LeaseFile`] is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lock {
    /// "A process here needs the state": any number of holders.
    Shared,
    /// "The only process here": no other holder of either kind.
    Exclusive,
}

impl Lock {
    fn op(self) -> libc::c_int {
        match self {
            Lock::Shared => libc::LOCK_SH,
            Lock::Exclusive => libc::LOCK_EX,
        }
    }
}

/// One open lock file. Closing it (dropping) releases whatever lock it holds.
#[derive(Debug)]
pub struct LeaseFile {
    file: File,
    path: PathBuf,
}

impl LeaseFile {
    /// Opens (creating, never truncating) the file at `path`.
    fn open(path: PathBuf) -> Result<Self, LeaseError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| LeaseError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(LeaseFile { file, path })
    }

    /// Waits for the lock. Taking a lock of the other kind converts the one held.
    pub fn lock(&mut self, how: Lock) -> Result<(), LeaseError> {
        loop {
            self.flock(how.op())?;
            if self.still_named()? {
                return Ok(());
            }
        }
    }

    /// Takes the lock if nobody stands in the way; `Ok(false)` if somebody does.
    pub fn try_lock(&mut self, how: Lock) -> Result<bool, LeaseError> {
        loop {
            if !self.flock_nb(how)? {
                return Ok(false);
            }
            if self.still_named()? {
                return Ok(true);
            }
        }
    }

    /// [`LeaseFile::try_lock`] again and again for up to `wait` (without blocking
    /// the runtime's thread); fails with `EWOULDBLOCK` when the time is up.
    pub async fn lock_within(&mut self, how: Lock, wait: Duration) -> Result<(), LeaseError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.try_lock(how)? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseError::Lock {
                    path: self.path.clone(),
                    source: io::Error::from_raw_os_error(libc::EWOULDBLOCK),
                });
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Whether the path still names the file this process has locked. If not (the
    /// namespace's last process removed it while this one waited for the lock), the
    /// lock is dropped with the stale file, and the path opened afresh for another
    /// try.
    fn still_named(&mut self) -> Result<bool, LeaseError> {
        let held = self.file.metadata().map_err(|source| LeaseError::Open {
            path: self.path.clone(),
            source,
        })?;
        match std::fs::metadata(&self.path) {
            Ok(named) if named.dev() == held.dev() && named.ino() == held.ino() => Ok(true),
            Ok(_) => {
                *self = Self::open(self.path.clone())?;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                *self = Self::open(self.path.clone())?;
                Ok(false)
            }
            Err(source) => Err(LeaseError::Open {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes the file and closes it. Only for a holder of the exclusive lock: an
    /// opener waiting for the lock meanwhile finds the path gone or new, and starts
    /// over ([`LeaseFile::lock`]).
    pub fn remove(self) -> Result<(), LeaseError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LeaseError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// flock with LOCK_NB, without the path check; `Ok(false)` if somebody holds it.
    fn flock_nb(&self, how: Lock) -> Result<bool, LeaseError> {
        match self.flock(how.op() | libc::LOCK_NB) {
            Ok(()) => Ok(true),
            Err(LeaseError::Lock { source, .. })
                if source.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this process is the last one holding the lease: converts a shared
    /// lock to an exclusive one without waiting. Any failure counts as "not last",
    /// which leaves the namespace's state to the others.
    ///
    /// No path check: nobody removes a file while this process holds it. A failed
    /// conversion loses the shared lock (flock(2) drops it before trying), which
    /// only an exiting process asks for.
    pub fn is_last(&self) -> bool {
        matches!(self.flock_nb(Lock::Exclusive), Ok(true))
    }

    /// Releases the lock, keeping the file open.
    pub fn unlock(&self) -> Result<(), LeaseError> {
        self.flock(libc::LOCK_UN)
    }

    /// The file, for a lease that also records something.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    fn flock(&self, op: libc::c_int) -> Result<(), LeaseError> {
        // SAFETY: flock on a descriptor the File owns; no memory is passed.
        if unsafe { libc::flock(self.file.as_raw_fd(), op) } == 0 {
            Ok(())
        } else {
            Err(LeaseError::Lock {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mmproxy-lease-test-{}-{name}", std::process::id()))
    }

    #[test]
    fn files_are_named_after_purpose_and_namespace() {
        let dir = scratch("names");
        let ns = NetnsDir::open(&dir).unwrap();
        let f = ns.file("routing", ".lock").unwrap();
        assert_eq!(
            f.path,
            dir.join(format!("routing-netns-{}.lock", netns_id().unwrap()))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_last_holder_gets_the_lease_exclusively() {
        let dir = scratch("last");
        let ns = NetnsDir::open(&dir).unwrap();
        // Two opens are two open file descriptions: flock treats them like two
        // processes.
        let mut a = ns.file("t", ".lock").unwrap();
        let mut b = ns.file("t", ".lock").unwrap();
        a.lock(Lock::Shared).unwrap();
        b.lock(Lock::Shared).unwrap();
        assert!(!a.is_last(), "b still holds it");
        drop(b);
        assert!(a.is_last());
        let mut c = ns.file("t", ".lock").unwrap();
        assert!(!c.try_lock(Lock::Shared).unwrap(), "a holds it exclusively");
        a.unlock().unwrap();
        assert!(c.try_lock(Lock::Shared).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_keep_the_os_error_kind_and_name_the_path() {
        let dir = scratch("errors");
        std::fs::write(&dir, b"not a directory").unwrap();
        let e = NetnsDir::open(&dir).unwrap_err();
        assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
        let io = io::Error::from(e);
        assert_eq!(io.kind(), io::ErrorKind::AlreadyExists);
        let _ = std::fs::remove_file(&dir);
    }
}
