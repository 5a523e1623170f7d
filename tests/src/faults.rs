//! Pieces the fault tests need (tests/tests/faults.rs): an upstream that can go away
//! and come back, a service that holds thousands of connections on one thread, many
//! idle connections opened at once, and the daemon's resources seen from outside
//! (resident memory, descriptor limit).
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;

/// A TCP echo service that can be stopped the way a crashed or restarted service
/// stops: its listening socket closes (new connections are refused) and its live
/// connections end with a FIN.
pub struct StoppableEcho {
    listener: TcpListener,
    live: Arc<Mutex<Vec<TcpStream>>>,
    stopped: Arc<AtomicBool>,
}

impl StoppableEcho {
    pub fn start(ns: &Netns, addr: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse().context("echo address")?;
        // std sets SO_REUSEADDR: the service can come back on its port at once.
        let listener = ns.enter(move || TcpListener::bind(addr))??;
        let live = Arc::new(Mutex::new(Vec::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (l, conns, stop) = (listener.try_clone()?, live.clone(), stopped.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if let (Ok(mut list), Ok(c)) = (conns.lock(), conn.try_clone()) {
                    list.push(c);
                }
                thread::spawn(move || echo(conn));
            }
        });
        Ok(Self {
            listener,
            live,
            stopped,
        })
    }

    /// Stops listening and ends every live connection.
    pub fn stop(self) {
        self.stopped.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes the blocked accept() and makes the
        // kernel refuse further connections.
        // SAFETY: shutdown on a descriptor this struct owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Ok(list) = self.live.lock() {
            for c in list.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

fn echo(mut conn: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// A service that accepts connections and holds them, reading nothing, on one
/// thread (thousands of idle connections without thousands of threads).
pub struct HoldingServer {
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl HoldingServer {
    pub fn start(ns: &Netns, addr: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse().context("holding server address")?;
        // Thousands of connections arrive in one burst; with a short accept queue the
        // kernel drops their final ACKs and retries SYN-ACKs with backoff, and a
        // connection can give up before the one accepting thread reaches it.
        ns.sysctl("net.core.somaxconn", "16384")?;
        let listener = ns.enter(move || -> std::io::Result<TcpListener> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(16384)?;
            Ok(s.into())
        })??;
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (n, h) = (accepted.clone(), held.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Ok(mut h) = h.lock() {
                    h.push(conn);
                }
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok(Self { accepted, held })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have been accepted in all.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.accepted.load(Ordering::SeqCst);
            if got >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the service accepted {got} connections, {n} expected");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Closes every connection held so far.
    pub fn close_all(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.clear();
        }
    }
}

/// Opens `n` connections from `src` (any port) in `ns` to `dst`, each first sending
/// what `first(i)` returns (empty: nothing). Failing connects are retried a few
/// times (a SYN dropped under load), then fail the call.
pub fn open_many(
    ns: &Netns,
    src: &str,
    dst: &str,
    n: usize,
    first: impl Fn(usize) -> Vec<u8> + Send,
) -> Result<Vec<TcpStream>> {
    let src: SocketAddr = crate::topology::sock(src, 0).parse()?;
    let dst: SocketAddr = dst.parse()?;
    ns.enter(move || -> Result<Vec<TcpStream>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut attempt = 0;
            let mut c = loop {
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(dst),
                    socket2::Type::STREAM,
                    None,
                )?;
                // The port is chosen at connect(), by the whole 4-tuple: bind() would
                // search for a port free of every earlier connection, TIME_WAIT ones
                // included, which takes milliseconds once thousands are in use.
                let on: libc::c_int = 1;
                // SAFETY: setsockopt reads one c_int from `on`.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&sock),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        std::ptr::addr_of!(on).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                ensure!(
                    rc == 0,
                    "IP_BIND_ADDRESS_NO_PORT: {}",
                    std::io::Error::last_os_error()
                );
                sock.bind(&src.into())?;
                match sock.connect_timeout(&dst.into(), crate::WAIT) {
                    Ok(()) => break TcpStream::from(sock),
                    Err(e) if attempt < 3 => {
                        attempt += 1;
                        eprintln!("connection {i}: {e}, retrying");
                    }
                    Err(e) => return Err(e).context(format!("connection {i} of {n}")),
                }
            };
            let bytes = first(i);
            if !bytes.is_empty() {
                c.write_all(&bytes)?;
            }
            out.push(c);
        }
        Ok(out)
    })?
}

/// Resident memory of a process, KiB (`VmRSS` in /proc/PID/status).
pub fn vm_rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// Sets another process's descriptor limit, soft and hard (prlimit(2), as
/// `prlimit --nofile` does).
pub fn set_nofile_limit(pid: i32, limit: u64) -> Result<()> {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new` and writes nothing (old limit pointer is null).
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Raises this process's soft descriptor limit to at least `want`, up to its hard
/// limit; fails (saying so) when the hard limit is below `want`.
pub fn raise_own_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0);
    ensure!(
        lim.rlim_max >= want,
        "this test needs {want} descriptors; the hard limit is {}",
        lim.rlim_max
    );
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one rlimit; soft up to hard needs no privilege.
        ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0);
    }
    Ok(())
}

/// What a process's descriptors point to (`socket:[…]`, `pipe:[…]`, paths), for
/// failure messages.
pub fn fd_targets(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    out.sort();
    out
}
