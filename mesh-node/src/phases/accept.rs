//! The accept phase: whether a new connection is let in, and what it holds while open.
//!
//! A connection is refused (closed at once, counted by reason) when the edge holds its
//! total, when its IP or its /24 (IPv4) or /56 (IPv6) prefix holds its share, or when its IP
//! opens connections faster than its rate. The decision is [`decide`], a pure function of
//! the counts; [`Admission`] keeps the counts. A [`ConnPermit`] gives its place back when
//! the connection ends. The count maps hold one entry per address or prefix with a
//! connection open, so they are bounded by the total cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Limits;
use crate::config::policy::canonical;
use crate::phases::rate_limit::{KeyedLimiter, MAX_KEYS, ip_key};

/// An IPv4 /24 or IPv6 /56: what one subscriber or small network usually holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix(u128);

impl Prefix {
    /// The prefix `ip` lies in.
    pub fn of(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => Prefix(u128::from(u32::from(v4) & 0xffff_ff00)),
            IpAddr::V6(v6) => Prefix((u128::from(v6) >> 72 << 72) | 1),
        }
    }

    /// As text, e.g. `192.0.2.0/24`: what a clearance cookie is bound to.
    pub fn label(ip: IpAddr) -> String {
        match canonical(ip) {
            IpAddr::V4(v4) => {
                let net = std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00);
                format!("{net}/24")
            }
            IpAddr::V6(v6) => {
                let net = std::net::Ipv6Addr::from(u128::from(v6) >> 72 << 72);
                format!("{net}/56")
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The edge holds `max_connections`.
    Total,
    /// The IP holds `max_connections_per_ip`.
    PerIp,
    /// The prefix holds `max_connections_per_prefix`.
    PerPrefix,
    /// The IP opens connections faster than `new_connections_per_ip_per_s`.
    Rate,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerIp => "per_ip",
            Refusal::PerPrefix => "per_prefix",
            Refusal::Rate => "connection_rate",
        }
    }
}

/// Counts a new connection would join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Open connections of the edge.
    pub total: usize,
    /// Of this IP.
    pub ip: u32,
    /// Of this prefix.
    pub prefix: u32,
}

/// Whether a connection joining `counts` stays within `limits` (the caps of `limits`, with
/// `max_connections` already resolved to `max_total`).
pub fn decide(counts: Counts, limits: &Limits, max_total: usize) -> Result<(), Refusal> {
    if counts.total >= max_total {
        Err(Refusal::Total)
    } else if counts.ip >= limits.max_connections_per_ip {
        Err(Refusal::PerIp)
    } else if counts.prefix >= limits.max_connections_per_prefix {
        Err(Refusal::PerPrefix)
    } else {
        Ok(())
    }
}

/// The edge's open connections, by address and prefix.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    max_total: usize,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, u32>>,
    by_prefix: Mutex<HashMap<Prefix, u32>>,
    rate: KeyedLimiter,
}

impl Admission {
    /// Admission under `limits`; `max_total` resolves `max_connections` (it may come from
    /// the open-file limit).
    pub fn new(limits: Limits, max_total: usize) -> Arc<Self> {
        let rate = KeyedLimiter::new(
            limits.new_connections_per_ip_per_s,
            limits.new_connections_burst,
            MAX_KEYS,
        );
        Arc::new(Self {
            limits,
            max_total,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            by_prefix: Mutex::new(HashMap::new()),
            rate,
        })
    }

