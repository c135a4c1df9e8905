//! The plain-HTTP listener: every request is redirected to HTTPS (308 keeps the method).

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
                hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let in_flight = watch.request_started(false);
                    async move {
                        let resp = redirect_for(&req, https_port);
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
