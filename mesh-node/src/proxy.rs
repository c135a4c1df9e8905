//! The edge's HTTP pipeline: every request walks the phases of [`crate::phases`] in order,
//! and the first phase that answers ends the walk.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::body::{ProxyBody, full};
use crate::config::{ClientAddress, Limits, Timeouts};
use crate::errors::{ErrorKind, error_response, retry_later};
use crate::phases::challenge::{Challenger, unix_now_s};
use crate::phases::client_addr::Peer;
use crate::phases::connection::ConnWatch;
use crate::phases::flows::Flows;
use crate::phases::rate_limit::Zones;
use crate::phases::request_filter::{self, Filters, RequestView, Stop};
use crate::phases::under_attack::UnderAttackState;
use crate::phases::{RequestCtx, upstream};
use crate::request_metrics::RequestMetrics;
use crate::routes::{Routed, Routes};
use crate::tunnel::TunnelPool;

pub use crate::body::empty;
pub use crate::phases::upstream::strip_hop_by_hop;

/// The policy every request is held to.
#[derive(Debug)]
pub struct Policy {
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Limits.
    pub limits: Limits,
    /// Who the client is.
    pub client_address: ClientAddress,
    /// Rate-limit zones (kept across a reload that leaves them unchanged, with their
    /// limiters' state).
    pub zones: Arc<Zones>,
    /// Tunnel flows.
    pub flows: Arc<Flows>,
    /// The challenge, when a secret is configured.
    pub challenger: Option<Challenger>,
    /// Hosts under attack.
    pub under_attack: UnderAttackState,
    /// The automatic "under attack" trigger, if configured.
    pub auto: Option<crate::config::policy::AutoTrigger>,
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Edge {
    /// Host/path routes.
    pub routes: Routes,
    /// Tunnels to connectors.
    pub tunnels: Arc<TunnelPool>,
    /// Edge policy.
    pub policy: Policy,
    /// The HTTP cache, when configured.
    pub cache: Option<Arc<crate::cache::Cache>>,
    /// ACME certificates and the mesh's challenge answers, if `[acme]` is on.
    pub acme: Option<Arc<crate::acme::Acme>>,
    /// `[[cache.rules]]`, first match wins (reloadable, unlike the cache's storage).
    pub cache_rules: Arc<Vec<crate::config::cache::Rule>>,
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// Handles one request from a user on a connection from `peer`.
pub async fn handle(
    edge: Arc<Edge>,
    conn: Arc<ConnWatch>,
    req: Request<Incoming>,
    peer: Peer,
    scheme: &'static str,
) -> Result<Response<ProxyBody>, Infallible> {
    let in_flight = conn.request_started(req.version() == Version::HTTP_2);
    let client = edge.policy.client_address.client(&peer, req.headers());
    let ctx = RequestCtx {
        id: request_id(&req),
        started: Instant::now(),
        peer,
        client,
        scheme,
        host: request_host(&req).unwrap_or_default(),
    };
    let (resp, route) = pipeline(&edge, &ctx, req, in_flight).await;
    Ok(finish(resp, &ctx, route))
}

/// The phases after the connection's: route, request filter, upstream.
async fn pipeline<'e>(
    edge: &'e Arc<Edge>,
    ctx: &RequestCtx,
    req: Request<Incoming>,
    in_flight: crate::phases::connection::InFlight,
) -> (Response<ProxyBody>, Option<&'e Routed>) {
    if ctx.host.is_empty() {
        return (error_response(ErrorKind::BadRequest, &ctx.id), None);
    }
    let upgrade = upstream::wants_upgrade(&req).is_some();
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        host: &ctx.host,
        client: ctx.client,
        upgrade,
    };
    let now_s = unix_now_s();
    if request_filter::is_challenge_solution(view.path)
        && let Some(challenger) = &edge.policy.challenger
    {
        return (
            stopped(
                request_filter::solution(&view, challenger, now_s),
                ctx,
                edge,
            ),
            None,
        );
    }
    let Some(route) = edge.routes.lookup(&ctx.host, view.path) else {
        return (error_response(ErrorKind::NoRoute, &ctx.id), None);
    };
    let filters = Filters {
        zones: &edge.policy.zones,
        challenger: edge.policy.challenger.as_ref(),
        under_attack: &edge.policy.under_attack,
        flows: &edge.policy.flows,
    };
    let pass = match request_filter::check(&view, route, &filters, now_s) {
        Ok(pass) => pass,
        Err(stop) => return (stopped(stop, ctx, edge), Some(route)),
    };
    let held = (in_flight, pass.flow);
    // Boxed: hyper copies a request's future into place, and over HTTP/2 into a task of
    // its own, which is copied again when it ends. The cache's and the tunnel's work is
    // most of that future: `handle`'s is 5,720 bytes unboxed, 1,608 boxed (rustc 1.95,
    // `-Zprint-type-sizes`), and the boxed part is copied once.
    let resp = match &edge.cache {
        Some(cache) => {
            Box::pin(crate::phases::cache::handle(
                edge.clone(),
                cache,
                ctx,
                route,
                req,
                held,
            ))
            .await
        }
        None => Box::pin(upstream::forward(edge.clone(), ctx, route, req, held)).await,
    };
    (resp, Some(route))
}

