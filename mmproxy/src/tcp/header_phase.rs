//! The header phase of a TCP connection (ARCHITECTURE.md, step 3): read until the
//! decoder has a complete PROXY header, within `--header-timeout`, or close the
//! connection and say why.
use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::addr::ProxyAddr;
use crate::logging::CONN_TARGET;
use crate::proxy_protocol::{self, Decoded, Endpoints, Invalid};
use crate::stats::Stats;

use super::TcpContext;

/// Why a connection was closed before a complete header.
#[derive(Debug)]
pub(super) enum Rejection {
    Invalid(Invalid),
    Timeout(Duration),
    /// The peer closed after sending this many bytes.
    Eof(usize),
    Io(io::Error),
}

pub(super) fn reject(rejection: Rejection, proxy: ProxyAddr, ctx: &TcpContext) {
    let stats = &*ctx.stats;
    match rejection {
        Rejection::Invalid(e) => {
            stats.invalid_header(&e);
            warn!(target: CONN_TARGET, peer = %proxy, reason = e.kind(),
                  error = &e as &dyn std::error::Error, "invalid PROXY header, connection closed");
        }
        Rejection::Timeout(after) => {
            Stats::inc(&stats.rejected_header_timeout);
            warn!(target: CONN_TARGET, peer = %proxy, reason = "header_timeout",
                  "no complete PROXY header within {after:?}, connection closed");
        }
        // Balancers' plain TCP health checks connect and close: not worth a warning.
        Rejection::Eof(0) => {
            Stats::inc(&stats.rejected_header_eof);
            debug!(target: CONN_TARGET, peer = %proxy, reason = "eof",
                   "connection closed before any byte");
        }
        Rejection::Eof(n) => {
            Stats::inc(&stats.rejected_header_eof);
            warn!(target: CONN_TARGET, peer = %proxy, reason = "eof", received = n,
                  "connection closed inside the PROXY header");
        }
        Rejection::Io(e) => {
            Stats::inc(&stats.rejected_read_error);
            warn!(target: CONN_TARGET, peer = %proxy, reason = "read_error",
                  error = &e as &dyn std::error::Error, "reading the PROXY header failed");
        }
    }
}

/// Reads until the decoder has a complete header, in as many reads as it takes.
/// Returns the endpoints and the payload bytes that arrived with the header (usually
/// none; then nothing is allocated for them).
pub(super) async fn read_header(
    conn: &mut TcpStream,
    ctx: &TcpContext,
) -> Result<(Endpoints, Vec<u8>), Rejection> {
    let opts = ctx.header;
    let mut buf = vec![0u8; ctx.header_buf_len()];
    let mut filled = 0;
    loop {
        let Some(free) = buf.get_mut(filled..).filter(|f| !f.is_empty()) else {
            // The decoder refuses headers above the maximum before the buffer fills;
            // this only guards against that promise being broken.
            return Err(Rejection::Invalid(Invalid::TooLong {
                len: filled,
                max: ctx.header.max_header_len,
            }));
        };
        let n = conn.read(free).await.map_err(Rejection::Io)?;
        if n == 0 {
            return Err(Rejection::Eof(filled));
        }
        filled += n;
        let received = buf.get(..filled).unwrap_or_default();
        match proxy_protocol::decode(received, &opts) {
            Ok(Decoded::NeedMore { .. }) => continue,
            Ok(Decoded::Complete { header, len }) => {
                let payload = received.get(len..).unwrap_or_default().to_vec();
                return Ok((header.endpoints(), payload));
            }
            Err(e) => return Err(Rejection::Invalid(e)),
        }
    }
}
