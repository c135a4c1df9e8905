//! The request-filter phase: what the edge decides about a request before anything goes
//! to the tunnel. In order: a challenge solution is checked; the route's body-size limit;
//! its rate-limit zones; "under attack" clearance; then a place in the tunnel (the
//! client's share and the edge's). Each check is a decision on the request head, the
//! route's policy and the edge's counters; the first refusal wins and becomes the
//! response.

use std::net::IpAddr;

use http::{HeaderMap, Method, header};

use crate::errors::ErrorKind;
use crate::phases::accept::Prefix;
use crate::phases::challenge::{self, BadSolution, Challenger};
use crate::phases::flows::{FlowPermit, Flows, Full};
use crate::phases::rate_limit::{Zones, retry_after_s};
use crate::phases::under_attack::UnderAttackState;
use crate::routes::Routed;

/// What the request filter needs of a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path.
    pub path: &'a str,
    /// Query, if any.
    pub query: Option<&'a str>,
    /// Header fields.
    pub headers: &'a HeaderMap,
    /// The host, lowercased, without port.
    pub host: &'a str,
    /// The client (see [`crate::phases::client_addr`]).
    pub client: IpAddr,
    /// Whether it asks for a websocket (or another upgrade).
    pub upgrade: bool,
}

/// The policy state the filter consults.
#[derive(Debug)]
pub struct Filters<'a> {
    /// Rate-limit zones.
    pub zones: &'a Zones,
    /// The challenge, when the mode can be used.
    pub challenger: Option<&'a Challenger>,
    /// Hosts under attack.
    pub under_attack: &'a UnderAttackState,
    /// Tunnel flows.
    pub flows: &'a std::sync::Arc<Flows>,
}

/// Why a request is answered by the edge itself.
#[derive(Debug)]
pub enum Stop {
    /// An edge error page (with `Retry-After` seconds where given).
    Error(ErrorKind, Option<u64>),
    /// The challenge page; `return_to` is where the browser goes once it is solved.
    Challenge {
        /// Path and query of the request.
        return_to: String,
    },
    /// A solved challenge: the `Set-Cookie` value and where to go.
    Cleared {
        /// `Set-Cookie`.
        cookie: String,
        /// `Location`.
        location: String,
    },
}

/// A request that passed: it holds its place in the tunnel.
#[derive(Debug)]
pub struct Pass {
    /// The flow's place, given back when the flow ends.
    pub flow: FlowPermit,
}

/// A solution to the challenge comes to this path on any host.
pub fn is_challenge_solution(path: &str) -> bool {
    path == challenge::VERIFY_PATH
}

/// Runs the filter for a request on `route` at Unix time `now_s`.
pub fn check(
    req: &RequestView<'_>,
    route: &Routed,
    filters: &Filters<'_>,
    now_s: u64,
) -> Result<Pass, Stop> {
    let policy = &route.route;
    if let Some(len) = content_length(req.headers)
        && len > policy.max_body_bytes
    {
        return Err(Stop::Error(ErrorKind::PayloadTooLarge, None));
    }
    if let Err(limited) = filters
        .zones
        .check(&policy.rate_limits, req.client, req.headers)
    {
        metrics::counter!("skylane_edge_rate_limited_total", "zone" => limited.zone.clone())
            .increment(1);
        return Err(Stop::Error(
            ErrorKind::RateLimited,
            Some(retry_after_s(limited.retry_after)),
        ));
    }
    if !policy.api
        && (policy.under_attack || filters.under_attack.is_on(req.host))
        && let Some(challenger) = filters.challenger
    {
        let prefix = Prefix::label(req.client);
        match challenger.check_clearance(req.headers, req.host, &prefix, now_s) {
            Ok(()) => {
                metrics::counter!("skylane_edge_challenge_total", "outcome" => "cleared")
                    .increment(1);
            }
            Err(why) => {
                metrics::counter!("skylane_edge_challenge_total", "outcome" => why.label())
                    .increment(1);
                // A page can only be shown to a browser loading a page; anything else
                // (a websocket, a POST, a script's fetch) is refused until it has clearance.
                let shows_page = !req.upgrade
                    && matches!(*req.method, Method::GET | Method::HEAD)
                    && accepts_html(req.headers);
                return Err(if shows_page {
                    Stop::Challenge {
                        return_to: match req.query {
                            Some(q) => format!("{}?{q}", req.path),
                            None => req.path.to_owned(),
                        },
                    }
                } else {
                    Stop::Error(ErrorKind::ClearanceNeeded, None)
                });
            }
        }
    }
    match filters.flows.open(req.client) {
        Ok(flow) => Ok(Pass { flow }),
        Err(Full::Client) => Err(Stop::Error(ErrorKind::ClientBusy, Some(1))),
        Err(Full::Edge) => Err(Stop::Error(ErrorKind::Overloaded, Some(2))),
    }
}

