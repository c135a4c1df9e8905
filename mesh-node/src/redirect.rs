//! The plain-HTTP listener: every request is redirected to HTTPS (308 keeps the method),
//! except the ACME CA's HTTP-01 validations, answered from the mesh's challenge answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::phases::accept::Admission;
use crate::phases::connection::{self, ConnWatch, Watched};
use crate::reload::Live;

/// Where the CA fetches an HTTP-01 token (RFC 8555, section 8.3).
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The HTTP-01 answer to `req`, if it asks for one: the key authorization, or 404 when no
/// edge of the mesh posted one for the token.
fn acme_answer<B>(
    req: &Request<B>,
    acme: Option<&crate::acme::Acme>,
) -> Option<Response<Full<Bytes>>> {
    let token = req.uri().path().strip_prefix(ACME_CHALLENGE_PATH)?;
    let acme = acme?;
    let (status, body) = match acme.http01_answer(token) {
        Some(answer) => (StatusCode::OK, Bytes::from(answer)),
        None => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"no such token\n"),
        ),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(r)
}

/// The redirect for one request.
pub fn redirect_for<B>(req: &Request<B>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map(|a| a.host().to_owned());
    let Some(host) = host else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"a Host header is required\n",
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("https://{host}{port}{path}");
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Serves redirects until `stop`, under the same admission and head timeouts as HTTPS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    https_port: u16,
    live: Arc<Live>,
    admission: Arc<Admission>,
    stop: CancellationToken,
) {
    loop {
        let Some((tcp, tcp_peer)) =
            skylane_shared::lifecycle::accept_until(&listener, &stop, "http redirect").await
        else {
            return;
        };
        // Each connection runs under the config in force when it arrived.
        let edge = live.edge();
        let admission = admission.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Some((tcp, _, permit)) =
                crate::server::admit(tcp, tcp_peer, &edge, &admission, "http").await
            else {
                return;
            };
            let watch = ConnWatch::new(Some(permit));
            let svc = {
                let watch = watch.clone();
                let acme = edge.acme.clone();
                hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let in_flight = watch.request_started(false);
                    let acme = acme.clone();
                    async move {
                        let resp = acme_answer(&req, acme.as_deref())
                            .unwrap_or_else(|| redirect_for(&req, https_port));
                        drop(in_flight);
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(edge.policy.limits.max_request_head_bytes.max(8192))
                .serve_connection(TokioIo::new(Watched::new(tcp, watch.clone())), svc);
            tokio::pin!(conn);
            let _ = connection::supervise(
                conn.as_mut(),
                &watch,
                &edge.policy.timeouts,
                |c| c.graceful_shutdown(),
                Duration::from_secs(1),
                &stop,
            )
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_host_path_and_port() {
        let req = Request::get("/a?b=1")
            .header("host", "example.com:8080")
            .body(())
            .expect("req");
        let r = redirect_for(&req, 8443);
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers()[header::LOCATION],
            "https://example.com:8443/a?b=1"
        );
        let r = redirect_for(&req, 443);
        assert_eq!(r.headers()[header::LOCATION], "https://example.com/a?b=1");
    }
}
