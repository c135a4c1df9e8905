//! A stored response: its head, its body (in memory or in a file), and when it may be
//! served as it is, stale while refreshed, or stale when the origin fails.
//!
//! HTTP's caching rules come from the `http-cache-semantics` crate (RFC 9111: storability,
//! freshness lifetime, `Age`, `Vary` matching, the conditional request that revalidates,
//! merging a `304`). The rule on top may override the lifetime (`edge_ttl_s`) or cache
//! what HTTP would not (`everything`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_cache_semantics::{CacheOptions, CachePolicy, RequestLike, ResponseLike};

use crate::config::cache::{Mode, Rule};

/// Fresh for this long in `everything` mode when the rule gives no `edge_ttl_s`.
pub const EVERYTHING_DEFAULT_TTL: Duration = Duration::from_secs(2 * 3600);

/// Statuses `everything` caches (RFC 9110 §15.1's heuristically cacheable ones).
const EVERYTHING_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// The tags an origin gives a response (`Cache-Tag: a, b`), for purge by tag.
pub static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// The request as the cache sees it: the key's URL (so requests that differ only in
/// ignored query parameters are the same request), method and headers.
#[derive(Clone, Debug)]
pub struct CacheRequest {
    /// `https://<key URL>`.
    pub uri: http::Uri,
    /// Method (GET; HEAD is answered from a GET's object).
    pub method: Method,
    /// The client's headers.
    pub headers: HeaderMap,
}

impl RequestLike for CacheRequest {
    fn uri(&self) -> http::Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &http::Uri) -> bool {
        &self.uri == other
    }
    fn method(&self) -> &Method {
        &self.method
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// A response head, for the policy.
#[derive(Clone, Debug)]
pub struct Head {
    /// Status.
    pub status: StatusCode,
    /// Header fields (hop-by-hop ones already removed).
    pub headers: HeaderMap,
}

impl ResponseLike for Head {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// Where a body is.
#[derive(Clone, Debug)]
pub enum Body {
    /// In memory, as the chunks it arrived in (shared, never copied).
    Memory(Arc<[Bytes]>),
    /// In a file of the disk tier, after its header.
    Disk {
        /// The file.
        path: PathBuf,
        /// Where the body starts.
        offset: u64,
    },
}

/// One stored response.
#[derive(Clone, Debug)]
pub struct Object {
    /// The cache key.
    pub key: String,
    /// HTTP's view of it.
    pub policy: CachePolicy,
    /// Status and headers as stored.
    pub head: Head,
    /// The body.
    pub body: Body,
    /// Body length.
    pub len: u64,
    /// When it was stored (purges remove what is older than them).
    pub stored: SystemTime,
    /// Until when it is served as it is.
    pub fresh_until: SystemTime,
    /// How long past that it is served while being refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// How long past that it is served when the origin fails.
    pub stale_if_error: Duration,
    /// `Cache-Tag` values.
    pub tags: Vec<String>,
    /// The browser TTL of its rule, if any.
    pub browser_ttl: Option<Duration>,
    /// The request header values its `Vary` names, as stored (see [`variant_of`]): two
    /// objects of a key with the same one are the same variant.
    pub variant: String,
}

/// The `Vary` selection of a response `head` to a request with `req_headers`: each
/// header the response varies on, with the request's value.
pub fn variant_of(head: &HeaderMap, req_headers: &HeaderMap) -> String {
    let mut names: Vec<String> = head
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    let mut out = String::new();
    for n in names {
        out.push_str(&n);
        out.push('=');
        for v in req_headers.get_all(n.as_str()) {
            out.push_str(&String::from_utf8_lossy(v.as_bytes()));
            out.push(',');
        }
        out.push('\n');
    }
    out
}

/// How usable an object is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh it in the background.
    StaleWhileRevalidate,
    /// Revalidate first; if the origin fails, it may still be served.
    StaleIfError,
    /// Revalidate first; it is no use if the origin fails.
    Expired,
}

impl Object {
    /// Freshness at `now`.
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.fresh_until + self.stale_while_revalidate {
            Freshness::StaleWhileRevalidate
        } else if now < self.fresh_until + self.stale_if_error {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Whether it may be served past its freshness on an origin failure at `now`.
    pub fn usable_on_error(&self, now: SystemTime) -> bool {
        now < self.fresh_until + self.stale_if_error.max(self.stale_while_revalidate)
    }

    /// Seconds it stays fresh from `now` (0 when stale).
    pub fn ttl_s(&self, now: SystemTime) -> u64 {
        self.fresh_until
            .duration_since(now)
            .map_or(0, |d| d.as_secs())
    }

    /// Whether `req` may use this object: same `Vary` selection (the policy's check).
    pub fn matches(&self, req: &CacheRequest) -> bool {
        // Without `Vary` every request for the key (URL and host are the key; only GET
        // responses are kept, and GET and HEAD read them) matches. Asking the policy would
        // also build a whole response head, the largest cost of a hit.
        if self.variant.is_empty() {
            return true;
        }
        match self.policy.before_request(req, SystemTime::now()) {
            http_cache_semantics::BeforeRequest::Fresh(_) => true,
            http_cache_semantics::BeforeRequest::Stale { matches, .. } => matches,
        }
    }

    /// What the cache keeps for it, bytes (body plus an estimate of the head).
    pub fn weight(&self) -> u32 {
        let head: usize = self
            .head
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        (self.len as usize + head + self.key.len() + 512).min(u32::MAX as usize) as u32
    }
}

/// The decision on a response: whether and how long to keep it.
#[derive(Debug)]
pub struct Storable {
    /// HTTP's policy.
    pub policy: CachePolicy,
    /// Fresh until.
    pub fresh_until: SystemTime,
    /// Stale-while-revalidate window.
    pub stale_while_revalidate: Duration,
    /// Stale-if-error window.
    pub stale_if_error: Duration,
}

/// A `Cache-Control` directive's seconds (`stale-if-error=60`).
fn directive_s(headers: &HeaderMap, name: &str) -> Option<Duration> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| d.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.trim().trim_matches('"').parse().ok())
        .map(Duration::from_secs)
}

