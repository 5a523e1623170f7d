//! The service manager's readiness protocol (sd_notify), for `Type=notify` units:
//! READY=1 once the listeners, the routing and the kernel side are up; RELOADING=1
//! with MONOTONIC_USEC, then READY=1, around a SIGHUP reload; STOPPING=1 at shutdown;
//! WATCHDOG=1 at half the unit's `WatchdogSec=`.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing. A failed send is
//! logged and otherwise ignored: the daemon serves the same either way, and systemd
//! itself reports a service that never became ready.
use std::time::Duration;

use sd_notify::NotifyState;

fn send(what: &str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot tell the service manager {what}: {e}");
    }
}

/// Start-up is complete.
pub fn ready() {
    send("READY=1", &[NotifyState::Ready]);
}

/// A reload starts; systemd 253+ needs the monotonic timestamp with it to match the
/// reload to this message.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
    send("RELOADING=1", &states);
}

/// The process `pid` has taken over (an upgrade): it is the main process from now
/// on, and serving.
pub fn handed_over(pid: u32) {
    send(
        "MAINPID and READY=1",
        &[NotifyState::MainPid(pid), NotifyState::Ready],
    );
}

/// Shutdown has begun.
pub fn stopping() {
    send("STOPPING=1", &[NotifyState::Stopping]);
}

/// The keep-alive period the unit asks for (`WatchdogSec=`), if any: half of
/// `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|t| !t.is_zero())
        .map(|t| t / 2)
}

/// Spawns the WATCHDOG=1 task on the current runtime when the unit has a watchdog.
/// Pings come from a runtime task, so a wedged runtime stops them and systemd
/// restarts the service.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send("WATCHDOG=1", &[NotifyState::Watchdog]);
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Set for the child process only: it then plays the daemon's part.
    const CHILD: &str = "MMPROXY_NOTIFY_TEST_CHILD";

    /// The daemon's side, run in a child process so `NOTIFY_SOCKET` and
    /// `WATCHDOG_USEC` never touch the environment of the other tests' threads.
    #[test]
    fn child_sends_the_sequence() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        };
        rt.block_on(async {
            super::ready();
            let watchdog = super::spawn_watchdog();
            assert!(watchdog.is_some(), "WATCHDOG_USEC was set");
            super::reloading();
            super::ready();
            tokio::time::sleep(Duration::from_millis(250)).await;
            super::stopping();
        });
    }

    #[test]
    fn messages_reach_a_real_notify_socket() {
        let dir = std::env::temp_dir().join(format!("mmproxy-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("{}: {e}", dir.display());
        }
        let path = dir.join("notify.sock");
        let socket = match UnixDatagram::bind(&path) {
            Ok(s) => s,
            Err(e) => panic!("binding {}: {e}", path.display()),
        };
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => panic!("current_exe: {e}"),
        };
        // Its output is kept, not shown: a second libtest summary in the middle of
        // this one would only confuse a reader of the test log.
        let child = Command::new(exe)
            .args(["notify::tests::child_sends_the_sequence", "--exact"])
            .args(["--test-threads", "1"])
            .env(CHILD, "1")
            .env("NOTIFY_SOCKET", &path)
            // 100 ms: pings every 50 ms, several within the child's 250 ms.
            .env("WATCHDOG_USEC", "100000")
            .env_remove("WATCHDOG_PID")
            .output();
        match child {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "child failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("starting the child: {e}"),
        }

        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        if let Err(e) = socket.set_nonblocking(true) {
            panic!("{e}");
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);

        let states: Vec<&str> = got.iter().map(|m| m.trim_end()).collect();
        let without_pings: Vec<&str> = states
            .iter()
            .copied()
            .filter(|m| *m != "WATCHDOG=1")
            .collect();
        assert_eq!(without_pings.len(), 4, "{states:?}");
        assert_eq!(without_pings[0], "READY=1");
        let reload: Vec<&str> = without_pings[1].lines().collect();
        assert_eq!(reload.len(), 2, "{states:?}");
        assert_eq!(reload[0], "RELOADING=1");
        let usec = reload[1].strip_prefix("MONOTONIC_USEC=").unwrap_or("");
        assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{states:?}");
        assert_eq!(without_pings[2], "READY=1");
        assert_eq!(without_pings[3], "STOPPING=1");
        let pings = states.iter().filter(|m| **m == "WATCHDOG=1").count();
        assert!(pings >= 3, "expected WATCHDOG=1 every 50 ms: {states:?}");
    }
}
