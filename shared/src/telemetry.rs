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
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = rust_log()
        .and_then(|v| EnvFilter::try_new(directives(Some(&v))).ok())
        .or_else(|| EnvFilter::try_new(directives(level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info,rustls=error"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    if installed.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// `RUST_LOG`, unless unset or empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// The filter of the installed subscriber, for [`set_log_level`].
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// The filter directives for a configured `level` (default `info`).
fn directives(level: Option<&str>) -> String {
    let configured = level.unwrap_or("info");
    // rustls warns about every client that bends the handshake (curl, wrk and h2load send
    // an IP address as SNI): that is the client's business, not the node's health, and it
    // would let anyone fill the log. A configured (or `RUST_LOG`) `rustls=…` directive
    // still wins.
    if configured.contains("rustls") {
        configured.to_owned()
    } else {
        format!("{configured},rustls=error")
    }
}

/// Checks a `[log] level` filter: the reason it is not one, if it is not.
pub fn check_log_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(directives(Some(level)))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Switches the running node's log filter to `level` (a config reload). `RUST_LOG`, when
/// set, keeps winning, as it did at start. `Ok(false)`: nothing to change.
pub fn set_log_level(level: Option<&str>) -> Result<bool, String> {
    if rust_log().is_some() {
        return Ok(false);
    }
    let filter = EnvFilter::try_new(directives(level)).map_err(|e| e.to_string())?;
    let Some(handle) = LOG_FILTER.get() else {
        return Ok(false);
    };
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Installs the Prometheus recorder (the handle renders `/metrics`) and its upkeep task;
/// call it inside the runtime.
///
/// Histogram buckets are chosen for what we time: stream durations and request latencies
/// from a millisecond (a cache hit or a nearby origin) to a minute (long downloads);
/// anything longer lands in `+Inf` and is better read from the `_sum`.
pub fn install_metrics() -> Option<PrometheusHandle> {
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .ok()?
        .install_recorder()
        .ok()?;
    // Histogram samples wait in the recorder until they are folded into buckets: by a
    // scrape, or by upkeep. Without it an edge nobody scrapes would keep every request's
    // sample, and grow without bound.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

/// How often histogram samples are folded into their buckets.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// What the admin listener serves besides `/metrics`.
pub trait AdminRoutes: Send + Sync + 'static {
    /// The node's view as JSON, served at `/status`.
    fn status(&self) -> serde_json::Value;
    /// Whether the node is ready to take traffic (`/readyz`).
    fn ready(&self) -> bool;
    /// An operator action: `POST <path>` with a JSON body. `None`: no such action (404);
    /// `Err`: the action was refused, with the reason (400).
    fn action(&self, path: &str, body: &[u8]) -> Option<Result<serde_json::Value, String>> {
        let _ = (path, body);
        None
    }
}

/// Largest body of an admin action.
const MAX_ACTION_BODY: usize = 64 * 1024;

/// Serves the admin API on `listener` until `shutdown`: the status page (`/`, HTML),
/// `/metrics` (Prometheus), `/status` (JSON), `/healthz` (alive), `/readyz` (ready for
/// traffic), and `POST` actions. With a `token`, every request but the page, `/healthz`
/// and `/readyz` must carry `Authorization: Bearer <token>`.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    routes: Arc<dyn AdminRoutes>,
    token: Option<crate::config::Secret>,
    shutdown: CancellationToken,
) {
    let token = Arc::new(token);
    loop {
        let Some((stream, _)) = crate::lifecycle::accept_until(&listener, &shutdown, "admin").await
        else {
            return;
        };
        let metrics = metrics.clone();
        let routes = routes.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let routes = routes.clone();
                let token = token.clone();
                async move {
                    Ok::<_, Infallible>(
                        admin_response(req, metrics.as_ref(), &*routes, token.as_ref().as_ref())
                            .await,
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            // An admin client gets a minute per connection: nothing here streams.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

/// Whether `req` carries `token` (compared in constant time).
fn authorised(req: &Request<hyper::body::Incoming>, token: &crate::config::Secret) -> bool {
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.0.len()
        && given
            .iter()
            .zip(&token.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn text(status: StatusCode, body: &str) -> (StatusCode, &'static str, String) {
    (status, "text/plain", format!("{body}\n"))
}

async fn admin_response(
    req: Request<hyper::body::Incoming>,
    metrics: Option<&PrometheusHandle>,
    routes: &dyn AdminRoutes,
    token: Option<&crate::config::Secret>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let path = req.uri().path().to_owned();
    // The status page holds no data (its script asks `/status` for it, with the token),
    // so a browser can load it before the operator has typed the token in.
    let open = matches!(path.as_str(), "/healthz" | "/readyz" | "/");
    let (status, ctype, body) = if !open && token.is_some_and(|t| !authorised(&req, t)) {
        text(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
    } else if req.method() == http::Method::POST {
        let limited = http_body_util::Limited::new(req.into_body(), MAX_ACTION_BODY);
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect());
        match read.await {
            Ok(Ok(collected)) => match routes.action(&path, &collected.to_bytes()) {
                None => text(StatusCode::NOT_FOUND, "no such action"),
                Some(Ok(value)) => (
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&value).unwrap_or_default(),
                ),
                Some(Err(reason)) => text(StatusCode::BAD_REQUEST, &reason),
            },
            _ => text(
                StatusCode::BAD_REQUEST,
                "the body could not be read (over 64 KiB, or too slow)",
            ),
        }
    } else {
        match path.as_str() {
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
            "/" => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.to_owned(),
            ),
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" if routes.ready() => text(StatusCode::OK, "ready"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    // Nothing the admin listener serves loads from elsewhere, runs in a frame, or may be
    // kept by a cache on the way.
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; frame-ancestors 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The status page (`GET /`): one HTML file with its script and styles inline, which
/// reads `/status` every two seconds and draws the mesh from it.
const STATUS_PAGE: &str = include_str!("status_page.html");

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Fixed;

    impl AdminRoutes for Fixed {
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"node": "test"})
        }
        fn ready(&self) -> bool {
            true
        }
        fn action(&self, path: &str, _body: &[u8]) -> Option<Result<serde_json::Value, String>> {
            (path == "/act").then(|| Ok(serde_json::json!({"done": true})))
        }
    }

    /// One HTTP/1.0 exchange; the status code and the whole response.
    async fn call(addr: std::net::SocketAddr, request: String) -> (u16, String) {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn the_token_guards_data_and_actions_but_not_the_page_or_the_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let token = crate::config::Secret(b"0123456789abcdef".to_vec());
        tokio::spawn(serve_admin(
            listener,
            None,
            Arc::new(Fixed),
            Some(token),
            stop.clone(),
        ));
        let get = |path: &str, auth: &str| format!("GET {path} HTTP/1.0\r\n{auth}\r\n");
        let bearer = "Authorization: Bearer 0123456789abcdef\r\n";
        let wrong = "Authorization: Bearer 0123456789abcdeX\r\n";

        assert_eq!(call(addr, get("/status", "")).await.0, 401);
        assert_eq!(call(addr, get("/status", wrong)).await.0, 401);
        assert_eq!(call(addr, get("/metrics", "")).await.0, 401);
        let (code, body) = call(addr, get("/status", bearer)).await;
        assert_eq!(code, 200);
        assert!(body.contains("\"node\": \"test\""), "{body}");
        let post =
            |auth: &str| format!("POST /act HTTP/1.0\r\n{auth}Content-Length: 2\r\n\r\n{{}}");
        assert_eq!(call(addr, post("")).await.0, 401);
        assert_eq!(call(addr, post(bearer)).await.0, 200);
        // The page holds no data; the probes must work for an orchestrator without it.
        let (code, page) = call(addr, get("/", "")).await;
        assert_eq!(code, 200);
        assert!(page.contains("text/html"), "{page}");
        assert!(
            page.contains("content-security-policy: default-src 'none'"),
            "{page}"
        );
        assert!(page.contains("<svg id=\"graph\""), "{page}");
        assert_eq!(call(addr, get("/healthz", "")).await.0, 200);
        assert_eq!(call(addr, get("/readyz", "")).await.0, 200);
        stop.cancel();
    }
}
