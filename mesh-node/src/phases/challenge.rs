//! The "under attack" browser challenge: a proof of work in JavaScript, then a clearance
//! cookie every edge of the mesh accepts.
//!
//! 1. A browser without clearance gets an interstitial page ([`Challenger::page`], status
//!    403, never cached) holding a *challenge token*: the time it was issued, a random
//!    nonce, and an HMAC over both, the client's address prefix, the host and the
//!    difficulty, under the mesh-wide secret.
//! 2. The page's script finds a counter `n` with `SHA-256(token "." n)` starting with
//!    `difficulty_bits` zero bits, and loads `/.skylane/challenge?t=…&n=…&r=<path>`.
//! 3. The edge checks the token (its MAC, its age, that it was made for this prefix and
//!    host) and the work (one hash), then answers 303 back to `<path>` with a
//!    `skylane_clearance` cookie: an expiry and an HMAC over it, the prefix and the host.
//!
//! Any edge can check a token or a cookie another edge made: all they need is the secret.
//! Nothing is stored per client. What it does not stop: a client that solves the work
//! honestly (it costs them CPU per prefix and host, which is the point), and what the
//! rate limits are for.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use ring::hmac;

use crate::config::Secret;
use crate::phases::rate_limit::cookie;

/// The path the page sends its solution to.
pub const VERIFY_PATH: &str = "/.skylane/challenge";
/// The clearance cookie's name.
pub const COOKIE: &str = "skylane_clearance";

const PAGE: &str = include_str!("challenge.html");
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a request has no valid clearance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unclear {
    /// No cookie.
    Missing,
    /// A cookie that is not ours, or for another prefix or host.
    Forged,
    /// A cookie past its expiry.
    Expired,
}

impl Unclear {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Unclear::Missing => "missing",
            Unclear::Forged => "forged",
            Unclear::Expired => "expired",
        }
    }
}

/// Why a solution was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadSolution {
    /// Parameters missing or malformed.
    Malformed,
    /// The token was not made by the mesh for this prefix and host.
    Forged,
    /// The token is too old.
    Expired,
    /// The counter does not solve it.
    Unsolved,
}

/// Issues and checks challenges and clearances.
#[derive(Clone)]
pub struct Challenger {
    key: hmac::Key,
    difficulty_bits: u8,
    clearance_ttl: Duration,
    challenge_ttl: Duration,
}

impl std::fmt::Debug for Challenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenger")
            .field("key", &"MASKED")
            .field("difficulty_bits", &self.difficulty_bits)
            .finish_non_exhaustive()
    }
}

fn mac(key: &hmac::Key, parts: &[&[u8]]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        // Length-prefixed, so no two different part lists sign the same bytes.
        ctx.update(&(p.len() as u32).to_be_bytes());
        ctx.update(p);
    }
    ctx.sign()
}

fn verify_mac(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut msg = Vec::new();
    for p in parts {
        msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
        msg.extend_from_slice(p);
    }
    hmac::verify(key, &msg, tag).is_ok()
}

/// Leading zero bits of a digest.
pub fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut n = 0;
    for b in digest {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

/// Text safe inside HTML text.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text safe inside a double-quoted JavaScript string in a `<script>` element.
fn js_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'a'..='z'
            | 'A'..='Z'
            | '0'..='9'
            | '/'
            | '.'
            | '-'
            | '_'
            | '?'
            | '='
            | '%'
            | '~'
            | ','
            | ':'
            | '+'
            | '@'
            | '!'
            | '*'
            | '('
            | ')'
            | ';'
            | '['
            | ']'
            | '$' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out
}

/// Whether `r` is a path on this site to send the browser back to (not `//evil`, not a
/// scheme, no control characters).
fn safe_return(r: &str) -> bool {
    r.starts_with('/')
        && !r.starts_with("//")
        && !r.starts_with("/\\")
        && r.len() <= 2048
        && !r.chars().any(|c| c.is_control() || c == '\\')
}

