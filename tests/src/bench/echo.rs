//! The upstream services: an epoll TCP echo server and a UDP echo server.
//!
//! One thread each (pinned with the generators when the layout says so): on a
//! 2-core machine more threads only add context switches. Large buffers, reused; a
//! connection allocates only when a write is partial (then it stops reading until
//! the leftover is written, so a slow reader is never buffered without bound).
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::netns::Netns;

const BUF: usize = 256 * 1024;
const LISTENER: Token = Token(usize::MAX);

/// Echo servers running until dropped.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    /// TCP echo on `tcp`, UDP echo on each of `udp`, all inside `ns`, their threads
    /// pinned to `cpu` when given and at nice value `nice`.
    pub fn start(
        ns: &Netns,
        tcp: SocketAddr,
        udp: &[SocketAddr],
        cpu: Option<usize>,
        nice: i32,
    ) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let listener = ns.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&tcp.into())?;
            s.listen(8192)?;
            s.set_nonblocking(true)?;
            io::Result::Ok(std::net::TcpListener::from(s))
        })??;
        let st = stop.clone();
        threads.push(thread::spawn(move || {
            if let Some(cpu) = cpu {
                let _ = super::sys::pin_current_thread(cpu);
            }
            let _ = super::sys::nice_current_thread(nice);
            if let Err(e) = tcp_loop(TcpListener::from_std(listener), &st) {
                eprintln!("bench: tcp echo stopped: {e}");
            }
        }));
        for &addr in udp {
            let sock = ns.enter(move || UdpSocket::bind(addr))??;
            // Room for every client's whole window at once: drops here would be
            // counted against the proxy.
            force_buffers(&sock, 4 << 20);
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let st = stop.clone();
            threads.push(thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = super::sys::pin_current_thread(cpu);
                }
                let _ = super::sys::nice_current_thread(nice);
                udp_loop(&sock, &st);
            }));
        }
        Ok(Echo { stop, threads })
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

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet written back (a partial write), from `pending_at`.
    pending: Vec<u8>,
    pending_at: usize,
}

fn tcp_loop(mut listener: TcpListener, stop: &AtomicBool) -> Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; BUF];
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
                                    pending: Vec::new(),
                                    pending_at: 0,
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
                Some(c) => serve(c, &mut buf),
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

/// Echoes what is readable; true when the connection is finished.
fn serve(c: &mut Conn, buf: &mut [u8]) -> bool {
    // Leftover from a partial write first; read again only once it is gone.
    while c.pending_at < c.pending.len() {
        match c
            .stream
            .write(c.pending.get(c.pending_at..).unwrap_or_default())
        {
            Ok(n) => c.pending_at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    c.pending.clear();
    c.pending_at = 0;
    loop {
        let n = match c.stream.read(buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        };
        let data = buf.get(..n).unwrap_or_default();
        let mut at = 0;
        while at < n {
            match c.stream.write(data.get(at..).unwrap_or_default()) {
                Ok(w) => at += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.pending
                        .extend_from_slice(data.get(at..).unwrap_or_default());
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
}

fn udp_loop(sock: &UdpSocket, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = sock.send_to(buf.get(..n).unwrap_or_default(), from);
            }
            Err(_) => continue,
        }
    }
}

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE (root: above net.core.rmem_max); best effort.
fn force_buffers(sock: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
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
