//! `--metrics` end to end: after a known mix of traffic every related series has
//! exactly the expected value (and the SIGUSR1 line agrees), a real scrape passes
//! `promtool check metrics`, a real Prometheus server scrapes mmproxy and answers a
//! query, `/readyz` follows start-up and shutdown, and hostile clients of the
//! endpoint are cut off while proxied traffic keeps flowing.
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{connect, dgram, UdpBalancer};
use mmproxy_tests::client::connect_from;
use mmproxy_tests::daemon::{counter, AllowedFile, Daemon, READY};
use mmproxy_tests::haproxy::TempDir;
use mmproxy_tests::netns::{KillOnDrop, Netns};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::UdpEcho;
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};
/// Where mmproxy serves its metrics, inside the `host` namespace.
const METRICS: &str = "127.0.0.1:9100";
const MM: &str = "192.0.2.2:8443";

/// One HTTP/1.1 GET from inside `ns`: (status, body). A test client only; the
/// server side is hyper's.
fn http_get(ns: &Netns, addr: &str, path: &str, accept: &str) -> Result<(u16, String)> {
    let mut c = connect_from(ns, None, addr, WAIT)??;
    c.set_read_timeout(Some(WAIT))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The Prometheus text format, as the daemon serves it without an Accept preference.
fn scrape_text(ns: &Netns) -> Result<String> {
    let (status, body) = http_get(ns, METRICS, "/metrics", "text/plain")?;
    ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(body)
}

/// Every sample of a scrape: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Scrapes until `series` has `want` (counters settle when connections end).
fn wait_series(ns: &Netns, series: &str, want: f64) -> Result<BTreeMap<String, f64>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = samples(&scrape_text(ns)?);
        if s.get(series) == Some(&want) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            bail!(
                "{series} is {:?}, not {want}, after {WAIT:?}: {s:#?}",
                s.get(series)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn assert_series(s: &BTreeMap<String, f64>, expected: &[(&str, f64)]) {
    for (series, want) in expected {
        assert_eq!(s.get(*series), Some(want), "{series}\n{s:#?}");
    }
}

fn promtool_available(test: &str) -> bool {
    let ok = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: promtool missing (Debian's prometheus; cargo xtask setup installs it)");
        }
        eprintln!("skipping {test}: promtool missing (apt-get install prometheus)");
    }
    ok
}

/// As the balancer (LB_V4): a PROXY v1 header for `client` to `dst_port`.
fn balancer(t: &Topology, client: &str, dst_port: u16) -> Result<TcpStream> {
    let mut c = connect(t, LB_V4, MM)?;
    c.write_all(&encode_v1(
        client.parse()?,
        format!("{HOST_V4}:{dst_port}").parse()?,
    ))?;
    Ok(c)
}

/// Sends `len` bytes through mmproxy and the echo service, reads them back, closes.
fn proxied(t: &Topology, client: &str, len: usize) -> Result<()> {
    let mut c = balancer(t, client, 9000)?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    c.write_all(&data)?;
    c.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back)?;
    ensure!(back == data, "{len} bytes came back as {}", back.len());
    Ok(())
}

/// Reads until the daemon closes the connection (EOF or reset).
fn until_closed(c: &mut TcpStream) -> Result<()> {
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("waiting for the close"),
        }
    }
}

/// The topology, an echo service on port 9000 of both loopbacks, and mmproxy on
/// port 8443 of both families with `--metrics` on [`METRICS`], the kernel side on
/// and only the balancer's own addresses allowed. No target port: the header's
/// destination port is used, so one header can aim at a port nothing listens on.
struct TcpSetup {
    daemon: Daemon,
    _allowed: AllowedFile,
    _echo: EchoServer,
    t: Topology,
}

fn tcp_setup(extra: impl FnOnce(DaemonArgs) -> DaemonArgs) -> Result<TcpSetup> {
    let t = Topology::new()?;
    let echo = EchoServer::start_dual(&t.host, 9000)?;
    let allowed = balancers_only()?;
    let args = DaemonArgs::tcp()
        .listen("0.0.0.0:8443")
        .listen("[::]:8443")
        .target4("127.0.0.1")
        .target6("[::1]")
        .allowed(&allowed)
        .ebpf(Ebpf::On)
        .metrics(METRICS);
    let daemon = Daemon::start(&t.host, &extra(args))?;
    Ok(TcpSetup {
        daemon,
        _allowed: allowed,
        _echo: echo,
        t,
    })
}

