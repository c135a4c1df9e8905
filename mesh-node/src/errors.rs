//! The edge's own error responses: small readable pages, each counted by kind.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt as _;

use crate::body::ProxyBody;

/// What went wrong, from the user's side of the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No host, or a malformed request.
    BadRequest,
    /// No route matches the host and path.
    NoRoute,
    /// No tunnel to any connector is up.
    NoConnector,
    /// The tunnel stream failed mid-way.
    TunnelFailed,
    /// The connector has no service by that name (a config mismatch).
    UnknownService,
    /// The service has no healthy origin server.
    NoHealthyOrigin,
    /// No origin server accepted the connection.
    OriginUnreachable,
    /// The origin did not answer in time.
    OriginTimeout,
    /// The request body is larger than the route allows.
    PayloadTooLarge,
    /// A rate limit refused the request (send `Retry-After`).
    RateLimited,
    /// The client holds its share of the tunnel (send `Retry-After`).
    ClientBusy,
    /// The edge or the tunnel is saturated (send `Retry-After`).
    Overloaded,
    /// A websocket to a host under attack, without clearance.
    ClearanceNeeded,
    /// A challenge solution that is wrong, forged or too old.
    BadChallenge,
}

impl ErrorKind {
    /// Status code, metric label, title and explanation.
    fn parts(self) -> (StatusCode, &'static str, &'static str, &'static str) {
        match self {
            ErrorKind::BadRequest => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Bad request",
                "The request has no valid host name.",
            ),
            ErrorKind::NoRoute => (
                StatusCode::NOT_FOUND,
                "no_route",
                "Not found",
                "This edge has no route for that host and path.",
            ),
            ErrorKind::NoConnector => (
                StatusCode::BAD_GATEWAY,
                "no_connector",
                "Bad gateway",
                "No origin connector is reachable from this edge right now.",
            ),
            ErrorKind::TunnelFailed => (
                StatusCode::BAD_GATEWAY,
                "tunnel_failed",
                "Bad gateway",
                "The tunnel to the origin failed while handling the request.",
            ),
            ErrorKind::UnknownService => (
                StatusCode::BAD_GATEWAY,
                "unknown_service",
                "Bad gateway",
                "The origin connector does not know this service.",
            ),
            ErrorKind::NoHealthyOrigin => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_origin",
                "Service unavailable",
                "No origin server for this site is healthy right now.",
            ),
            ErrorKind::OriginUnreachable => (
                StatusCode::BAD_GATEWAY,
                "origin_unreachable",
                "Bad gateway",
                "The origin server could not be reached.",
            ),
            ErrorKind::OriginTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "origin_timeout",
                "Gateway timeout",
                "The origin server did not answer in time.",
            ),
            ErrorKind::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
                "The request body is larger than this site accepts.",
            ),
            ErrorKind::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
                "You are sending requests too fast. Please wait a moment and try again.",
            ),
            ErrorKind::ClientBusy => (
                StatusCode::TOO_MANY_REQUESTS,
                "client_busy",
                "Too many requests",
                "You have too many requests in progress. Please wait for some to finish.",
            ),
            ErrorKind::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Service unavailable",
                "This edge is too busy right now. Please try again in a moment.",
            ),
            ErrorKind::ClearanceNeeded => (
                StatusCode::FORBIDDEN,
                "clearance_needed",
                "Forbidden",
                "This site is under attack; load a page in your browser first to pass its check.",
            ),
            ErrorKind::BadChallenge => (
                StatusCode::FORBIDDEN,
                "bad_challenge",
                "Forbidden",
                "The browser check could not be verified. Please reload the page.",
            ),
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        self.parts().1
    }
}

/// Marks a response the edge made itself (not the origin's), for the cache: an edge error
/// is an origin failure for stale-if-error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeError(pub ErrorKind);

/// [`error_response`] with `Retry-After: <seconds>`.
pub fn retry_later(kind: ErrorKind, request_id: &str, after_s: u64) -> Response<ProxyBody> {
    let mut resp = error_response(kind, request_id);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(after_s.max(1)));
    resp
}

/// A small HTML page for `kind`, counted in `skylane_edge_errors_total`.
pub fn error_response(kind: ErrorKind, request_id: &str) -> Response<ProxyBody> {
    let (status, label, title, text) = kind.parts();
    metrics::counter!("skylane_edge_errors_total", "kind" => label).increment(1);
    let id = html_escape(request_id);
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:34em;margin:4em auto;color:#222}}\
         code{{color:#666}}</style></head>\n<body><h1>{code} {title}</h1><p>{text}</p>\
         <p><small>Skylane edge &middot; request id <code>{id}</code></small></p></body></html>\n",
        code = status.as_u16()
    );
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(page))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut().insert(EdgeError(kind));
    resp
}

fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_contract() {
        assert_eq!(error_response(ErrorKind::NoConnector, "x").status(), 502);
        assert_eq!(
            error_response(ErrorKind::NoHealthyOrigin, "x").status(),
            503
        );
        assert_eq!(error_response(ErrorKind::OriginTimeout, "x").status(), 504);
    }

    #[test]
    fn request_id_is_escaped() {
        assert_eq!(html_escape("<a&\">"), "&lt;a&amp;&quot;&gt;");
    }
}
