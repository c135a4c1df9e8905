//! The edge's HTTP proxy: one tunnel stream per request or websocket.
//!
//! For each request: pick the route by host and path, rewrite the head as a proxy should
//! (hop-by-hop headers out, `Host` kept, forwarding headers and a request id in), open a
//! stream on the best tunnel, send the head, stream the body, and stream the response
//! back. Upgrades (websockets over HTTP/1.1, and over HTTP/2 with RFC 8441 extended
//! CONNECT) become a byte pipe once the origin says `101`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as _, Incoming};
use skylane_shared::pipe::{TunnelBody, body_to_stream, splice};
use skylane_shared::wire::{
    self, RefusalKind, Reply, RequestHead, StreamHeader, StreamKind, WIRE_VERSION,
};

use crate::errors::{ErrorKind, error_response};
use crate::request_metrics::RequestMetrics;
use crate::routes::Routes;
use crate::tunnel::TunnelPool;

/// The body type the edge answers with.
pub type ProxyBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Edge {
    /// Host/path routes.
    pub routes: Routes,
    /// Tunnels to connectors.
    pub tunnels: Arc<TunnelPool>,
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded as they are.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
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
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

fn wants_upgrade(req: &Request<Incoming>) -> Option<HeaderValue> {
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

/// The request's host, lowercased, without a port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = h.parse().ok()?;
            Some(authority.host().to_owned())
        })?;
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

fn request_id(req: &Request<Incoming>) -> String {
    if let Some(id) = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
    {
        return id.to_owned();
    }
    let n: u128 = rand::random();
    format!("{n:032x}")
}

fn append_header(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    let joined = match headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {value}"),
        None => value.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name.clone(), v);
    }
}

