//! Zero-copy relay between the client and upstream connections (ARCHITECTURE.md,
//! step 5).
//!
//! Each direction splices socket → pipe → socket. A pipe is held only while bytes
//! are in flight in that direction: an idle connection holds none, so its kernel
//! memory is that of its two sockets. Empty pipes go back to a small per-thread
//! pool, so a busy relay does not pay pipe2/fcntl/close per burst. When no pipe can
//! be had (descriptor limits) the direction copies through a small heap buffer for
//! that burst instead of failing the connection.
//!
//! Half-close: EOF in one direction, once its in-flight bytes are delivered, becomes
//! shutdown(SHUT_WR) on the other socket; the opposite direction runs on until its
//! own EOF. Any error ends both directions and closes both sockets with RST, so
//! neither peer mistakes a failed flow for a complete one.
use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::sockopt;
use crate::stats::Stats;

/// Requested pipe capacity: one splice moves up to this much per wake-up. 64 KiB
/// (Linux's default with 4 KiB pages, set explicitly for other page sizes) relayed
/// the most per CPU second in `cargo xtask bench`: 16 and 32 KiB cost more splices
/// per byte, 128 KiB to 1 MiB gave up to a quarter less throughput at more CPU
/// (BENCHMARKS.md).
const PIPE_SIZE: usize = 64 * 1024;
/// Empty pipes kept per thread; beyond this they are closed (2 descriptors each).
const POOL_MAX: usize = 16;
/// Copy buffer used for a burst when no pipe can be created.
const COPY_BUF: usize = 16 * 1024;

/// Bytes delivered in each direction, early payload included in `up`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayTotals {
    /// Client → upstream.
    pub up: u64,
    /// Upstream → client.
    pub down: u64,
}

/// Which connection an I/O error happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// Why a relay ended early. Both connections are closed when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading from the {side} connection failed")]
    Read {
        side: Side,
        #[source]
        source: io::Error,
    },
    #[error("writing to the {side} connection failed")]
    Write {
        side: Side,
        #[source]
        source: io::Error,
    },
}

impl RelayError {
    /// Short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Read {
                side: Side::Client, ..
            } => "client_read",
            RelayError::Read {
                side: Side::Upstream,
                ..
            } => "upstream_read",
            RelayError::Write {
                side: Side::Client, ..
            } => "client_write",
            RelayError::Write {
                side: Side::Upstream,
                ..
            } => "upstream_write",
        }
    }
}

/// Relays until both directions have seen EOF (clean: both half-closes delivered)
/// or one fails. `early_payload` (bytes read together with the PROXY header) is
/// written upstream before anything else from the client. Byte counters in `stats`
/// are updated as data moves.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    early_payload: &[u8],
    stats: &Stats,
) -> Result<RelayTotals, RelayError> {
    let up = Pump::new(
        &client,
        &upstream,
        Side::Client,
        Side::Upstream,
        &stats.bytes_up,
    );
    let down = Pump::new(
        &upstream,
        &client,
        Side::Upstream,
        Side::Client,
        &stats.bytes_down,
    );
    let result = tokio::try_join!(up.run(early_payload), down.run(&[]));
    match result {
        Ok((up, down)) => Ok(RelayTotals { up, down }),
        Err(e) => {
            // Best effort: a socket that already failed may refuse options.
            let _ = sockopt::set_linger_zero(&client);
            let _ = sockopt::set_linger_zero(&upstream);
            Err(e)
        }
    }
}

/// Pipes currently holding in-flight bytes, over all relays (gauge for metrics).
pub fn pipes_in_use() -> usize {
    PIPES_IN_USE.load(Ordering::Relaxed)
}

/// Empty pipes in this thread's pool.
pub fn pooled_pipes() -> usize {
    POOL.try_with(|p| p.try_borrow().map_or(0, |p| p.len()))
        .unwrap_or(0)
}

