//! Upgrading without refusing a connection: a new mmproxy started with the same
//! listen set takes the running one's listening sockets instead of binding its own.
//!
//! The running instance offers its sockets on an abstract unix socket named after
//! its user id, protocol and listen set ([`ListenSet`]); abstract names belong to
//! the network namespace, vanish with the process and leave no file behind. A new
//! instance connects there before binding anything, and when someone answers:
//!
//! 1. both check with SO_PEERCRED that the other runs under the same user id;
//! 2. the new one names its listen set, the old one sends duplicates of its
//!    listening sockets (SCM_RIGHTS), of its `--metrics` socket and of the offer's
//!    own socket;
//! 3. the new one finishes start-up on those sockets (kernel side, routing) and
//!    serves them, then says `READY`;
//! 4. the old one stops accepting, answers `DONE`, and drains its live
//!    connections within `--shutdown-grace`.
//!
//! The sockets are never closed on the way, so their accept queues and receive
//! queues pass to the new instance whole: no SYN meets a closed port, no queued
//! connection is reset, in every `--ebpf` mode. A new instance that fails before
//! step 3 just exits; the old one notices the closed connection and serves on.
//! Because the offer's own socket is handed over too, a third instance that
//! connects meanwhile waits in its backlog and is answered by the new one: starts
//! queue up instead of racing.
mod fds;
pub mod start;
pub mod successor;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cli::{Args, Protocol};

/// The protocol's first word and version; a different one is refused.
const HELLO: &str = "MMPROXY-HANDOFF 1";
/// How long the old instance waits for the new one's first line.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// How long the new instance waits to be answered: the old one may be handing over
/// to another new instance first.
const QUEUE_WAIT: Duration = Duration::from_secs(60);
/// How long the old instance waits for the new one to be serving (BPF loading on a
/// busy host takes seconds).
const START_WAIT: Duration = Duration::from_secs(120);
/// How long the new instance waits for the old one's `DONE`.
const DONE_WAIT: Duration = Duration::from_secs(10);
/// Longest line either side accepts.
const MAX_LINE: usize = 64 * 1024;

/// What a handoff is keyed by: the protocol and the `-l` list, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSet {
    text: String,
}

impl ListenSet {
    pub fn of(args: &Args) -> Self {
        let proto = match args.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let specs: Vec<String> = args
            .listen
            .iter()
            .map(|l| {
                format!(
                    "{}-{}",
                    SocketAddr::new(l.addr, *l.ports.start()),
                    l.ports.end()
                )
            })
            .collect();
        Self {
            text: format!("{proto} {}", specs.join(",")),
        }
    }

    /// The abstract socket's name (without the leading NUL).
    pub fn socket_name(&self) -> String {
        format!(
            "mmproxy/handoff/{}/{:016x}",
            fds::effective_uid(),
            fnv1a(self.text.as_bytes())
        )
    }

    fn address(&self) -> io::Result<UnixAddr> {
        UnixAddr::from_abstract_name(self.socket_name().as_bytes())
    }
}

/// FNV-1a: a stable hash (std's may change between Rust releases, and the old and
/// the new binary must agree).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("connecting to the running mmproxy's handoff socket @{name}")]
    Connect {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the handoff socket @{name} belongs to uid {uid}, this mmproxy runs as uid {ours}")]
    Foreign { name: String, uid: u32, ours: u32 },
    #[error("talking to the running mmproxy (pid {pid})")]
    Io {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("the running mmproxy (pid {pid}) refused the handoff: {reason}")]
    Refused { pid: i32, reason: String },
    #[error("the running mmproxy (pid {pid}) sent {what}")]
    Protocol { pid: i32, what: String },
}

/// One side's view of the handoff connection: lines, and the descriptors that came
/// with them.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    /// The next line; `None` at end of stream.
    fn line(&mut self, wait: Duration) -> io::Result<Option<String>> {
        self.stream.set_read_timeout(Some(wait))?;
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(
                    String::from_utf8_lossy(line.get(..end).unwrap_or_default()).into_owned(),
                ));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            let mut chunk = [0u8; 4096];
            let n = fds::recv_with_fds(&self.stream, &mut chunk, &mut self.fds)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// The sockets a new instance received, until it says it serves them.
pub struct Takeover {
    conn: Conn,
    pub old_pid: i32,
    /// One group per `-l`, in order.
    pub groups: Vec<Vec<OwnedFd>>,
    /// The old instance's `--metrics` socket, if it had one.
    pub metrics: Option<OwnedFd>,
    control: OwnedFd,
    started: Instant,
}

