//! Route computation over the link-state graph, and the cost formula.
//!
//! # Cost
//!
//! A path's cost, in milliseconds, is
//!
//! ```text
//! cost = rtt_ms + loss_penalty_ms × loss
//! rtt  = Σ link RTTs                   (smoothed, or recent, per measure)
//! loss = 1 − Π (1 − link loss)          (independent losses per link)
//! ```
//!
//! With the default `loss_penalty_ms = 1000`, each percent of loss weighs like 10 ms of
//! RTT: a 2 % lossy 150 ms path (cost 170) loses to a clean 165 ms one. Loss is penalised
//! linearly rather than by expected retransmission delay because a lossy path hurts QUIC
//! far more than its mean delay says (congestion-window cuts, head-of-line stalls on
//! streams), and a linear term is easy for an operator to reason about. A measured
//! end-to-end path uses the same formula with its own RTT and loss.
//!
//! # Candidates
//!
//! [`CostGraph::best_paths`] enumerates the direct path and every path through one or two
//! relays whose links are all known and alive, and keeps the `k` cheapest by smoothed
//! cost. With N nodes that is O(N²) work per destination: 10⁴ cheap steps at N = 100.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::config::RoutingConfig;
use super::wire::{NodeKey, Path};

/// Cost of a path or link under the documented formula.
pub fn cost_ms(rtt: Duration, loss: f64, config: &RoutingConfig) -> f64 {
    rtt.as_secs_f64() * 1000.0 + config.loss_penalty_ms as f64 * loss.clamp(0.0, 1.0)
}

/// What is known of one link (in both directions: probes measure round trips).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkCost {
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Recent RTT.
    pub recent: Duration,
    /// Loss fraction.
    pub loss: f64,
    /// False if the link is known dead.
    pub alive: bool,
}

/// A path's cost on both measures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PathCost {
    /// Smoothed RTT of the path.
    pub srtt: Duration,
    /// Recent RTT of the path.
    pub recent: Duration,
    /// Loss fraction of the path.
    pub loss: f64,
    /// Cost from the smoothed RTT, in ms.
    pub smoothed_ms: f64,
    /// Cost from the recent RTT, in ms.
    pub recent_ms: f64,
}

impl PathCost {
    /// The cost of a path with these measurements.
    pub fn new(srtt: Duration, recent: Duration, loss: f64, config: &RoutingConfig) -> Self {
        PathCost {
            srtt,
            recent,
            loss,
            smoothed_ms: cost_ms(srtt, loss, config),
            recent_ms: cost_ms(recent, loss, config),
        }
    }

    /// The cost of a chain of links.
    pub fn chain<'a>(
        links: impl IntoIterator<Item = &'a LinkCost>,
        config: &RoutingConfig,
    ) -> Self {
        let mut srtt = Duration::ZERO;
        let mut recent = Duration::ZERO;
        let mut delivered = 1.0;
        for link in links {
            srtt += link.srtt;
            recent += link.recent;
            delivered *= 1.0 - link.loss.clamp(0.0, 1.0);
        }
        PathCost::new(srtt, recent, 1.0 - delivered, config)
    }

    /// True if `self` beats `current` clearly: by at least `min_gain_ms` and
    /// `min_gain_percent` of the current cost, on both the smoothed and the recent measure.
    pub fn clearly_beats(
        &self,
        current: &PathCost,
        min_gain_ms: u64,
        min_gain_percent: u64,
    ) -> bool {
        let wins = |new: f64, old: f64| {
            let gain = old - new;
            gain >= min_gain_ms as f64 && gain >= old * min_gain_percent as f64 / 100.0
        };
        wins(self.smoothed_ms, current.smoothed_ms) && wins(self.recent_ms, current.recent_ms)
    }
}

/// A dense snapshot of link costs between known nodes.
#[derive(Clone, Debug)]
pub struct CostGraph<N> {
    /// Nodes, sorted.
    nodes: Vec<N>,
    /// Node → position in `nodes`.
    index: BTreeMap<N, usize>,
    /// Row-major `nodes.len()²` matrix of directed link costs.
    links: Vec<Option<LinkCost>>,
}

