//! The demo origin: a tiny web app that stands behind Skylane in the demo and
//! in end-to-end tests.
//!
//! It speaks plain HTTP/1.1 and h2c (prior knowledge) on one port and serves a
//! websocket chat page, a websocket echo, and endpoints whose behaviour tests
//! can predict: a deterministic byte stream, a streaming echo, server-sent
//! events on a fixed schedule, a delay, static assets and a switchable health
//! check. Every response carries `X-Origin-Name` so a test can tell which of
//! several origins answered. [`serve_with`] can also terminate TLS, so the simulator's
//! clients can reach it "directly" the way a real user would. No auth, nothing stateful.

mod assets;
mod cachetest;
mod pattern;
mod websocket;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use self::pattern::PatternBody;
use self::websocket::{Handshake, HandshakeError};

/// Response header naming the origin that answered.
pub const ORIGIN_NAME_HEADER: HeaderName = HeaderName::from_static("x-origin-name");

/// Connections served at once; further accepts wait for a slot.
const MAX_CONNECTIONS: usize = 4096;

/// Longest `/delay/MS` accepted, so a typo cannot park a request for days.
const MAX_DELAY_MS: u64 = 10 * 60 * 1000;

/// Number of events `/sse` sends before ending the stream.
const SSE_EVENTS: u32 = 20;

/// Spacing of `/sse` events.
const SSE_INTERVAL: Duration = Duration::from_millis(100);

/// Pause after a failed `accept`, e.g. when out of file descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

type BoxError = Box<dyn StdError + Send + Sync>;
type ResBody = UnsyncBoxBody<Bytes, BoxError>;

/// Validated settings for one origin server.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Sent in `X-Origin-Name` and `/api/time`, so tests can tell origins apart.
    name: String,
    /// The same name, checked once to be a valid header value.
    name_header: HeaderValue,
    /// When this file exists `/health` answers 503, so tests can flip health
    /// without restarting the process.
    fail_health_file: Option<PathBuf>,
}

/// The origin name cannot be sent as a header value.
#[derive(Debug)]
pub struct InvalidName(String);

impl std::fmt::Display for InvalidName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "origin name {:?} is not a valid header value (use visible ASCII)",
            self.0
        )
    }
}

impl StdError for InvalidName {}

impl OriginConfig {
    /// Settings for an origin called `name`.
    pub fn new(name: &str, fail_health_file: Option<PathBuf>) -> Result<Self, InvalidName> {
        let name_header = HeaderValue::from_str(name)
            .ok()
            .filter(|_| !name.is_empty() && name.is_ascii())
            .ok_or_else(|| InvalidName(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            name_header,
            fail_health_file,
        })
    }

    /// The origin's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Shared by every connection of one server.
struct State {
    config: OriginConfig,
    /// Cancelled when the server should stop; websockets close with 1001.
    shutdown: CancellationToken,
    /// Websocket tasks outlive their HTTP connection, so they are tracked here
    /// and `serve` waits for them too.
    tracker: TaskTracker,
    /// Requests to `/cache/...` per path (see [`cachetest`]).
    counts: cachetest::Counts,
}

/// Serve HTTP/1.1 and h2c on `listener` until `shutdown` is cancelled, then
/// stop accepting, let in-flight requests finish, close websockets with 1001,
/// and return once every connection has ended. Callers bound the drain with a
/// timeout of their own.
pub async fn serve(listener: TcpListener, config: OriginConfig, shutdown: CancellationToken) {
    serve_with(listener, None, config, shutdown).await;
}

/// Longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Like [`serve`], but when `tls` is given every accepted connection first completes a
/// TLS handshake (ALPN `h2` or `http/1.1`), so a client can reach the origin the way a
/// user without Skylane would: TCP, then TLS, then HTTP.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    config: OriginConfig,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let state = Arc::new(State {
        config,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        counts: cachetest::Counts::default(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));

    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit,
            () = shutdown.cancelled() => break,
        };
        // The semaphore is never closed, so this only guards against future changes.
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let (state, builder, tls) = (state.clone(), builder.clone(), tls.clone());
        tracker.spawn(
            async move {
                // Small writes (SSE events, websocket echoes) must not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "set_nodelay failed");
                }
                match tls {
                    None => serve_connection(stream, &builder, state).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => serve_connection(stream, &builder, state).await,
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    }
                }
                drop(permit);
            }
            .instrument(debug_span!("conn", %peer)),
        );
    }

    info!("stopped accepting; draining connections");
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection<S>(stream: S, builder: &auto::Builder<TokioExecutor>, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = state.shutdown.clone();
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(req, &state).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => debug!("connection closed"),
        Err(e) => debug!(error = %e, "connection ended with an error"),
    }
}

/// Route one request and stamp the origin name on the answer.
async fn respond(req: Request<Incoming>, state: &State) -> Response<ResBody> {
    let (method, path, version) = (
        req.method().clone(),
        req.uri().path().to_owned(),
        req.version(),
    );
    if path != "/counts" && path != "/health" {
        state
            .counts
            .request(req.headers().contains_key("x-forwarded-for"));
    }
    let mut res = route(req, state).await;
    res.headers_mut()
        .insert(ORIGIN_NAME_HEADER, state.config.name_header.clone());
    debug!(%method, %path, ?version, status = res.status().as_u16(), "request");
    res
}