impl Challenger {
    /// A challenger under `secret`.
    pub fn new(
        secret: &Secret,
        difficulty_bits: u8,
        clearance_ttl: Duration,
        challenge_ttl: Duration,
    ) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret.0),
            difficulty_bits,
            clearance_ttl,
            challenge_ttl,
        }
    }

    /// The `Set-Cookie` value of a clearance for `prefix` and `host`, good until
    /// `now_s + clearance_ttl`.
    pub fn clearance_cookie(&self, host: &str, prefix: &str, now_s: u64) -> String {
        let expires = now_s + self.clearance_ttl.as_secs();
        let tag = mac(
            &self.key,
            &[
                b"clearance v1",
                host.as_bytes(),
                prefix.as_bytes(),
                expires.to_string().as_bytes(),
            ],
        );
        format!(
            "{COOKIE}={expires}.{}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            B64.encode(tag.as_ref()),
            self.clearance_ttl.as_secs()
        )
    }

    /// Whether the request's cookies hold a clearance for `prefix` and `host`.
    pub fn check_clearance(
        &self,
        headers: &HeaderMap,
        host: &str,
        prefix: &str,
        now_s: u64,
    ) -> Result<(), Unclear> {
        let value = cookie(headers, COOKIE).ok_or(Unclear::Missing)?;
        let (expires, tag) = value.split_once('.').ok_or(Unclear::Forged)?;
        let tag = B64.decode(tag).map_err(|_| Unclear::Forged)?;
        let exp: u64 = expires.parse().map_err(|_| Unclear::Forged)?;
        if !verify_mac(
            &self.key,
            &[
                b"clearance v1",
                host.as_bytes(),
                prefix.as_bytes(),
                expires.as_bytes(),
            ],
            &tag,
        ) {
            return Err(Unclear::Forged);
        }
        // A valid MAC with an expiry further out than we ever issue means a changed TTL
        // or a bad clock; cap it anyway.
        if exp <= now_s || exp > now_s + self.clearance_ttl.as_secs() + 300 {
            return Err(Unclear::Expired);
        }
        Ok(())
    }

    /// A fresh challenge token for `prefix` and `host`.
    pub fn token(&self, host: &str, prefix: &str, now_s: u64) -> String {
        let nonce: [u8; 12] = rand::random();
        let nonce = B64.encode(nonce);
        let issued = now_s.to_string();
        let bits = self.difficulty_bits.to_string();
        let tag = mac(
            &self.key,
            &[
                b"challenge v1",
                host.as_bytes(),
                prefix.as_bytes(),
                issued.as_bytes(),
                nonce.as_bytes(),
                bits.as_bytes(),
            ],
        );
        format!("{issued}.{nonce}.{}", B64.encode(tag.as_ref()))
    }

    /// The interstitial page for a request to `return_to` (path and query).
    pub fn page(
        &self,
        host: &str,
        prefix: &str,
        now_s: u64,
        return_to: &str,
        request_id: &str,
    ) -> Response<Bytes> {
        let return_to = if safe_return(return_to) {
            return_to
        } else {
            "/"
        };
        let body = PAGE
            .replace("{{HOST}}", &html_escape(host))
            .replace("{{REQUEST_ID}}", &html_escape(request_id))
            .replace("{{TOKEN}}", &self.token(host, prefix, now_s))
            .replace("{{BITS}}", &self.difficulty_bits.to_string())
            .replace("{{VERIFY}}", VERIFY_PATH)
            .replace("{{RETURN_TO}}", &js_escape(return_to));
        let mut resp = Response::new(Bytes::from(body));
        *resp.status_mut() = StatusCode::FORBIDDEN;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store, max-age=0"),
        );
        h.insert(
            "content-security-policy",
            HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
        );
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        resp
    }

    /// Checks a solution (the query of a [`VERIFY_PATH`] request); on success the
    /// `Set-Cookie` value and where to send the browser.
    pub fn verify(
        &self,
        query: &str,
        host: &str,
        prefix: &str,
        now_s: u64,
    ) -> Result<(String, String), BadSolution> {
        let mut token = None;
        let mut counter = None;
        let mut return_to = String::from("/");
        for (k, v) in form_urlencoded(query) {
            match k.as_str() {
                "t" => token = Some(v),
                "n" => counter = Some(v),
                "r" if safe_return(&v) => return_to = v,
                _ => {}
            }
        }
        let (Some(token), Some(counter)) = (token, counter) else {
            return Err(BadSolution::Malformed);
        };
        if counter.len() > 20 || !counter.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadSolution::Malformed);
        }
        let mut parts = token.splitn(3, '.');
        let (Some(issued), Some(nonce), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(BadSolution::Malformed);
        };
        let tag = B64.decode(tag).map_err(|_| BadSolution::Malformed)?;
        let bits = self.difficulty_bits.to_string();
        if !verify_mac(
            &self.key,
            &[
                b"challenge v1",
                host.as_bytes(),
                prefix.as_bytes(),
                issued.as_bytes(),
                nonce.as_bytes(),
                bits.as_bytes(),
            ],
            &tag,
        ) {
            return Err(BadSolution::Forged);
        }
        let issued: u64 = issued.parse().map_err(|_| BadSolution::Malformed)?;
        if issued + self.challenge_ttl.as_secs() < now_s || issued > now_s + 60 {
            return Err(BadSolution::Expired);
        }
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{token}.{counter}").as_bytes(),
        );
        if leading_zero_bits(digest.as_ref()) < u32::from(self.difficulty_bits) {
            return Err(BadSolution::Unsolved);
        }
        Ok((self.clearance_cookie(host, prefix, now_s), return_to))
    }
}