/// Asks a running mmproxy with the same listen set for its sockets. `Ok(None)`:
/// nobody offers them (start as usual).
pub fn take_over(set: &ListenSet) -> Result<Option<Takeover>, HandoffError> {
    let name = set.socket_name();
    let connect = |source| HandoffError::Connect {
        name: name.clone(),
        source,
    };
    let stream = match UnixStream::connect_addr(&set.address().map_err(connect)?) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(connect(e)),
    };
    let started = Instant::now();
    let (uid, pid) = fds::peer_credentials(&stream).map_err(connect)?;
    let ours = fds::effective_uid();
    if uid != ours {
        return Err(HandoffError::Foreign { name, uid, ours });
    }
    let io = |source| HandoffError::Io { pid, source };
    let bad = |what: &str| HandoffError::Protocol {
        pid,
        what: what.to_owned(),
    };
    let mut conn = Conn::new(stream);
    conn.send(&format!("{HELLO} {}", set.text)).map_err(io)?;
    let Some(answer) = conn.line(QUEUE_WAIT).map_err(io)? else {
        return Err(bad("nothing (it closed the connection)"));
    };
    if let Some(reason) = answer.strip_prefix("REFUSED ") {
        return Err(HandoffError::Refused {
            pid,
            reason: reason.to_owned(),
        });
    }
    let layout = Layout::parse(&answer).ok_or_else(|| bad(&format!("{answer:?}")))?;
    // One "F" line per message of descriptors; the descriptors come with its bytes.
    for _ in 0..layout.total().div_ceil(fds::MAX_FDS) {
        match conn.line(HELLO_WAIT).map_err(io)? {
            Some(l) if l == "F" => {}
            Some(l) => return Err(bad(&format!("{l:?} among the descriptors"))),
            None => return Err(bad("fewer descriptors than announced")),
        }
    }
    if conn.fds.len() != layout.total() {
        return Err(bad("a different number of descriptors than announced"));
    }
    let mut received = std::mem::take(&mut conn.fds).into_iter();
    let groups = layout
        .groups
        .iter()
        .map(|n| received.by_ref().take(*n).collect())
        .collect();
    let metrics = if layout.metrics {
        received.next()
    } else {
        None
    };
    let control = received.next().ok_or_else(|| bad("no offer socket"))?;
    Ok(Some(Takeover {
        conn,
        old_pid: pid,
        groups,
        metrics,
        control,
        started,
    }))
}

impl Takeover {
    /// Tells the old instance that this one serves now, and waits until it has
    /// stopped accepting. Returns the offer's socket (for [`Offer::inherit`]) and
    /// how long the handoff took from the first connect.
    pub fn finish(mut self) -> Result<(UnixListener, Duration), HandoffError> {
        let pid = self.old_pid;
        let io = |source| HandoffError::Io { pid, source };
        self.conn
            .send(&format!("READY {}", std::process::id()))
            .map_err(io)?;
        match self.conn.line(DONE_WAIT).map_err(io)? {
            Some(l) if l == "DONE" => {
                Ok((UnixListener::from(self.control), self.started.elapsed()))
            }
            other => Err(HandoffError::Protocol {
                pid,
                what: format!("{other:?} instead of DONE"),
            }),
        }
    }
}

/// `SOCKETS <metrics 0|1> <group sizes…>`: what follows, in that order, then the
/// offer's socket.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    metrics: bool,
    groups: Vec<usize>,
}

impl Layout {
    fn line(&self) -> String {
        let sizes: Vec<String> = self.groups.iter().map(ToString::to_string).collect();
        format!("SOCKETS {} {}", u8::from(self.metrics), sizes.join(" "))
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        if words.next()? != "SOCKETS" {
            return None;
        }
        let metrics = match words.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let groups = words
            .map(|w| w.parse().ok().filter(|n| *n > 0 && *n <= 4096))
            .collect::<Option<Vec<usize>>>()?;
        (!groups.is_empty() && groups.len() <= 4096).then_some(Self { metrics, groups })
    }

    fn total(&self) -> usize {
        self.groups.iter().sum::<usize>() + usize::from(self.metrics) + 1
    }
}

/// What a running instance hands over, held from the moment it serves until it
/// stops (dropping it withdraws the offer).
pub struct Offer {
    listener: tokio::net::UnixListener,
    shared: Arc<Offered>,
}

