//! Starting the daemon as the systemd unit does, without systemd: as an
//! unprivileged user holding only the unit's ambient capabilities (through
//! util-linux `setpriv`), with `NoNewPrivileges=` and `UMask=0077`, a runtime
//! directory owned by that user mounted at `/run/mmproxy` (what `RuntimeDirectory=`
//! gives), and `NOTIFY_SOCKET` pointing at a real datagram socket the test reads
//! READY=1 from.
//!
//! With [`ENV`]`=1` every daemon a test starts is launched so (the second
//! end-to-end pass of `cargo xtask test`); a test can also ask for it, with a
//! chosen capability set, through [`Privileges::User`].
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::haproxy::TempDir;
use crate::netns::{output, Netns};

/// `MMPROXY_TEST_UNPRIVILEGED=1`: launch every daemon as [`USER`] with the unit's
/// capabilities.
pub const ENV: &str = "MMPROXY_TEST_UNPRIVILEGED";

/// The system user the tests run the daemon as (created on first use).
pub const USER: &str = "mmpt-daemon";

/// The unit whose `AmbientCapabilities=` the tests grant.
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/systemd/mmproxy.service"
);

/// Where the shipped units' `RuntimeDirectory=mmproxy` lives.
const RUNTIME_DIR: &str = "/run/mmproxy";

/// Who the daemon runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Privileges {
    /// [`USER`] with the unit's capabilities under [`ENV`]`=1`, else root.
    #[default]
    Default,
    /// Root, whatever [`ENV`] says.
    Root,
    /// [`USER`] with exactly these capabilities (`CAP_NET_ADMIN`, …).
    User(Vec<String>),
}

impl Privileges {
    /// [`USER`] with the unit's capabilities less `drop` (`"CAP_BPF"`).
    pub fn unit_without(drop: &str) -> Result<Self> {
        let caps = unit_capabilities()?;
        if !caps.iter().any(|c| c == drop) {
            bail!("{drop} is not in the unit's AmbientCapabilities= {caps:?}");
        }
        Ok(Self::User(caps.into_iter().filter(|c| c != drop).collect()))
    }

    /// What [`Privileges::Default`] means in this run.
    pub fn resolve(&self) -> Result<Option<Vec<String>>> {
        match self {
            Privileges::Root => Ok(None),
            Privileges::User(caps) => Ok(Some(caps.clone())),
            Privileges::Default if std::env::var(ENV).as_deref() == Ok("1") => {
                unit_capabilities().map(Some)
            }
            Privileges::Default => Ok(None),
        }
    }
}

/// The capabilities `AmbientCapabilities=` of the shipped unit grants.
pub fn unit_capabilities() -> Result<Vec<String>> {
    let unit = std::fs::read_to_string(UNIT).with_context(|| format!("reading {UNIT}"))?;
    let caps: Vec<String> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect();
    if caps.is_empty() {
        bail!("{UNIT} has no AmbientCapabilities=");
    }
    Ok(caps)
}

/// linux/capability.h numbers of the capabilities the tests deal in.
fn cap_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => bail!("unknown capability {other}"),
    })
}

/// `(uid, gid)` of [`USER`], created as a system user the first time.
pub fn test_user() -> Result<(u32, u32)> {
    static USER_IDS: OnceLock<(u32, u32)> = OnceLock::new();
    if let Some(ids) = USER_IDS.get() {
        return Ok(*ids);
    }
    let lookup = || -> Option<(u32, u32)> {
        let uid = output(Command::new("id").args(["-u", USER])).ok()?;
        let gid = output(Command::new("id").args(["-g", USER])).ok()?;
        Some((uid.trim().parse().ok()?, gid.trim().parse().ok()?))
    };
    let ids = match lookup() {
        Some(ids) => ids,
        None => {
            // Another test process may create it at the same moment: then the
            // lookup after the failure finds it.
            let created = output(Command::new("useradd").args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ]));
            match (lookup(), created) {
                (Some(ids), _) => ids,
                (None, Err(e)) => return Err(e.context(format!("creating the user {USER}"))),
                (None, Ok(_)) => bail!("{USER} was created but cannot be looked up"),
            }
        }
    };
    Ok(*USER_IDS.get_or_init(|| ids))
}