fn balancers_only() -> Result<AllowedFile> {
    AllowedFile::new(&format!("{LB_V4}/32\n{LB_V6}/128\n"))
}

#[test]
fn tcp_mix_gives_exact_series_that_the_stats_line_agrees_with_and_promtool_accepts() -> Result<()> {
    require_root!();
    let s = tcp_setup(|a| a.header_timeout(1))?;
    let (t, d) = (&s.t, &s.daemon);

    // N = 3 good connections, 1000 + 2000 + 3000 bytes each way.
    for (i, len) in [1000, 2000, 3000].into_iter().enumerate() {
        proxied(t, &format!("198.51.100.{}:4000{i}", 10 + i), len)?;
    }
    // M = 2 invalid headers, 1 closed inside the header, 1 silent until the timeout.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 not-an-address\r\n",
    ] {
        let mut c = connect(t, LB_V4, MM)?;
        c.set_read_timeout(Some(WAIT))?;
        c.write_all(junk)?;
        until_closed(&mut c)?;
    }
    let mut c = connect(t, LB_V4, MM)?;
    c.write_all(b"PROXY TCP4 198.51")?;
    c.shutdown(Shutdown::Write)?;
    c.set_read_timeout(Some(WAIT))?;
    until_closed(&mut c)?;
    let mut c = connect(t, LB_V4, MM)?;
    c.set_read_timeout(Some(WAIT))?;
    until_closed(&mut c)?;
    // 1 valid header for a port where nothing listens: the upstream connect fails.
    let mut c = balancer(t, "198.51.100.30:5000", 9001)?;
    until_closed(&mut c)?;
    // K = 2 proxies outside the allowed subnets, refused by the kernel.
    for (src, dst) in [
        (LB_OTHER_V4, MM.to_string()),
        (LB_OTHER_V6, format!("[{HOST_V6}]:8443")),
    ] {
        match connect_from(&t.lb, Some(src), &dst, WAIT)? {
            Err(e) => ensure!(e.kind() == ErrorKind::ConnectionRefused, "{src}: {e}"),
            Ok(_) => bail!("{src} was let in"),
        }
    }

    let s = wait_series(&t.host, "mmproxy_tcp_connections_open", 0.0)?;
    assert_series(
        &s,
        &[
            ("mmproxy_ready", 1.0),
            ("mmproxy_tcp_connections_accepted_total", 8.0),
            ("mmproxy_tcp_connections_proxied_total", 3.0),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"not_proxy_protocol\"}",
                1.0,
            ),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"v1_bad_address\"}",
                1.0,
            ),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"header_eof\"}",
                1.0,
            ),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"read_error\"}",
                0.0,
            ),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"header_timeout\"}",
                1.0,
            ),
            (
                "mmproxy_tcp_connections_rejected_total{reason=\"not_allowed\"}",
                0.0,
            ),
            (
                "mmproxy_tcp_upstream_connect_failures_total{error=\"refused\"}",
                1.0,
            ),
            (
                "mmproxy_tcp_upstream_connect_failures_total{error=\"timeout\"}",
                0.0,
            ),
            (
                "mmproxy_tcp_upstream_connect_failures_total{error=\"other\"}",
                0.0,
            ),
            // Four connections sent a complete header; three connected.
            ("mmproxy_tcp_header_duration_seconds_count", 4.0),
            ("mmproxy_tcp_upstream_connect_duration_seconds_count", 3.0),
            ("mmproxy_tcp_pipes_in_use", 0.0),
            ("mmproxy_tcp_relay_errors_total", 0.0),
            (
                "mmproxy_tcp_relayed_bytes_total{direction=\"to_upstream\"}",
                6000.0,
            ),
            (
                "mmproxy_tcp_relayed_bytes_total{direction=\"to_proxy\"}",
                6000.0,
            ),
            ("mmproxy_tcp_connections_open", 0.0),
            ("mmproxy_kernel_refused_total{family=\"ipv4\"}", 1.0),
            ("mmproxy_kernel_refused_total{family=\"ipv6\"}", 1.0),
            ("mmproxy_kernel_steered_total", 0.0),
            (
                "mmproxy_kernel_program_attached{program=\"sk_lookup\"}",
                1.0,
            ),
            // Loopback targets over TCP need no tc program.
            (
                "mmproxy_kernel_program_attached{program=\"tc_egress\"}",
                0.0,
            ),
            (
                "mmproxy_kernel_program_attached{program=\"tc_ingress\"}",
                0.0,
            ),
            ("mmproxy_udp_datagrams_received_total", 0.0),
        ],
    );
    // sk_lookup runs for every SYN it lets through, retransmissions included.
    let allowed_v4 = s
        .get("mmproxy_kernel_allowed_total{family=\"ipv4\"}")
        .copied()
        .unwrap_or_default();
    assert!(allowed_v4 >= 8.0, "{s:#?}");

    // One source of truth: the SIGUSR1 line reads the same counters.
    let line = d.stats()?;
    let sum_of = |prefix: &str| -> f64 {
        s.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    // Every invalid-header kind is its own reason; the line has their total.
    let invalid = sum_of("mmproxy_tcp_connections_rejected_total")
        - ["not_allowed", "header_timeout", "header_eof", "read_error"]
            .iter()
            .map(|r| {
                s.get(&format!(
                    "mmproxy_tcp_connections_rejected_total{{reason=\"{r}\"}}"
                ))
                .copied()
                .unwrap_or_default()
            })
            .sum::<f64>();
    assert_eq!(
        counter(&line, "rejected_invalid_header") as f64,
        invalid,
        "{line}"
    );
    assert_eq!(invalid, 2.0);
    assert_eq!(
        counter(&line, "upstream_connect_failed") as f64,
        sum_of("mmproxy_tcp_upstream_connect_failures_total"),
        "{line}"
    );
    for (name, series) in [
        ("tcp_accepted", "mmproxy_tcp_connections_accepted_total"),
        ("tcp_proxied", "mmproxy_tcp_connections_proxied_total"),
        (
            "bytes_up",
            "mmproxy_tcp_relayed_bytes_total{direction=\"to_upstream\"}",
        ),
        (
            "bytes_down",
            "mmproxy_tcp_relayed_bytes_total{direction=\"to_proxy\"}",
        ),
        (
            "rejected_header_eof",
            "mmproxy_tcp_connections_rejected_total{reason=\"header_eof\"}",
        ),
        (
            "kernel_refused_v4",
            "mmproxy_kernel_refused_total{family=\"ipv4\"}",
        ),
        (
            "kernel_refused_v6",
            "mmproxy_kernel_refused_total{family=\"ipv6\"}",
        ),
    ] {
        assert_eq!(
            Some(counter(&line, name) as f64),
            s.get(series).copied(),
            "{name}: {line}"
        );
    }

    // promtool's linter on a real scrape.
    if promtool_available("promtool check metrics") {
        let text = scrape_text(&t.host)?;
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        promtool
            .stdin
            .take()
            .context("promtool's stdin")?
            .write_all(text.as_bytes())?;
        let out = promtool.wait_with_output()?;
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // OpenMetrics when asked for.
    let (status, body) = http_get(
        &t.host,
        METRICS,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )?;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("mmproxy_tcp_connections_proxied_total 3\n"),
        "{body}"
    );
    Ok(())
}

