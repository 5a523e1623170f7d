use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::metrics::http::Limits;
use crate::proxy_protocol::Invalid;

struct FakeKernel;

impl KernelView for FakeKernel {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name(), 10 + i as u64))
            .collect()
    }

    fn attached(&self) -> Vec<(&'static str, bool)> {
        vec![
            (program_names::SK_LOOKUP, true),
            (program_names::TC_EGRESS, true),
            (program_names::TC_INGRESS, false),
        ]
    }

    fn return_interfaces(&self) -> [u64; 2] {
        [1, 0]
    }
}

fn args(extra: &[&str]) -> Args {
    let mut v = vec!["mmproxy"];
    v.extend_from_slice(extra);
    Args::try_from_iter(v).unwrap_or_else(|e| panic!("{extra:?}: {e}"))
}

fn collector(extra: &[&str]) -> (Arc<Metrics>, Arc<Stats>, Arc<Readiness>) {
    let stats = Arc::new(Stats::default());
    let readiness = Arc::new(Readiness::new("starting up"));
    let m = Arc::new(Metrics::new(&args(extra), stats.clone(), readiness.clone()));
    (m, stats, readiness)
}

fn scrape(m: &Arc<Metrics>) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry())
        .unwrap_or_else(|e| panic!("{e}"));
    out
}

/// The value of one series (`name{labels}` exactly as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn every_stats_counter_is_exported_under_its_metric_name() {
    let (m, s, _) = collector(&[]);
    let set = |c: &AtomicU64, v| c.store(v, Ordering::Relaxed);
    set(&s.tcp_accepted, 11);
    set(&s.tcp_proxied, 7);
    set(&s.tcp_active, 2);
    set(&s.accept_errors, 1);
    set(&s.rejected_not_allowed, 3);
    s.invalid_header(&Invalid::NotProxyProtocol);
    for _ in 0..3 {
        s.invalid_header(&Invalid::V1NoCrlf);
    }
    set(&s.rejected_read_error, 30);
    set(&s.rejected_header_timeout, 5);
    set(&s.rejected_header_eof, 6);
    for (i, c) in s.upstream_connect_failed.iter().enumerate() {
        set(c, 1 + i as u64);
    }
    set(&s.udp_dropped_oversized, 31);
    set(&s.udp_dropped_truncated, 32);
    set(&s.udp_dropped_no_source, 33);
    set(&s.udp_datagrams_sent, 34);
    set(&s.relay_errors, 9);
    set(&s.bytes_up, 1000);
    set(&s.bytes_down, 2000);
    set(&s.udp_datagrams, 20);
    set(&s.udp_dropped_invalid, 21);
    set(&s.udp_flows_created, 22);
    set(&s.udp_flows_expired, 23);
    set(&s.udp_flows_evicted, 24);
    set(&s.udp_upstream_errors, 25);
    set(&s.udp_flows_active, 26);
    set(&s.udp_replies, 27);
    set(&s.udp_replies_foreign, 28);
    set(&s.udp_reply_errors, 29);
    set(&s.return_path_evaluations, 35);
    set(&s.return_path_updates, 36);
    set(&s.return_path_errors, 37);
    set(&s.udp_kernel_refused, 38);
    set(&s.udp_kernel_released, 39);
    let text = scrape(&m);
    for (series, want) in [
        ("mmproxy_tcp_connections_accepted_total", 11.0),
        ("mmproxy_tcp_connections_proxied_total", 7.0),
        ("mmproxy_tcp_connections_open", 2.0),
        ("mmproxy_tcp_accept_errors_total", 1.0),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"not_allowed\"}",
            3.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"not_proxy_protocol\"}",
            1.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"v1_no_crlf\"}",
            3.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"v2_crc32c_mismatch\"}",
            0.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"read_error\"}",
            30.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"header_timeout\"}",
            5.0,
        ),
        (
            "mmproxy_tcp_connections_rejected_total{reason=\"header_eof\"}",
            6.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"refused\"}",
            1.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"timeout\"}",
            2.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"host_unreachable\"}",
            3.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"net_unreachable\"}",
            4.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"addr_in_use\"}",
            5.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"permission\"}",
            6.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_failures_total{error=\"other\"}",
            7.0,
        ),
        ("mmproxy_tcp_pipes_in_use", 0.0),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"oversized\"}",
            31.0,
        ),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"truncated\"}",
            32.0,
        ),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"no_source\"}",
            33.0,
        ),
        ("mmproxy_udp_datagrams_sent_total", 34.0),
        ("mmproxy_tcp_relay_errors_total", 9.0),
        (
            "mmproxy_tcp_relayed_bytes_total{direction=\"to_upstream\"}",
            1000.0,
        ),
        (
            "mmproxy_tcp_relayed_bytes_total{direction=\"to_proxy\"}",
            2000.0,
        ),
        ("mmproxy_tcp_connections_max", 10_000.0),
        ("mmproxy_udp_datagrams_received_total", 20.0),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"not_allowed\"}",
            0.0,
        ),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"invalid_header\"}",
            21.0,
        ),
        (
            "mmproxy_udp_datagrams_dropped_total{reason=\"upstream_error\"}",
            25.0,
        ),
        ("mmproxy_udp_flows_opened_total", 22.0),
        ("mmproxy_udp_flows_expired_total", 23.0),
        ("mmproxy_udp_flows_evicted_total", 24.0),
        ("mmproxy_udp_flows_open", 26.0),
        ("mmproxy_udp_flows_max", 65_536.0),
        ("mmproxy_udp_answers_relayed_total", 27.0),
        (
            "mmproxy_udp_answers_dropped_total{reason=\"foreign_port\"}",
            28.0,
        ),
        (
            "mmproxy_udp_answers_dropped_total{reason=\"send_error\"}",
            29.0,
        ),
        ("mmproxy_ready", 0.0),
        ("mmproxy_return_path_evaluations_total", 35.0),
        ("mmproxy_return_path_updates_total", 36.0),
        ("mmproxy_return_path_errors_total", 37.0),
        ("mmproxy_udp_flows_kernel_refused_total", 38.0),
        ("mmproxy_udp_flows_kernel_released_total", 39.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
    }
    // Every Stats counter has a home: the sum of what is exported covers them all.
    let exported: u64 = s.snapshot().iter().map(|(_, v)| v).sum();
    let invalid = 4;
    let failed = 1 + 2 + 3 + 4 + 5 + 6 + 7;
    assert_eq!(
        exported,
        11 + 7
            + 2
            + 1
            + 3
            + invalid
            + 5
            + 6
            + 30
            + failed
            + 9
            + 3000
            + 20
            + 21
            + 31
            + 32
            + 33
            + 34
            + 22
            + 23
            + 24
            + 25
            + 26
            + 27
            + 28
            + 29
            + 35
            + 36
            + 37
            + 38
            + 39
    );
    assert_eq!(s.snapshot().len(), 32, "a new Stats counter needs a metric");
}