impl<N: NodeKey> CostGraph<N> {
    /// A graph over `nodes` (deduplicated) with no links.
    pub fn new(mut nodes: Vec<N>) -> Self {
        nodes.sort();
        nodes.dedup();
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let n = nodes.len();
        CostGraph {
            nodes,
            index,
            links: vec![None; n * n],
        }
    }

    /// Position of `node`, if part of the graph.
    pub fn index_of(&self, node: &N) -> Option<usize> {
        self.index.get(node).copied()
    }

    /// Nodes, sorted.
    pub fn nodes(&self) -> &[N] {
        &self.nodes
    }

    /// Sets the cost of the link `a → b` (no-op for unknown nodes).
    pub fn set(&mut self, a: &N, b: &N, cost: Option<LinkCost>) {
        if let (Some(i), Some(j)) = (self.index_of(a), self.index_of(b)) {
            self.set_index(i, j, cost);
        }
    }

    /// Sets the cost of the link between positions `i` and `j`.
    pub fn set_index(&mut self, i: usize, j: usize, cost: Option<LinkCost>) {
        let n = self.nodes.len();
        if i < n && j < n {
            self.links[i * n + j] = cost;
        }
    }

    /// The cost of `a → b`, if known.
    pub fn link(&self, a: &N, b: &N) -> Option<&LinkCost> {
        let (i, j) = (self.index_of(a)?, self.index_of(b)?);
        self.link_index(i, j)
    }

    fn link_index(&self, i: usize, j: usize) -> Option<&LinkCost> {
        self.links[i * self.nodes.len() + j].as_ref()
    }

    fn alive(&self, i: usize, j: usize) -> Option<&LinkCost> {
        self.link_index(i, j).filter(|l| l.alive)
    }

    /// The cost of `path` if all its links are known and alive.
    pub fn path_cost(&self, path: &Path<N>, config: &RoutingConfig) -> Option<PathCost> {
        let mut links = Vec::with_capacity(3);
        for (a, b) in path.links() {
            links.push(*self.alive(self.index_of(a)?, self.index_of(b)?)?);
        }
        Some(PathCost::chain(&links, config))
    }

