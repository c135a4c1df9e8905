//! The cache phase: between the request filter and upstream, it answers from the cache,
//! or fetches once for everyone who asks at the same time, or steps aside.
//!
//! | the request finds | what happens | `Cache-Status` |
//! |---|---|---|
//! | a bypass rule, a method other than GET/HEAD, an upgrade, credentials | upstream, nothing kept | `fwd=bypass` |
//! | a fresh object | served from it (ranges, HEAD and `304` too) | `hit; ttl=N` |
//! | an object in its stale-while-revalidate window | served, and refreshed in the background | `hit; ttl=-N; detail=stale-while-revalidate` |
//! | another request's fetch of it | waits for its head (at most the coalescing wait), then reads the same body | `fwd=miss; collapsed` |
//! | nothing, or a stale object | one fetch (conditional when there is a stale object): a `304` refreshes it; a failure or 5xx serves it stale while its stale-if-error window lasts; a storable answer is kept while it streams | `fwd=miss; stored`, `fwd=stale; fwd-status=304`, `fwd=stale; fwd-status=502; detail=stale-if-error` |

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, Incoming};

use crate::body::{ProxyBody, empty};
use crate::cache::fill::{Fill, Outcome as FillOutcome};
use crate::cache::object::{self, Body, CacheRequest, Freshness, Head, Object};
use crate::cache::{self, CACHE_STATUS, Cache, Outcome, Role, key};
use crate::config::cache::{Mode, Rule};
use crate::errors::EdgeError;
use crate::phases::RequestCtx;
use crate::phases::upstream::{self, Held};
use crate::proxy::Edge;
use crate::routes::Routed;

/// Request headers that make the client's own question (validators, ranges): a fetch to
/// fill the cache asks for the whole object instead.
const CLIENT_CONDITIONALS: &[header::HeaderName] = &[
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Chunks the fetch may be ahead of the client that started it.
const LEADER_CHANNEL: usize = 16;

/// A stored response's headers as the browser gets them: the rule's browser TTL in
/// `Cache-Control`, and no `Cache-Tag` (that is for the edge's purges).
fn for_browser(headers: &mut HeaderMap, rule: Option<&Rule>) {
    if let Some(t) = rule.and_then(|r| r.browser_ttl)
        && let Ok(v) = HeaderValue::from_str(&format!("max-age={}", t.as_secs()))
    {
        headers.insert(header::CACHE_CONTROL, v);
    }
    headers.remove(&object::CACHE_TAG);
}

fn with_status(mut resp: Response<ProxyBody>, parts: &[&str]) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(CACHE_STATUS.clone(), cache::cache_status(parts));
    resp
}

fn client_no_cache(headers: &HeaderMap) -> bool {
    let says = |name: header::HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
            })
    };
    says(header::CACHE_CONTROL) || says(header::PRAGMA)
}