/// Whether (and how long) to keep the response `head` to `req` under `rule`, at `now`.
pub fn storable(
    req: &CacheRequest,
    head: &Head,
    rule: Option<&Rule>,
    now: SystemTime,
) -> Option<Storable> {
    let mode = rule.map_or(Mode::Standard, |r| r.mode);
    if mode == Mode::Bypass || req.method != Method::GET {
        return None;
    }
    let sets_cookie = head.headers.contains_key(http::header::SET_COOKIE);
    if sets_cookie && !rule.is_some_and(|r| r.cache_set_cookie) {
        return None;
    }
    // A response with `Vary: *` matches no later request: keeping it is pointless.
    let vary_star = head.headers.get_all(http::header::VARY).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|p| p.trim_ascii() == b"*")
    });
    if vary_star {
        return None;
    }
    let policy = CachePolicy::new_options(req, head, now, CacheOptions::default());
    let ttl = match mode {
        Mode::Everything => {
            if !EVERYTHING_STATUSES.contains(&head.status.as_u16()) {
                return None;
            }
            rule.and_then(|r| r.edge_ttl)
                .unwrap_or(EVERYTHING_DEFAULT_TTL)
        }
        _ => {
            if !policy.is_storable() {
                return None;
            }
            match rule.and_then(|r| r.edge_ttl) {
                Some(t) => t,
                None => policy.time_to_live(now),
            }
        }
    };
    let stale_while_revalidate = rule
        .and_then(|r| r.stale_while_revalidate)
        .or_else(|| directive_s(&head.headers, "stale-while-revalidate"))
        .unwrap_or_default();
    let stale_if_error = rule
        .and_then(|r| r.stale_if_error)
        .or_else(|| directive_s(&head.headers, "stale-if-error"))
        .unwrap_or_default();
    if ttl.is_zero()
        && stale_while_revalidate.is_zero()
        && stale_if_error.is_zero()
        && !has_validator(&head.headers)
    {
        return None;
    }
    Some(Storable {
        policy,
        fresh_until: now + ttl,
        stale_while_revalidate,
        stale_if_error,
    })
}

/// Whether the response can be revalidated (an ETag or Last-Modified).
fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::ETAG) || headers.contains_key(http::header::LAST_MODIFIED)
}

/// The `Cache-Tag` values of a response.
pub fn tags_of(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(&CACHE_TAG)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .take(64)
        .collect()
}