    /// The `k` cheapest (by smoothed cost) alive paths from `src` to `dst` with at most
    /// `max_relays` relays, cheapest first, among those `accept` lets through (it sees the
    /// relays in order).
    pub fn best_paths(
        &self,
        src: &N,
        dst: &N,
        max_relays: u32,
        k: usize,
        config: &RoutingConfig,
        accept: impl Fn(&[&N]) -> bool,
    ) -> Vec<(Path<N>, PathCost)> {
        let (Some(s), Some(d)) = (self.index_of(src), self.index_of(dst)) else {
            return Vec::new();
        };
        if s == d || k == 0 {
            return Vec::new();
        }
        let n = self.nodes.len();
        // (cost, relay indices); relays use usize::MAX for "none".
        let mut best: Vec<(f64, [usize; 2])> = Vec::with_capacity(k + 1);
        fn offer(best: &mut Vec<(f64, [usize; 2])>, k: usize, cost: f64, relays: [usize; 2]) {
            if best.len() == k && best.last().is_some_and(|(c, _)| *c <= cost) {
                return;
            }
            let at = best.partition_point(|(c, _)| *c <= cost);
            best.insert(at, (cost, relays));
            best.truncate(k);
        }
        let none = usize::MAX;
        if let Some(link) = self.alive(s, d)
            && accept(&[])
        {
            offer(
                &mut best,
                k,
                PathCost::chain([link], config).smoothed_ms,
                [none, none],
            );
        }
        if max_relays >= 1 {
            for r1 in 0..n {
                if r1 == s || r1 == d {
                    continue;
                }
                let Some(first) = self.alive(s, r1) else {
                    continue;
                };
                if let Some(last) = self.alive(r1, d)
                    && accept(&[&self.nodes[r1]])
                {
                    offer(
                        &mut best,
                        k,
                        PathCost::chain([first, last], config).smoothed_ms,
                        [r1, none],
                    );
                }
                if max_relays < 2 {
                    continue;
                }
                for r2 in 0..n {
                    if r2 == s || r2 == d || r2 == r1 {
                        continue;
                    }
                    let (Some(middle), Some(last)) = (self.alive(r1, r2), self.alive(r2, d)) else {
                        continue;
                    };
                    // Cheap lower bound first: RTTs only grow the cost.
                    let rtt_ms = (first.srtt + middle.srtt + last.srtt).as_secs_f64() * 1000.0;
                    if best.len() == k && best.last().is_some_and(|(c, _)| *c <= rtt_ms) {
                        continue;
                    }
                    if accept(&[&self.nodes[r1], &self.nodes[r2]]) {
                        offer(
                            &mut best,
                            k,
                            PathCost::chain([first, middle, last], config).smoothed_ms,
                            [r1, r2],
                        );
                    }
                }
            }
        }
        best.into_iter()
            .filter_map(|(_, relays)| {
                let mut nodes = vec![self.nodes[s].clone()];
                nodes.extend(
                    relays
                        .iter()
                        .filter(|&&r| r != none)
                        .map(|&r| self.nodes[r].clone()),
                );
                nodes.push(self.nodes[d].clone());
                let path = Path::new(nodes).ok()?;
                let cost = self.path_cost(&path, config)?;
                Some((path, cost))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::wire::PeerIndex;
    use proptest::prelude::*;

    fn link(ms: u64) -> LinkCost {
        LinkCost {
            srtt: Duration::from_millis(ms),
            recent: Duration::from_millis(ms),
            loss: 0.0,
            alive: true,
        }
    }

    fn graph(n: u16, edges: &[(u16, u16, Option<LinkCost>)]) -> CostGraph<PeerIndex> {
        let mut g = CostGraph::new((0..n).map(PeerIndex).collect());
        for (a, b, c) in edges {
            g.set(&PeerIndex(*a), &PeerIndex(*b), *c);
            g.set(&PeerIndex(*b), &PeerIndex(*a), *c);
        }
        g
    }

    #[test]
    fn cost_formula() {
        let config = RoutingConfig::default();
        assert_eq!(cost_ms(Duration::from_millis(150), 0.02, &config), 170.0);
        let c = PathCost::chain(
            [
                &link(10),
                &LinkCost {
                    loss: 0.5,
                    ..link(20)
                },
            ],
            &config,
        );
        assert_eq!(c.srtt, Duration::from_millis(30));
        assert!((c.loss - 0.5).abs() < 1e-9);
        assert!((c.smoothed_ms - 530.0).abs() < 1e-9);
    }

    #[test]
    fn clear_win_needs_both_thresholds_on_both_measures() {
        let config = RoutingConfig::default();
        let cur = PathCost::new(
            Duration::from_millis(200),
            Duration::from_millis(200),
            0.0,
            &config,
        );
        let ms = |s, r| {
            PathCost::new(
                Duration::from_millis(s),
                Duration::from_millis(r),
                0.0,
                &config,
            )
        };
        assert!(ms(180, 180).clearly_beats(&cur, 10, 10));
        assert!(
            !ms(181, 170).clearly_beats(&cur, 10, 10),
            "smoothed gain below 10 %"
        );
        assert!(
            !ms(170, 195).clearly_beats(&cur, 10, 10),
            "recent gain too small"
        );
        let small = PathCost::new(
            Duration::from_millis(50),
            Duration::from_millis(50),
            0.0,
            &config,
        );
        assert!(!ms(41, 41).clearly_beats(&small, 10, 10), "18 % but 9 ms");
    }

    #[test]
    fn relays_beat_a_slow_direct_link() {
        let config = RoutingConfig::default();
        // 0 —200— 3 directly; 0 —30— 1 —40— 2 —50— 3; 0 —100— 2.
        let g = graph(
            4,
            &[
                (0, 3, Some(link(200))),
                (0, 1, Some(link(30))),
                (1, 2, Some(link(40))),
                (2, 3, Some(link(50))),
                (0, 2, Some(link(100))),
            ],
        );
        let best = g.best_paths(&PeerIndex(0), &PeerIndex(3), 2, 3, &config, |_| true);
        let nodes: Vec<Vec<u16>> = best
            .iter()
            .map(|(p, _)| p.nodes().iter().map(|n| n.0).collect())
            .collect();
        assert_eq!(nodes, vec![vec![0, 1, 2, 3], vec![0, 2, 3], vec![0, 3]]);
        assert_eq!(best[0].1.srtt, Duration::from_millis(120));
        let one = g.best_paths(&PeerIndex(0), &PeerIndex(3), 1, 1, &config, |_| true);
        assert_eq!(one[0].0.nodes().len(), 3);
        let avoid_1 = g.best_paths(&PeerIndex(0), &PeerIndex(3), 2, 1, &config, |r| {
            !r.contains(&&PeerIndex(1))
        });
        assert_eq!(avoid_1[0].0.relays(), &[PeerIndex(2)]);
    }

    /// Random symmetric graphs: costs 1..300 ms, some links dead, some unknown.
    fn arb_graph() -> impl Strategy<Value = (u16, Vec<(u16, u16, Option<LinkCost>)>)> {
        (3u16..8).prop_flat_map(|n| {
            let pairs: Vec<(u16, u16)> = (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .collect();
            let len = pairs.len();
            proptest::collection::vec((0u8..10, 1u64..300, 0u16..200), len).prop_map(move |specs| {
                let edges = pairs
                    .iter()
                    .zip(specs)
                    .map(|(&(a, b), (kind, ms, loss))| {
                        let cost = match kind {
                            0 => None,
                            1 => Some(LinkCost {
                                alive: false,
                                ..link(ms)
                            }),
                            _ => Some(LinkCost {
                                loss: f64::from(loss) / 1000.0,
                                ..link(ms)
                            }),
                        };
                        (a, b, cost)
                    })
                    .collect();
                (n, edges)
            })
        })
    }

    proptest! {
        #[test]
        fn best_path_is_optimal_alive_and_short((n, edges) in arb_graph(), dst in 1u16..8) {
            prop_assume!(dst < n);
            let config = RoutingConfig::default();
            let g = graph(n, &edges);
            let (src, dst) = (PeerIndex(0), PeerIndex(dst));
            let best = g.best_paths(&src, &dst, 2, 4, &config, |_| true);
            // Brute force over all ≤ 2-relay paths.
            let mut brute: Option<f64> = None;
            for a in 0..n { for b in 0..n {
                for nodes in [vec![0, dst.0], vec![0, a, dst.0], vec![0, a, b, dst.0]] {
                    let Ok(path) = Path::new(nodes.into_iter().map(PeerIndex).collect()) else { continue };
                    if let Some(c) = g.path_cost(&path, &config) {
                        brute = Some(brute.map_or(c.smoothed_ms, |x: f64| x.min(c.smoothed_ms)));
                    }
                }
            }}
            match brute {
                None => prop_assert!(best.is_empty()),
                Some(optimum) => {
                    prop_assert!((best[0].1.smoothed_ms - optimum).abs() < 1e-6);
                }
            }
            for window in best.windows(2) {
                prop_assert!(window[0].1.smoothed_ms <= window[1].1.smoothed_ms);
            }
            for (path, cost) in &best {
                prop_assert!(path.relays().len() <= 2);
                prop_assert_eq!(path.source(), &src);
                prop_assert_eq!(path.destination(), &dst);
                for (a, b) in path.links() {
                    prop_assert!(g.link(a, b).is_some_and(|l| l.alive), "uses a dead or unknown link");
                }
                if let Some(direct) = g.link(&src, &dst).filter(|l| l.alive) {
                    let direct_cost = PathCost::chain([direct], &config);
                    prop_assert!(best[0].1.smoothed_ms <= direct_cost.smoothed_ms + 1e-9);
                }
                prop_assert!(cost.smoothed_ms >= 0.0);
            }
        }
    }
}