async fn route(req: Request<Incoming>, state: &State) -> Response<ResBody> {
    let path = req.uri().path().to_owned();
    let is_get = matches!(*req.method(), Method::GET | Method::HEAD);
    if path == "/ws" {
        return upgrade_websocket(req, state);
    }
    if path == "/echo" {
        return if req.method() == Method::POST {
            echo(req)
        } else {
            method_not_allowed("POST")
        };
    }
    if !is_get {
        return method_not_allowed("GET, HEAD");
    }
    match path.as_str() {
        "/" | "/index.html" => asset_response(&assets::INDEX, "no-cache"),
        "/health" => health(state).await,
        "/sse" => sse(),
        "/api/time" => api_time(state),
        "/headers" => request_headers(&req),
        "/counts" => {
            let mut res = Response::new(full(state.counts.json()));
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        p if p.starts_with("/cache/") => cachetest::respond(&req, &state.counts, full).await,
        _ => {
            if let Some(n) = path.strip_prefix("/bytes/") {
                bytes(n)
            } else if let Some(ms) = path.strip_prefix("/delay/") {
                delay(ms).await
            } else if let Some(asset) = path.strip_prefix("/static/").and_then(assets::find) {
                asset_response(asset, "public, max-age=60")
            } else {
                text(StatusCode::NOT_FOUND, "not found\n")
            }
        }
    }
}

fn full(body: impl Into<Bytes>) -> ResBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: &'static str) -> Response<ResBody> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn method_not_allowed(allow: &'static str) -> Response<ResBody> {
    let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn asset_response(asset: &assets::Asset, cache_control: &'static str) -> Response<ResBody> {
    let mut res = Response::new(full(asset.body));
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    res
}

async fn health(state: &State) -> Response<ResBody> {
    let failing = match &state.config.fail_health_file {
        None => false,
        Some(path) => match tokio::fs::try_exists(path).await {
            Ok(exists) => exists,
            Err(e) => {
                // If we cannot tell, report unhealthy: a proxy should not send traffic here.
                warn!(path = %path.display(), error = %e, "cannot check fail-health file");
                true
            }
        },
    };
    let mut res = if failing {
        text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    } else {
        text(StatusCode::OK, "ok")
    };
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn bytes(n: &str) -> Response<ResBody> {
    let Ok(len) = n.parse::<u64>() else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected /bytes/N with N a byte count\n",
        );
    };
    let body = PatternBody::new(len)
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut res = Response::new(body);
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Also set by hyper from the exact size hint; explicit so HEAD gets it too.
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    res
}

/// Stream the request body back as it arrives; hyper reads and writes
/// concurrently, so memory stays bounded whatever the body size.
fn echo(req: Request<Incoming>) -> Response<ResBody> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let body = req.into_body().map_err(BoxError::from).boxed_unsync();
    let mut res = Response::new(body);
    if let Some(ct) = content_type {
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    res
}

/// Twenty events 100 ms apart, the first at once; each carries its sequence
/// number as `id` and the server's wall-clock send time in ms as `data`, so a
/// client can measure per-event latency and spot buffering.
fn sse() -> Response<ResBody> {
    let mut interval = tokio::time::interval(SSE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = futures_util::stream::unfold((interval, 0u32), |(mut interval, seq)| async move {
        if seq >= SSE_EVENTS {
            return None;
        }
        interval.tick().await;
        let event = format!("id: {seq}\ndata: {}\n\n", unix_ms());
        Some((
            Ok::<_, BoxError>(Frame::data(Bytes::from(event))),
            (interval, seq + 1),
        ))
    });
    let mut res = Response::new(StreamBody::new(events).boxed_unsync());
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Asks nginx-style intermediaries not to buffer the stream.
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    res
}

async fn delay(ms: &str) -> Response<ResBody> {
    let ms = match ms.parse::<u64>() {
        Ok(ms) if ms <= MAX_DELAY_MS => ms,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "expected /delay/MS with MS at most 600000\n",
            );
        }
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let mut res = Response::new(full(format!("waited {ms} ms\n")));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn api_time(state: &State) -> Response<ResBody> {
    let body = serde_json::json!({
        "unix_ms": unix_ms(),
        "origin": state.config.name,
    });
    let mut res = Response::new(full(body.to_string()));
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The request's header fields as a JSON object (repeated fields joined with ", "), so
/// tests can see what a proxy in front of the origin forwarded.
fn request_headers(req: &Request<Incoming>) -> Response<ResBody> {
    let mut seen = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let joined = match seen.get(name.as_str()).and_then(|v| v.as_str()) {
            Some(prev) => format!("{prev}, {value}"),
            None => value,
        };
        seen.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    let mut res = Response::new(full(serde_json::Value::Object(seen).to_string()));
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn upgrade_websocket(mut req: Request<Incoming>, state: &State) -> Response<ResBody> {
    let handshake = match websocket::check_handshake(&req) {
        Ok(handshake) => handshake,
        Err(e) => {
            debug!(error = e.message(), "bad websocket handshake");
            let status = match e {
                HandshakeError::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
                _ => StatusCode::BAD_REQUEST,
            };
            let mut res = text(status, e.message());
            res.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return res;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    state.tracker.spawn(
        websocket::serve_upgraded(on_upgrade, state.shutdown.clone())
            .instrument(tracing::Span::current()),
    );
    let mut res = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    match handshake {
        Handshake::Http1 { accept } => {
            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = res.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            match HeaderValue::from_str(&accept) {
                Ok(accept) => {
                    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                }
                // derive_accept_key returns base64, which is always a valid header value.
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key\n"),
            }
        }
        Handshake::Http2 => {}
    }
    res
}

#[cfg(test)]
mod tests;