static PIPES_IN_USE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Leases taken minus leases dropped on this thread (tests run relays on a
    /// current-thread runtime, so this is exact for them).
    static LEASED_HERE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    /// Makes pipe creation fail, to exercise the copy fallback.
    static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        #[cfg(test)]
        if NO_PIPES.get() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Refused above pipe-max-size or pipe-user-pages-soft: the default size still
        // works, with more wake-ups per byte.
        let _ = sockopt::set_pipe_size(&pipe.write, PIPE_SIZE);
        Ok(pipe)
    }
}

/// A pipe lent to one direction, with the number of bytes it holds. Dropped empty,
/// the pipe goes back to the pool; dropped with data (an error path), it is closed
/// and the data with it.
struct Lease {
    pipe: Option<Pipe>,
    len: usize,
}

impl Lease {
    fn take() -> io::Result<Lease> {
        let pooled = POOL
            .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => Pipe::new()?,
        };
        PIPES_IN_USE.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        LEASED_HERE.set(LEASED_HERE.get() + 1);
        Ok(Lease {
            pipe: Some(pipe),
            len: 0,
        })
    }

    fn fds(&self) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        self.pipe
            .as_ref()
            .map(|p| (p.read.as_fd(), p.write.as_fd()))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        PIPES_IN_USE.fetch_sub(1, Ordering::Relaxed);
        #[cfg(test)]
        let _ = LEASED_HERE.try_with(|n| n.set(n.get() - 1));
        let Some(pipe) = self.pipe.take() else { return };
        if self.len != 0 {
            return;
        }
        // During thread teardown the pool may be gone: the pipe is then just closed.
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOL_MAX {
                    p.push(pipe);
                }
            }
        });
    }
}

/// Bytes read from the source and not yet written to the destination.
enum InFlight {
    Nothing,
    Pipe(Lease),
    Copy {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

impl InFlight {
    fn is_empty(&self) -> bool {
        match self {
            InFlight::Nothing => true,
            InFlight::Pipe(lease) => lease.len == 0,
            InFlight::Copy { start, end, .. } => start == end,
        }
    }
}

/// One direction of the relay.
struct Pump<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    from: Side,
    to: Side,
    in_flight: InFlight,
    moved: u64,
    counter: &'a AtomicU64,
}

impl<'a> Pump<'a> {
    fn new(
        src: &'a TcpStream,
        dst: &'a TcpStream,
        from: Side,
        to: Side,
        counter: &'a AtomicU64,
    ) -> Self {
        Pump {
            src,
            dst,
            from,
            to,
            in_flight: InFlight::Nothing,
            moved: 0,
            counter,
        }
    }

