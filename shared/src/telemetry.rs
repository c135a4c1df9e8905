//! Logs, metrics and the admin listener shared by every binary.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Sets up `tracing` to stderr. `RUST_LOG` overrides `level`.
pub fn init_tracing(format: LogFormat, level: Option<&str>) {
    let configured = level.unwrap_or("info");
    // rustls warns about every client that bends the handshake (curl, wrk and h2load send
    // an IP address as SNI): that is the client's business, not the node's health, and it
    // would let anyone fill the log. A configured `rustls=…` directive still wins.
    let directives = if configured.contains("rustls") {
        configured.to_owned()
    } else {
        format!("{configured},rustls=error")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the Prometheus recorder; the handle renders `/metrics`.
///
/// Histogram buckets are chosen for what we time: stream durations and request latencies
/// from a millisecond (a cache hit or a nearby origin) to a minute (long downloads);
/// anything longer lands in `+Inf` and is better read from the `_sum`.
pub fn install_metrics() -> Option<PrometheusHandle> {
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .ok()?
        .install_recorder()
        .ok()
}

/// What the admin listener serves besides `/metrics`.
pub trait AdminRoutes: Send + Sync + 'static {
    /// The node's view as JSON, served at `/status`.
    fn status(&self) -> serde_json::Value;
    /// Whether the node is ready to take traffic (`/readyz`).
    fn ready(&self) -> bool;
}

/// Serves the admin API on `listener` until `shutdown`: `/metrics` (Prometheus),
/// `/status` (JSON), `/healthz` (alive), `/readyz` (ready for traffic).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    routes: Arc<dyn AdminRoutes>,
    shutdown: CancellationToken,
) {
    loop {
        let Some((stream, _)) = crate::lifecycle::accept_until(&listener, &shutdown, "admin").await
        else {
            return;
        };
        let metrics = metrics.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(admin_response(&req, metrics.as_ref(), &*routes)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn admin_response(
    req: &Request<hyper::body::Incoming>,
    metrics: Option<&PrometheusHandle>,
    routes: &dyn AdminRoutes,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.map(|m| m.render()).unwrap_or_default(),
        ),
        "/status" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&routes.status()).unwrap_or_default(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if routes.ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    resp
}
