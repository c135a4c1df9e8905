//! The edge's HTTP cache: RFC 9111 semantics (the `http-cache-semantics` crate) with
//! rules on top, a memory tier and an optional disk tier, request coalescing, serve-stale,
//! and purges that reach every edge of the mesh.
//!
//! This module keeps objects and answers from them; the request phase that decides hit,
//! miss, refresh or bypass is [`crate::phases::cache`].

pub mod fill;
pub mod key;
pub mod object;
pub mod purge;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use serde::Serialize;

use crate::body::{ProxyBody, empty};
use crate::config::cache::CacheConfig;
use fill::Fill;
use object::{Body, CacheRequest, Object};
use store::{Disk, Memory, TierStats};

/// The `Cache-Status` field (RFC 9211).
pub static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// What a fetch is to a request that wanted it.
#[derive(Debug)]
pub enum Role {
    /// It started the fetch and must drive it.
    Leader(Arc<Fill>),
    /// Another request's fetch is running: wait for it.
    Follower(Arc<Fill>),
}

/// Results counted for the hit ratio.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Served from the cache while being refreshed, or because the origin failed.
    Stale,
    /// Fetched (and maybe stored).
    Miss,
    /// Fetched once for several requests; this one waited.
    Coalesced,
    /// Revalidated with the origin (a 304 refreshed it).
    Revalidated,
    /// Not cacheable by rule or method.
    Bypass,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Hit,
        Outcome::Stale,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Revalidated,
        Outcome::Bypass,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Revalidated => "revalidated",
            Outcome::Bypass => "bypass",
        }
    }
}

/// Counts since start, for `/status`.
#[derive(Debug, Default)]
struct Counts {
    hit: AtomicU64,
    stale: AtomicU64,
    miss: AtomicU64,
    coalesced: AtomicU64,
    revalidated: AtomicU64,
    bypass: AtomicU64,
    stored: AtomicU64,
    stored_bytes: AtomicU64,
    purged: AtomicU64,
}