/// Handles a request that passed the request filter, with the cache in front of upstream.
pub async fn handle(
    edge: Arc<Edge>,
    cache: &Arc<Cache>,
    ctx: &RequestCtx,
    route: &Routed,
    req: Request<Incoming>,
    held: Held,
) -> Response<ProxyBody> {
    let rules = edge.cache_rules.clone();
    let rule = key::rule_for(&rules, &ctx.host, req.uri().path());
    let mode = key::mode_of(rule);
    let method = req.method().clone();
    let cacheable = (method == Method::GET || method == Method::HEAD)
        && mode != Mode::Bypass
        && upstream::wants_upgrade(&req).is_none()
        && (!req.headers().contains_key(header::AUTHORIZATION) || mode == Mode::Everything);
    if !cacheable {
        cache.count(Outcome::Bypass);
        let resp = upstream::forward(edge, ctx, route, req, held).await;
        return with_status(resp, &["fwd=bypass"]);
    }
    let key = key::key(
        &ctx.host,
        req.uri().path(),
        req.uri().query(),
        rule,
        req.headers(),
    );
    let now = SystemTime::now();
    let revalidate = mode == Mode::Standard && client_no_cache(req.headers());
    let stale = match cache.lookup(&key, || cache_request(&key, &ctx.host, req.headers())) {
        Some(obj) => match obj.freshness(now) {
            Freshness::Fresh if !revalidate => {
                cache.count(Outcome::Hit);
                let ttl = format!("ttl={}", obj.ttl_s(now));
                return cache::respond(&obj, &method, req.headers(), now, &["hit", &ttl]).await;
            }
            Freshness::StaleWhileRevalidate if !revalidate => {
                cache.count(Outcome::Stale);
                if let Role::Leader(fill) = cache.fill_for(&key, req.headers()) {
                    // Refresh in the background; nobody waits for it.
                    let creq = cache_request(&key, &ctx.host, req.headers());
                    let parts = fetch_parts(&req, Some(&obj), &creq);
                    let (tx, _) = tokio::sync::oneshot::channel();
                    let fetch = Fetch::new(
                        edge.clone(),
                        cache.clone(),
                        ctx,
                        route,
                        key.clone(),
                        fill,
                        Some(obj.clone()),
                        rule.cloned(),
                        creq,
                    );
                    tokio::spawn(fetch.run(parts, held, tx));
                }
                let ttl = format!(
                    "ttl=-{}",
                    now.duration_since(obj.fresh_until)
                        .map_or(0, |d| d.as_secs())
                );
                return cache::respond(
                    &obj,
                    &method,
                    req.headers(),
                    now,
                    &["hit", &ttl, "detail=stale-while-revalidate"],
                )
                .await;
            }
            _ => Some(obj),
        },
        None => None,
    };
    let creq = cache_request(&key, &ctx.host, req.headers());
    if stale.is_none() && req.headers().contains_key(header::RANGE) {
        // A range of an object we do not have: pass it on as asked, keep nothing.
        cache.count(Outcome::Miss);
        let resp = upstream::forward(edge, ctx, route, req, held).await;
        return with_status(resp, &["fwd=miss"]);
    }
    match cache.fill_for(&key, req.headers()) {
        Role::Leader(fill) => {
            let parts = fetch_parts(&req, stale.as_deref(), &creq);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let fetch = Fetch::new(
                edge.clone(),
                cache.clone(),
                ctx,
                route,
                key,
                fill,
                stale,
                rule.cloned(),
                creq,
            );
            tokio::spawn(fetch.run(parts, held, tx));
            match rx.await {
                Ok(answer) => answer.into_response(&method, req.headers()).await,
                Err(_) => {
                    crate::errors::error_response(crate::errors::ErrorKind::TunnelFailed, &ctx.id)
                }
            }
        }
        Role::Follower(fill) => {
            follow(edge, cache, ctx, route, req, held, &key, &creq, fill, rule).await
        }
    }
}

/// A request that found another's fetch running.
#[allow(clippy::too_many_arguments)]
async fn follow(
    edge: Arc<Edge>,
    cache: &Arc<Cache>,
    ctx: &RequestCtx,
    route: &Routed,
    req: Request<Incoming>,
    held: Held,
    key: &str,
    creq: &CacheRequest,
    fill: Arc<Fill>,
    rule: Option<&Rule>,
) -> Response<ProxyBody> {
    metrics::counter!("skylane_cache_coalesced_waits_total").increment(1);
    let head = tokio::time::timeout(cache.config.coalesce_wait, fill.head()).await;
    if let Ok(Some(head)) = head
        && object::variant_of(&head.headers, req.headers())
            == object::variant_of(&head.headers, &fill.request_headers)
    {
        cache.count(Outcome::Coalesced);
        let mut resp = Response::new(if req.method() == Method::HEAD {
            empty()
        } else {
            fill.reader()
        });
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        for_browser(resp.headers_mut(), rule);
        return with_status(resp, &["fwd=miss", "collapsed"]);
    }
    // The fetch refreshed or served a stale object, or will not share: look again, then
    // go on our own.
    let now = SystemTime::now();
    if let Some(obj) = cache.lookup(key, || creq.clone())
        && obj.freshness(now) == Freshness::Fresh
    {
        cache.count(Outcome::Hit);
        let ttl = format!("ttl={}", obj.ttl_s(now));
        return cache::respond(&obj, req.method(), req.headers(), now, &["hit", &ttl]).await;
    }
    cache.count(Outcome::Miss);
    let resp = upstream::forward(edge, ctx, route, req, held).await;
    with_status(resp, &["fwd=miss"])
}

/// The request as the cache compares it: the key's URL, GET, the client's headers with
/// the host as routed (HTTP/1.1 sends `Host`, HTTP/2 does not).
fn cache_request(key: &str, host: &str, headers: &HeaderMap) -> CacheRequest {
    let mut headers = headers.clone();
    if let Ok(h) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, h);
    }
    CacheRequest {
        uri: format!("https://{}", key::url_of(key))
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("https://invalid/")),
        method: Method::GET,
        headers,
    }
}

