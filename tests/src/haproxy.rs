//! A real HAProxy as the PROXY sender, in the balancer's namespace.
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// One frontend: where clients connect, and how HAProxy talks to mmproxy.
pub struct Frontend {
    /// `addr:port` HAProxy binds (IPv6 in brackets).
    pub bind: String,
    /// `addr:port` of mmproxy.
    pub server: String,
    /// The `server` line's options, e.g. `send-proxy` or
    /// `send-proxy-v2 proxy-v2-options crc32c,unique-id,authority`.
    pub options: String,
    /// Local address HAProxy connects to mmproxy from.
    pub source: Option<String>,
}

pub struct Haproxy {
    _dir: TempDir,
}

impl Haproxy {
    /// Starts HAProxy daemonised; it returns once its sockets are bound, which is the
    /// readiness signal.
    pub fn start(ns: &Netns, frontends: &[Frontend]) -> Result<Self> {
        let dir = TempDir::new("haproxy")?;
        let mut cfg = String::from(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             \x20 unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt\n",
        );
        for (i, f) in frontends.iter().enumerate() {
            let source = f
                .source
                .as_deref()
                .map(|s| format!(" source {s}"))
                .unwrap_or_default();
            let _ = write!(
                cfg,
                "frontend fe{i}\n  bind {}\n  default_backend be{i}\n\
                 backend be{i}\n  server mm {} {}{source}\n",
                f.bind, f.server, f.options
            );
        }
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).context("writing haproxy.cfg")?;
        let pidfile = dir.0.join("haproxy.pid");
        ns.run(
            "haproxy",
            &[
                "-D",
                "-q",
                "-f",
                &path.to_string_lossy(),
                "-p",
                &pidfile.to_string_lossy(),
            ],
        )
        .context("starting haproxy")?;
        Ok(Self { _dir: dir })
    }
}

/// A directory removed on drop. (HAProxy itself dies with its namespace.)
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mmpt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