/// The cache of one edge.
pub struct Cache {
    /// Its config.
    pub config: CacheConfig,
    memory: Memory,
    disk: Option<Arc<Disk>>,
    fills: Mutex<HashMap<String, Arc<Fill>>>,
    counts: Counts,
    /// `skylane_cache_requests_total{result}`, one handle per outcome, registered at the
    /// first request (after the metrics recorder is installed): a lookup by name and
    /// labels per request would cost a hash of both every time.
    outcome_counters: std::sync::OnceLock<[metrics::Counter; 6]>,
    /// Purges applied (their bulletin ids), so each is applied once.
    pub(crate) applied_purges: Mutex<HashMap<String, purge::Applied>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

/// The cache's part of `/status`.
#[derive(Debug, Serialize)]
pub struct CacheStatus {
    /// Memory tier.
    pub memory: TierStats,
    /// Disk tier, if configured.
    pub disk: Option<TierStats>,
    /// Requests answered from the cache (fresh or stale) over those that could have been.
    pub hit_ratio: f64,
    /// Counts by outcome.
    pub requests: HashMap<&'static str, u64>,
    /// Objects stored since start, and their bytes.
    pub stored: u64,
    /// Bytes stored since start.
    pub stored_bytes: u64,
    /// Objects removed by purges.
    pub purged: u64,
    /// Fetches running now.
    pub fills: usize,
    /// The purges this edge applied (newest first).
    pub purges: Vec<purge::Applied>,
}

impl Cache {
    /// A cache under `config`, opening its disk tier.
    pub fn new(config: CacheConfig) -> std::io::Result<Self> {
        let disk = match &config.disk_dir {
            Some(dir) => Some(Arc::new(Disk::open(dir, config.disk_bytes)?)),
            None => None,
        };
        Ok(Self {
            memory: Memory::new(config.memory_bytes),
            disk,
            config,
            fills: Mutex::new(HashMap::new()),
            counts: Counts::default(),
            outcome_counters: std::sync::OnceLock::new(),
            applied_purges: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a request's outcome.
    pub fn count(&self, outcome: Outcome) {
        let c = &self.counts;
        let counter = match outcome {
            Outcome::Hit => &c.hit,
            Outcome::Stale => &c.stale,
            Outcome::Miss => &c.miss,
            Outcome::Coalesced => &c.coalesced,
            Outcome::Revalidated => &c.revalidated,
            Outcome::Bypass => &c.bypass,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let counters = self.outcome_counters.get_or_init(|| {
            Outcome::ALL
                .map(|o| metrics::counter!("skylane_cache_requests_total", "result" => o.label()))
        });
        counters[outcome as usize].increment(1);
    }

    /// The stored variant of `key` that the request may use: memory first, then disk.
    /// `request` makes the request as the policy compares it; it is made only when a
    /// stored object varies (`Vary`), so a plain hit does not copy the request's headers.
    pub fn lookup(&self, key: &str, request: impl Fn() -> CacheRequest) -> Option<Arc<Object>> {
        let made = std::cell::OnceCell::new();
        let find = |variants: store::Variants| {
            variants
                .iter()
                .find(|o| o.variant.is_empty() || o.matches(made.get_or_init(&request)))
                .cloned()
        };
        if let Some(o) = self.memory.get(key).and_then(find) {
            return Some(o);
        }
        self.disk.as_ref()?.get(key).and_then(find)
    }

    /// Joins the fetch of `key`, or starts it.
    pub fn fill_for(&self, key: &str, headers: &HeaderMap) -> Role {
        let Ok(mut fills) = self.fills.lock() else {
            return Role::Leader(Fill::new(headers.clone()));
        };
        if let Some(f) = fills.get(key) {
            return Role::Follower(f.clone());
        }
        let f = Fill::new(headers.clone());
        fills.insert(key.to_owned(), f.clone());
        Role::Leader(f)
    }

    /// The fetch of `key` ended (it no longer takes followers).
    pub fn fill_done(&self, key: &str, fill: &Arc<Fill>) {
        if let Ok(mut fills) = self.fills.lock()
            && fills.get(key).is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            fills.remove(key);
        }
    }

    /// Keeps `obj` (its body in memory): in memory, and on disk when there is one.
    pub fn store(&self, obj: Object, max_variants: usize) {
        let obj = Arc::new(obj);
        let same = |o: &Object| same_variant(o, &obj);
        let mut variants: Vec<Arc<Object>> = self
            .memory
            .get(&obj.key)
            .map(|v| v.iter().filter(|o| !same(o)).cloned().collect())
            .unwrap_or_default();
        if variants.len() >= max_variants {
            variants.remove(0);
        }
        variants.push(obj.clone());
        self.memory.put(obj.key.clone(), Arc::new(variants));
        self.counts.stored.fetch_add(1, Ordering::Relaxed);
        self.counts
            .stored_bytes
            .fetch_add(obj.len, Ordering::Relaxed);
        metrics::counter!("skylane_cache_stored_bytes_total").increment(obj.len);
        if let Some(disk) = self.disk.clone() {
            tokio::task::spawn_blocking(move || {
                let stored = obj.clone();
                if let Err(e) = disk.put(&obj, |o| same_variant(o, &stored)) {
                    tracing::warn!(error = %e, "cache object not written to disk");
                }
            });
        }
    }

    /// Removes what `doomed` picks from both tiers; returns how many objects went.
    pub fn remove_where(&self, doomed: impl Fn(&str, &Object) -> bool + Copy) -> u64 {
        let n = self.memory.remove_where(doomed)
            + self.disk.as_ref().map_or(0, |d| d.remove_where(doomed));
        self.counts.purged.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Requests answered from the cache (fresh, stale, revalidated or coalesced) over those
    /// that could have been (those and the misses), since start.
    pub fn hit_ratio(&self) -> f64 {
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let served = get(&c.hit) + get(&c.stale) + get(&c.revalidated) + get(&c.coalesced);
        let cacheable = served + get(&c.miss);
        if cacheable == 0 {
            0.0
        } else {
            served as f64 / cacheable as f64
        }
    }

    /// `/status`.
    pub fn status(&self) -> CacheStatus {
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (hit, stale, miss, coalesced, revalidated, bypass) = (
            get(&c.hit),
            get(&c.stale),
            get(&c.miss),
            get(&c.coalesced),
            get(&c.revalidated),
            get(&c.bypass),
        );
        let mut purges: Vec<purge::Applied> = self
            .applied_purges
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        purges.sort_by_key(|p| std::cmp::Reverse(p.applied_unix_ms));
        purges.truncate(20);
        CacheStatus {
            memory: self.memory.stats(),
            disk: self.disk.as_ref().map(|d| d.stats()),
            hit_ratio: self.hit_ratio(),
            requests: HashMap::from([
                ("hit", hit),
                ("stale", stale),
                ("miss", miss),
                ("coalesced", coalesced),
                ("revalidated", revalidated),
                ("bypass", bypass),
            ]),
            stored: get(&c.stored),
            stored_bytes: get(&c.stored_bytes),
            purged: get(&c.purged),
            fills: self.fills.lock().map_or(0, |f| f.len()),
            purges,
        }
    }
}

/// Whether two objects of one key stand for the same variant (the same `Vary` selection).
fn same_variant(a: &Object, b: &Object) -> bool {
    a.variant == b.variant
}

/// The `Cache-Status` value for a response, e.g. `skylane; hit; ttl=120`.
pub fn cache_status(parts: &[&str]) -> HeaderValue {
    let mut s = String::from("skylane");
    for p in parts.iter().filter(|p| !p.is_empty()) {
        s.push_str("; ");
        s.push_str(p);
    }
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("skylane"))
}

/// A single byte range of a `length`-byte body, from a `Range` header; `None` when there
/// is none or it is one we answer with the whole body (several ranges, another unit).
/// `Err(())`: not satisfiable (416).
pub fn byte_range(headers: &HeaderMap, length: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = spec.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    let range = match (start.is_empty(), end.is_empty()) {
        (true, true) => return None,
        (true, false) => {
            let n: u64 = end.parse().ok()?;
            if n == 0 || length == 0 {
                return Some(Err(()));
            }
            (length.saturating_sub(n), length - 1)
        }
        (false, _) => {
            let s: u64 = start.parse().ok()?;
            let e: u64 = if end.is_empty() {
                length.saturating_sub(1)
            } else {
                end.parse().ok()?
            };
            if s >= length || e < s {
                return Some(Err(()));
            }
            (s, e.min(length - 1))
        }
    };
    Some(Ok(range))
}

/// Whether the client's validators (`If-None-Match`, `If-Modified-Since`) already
/// hold this response: then a 304 answers it.
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    match (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok()),
        stored
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok()),
    ) {
        (Some(since), Some(modified)) => match (
            httpdate::parse_http_date(since),
            httpdate::parse_http_date(modified),
        ) {
            (Ok(since), Ok(modified)) => modified <= since,
            _ => false,
        },
        _ => false,
    }
}

/// The response to `method` with `req_headers` from `obj` at `now`, with `status_parts`
/// for `Cache-Status`: the whole body, a byte range of it (206), 304 when the client's
/// validators hold, 416 for a range outside it, and no body for HEAD.
pub async fn respond(
    obj: &Object,
    method: &Method,
    req_headers: &HeaderMap,
    now: SystemTime,
    status_parts: &[&str],
) -> Response<ProxyBody> {
    let mut headers = object::served_headers(obj, now);
    headers.insert(CACHE_STATUS.clone(), cache_status(status_parts));
    if obj.head.status == StatusCode::OK && not_modified(req_headers, &obj.head.headers) {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
        ] {
            headers.remove(name);
        }
        *r.headers_mut() = headers;
        return r;
    }
    let range = if obj.head.status == StatusCode::OK {
        byte_range(req_headers, obj.len)
    } else {
        None
    };
    let (status, start, len) = match range {
        None => (obj.head.status, 0, obj.len),
        Some(Ok((s, e))) => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {s}-{e}/{}", obj.len))
                    .unwrap_or(HeaderValue::from_static("")),
            );
            (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
        }
        Some(Err(())) => {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", obj.len))
                    .unwrap_or(HeaderValue::from_static("")),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            *r.headers_mut() = headers;
            return r;
        }
    };
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if !(obj.head.status == StatusCode::NO_CONTENT || obj.head.status == StatusCode::NOT_MODIFIED) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let body = if *method == Method::HEAD {
        empty()
    } else {
        body_slice(&obj.body, start, len).await
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// `len` bytes of a body from `start`.
async fn body_slice(body: &Body, start: u64, len: u64) -> ProxyBody {
    match body {
        Body::Memory(chunks) => {
            let mut out: Vec<Bytes> = Vec::new();
            let (mut skip, mut want) = (start, len);
            for c in chunks.iter() {
                if want == 0 {
                    break;
                }
                let clen = c.len() as u64;
                if skip >= clen {
                    skip -= clen;
                    continue;
                }
                let take = (clen - skip).min(want);
                out.push(c.slice(skip as usize..(skip + take) as usize));
                want -= take;
                skip = 0;
            }
            let stream = futures_util::stream::iter(
                out.into_iter().map(|b| Ok(hyper::body::Frame::data(b))),
            );
            http_body_util::StreamBody::new(stream).boxed_unsync()
        }
        Body::Disk { path, offset } => {
            use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
            let opened = async {
                let mut f = tokio::fs::File::open(path).await?;
                f.seek(std::io::SeekFrom::Start(offset + start)).await?;
                Ok::<_, std::io::Error>(f.take(len))
            };
            match opened.await {
                Ok(reader) => {
                    let stream = futures_util::StreamExt::map(
                        tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024),
                        |r| r.map(hyper::body::Frame::data),
                    );
                    http_body_util::StreamBody::new(stream).boxed_unsync()
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cache file unreadable");
                    let stream = futures_util::stream::iter([Err(e)]);
                    http_body_util::StreamBody::new(stream).boxed_unsync()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_counters_are_indexed_by_the_outcome() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        m
    }

    #[test]
    fn ranges() {
        assert_eq!(
            byte_range(&h(&[("range", "bytes=0-9")]), 100),
            Some(Ok((0, 9)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=90-")]), 100),
            Some(Ok((90, 99)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=-10")]), 100),
            Some(Ok((90, 99)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=50-500")]), 100),
            Some(Ok((50, 99)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=100-")]), 100),
            Some(Err(()))
        );
        assert_eq!(byte_range(&h(&[("range", "bytes=0-1,5-6")]), 100), None);
        assert_eq!(byte_range(&h(&[("range", "items=0-1")]), 100), None);
        assert_eq!(byte_range(&h(&[]), 100), None);
    }

    #[test]
    fn validators() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        assert!(not_modified(&h(&[("if-none-match", "\"v1\"")]), &stored));
        assert!(not_modified(
            &h(&[("if-none-match", "W/\"v1\", \"v0\"")]),
            &stored
        ));
        assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &stored));
        assert!(not_modified(
            &h(&[("if-modified-since", "Tue, 01 Dec 2026 11:00:00 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "Tue, 01 Dec 2026 09:00:00 GMT")]),
            &stored
        ));
        assert_eq!(cache_status(&["hit", "ttl=5"]), "skylane; hit; ttl=5");
    }
}
