//! One proxied TCP connection, from accept to close: the header phase, the
//! upstream connection from the client's address, the relay (ARCHITECTURE.md,
//! steps 3 to 5).
//!
//! Logging follows [`crate::logging`]: failures of a connection are `warn!` and
//! state changes `debug!`, both on [`CONN_TARGET`], so `-v` decides what is shown.
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::addr::{ClientAddr, ProxyAddr, Shown, UpstreamAddr};
use crate::ebpf::{FlowProtocol, FlowRegistration, FlowRegistry, ReturnFlow};
use crate::logging::CONN_TARGET;
use crate::proxy_protocol::Endpoints;
use crate::stats::{ConnectFailure, Stats};
use crate::transparent::TargetError;

use super::header_phase::{read_header, reject, Rejection};
use super::{connect, relay, TcpContext};

/// Serves one accepted connection from the balancer at `proxy` to its end. Never
/// fails: every outcome is counted and logged, and both sockets are closed on return.
pub async fn handle(mut conn: TcpStream, proxy: ProxyAddr, ctx: Arc<TcpContext>) {
    let stats = &*ctx.stats;
    let _active = Gauge::up(&stats.tcp_active);
    // TCP_NODELAY comes from the listening socket (accept::bind_tcp).
    debug!(target: CONN_TARGET, peer = %proxy, "connection accepted");

    let accepted = Instant::now();
    let header = tokio::time::timeout(ctx.header_timeout, read_header(&mut conn, &ctx)).await;
    let (endpoints, payload) = match header {
        Ok(Ok(h)) => {
            stats.header_duration.observe(accepted.elapsed());
            h
        }
        Ok(Err(rejection)) => return reject(rejection, proxy, &ctx),
        Err(_) => return reject(Rejection::Timeout(ctx.header_timeout), proxy, &ctx),
    };

    let (from, to) = match choose_target(endpoints, &conn, proxy, &ctx) {
        Ok(route) => route,
        Err(e) => {
            stats.connect_failed(ConnectFailure::Other);
            warn!(target: CONN_TARGET, peer = %proxy, reason = e.kind(),
                  error = &e as &dyn std::error::Error,
                  "no upstream for this header; connection closed");
            return;
        }
    };
    let client = Shown(from);
    let dst = Shown(match endpoints {
        Endpoints::Proxied { destination, .. } => Some(destination),
        Endpoints::Local => None,
    });
    debug!(target: CONN_TARGET, peer = %proxy, %client, %dst, upstream = %to, "header received");

    let connecting = Instant::now();
    let connected = match &ctx.upstream.flows {
        Some(flows) => connect::connect_then(from, to, &ctx.connect, |local| {
            register_flow(flows, local, to, proxy)
        })
        .await
        .map(|(s, reg)| (s, reg.flatten())),
        None => connect::connect(from, to, &ctx.connect)
            .await
            .map(|s| (s, None)),
    };
    // Held until the relay ends: the kernel steers this flow's answers meanwhile.
    let (upstream, _registration) = match connected {
        Ok(s) => {
            stats
                .upstream_connect_duration
                .observe(connecting.elapsed());
            s
        }
        Err(e) => {
            stats.connect_failed(e.class());
            warn!(target: CONN_TARGET, peer = %proxy, %client, %dst, upstream = %to,
                  reason = e.kind(), error = &e as &dyn std::error::Error,
                  "upstream connection failed");
            return;
        }
    };
    Stats::inc(&stats.tcp_proxied);
    debug!(target: CONN_TARGET, peer = %proxy, %client, %dst, upstream = %to, "upstream connected");

    match relay::relay(conn, upstream, &payload, stats).await {
        Ok(totals) => {
            debug!(target: CONN_TARGET, peer = %proxy, %client, %dst, upstream = %to,
                   bytes_up = totals.up, bytes_down = totals.down, "connection closed");
        }
        Err(e) => {
            Stats::inc(&stats.relay_errors);
            warn!(target: CONN_TARGET, peer = %proxy, %client, %dst, upstream = %to,
                  reason = e.kind(), error = &e as &dyn std::error::Error, "relay failed");
        }
    }
}

/// Registers the flow's answers with the kernel side. A failure (full table) is
/// logged and the connection goes ahead: for a loopback target the answers still
/// find their way through the loopback rule.
fn register_flow(
    flows: &Arc<dyn FlowRegistry>,
    local: SocketAddr,
    to: UpstreamAddr,
    proxy: ProxyAddr,
) -> Option<FlowRegistration> {
    let flow = ReturnFlow {
        protocol: FlowProtocol::Tcp,
        client: local,
        upstream: to.0,
    };
    match FlowRegistration::new(flows, flow) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(target: CONN_TARGET, peer = %proxy, client = %local, upstream = %to,
                  reason = "flow_table", error = &e as &dyn std::error::Error,
                  "answers of this connection are not steered");
            None
        }
    }
}

