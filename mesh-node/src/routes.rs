//! Host and path routing to connector services.

use std::sync::OnceLock;

use crate::config::Route;
use crate::phases::under_attack::RouteLoad;
use crate::request_metrics::RequestMetrics;

/// Routes, matched most-specific first: exact host before `*.parent` before `*`, then the
/// longest path prefix.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Routed>,
}

/// A route with the metric handles of its service.
#[derive(Debug)]
pub struct Routed {
    /// The configured route.
    pub route: Route,
    /// Registered on first use (after the metrics recorder is installed), then reused by
    /// every request, so a request does not build label sets or look up the registry.
    metrics: OnceLock<RequestMetrics>,
    /// Requests and origin errors of the current window, for automatic "under attack".
    pub load: RouteLoad,
    /// Its place in the config, for tasks that outlive the request (`Routes::all()[index]`).
    pub index: usize,
}

impl Routed {
    /// The connector service requests on this route go to.
    pub fn service(&self) -> &str {
        &self.route.service
    }

    /// The request metrics of the route's service.
    pub fn metrics(&self) -> &RequestMetrics {
        self.metrics
            .get_or_init(|| RequestMetrics::new(&self.route.service))
    }
}

/// Whether `host` matches `pattern` (exact, `*.example.com`, or `*`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    host_rank(pattern, host).is_some()
}

fn host_rank(pattern: &str, host: &str) -> Option<u8> {
    if pattern == host {
        Some(3)
    } else if let Some(parent) = pattern.strip_prefix("*.") {
        host.strip_suffix(parent)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|label| !label.is_empty())
            .map(|_| 2)
    } else if pattern == "*" {
        Some(1)
    } else {
        None
    }
}

fn path_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path[prefix.len()..].starts_with('/'))
}

impl Routes {
    /// Wraps validated routes.
    pub fn new(routes: Vec<Route>) -> Self {
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(index, route)| Routed {
                route,
                metrics: OnceLock::new(),
                load: RouteLoad::default(),
                index,
            })
            .collect();
        Self { routes }
    }

    /// Every route, in config order.
    pub fn all(&self) -> &[Routed] {
        &self.routes
    }

    /// The best route for a host and path.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Routed> {
        self.routes
            .iter()
            .filter_map(|r| {
                let rank = host_rank(&r.route.host, host)?;
                let prefix = &r.route.path_prefix;
                path_matches(prefix, path).then_some((rank, prefix.len(), r))
            })
            .max_by_key(|(rank, len, _)| (*rank, *len))
            .map(|(_, _, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: &str, service: &str) -> Route {
        Route {
            host: host.into(),
            path_prefix: prefix.into(),
            service: service.into(),
            api: false,
            rate_limits: Vec::new(),
            max_body_bytes: 1 << 20,
            under_attack: false,
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let r = Routes::new(vec![
            route("*", "/", "fallback"),
            route("*.example.com", "/", "wild"),
            route("app.example.com", "/", "app"),
            route("app.example.com", "/api", "api"),
        ]);
        let svc = |h: &str, p: &str| r.lookup(h, p).map(|r| r.service());
        assert_eq!(svc("app.example.com", "/api/x"), Some("api"));
        assert_eq!(svc("app.example.com", "/apix"), Some("app"));
        assert_eq!(svc("app.example.com", "/"), Some("app"));
        assert_eq!(svc("other.example.com", "/"), Some("wild"));
        assert_eq!(svc("example.com", "/"), Some("fallback"));
        assert_eq!(svc("evil-example.com", "/"), Some("fallback"));
        let strict = Routes::new(vec![route("app.example.com", "/", "app")]);
        assert!(strict.lookup("x.com", "/").is_none());
    }
}
