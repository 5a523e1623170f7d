//! The TCP proxy (`-p tcp`, ARCHITECTURE.md, steps 1 to 5): [`accept`] takes
//! connections from the balancer (after the kernel's sk_lookup policy) and checks
//! them against the allow-list; each one runs in [`connection`]: the
//! [`header_phase`] reads the PROXY header, [`connect`] opens the upstream
//! connection from the client's address on the socket layer of
//! [`crate::transparent`], and [`relay`] splices bytes both ways until both sides
//! are done.
pub mod accept;
pub mod connect;
pub mod connection;
mod header_phase;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use crate::cli::Args;
use crate::proxy_protocol::{self, DecodeOptions};
use crate::stats::Stats;
use crate::transparent::Upstream;

pub use accept::{bind_tcp, bind_tcp_with, serve_tcp, spawn_tcp};
pub use connect::ConnectOptions;
pub use connection::handle;

/// Everything a connection needs, shared by all connections of all TCP listeners.
#[derive(Debug)]
pub struct TcpContext {
    pub upstream: Upstream,
    pub connect: ConnectOptions,
    /// Bound on receiving the whole header, however it is split.
    pub header_timeout: Duration,
    /// The decoder's limits; `max_header_len` also sizes the per-connection buffer.
    pub header: DecodeOptions,
    pub stats: Arc<Stats>,
}

impl TcpContext {
    pub fn from_args(args: &Args, stats: Arc<Stats>) -> Self {
        TcpContext {
            upstream: Upstream::from_args(args),
            connect: ConnectOptions {
                mark: args.mark,
                connect_timeout: args.connect_timeout,
            },
            header_timeout: args.header_timeout,
            header: DecodeOptions::stream().with_max_header_len(args.max_header_len),
            stats,
        }
    }

    /// The buffer must hold any acceptable header, v1 lines included.
    fn header_buf_len(&self) -> usize {
        self.header.max_header_len.max(proxy_protocol::V1_MAX_LEN)
    }
}