/// `application/x-www-form-urlencoded` pairs, percent-decoded (at most 16 pairs).
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    ::form_urlencoded::parse(query.as_bytes())
        .take(16)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenger(bits: u8) -> Challenger {
        Challenger::new(
            &Secret(vec![7; 32]),
            bits,
            Duration::from_secs(3600),
            Duration::from_secs(300),
        )
    }

    fn solve(token: &str, bits: u8) -> u64 {
        (0u64..)
            .find(|n| {
                let d =
                    ring::digest::digest(&ring::digest::SHA256, format!("{token}.{n}").as_bytes());
                leading_zero_bits(d.as_ref()) >= u32::from(bits)
            })
            .unwrap_or(0)
    }

    fn cookie_header(set_cookie: &str) -> HeaderMap {
        let pair = set_cookie.split(';').next().unwrap_or_default();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}")).expect("value"),
        );
        h
    }

    #[test]
    fn a_solved_challenge_gives_a_clearance_any_edge_accepts() {
        let a = challenger(8);
        let b = challenger(8); // another edge, same secret
        let now = 1_800_000_000;
        let token = a.token("chat.example", "192.0.2.0/24", now);
        let n = solve(&token, 8);
        let query = format!("t={}&n={n}&r=%2Fws%3Froom%3D1", token);
        let (set_cookie, back) = b
            .verify(&query, "chat.example", "192.0.2.0/24", now + 5)
            .expect("solved");
        assert_eq!(back, "/ws?room=1");
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("Secure"));
        let h = cookie_header(&set_cookie);
        assert_eq!(
            a.check_clearance(&h, "chat.example", "192.0.2.0/24", now + 10),
            Ok(())
        );
        // Bound to prefix and host, and it expires.
        assert_eq!(
            a.check_clearance(&h, "chat.example", "198.51.100.0/24", now),
            Err(Unclear::Forged)
        );
        assert_eq!(
            a.check_clearance(&h, "other.example", "192.0.2.0/24", now),
            Err(Unclear::Forged)
        );
        assert_eq!(
            a.check_clearance(&h, "chat.example", "192.0.2.0/24", now + 7200),
            Err(Unclear::Expired)
        );
        assert_eq!(
            a.check_clearance(&HeaderMap::new(), "chat.example", "192.0.2.0/24", now),
            Err(Unclear::Missing)
        );
    }

    #[test]
    fn forged_expired_and_unsolved_solutions_are_refused() {
        let c = challenger(12);
        let other = Challenger::new(
            &Secret(vec![8; 32]),
            12,
            Duration::from_secs(3600),
            Duration::from_secs(300),
        );
        let now = 1_800_000_000;
        let token = c.token("h", "p", now);
        let n = solve(&token, 12);
        let q = |t: &str, n: u64| format!("t={t}&n={n}");
        assert_eq!(
            other.verify(&q(&token, n), "h", "p", now),
            Err(BadSolution::Forged)
        );
        assert_eq!(
            c.verify(&q(&token, n), "h", "p2", now),
            Err(BadSolution::Forged)
        );
        assert_eq!(
            c.verify(&q(&token, n), "h", "p", now + 301),
            Err(BadSolution::Expired)
        );
        let wrong = (0..).find(|m| {
            *m != n && c.verify(&q(&token, *m), "h", "p", now) == Err(BadSolution::Unsolved)
        });
        assert!(wrong.is_some());
        assert_eq!(c.verify("t=x", "h", "p", now), Err(BadSolution::Malformed));
        assert_eq!(c.verify("n=1", "h", "p", now), Err(BadSolution::Malformed));
        // A forged cookie with a made-up tag.
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("skylane_clearance=9999999999.AAAA"),
        );
        assert_eq!(c.check_clearance(&h, "h", "p", now), Err(Unclear::Forged));
    }

    #[test]
    fn the_page_escapes_what_it_embeds_and_never_sends_the_browser_away() {
        let c = challenger(8);
        let page = c.page("<evil>", "p", 1, "/a\"b</script>", "id<1>");
        assert_eq!(page.status(), StatusCode::FORBIDDEN);
        let body = String::from_utf8_lossy(page.body());
        assert!(!body.contains("<evil>") && body.contains("&lt;evil&gt;"));
        assert!(!body.contains("</script>\""));
        assert!(body.contains("\\u0022b\\u003c"));
        assert!(!safe_return("//evil.example/"));
        assert!(!safe_return("https://evil.example/"));
        assert!(!safe_return("/\\evil"));
        assert!(safe_return("/chat?room=1"));
        let token = c.token("h", "p", 1);
        let n = solve(&token, 8);
        let (_, back) = c
            .verify(
                &format!("t={token}&n={n}&r=%2F%2Fevil.example"),
                "h",
                "p",
                2,
            )
            .expect("ok");
        assert_eq!(back, "/");
    }
}
