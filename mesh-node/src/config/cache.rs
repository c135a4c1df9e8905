//! The `[cache]` section and its `[[cache.rules]]`: what the edge keeps, where, for how
//! long, and how it names it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use skylane_shared::config::{ConfigError, Validator};

/// `[cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Whether the edge caches at all. Default true when the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Bytes of response bodies (and heads) kept in memory. Default 256 MiB.
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
    /// Largest object kept; larger responses stream through uncached. Default 64 MiB.
    #[serde(default = "default_max_object")]
    pub max_object_bytes: u64,
    /// A directory for the disk tier (relative to the config file), which survives a
    /// restart. Default: none, memory only.
    pub disk_dir: Option<PathBuf>,
    /// Bytes the disk tier may hold. Default 4 GiB.
    #[serde(default = "default_disk")]
    pub disk_bytes: u64,
    /// How long a request waits for another request's fetch of the same object (request
    /// coalescing) before fetching on its own. Default 10 s.
    #[serde(default = "default_coalesce")]
    pub coalesce_wait_ms: u64,
    /// Variants (`Vary`) kept per URL. Default 8.
    #[serde(default = "default_variants")]
    pub max_variants: u64,
    /// Rules, in order; the first that matches a request decides. A request no rule
    /// matches is cached as HTTP allows (RFC 9111, mode `standard`).
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

fn yes() -> bool {
    true
}
fn default_memory() -> u64 {
    256 * 1024 * 1024
}
fn default_max_object() -> u64 {
    64 * 1024 * 1024
}
fn default_disk() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_coalesce() -> u64 {
    10_000
}
fn default_variants() -> u64 {
    8
}

/// `[[cache.rules]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Host, exact or `*.example.com`, or `*`.
    #[serde(default = "any_host")]
    pub host: String,
    /// Path prefix. Default `/`.
    #[serde(default = "root")]
    pub path_prefix: String,
    /// `bypass` (never cached), `standard` (the origin's headers decide), `everything`
    /// (cached whatever the origin's headers say, HTML included).
    pub mode: Mode,
    /// How long the edge keeps a response fresh, overriding the origin's headers.
    /// Default: the origin's headers in `standard`, 2 hours in `everything`.
    pub edge_ttl_s: Option<u64>,
    /// `Cache-Control: max-age` given to browsers, replacing the origin's.
    pub browser_ttl_s: Option<u64>,
    /// Leave the query string out of the cache key.
    #[serde(default)]
    pub ignore_query: bool,
    /// Query parameters left out of the cache key (tracking parameters, say).
    #[serde(default)]
    pub ignore_params: Vec<String>,
    /// Request headers whose values are part of the cache key.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Cookies whose values are part of the cache key.
    #[serde(default)]
    pub key_cookies: Vec<String>,
    /// Serve a stale response this long past its freshness while it is refreshed in the
    /// background. Default: the origin's `stale-while-revalidate`, else 0.
    pub stale_while_revalidate_s: Option<u64>,
    /// Serve a stale response this long past its freshness when the origin fails or
    /// answers 5xx. Default: the origin's `stale-if-error`, else 0.
    pub stale_if_error_s: Option<u64>,
    /// Cache responses that set cookies (never by default: a cookie is one user's).
    #[serde(default)]
    pub cache_set_cookie: bool,
}

fn any_host() -> String {
    "*".into()
}
fn root() -> String {
    "/".into()
}

/// How a rule caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Never cached.
    Bypass,
    /// As RFC 9111 allows.
    Standard,
    /// Whatever the origin's headers say.
    Everything,
}