    /// Lets a connection from `ip` in, or says why not (and counts the refusal).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        listener: &'static str,
    ) -> Result<ConnPermit, Refusal> {
        let result = self.try_admit(ip);
        if let Err(why) = &result {
            metrics::counter!("skylane_edge_connections_refused_total", "listener" => listener, "reason" => why.label())
                .increment(1);
        }
        result
    }

    fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let ip = canonical(ip);
        let prefix = Prefix::of(ip);
        let (Ok(mut by_ip), Ok(mut by_prefix)) = (self.by_ip.lock(), self.by_prefix.lock()) else {
            return Err(Refusal::Total);
        };
        let counts = Counts {
            total: self.total.load(Ordering::Relaxed),
            ip: by_ip.get(&ip).copied().unwrap_or(0),
            prefix: by_prefix.get(&prefix).copied().unwrap_or(0),
        };
        decide(counts, &self.limits, self.max_total)?;
        if self.rate.check(ip_key(ip)).is_err() {
            return Err(Refusal::Rate);
        }
        *by_ip.entry(ip).or_insert(0) += 1;
        *by_prefix.entry(prefix).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("skylane_edge_connections").increment(1.0);
        Ok(ConnPermit {
            admission: self.clone(),
            ip,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// The cap on open connections.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Drops rate-limit state of addresses gone quiet.
    pub fn housekeeping(&self) {
        self.rate.housekeeping();
    }

    fn release(&self, ip: IpAddr) {
        if let Ok(mut by_ip) = self.by_ip.lock() {
            give_back(&mut by_ip, &ip);
        }
        if let Ok(mut by_prefix) = self.by_prefix.lock() {
            give_back(&mut by_prefix, &Prefix::of(ip));
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("skylane_edge_connections").decrement(1.0);
    }
}

/// Takes one from `key`'s count, removing the entry at zero (so a map of counts holds only
/// keys with something open).
pub fn give_back<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// An admitted connection's place; dropped when the connection ends.
#[derive(Debug)]
pub struct ConnPermit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections_per_ip: 2,
            max_connections_per_prefix: 3,
            new_connections_per_ip_per_s: 1000.0,
            new_connections_burst: 1000,
            ..Limits::default()
        }
    }

    #[test]
    fn caps_apply_in_order() {
        let l = limits();
        let c = |total, ip, prefix| Counts { total, ip, prefix };
        assert_eq!(decide(c(0, 0, 0), &l, 10), Ok(()));
        assert_eq!(decide(c(10, 0, 0), &l, 10), Err(Refusal::Total));
        assert_eq!(decide(c(1, 2, 2), &l, 10), Err(Refusal::PerIp));
        assert_eq!(decide(c(1, 1, 3), &l, 10), Err(Refusal::PerPrefix));
    }

    #[test]
    fn permits_count_and_give_back() {
        let a = Admission::new(limits(), 100);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let p1 = a.admit(ip("192.0.2.1"), "test").expect("first");
        let _p2 = a.admit(ip("192.0.2.1"), "test").expect("second");
        assert_eq!(a.admit(ip("192.0.2.1"), "test").err(), Some(Refusal::PerIp));
        let _p3 = a
            .admit(ip("192.0.2.2"), "test")
            .expect("same /24, another ip");
        assert_eq!(
            a.admit(ip("192.0.2.3"), "test").err(),
            Some(Refusal::PerPrefix)
        );
        assert!(a.admit(ip("198.51.100.1"), "test").is_ok(), "another /24");
        drop(p1);
        assert!(a.admit(ip("192.0.2.1"), "test").is_ok());
        // The mapped form of an IPv4 address is the same client.
        let _p4 = a
            .admit(ip("::ffff:192.0.2.2"), "test")
            .expect("second for .2");
        assert_eq!(a.admit(ip("192.0.2.2"), "test").err(), Some(Refusal::PerIp));
    }

    #[test]
    fn a_fast_opener_is_refused() {
        let l = Limits {
            new_connections_per_ip_per_s: 1.0,
            new_connections_burst: 3,
            ..Limits::default()
        };
        let a = Admission::new(l, 100);
        let ip: IpAddr = "203.0.113.5".parse().expect("ip");
        let permits: Vec<_> = (0..3)
            .map(|_| a.admit(ip, "test").expect("burst"))
            .collect();
        assert_eq!(a.admit(ip, "test").err(), Some(Refusal::Rate));
        assert_eq!(a.open(), 3);
        drop(permits);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(Prefix::label(ip("192.0.2.77")), "192.0.2.0/24");
        assert_eq!(
            Prefix::label(ip("2001:db8:aa:bbcc::1")),
            "2001:db8:aa:bb00::/56"
        );
        assert_eq!(
            Prefix::of(ip("2001:db8:aa:bb01::1")),
            Prefix::of(ip("2001:db8:aa:bbff::2"))
        );
        assert_ne!(Prefix::of(ip("0.0.0.0")), Prefix::of(ip("::")));
    }
}
