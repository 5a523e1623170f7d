//! The mmproxy daemon under test, started inside a namespace, its log collected.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::args::{DaemonArgs, Mode, FAIL_BPF_ENV};
use crate::netns::Netns;
use crate::unprivileged::{self, Unprivileged};

/// An allowed-subnets file for `--allowed-subnets`, removed with its directory when
/// dropped.
pub struct AllowedFile {
    path: PathBuf,
    _dir: crate::haproxy::TempDir,
}

impl AllowedFile {
    pub fn new(contents: &str) -> Result<Self> {
        let dir = crate::haproxy::TempDir::new("allowed")?;
        let path = dir.0.join("allowed.txt");
        std::fs::write(&path, contents)?;
        Ok(Self { path, _dir: dir })
    }

    /// New contents, for a SIGHUP reload.
    pub fn replace(&self, contents: &str) -> Result<()> {
        Ok(std::fs::write(&self.path, contents)?)
    }
}

impl AsRef<Path> for AllowedFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// The line the daemon logs once every listener is up.
pub const READY: &str = "mmproxy ready";

/// How long start-up may take before a test gives up (generous: CI is 2 cores).
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn binary() -> PathBuf {
    std::env::var_os("MMPROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/mmproxy"
            ))
        })
}

/// Part of the daemon's warning when it falls back to userspace.
pub const FALLBACK_WARNING: &str = "kernel side unavailable";

struct Log {
    lines: Vec<String>,
    /// stdout and stderr readers still running.
    open: usize,
}

pub struct Daemon {
    child: std::process::Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    exited: Option<ExitStatus>,
    /// Started as the unprivileged test user: its notify socket and runtime
    /// directory.
    unprivileged: Option<Unprivileged>,
}

impl Daemon {
    /// Starts mmproxy in `ns` with `args` and waits for its ready line.
    pub fn start(ns: &Netns, args: &DaemonArgs) -> Result<Self> {
        Self::spawn(ns, args)?.until_ready(args.mode)
    }

    /// Starts mmproxy through `sh -c '<before> && exec mmproxy <args>'` (a `ulimit`,
    /// a `cd`) and waits for its ready line. The mode applies as in [`Daemon::start`];
    /// it always runs as root.
    pub fn start_shell(ns: &Netns, before: &str, args: &DaemonArgs) -> Result<Self> {
        let script = format!("{before} && exec {}", args.shell_line(&binary()));
        Self::spawn_program(ns, "sh", &["-c".to_owned(), script], &args.env())?
            .until_ready(args.mode)
    }

    /// Starts a program given as it is (the benchmark's proxies, mmproxy among them)
    /// and waits for mmproxy's ready line.
    pub fn start_command(ns: &Netns, program: &str, args: &[&str]) -> Result<Self> {
        Self::spawn_program(ns, program, args, &[])?.until_ready(Mode::AsGiven)
    }

    /// Starts mmproxy without waiting (for start-up failure tests), as root or as
    /// the unprivileged test user ([`DaemonArgs::privileges`]).
    pub fn spawn(ns: &Netns, args: &DaemonArgs) -> Result<Self> {
        let Some(caps) = args.privileges.resolve()? else {
            return Self::spawn_program(
                ns,
                &binary().to_string_lossy(),
                &args.to_vec(),
                &args.env(),
            );
        };
        let (mut cmd, launch) = unprivileged::command(ns, &binary(), &args.to_vec(), &caps)?;
        cmd.envs(args.env());
        let mut daemon = Self::spawn_command(cmd, "mmproxy as the test user")?;
        daemon.unprivileged = Some(launch);
        Ok(daemon)
    }

    /// The notify socket and runtime directory of a daemon started unprivileged.
    pub fn unprivileged(&mut self) -> Option<&mut Unprivileged> {
        self.unprivileged.as_mut()
    }

    /// Waits for the ready line. Under [`Mode::EbpfOff`] and [`Mode::BpfFails`] the
    /// kernel side must be off, and under [`Mode::BpfFails`] the daemon must have
    /// taken the fallback, or the test would silently exercise the kernel side instead.
    fn until_ready(mut self, mode: Mode) -> Result<Self> {
        let ready = self
            .wait_for(READY, START_TIMEOUT)
            .with_context(|| format!("mmproxy did not become ready; log:\n{}", self.log_text()))?;
        let pid = self.pid();
        if let Some(launch) = &mut self.unprivileged {
            // As the unit would see it: READY=1 on its socket, from a daemon that
            // holds exactly what the test granted.
            launch.notify.wait_for("READY=1", START_TIMEOUT)?;
            unprivileged::verify(pid, launch)?;
        }
        if mode != Mode::AsGiven && !ready.contains("ebpf=false") {
            bail!("the kernel side is in use under {mode:?}: {ready}");
        }
        if mode == Mode::BpfFails {
            self.wait_for(FALLBACK_WARNING, Duration::ZERO)
                .with_context(|| {
                    format!(
                        "no fallback warning under {FAIL_BPF_ENV}=1; log:\n{}",
                        self.log_text()
                    )
                })?;
        }
        Ok(self)
    }

