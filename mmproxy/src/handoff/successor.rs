//! SIGUSR2: start the binary now installed at this one's path, with the same
//! arguments, as a child that takes the sockets over ([`super`]). Under systemd
//! the child is in the unit's cgroup; the old instance names it the main process
//! (`MAINPID=`) once it serves, so the unit lives on in the new process.
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tracing::{info, warn};

/// Starts the successor; its pid. A child that exits with an error is logged.
pub fn spawn() -> io::Result<u32> {
    let exe = installed_binary()?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = Command::new(&exe)
        .args(&args)
        // sd_watchdog_enabled(3) in the child would see the old pid here and never
        // ping; without it the watchdog is the child's once it is the main process.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    info!(pid, binary = %exe.display(), "SIGUSR2: started a new mmproxy to take over");
    // A thread, not a runtime task: the child outlives this process's runtime, and
    // a blocked wait must not hold the runtime's shutdown.
    std::thread::spawn(move || match child.wait() {
        Ok(status) if !status.success() => {
            warn!(pid, %status, "the new mmproxy exited with an error (see its log above)");
            // Ends the RELOADING=1 of SIGUSR2 (ignored by systemd once the child
            // had become the main process).
            crate::notify::ready();
        }
        Ok(_) => {}
        Err(e) => warn!(
            error = &e as &dyn std::error::Error,
            pid, "waiting for the new mmproxy"
        ),
    });
    Ok(pid)
}

/// The path this binary was started from. After a package upgrade replaced the
/// file, `/proc/self/exe` still names the path, marked as deleted; the file now
/// there is the upgrade.
fn installed_binary() -> io::Result<PathBuf> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => link,
    })
}
