//! `/cache/<name>?<options>`: responses whose caching headers the request chooses, and a
//! count of how many reached the origin (`/counts`), so tests and benchmarks can see what
//! a cache in front of the origin did.
//!
//! Options (query parameters, all optional): `cc` (`Cache-Control`), `etag`, `lm`
//! (`Last-Modified`, an HTTP date), `vary`, `tag` (`Cache-Tag`), `cookie=1` (a
//! `Set-Cookie`), `status`, `size` (a body of that many bytes instead of the default text),
//! `delay_ms` (wait before answering). A request whose `If-None-Match` matches `etag`
//! gets `304`. The body names the count of this path, so a test can tell a cached answer
//! (an old count) from a fresh one. `/counts` also holds `_all` (every request but
//! `/counts` and `/health`) and `_forwarded` (those that came through a proxy: they carry
//! `X-Forwarded-For`), so a run can tell how much a cache saved the origin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

/// Paths counted at most; past it new paths are not counted (the counts are for tests).
const MAX_PATHS: usize = 10_000;

/// Requests per path.
#[derive(Debug, Default)]
pub struct Counts(Mutex<HashMap<String, u64>>);

impl Counts {
    /// Counts any request (`forwarded`: it came through a proxy).
    pub fn request(&self, forwarded: bool) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry("_all".into()).or_insert(0) += 1;
            if forwarded {
                *m.entry("_forwarded".into()).or_insert(0) += 1;
            }
        }
    }

    /// Counts one request to `path`; returns its count.
    fn hit(&self, path: &str) -> u64 {
        let Ok(mut m) = self.0.lock() else {
            return 0;
        };
        if !m.contains_key(path) && m.len() >= MAX_PATHS {
            return 0;
        }
        let n = m.entry(path.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    /// All counts as JSON.
    pub fn json(&self) -> String {
        let m = self.0.lock().map(|m| m.clone()).unwrap_or_default();
        serde_json::to_string(&m).unwrap_or_default()
    }
}

fn options(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Answers `/cache/...`; `body` makes the response body.
pub async fn respond<B>(
    req: &Request<Incoming>,
    counts: &Counts,
    body: impl FnOnce(Vec<u8>) -> B,
) -> Response<B> {
    let path = req.uri().path().to_owned();
    let n = counts.hit(&path);
    let o = options(req.uri().query());
    if let Some(ms) = o.get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(30_000))).await;
    }
    let mut headers = HeaderMap::new();
    let mut set = |name: header::HeaderName, key: &str| {
        if let Some(v) = o.get(key).and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, v);
        }
    };
    set(header::CACHE_CONTROL, "cc");
    set(header::ETAG, "etag");
    set(header::LAST_MODIFIED, "lm");
    set(header::VARY, "vary");
    set(header::HeaderName::from_static("cache-tag"), "tag");
    if o.get("cookie").is_some_and(|v| v == "1") {
        headers.insert(
            header::SET_COOKIE,
            HeaderValue::from_static("session=abc; Path=/"),
        );
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let etag_matches = match (o.get("etag"), req.headers().get(header::IF_NONE_MATCH)) {
        (Some(e), Some(inm)) => inm
            .to_str()
            .is_ok_and(|i| i.split(',').any(|t| t.trim() == e)),
        _ => false,
    };
    let status = if etag_matches {
        StatusCode::NOT_MODIFIED
    } else {
        o.get("status")
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK)
    };
    let content = if status == StatusCode::NOT_MODIFIED {
        Vec::new()
    } else if let Some(size) = o.get("size").and_then(|v| v.parse::<usize>().ok()) {
        (0..size.min(64 << 20))
            .map(|i| b'a' + (i % 26) as u8)
            .collect()
    } else {
        let vary_value = o
            .get("vary")
            .and_then(|v| req.headers().get(v.as_str()))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        format!("{path} count={n} vary-value={vary_value}\n").into_bytes()
    };
    let mut res = Response::new(body(content));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}