#[test]
fn every_header_error_kind_is_a_reason_and_histograms_are_encoded() {
    let (m, s, _) = collector(&[]);
    s.header_duration.observe(Duration::from_micros(300));
    s.header_duration.observe(Duration::from_millis(30));
    s.upstream_connect_duration.observe(Duration::from_secs(9));
    let text = scrape(&m);
    for kind in Invalid::KINDS {
        let series = format!("mmproxy_tcp_connections_rejected_total{{reason=\"{kind}\"}}");
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    for (series, want) in [
        ("mmproxy_tcp_header_duration_seconds_count", 2.0),
        ("mmproxy_tcp_header_duration_seconds_sum", 0.0303),
        (
            "mmproxy_tcp_header_duration_seconds_bucket{le=\"0.0005\"}",
            1.0,
        ),
        (
            "mmproxy_tcp_header_duration_seconds_bucket{le=\"0.025\"}",
            1.0,
        ),
        (
            "mmproxy_tcp_header_duration_seconds_bucket{le=\"0.05\"}",
            2.0,
        ),
        (
            "mmproxy_tcp_header_duration_seconds_bucket{le=\"+Inf\"}",
            2.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_duration_seconds_bucket{le=\"5\"}",
            0.0,
        ),
        (
            "mmproxy_tcp_upstream_connect_duration_seconds_bucket{le=\"+Inf\"}",
            1.0,
        ),
        ("mmproxy_tcp_upstream_connect_duration_seconds_count", 1.0),
    ] {
        let got = value(&text, series).unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-9, "{series}: {got}\n{text}");
    }
}

#[test]
fn not_allowed_is_counted_under_the_protocol_that_runs() {
    let (m, s, _) = collector(&["-p", "udp", "--max-flows", "100"]);
    Stats::add(&s.rejected_not_allowed, 4);
    let text = scrape(&m);
    assert_eq!(
        value(
            &text,
            "mmproxy_udp_datagrams_dropped_total{reason=\"not_allowed\"}"
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &text,
            "mmproxy_tcp_connections_rejected_total{reason=\"not_allowed\"}"
        ),
        Some(0.0)
    );
    assert_eq!(value(&text, "mmproxy_udp_flows_max"), Some(100.0));
}

/// The UDP kernel datapath's counters, each from its own kernel counter (the fake
/// numbers them 10 + its index).
#[test]
fn udp_kernel_datapath_counters_by_direction_and_reason() {
    let (m, stats, _) = collector(&["-p", "udp"]);
    let kernel: Arc<dyn KernelView> = Arc::new(FakeKernel);
    m.set_kernel(Arc::downgrade(&kernel));
    stats.udp_kernel_released.store(5, Ordering::Relaxed);
    let text = scrape(&m);
    let at = |c: Counter| Some(10.0 + Counter::ALL.iter().position(|x| *x == c).unwrap() as f64);
    for (series, want) in [
        (
            "mmproxy_kernel_udp_relayed_total{direction=\"in\"}",
            at(Counter::UdpRelayedIn),
        ),
        (
            "mmproxy_kernel_udp_relayed_total{direction=\"out\"}",
            at(Counter::UdpRelayedOut),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"no_flow\"}",
            at(Counter::UdpPuntedNoFlow),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"header\"}",
            at(Counter::UdpPuntedHeader),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"packet\"}",
            at(Counter::UdpPuntedPacket),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"mtu\"}",
            at(Counter::UdpPuntedMtu),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"not_allowed\"}",
            at(Counter::UdpPuntedNotAllowed),
        ),
        (
            "mmproxy_kernel_udp_punted_total{reason=\"held\"}",
            at(Counter::UdpPuntedHeld),
        ),
        (
            "mmproxy_kernel_udp_relay_failures_total",
            at(Counter::UdpRelayFailed),
        ),
        ("mmproxy_udp_flows_kernel_released_total", Some(5.0)),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
}

#[test]
fn kernel_counters_are_read_at_scrape_time_and_vanish_with_the_kernel_side() {
    let (m, _, _) = collector(&[]);
    let text = scrape(&m);
    assert!(!text.contains("mmproxy_kernel_refused_total"), "{text}");
    assert_eq!(
        value(
            &text,
            "mmproxy_kernel_program_attached{program=\"sk_lookup\"}"
        ),
        Some(0.0)
    );

    let kernel: Arc<dyn KernelView> = Arc::new(FakeKernel);
    m.set_kernel(Arc::downgrade(&kernel));
    let text = scrape(&m);
    for (series, want) in [
        ("mmproxy_kernel_refused_total{family=\"ipv4\"}", 10.0),
        ("mmproxy_kernel_refused_total{family=\"ipv6\"}", 11.0),
        ("mmproxy_kernel_allowed_total{family=\"ipv4\"}", 12.0),
        ("mmproxy_kernel_allowed_total{family=\"ipv6\"}", 13.0),
        ("mmproxy_kernel_steered_total", 14.0),
        ("mmproxy_kernel_steer_failures_total", 15.0),
        (
            "mmproxy_kernel_return_packets_total{action=\"marked\"}",
            16.0,
        ),
        (
            "mmproxy_kernel_return_packets_total{action=\"redirected\"}",
            17.0,
        ),
        ("mmproxy_kernel_own_upstream_total", 18.0),
        (
            "mmproxy_kernel_program_attached{program=\"sk_lookup\"}",
            1.0,
        ),
        (
            "mmproxy_kernel_program_attached{program=\"tc_egress\"}",
            1.0,
        ),
        (
            "mmproxy_kernel_program_attached{program=\"tc_ingress\"}",
            0.0,
        ),
        ("mmproxy_return_path_interfaces{direction=\"egress\"}", 1.0),
        ("mmproxy_return_path_interfaces{direction=\"ingress\"}", 0.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
    }

    // The daemon drops the kernel side at shutdown: the metrics do not keep it alive.
    drop(kernel);
    let text = scrape(&m);
    assert!(!text.contains("mmproxy_kernel_refused_total"), "{text}");
}

#[test]
fn build_info_start_time_and_readiness() {
    let (m, _, readiness) = collector(&[]);
    let text = scrape(&m);
    let info = format!(
        "mmproxy_build_info{{version=\"{}\",commit=\"{COMMIT}\",bpf_embedded=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        cfg!(mmproxy_bpf_object)
    );
    assert_eq!(value(&text, &info), Some(1.0), "{text}");
    let started = value(&text, "mmproxy_start_time_seconds").unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    assert!(now - started < 60.0 && started <= now, "{started} vs {now}");

    assert_eq!(readiness.check(), Err("starting up".to_owned()));
    readiness.set_ready();
    assert_eq!(readiness.check(), Ok(()));
    assert_eq!(value(&scrape(&m), "mmproxy_ready"), Some(1.0));
    readiness.set_not_ready("shutting down");
    assert_eq!(readiness.check(), Err("shutting down".to_owned()));
}

#[test]
fn names_follow_the_conventions_and_the_readme_lists_every_metric() {
    let (m, _, _) = collector(&[]);
    let kernel: Arc<dyn KernelView> = Arc::new(FakeKernel);
    m.set_kernel(Arc::downgrade(&kernel));
    let text = scrape(&m);
    let readme = include_str!("../../../README.md");
    let mut types = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split(' ').skip(2);
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("{line}");
        };
        types += 1;
        assert!(name.starts_with("mmproxy_"), "{name}");
        assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
        assert!(
            readme.contains(&format!("`{name}`")),
            "README's metrics table lacks {name}"
        );
    }
    assert!(types >= 25, "{text}");
}

#[test]
fn openmetrics_is_what_the_scraper_asks_for() {
    let (m, _, _) = collector(&[]);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.ends_with("# EOF\n"), "{out}");
    assert!(out.contains("# TYPE mmproxy_build info"), "{out}");
}