/// Where to connect from and to ([`crate::transparent::Upstream::route`]); for LOCAL
/// the port the balancer connected to is the accepted connection's own.
fn choose_target(
    endpoints: Endpoints,
    conn: &TcpStream,
    proxy: ProxyAddr,
    ctx: &TcpContext,
) -> Result<(Option<ClientAddr>, UpstreamAddr), TargetError> {
    ctx.upstream
        .route(endpoints, proxy, || conn.local_addr().map(|a| a.port()))
}

/// Holds a gauge up for as long as it lives.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> Self {
        Stats::inc(counter);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        Stats::dec(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;
    use crate::proxy_protocol::{DecodeOptions, Invalid};
    use crate::tcp::ConnectOptions;
    use crate::transparent::Upstream;
    use std::net::IpAddr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    struct World {
        ctx: Arc<TcpContext>,
        upstream: TcpListener,
    }

    async fn world(header_timeout: Duration) -> World {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = upstream.local_addr().unwrap().port();
        let ctx = Arc::new(TcpContext {
            upstream: Upstream::loopback(Some(port), Some(port)),
            connect: ConnectOptions {
                mark: 0,
                connect_timeout: Duration::from_secs(2),
            },
            header_timeout,
            header: DecodeOptions::stream(),
            stats: Arc::new(Stats::default()),
        });
        World { ctx, upstream }
    }

    /// Connects a "balancer" to a task running `handle`.
    async fn connect(ctx: &Arc<TcpContext>) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, a) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let (conn, peer) = a.unwrap();
        let task = tokio::spawn(handle(conn, ProxyAddr(peer), ctx.clone()));
        (c.unwrap(), task)
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Whether the balancer's connection was closed by mmproxy (EOF or reset).
    async fn closed_within(c: &mut TcpStream, d: Duration) -> bool {
        let mut b = [0; 1];
        matches!(
            tokio::time::timeout(d, c.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn not_dialled(upstream: &TcpListener) -> bool {
        tokio::time::timeout(Duration::from_millis(100), upstream.accept())
            .await
            .is_err()
    }

    const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

    #[tokio::test]
    async fn header_split_byte_by_byte_then_payload_is_relayed() {
        let w = world(Duration::from_secs(5)).await;
        let (mut c, task) = connect(&w.ctx).await;
        for b in b"PROXY UNKNOWN\r\n" {
            c.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        c.write_all(b"hello").await.unwrap();
        let (mut up, _) = w.upstream.accept().await.unwrap();
        let mut b = [0; 5];
        up.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        up.write_all(b"bye").await.unwrap();
        drop(up);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        drop(c);
        task.await.unwrap();
        let s = &w.ctx.stats;
        assert_eq!(count(&s.tcp_proxied), 1);
        assert_eq!(count(&s.tcp_active), 0);
        assert_eq!(count(&s.bytes_up), 5);
        assert_eq!(count(&s.bytes_down), 3);
        // The header took at least its 14 sleeps; the connect was one observation.
        let (sum, n, _) = s.header_duration.snapshot();
        assert_eq!(n, 1);
        assert!(sum >= 0.028, "{sum}");
        assert_eq!(s.upstream_connect_duration.snapshot().1, 1);
    }

    #[tokio::test]
    async fn header_and_payload_in_one_segment_payload_first() {
        let w = world(Duration::from_secs(5)).await;
        let (mut c, _task) = connect(&w.ctx).await;
        let mut first = V2_LOCAL.to_vec();
        first.extend_from_slice(b"early");
        c.write_all(&first).await.unwrap();
        let (mut up, _) = w.upstream.accept().await.unwrap();
        c.write_all(b"-late").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        up.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-late");
    }

    #[tokio::test]
    async fn invalid_header_closes_without_dialling() {
        let w = world(Duration::from_secs(5)).await;
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\x01\x02\x03\x04",
        ] {
            let (mut c, task) = connect(&w.ctx).await;
            c.write_all(bad).await.unwrap();
            assert!(closed_within(&mut c, Duration::from_secs(2)).await);
            task.await.unwrap();
        }
        assert!(not_dialled(&w.upstream).await);
        let by_kind = |kind: &str| {
            let i = Invalid::KINDS.iter().position(|k| *k == kind).unwrap();
            count(&w.ctx.stats.rejected_invalid_header[i])
        };
        assert_eq!(by_kind("not_proxy_protocol"), 1);
        assert_eq!(by_kind("v1_port_out_of_range"), 1);
        assert_eq!(by_kind("v2_address_too_short"), 1);
        let total: u64 = w.ctx.stats.rejected_invalid_header.iter().map(count).sum();
        assert_eq!(total, 3);
        assert_eq!(count(&w.ctx.stats.tcp_active), 0);
    }

    #[tokio::test]
    async fn silent_connection_is_cut_at_the_header_timeout() {
        let w = world(Duration::from_millis(200)).await;
        let (mut c, task) = connect(&w.ctx).await;
        let start = tokio::time::Instant::now();
        assert!(closed_within(&mut c, Duration::from_secs(2)).await);
        assert!(start.elapsed() >= Duration::from_millis(190));
        task.await.unwrap();
        assert_eq!(count(&w.ctx.stats.rejected_header_timeout), 1);
        assert!(not_dialled(&w.upstream).await);
    }

    #[tokio::test]
    async fn trickling_header_is_cut_at_the_timeout_not_per_read() {
        let w = world(Duration::from_millis(300)).await;
        let (mut c, task) = connect(&w.ctx).await;
        let start = tokio::time::Instant::now();
        let trickle = async {
            for b in b"PROXY TCP4 198.51.100.9 203.0.113.1 40000 443\r\n" {
                if c.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
        task.await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(count(&w.ctx.stats.rejected_header_timeout), 1);
        assert!(not_dialled(&w.upstream).await);
    }

    #[tokio::test]
    async fn eof_inside_the_header_is_counted() {
        let w = world(Duration::from_secs(5)).await;
        let (mut c, task) = connect(&w.ctx).await;
        c.write_all(b"PROXY TCP4 ").await.unwrap();
        drop(c);
        task.await.unwrap();
        assert_eq!(count(&w.ctx.stats.rejected_header_eof), 1);
        assert!(not_dialled(&w.upstream).await);
    }

    #[tokio::test]
    async fn a_reset_inside_the_header_is_a_read_error() {
        let w = world(Duration::from_secs(5)).await;
        let (mut c, task) = connect(&w.ctx).await;
        c.write_all(b"PROXY TCP4 ").await.unwrap();
        // Give the task the bytes first, then reset (SO_LINGER 0).
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        task.await.unwrap();
        assert_eq!(count(&w.ctx.stats.rejected_read_error), 1);
        assert_eq!(count(&w.ctx.stats.rejected_header_eof), 0);
        assert_eq!(w.ctx.stats.header_duration.snapshot().1, 0);
    }

    #[tokio::test]
    async fn refused_upstream_closes_the_client_promptly() {
        let w = world(Duration::from_secs(5)).await;
        drop(w.upstream);
        let (mut c, task) = connect(&w.ctx).await;
        c.write_all(b"PROXY UNKNOWN\r\nhello").await.unwrap();
        assert!(closed_within(&mut c, Duration::from_secs(2)).await);
        task.await.unwrap();
        let failed = &w.ctx.stats.upstream_connect_failed;
        assert_eq!(count(&failed[ConnectFailure::Refused as usize]), 1);
        assert_eq!(failed.iter().map(count).sum::<u64>(), 1);
        assert_eq!(count(&w.ctx.stats.tcp_proxied), 0);
        assert_eq!(w.ctx.stats.upstream_connect_duration.snapshot().1, 0);
    }

    #[test]
    fn target_follows_the_client_family_and_header_port() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = world(Duration::from_secs(1)).await;
            let ctx = Arc::get_mut(&mut w.ctx).unwrap();
            ctx.upstream.targets.v4.port = None;
            let (c, _task) = connect(&w.ctx).await;
            let proxied = |client: &str| Endpoints::Proxied {
                client: ClientAddr(client.parse().unwrap()),
                destination: OrigDstAddr("[2001:db8::1]:8443".parse().unwrap()),
            };
            let proxy = ProxyAddr(c.peer_addr().unwrap());
            let choose = |e| choose_target(e, &c, proxy, &w.ctx).unwrap();
            let (from, to) = choose(proxied("[::ffff:198.51.100.9]:4000"));
            assert!(from.is_some());
            assert_eq!(to.0, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
            let (_, to) = choose(proxied("[2001:db8::9]:4000"));
            assert_eq!(to.0.ip(), "::1".parse::<IpAddr>().unwrap());
        });
    }
}