/// The head of the fetch that fills the cache: a GET for the whole object (the client's
/// own validators and ranges left out), conditional on `stale`'s validators when there is
/// a stale object to refresh.
fn fetch_parts(
    req: &Request<Incoming>,
    stale: Option<&Object>,
    creq: &CacheRequest,
) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = Method::GET;
    parts.uri = req.uri().clone();
    parts.version = http::Version::HTTP_11;
    parts.headers = req.headers().clone();
    for h in CLIENT_CONDITIONALS {
        parts.headers.remove(h);
    }
    if let Some(obj) = stale
        && let http_cache_semantics::BeforeRequest::Stale { request, .. } =
            obj.policy.before_request(creq, SystemTime::now())
    {
        for h in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
            if let Some(v) = request.headers.get(&h) {
                parts.headers.insert(h, v.clone());
            }
        }
    }
    parts
}

/// What the fetch tells the request that started it.
enum Answer {
    /// An object to serve (a refreshed or stale one), with its `Cache-Status` parts.
    Object(Arc<Object>, Vec<String>),
    /// The origin's response, streamed as it comes.
    Stream(Response<ProxyBody>),
}

impl Answer {
    async fn into_response(self, method: &Method, req_headers: &HeaderMap) -> Response<ProxyBody> {
        match self {
            Answer::Object(obj, status) => {
                let parts: Vec<&str> = status.iter().map(String::as_str).collect();
                cache::respond(&obj, method, req_headers, SystemTime::now(), &parts).await
            }
            Answer::Stream(mut resp) if *method == Method::HEAD => {
                *resp.body_mut() = empty();
                resp
            }
            Answer::Stream(resp) => resp,
        }
    }
}

/// One fetch from the origin for the cache.
struct Fetch {
    edge: Arc<Edge>,
    cache: Arc<Cache>,
    ctx: RequestCtx,
    route: usize,
    key: String,
    fill: Arc<Fill>,
    stale: Option<Arc<Object>>,
    rule: Option<Rule>,
    creq: CacheRequest,
}

impl Fetch {
    #[allow(clippy::too_many_arguments)]
    fn new(
        edge: Arc<Edge>,
        cache: Arc<Cache>,
        ctx: &RequestCtx,
        route: &Routed,
        key: String,
        fill: Arc<Fill>,
        stale: Option<Arc<Object>>,
        rule: Option<Rule>,
        creq: CacheRequest,
    ) -> Self {
        Self {
            edge,
            cache,
            ctx: ctx.clone(),
            route: route.index,
            key,
            fill,
            stale,
            rule,
            creq,
        }
    }

    async fn run(
        self,
        parts: http::request::Parts,
        held: Held,
        to_leader: tokio::sync::oneshot::Sender<Answer>,
    ) {
        let Some(route) = self.edge.routes.all().get(self.route) else {
            self.fill.no_head();
            return;
        };
        let request = Request::from_parts(parts, http_body_util::Empty::<Bytes>::new());
        let resp = upstream::forward(self.edge.clone(), &self.ctx, route, request, held).await;
        let now = SystemTime::now();
        let status = resp.status();
        let answer = self.decide(resp, now).await;
        match answer {
            Decided::Done(answer) => {
                self.fill.no_head();
                self.cache.fill_done(&self.key, &self.fill);
                let _ = to_leader.send(answer);
            }
            Decided::Stream(resp, storable) => {
                let (parts, body) = resp.into_parts();
                let head = Head {
                    status: parts.status,
                    headers: parts.headers.clone(),
                };
                self.fill.set_head(head.clone());
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(
                    LEADER_CHANNEL,
                );
                let mut leader = Response::from_parts(parts, channel_body(rx));
                for_browser(leader.headers_mut(), self.rule.as_ref());
                leader.headers_mut().insert(
                    CACHE_STATUS.clone(),
                    cache::cache_status(&["fwd=miss", "stored"]),
                );
                let _ = to_leader.send(Answer::Stream(leader));
                self.cache.count(Outcome::Miss);
                self.stream(body, tx, head, storable, status).await;
            }
        }
    }