    async fn run(mut self, early: &[u8]) -> Result<u64, RelayError> {
        self.write_early(early).await?;
        loop {
            // Readiness is cached by tokio: when the source is known not readable
            // this costs no syscall and takes no pipe.
            let src = self.src;
            let in_flight = &mut self.in_flight;
            match src.try_io(Interest::READABLE, || fill(in_flight, src)) {
                Ok(0) => return self.finish(),
                // Straight to the destination: usually writable, so no wait.
                Ok(_) => {
                    self.drain().await?;
                    // A fast sender can keep both sockets ready for long stretches;
                    // without this the loop would never yield to other connections.
                    tokio::task::coop::consume_budget().await;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained and nothing to read: give the pipe back while idle.
                    self.in_flight = InFlight::Nothing;
                    self.src.readable().await.map_err(|e| self.read_err(e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }

    async fn write_early(&mut self, mut early: &[u8]) -> Result<(), RelayError> {
        let total = early.len() as u64;
        while !early.is_empty() {
            match self.dst.try_write(early) {
                Ok(0) => return Err(self.write_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => early = early.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.dst.writable().await.map_err(|e| self.write_err(e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.write_err(e)),
            }
        }
        self.moved += total;
        Stats::add(self.counter, total);
        Ok(())
    }

    /// Writes everything in flight to the destination.
    async fn drain(&mut self) -> Result<(), RelayError> {
        let mut sent = 0u64;
        let result = loop {
            if self.in_flight.is_empty() {
                break Ok(());
            }
            let dst = self.dst;
            let in_flight = &mut self.in_flight;
            match dst.try_io(Interest::WRITABLE, || flush(in_flight, dst)) {
                Ok(0) => break Err(self.write_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.dst.writable().await {
                        break Err(self.write_err(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(self.write_err(e)),
            }
        };
        self.moved += sent;
        Stats::add(self.counter, sent);
        result
    }

    /// Source at EOF with nothing in flight: pass the FIN on.
    fn finish(&mut self) -> Result<u64, RelayError> {
        self.in_flight = InFlight::Nothing;
        SockRef::from(self.dst)
            .shutdown(Shutdown::Write)
            .map_err(|e| self.write_err(e))?;
        Ok(self.moved)
    }

    fn read_err(&self, source: io::Error) -> RelayError {
        RelayError::Read {
            side: self.from,
            source,
        }
    }

    fn write_err(&self, source: io::Error) -> RelayError {
        RelayError::Write {
            side: self.to,
            source,
        }
    }
}

/// One read from `src` into an empty in-flight buffer, taking a pipe (or, failing
/// that, a copy buffer) only now that the source is known to be readable.
fn fill(in_flight: &mut InFlight, src: &TcpStream) -> io::Result<usize> {
    if let InFlight::Nothing = in_flight {
        *in_flight = match Lease::take() {
            Ok(lease) => InFlight::Pipe(lease),
            Err(_) => InFlight::Copy {
                buf: vec![0; COPY_BUF].into_boxed_slice(),
                start: 0,
                end: 0,
            },
        };
    }
    match in_flight {
        InFlight::Nothing => Ok(0),
        InFlight::Pipe(lease) => {
            let Some((_, pipe_w)) = lease.fds() else {
                return Err(io::ErrorKind::BrokenPipe.into());
            };
            let n = splice(src.as_fd(), pipe_w, PIPE_SIZE)?;
            lease.len += n;
            Ok(n)
        }
        InFlight::Copy { buf, start, end } => {
            let n = (&*SockRef::from(src)).read(buf)?;
            (*start, *end) = (0, n);
            Ok(n)
        }
    }
}

/// One write of in-flight bytes to `dst`.
fn flush(in_flight: &mut InFlight, dst: &TcpStream) -> io::Result<usize> {
    match in_flight {
        InFlight::Nothing => Ok(0),
        InFlight::Pipe(lease) => {
            let Some((pipe_r, _)) = lease.fds() else {
                return Err(io::ErrorKind::BrokenPipe.into());
            };
            let n = splice(pipe_r, dst.as_fd(), lease.len)?;
            lease.len = lease.len.saturating_sub(n);
            Ok(n)
        }
        InFlight::Copy { buf, start, end } => {
            let pending = buf.get(*start..*end).unwrap_or_default();
            let n = (&*SockRef::from(dst)).write(pending)?;
            *start += n;
            if *start >= *end {
                // The copy buffer is for this burst only; try a pipe next time.
                *in_flight = InFlight::Nothing;
            }
            Ok(n)
        }
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed open for the call; null offsets mean
    // "current position", as required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// A connected pair over loopback: (our end, the relay's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    struct Setup {
        client: TcpStream,
        upstream: TcpStream,
        relay: JoinHandle<Result<RelayTotals, RelayError>>,
        stats: std::sync::Arc<Stats>,
    }

    async fn setup(early: &'static [u8]) -> Setup {
        let (client, relay_client) = pair().await;
        let (upstream, relay_upstream) = pair().await;
        let stats = std::sync::Arc::new(Stats::default());
        let s = stats.clone();
        let relay =
            tokio::spawn(async move { relay(relay_client, relay_upstream, early, &s).await });
        Setup {
            client,
            upstream,
            relay,
            stats,
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Writes `data`, half-closes, and reads the other way to EOF.
    async fn exchange(mut s: TcpStream, data: Vec<u8>, delay: Duration) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            tokio::time::sleep(delay).await;
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(write, read).1
    }

    async fn eight_mib_each_way() {
        const LEN: usize = 8 << 20;
        let s = setup(b"").await;
        let (up_data, down_data) = (pattern(LEN, 1), pattern(LEN, 2));
        let (up_sum, down_sum) = (crc32c::crc32c(&up_data), crc32c::crc32c(&down_data));
        // The client reads late, so pipes hold data while the destination is full.
        let (at_client, at_upstream) = tokio::join!(
            exchange(s.client, up_data, Duration::from_millis(200)),
            exchange(s.upstream, down_data, Duration::ZERO),
        );
        assert_eq!(at_upstream.len(), LEN);
        assert_eq!(at_client.len(), LEN);
        assert_eq!(crc32c::crc32c(&at_upstream), up_sum);
        assert_eq!(crc32c::crc32c(&at_client), down_sum);
        let totals = s.relay.await.unwrap().unwrap();
        assert_eq!(
            totals,
            RelayTotals {
                up: LEN as u64,
                down: LEN as u64
            }
        );
        assert_eq!(s.stats.bytes_up.load(Ordering::Relaxed), LEN as u64);
        assert_eq!(s.stats.bytes_down.load(Ordering::Relaxed), LEN as u64);
    }

    #[tokio::test]
    async fn eight_mib_each_way_arrive_intact() {
        eight_mib_each_way().await;
    }

    #[tokio::test]
    async fn copy_fallback_without_pipes_arrives_intact() {
        NO_PIPES.set(true);
        eight_mib_each_way().await;
        NO_PIPES.set(false);
        assert_eq!(pooled_pipes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eight_mib_each_way_on_the_multi_thread_runtime() {
        eight_mib_each_way().await;
    }

    #[tokio::test]
    async fn client_half_close_keeps_the_answer_flowing() {
        let mut s = setup(b"").await;
        s.client.write_all(b"request").await.unwrap();
        s.client.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // Upstream saw EOF but can still answer, slowly.
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.upstream.write_all(b"answer").await.unwrap();
        s.upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        let totals = s.relay.await.unwrap().unwrap();
        assert_eq!(totals, RelayTotals { up: 7, down: 6 });
    }

    #[tokio::test]
    async fn upstream_half_close_keeps_the_request_flowing() {
        let mut s = setup(b"").await;
        s.upstream.write_all(b"banner").await.unwrap();
        s.upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"banner");
        s.client.write_all(b"late").await.unwrap();
        s.client.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"late");
        assert_eq!(
            s.relay.await.unwrap().unwrap(),
            RelayTotals { up: 4, down: 6 }
        );
    }

    #[tokio::test]
    async fn early_payload_goes_upstream_first() {
        let mut s = setup(b"GET / HTTP/1.0\r\n").await;
        s.client.write_all(b"\r\n").await.unwrap();
        s.client.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");
        s.upstream.shutdown().await.unwrap();
        assert_eq!(s.relay.await.unwrap().unwrap().up, 18);
    }

    #[tokio::test]
    async fn peer_reset_is_an_error_and_closes_both() {
        let mut s = setup(b"").await;
        s.client.write_all(b"x").await.unwrap();
        let mut b = [0; 1];
        s.upstream.read_exact(&mut b).await.unwrap();
        sockopt::set_linger_zero(&s.client).unwrap();
        drop(s.client);
        let e = s.relay.await.unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                RelayError::Read {
                    side: Side::Client,
                    ..
                }
            ),
            "{e}"
        );
        // The upstream sees the flow end (reset), not hang.
        let r = tokio::time::timeout(Duration::from_secs(2), s.upstream.read(&mut b)).await;
        match r.unwrap() {
            Ok(0) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("read {n} bytes after reset"),
        }
    }

    #[tokio::test]
    async fn idle_relay_holds_no_pipe() {
        let mut s = setup(b"").await;
        let before = LEASED_HERE.get();
        for _ in 0..3 {
            s.client.write_all(&[7; 100_000]).await.unwrap();
            let mut b = vec![0; 100_000];
            s.upstream.read_exact(&mut b).await.unwrap();
            s.upstream.write_all(&b).await.unwrap();
            s.client.read_exact(&mut b).await.unwrap();
        }
        // Let the relay see the sockets go quiet.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(LEASED_HERE.get(), before, "an idle relay holds a pipe");
        assert!(pooled_pipes() >= 1, "pipes were not returned to the pool");
        assert!(pooled_pipes() <= POOL_MAX);
        drop(s.client);
        drop(s.upstream);
        let _ = s.relay.await.unwrap();
    }
}