/// The headers of a response served from `obj` at `now`: the stored ones, `Age`, and the
/// browser's `Cache-Control` when the rule sets one.
pub fn served_headers(obj: &Object, now: SystemTime) -> HeaderMap {
    let mut h = obj.head.headers.clone();
    let age = obj.policy.age(now).as_secs();
    h.insert(http::header::AGE, HeaderValue::from(age));
    if let Some(t) = obj.browser_ttl {
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_str(&format!("max-age={}", t.as_secs()))
                .unwrap_or(HeaderValue::from_static("no-cache")),
        );
    }
    // The tags are for the edge's purges, not for browsers.
    h.remove(&CACHE_TAG);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> CacheRequest {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "a.example".parse().expect("value"));
        for (k, v) in headers {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        CacheRequest {
            uri: "https://a.example/p".parse().expect("uri"),
            method: Method::GET,
            headers: h,
        }
    }

    fn head(status: u16, headers: &[(&str, &str)]) -> Head {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        Head {
            status: StatusCode::from_u16(status).expect("status"),
            headers: h,
        }
    }

    fn rule(mode: Mode) -> Rule {
        Rule {
            host: "*".into(),
            path_prefix: "/".into(),
            mode,
            edge_ttl: None,
            browser_ttl: None,
            ignore_query: false,
            ignore_params: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            stale_while_revalidate: None,
            stale_if_error: None,
            cache_set_cookie: false,
        }
    }

    #[test]
    fn standard_follows_the_origin_and_overrides_apply() {
        let now = SystemTime::now();
        let r = req(&[]);
        let s = storable(
            &r,
            &head(200, &[("cache-control", "max-age=60")]),
            None,
            now,
        )
        .expect("storable");
        assert_eq!(
            s.fresh_until.duration_since(now).expect("later"),
            Duration::from_secs(60)
        );
        assert!(storable(&r, &head(200, &[("cache-control", "no-store")]), None, now).is_none());
        assert!(
            storable(
                &r,
                &head(200, &[("cache-control", "private, max-age=60")]),
                None,
                now
            )
            .is_none()
        );
        assert!(
            storable(
                &r,
                &head(
                    200,
                    &[("cache-control", "max-age=60"), ("set-cookie", "a=1")]
                ),
                None,
                now
            )
            .is_none()
        );
        let mut with_ttl = rule(Mode::Standard);
        with_ttl.edge_ttl = Some(Duration::from_secs(5));
        let s = storable(
            &r,
            &head(200, &[("cache-control", "max-age=60")]),
            Some(&with_ttl),
            now,
        )
        .expect("storable");
        assert_eq!(
            s.fresh_until.duration_since(now).expect("later"),
            Duration::from_secs(5)
        );
        assert!(
            storable(
                &r,
                &head(200, &[("cache-control", "max-age=60")]),
                Some(&rule(Mode::Bypass)),
                now
            )
            .is_none()
        );
    }

    #[test]
    fn everything_caches_what_the_origin_would_not_but_not_cookies_or_errors() {
        let now = SystemTime::now();
        let r = req(&[]);
        let all = rule(Mode::Everything);
        let s = storable(
            &r,
            &head(200, &[("cache-control", "no-cache, private")]),
            Some(&all),
            now,
        )
        .expect("storable");
        assert_eq!(
            s.fresh_until.duration_since(now).expect("later"),
            EVERYTHING_DEFAULT_TTL
        );
        assert!(storable(&r, &head(500, &[]), Some(&all), now).is_none());
        assert!(storable(&r, &head(200, &[("set-cookie", "a=1")]), Some(&all), now).is_none());
        let mut cookies = rule(Mode::Everything);
        cookies.cache_set_cookie = true;
        assert!(
            storable(
                &r,
                &head(200, &[("set-cookie", "a=1")]),
                Some(&cookies),
                now
            )
            .is_some()
        );
        assert!(storable(&r, &head(200, &[("vary", "*")]), Some(&all), now).is_none());
    }

    #[test]
    fn stale_windows_come_from_the_rule_or_the_origin() {
        let now = SystemTime::now();
        let r = req(&[]);
        let s = storable(
            &r,
            &head(
                200,
                &[(
                    "cache-control",
                    "max-age=10, stale-while-revalidate=30, stale-if-error=300",
                )],
            ),
            None,
            now,
        )
        .expect("storable");
        assert_eq!(s.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(s.stale_if_error, Duration::from_secs(300));
        let obj = Object {
            key: "k".into(),
            policy: s.policy,
            head: head(200, &[]),
            body: Body::Memory(Arc::from(Vec::new())),
            len: 0,
            stored: now,
            fresh_until: s.fresh_until,
            stale_while_revalidate: s.stale_while_revalidate,
            stale_if_error: s.stale_if_error,
            tags: Vec::new(),
            browser_ttl: None,
            variant: String::new(),
        };
        assert_eq!(obj.freshness(now), Freshness::Fresh);
        assert_eq!(
            obj.freshness(now + Duration::from_secs(20)),
            Freshness::StaleWhileRevalidate
        );
        assert_eq!(
            obj.freshness(now + Duration::from_secs(100)),
            Freshness::StaleIfError
        );
        assert_eq!(
            obj.freshness(now + Duration::from_secs(400)),
            Freshness::Expired
        );
    }

    #[test]
    fn vary_selects_the_variant() {
        let now = SystemTime::now();
        let gz = req(&[("accept-encoding", "gzip")]);
        let varies = head(
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
        );
        let s = storable(&gz, &varies, None, now).expect("storable");
        let obj = Object {
            key: "k".into(),
            policy: s.policy,
            variant: variant_of(&varies.headers, &gz.headers),
            head: varies,
            body: Body::Memory(Arc::from(Vec::new())),
            len: 0,
            stored: now,
            fresh_until: s.fresh_until,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            tags: vec![],
            browser_ttl: None,
        };
        assert!(obj.matches(&req(&[("accept-encoding", "gzip")])));
        assert!(!obj.matches(&req(&[("accept-encoding", "br")])));
        assert!(!obj.matches(&req(&[])));
        assert_eq!(
            tags_of(&head(200, &[("cache-tag", "a, b"), ("cache-tag", "c")]).headers),
            ["a", "b", "c"]
        );
        let vary = head(200, &[("vary", "Accept-Encoding, accept-language")]).headers;
        assert_eq!(
            variant_of(&vary, &req(&[("accept-encoding", "gzip")]).headers),
            "accept-encoding=gzip,\naccept-language=\n"
        );
    }
}
