//! The upstream phase: one tunnel stream per request or websocket.
//!
//! The head is rewritten as a proxy should (hop-by-hop fields out, `Host` kept, the
//! forwarding headers set from the client address, a request id), a stream is opened on
//! the best tunnel (waiting at most `tunnel_open`, then 503 with `Retry-After`), the head
//! goes first, the body streams behind it with back-pressure (bounded by the route's size
//! and the body idle timeout), and the connector's reply becomes the response. An upgrade
//! (websocket over HTTP/1.1 Upgrade or HTTP/2 extended CONNECT) becomes a byte pipe once
//! the origin says `101`, with the edge's websocket keep-alive on it.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use skylane_shared::flow::{FlowRecv, FlowSend};
use skylane_shared::pipe::{Splice, TunnelBody, body_to_stream};
use skylane_shared::wire::{
    self, RefusalKind, Reply, RequestHead, StreamHeader, StreamKind, WIRE_VERSION,
};
use tracing::Instrument as _;

use crate::body::{Bounded, Guarded, ProxyBody, empty};
use crate::errors::{ErrorKind, error_response, retry_later};
use crate::phases::RequestCtx;
use crate::phases::websocket::Keepalive;
use crate::proxy::Edge;
use crate::routes::Routed;
use crate::tunnel::OpenError;

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded as they are. Names, not strings:
/// removing by a string parses it first, and this runs twice for every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop fields and any field the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The protocol a request asks to switch to, if any.
pub fn wants_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() == Version::HTTP_2 {
        let proto = req.extensions().get::<hyper::ext::Protocol>()?;
        return (req.method() == Method::CONNECT)
            .then(|| HeaderValue::from_str(proto.as_str()).ok())
            .flatten();
    }
    let connection_says_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_says_upgrade {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Builds the head sent to the origin from the request and its header fields (moved out
/// of the request, not copied).
fn origin_head<B: hyper::body::Body>(
    edge: &Edge,
    ctx: &RequestCtx,
    req: &Request<B>,
    mut headers: HeaderMap,
    upgrade: Option<&HeaderValue>,
) -> RequestHead {
    strip_hop_by_hop(&mut headers);
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| ctx.host.clone());
    if !headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        headers.insert(header::HOST, v);
    }
    edge.policy.client_address.set_forwarding_headers(
        &mut headers,
        &ctx.peer,
        ctx.client,
        ctx.scheme,
        &authority,
    );
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if ctx.scheme == "https" {
            "https"
        } else {
            "http"
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    let mut method = req.method().as_str().to_owned();
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
        if req.version() == Version::HTTP_2 {
            // RFC 8441 → RFC 6455: the origin speaks HTTP/1.1, so the edge makes the
            // handshake key the HTTP/2 client does not send.
            method = "GET".into();
            let key: [u8; 16] = rand::random();
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            if let Ok(v) = HeaderValue::from_str(&key) {
                headers.insert(header::SEC_WEBSOCKET_KEY, v);
            }
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    RequestHead {
        method,
        path,
        headers: headers.into(),
        upgrade: upgrade.is_some(),
        has_body: upgrade.is_none() && !req.body().is_end_stream(),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// How many times one request goes again to a connector whose process said it hands over
/// to a successor: once is the rule (the next connection reaches the successor); twice
/// covers a successor that hands over in turn at once.
const MAX_HAND_OVER_RETRIES: u32 = 2;

/// What the request holds until its response (or pipe) ends: its mark on the connection
/// and its place in the tunnel.
pub type Held = (
    crate::phases::connection::InFlight,
    crate::phases::flows::FlowPermit,
);

/// [`Held`] and the stream's slot on its tunnel connection.
type HeldStream = (
    crate::phases::connection::InFlight,
    crate::phases::flows::FlowPermit,
    crate::tunnel::StreamSlot,
);

/// Sends the request through the tunnel and returns the response to give the client.
/// The body is the client's (or none, for the cache's own fetches).
pub async fn forward<B>(
    edge: Arc<Edge>,
    ctx: &RequestCtx,
    route: &Routed,
    mut req: Request<B>,
    held: Held,
) -> Response<ProxyBody>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let upgrade = wants_upgrade(&req);
    let is_h2 = req.version() == Version::HTTP_2;
    let headers = std::mem::take(req.headers_mut());
    let head = origin_head(&edge, ctx, &req, headers, upgrade.as_ref());
    let has_body = head.has_body;
    let header = StreamHeader {
        version: WIRE_VERSION,
        service: route.service().to_owned(),
        client_addr: Some(std::net::SocketAddr::new(ctx.client, ctx.peer.tcp.port())),
        request_id: ctx.id.clone(),
        kind: StreamKind::Http(head),
    };
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let method = req.method().clone();
    let mut body = has_body.then(|| {
        Bounded::new(
            req.into_body(),
            edge.policy.timeouts.request_body_idle,
            route.route.max_body_bytes,
        )
    });
    // Connectors this request was refused by (or lost on): a request that sent no body
    // tries the next one, so a draining or failing connector costs it a round trip, not
    // an error.
    let mut tried: Vec<String> = Vec::new();
    let mut on_upgrade = on_upgrade;
    // Refusals from connector processes that hand over to a successor, so far.
    let mut handed_over = 0;
    loop {
        let stream = edge
            .tunnels
            .open_stream(edge.policy.timeouts.tunnel_open, &tried, route.service())
            .await;
        let stream = match stream {
            Ok(s) => s,
            Err(OpenError::NoTunnel) if !tried.is_empty() => {
                tracing::warn!(request_id = %ctx.id, tried = ?tried, "every connector refused or failed");
                return error_response(ErrorKind::NoHealthyOrigin, &ctx.id);
            }
            Err(OpenError::NoTunnel) => {
                tracing::warn!(request_id = %ctx.id, "no connector reachable");
                return error_response(ErrorKind::NoConnector, &ctx.id);
            }
            Err(OpenError::Saturated) => {
                tracing::warn!(request_id = %ctx.id, "tunnel saturated: no stream within the open timeout");
                return retry_later(ErrorKind::Overloaded, &ctx.id, 2);
            }
        };
        let (connector, mut send, mut recv, slot, dialled) = (
            stream.connector,
            stream.send,
            stream.recv,
            stream.slot,
            stream.dialled,
        );
        let span = tracing::debug_span!("request", request_id = %ctx.id, %connector, service = %route.service());
        let body_was_none = body.is_none();
        let retry_possible = body_was_none && tried.len() + 1 < edge.tunnels.connector_count();
        let attempt = async {
            if wire::write_frame(&mut send, &header).await.is_err() {
                return Attempt::Failed;
            }
            if let Some(body) = body.take() {
                let mut body_send = send;
                tokio::spawn(
                    async move {
                        match body_to_stream(body, &mut body_send).await {
                            Ok(n) => metrics::counter!("skylane_edge_bytes_total", "direction" => "to_origin")
                                .increment(n),
                            Err(e) => {
                                tracing::debug!(error = %e, "request body ended early");
                                body_send.reset();
                            }
                        }
                    }
                    .in_current_span(),
                );
                return Attempt::Replied(reply_or_lost(&edge, &connector, &mut recv).await, None);
            }
            if upgrade.is_none() {
                let _ = send.finish().await;
            }
            Attempt::Replied(reply_or_lost(&edge, &connector, &mut recv).await, Some(send))
        }
        .instrument(span.clone())
        .await;
        let (reply, send) = match attempt {
            Attempt::Failed => (None, None),
            Attempt::Replied(reply, send) => (reply, send),
        };
        // The connector's process hands over to a successor: a new tunnel connection to
        // the same connector reaches it. Nothing reached the origin; a request whose body
        // went out with it cannot be sent again.
        if let Some(Reply::Refused(r)) = &reply
            && r.kind == RefusalKind::Restarting
        {
            if let Some(dialled) = dialled {
                edge.tunnels.retire(&connector, dialled);
            }
            handed_over += 1;
            if body_was_none && handed_over <= MAX_HAND_OVER_RETRIES {
                metrics::counter!("skylane_edge_retries_total").increment(1);
                continue;
            }
        }
        let again = match &reply {
            // Nothing reached the origin: any request may go to another connector.
            Some(Reply::Refused(r)) => match r.kind {
                RefusalKind::Draining => {
                    edge.tunnels.mark_draining(&connector);
                    true
                }
                RefusalKind::NoHealthyOrigin
                | RefusalKind::OriginUnreachable
                | RefusalKind::Overloaded
                | RefusalKind::Restarting => true,
                _ => false,
            },
            // The stream failed before the response head: the origin may have seen the
            // request, so only an idempotent one is sent again (RFC 9110, 9.2.2).
            None => is_idempotent(&method),
            Some(_) => false,
        };
        if again && retry_possible {
            tracing::info!(request_id = %ctx.id, %connector, "connector refused or failed; trying another");
            metrics::counter!("skylane_edge_retries_total").increment(1);
            tried.push(connector);
            continue;
        }
        let pending = on_upgrade.take().zip(send);
        let held = (held.0, held.1, slot);
        return respond(&edge, reply, recv, pending, is_h2, ctx, held)
            .instrument(span)
            .await;
    }
}

/// The connector's reply; `None` when the stream failed first, or when routing lost the
/// connector meanwhile (it died or is cut off: a QUIC connection would only notice at its
/// idle timeout, seconds later).
async fn reply_or_lost(edge: &Edge, connector: &str, recv: &mut FlowRecv) -> Option<Reply> {
    tokio::select! {
        reply = wire::read_frame(recv) => reply.ok(),
        () = edge.tunnels.route_lost(connector) => {
            tracing::info!(%connector, "connector lost while waiting for its reply");
            None
        }
    }
}

/// One try of a request on one connector.
enum Attempt {
    /// The stream header could not be sent.
    Failed,
    /// The connector's reply (`None`: the stream failed first), and the sending half
    /// when no body task took it (an upgrade's byte pipe needs it).
    Replied(Option<Reply>, Option<FlowSend>),
}

/// Methods that mean the same when sent twice (RFC 9110, section 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Reads the connector's reply and turns it into the user's response; for a successful
/// upgrade, spawns the byte pipe.
async fn respond(
    edge: &Edge,
    reply: Option<Reply>,
    recv: FlowRecv,
    upgrade: Option<(hyper::upgrade::OnUpgrade, FlowSend)>,
    is_h2: bool,
    ctx: &RequestCtx,
    held: HeldStream,
) -> Response<ProxyBody> {
    let id = &ctx.id;
    let Some(reply) = reply else {
        tracing::warn!(request_id = %id, "tunnel stream failed before the response");
        return error_response(ErrorKind::TunnelFailed, id);
    };
    let head = match reply {
        Reply::Response(head) => head,
        Reply::Refused(r) => {
            tracing::info!(request_id = %id, reason = r.kind.label(), detail = %r.message, "connector refused");
            let kind = match r.kind {
                RefusalKind::NoHealthyOrigin | RefusalKind::Draining | RefusalKind::Restarting => {
                    ErrorKind::NoHealthyOrigin
                }
                RefusalKind::OriginTimeout => ErrorKind::OriginTimeout,
                RefusalKind::UnknownService => ErrorKind::UnknownService,
                RefusalKind::OriginUnreachable => ErrorKind::OriginUnreachable,
                RefusalKind::BadHeader => ErrorKind::TunnelFailed,
                RefusalKind::Overloaded => return retry_later(ErrorKind::Overloaded, id, 2),
            };
            return error_response(kind, id);
        }
        Reply::Connected => return error_response(ErrorKind::TunnelFailed, id),
    };
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = head.headers.0;
    if let (Some((on_upgrade, send)), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, status) {
        let upgrade_value = headers.get(header::UPGRADE).cloned();
        let websocket = upgrade_value
            .as_ref()
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        strip_hop_by_hop(&mut headers);
        let mut resp = Response::new(empty());
        if is_h2 {
            // RFC 8441: a successful extended CONNECT is a 200 on the HTTP/2 stream.
            headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            *resp.status_mut() = StatusCode::OK;
        } else {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(v) = upgrade_value {
                headers.insert(header::UPGRADE, v);
            }
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        }
        *resp.headers_mut() = headers;
        let t = &edge.policy.timeouts;
        let keepalive = if websocket {
            Keepalive::new(t.websocket_ping_interval, t.websocket_idle)
        } else {
            Keepalive::idle_only(t.tcp_idle)
        };
        tokio::spawn(pipe(on_upgrade, recv, send, keepalive, held, id.clone()));
        return resp;
    }
    strip_hop_by_hop(&mut headers);
    let expected = content_length(&headers);
    let body = Guarded::new(TunnelBody::new(recv, expected), held).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// An upgraded flow: waits for the client's side of the upgrade, then hands the pipe to a
/// task of its own ([`RunPipe`]). Tens of thousands of pipes sit idle at an edge, so the
/// long-lived task holds only the pipe and the request's marks: what this one needs to
/// get there (the upgrade's future, the stream halves before they join the pipe) is freed
/// as soon as the client is switched over.
async fn pipe(
    on_upgrade: hyper::upgrade::OnUpgrade,
    recv: FlowRecv,
    send: FlowSend,
    keepalive: Keepalive,
    held: HeldStream,
    id: String,
) {
    match on_upgrade.await {
        Ok(upgraded) => {
            let io = hyper_util::rt::TokioIo::new(upgraded);
            tokio::spawn(RunPipe::new(
                Splice::new(recv, send, io, keepalive),
                held,
                id,
            ));
        }
        Err(e) => tracing::debug!(request_id = %id, error = %e, "client upgrade failed"),
    }
}

/// Copies an upgraded flow's bytes both ways until both sides end (or its keep-alive ends
/// it), then records it.
///
/// A hand-written future rather than an `async fn`: an `async fn`'s state keeps its
/// arguments and the locals they are moved into side by side, which doubled this task's
/// size (816 bytes against 412), per idle websocket.
struct RunPipe {
    splice: Splice<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, Keepalive>,
    /// Held until the pipe ends.
    _held: HeldStream,
    id: String,
    opened: tokio::time::Instant,
}

impl RunPipe {
    fn new(
        splice: Splice<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, Keepalive>,
        held: HeldStream,
        id: String,
    ) -> Self {
        metrics::gauge!("skylane_edge_open_upgrades").increment(1.0);
        Self {
            splice,
            _held: held,
            id,
            opened: tokio::time::Instant::now(),
        }
    }
}

impl std::future::Future for RunPipe {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = &mut *self;
        match std::task::ready!(std::pin::Pin::new(&mut this.splice).poll(cx)) {
            Ok((down, up)) => {
                metrics::counter!("skylane_edge_bytes_total", "direction" => "to_origin")
                    .increment(up);
                metrics::counter!("skylane_edge_bytes_total", "direction" => "to_client")
                    .increment(down);
            }
            Err(e) => {
                tracing::debug!(request_id = %this.id, error = %e, "upgraded flow ended with an error")
            }
        }
        metrics::gauge!("skylane_edge_open_upgrades").decrement(1.0);
        metrics::histogram!("skylane_edge_stream_duration_seconds", "kind" => "upgrade")
            .record(this.opened.elapsed().as_secs_f64());
        std::task::Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_connection_tokens_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(
            h.get(header::HOST).map(|v| v.as_bytes()),
            Some(&b"example.com"[..])
        );
    }
}
