//! Connecting from inside a namespace, optionally from a chosen source address.
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;

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

/// A counter's value in a `name=value …` stats line; 0 when absent (zeros are not
/// printed).
pub fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim_matches('"').parse().ok())
        .unwrap_or(0)
}