/// Checks a challenge solution (a request to [`challenge::VERIFY_PATH`]).
pub fn solution(req: &RequestView<'_>, challenger: &Challenger, now_s: u64) -> Stop {
    let prefix = Prefix::label(req.client);
    match challenger.verify(req.query.unwrap_or(""), req.host, &prefix, now_s) {
        Ok((cookie, location)) => {
            metrics::counter!("skylane_edge_challenge_total", "outcome" => "solved").increment(1);
            Stop::Cleared { cookie, location }
        }
        Err(why) => {
            let label = match why {
                BadSolution::Malformed => "bad_solution_malformed",
                BadSolution::Forged => "bad_solution_forged",
                BadSolution::Expired => "bad_solution_expired",
                BadSolution::Unsolved => "bad_solution_unsolved",
            };
            metrics::counter!("skylane_edge_challenge_total", "outcome" => label).increment(1);
            Stop::Error(ErrorKind::BadChallenge, None)
        }
    }
}

/// Whether the client would render an HTML page (browsers send `text/html` in `Accept`
/// for navigations; clients that send no `Accept` get the page too, so `curl` sees it).
fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|a| a.contains("text/html") || a.contains("*/*"))
}

/// The `Content-Length` of a request, if it has a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, RateKey, RateLimit, Route, Secret};
    use crate::routes::Routes;
    use std::time::Duration;

    fn routes() -> Routes {
        let r = |prefix: &str, api: bool| Route {
            host: "*".into(),
            path_prefix: prefix.into(),
            service: "web".into(),
            api,
            rate_limits: vec![0],
            max_body_bytes: 1000,
            under_attack: false,
        };
        Routes::new(vec![r("/", false), r("/api/", true)])
    }

    struct World {
        zones: Zones,
        challenger: Challenger,
        attack: UnderAttackState,
        flows: std::sync::Arc<Flows>,
    }

    impl World {
        fn new() -> Self {
            Self {
                zones: Zones::new(&[RateLimit {
                    name: "per-ip".into(),
                    key: RateKey::Ip,
                    requests_per_s: 1.0,
                    burst: 2,
                }]),
                challenger: Challenger::new(
                    &Secret(vec![1; 32]),
                    4,
                    Duration::from_secs(3600),
                    Duration::from_secs(300),
                ),
                attack: UnderAttackState::new(vec!["chat.example".into()]),
                flows: Flows::new(&Limits::default()),
            }
        }
        fn filters(&self) -> Filters<'_> {
            Filters {
                zones: &self.zones,
                challenger: Some(&self.challenger),
                under_attack: &self.attack,
                flows: &self.flows,
            }
        }
    }

    fn view<'a>(
        headers: &'a HeaderMap,
        host: &'a str,
        path: &'a str,
        client: &str,
    ) -> RequestView<'a> {
        RequestView {
            method: &Method::GET,
            path,
            query: None,
            headers,
            host,
            client: client.parse().expect("ip"),
            upgrade: false,
        }
    }

    #[test]
    fn api_routes_skip_the_challenge_but_not_the_rate_limit() {
        let w = World::new();
        let routes = routes();
        let h = HeaderMap::new();
        let page = view(&h, "chat.example", "/", "192.0.2.1");
        let route = routes.lookup("chat.example", "/").expect("route");
        assert!(matches!(
            check(&page, route, &w.filters(), 100),
            Err(Stop::Challenge { .. })
        ));
        let api = routes.lookup("chat.example", "/api/x").expect("route");
        let req = view(&h, "chat.example", "/api/x", "192.0.2.2");
        assert!(check(&req, api, &w.filters(), 100).is_ok());
        assert!(check(&req, api, &w.filters(), 100).is_ok());
        match check(&req, api, &w.filters(), 100) {
            Err(Stop::Error(ErrorKind::RateLimited, Some(after))) => assert!(after >= 1),
            other => panic!("expected 429, got {other:?}"),
        }
    }

    #[test]
    fn a_cleared_client_passes_and_a_websocket_without_clearance_is_refused() {
        let w = World::new();
        let routes = routes();
        let route = routes.lookup("chat.example", "/").expect("route");
        let set = w
            .challenger
            .clearance_cookie("chat.example", "192.0.2.0/24", 100);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            set.split(';')
                .next()
                .unwrap_or_default()
                .parse()
                .expect("value"),
        );
        assert!(
            check(
                &view(&h, "chat.example", "/", "192.0.2.9"),
                route,
                &w.filters(),
                200
            )
            .is_ok()
        );
        let none = HeaderMap::new();
        let mut ws = view(&none, "chat.example", "/ws", "192.0.2.7");
        ws.upgrade = true;
        assert!(matches!(
            check(&ws, route, &w.filters(), 200),
            Err(Stop::Error(ErrorKind::ClearanceNeeded, None))
        ));
        // Another host is not under attack.
        assert!(
            check(
                &view(&none, "other.example", "/", "192.0.2.8"),
                route,
                &w.filters(),
                200
            )
            .is_ok()
        );
    }

    #[test]
    fn a_body_over_the_route_limit_is_refused_before_anything_else() {
        let w = World::new();
        let routes = routes();
        let route = routes.lookup("x", "/").expect("route");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "1001".parse().expect("value"));
        assert!(matches!(
            check(&view(&h, "x", "/", "192.0.2.3"), route, &w.filters(), 1),
            Err(Stop::Error(ErrorKind::PayloadTooLarge, None))
        ));
    }
}
