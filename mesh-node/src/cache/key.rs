//! Which rule a request falls under, and the name (cache key) of what it asks for.

use http::HeaderMap;

use crate::config::cache::{Mode, Rule};
use crate::phases::rate_limit::cookie;
use crate::routes::host_matches;

/// The first rule matching `host` and `path`, in config order.
pub fn rule_for<'r>(rules: &'r [Rule], host: &str, path: &str) -> Option<&'r Rule> {
    rules
        .iter()
        .find(|r| host_matches(&r.host, host) && path.starts_with(&r.path_prefix))
}

/// The mode a request is cached in: its rule's, or `standard` (what HTTP allows).
pub fn mode_of(rule: Option<&Rule>) -> Mode {
    rule.map_or(Mode::Standard, |r| r.mode)
}

/// The cache key: host, path, the query as the rule keeps it, and the values of the
/// rule's key headers and cookies. Two requests with one key are one object (or its
/// `Vary` variants).
pub fn key(
    host: &str,
    path: &str,
    query: Option<&str>,
    rule: Option<&Rule>,
    headers: &HeaderMap,
) -> String {
    let mut k = String::with_capacity(host.len() + path.len() + 16);
    k.push_str(host);
    k.push_str(path);
    let query = match (query, rule) {
        (None, _) => None,
        (Some(_), Some(r)) if r.ignore_query => None,
        (Some(q), Some(r)) if !r.ignore_params.is_empty() => {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|p| {
                    let name = p.split('=').next().unwrap_or(p);
                    !r.ignore_params.iter().any(|i| i == name)
                })
                .collect();
            (!kept.is_empty()).then(|| kept.join("&"))
        }
        (Some(q), _) => Some(q.to_owned()),
    };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        k.push('?');
        k.push_str(&q);
    }
    if let Some(r) = rule {
        for h in &r.key_headers {
            k.push_str("\nh:");
            k.push_str(h.as_str());
            k.push('=');
            for v in headers.get_all(h) {
                k.push_str(&String::from_utf8_lossy(v.as_bytes()));
                k.push(',');
            }
        }
        for c in &r.key_cookies {
            k.push_str("\nc:");
            k.push_str(c);
            k.push('=');
            k.push_str(cookie(headers, c).unwrap_or(""));
        }
    }
    k
}

/// The URL part of a key (before any header or cookie part): what purges by URL and
/// prefix match against.
pub fn url_of(key: &str) -> &str {
    key.split('\n').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, mode: Mode) -> Rule {
        Rule {
            host: "*".into(),
            path_prefix: prefix.into(),
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
    fn first_matching_rule_wins() {
        let rules = vec![rule("/api/", Mode::Bypass), rule("/", Mode::Everything)];
        assert_eq!(
            mode_of(rule_for(&rules, "a.example", "/api/x")),
            Mode::Bypass
        );
        assert_eq!(
            mode_of(rule_for(&rules, "a.example", "/static/a.css")),
            Mode::Everything
        );
        assert_eq!(mode_of(rule_for(&[], "a.example", "/")), Mode::Standard);
    }

    #[test]
    fn keys_follow_the_rule() {
        let h = {
            let mut h = HeaderMap::new();
            h.insert("accept-language", "de".parse().expect("value"));
            h.insert(
                http::header::COOKIE,
                "lang=fr; sid=1".parse().expect("value"),
            );
            h
        };
        assert_eq!(
            key("a.example", "/p", Some("x=1"), None, &h),
            "a.example/p?x=1"
        );
        let mut r = rule("/", Mode::Standard);
        r.ignore_query = true;
        assert_eq!(
            key("a.example", "/p", Some("x=1"), Some(&r), &h),
            "a.example/p"
        );
        let mut r = rule("/", Mode::Standard);
        r.ignore_params = vec!["utm_source".into()];
        assert_eq!(
            key("a", "/p", Some("utm_source=t&x=1"), Some(&r), &h),
            "a/p?x=1"
        );
        assert_eq!(key("a", "/p", Some("utm_source=t"), Some(&r), &h), "a/p");
        r.key_headers = vec![http::HeaderName::from_static("accept-language")];
        r.key_cookies = vec!["lang".into()];
        let k = key("a", "/p", None, Some(&r), &h);
        assert_eq!(k, "a/p\nh:accept-language=de,\nc:lang=fr");
        assert_eq!(url_of(&k), "a/p");
    }
}