#[test]
fn a_metrics_port_inside_a_tcp_listen_range_is_refused() {
    let a = args(&["-l", "0.0.0.0:9000-9999"]);
    assert!(check_listen_ranges(
        &a,
        "127.0.0.1:9100".parse().unwrap_or_else(|e| panic!("{e}"))
    )
    .is_err());
    assert!(check_listen_ranges(
        &a,
        "127.0.0.1:8000".parse().unwrap_or_else(|e| panic!("{e}"))
    )
    .is_ok());
    let a = args(&["-l", "192.0.2.2:9000-9999"]);
    assert!(check_listen_ranges(
        &a,
        "127.0.0.1:9100".parse().unwrap_or_else(|e| panic!("{e}"))
    )
    .is_ok());
    let a = args(&["-p", "udp", "-l", "0.0.0.0:9000-9999"]);
    assert!(check_listen_ranges(
        &a,
        "127.0.0.1:9100".parse().unwrap_or_else(|e| panic!("{e}"))
    )
    .is_ok());
}

// --- the HTTP endpoint ---

struct Server {
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(limits: Limits) -> Server {
    let (m, _, readiness) = collector(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let stop = CancellationToken::new();
    tokio::spawn(http::serve(
        listener,
        Arc::new(m.registry()),
        readiness.clone(),
        limits,
        stop.clone(),
    ));
    Server {
        addr,
        readiness,
        stop,
    }
}

/// Sends `request` and returns everything until the server closes.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str, accept: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n")
}

/// Waits until the server closes `c` (EOF or reset); how long that took.
async fn closed_after(c: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn endpoint_paths_status_codes_and_content_types() {
    let s = server(Limits::default()).await;
    let r = exchange(s.addr, &get("/metrics", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
    assert!(
        r.contains("mmproxy_tcp_connections_accepted_total 0"),
        "{r}"
    );
    let r = exchange(
        s.addr,
        &get(
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ),
    )
    .await;
    assert!(
        r.contains("content-type: application/openmetrics-text"),
        "{r}"
    );
    assert!(r.ends_with("# EOF\n"), "{r}");

    let r = exchange(s.addr, &get("/readyz", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.ends_with("not ready: starting up\n"), "{r}");
    s.readiness.set_ready();
    let r = exchange(s.addr, &get("/readyz", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = exchange(s.addr, &get("/healthz", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
    let r = exchange(s.addr, &get("/nope", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = exchange(
        s.addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 405") && r.contains("allow: GET, HEAD"),
        "{r}"
    );
}

#[tokio::test]
async fn a_silent_client_is_cut_at_the_header_deadline() {
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let s = server(limits).await;
    let mut c = TcpStream::connect(s.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let took = closed_after(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // A client trickling an incomplete head fares no better.
    let mut c = TcpStream::connect(s.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    for _ in 0..3 {
        if c.write_all(b"GET /metrics HTTP/1.1\r\nX: y\r\n")
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    closed_after(&mut c, Duration::from_secs(5)).await;
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_mebibyte_of_junk_is_refused_without_reading_it_all() {
    let s = server(Limits::default()).await;
    for junk in [
        vec![b'x'; 1 << 20],
        // A valid start whose head never ends.
        [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 1 << 20]].concat(),
    ] {
        let mut c = TcpStream::connect(s.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (mut rd, mut wr) = c.split();
        // The write fails (reset) or completes into the socket buffers; either way
        // the server closes the connection soon after, with a 4xx at most.
        let (_, answer) = tokio::join!(
            async { tokio::time::timeout(Duration::from_secs(5), wr.write_all(&junk)).await },
            async {
                let mut out = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
                out
            }
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
        drop(c);
    }
    // And the endpoint still answers.
    let r = exchange(s.addr, &get("/healthz", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let s = server(limits).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            TcpStream::connect(s.addr)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    // Let the server take both permits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(s.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let took = closed_after(&mut extra, Duration::from_secs(1)).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Once the silent ones are cut, the endpoint serves again.
    for c in &mut held {
        closed_after(c, Duration::from_secs(5)).await;
    }
    let r = exchange(s.addr, &get("/healthz", "*/*")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