#[test]
fn udp_mix_gives_exact_series() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = UdpEcho::start_dual(&t.host, 9000)?;
    let allowed = balancers_only()?;
    let d = Daemon::start(
        &t.host,
        &DaemonArgs::udp()
            .listen("0.0.0.0:8443")
            .target4("127.0.0.1:9000")
            .target6("[::1]:9000")
            .allowed(&allowed)
            .ebpf(Ebpf::On)
            .max_flows(100)
            .metrics(METRICS),
    )?;
    let mm: SocketAddr = MM.parse()?;
    let lb = UdpBalancer::new(&t, LB_V4)?;

    // U = 5 good datagrams from two clients (two flows), each answered.
    let clients: [SocketAddr; 2] = ["198.51.100.40:6000".parse()?, "198.51.100.41:6001".parse()?];
    for i in 0..5 {
        lb.roundtrip(clients[i % 2], mm, format!("datagram {i}").as_bytes())?;
    }
    // 2 malformed: a v1 header (UDP takes v2 DGRAM only) and junk.
    lb.send(&encode_v1(clients[0], mm), b"", mm)?;
    lb.send(b"no header at all", b"", mm)?;
    // 1 from a proxy outside the allowed subnets: dropped by sk_lookup.
    UdpBalancer::new(&t, LB_OTHER_V4)?.send(&dgram(clients[0], mm), b"refused", mm)?;

    // Under `--udp-datapath kernel` the flows' later datagrams and answers never
    // reach user space: its series count the rest (the stats line has the
    // kernel's share, final once the answers are in).
    let line = d.stats()?;
    let kernel_in = counter(&line, "kernel_udp_relayed_in") as f64;
    let kernel_out = counter(&line, "kernel_udp_relayed_out") as f64;
    let received = 7.0 - kernel_in;
    let _ = wait_series(&t.host, "mmproxy_udp_datagrams_received_total", received)?;
    let _ = wait_series(
        &t.host,
        "mmproxy_udp_answers_relayed_total",
        5.0 - kernel_out,
    )?;
    let s = wait_series(
        &t.host,
        "mmproxy_kernel_refused_total{family=\"ipv4\"}",
        1.0,
    )?;
    assert_series(
        &s,
        &[
            ("mmproxy_udp_datagrams_received_total", received),
            (
                "mmproxy_udp_datagrams_dropped_total{reason=\"invalid_header\"}",
                2.0,
            ),
            (
                "mmproxy_udp_datagrams_dropped_total{reason=\"not_allowed\"}",
                0.0,
            ),
            (
                "mmproxy_udp_datagrams_dropped_total{reason=\"upstream_error\"}",
                0.0,
            ),
            (
                "mmproxy_udp_datagrams_dropped_total{reason=\"truncated\"}",
                0.0,
            ),
            (
                "mmproxy_udp_datagrams_dropped_total{reason=\"no_source\"}",
                0.0,
            ),
            ("mmproxy_udp_datagrams_sent_total", 5.0 - kernel_in),
            ("mmproxy_udp_answers_relayed_total", 5.0 - kernel_out),
            (
                "mmproxy_udp_answers_dropped_total{reason=\"foreign_port\"}",
                0.0,
            ),
            ("mmproxy_udp_flows_opened_total", 2.0),
            ("mmproxy_udp_flows_open", 2.0),
            ("mmproxy_udp_flows_max", 100.0),
            ("mmproxy_udp_flows_evicted_total", 0.0),
            ("mmproxy_kernel_refused_total{family=\"ipv4\"}", 1.0),
            ("mmproxy_kernel_refused_total{family=\"ipv6\"}", 0.0),
            ("mmproxy_tcp_connections_accepted_total", 0.0),
        ],
    );
    Ok(())
}