/// The daemon binary copied where [`USER`] can run it (the checkout may be under a
/// home directory closed to others), once per test process.
fn staged_binary(binary: &Path) -> Result<PathBuf> {
    static STAGED: OnceLock<TempDir> = OnceLock::new();
    if let Some(dir) = STAGED.get() {
        return Ok(dir.0.join("mmproxy"));
    }
    let dir = TempDir::new("bin")?;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))?;
    let staged = dir.0.join("mmproxy");
    std::fs::copy(binary, &staged).with_context(|| format!("copying {}", binary.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
    // A race with another thread only copies twice; the first one stays.
    let dir = STAGED.get_or_init(|| dir);
    Ok(dir.0.join("mmproxy"))
}

/// A runtime directory per network namespace, owned by [`USER`], mode 0750 (as
/// `RuntimeDirectoryMode=` says): the daemons of one namespace share it, as the
/// instances of the units share `/run/mmproxy`. Removed with its last daemon.
fn runtime_dir(ns: &Netns, uid: u32, gid: u32) -> Result<Arc<TempDir>> {
    static DIRS: OnceLock<Mutex<HashMap<String, Weak<TempDir>>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs
        .lock()
        .map_err(|_| anyhow::anyhow!("runtime directories lock poisoned"))?;
    if let Some(dir) = dirs.get(ns.name()).and_then(Weak::upgrade) {
        return Ok(dir);
    }
    let dir = Arc::new(TempDir::new("run")?);
    std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid))?;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o750))?;
    dirs.insert(ns.name().to_owned(), Arc::downgrade(&dir));
    Ok(dir)
}

/// The service manager's end of `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far.
    received: Vec<String>,
    _dir: TempDir,
}

impl NotifySocket {
    fn new() -> Result<Self> {
        let dir = TempDir::new("notify")?;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.0.join("notify");
        let socket = UnixDatagram::bind(&path)?;
        // systemd's own socket is writable by every service user.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self {
            socket,
            path,
            received: Vec::new(),
            _dir: dir,
        })
    }

    /// Waits until a message carries `state` (`READY=1`); returns that message.
    pub fn wait_for(&mut self, state: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(m) = self.received.iter().find(|m| m.lines().any(|l| l == state)) {
                return Ok(m.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {state} on NOTIFY_SOCKET within {timeout:?}: {:?}",
                    self.received
                );
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => self
                    .received
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What an unprivileged daemon holds on to: its notify socket and runtime
/// directory.
pub struct Unprivileged {
    pub notify: NotifySocket,
    pub uid: u32,
    /// The capability mask the daemon must hold, exactly.
    pub cap_mask: u64,
    _runtime: Arc<TempDir>,
}

/// The command that starts `program args` in `ns` as [`USER`] holding `caps`, and
/// what the test keeps for it.
pub fn command(
    ns: &Netns,
    program: &Path,
    args: &[String],
    caps: &[String],
) -> Result<(Command, Unprivileged)> {
    let (uid, gid) = test_user()?;
    let program = staged_binary(program)?;
    let runtime = runtime_dir(ns, uid, gid)?;
    std::fs::create_dir_all(RUNTIME_DIR)?;
    let notify = NotifySocket::new()?;
    let mut cap_mask = 0u64;
    for c in caps {
        cap_mask |= 1 << cap_bit(c)?;
    }
    // setpriv's names: lower case without the CAP_ prefix.
    let set = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    // A mount namespace of its own (private: nothing propagates back) in which the
    // user's directory is /run/mmproxy.
    let script = format!(
        "mount --bind \"$1\" {RUNTIME_DIR} && shift && umask 077 && exec setpriv \
         --reuid={uid} --regid={gid} --clear-groups --no-new-privs \
         --inh-caps={set} --ambient-caps={set} --bounding-set={set} -- \"$@\""
    );
    let mut cmd = ns.command("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(&runtime.0)
    .arg(&program)
    .args(args)
    .env("NOTIFY_SOCKET", &notify.path);
    Ok((
        cmd,
        Unprivileged {
            notify,
            uid,
            cap_mask,
            _runtime: runtime,
        },
    ))
}

/// Checks that `pid` runs as [`USER`] with exactly the granted capabilities, so a
/// test cannot pass on a daemon that is root after all.
pub fn verify(pid: i32, launch: &Unprivileged) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let uids = field("Uid:")?;
    if uids.split_whitespace().any(|u| u != launch.uid.to_string()) {
        bail!("the daemon's uids are {uids}, not {}", launch.uid);
    }
    let eff = u64::from_str_radix(&field("CapEff:")?, 16)?;
    if eff != launch.cap_mask {
        bail!(
            "the daemon's effective capabilities are {eff:#x}, not {:#x}",
            launch.cap_mask
        );
    }
    Ok(())
}