    /// What to do with the origin's answer.
    async fn decide(&self, resp: Response<ProxyBody>, now: SystemTime) -> Decided {
        let failed =
            resp.status().is_server_error() || resp.extensions().get::<EdgeError>().is_some();
        if let Some(obj) = &self.stale {
            if resp.status() == StatusCode::NOT_MODIFIED {
                if let Some(refreshed) = self.refresh(obj, &resp, now) {
                    self.cache.count(Outcome::Revalidated);
                    return Decided::Done(Answer::Object(
                        refreshed,
                        vec!["fwd=stale".into(), "fwd-status=304".into()],
                    ));
                }
            } else if failed && obj.usable_on_error(now) {
                self.cache.count(Outcome::Stale);
                metrics::counter!("skylane_cache_stale_served_total", "reason" => "error")
                    .increment(1);
                let status = format!("fwd-status={}", resp.status().as_u16());
                return Decided::Done(Answer::Object(
                    obj.clone(),
                    vec!["fwd=stale".into(), status, "detail=stale-if-error".into()],
                ));
            }
        }
        let head = Head {
            status: resp.status(),
            headers: resp.headers().clone(),
        };
        let too_large = crate::phases::request_filter::content_length(resp.headers())
            .is_some_and(|n| n > self.cache.config.max_object_bytes);
        let storable = if failed || too_large {
            None
        } else {
            object::storable(&self.creq, &head, self.rule.as_ref(), now)
        };
        match storable {
            Some(s) => Decided::Stream(resp, Box::new(s)),
            None => {
                self.cache.count(Outcome::Miss);
                Decided::Done(Answer::Stream(with_status(resp, &["fwd=miss"])))
            }
        }
    }

    /// A stale object refreshed by a 304, stored again.
    fn refresh(
        &self,
        obj: &Arc<Object>,
        resp: &Response<ProxyBody>,
        now: SystemTime,
    ) -> Option<Arc<Object>> {
        let not_modified = Head {
            status: resp.status(),
            headers: resp.headers().clone(),
        };
        let http_cache_semantics::AfterResponse::NotModified(policy, parts) =
            obj.policy.after_response(&self.creq, &not_modified, now)
        else {
            return None;
        };
        let mut headers = parts.headers;
        headers.remove(header::AGE);
        let head = Head {
            status: obj.head.status,
            headers,
        };
        let s = object::storable(&self.creq, &head, self.rule.as_ref(), now)?;
        let refreshed = Object {
            policy,
            head,
            fresh_until: s.fresh_until,
            stale_while_revalidate: s.stale_while_revalidate,
            stale_if_error: s.stale_if_error,
            stored: now,
            ..(**obj).clone()
        };
        let refreshed = Arc::new(refreshed);
        if matches!(refreshed.body, Body::Memory(_)) {
            self.cache
                .store((*refreshed).clone(), self.cache.config.max_variants);
        }
        Some(refreshed)
    }

    /// Streams the origin's body to the leader (while it listens) and into the fill, then
    /// keeps the object.
    async fn stream(
        &self,
        mut body: ProxyBody,
        to_leader: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        head: Head,
        storable: Box<object::Storable>,
        status: StatusCode,
    ) {
        let max = self.cache.config.max_object_bytes;
        let mut keeping = true;
        let mut leader = Some(to_leader);
        let mut total = 0u64;
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    total += data.len() as u64;
                    if keeping {
                        if total > max {
                            keeping = false;
                            self.fill.finish(FillOutcome::Failed);
                            self.cache.fill_done(&self.key, &self.fill);
                        } else {
                            self.fill.push(data.clone());
                        }
                    }
                    if let Some(tx) = &leader
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        // The client left; the fetch goes on for the cache and others.
                        leader = None;
                    }
                    if !keeping && leader.is_none() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "origin body for the cache failed");
                    self.fill.finish(FillOutcome::Failed);
                    self.cache.fill_done(&self.key, &self.fill);
                    if let Some(tx) = leader {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    }
                    return;
                }
                None => break,
            }
        }
        if !keeping {
            return;
        }
        self.fill.finish(FillOutcome::Done);
        if let Some(chunks) = self.fill.chunks() {
            let now = SystemTime::now();
            let variant = object::variant_of(&head.headers, &self.fill.request_headers);
            let obj = Object {
                key: self.key.clone(),
                policy: storable.policy.clone(),
                tags: object::tags_of(&head.headers),
                head,
                body: Body::Memory(chunks),
                len: total,
                stored: now,
                fresh_until: storable.fresh_until,
                stale_while_revalidate: storable.stale_while_revalidate,
                stale_if_error: storable.stale_if_error,
                browser_ttl: self.rule.as_ref().and_then(|r| r.browser_ttl),
                variant,
            };
            tracing::debug!(key = %self.key, bytes = total, status = status.as_u16(), "cached");
            self.cache.store(obj, self.cache.config.max_variants);
        }
        self.cache.fill_done(&self.key, &self.fill);
    }
}

/// What the fetch decided at the origin's head.
enum Decided {
    /// The answer is complete (an object, or a response nobody shares).
    Done(Answer),
    /// Stream it into the cache (boxed: the policy is large, the other variant small).
    Stream(Response<ProxyBody>, Box<object::Storable>),
}

/// A body fed by the fetch.
fn channel_body(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> ProxyBody {
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}
