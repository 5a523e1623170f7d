//! The HTTP side of `--metrics`: `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs as one accept task on the daemon's runtime, never on the data path's
//! sockets, and every way a client could hold on to it is bounded ([`Limits`]): a
//! fixed number of connections (more are closed at once rather than queued), a
//! deadline for the request head and one for the whole connection, a cap on the
//! request head's size, one request per connection. A silent, slow or hostile client
//! therefore costs at most a permit and a few KiB until its deadline, and the
//! proxied connections never wait for it. HTTP itself is hyper's (HTTP/1.1 only).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Readiness;

/// What one client may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// From accept to a complete request head.
    pub header_timeout: Duration,
    /// From accept to the connection's end, response included.
    pub connection_timeout: Duration,
    /// Largest request head (hyper's read buffer; at least 8 KiB).
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            max_request_bytes: 16 * 1024,
        }
    }
}

/// OpenMetrics, for scrapers that ask for it in `Accept` (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// Serves until `stop` is cancelled. Connections still open then end with the
/// runtime or their deadline.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    limits: Limits,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(limits.max_request_bytes.max(8192));
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: the data path needs the descriptors more.
                debug!(
                    error = &e as &dyn std::error::Error,
                    "metrics endpoint: accept failed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("metrics endpoint: connection limit reached, closing a new connection");
            continue;
        };
        let (builder, registry, readiness) = (builder.clone(), registry.clone(), readiness.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let response = respond(&req, &registry, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(
                    error = &e as &dyn std::error::Error,
                    "metrics endpoint: connection ended"
                ),
                Err(_) => debug!("metrics endpoint: connection cut at its deadline"),
            }
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => metrics(req, registry),
        "/healthz" => reply(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => reply(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {reason}\n"),
            ),
        },
        "/" => reply(
            StatusCode::OK,
            PLAIN,
            "mmproxy: /metrics /healthz /readyz\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

fn metrics(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let openmetrics = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (content_type, encoded) = if openmetrics {
        (OPENMETRICS, text::encode(&mut body, registry))
    } else {
        (
            prometheus_text::CONTENT_TYPE,
            prometheus_text::encode(&mut body, registry),
        )
    };
    match encoded {
        Ok(()) => reply(StatusCode::OK, content_type, body),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            "encoding the metrics failed\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