#[test]
fn a_real_prometheus_server_scrapes_mmproxy_and_answers_a_query() -> Result<()> {
    require_root!();
    if !promtool_available("a_real_prometheus_server_scrapes_mmproxy_and_answers_a_query") {
        return Ok(());
    }
    let s = tcp_setup(|a| a)?;
    let t = &s.t;
    for i in 0..4 {
        proxied(t, &format!("198.51.100.50:700{i}"), 100)?;
    }

    let dir = TempDir::new("prometheus")?;
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mmproxy\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )?;
    let api = "127.0.0.1:9090";
    let mut cmd = t.host.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address={api}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _prometheus = KillOnDrop(cmd.spawn().context("starting prometheus")?);

    // The query API answers once the server is up and has scraped.
    let query =
        "/api/v1/query?query=mmproxy_tcp_connections_proxied_total%7Bjob%3D%22mmproxy%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let answer = http_get(&t.host, api, query, "application/json");
        if let Ok((200, body)) = &answer {
            let json: serde_json::Value = serde_json::from_str(body)?;
            let value = json["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned);
            if value.as_deref() == Some("4") {
                break body.clone();
            }
        }
        if Instant::now() >= deadline {
            bail!("Prometheus never returned 4 for the query: {answer:?}");
        }
        thread::sleep(Duration::from_millis(250));
    };
    assert!(last.contains("\"status\":\"success\""), "{last}");
    // The target is up as Prometheus sees it.
    let (_, up) = http_get(
        &t.host,
        api,
        "/api/v1/query?query=up%7Bjob%3D%22mmproxy%22%7D",
        "*/*",
    )?;
    assert!(up.contains("\"1\"]"), "{up}");
    Ok(())
}