    fn spawn_program(
        ns: &Netns,
        program: &str,
        args: &[impl AsRef<std::ffi::OsStr>],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = ns.command(program);
        cmd.args(args);
        cmd.envs(env.iter().copied());
        Self::spawn_command(cmd, program)
    }

    fn spawn_command(mut cmd: std::process::Command, program: &str) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let log = Arc::new((
            Mutex::new(Log {
                lines: Vec::new(),
                open: 2,
            }),
            Condvar::new(),
        ));
        match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => {
                collect(out, log.clone());
                collect(err, log.clone());
            }
            _ => bail!("mmproxy's output pipes are missing"),
        }
        Ok(Self {
            child,
            log,
            exited: None,
            unprivileged: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_after(needle, 0, timeout)
    }

    /// How many lines the daemon has logged so far (for [`Daemon::wait_for_after`]).
    pub fn log_len(&self) -> usize {
        self.log.0.lock().map(|l| l.lines.len()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        self.log
            .0
            .lock()
            .map(|l| l.lines.join("\n"))
            .unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit (after a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("mmproxy still running {timeout:?} after being told to stop");
            }
            // No exit notification without a SIGCHLD handler in the test harness.
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's counters now: SIGUSR1 makes it log a `stats …` line.
    pub fn stats(&self) -> Result<String> {
        let before = self.log.0.lock().map(|l| l.lines.len()).unwrap_or(0);
        self.signal(libc::SIGUSR1);
        self.wait_for_after("stats", before, Duration::from_secs(10))
    }

    /// Asks for the counters (SIGUSR1) until `name` reaches `want`; the last stats
    /// line.
    pub fn wait_counter(&self, name: &str, want: u64, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.stats()?;
            if counter(&line, name) >= want {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                bail!("{name} did not reach {want} within {timeout:?}: {line}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like `wait_for`, looking only at lines after the first `skip`.
    pub fn wait_for_after(&self, needle: &str, skip: usize, timeout: Duration) -> Result<String> {
        let (lock, cv) = &*self.log;
        let deadline = Instant::now() + timeout;
        let mut log = lock
            .lock()
            .map_err(|_| anyhow::anyhow!("log lock poisoned"))?;
        loop {
            if let Some(l) = log.lines.iter().skip(skip).find(|l| l.contains(needle)) {
                return Ok(l.clone());
            }
            if log.open == 0 {
                bail!("mmproxy's output ended before {needle:?}");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("no log line with {needle:?} within {timeout:?}");
            }
            log = cv
                .wait_timeout(log, deadline - now)
                .map_err(|_| anyhow::anyhow!("log lock poisoned"))?
                .0;
        }
    }

    /// Open descriptors of the daemon process.
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// Waits until the daemon holds at most `limit` descriptors (closing them is not
    /// announced; their count is looked at every 50 ms).
    pub fn wait_open_fds_at_most(&self, limit: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let fds = self.open_fds()?;
            if fds <= limit {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{fds} descriptors open after {timeout:?}, at most {limit} expected");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    /// SIGTERM first, so that the daemon cleans up as in production (its lease
    /// files in /run/mmproxy among it); SIGKILL if it has not exited after a short
    /// while (the next start sweeps what that leaves).
    fn drop(&mut self) {
        if self.exited.is_none() {
            // SAFETY: kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(stream: impl std::io::Read + Send + 'static, log: Arc<(Mutex<Log>, Condvar)>) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("MMPROXY_TEST_ECHO").is_some() {
                eprintln!("mmproxy| {line}");
            }
            let (lock, cv) = &*log;
            if let Ok(mut l) = lock.lock() {
                l.lines.push(line);
            }
            cv.notify_all();
        }
        let (lock, cv) = &*log;
        if let Ok(mut l) = lock.lock() {
            l.open = l.open.saturating_sub(1);
        }
        cv.notify_all();
    });
}

/// A counter's value in a `name=value …` stats line; 0 when absent (zeros are not
/// printed).
pub fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim_matches('"').parse().ok())
        .unwrap_or(0)
}

/// `mmproxy check` with `args` (their mode and privileges applied as for the
/// daemon), run to completion: its exit status and stdout and stderr together.
pub fn check(ns: &Netns, args: &DaemonArgs) -> Result<(ExitStatus, String)> {
    let argv: Vec<String> = std::iter::once("check".to_owned())
        .chain(args.to_vec())
        .collect();
    // The launch (runtime directory, notify socket) must outlive the run.
    let (mut cmd, _launch) = match args.privileges.resolve()? {
        None => {
            let mut cmd = ns.command(&binary().to_string_lossy());
            cmd.args(&argv);
            (cmd, None)
        }
        Some(caps) => {
            let (cmd, launch) = unprivileged::command(ns, &binary(), &argv, &caps)?;
            (cmd, Some(launch))
        }
    };
    let out = cmd
        .envs(args.env())
        .stdin(Stdio::null())
        .output()
        .context("running mmproxy check")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text))
}
