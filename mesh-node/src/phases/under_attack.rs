//! "Under attack" mode: which hosts are challenged right now, mesh-wide.
//!
//! A host is under attack when its route says so in the config, when `[under_attack]
//! hosts` names it (until an operator switches it off), or when a switch on the mesh
//! bulletin ([`skylane_shared::mesh::bulletin`]) says so. Switches are bulletin entries
//! `attack/<host pattern>` = [`Switch`], written by an operator through any edge's admin
//! API (`mesh-node under-attack on HOST`) or by an edge's automatic trigger
//! ([`AutoWatch`]); every edge holds them within about one path delay. An automatic
//! switch expires by itself after the cool-down unless the trigger fires again.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::policy::AutoTrigger;
use crate::routes::host_matches;

/// Bulletin key prefix of the switches.
pub const KEY_PREFIX: &str = "attack/";

/// A switch as it travels on the bulletin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    /// On or off.
    pub on: bool,
    /// Who set it: `manual` (an operator) or `auto` (a trigger).
    pub by: SetBy,
}

/// Who set a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetBy {
    /// An operator.
    Manual,
    /// An edge's automatic trigger.
    Auto,
}

/// One switch in force, for decisions and for `/status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActiveSwitch {
    /// Host pattern (exact, `*.example.com` or `*`).
    pub host: String,
    /// On or off.
    pub on: bool,
    /// Who set it.
    pub by: SetBy,
    /// Seconds until it expires.
    pub expires_in_s: u64,
    /// The edge (or connector) that wrote it.
    pub written_by: String,
}

/// The hosts under attack, as this edge knows them.
#[derive(Debug, Default)]
pub struct UnderAttackState {
    /// `[under_attack] hosts`: on unless a switch says off.
    configured: Vec<String>,
    /// The bulletin's switches, most specific first.
    switches: RwLock<Vec<ActiveSwitch>>,
}

impl UnderAttackState {
    /// State with the configured hosts on.
    pub fn new(configured: Vec<String>) -> Self {
        Self {
            configured,
            switches: RwLock::new(Vec::new()),
        }
    }

    /// Replaces the switches with the bulletin's current ones.
    pub fn set_switches(&self, mut switches: Vec<ActiveSwitch>) {
        // Exact names before wildcards, longer wildcards before shorter ones.
        switches.sort_by_key(|s| std::cmp::Reverse(specificity(&s.host)));
        if let Ok(mut w) = self.switches.write() {
            *w = switches;
        }
    }

    /// The switches in force.
    pub fn switches(&self) -> Vec<ActiveSwitch> {
        self.switches.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether `host` is under attack: the most specific switch matching it decides;
    /// without one, whether the config names it.
    pub fn is_on(&self, host: &str) -> bool {
        if let Ok(switches) = self.switches.read()
            && let Some(s) = switches.iter().find(|s| host_matches(&s.host, host))
        {
            return s.on;
        }
        self.configured.iter().any(|p| host_matches(p, host))
    }
}

/// Exact host > `*.longer.suffix` > `*.suffix` > `*`.
fn specificity(pattern: &str) -> usize {
    if pattern == "*" {
        0
    } else if let Some(rest) = pattern.strip_prefix("*.") {
        1 + rest.len()
    } else {
        10_000
    }
}

/// Reads the switches out of bulletin entries (`key`, value, stamp origin name, expiry).
pub fn switches_from<'a>(
    entries: impl Iterator<Item = (&'a str, &'a [u8], String, u64)>,
    now_unix_ms: u64,
) -> Vec<ActiveSwitch> {
    entries
        .filter_map(|(key, value, writer, expires)| {
            let host = key.strip_prefix(KEY_PREFIX)?;
            let switch: Switch = postcard::from_bytes(value).ok()?;
            Some(ActiveSwitch {
                host: host.to_owned(),
                on: switch.on,
                by: switch.by,
                expires_in_s: expires.saturating_sub(now_unix_ms) / 1000,
                written_by: writer,
            })
        })
        .collect()
}

/// Counts one route's requests and origin errors over a window, for the automatic trigger.
#[derive(Debug, Default)]
pub struct RouteLoad {
    requests: AtomicU64,
    origin_errors: AtomicU64,
}

