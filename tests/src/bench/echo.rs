//! The upstream services: a TCP echo server and a UDP echo server.
//!
//! Each runs `threads` threads (one per CPU, or one when the layout pins it with the
//! generators), every thread with its own SO_REUSEPORT socket, so the kernel spreads
//! the flows over them. Neither copies the bytes through user space: TCP goes
//! socket → pipe → the same socket by splice(2), UDP is echoed in recvmmsg /
//! sendmmsg batches. They must cost far less than the proxies they serve, or they,
//! not the proxy, would set the rates.
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use super::batch::Batch;
use crate::netns::Netns;

const LISTENER: Token = Token(usize::MAX);
/// A connection's pipe: as much as one splice moves at once (best effort: the
/// default 64 KiB when the per-user pipe allowance is used up).
const PIPE_SIZE: usize = 256 * 1024;
/// Drained pipes a thread keeps for reuse; more are closed. Busy connections take
/// one back on every readiness, so creating it each time would cost two syscalls.
const SPARE_PIPES: usize = 64;
/// Datagrams per recvmmsg / sendmmsg.
const UDP_BATCH: usize = 64;

/// Echo servers running until dropped.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    /// TCP echo on `tcp`, UDP echo on each of `udp`, `threads` threads for each, all
    /// inside `ns`, pinned to `cpu` when given and at nice value `nice`.
    pub fn start(
        ns: &Netns,
        tcp: SocketAddr,
        udp: &[SocketAddr],
        threads: usize,
        cpu: Option<usize>,
        nice: i32,
    ) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut echo = Echo {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        let threads = threads.max(1);
        let spawn = |echo: &mut Echo, f: Box<dyn FnOnce() + Send>| {
            echo.threads.push(thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = super::sys::pin_current_thread(cpu);
                }
                let _ = super::sys::nice_current_thread(nice);
                f();
            }));
        };
        for _ in 0..threads {
            // Sockets keep the namespace they were made in; the threads need not enter it.
            let listener = ns.enter(move || tcp_listener(tcp))??;
            let st = stop.clone();
            spawn(
                &mut echo,
                Box::new(move || {
                    if let Err(e) = tcp_loop(TcpListener::from_std(listener), &st) {
                        eprintln!("bench: tcp echo stopped: {e:#}");
                    }
                }),
            );
        }
        for &addr in udp {
            for _ in 0..threads {
                let sock = ns.enter(move || udp_socket(addr))??;
                let st = stop.clone();
                spawn(&mut echo, Box::new(move || udp_loop(&sock, &st)));
            }
        }
        Ok(echo)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(8192)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    let s = UdpSocket::from(s);
    // Room for every client's whole window at once: drops here would be counted
    // against the proxy.
    force_buffers(&s, 4 << 20);
    // The loop looks at the stop flag this often.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// A thread's drained pipes, for reuse.
#[derive(Default)]
struct Pipes {
    spare: Vec<Pipe>,
}

impl Pipes {
    fn take(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.spare.pop() {
            return Ok(p);
        }
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let [r, w] = fds;
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) };
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int. Failure
        // (over the per-user pipe allowance) leaves the default size, which works.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { r, w })
    }

    /// Takes back a pipe that is empty.
    fn put(&mut self, p: Pipe) {
        if self.spare.len() < SPARE_PIPES {
            self.spare.push(p);
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Holds what was read and is not yet written back; only while it holds
    /// something (idle connections then cost no descriptors beyond their socket).
    pipe: Option<Pipe>,
    queued: usize,
}

fn tcp_loop(mut listener: TcpListener, stop: &AtomicBool) -> Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pipes = Pipes::default();
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll"),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let i = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut stream,
                                Token(i),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            if let Some(slot) = conns.get_mut(i) {
                                *slot = Some(Conn {
                                    stream,
                                    pipe: None,
                                    queued: 0,
                                });
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // EMFILE and friends: try again on the next readiness.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let i = ev.token().0;
            let Some(slot) = conns.get_mut(i) else {
                continue;
            };
            let done = match slot {
                Some(c) => serve(c, &mut pipes),
                None => false,
            };
            if done {
                if let Some(mut c) = slot.take() {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
                free.push(i);
            }
        }
    }
    Ok(())
}

/// Echoes what is readable; true when the connection is finished (EOF or an error).
fn serve(c: &mut Conn, pipes: &mut Pipes) -> bool {
    let sock = c.stream.as_raw_fd();
    loop {
        // What the pipe holds goes out first, and more is read only once it is
        // empty: a slow reader is never buffered beyond one pipe.
        while c.queued > 0 {
            let Some(p) = &c.pipe else {
                return true;
            };
            match splice(p.r.as_raw_fd(), sock, c.queued) {
                Ok(0) => return true,
                Ok(n) => c.queued -= n.min(c.queued),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        let p = match c.pipe.take() {
            Some(p) => p,
            None => match pipes.take() {
                Ok(p) => p,
                Err(_) => return true,
            },
        };
        match splice(sock, p.w.as_raw_fd(), PIPE_SIZE) {
            Ok(0) => {
                pipes.put(p);
                return true;
            }
            Ok(n) => {
                c.queued = n;
                c.pipe = Some(p);
            }
            Err(e) => {
                // The pipe is still empty: nothing was moved.
                pipes.put(p);
                return e.kind() != io::ErrorKind::WouldBlock;
            }
        }
    }
}

/// splice(2) of up to `len` bytes between a socket and a pipe, without blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are open for the call; null offsets, as neither a
        // socket nor a pipe has a file position.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn udp_loop(sock: &UdpSocket, stop: &AtomicBool) {
    let fd = sock.as_raw_fd();
    let mut batch = Batch::new(UDP_BATCH);
    while !stop.load(Ordering::Relaxed) {
        // Waits (up to the read timeout) for one datagram, then takes whatever else
        // is queued without waiting.
        match batch.recv(fd, libc::MSG_WAITFORONE) {
            Ok(n) => batch.echo(fd, n),
            Err(_) => continue,
        }
    }
}

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE (root: above net.core.rmem_max); best effort.
fn force_buffers(sock: &UdpSocket, bytes: libc::c_int) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt reads an int from a valid pointer for the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}
