//! Test support shared by unit tests that need privileges.
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use rtnetlink::{Handle, LinkUnspec};

/// Privileged unit tests run in a network namespace of their own, made by
/// unshare(CLONE_NEWNET) on a dedicated thread. The namespace dies with the
/// thread, so nothing survives a failing test, and the host's rules, routes and
/// sockets are never touched. `f` gets a netlink handle and a scratch directory
/// (removed afterwards) for lock files.
///
/// Returns `None` (test skipped, with a line on stderr) when that is not possible
/// and CI is not set; panics under CI=true.
pub fn in_netns<F, Fut>(name: &str, f: F) -> Option<()>
where
    F: FnOnce(Handle, PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let skip = |why: String| {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name}: cannot run a privileged test under CI=true: {why}");
        }
        // Straight to fd 2: the test harness captures eprintln! of passing
        // tests, and a skip must be visible.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "skipping {name}: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(
            "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create a network namespace".into(),
        );
    }
    let lock_dir = std::env::temp_dir().join(format!(
        "mmproxy-routing-test-{}-{name}",
        std::process::id()
    ));
    let dir = lock_dir.clone();
    let joined = std::thread::spawn(move || -> Result<(), String> {
        let host_ns = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| e.to_string())?
            .ino();
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        let own_ns = crate::netns_lease::netns_id().map_err(|e| e.to_string())?;
        // Never let anything below run in the host's namespace.
        assert_ne!(
            own_ns, host_ns,
            "unshare did not give this thread a new network namespace"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().expect("netlink socket");
            tokio::spawn(conn);
            handle
                .link()
                .set(LinkUnspec::new_with_name("lo").up().build())
                .execute()
                .await
                .expect("set lo up");
            f(handle, dir).await;
        });
        Ok(())
    })
    .join();
    let _ = std::fs::remove_dir_all(&lock_dir);
    match joined {
        Ok(Ok(())) => Some(()),
        Ok(Err(why)) => skip(why),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