/// A validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Host pattern, lowercase.
    pub host: String,
    /// Path prefix.
    pub path_prefix: String,
    /// Mode.
    pub mode: Mode,
    /// Edge TTL override.
    pub edge_ttl: Option<Duration>,
    /// Browser TTL override.
    pub browser_ttl: Option<Duration>,
    /// Query out of the key.
    pub ignore_query: bool,
    /// Parameters out of the key.
    pub ignore_params: Vec<String>,
    /// Headers in the key (lowercase).
    pub key_headers: Vec<http::HeaderName>,
    /// Cookies in the key.
    pub key_cookies: Vec<String>,
    /// Stale-while-revalidate window override.
    pub stale_while_revalidate: Option<Duration>,
    /// Stale-if-error window override.
    pub stale_if_error: Option<Duration>,
    /// Cache responses with `Set-Cookie`.
    pub cache_set_cookie: bool,
}

/// Validated `[cache]`.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Memory budget.
    pub memory_bytes: u64,
    /// Largest object.
    pub max_object_bytes: u64,
    /// Disk tier directory, if any.
    pub disk_dir: Option<PathBuf>,
    /// Disk budget.
    pub disk_bytes: u64,
    /// Coalescing wait.
    pub coalesce_wait: Duration,
    /// Variants per URL.
    pub max_variants: usize,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// Checks `[cache]`; `None` when absent or disabled.
pub fn validate(
    v: &Validator,
    s: Option<&CacheSection>,
) -> Result<Option<CacheConfig>, ConfigError> {
    let Some(s) = s.filter(|s| s.enabled) else {
        return Ok(None);
    };
    let memory_bytes = v.in_range("cache.memory_bytes", s.memory_bytes, 1024 * 1024..=1 << 40)?;
    let max_object_bytes = v.in_range(
        "cache.max_object_bytes",
        s.max_object_bytes,
        1..=memory_bytes,
    )?;
    let disk_bytes = v.in_range("cache.disk_bytes", s.disk_bytes, 1024 * 1024..=1 << 44)?;
    let mut rules = Vec::new();
    for (i, r) in s.rules.iter().enumerate() {
        let at = |k: &str| format!("cache.rules[{i}].{k}");
        if !r.path_prefix.starts_with('/') {
            return Err(v.invalid(at("path_prefix"), "must start with '/'"));
        }
        let secs = |k: &str, x: Option<u64>| -> Result<Option<Duration>, ConfigError> {
            match x {
                Some(n) => Ok(Some(Duration::from_secs(v.in_range(
                    &at(k),
                    n,
                    0..=10 * 365 * 86_400,
                )?))),
                None => Ok(None),
            }
        };
        let mut key_headers = Vec::new();
        for (j, h) in r.key_headers.iter().enumerate() {
            key_headers.push(http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                v.invalid(
                    format!("cache.rules[{i}].key_headers[{j}]"),
                    format!("{h:?} is not a header name"),
                )
            })?);
        }
        if r.mode == Mode::Bypass && (r.edge_ttl_s.is_some() || r.browser_ttl_s.is_some()) {
            return Err(v.invalid(
                at("mode"),
                "a bypass rule caches nothing, so TTLs make no sense on it",
            ));
        }
        rules.push(Rule {
            host: r.host.to_ascii_lowercase(),
            path_prefix: r.path_prefix.clone(),
            mode: r.mode,
            edge_ttl: secs("edge_ttl_s", r.edge_ttl_s)?,
            browser_ttl: secs("browser_ttl_s", r.browser_ttl_s)?,
            ignore_query: r.ignore_query,
            ignore_params: r.ignore_params.clone(),
            key_headers,
            key_cookies: r.key_cookies.clone(),
            stale_while_revalidate: secs("stale_while_revalidate_s", r.stale_while_revalidate_s)?,
            stale_if_error: secs("stale_if_error_s", r.stale_if_error_s)?,
            cache_set_cookie: r.cache_set_cookie,
        });
    }
    Ok(Some(CacheConfig {
        memory_bytes,
        max_object_bytes,
        disk_dir: s.disk_dir.as_ref().map(|d| v.relative(d)),
        disk_bytes,
        coalesce_wait: Duration::from_millis(v.in_range(
            "cache.coalesce_wait_ms",
            s.coalesce_wait_ms,
            0..=600_000,
        )?),
        max_variants: v.in_range("cache.max_variants", s.max_variants, 1..=64)? as usize,
        rules,
    }))
}