/// Builds the head sent to the origin from the request and its header fields (moved out
/// of the request, not copied).
fn origin_head(
    req: &Request<Incoming>,
    mut headers: HeaderMap,
    host: &str,
    client: SocketAddr,
    scheme: &str,
    request_id: &str,
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
        .unwrap_or_else(|| host.to_owned());
    if !headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        headers.insert(header::HOST, v);
    }
    let ip = client.ip().to_string();
    append_header(&mut headers, &X_FORWARDED_FOR, &ip);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
    let for_value = if client.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip
    };
    append_header(
        &mut headers,
        &header::FORWARDED,
        &format!("for={for_value};proto={scheme};host=\"{authority}\""),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
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

/// Handles one request from a user.
pub async fn handle(
    edge: Arc<Edge>,
    mut req: Request<Incoming>,
    client: SocketAddr,
    scheme: &'static str,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let id = request_id(&req);
    let unrouted = RequestMetrics::unrouted();
    let Some(host) = request_host(&req) else {
        return Ok(finish(
            error_response(ErrorKind::BadRequest, &id),
            &id,
            started,
            unrouted,
        ));
    };
    let Some(route) = edge.routes.lookup(&host, req.uri().path()) else {
        return Ok(finish(
            error_response(ErrorKind::NoRoute, &id),
            &id,
            started,
            unrouted,
        ));
    };
    let service = route.service();
    let metrics = route.metrics();
    let upgrade = wants_upgrade(&req);
    let is_h2 = req.version() == Version::HTTP_2;
    let headers = std::mem::take(req.headers_mut());
    let head = origin_head(&req, headers, &host, client, scheme, &id, upgrade.as_ref());
    let has_body = head.has_body;
    let header = StreamHeader {
        version: WIRE_VERSION,
        service: service.to_owned(),
        client_addr: Some(client),
        request_id: id.clone(),
        kind: StreamKind::Http(head),
    };
    let Some((connector, mut send, recv)) = edge.tunnels.open_stream().await else {
        tracing::warn!(request_id = %id, "no connector reachable");
        return Ok(finish(
            error_response(ErrorKind::NoConnector, &id),
            &id,
            started,
            metrics,
        ));
    };
    let span = tracing::debug_span!("request", request_id = %id, %connector, %service);
    let _enter = span.enter();
    if wire::write_frame(&mut send, &header).await.is_err() {
        return Ok(finish(
            error_response(ErrorKind::TunnelFailed, &id),
            &id,
            started,
            metrics,
        ));
    }
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    if has_body {
        let body = req.into_body();
        let mut body_send = send;
        tokio::spawn(async move {
            match body_to_stream(body, &mut body_send).await {
                Ok(n) => metrics::counter!("skylane_edge_bytes_total", "direction" => "to_origin")
                    .increment(n),
                Err(e) => {
                    tracing::debug!(error = %e, "request body ended early");
                    let _ = body_send.reset(1u32.into());
                }
            }
        });
        return Ok(respond(recv, None, is_h2, &id, started, metrics).await);
    }
    if upgrade.is_none() {
        let _ = send.finish();
    }
    let pending = on_upgrade.map(|u| (u, send));
    Ok(respond(recv, pending, is_h2, &id, started, metrics).await)
}

/// Reads the connector's reply and turns it into the user's response; for a successful
/// upgrade, spawns the byte pipe.
async fn respond(
    mut recv: quinn::RecvStream,
    upgrade: Option<(hyper::upgrade::OnUpgrade, quinn::SendStream)>,
    is_h2: bool,
    id: &str,
    started: Instant,
    metrics: &RequestMetrics,
) -> Response<ProxyBody> {
    let reply: Reply = match wire::read_frame(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(request_id = %id, error = %e, "tunnel stream failed before the response");
            return finish(
                error_response(ErrorKind::TunnelFailed, id),
                id,
                started,
                metrics,
            );
        }
    };
    let head = match reply {
        Reply::Response(head) => head,
        Reply::Refused(r) => {
            tracing::info!(request_id = %id, reason = r.kind.label(), detail = %r.message, "connector refused");
            let kind = match r.kind {
                RefusalKind::NoHealthyOrigin | RefusalKind::Draining => ErrorKind::NoHealthyOrigin,
                RefusalKind::OriginTimeout => ErrorKind::OriginTimeout,
                RefusalKind::UnknownService => ErrorKind::UnknownService,
                RefusalKind::OriginUnreachable => ErrorKind::OriginUnreachable,
                RefusalKind::BadHeader => ErrorKind::TunnelFailed,
            };
            return finish(error_response(kind, id), id, started, metrics);
        }
        Reply::Connected => {
            return finish(
                error_response(ErrorKind::TunnelFailed, id),
                id,
                started,
                metrics,
            );
        }
    };
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = head.headers.0;
    if let (Some((on_upgrade, send)), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, status) {
        let upgrade_value = headers.get(header::UPGRADE).cloned();
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
        let flow_id = id.to_owned();
        tokio::spawn(async move {
            let id = flow_id;
            let opened = Instant::now();
            match on_upgrade.await {
                Ok(upgraded) => {
                    metrics::gauge!("skylane_edge_open_upgrades").increment(1.0);
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    match splice(recv, send, io).await {
                        Ok((down, up)) => {
                            metrics::counter!("skylane_edge_bytes_total", "direction" => "to_origin").increment(up);
                            metrics::counter!("skylane_edge_bytes_total", "direction" => "to_client").increment(down);
                        }
                        Err(e) => {
                            tracing::debug!(request_id = %id, error = %e, "upgraded flow ended with an error")
                        }
                    }
                    metrics::gauge!("skylane_edge_open_upgrades").decrement(1.0);
                    metrics::histogram!("skylane_edge_stream_duration_seconds", "kind" => "upgrade")
                        .record(opened.elapsed().as_secs_f64());
                }
                Err(e) => tracing::debug!(request_id = %id, error = %e, "client upgrade failed"),
            }
        });
        return finish(resp, id, started, metrics);
    }
    strip_hop_by_hop(&mut headers);
    let expected = content_length(&headers);
    let body = TunnelBody::new(recv, expected).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    finish(resp, id, started, metrics)
}

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Adds the request id and records metrics for a response about to be sent.
fn finish(
    mut resp: Response<ProxyBody>,
    id: &str,
    started: Instant,
    metrics: &RequestMetrics,
) -> Response<ProxyBody> {
    if !id.is_empty()
        && let Ok(v) = HeaderValue::from_str(id)
    {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    metrics.record(resp.status(), started.elapsed());
    resp
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

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        append_header(&mut h, &X_FORWARDED_FOR, "1.1.1.1");
        append_header(&mut h, &X_FORWARDED_FOR, "2.2.2.2");
        assert_eq!(
            h.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()),
            Some(&b"1.1.1.1, 2.2.2.2"[..])
        );
    }
}
