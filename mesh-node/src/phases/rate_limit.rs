//! Rate limits: per-key token buckets (GCRA, from the `governor` crate) with a bounded
//! number of keys.
//!
//! Every limiter here is keyed by a 64-bit hash of what it counts (an IP, an IPv6 /64, a
//! header or cookie value): a client choosing long or many keys costs the edge one small
//! entry per key, and the number of entries is capped. Past the cap — an attack spread
//! over more addresses than the cap — new and old keys alike share 1024 overflow buckets
//! until housekeeping (every 10 s) has dropped the keys that went quiet; the edge degrades
//! towards "stricter", never towards "unlimited" or "out of memory".

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;

use crate::config::{RateKey, RateLimit};

/// Keys a limiter tracks before overflow buckets are used.
pub const MAX_KEYS: usize = 200_000;
/// Overflow buckets.
const OVERFLOW_BUCKETS: u64 = 1024;
/// Marks overflow keys (the top bit), so they never collide with a real key's hash.
const OVERFLOW: u64 = 1 << 63;

/// A keyed limiter with a cap on its keys.
pub struct KeyedLimiter {
    limiter: DefaultKeyedRateLimiter<u64>,
    clock: DefaultClock,
    hasher: std::hash::RandomState,
    max_keys: usize,
}

impl std::fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl KeyedLimiter {
    /// `per_s` sustained, `burst` at once, per key.
    pub fn new(per_s: f64, burst: u32, max_keys: usize) -> Self {
        let period = Duration::from_secs_f64(1.0 / per_s.max(1e-9));
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            hasher: std::hash::RandomState::new(),
            max_keys,
        }
    }

    /// Takes one token for `key`. `Err(wait)`: over the limit; a token comes in `wait`.
    pub fn check(&self, key: impl Hash) -> Result<(), Duration> {
        let mut h = self.hasher.hash_one(key) & !OVERFLOW;
        if self.limiter.len() >= self.max_keys {
            h = OVERFLOW | (h % OVERFLOW_BUCKETS);
        }
        self.limiter
            .check_key(&h)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose buckets are full again (nothing to remember about them).
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// What rate limits count an IP as: the address for IPv4, the /64 for IPv6 (one
/// subscriber usually holds a whole /64).
pub fn ip_key(ip: IpAddr) -> u128 {
    match crate::config::policy::canonical(ip) {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64 << 64) | 1 << 32,
    }
}

/// The rate-limit zones of the config, each with its limiter.
#[derive(Debug)]
pub struct Zones {
    zones: Vec<(RateLimit, KeyedLimiter)>,
}

/// A refusal by a zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// The zone's name (a metric label: zones are few and named by the operator).
    pub zone: String,
    /// When the client may try again.
    pub retry_after: Duration,
}

impl Zones {
    /// The zones' settings, in config order.
    pub fn configured(&self) -> Vec<RateLimit> {
        self.zones.iter().map(|(z, _)| z.clone()).collect()
    }

    /// Limiters for `zones`.
    pub fn new(zones: &[RateLimit]) -> Self {
        Self {
            zones: zones
                .iter()
                .map(|z| {
                    (
                        z.clone(),
                        KeyedLimiter::new(z.requests_per_s, z.burst, MAX_KEYS),
                    )
                })
                .collect(),
        }
    }

    /// Counts a request against zones `indices`; the first zone over its limit refuses it.
    pub fn check(&self, indices: &[usize], ip: IpAddr, headers: &HeaderMap) -> Result<(), Limited> {
        for &i in indices {
            let Some((zone, limiter)) = self.zones.get(i) else {
                continue;
            };
            let result = match key_value(&zone.key, headers) {
                Some(value) => limiter.check((1u8, value)),
                // Without the header or cookie, the client's address is the key.
                None => limiter.check((0u8, ip_key(ip))),
            };
            if let Err(wait) = result {
                return Err(Limited {
                    zone: zone.name.clone(),
                    retry_after: wait,
                });
            }
        }
        Ok(())
    }

    /// Housekeeping of every zone.
    pub fn housekeeping(&self) {
        for (_, l) in &self.zones {
            l.housekeeping();
        }
    }
}

/// The bytes a zone keys on, when the request carries them.
fn key_value<'a>(key: &RateKey, headers: &'a HeaderMap) -> Option<&'a [u8]> {
    match key {
        RateKey::Ip => None,
        RateKey::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        RateKey::Cookie(name) => cookie(headers, name).map(str::as_bytes),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_s(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_rate_waits_and_others_do_not() {
        let l = KeyedLimiter::new(10.0, 2, 100);
        assert!(l.check(1).is_ok());
        assert!(l.check(1).is_ok());
        let wait = l.check(1).expect_err("third in a burst of two");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check(2).is_ok());
    }

    #[test]
    fn keys_are_capped() {
        let l = KeyedLimiter::new(1.0, 1, 50);
        for k in 0..10_000u32 {
            let _ = l.check(k);
        }
        assert!(l.keys() <= 50 + OVERFLOW_BUCKETS as usize, "{}", l.keys());
    }

    #[test]
    fn zones_key_by_header_cookie_or_ip() {
        let zones = Zones::new(&[
            RateLimit {
                name: "api-key".into(),
                key: RateKey::Header(http::HeaderName::from_static("x-api-key")),
                requests_per_s: 1.0,
                burst: 1,
            },
            RateLimit {
                name: "session".into(),
                key: RateKey::Cookie("sid".into()),
                requests_per_s: 1.0,
                burst: 1,
            },
        ]);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k1".parse().expect("value"));
        assert!(zones.check(&[0], ip, &h).is_ok());
        let refused = zones.check(&[0], ip, &h).expect_err("limited");
        assert_eq!(refused.zone, "api-key");
        assert!(retry_after_s(refused.retry_after) >= 1);
        h.insert("x-api-key", "k2".parse().expect("value"));
        assert!(
            zones.check(&[0], ip, &h).is_ok(),
            "another key has its own bucket"
        );
        h.insert(http::header::COOKIE, "a=1; sid=s1".parse().expect("value"));
        assert!(zones.check(&[1], ip, &h).is_ok());
        assert!(zones.check(&[1], ip, &h).is_err());
        assert_eq!(cookie(&h, "sid"), Some("s1"));
    }

    #[test]
    fn ipv6_is_counted_by_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_ne!(
            ip_key("0.0.0.1".parse().expect("ip")),
            ip_key("::1".parse().expect("ip"))
        );
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(Duration::from_secs(3)), 3);
    }
}