impl RouteLoad {
    /// Counts a response: `origin_error` when the origin side failed it (5xx).
    pub fn record(&self, origin_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if origin_error {
            self.origin_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts since the last call, which starts a new window.
    pub fn take(&self) -> (u64, u64) {
        (
            self.requests.swap(0, Ordering::Relaxed),
            self.origin_errors.swap(0, Ordering::Relaxed),
        )
    }
}

/// Why the trigger fired.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// The request rate crossed its threshold.
    Rate(f64),
    /// The origin error ratio crossed its threshold.
    Errors(f64),
}

/// The decision of the automatic trigger for one window: (requests, origin errors) over
/// `window`. Pure, so it is tested without traffic.
pub fn should_trigger(
    auto: &AutoTrigger,
    requests: u64,
    errors: u64,
    window: Duration,
) -> Option<Trigger> {
    let rate = requests as f64 / window.as_secs_f64().max(1e-3);
    if let Some(limit) = auto.requests_per_s
        && rate > limit
    {
        return Some(Trigger::Rate(rate));
    }
    if let Some(limit) = auto.origin_error_ratio
        && requests >= auto.min_requests
    {
        let ratio = errors as f64 / requests as f64;
        if ratio > limit {
            return Some(Trigger::Errors(ratio));
        }
    }
    None
}

/// The switch value an automatic trigger writes.
pub fn auto_switch() -> Vec<u8> {
    postcard::to_stdvec(&Switch {
        on: true,
        by: SetBy::Auto,
    })
    .unwrap_or_default()
}

/// The switch value an operator writes.
pub fn manual_switch(on: bool) -> Vec<u8> {
    postcard::to_stdvec(&Switch {
        on,
        by: SetBy::Manual,
    })
    .unwrap_or_default()
}

/// Holds the state of automatic switching between windows: whether this edge's trigger
/// holds a switch on for a route's host, so it renews it instead of re-posting every
/// window.
#[derive(Debug, Default)]
pub struct AutoWatch {
    /// Per route: [`crate::phases::connection::now_ms`] until which our switch is known on.
    on_until_ms: Vec<AtomicU64>,
}

impl AutoWatch {
    /// For `routes` routes.
    pub fn new(routes: usize) -> Self {
        Self {
            on_until_ms: (0..routes).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether a switch for route `i` should be (re)posted now, given the cool-down:
    /// yes when none of ours is on, or when it is past half its life.
    pub fn should_post(&self, i: usize, now_ms: u64, cool_down: Duration) -> bool {
        let Some(until) = self.on_until_ms.get(i) else {
            return false;
        };
        let until_ms = until.load(Ordering::Relaxed);
        let half = cool_down.as_millis() as u64 / 2;
        if until_ms > now_ms + half {
            return false;
        }
        until.store(now_ms + cool_down.as_millis() as u64, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(host: &str, on: bool) -> ActiveSwitch {
        ActiveSwitch {
            host: host.into(),
            on,
            by: SetBy::Manual,
            expires_in_s: 60,
            written_by: "edge-a".into(),
        }
    }

    #[test]
    fn the_most_specific_switch_decides() {
        let s = UnderAttackState::new(vec!["chat.example.com".into()]);
        assert!(s.is_on("chat.example.com"));
        assert!(!s.is_on("api.example.com"));
        s.set_switches(vec![switch("*", true), switch("chat.example.com", false)]);
        assert!(!s.is_on("chat.example.com"), "an operator switched it off");
        assert!(s.is_on("anything.example"));
        s.set_switches(vec![switch("*.example.com", true)]);
        assert!(s.is_on("api.example.com"));
        assert!(!s.is_on("example.org"));
    }

    #[test]
    fn switches_round_trip_through_bulletin_values() {
        let on = manual_switch(true);
        let auto = auto_switch();
        let entries = vec![
            ("attack/a.example", &on[..], "edge-a".to_string(), 10_000),
            ("attack/b.example", &auto[..], "edge-b".to_string(), 61_000),
            ("purge/x", &on[..], "edge-a".to_string(), 10_000),
            (
                "attack/c.example",
                &b"\xff\xff"[..],
                "edge-a".to_string(),
                10_000,
            ),
        ];
        let s = switches_from(entries.into_iter(), 1_000);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].host, "a.example");
        assert_eq!(s[1].by, SetBy::Auto);
        assert_eq!(s[1].expires_in_s, 60);
    }

    #[test]
    fn the_trigger_fires_on_rate_or_error_ratio() {
        let auto = AutoTrigger {
            requests_per_s: Some(100.0),
            origin_error_ratio: Some(0.5),
            min_requests: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(60),
        };
        let w = Duration::from_secs(10);
        assert_eq!(should_trigger(&auto, 500, 0, w), None);
        assert!(matches!(
            should_trigger(&auto, 1_001, 0, w),
            Some(Trigger::Rate(_))
        ));
        assert!(matches!(
            should_trigger(&auto, 40, 30, w),
            Some(Trigger::Errors(_))
        ));
        assert_eq!(
            should_trigger(&auto, 10, 10, w),
            None,
            "too few requests to judge"
        );
        let watch = AutoWatch::new(1);
        let cool = Duration::from_secs(60);
        assert!(watch.should_post(0, 1_000, cool));
        assert!(!watch.should_post(0, 20_000, cool));
        assert!(
            watch.should_post(0, 40_000, cool),
            "renewed past half its life"
        );
    }
}