/// The response for a request the filter stopped.
fn stopped(stop: Stop, ctx: &RequestCtx, edge: &Edge) -> Response<ProxyBody> {
    match stop {
        Stop::Error(kind, Some(after)) => retry_later(kind, &ctx.id, after),
        Stop::Error(kind, None) => error_response(kind, &ctx.id),
        Stop::Challenge { return_to } => {
            let Some(challenger) = &edge.policy.challenger else {
                return error_response(ErrorKind::ClearanceNeeded, &ctx.id);
            };
            let prefix = crate::phases::accept::Prefix::label(ctx.client);
            let page = challenger.page(&ctx.host, &prefix, unix_now_s(), &return_to, &ctx.id);
            let (parts, body) = page.into_parts();
            Response::from_parts(parts, full(body))
        }
        Stop::Cleared { cookie, location } => {
            let mut resp = Response::new(crate::body::empty());
            *resp.status_mut() = StatusCode::SEE_OTHER;
            if let (Ok(c), Ok(l)) = (
                HeaderValue::from_str(&cookie),
                HeaderValue::from_str(&location),
            ) {
                resp.headers_mut().insert(header::SET_COOKIE, c);
                resp.headers_mut().insert(header::LOCATION, l);
            }
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
    }
}

/// The response filter and log phase: the request id goes on the response; metrics and
/// the automatic trigger's counts are recorded.
fn finish(
    mut resp: Response<ProxyBody>,
    ctx: &RequestCtx,
    route: Option<&Routed>,
) -> Response<ProxyBody> {
    if let Ok(mut v) = HeaderValue::from_str(&ctx.id) {
        // Never indexed (HPACK, RFC 7541 section 6.2.3): each response's id is new, so
        // indexing it would only evict fields the client could reuse, and make HTTP/2's
        // encoder search its table for a value it never finds.
        v.set_sensitive(true);
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    let metrics = match route {
        Some(r) => r.metrics(),
        None => RequestMetrics::unrouted(),
    };
    metrics.record(resp.status(), ctx.started.elapsed());
    if let Some(route) = route {
        route.load.record(resp.status().is_server_error());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_carries_its_request_id_never_indexed() {
        let peer = Peer::direct("127.0.0.1:5000".parse().expect("address"));
        let ctx = RequestCtx {
            id: "0123abcd".into(),
            started: Instant::now(),
            peer,
            client: peer.tcp.ip(),
            scheme: "https",
            host: "example.com".into(),
        };
        let resp = finish(Response::new(empty()), &ctx, None);
        let id = resp.headers().get(&X_REQUEST_ID).expect("x-request-id");
        assert_eq!(id, "0123abcd");
        // HTTP/2's encoder writes a sensitive value as "never indexed" and keeps it out of
        // its table.
        assert!(id.is_sensitive());
    }
}
