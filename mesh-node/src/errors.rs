//! The edge's own error responses: small readable pages, each counted by kind.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt as _;

use crate::proxy::ProxyBody;

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
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        self.parts().1
    }
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
