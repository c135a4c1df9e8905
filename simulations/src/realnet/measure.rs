//! The comparison: per client region, the same three user actions straight to the origin
//! and through the region's edge, next to their lower bounds (docs/architecture.md, "Measuring it").
//!
//! Bounds, with `L` the users↔edge RTT, `P` the best edge→connector path RTT over the
//! scenario's nodes (≤ 2 relays, from the matrix) and `D` the users↔origin RTT. The
//! connector sits beside the origin, and the edge's tunnel is already open, so a request
//! through the edge costs one user↔edge round trip plus one path round trip, `L + P`:
//!
//! | action | through the edge | straight to the origin |
//! |---|---|---|
//! | websocket: TCP, TLS 1.3, upgrade, first message echoed | `2L + 2(L + P)` | `4D` |
//! | dynamic request: TCP, TLS, `GET /api/time` to first byte | `2L + (L + P)` | `3D` |
//! | page: TCP, TLS, HTTP/2 `GET /`, then its assets in parallel | `2L + 2(L + P)` | `4D` |
//! | the same with the edge cache warm (the scenario's `edge_cache`): the page from the origin, the assets from the edge | `2L + (L + P) + L` | `4D` |

use std::time::Duration;

use futures_util::future::join_all;

use crate::report::model::{MetricRow, RegionComparison};
use crate::scenario::Plan;
use crate::stats::median;

use super::client::{MEASUREMENT_TIMEOUT, Users};
use super::{Cluster, Progress, RealnetError};

/// The three user actions.
#[derive(Clone, Copy, Debug)]
enum Action {
    Websocket,
    Dynamic,
    Page,
}

impl Action {
    const ALL: [Action; 3] = [Action::Websocket, Action::Dynamic, Action::Page];

    fn label(self) -> &'static str {
        match self {
            Action::Websocket => "websocket connect + first message",
            Action::Dynamic => "dynamic request TTFB (/api/time)",
            Action::Page => "page load with assets (/ + 3 assets, HTTP/2)",
        }
    }

    /// (edge bound, direct bound), ms; `cached`: the edge caches the page's assets.
    fn bounds(self, l: f64, p: f64, d: f64, cached: bool) -> (f64, f64) {
        match self {
            Action::Page if cached => (2.0 * l + (l + p) + l, 4.0 * d),
            Action::Websocket | Action::Page => (2.0 * l + 2.0 * (l + p), 4.0 * d),
            Action::Dynamic => (2.0 * l + (l + p), 3.0 * d),
        }
    }

    /// Times one action; also says how many HTTP requests it made.
    async fn run(
        self,
        users: &Users,
        addr: std::net::SocketAddr,
    ) -> Result<(Duration, u64), RealnetError> {
        let fut = async {
            match self {
                Action::Websocket => Ok((users.websocket_first_message(addr).await?, 1)),
                Action::Dynamic => Ok((users.dynamic_ttfb(addr).await?, 1)),
                Action::Page => users.page_load(addr).await,
            }
        };
        match tokio::time::timeout(MEASUREMENT_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(RealnetError::Client(format!(
                "{} took longer than {MEASUREMENT_TIMEOUT:?}",
                self.label()
            ))),
        }
    }
}

/// Measures every client region (concurrently across regions). Also returns how many
/// HTTP requests the users sent through the edges (each one would reach the origin
/// without a cache).
pub(crate) async fn compare(
    plan: &Plan,
    cluster: &Cluster,
    users: &Users,
    progress: &Progress,
) -> (Vec<RegionComparison>, u64) {
    let tasks = plan.clients.iter().enumerate().map(|(ci, c)| {
        let doors = cluster.doors[ci].clone();
        async move {
            let samples = plan.scenario.workload.samples;
            let (_, p) = plan.best_path_to_connector(c.edge, &[]);
            let mut rows = Vec::new();
            let mut direct = vec![Vec::new(); 3];
            let mut edge = vec![Vec::new(); 3];
            let mut failures = [0u32; 3];
            let mut via_edges = 0;
            if plan.scenario.edge_cache {
                // Warm the edge's cache with one page load, as a first visitor would.
                match Action::Page.run(users, doors.edge).await {
                    Ok((_, n)) => via_edges += n,
                    Err(e) => progress.say(&format!("{}: warming the cache failed: {e}", c.region)),
                }
            }
            for s in 0..samples {
                for (k, action) in Action::ALL.iter().enumerate() {
                    // Alternate which way goes first, so neither always gets a warmer system.
                    let order = if s % 2 == 0 {
                        [true, false]
                    } else {
                        [false, true]
                    };
                    for via_edge in order {
                        let addr = if via_edge { doors.edge } else { doors.origin };
                        match action.run(users, addr).await {
                            Ok((d, n)) => {
                                let ms = d.as_secs_f64() * 1000.0;
                                if via_edge {
                                    edge[k].push(ms);
                                    via_edges += n;
                                } else {
                                    direct[k].push(ms)
                                }
                            }
                            Err(e) => {
                                failures[k] += 1;
                                progress.say(&format!(
                                    "{}: {} failed: {e}",
                                    c.region,
                                    action.label()
                                ));
                            }
                        }
                    }
                }
                progress.say(&format!("{}: sample {}/{samples} done", c.region, s + 1));
            }
            for (k, action) in Action::ALL.iter().enumerate() {
                let (edge_bound_ms, direct_bound_ms) =
                    action.bounds(c.edge_rtt_ms, p, c.origin_rtt_ms, plan.scenario.edge_cache);
                let (dm, em) = (median(&direct[k]), median(&edge[k]));
                rows.push(MetricRow {
                    metric: action.label().into(),
                    direct_ms: dm,
                    edge_ms: em,
                    direct_bound_ms,
                    edge_bound_ms,
                    edge_over_bound_percent: (em / edge_bound_ms - 1.0) * 100.0,
                    saved_ms: dm - em,
                    saved_percent: (1.0 - em / dm) * 100.0,
                    direct_samples_ms: direct[k].clone(),
                    edge_samples_ms: edge[k].clone(),
                    failures: failures[k],
                });
            }
            let comparison = RegionComparison {
                region: c.region.clone(),
                edge: plan.nodes[c.edge].region.clone(),
                edge_rtt_ms: c.edge_rtt_ms,
                origin_rtt_ms: c.origin_rtt_ms,
                best_path_rtt_ms: p,
                metrics: rows,
            };
            (comparison, via_edges)
        }
    });
    let regions = join_all(tasks).await;
    let via_edges = regions.iter().map(|(_, n)| n).sum();
    (regions.into_iter().map(|(c, _)| c).collect(), via_edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_follow_the_architecture_doc() {
        // Sydney: 5 ms to the edge, 243.7 ms best path, 274.0 ms direct.
        let (e, d) = Action::Websocket.bounds(5.0, 243.7, 274.0, false);
        assert!((e - 507.4).abs() < 1e-9 && (d - 1096.0).abs() < 1e-9);
        let (e, d) = Action::Dynamic.bounds(5.0, 243.7, 274.0, false);
        assert!((e - 258.7).abs() < 1e-9 && (d - 822.0).abs() < 1e-9);
        // With the assets cached at the edge, the page costs one path round trip.
        let (e, _) = Action::Page.bounds(5.0, 243.7, 274.0, true);
        assert!((e - 263.7).abs() < 1e-9);
    }
}
