//! Connecting from inside a namespace, optionally from a chosen source address, and
//! checking what an echo service sends back.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::netns::Netns;

/// Connects from `ns` to `dst`, bound to `src` when given. The outer error is the
/// harness's, the inner one the connection's (so tests can expect a refusal).
pub fn connect_from(
    ns: &Netns,
    src: Option<&str>,
    dst: &str,
    timeout: Duration,
) -> Result<std::io::Result<TcpStream>> {
    let src: Option<SocketAddr> = match src {
        Some(s) if s.contains(':') && !s.starts_with('[') => Some(format!("[{s}]:0").parse()?),
        Some(s) => Some(format!("{s}:0").parse()?),
        None => None,
    };
    let dst: SocketAddr = dst.parse()?;
    ns.enter(move || {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(src) = src {
            sock.bind(&src.into())?;
        }
        sock.connect_timeout(&dst.into(), timeout)?;
        sock.set_tcp_nodelay(true)?;
        Ok(sock.into())
    })
}

/// Sends `msg` to an echo service and checks that it comes back unchanged.
pub fn roundtrip(c: &mut TcpStream, msg: &[u8]) -> Result<()> {
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    ensure!(back == msg, "the echo differs");
    Ok(())
}

/// Sends `len` bytes and reads them back concurrently (large enough for GSO
/// segments on the return path).
pub fn bulk_roundtrip(c: &mut TcpStream, len: usize) -> Result<()> {
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let mut w = c.try_clone()?;
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; len];
    c.read_exact(&mut back)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(back == data, "{len} bytes came back altered");
    Ok(())
}

/// Reads until EOF; Ok(bytes) or the error (a reset shows up here).
pub fn read_to_eof(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    c.read_to_end(&mut all)?;
    Ok(all)
}