#[test]
fn readyz_follows_start_up_and_shutdown_grace_and_healthz_answers_throughout() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let _echo = EchoServer::start_dual(&t.host, 9000)?;
    // The allow-list is a FIFO: start-up waits on it, with the endpoint already up,
    // until the test writes the list.
    let dir = TempDir::new("fifo")?;
    let fifo = dir.0.join("allowed.txt");
    let status = Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(status.success(), "mkfifo failed");
    let mut d = Daemon::spawn(
        &t.host,
        &DaemonArgs::tcp()
            .listen("0.0.0.0:8443")
            .target4("127.0.0.1:9000")
            .target6("[::1]:9000")
            .allowed(&fifo)
            .metrics(METRICS)
            .shutdown_grace(4),
    )?;
    d.wait_for("metrics: http://", WAIT)
        .with_context(|| d.log_text())?;

    assert_eq!(
        http_get(&t.host, METRICS, "/readyz", "*/*").with_context(|| d.log_text())?,
        (503, "not ready: starting up\n".into())
    );
    assert_eq!(
        http_get(&t.host, METRICS, "/healthz", "*/*")?,
        (200, "ok\n".into())
    );
    assert_eq!(
        samples(&scrape_text(&t.host)?).get("mmproxy_ready"),
        Some(&0.0)
    );
    ensure!(
        d.wait_for(READY, Duration::ZERO).is_err(),
        "ready before its allow-list"
    );

    std::fs::write(&fifo, format!("{LB_V4}/32\n"))?;
    d.wait_for(READY, WAIT).with_context(|| d.log_text())?;
    assert_eq!(
        http_get(&t.host, METRICS, "/readyz", "*/*").with_context(|| d.log_text())?,
        (200, "ready\n".into())
    );
    assert_eq!(
        samples(&scrape_text(&t.host)?).get("mmproxy_ready"),
        Some(&1.0)
    );

    // A live connection holds the daemon in its shutdown grace (to its end: the
    // return-path routing is removed at SIGTERM, so the connection cannot finish).
    let mut live = balancer(&t, "198.51.100.60:8000", 9000)?;
    live.write_all(b"before")?;
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).context("echo before SIGTERM")?;
    d.signal(libc::SIGTERM);
    d.wait_for("stopping", WAIT)?;
    assert_eq!(
        http_get(&t.host, METRICS, "/readyz", "*/*").with_context(|| d.log_text())?,
        (503, "not ready: shutting down\n".into())
    );
    assert_eq!(
        http_get(&t.host, METRICS, "/healthz", "*/*")?,
        (200, "ok\n".into())
    );
    drop(live);
    let status = d.wait_exit(WAIT)?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn silent_and_junk_sending_metrics_clients_are_cut_off_while_proxied_traffic_flows() -> Result<()> {
    require_root!();
    let s = tcp_setup(|a| a)?;
    let t = &s.t;

    // Proxied round trips for `window`: (count, slowest).
    let traffic = |window: Duration| -> Result<(u32, Duration)> {
        let (mut n, mut slowest) = (0, Duration::ZERO);
        let end = Instant::now() + window;
        while Instant::now() < end {
            let start = Instant::now();
            proxied(t, &format!("198.51.100.70:{}", 10_000 + n), 512)?;
            slowest = slowest.max(start.elapsed());
            n += 1;
        }
        Ok((n, slowest))
    };
    let (baseline, _) = traffic(Duration::from_secs(2))?;

    let attack_start = Instant::now();
    // 32 silent clients: twice the endpoint's connection limit.
    let mut silent = Vec::new();
    for _ in 0..32 {
        let c = connect_from(&t.host, None, METRICS, WAIT)??;
        c.set_read_timeout(Some(Duration::from_secs(15)))?;
        silent.push(c);
    }
    // 4 clients each sending 1 MiB of junk.
    let mut junk = Vec::new();
    for _ in 0..4 {
        let mut c = connect_from(&t.host, None, METRICS, WAIT)??;
        c.set_read_timeout(Some(Duration::from_secs(15)))?;
        c.set_write_timeout(Some(Duration::from_secs(15)))?;
        junk.push(thread::spawn(move || -> Result<()> {
            // The write fails once the server has given up on the connection.
            let _ = c.write_all(&vec![b'x'; 1 << 20]);
            until_closed(&mut c)
        }));
    }
    let (during, slowest) = traffic(Duration::from_secs(2))?;

    for j in junk {
        j.join()
            .map_err(|_| anyhow::anyhow!("junk sender panicked"))??;
    }
    for c in &mut silent {
        until_closed(c)?;
    }
    // The endpoint's deadlines are 5 s for a request head, 10 s in all.
    let cut_after = attack_start.elapsed();
    assert!(
        cut_after < Duration::from_secs(12),
        "silent clients held for {cut_after:?}"
    );
    assert!(
        during * 4 >= baseline && slowest < Duration::from_secs(1),
        "proxied round trips in 2 s: {baseline} before, {during} during the attack (slowest {slowest:?})"
    );
    // And the endpoint serves again.
    assert_eq!(http_get(&t.host, METRICS, "/healthz", "*/*")?.0, 200);
    Ok(())
}