/// Duplicates of everything offered, for the thread that talks to a new instance.
struct Offered {
    text: String,
    layout: Layout,
    /// The listening sockets, the metrics socket, the offer's socket: the order
    /// they are sent in.
    fds: Vec<OwnedFd>,
}

/// A new instance that serves the sockets now; [`Successor::release`] lets it go on.
pub struct Successor {
    conn: Conn,
    pub pid: i32,
}

impl Successor {
    /// Tells the new instance that this one has stopped accepting.
    pub fn release(mut self) {
        if let Err(e) = self.conn.send("DONE") {
            warn!(
                error = &e as &dyn std::error::Error,
                pid = self.pid,
                "handoff: the new mmproxy did not hear DONE (it serves anyway)"
            );
        }
    }
}

impl Offer {
    /// Offers `sockets` (one group per `-l`) and `metrics` under `set`'s name.
    /// `Ok(None)` when another process holds the name.
    pub fn bind(
        set: &ListenSet,
        sockets: &[Vec<BorrowedFd<'_>>],
        metrics: Option<BorrowedFd<'_>>,
    ) -> io::Result<Option<Self>> {
        match UnixListener::bind_addr(&set.address()?) {
            Ok(l) => Self::inherit(l, set, sockets, metrics).map(Some),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Offers the sockets on a listener handed over by the previous instance.
    pub fn inherit(
        listener: UnixListener,
        set: &ListenSet,
        sockets: &[Vec<BorrowedFd<'_>>],
        metrics: Option<BorrowedFd<'_>>,
    ) -> io::Result<Self> {
        let mut fds = Vec::new();
        for s in sockets.iter().flatten().chain(metrics.as_ref()) {
            fds.push(s.try_clone_to_owned()?);
        }
        fds.push(listener.as_fd().try_clone_to_owned()?);
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Offered {
            text: set.text.clone(),
            layout: Layout {
                metrics: metrics.is_some(),
                groups: sockets.iter().map(Vec::len).collect(),
            },
            fds,
        });
        Ok(Self {
            listener: tokio::net::UnixListener::from_std(listener)?,
            shared,
        })
    }

    /// Serves new instances one after the other until one of them serves the
    /// sockets. Anything that goes wrong with one is logged and the offer stands.
    pub async fn successor(&self) -> Successor {
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(
                        error = &e as &dyn std::error::Error,
                        "handoff: accept failed"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = self.shared.clone();
            let talk = tokio::task::spawn_blocking(move || {
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                hand_over(stream, &shared)
            });
            match talk.await {
                Ok(Ok(Some(s))) => return s,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => warn!(
                    error = &e as &dyn std::error::Error,
                    "handoff: talking to a new mmproxy failed; still serving"
                ),
                Err(e) => warn!(
                    error = &e as &dyn std::error::Error,
                    "handoff: the handoff thread failed; still serving"
                ),
            }
        }
    }
}

/// The old instance's side of one handoff; `None` when it did not happen.
fn hand_over(stream: UnixStream, offered: &Offered) -> io::Result<Option<Successor>> {
    let (uid, pid) = fds::peer_credentials(&stream)?;
    let mut conn = Conn::new(stream);
    let ours = fds::effective_uid();
    if uid != ours {
        warn!(
            peer_pid = pid,
            peer_uid = uid,
            "handoff: refused a process of another user"
        );
        conn.send(&format!("REFUSED uid {uid} is not {ours}"))?;
        return Ok(None);
    }
    let Some(hello) = conn.line(HELLO_WAIT)? else {
        return Ok(None);
    };
    if hello.strip_prefix(HELLO).map(str::trim_start) != Some(offered.text.as_str()) {
        warn!(
            peer_pid = pid,
            hello, "handoff: refused a different listen set"
        );
        conn.send(&format!("REFUSED this mmproxy serves {}", offered.text))?;
        return Ok(None);
    }
    info!(
        peer_pid = pid,
        "handoff: a new mmproxy asks for the listening sockets"
    );
    conn.send(&offered.layout.line())?;
    let all: Vec<BorrowedFd<'_>> = offered.fds.iter().map(AsFd::as_fd).collect();
    for chunk in all.chunks(fds::MAX_FDS) {
        fds::send_with_fds(&conn.stream, b"F\n", chunk)?;
    }
    match conn.line(START_WAIT)? {
        Some(l) if l.starts_with("READY") => Ok(Some(Successor { conn, pid })),
        other => {
            warn!(
                peer_pid = pid,
                said = ?other,
                "handoff: the new mmproxy stopped before serving; still serving"
            );
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests;
