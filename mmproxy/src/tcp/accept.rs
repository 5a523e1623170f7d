//! TCP listening sockets and the accept loop (ARCHITECTURE.md, steps 1 and 2).
//!
//! The accept loop never ends on an error: descriptor or memory exhaustion backs off
//! and retries, so the daemon serves again as soon as the pressure ends (go-mmproxy
//! exits on the first EMFILE). The connection limit is taken *before* accept(), so
//! connections beyond it wait in the kernel's backlog instead of being accepted and
//! dropped.
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::addr::{canonical, ProxyAddr};
use crate::logging::CONN_TARGET;
use crate::sockopt;
use crate::stats::Stats;
use crate::transparent::descriptor_hint;

use super::connection;
use super::TcpContext;

/// Pending connections the kernel queues per socket (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one accept-error line per listener per interval.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Opens `count` listening sockets on `addr` (at least one). With more than one they
/// share the address through SO_REUSEPORT and the kernel spreads connections over
/// them. With port 0 the first socket's port is used for the rest.
///
/// IPv6 sockets are IPV6_V6ONLY, so `[::]` and `0.0.0.0` on the same port can both be
/// listened on and IPv4 peers never show up as IPv4-mapped addresses.
pub fn bind_tcp(addr: SocketAddr, count: u16) -> io::Result<Vec<std::net::TcpListener>> {
    bind_tcp_with(addr, count, false)
}

/// [`bind_tcp`], with IP_TRANSPARENT on each socket when `transparent`
/// (`-listen-transparent`, [`sockopt::set_listen_transparent`]).
pub fn bind_tcp_with(
    addr: SocketAddr,
    count: u16,
    transparent: bool,
) -> io::Result<Vec<std::net::TcpListener>> {
    sockopt::bind_group(addr, count, |addr, reuse_port| {
        bind_stream_listener(addr, reuse_port, transparent)
    })
}

