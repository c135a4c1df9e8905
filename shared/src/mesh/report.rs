//! Node reports: every node posts a small summary of its load and of the routes it uses on
//! the bulletin every [`INTERVAL`], so the status page of any one node shows the whole
//! mesh — each member's request and error rates, and the path each one takes to the
//! others — without the operator visiting every node.
//!
//! A report is about 100 bytes plus 9–25 per route. The bulletin floods each one to every
//! member, so a mesh of `n` nodes spends about `n³ / INTERVAL` datagrams a second on them
//! mesh-wide (`n` reports, each passed on by every member to every member): 50 a second
//! for eight nodes, 4,700 for 36 — the bulletin is made for meshes of a few dozen. A report
//! expires after [`TTL`], so a node that stops reporting drops off the page.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bulletin::{Bulletin, MAX_VALUE_BYTES};
use crate::identity::ShortId;

/// Bulletin key prefix; the key ends with the reporting node's short id.
pub const KEY_PREFIX: &str = "report/";
/// How often a node reports.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How long a report stays: three missed reports and the node is shown without one.
pub const TTL: Duration = Duration::from_secs(31);

/// Counts since the node started, read by the reporter every [`INTERVAL`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Requests (edge) or tunnel streams (connector) handled.
    pub requests: u64,
    /// Of those, the ones that failed: 5xx answers at an edge, refused or failed streams
    /// at a connector.
    pub errors: u64,
    /// Client connections (edge) or tunnels (connector) open now.
    pub open_connections: u64,
    /// Tunnels up now.
    pub tunnels_up: u64,
    /// Share of cacheable requests answered from the cache, if the node has one.
    pub cache_hit_ratio: Option<f64>,
}

/// What a node reports about its load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Requests per second over the last interval.
    pub requests_per_s: f64,
    /// Errors per second over the last interval.
    pub errors_per_s: f64,
    /// Client connections (edge) or tunnels (connector) open.
    pub open_connections: u32,
    /// Tunnels up.
    pub tunnels_up: u32,
    /// Cache hit ratio, if the node caches.
    pub cache_hit_ratio: Option<f64>,
}

/// A report as it travels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Wire {
    load: Load,
    /// The routes the node uses: the nodes after it, the destination last.
    routes: Vec<Vec<ShortId>>,
    /// True when routes were left out to fit the bulletin's value size.
    truncated: bool,
}

/// A decoded report.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The node that wrote it.
    pub node: ShortId,
    /// When it wrote it (Unix ms, the writer's clock).
    pub unix_ms: u64,
    /// Its load.
    pub load: Load,
    /// Its routes, the nodes after it, destination last.
    pub routes: Vec<Vec<ShortId>>,
    /// Whether some routes were left out.
    pub truncated: bool,
}

/// Turns two samples `secs` apart into the load to report.
pub fn load_between(before: &Sample, now: &Sample, secs: f64) -> Load {
    let rate = |a: u64, b: u64| {
        if secs > 0.0 {
            round3(b.saturating_sub(a) as f64 / secs)
        } else {
            0.0
        }
    };
    Load {
        requests_per_s: rate(before.requests, now.requests),
        errors_per_s: rate(before.errors, now.errors),
        open_connections: now.open_connections.min(u32::MAX as u64) as u32,
        tunnels_up: now.tunnels_up.min(u32::MAX as u64) as u32,
        cache_hit_ratio: now.cache_hit_ratio.map(round3),
    }
}

/// Three decimals are all a status page shows, and the rest would only travel.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The bulletin key of `node`'s report.
pub fn key_of(node: &ShortId) -> String {
    format!("{KEY_PREFIX}{node}")
}

/// Encodes a report, leaving out routes from the end until it fits a bulletin value.
pub fn encode(load: Load, mut routes: Vec<Vec<ShortId>>) -> Vec<u8> {
    let mut truncated = false;
    loop {
        let wire = Wire {
            load: load.clone(),
            routes,
            truncated,
        };
        let bytes = postcard::to_stdvec(&wire).unwrap_or_default();
        if bytes.len() <= MAX_VALUE_BYTES || wire.routes.is_empty() {
            return bytes;
        }
        routes = wire.routes;
        routes.pop();
        truncated = true;
    }
}

/// Every live report on `bulletin`, skipping any whose key names a node other than the
/// one that wrote it (a member may only speak for itself) and any that does not decode.
pub fn read_all(bulletin: &Bulletin, now_unix_ms: u64) -> Vec<Report> {
    bulletin
        .entries_with_prefix(KEY_PREFIX, now_unix_ms)
        .filter(|e| e.key[KEY_PREFIX.len()..] == e.stamp.origin.to_string())
        .filter_map(|e| {
            let wire: Wire = postcard::from_bytes(&e.value).ok()?;
            Some(Report {
                node: e.stamp.origin,
                unix_ms: e.stamp.unix_ms,
                load: wire.load,
                routes: wire.routes,
                truncated: wire.truncated,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn id(n: u8) -> ShortId {
        ShortId([n; 8])
    }

    #[test]
    fn rates_come_from_the_difference_of_two_samples() {
        let before = Sample {
            requests: 100,
            errors: 1,
            ..Sample::default()
        };
        let now = Sample {
            requests: 600,
            errors: 11,
            open_connections: 7,
            tunnels_up: 2,
            cache_hit_ratio: Some(0.5),
        };
        let load = load_between(&before, &now, 10.0);
        assert_eq!(load.requests_per_s, 50.0);
        assert_eq!(load.errors_per_s, 1.0);
        assert_eq!(load.open_connections, 7);
        assert_eq!(load.cache_hit_ratio, Some(0.5));
        // A counter that went backwards (a restart between samples) is no negative rate.
        assert_eq!(load_between(&now, &before, 10.0).requests_per_s, 0.0);
    }

    #[test]
    fn a_report_with_too_many_routes_is_cut_to_fit_and_says_so() {
        let routes: Vec<Vec<ShortId>> = (0..200).map(|n| vec![id(n), id(n + 1)]).collect();
        let bytes = encode(Load::default(), routes);
        assert!(bytes.len() <= MAX_VALUE_BYTES);
        let wire: Wire = postcard::from_bytes(&bytes).expect("decodes");
        assert!(wire.truncated);
        assert!(!wire.routes.is_empty());
        assert_eq!(wire.routes[0], vec![id(0), id(1)]);
    }

    #[test]
    fn only_reports_a_node_wrote_about_itself_are_read() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut bulletin = Bulletin::new(id(1), 1_000, &mut rng);
        let value = encode(Load::default(), vec![vec![id(2)]]);
        bulletin
            .post(1_000, &key_of(&id(1)), value.clone(), 30_000)
            .expect("posted");
        // Node 1 writing a report under node 9's key is ignored.
        bulletin
            .post(1_000, &key_of(&id(9)), value, 30_000)
            .expect("posted");
        bulletin
            .post(1_000, &key_of(&id(3)), b"not a report".to_vec(), 30_000)
            .expect("posted");
        let reports = read_all(&bulletin, 2_000);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].node, id(1));
        assert_eq!(reports[0].routes, vec![vec![id(2)]]);
        // Expired: gone.
        assert!(read_all(&bulletin, 40_000).is_empty());
    }
}
