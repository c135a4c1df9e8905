//! Host and path routing to connector services.

use crate::config::Route;

/// Routes, matched most-specific first: exact host before `*.parent` before `*`, then the
/// longest path prefix.
#[derive(Clone, Debug)]
pub struct Routes {
    routes: Vec<Route>,
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
        Self { routes }
    }

    /// The best route for a host and path.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .filter_map(|r| {
                let rank = host_rank(&r.host, host)?;
                path_matches(&r.path_prefix, path).then_some((rank, r.path_prefix.len(), r))
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
        let svc = |h: &str, p: &str| r.lookup(h, p).map(|r| r.service.as_str());
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