fn bind_stream_listener(
    addr: SocketAddr,
    reuse_port: bool,
    transparent: bool,
) -> io::Result<Socket> {
    let socket = sockopt::listening_socket(addr, Type::STREAM, Protocol::TCP, reuse_port)?;
    if transparent {
        sockopt::set_listen_transparent(&socket, addr.is_ipv6())?;
    }
    // Accepted connections inherit it: one call per listener, not one per connection.
    sockopt::set_nodelay(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// Puts each listener in its own task, so N SO_REUSEPORT sockets are served in
/// parallel on the multi-thread runtime. Must be called inside the runtime.
pub fn spawn_tcp(
    listeners: Vec<std::net::TcpListener>,
    ctx: Arc<TcpContext>,
    allowed: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    limits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> io::Result<Vec<JoinHandle<()>>> {
    let listeners = listeners
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<io::Result<Vec<_>>>()?;
    Ok(listeners
        .into_iter()
        .map(|l| {
            let allowed = allowed.clone();
            tokio::spawn(serve_tcp(
                l,
                ctx.clone(),
                move |ip| allowed(ip),
                limits.clone(),
                shutdown.clone(),
                tasks.clone(),
            ))
        })
        .collect())
}

/// Accepts connections until `shutdown` is cancelled (or `limits` is closed), and
/// runs each in a task of `tasks`, holding one permit of `limits` for its lifetime.
/// After shutdown the caller closes `tasks` and waits on it with a grace period.
///
/// `allowed` is asked about every balancer address (IPv4-mapped ones as IPv4);
/// refused connections are closed at once and never read.
pub async fn serve_tcp<F>(
    listener: TcpListener,
    ctx: Arc<TcpContext>,
    allowed: F,
    limits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) where
    F: Fn(IpAddr) -> bool + Send + Sync + 'static,
{
    let local = listener.local_addr().ok();
    let mut backoff = Backoff::default();
    let mut errors = ErrorLog::default();
    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            p = limits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff.reset();
                let peer = ProxyAddr(canonical(peer));
                if admit(&conn, peer, &allowed, &ctx.stats) {
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        let _permit = permit;
                        connection::handle(conn, peer, ctx).await;
                    });
                }
            }
            Err(e) => {
                drop(permit);
                Stats::inc(&ctx.stats.accept_errors);
                let pause = if is_resource_exhaustion(&e) {
                    backoff.next()
                } else {
                    Duration::ZERO
                };
                errors.record(&e, local, pause);
                if !pause.is_zero() {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
    debug!(listen = ?local, "listener stopped accepting");
}

/// Counts the connection and checks the balancer against the allow-list.
fn admit<F: Fn(IpAddr) -> bool>(
    conn: &TcpStream,
    peer: ProxyAddr,
    allowed: &F,
    stats: &Stats,
) -> bool {
    Stats::inc(&stats.tcp_accepted);
    if allowed(peer.0.ip()) {
        return true;
    }
    Stats::inc(&stats.rejected_not_allowed);
    let dst = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    warn!(target: CONN_TARGET, peer = %peer, dst, reason = "not_allowed",
          "connection from outside --allowed-subnets closed");
    false
}

/// Errors that say the process or system is out of something: retrying at once
/// would spin. The others (ECONNABORTED, EPROTO, network errors passed on by
/// accept) concern one connection only and the next accept can go ahead. An error
/// without an errno is unexpected, so it backs off too rather than risk a spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.raw_os_error().is_none()
}

/// 10 ms doubling to 1 s, back to 10 ms after a successful accept.
#[derive(Debug, Default)]
struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self
            .current
            .map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
        self.current = Some(d);
        d
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// One log line per interval however fast accept fails, with the count of the
/// failures it stands for.
#[derive(Debug, Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn record(&mut self, e: &io::Error, listen: Option<SocketAddr>, pause: Duration) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ACCEPT_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last = Some(now);
        warn!(listen = ?listen, error = e as &dyn std::error::Error, retry_in = ?pause,
              suppressed, "accept failed{}", descriptor_hint(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::DecodeOptions;
    use crate::tcp::ConnectOptions;
    use crate::transparent::Upstream;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ctx(target_port: u16) -> Arc<TcpContext> {
        Arc::new(TcpContext {
            upstream: Upstream::loopback(Some(target_port), Some(target_port)),
            connect: ConnectOptions {
                mark: 0,
                connect_timeout: Duration::from_secs(2),
            },
            header_timeout: Duration::from_secs(2),
            header: DecodeOptions::stream().with_max_header_len(4096),
            stats: Arc::new(Stats::default()),
        })
    }

    struct Running {
        addr: SocketAddr,
        upstream: TcpListener,
        ctx: Arc<TcpContext>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        handles: Vec<JoinHandle<()>>,
    }

    async fn run(count: u16, allow: bool, max_conns: usize) -> Running {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctx = ctx(upstream.local_addr().unwrap().port());
        let listeners = bind_tcp("127.0.0.1:0".parse().unwrap(), count).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let handles = spawn_tcp(
            listeners,
            ctx.clone(),
            Arc::new(move |_| allow),
            Arc::new(Semaphore::new(max_conns)),
            shutdown.clone(),
            tasks.clone(),
        )
        .unwrap();
        Running {
            addr,
            upstream,
            ctx,
            shutdown,
            tasks,
            handles,
        }
    }

    #[test]
    fn bind_tcp_opens_n_sockets_on_one_port() {
        let ls = bind_tcp("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        assert_eq!(ls.len(), 4);
        let port = ls[0].local_addr().unwrap().port();
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
        assert!(socket2::SockRef::from(&ls[3]).reuse_port().unwrap());
    }

    #[test]
    fn accepted_connections_have_nodelay_from_the_listener() {
        let ls = bind_tcp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        ls[0].set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(ls[0].local_addr().unwrap()).unwrap();
        let (accepted, _) = ls[0].accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn single_listener_is_exclusive() {
        let ls = bind_tcp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = ls[0].local_addr().unwrap();
        assert!(bind_tcp(addr, 1).is_err());
    }

    #[test]
    fn v6_and_v4_wildcards_coexist() {
        let v6 = bind_tcp("[::]:0".parse().unwrap(), 1).unwrap();
        let port = v6[0].local_addr().unwrap().port();
        let v4 = bind_tcp(SocketAddr::from(([0, 0, 0, 0], port)), 1).unwrap();
        assert_eq!(v4.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_on_every_listener_and_stops_on_shutdown() {
        let r = run(3, true, 100).await;
        let mut clients = Vec::new();
        for i in 0..12u8 {
            let mut c = TcpStream::connect(r.addr).await.unwrap();
            c.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
            c.write_all(&[i]).await.unwrap();
            let (mut up, _) = r.upstream.accept().await.unwrap();
            let mut b = [0; 1];
            up.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            clients.push((c, up));
        }
        assert_eq!(r.ctx.stats.tcp_proxied.load(Ordering::Relaxed), 12);
        r.shutdown.cancel();
        for h in r.handles {
            h.await.unwrap();
        }
        // Live connections outlive the listeners until they finish.
        r.tasks.close();
        assert!(!r.tasks.is_empty());
        drop(clients);
        tokio::time::timeout(Duration::from_secs(5), r.tasks.wait())
            .await
            .unwrap();
        assert_eq!(r.ctx.stats.tcp_active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn refused_balancer_is_closed_and_counted() {
        let r = run(1, false, 100).await;
        let mut c = TcpStream::connect(r.addr).await.unwrap();
        let _ = c.write_all(b"PROXY UNKNOWN\r\n").await;
        let mut b = [0; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0) | Err(_))));
        assert_eq!(r.ctx.stats.rejected_not_allowed.load(Ordering::Relaxed), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), r.upstream.accept())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_in_the_backlog() {
        let r = run(1, true, 1).await;
        let mut first = TcpStream::connect(r.addr).await.unwrap();
        first.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        let (_up1, _) = r.upstream.accept().await.unwrap();
        let mut second = TcpStream::connect(r.addr).await.unwrap();
        second.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), r.upstream.accept())
                .await
                .is_err(),
            "second connection served beyond --max-connections"
        );
        drop(first);
        drop(_up1);
        tokio::time::timeout(Duration::from_secs(2), r.upstream.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.ctx.stats.tcp_accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<_> = (0..9).map(|_| b.next().as_millis()).collect();
        assert_eq!(seq, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }

    #[test]
    fn only_exhaustion_errors_back_off() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM] {
            assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(
                errno
            )));
        }
    }

    #[test]
    fn accept_error_log_is_rate_limited() {
        let mut log = ErrorLog::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..100 {
            log.record(&e, None, BACKOFF_MIN);
        }
        assert_eq!(log.suppressed, 99);
    }
}
