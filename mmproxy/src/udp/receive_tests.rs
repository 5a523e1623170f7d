//! Unit tests of the UDP listener ([`super`]), kept apart so the listener reads on its own.
use super::*;
use crate::proxy_protocol::DecodeOptions;
use crate::proxy_protocol::V2Builder;
use crate::transparent::Upstream;
use std::time::Instant;

fn ctx(port: u16) -> UdpContext {
    UdpContext {
        upstream: Upstream::loopback(Some(port), Some(port)),
        mark: 0,
        idle: Duration::from_secs(1),
        flows_per_listener: 4,
        header: DecodeOptions::datagram(),
        stats: Arc::new(Stats::default()),
        relay: None,
        clock: super::super::Clock::new(),
    }
}

/// The whole listener path without privileges: LOCAL datagrams (no transparent
/// socket needed) relayed to an echo service on loopback and answered from the
/// address the proxy sent to; malformed ones dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_datagrams_are_relayed_and_answered_and_garbage_is_counted() {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut answer = from.to_string().into_bytes();
            answer.push(b'|');
            answer.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&answer, from);
        }
    });
    let ctx = Arc::new(ctx(echo_port));
    let mut sockets = bind_udp("0.0.0.0:0".parse().unwrap(), 1).unwrap();
    let listen = sockets[0].local_addr().unwrap();
    let socket = UdpSocket::from_std(sockets.remove(0)).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_udp(socket, ctx.clone(), |_| true, shutdown.clone()));

    let proxy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Sent to 127.0.0.3: the answer must come from there, not from 127.0.0.1.
    let to = SocketAddr::new("127.0.0.3".parse().unwrap(), listen.port());
    for bad in [
        &b""[..],
        b"PROXY TCP4 198.51.100.1 192.0.2.2 1 2\r\nhi",
        b"garbage",
        &V2Builder::proxy(
            "198.51.100.1:1".parse().unwrap(),
            "192.0.2.2:2".parse().unwrap(),
        )
        .build()
        .unwrap(),
    ] {
        proxy.send_to(bad, to).await.unwrap();
    }
    let mut dgram = V2Builder::local().build().unwrap();
    dgram.extend_from_slice(b"ping");
    proxy.send_to(&dgram, to).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), proxy.recv_from(&mut buf))
        .await
        .expect("answer")
        .unwrap();
    assert_eq!(from, to, "answered from the address the proxy used");
    let text = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(text.ends_with("|ping"), "{text}");
    assert!(
        text.starts_with("127.0.0.1:"),
        "LOCAL comes from the host: {text}"
    );

    // A second LOCAL datagram from the same proxy reuses its flow.
    proxy.send_to(&dgram, to).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), proxy.recv_from(&mut buf))
        .await
        .expect("second answer")
        .unwrap();
    let s = &ctx.stats;
    // The empty datagram is a truncated header; the rest can never be valid.
    assert_eq!(s.udp_dropped_truncated.load(Ordering::Relaxed), 1);
    assert_eq!(s.udp_dropped_invalid.load(Ordering::Relaxed), 3);
    assert_eq!(s.udp_datagrams_sent.load(Ordering::Relaxed), 2);
    assert_eq!(s.udp_flows_created.load(Ordering::Relaxed), 1);
    assert_eq!(s.udp_replies.load(Ordering::Relaxed), 2);
    assert_eq!(s.udp_datagrams.load(Ordering::Relaxed), 6);

    // Idle: the sweep closes the flow within 2 × close-after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.udp_flows_expired.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "flow never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.udp_flows_active.load(Ordering::Relaxed), 0);
    shutdown.cancel();
    task.await.unwrap();
}
