//! The measurements behind `docs/routing.md`, shared by `simulate` and the tests.
//!
//! Every function is deterministic given its seed.

use serde::Serialize;
use skylane_shared::routing::{ConfigError, Path, PeerIndex, SwitchReason};

use super::matrix::RttMatrix;
use super::net::{NetConfig, VirtualNet};

/// The route one edge ended up with, against the truth.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeRoute {
    /// The edge's region.
    pub region: String,
    /// True RTT of the direct path to the origin, ms.
    pub direct_rtt_ms: f64,
    /// Chosen path, edge first, origin last (empty if no route).
    pub chosen_path: Vec<String>,
    /// True RTT of the chosen path, ms (from the matrix, not from measurements).
    pub chosen_rtt_ms: f64,
    /// The edge's own measured smoothed RTT of the chosen path, ms.
    pub measured_rtt_ms: f64,
    /// RTT of the true best path with at most two relays, ms.
    pub optimal_rtt_ms: f64,
    /// That path.
    pub optimal_path: Vec<String>,
    /// How much slower than optimal the chosen path is, %.
    pub gap_to_optimal_percent: f64,
    /// How much faster than direct the chosen path is, %.
    pub improvement_percent: f64,
}

/// Aggregates over all edges.
#[derive(Clone, Debug, Serialize)]
pub struct RouteSummary {
    /// Number of edges.
    pub edges: usize,
    /// Edges whose chosen path uses at least one relay.
    pub relayed: usize,
    /// Edges within 5 % of the optimal path.
    pub within_5_percent: usize,
    /// Mean direct RTT, ms.
    pub mean_direct_rtt_ms: f64,
    /// Mean chosen RTT, ms.
    pub mean_chosen_rtt_ms: f64,
    /// Mean optimal RTT, ms.
    pub mean_optimal_rtt_ms: f64,
    /// Mean per-edge improvement over direct, %.
    pub mean_improvement_percent: f64,
    /// Worst gap to optimal, %.
    pub max_gap_to_optimal_percent: f64,
}

fn names(matrix: &RttMatrix, path: &[usize]) -> Vec<String> {
    path.iter().map(|&i| matrix.names()[i].clone()).collect()
}

fn indices(path: &Path<PeerIndex>) -> Vec<usize> {
    path.nodes().iter().map(|p| usize::from(p.0)).collect()
}

/// Builds the mesh and runs it for `settle_ms` of virtual time.
pub fn converge(
    matrix: &RttMatrix,
    origin: usize,
    config: NetConfig,
    seed: u64,
    settle_ms: u64,
) -> Result<VirtualNet, ConfigError> {
    let mut net = VirtualNet::new(matrix, origin, config, seed)?;
    net.run_for_ms(settle_ms);
    Ok(net)
}

/// Every edge's current route against the true optimum.
pub fn edge_routes(net: &VirtualNet, matrix: &RttMatrix, origin: usize) -> Vec<EdgeRoute> {
    (0..matrix.len())
        .filter(|&e| e != origin)
        .map(|e| {
            let route = net.router(e).route(&PeerIndex(origin as u16));
            let chosen: Vec<usize> = route.map(|r| indices(&r.path)).unwrap_or_default();
            let chosen_rtt_ms = if chosen.is_empty() {
                f64::INFINITY
            } else {
                matrix.path_rtt_ms(&chosen)
            };
            let (optimal, optimal_rtt_ms) = matrix.optimal_path(e, origin);
            let direct_rtt_ms = matrix.rtt_ms(e, origin);
            EdgeRoute {
                region: matrix.names()[e].clone(),
                direct_rtt_ms,
                chosen_path: names(matrix, &chosen),
                chosen_rtt_ms,
                measured_rtt_ms: route.map_or(f64::NAN, |r| r.cost.srtt.as_secs_f64() * 1000.0),
                optimal_rtt_ms,
                optimal_path: names(matrix, &optimal),
                gap_to_optimal_percent: (chosen_rtt_ms / optimal_rtt_ms - 1.0) * 100.0,
                improvement_percent: (1.0 - chosen_rtt_ms / direct_rtt_ms) * 100.0,
            }
        })
        .collect()
}

/// Aggregates edge routes.
pub fn summarize(edges: &[EdgeRoute]) -> RouteSummary {
    let n = edges.len().max(1) as f64;
    let mean = |f: fn(&EdgeRoute) -> f64| edges.iter().map(f).sum::<f64>() / n;
    RouteSummary {
        edges: edges.len(),
        relayed: edges.iter().filter(|e| e.chosen_path.len() > 2).count(),
        within_5_percent: edges
            .iter()
            .filter(|e| e.gap_to_optimal_percent <= 5.0)
            .count(),
        mean_direct_rtt_ms: mean(|e| e.direct_rtt_ms),
        mean_chosen_rtt_ms: mean(|e| e.chosen_rtt_ms),
        mean_optimal_rtt_ms: mean(|e| e.optimal_rtt_ms),
        mean_improvement_percent: mean(|e| e.improvement_percent),
        max_gap_to_optimal_percent: edges
            .iter()
            .map(|e| e.gap_to_optimal_percent)
            .fold(0.0, f64::max),
    }
}

/// What was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The relay carrying a flow crashed.
    KillRelay,
    /// A link carrying a flow was cut (both directions).
    CutLink,
}

/// One injected failure and how the affected edge coped.
#[derive(Clone, Debug, Serialize)]
pub struct FailureResult {
    /// What was broken.
    pub kind: FailureKind,
    /// The edge whose flow was hit.
    pub edge: String,
    /// The killed relay, or the cut link as `a-b`.
    pub element: String,
    /// Path before the failure.
    pub path_before: Vec<String>,
    /// Path once recovered.
    pub path_after: Vec<String>,
    /// Time from the failure until the edge declared its path dead, ms.
    pub detect_ms: Option<f64>,
    /// Time from the failure until the edge's route moved to a path that works, ms.
    pub recover_ms: Option<f64>,
}

/// Percentiles of recovery times.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverSummary {
    /// Failures injected.
    pub runs: usize,
    /// Runs that recovered within the observation window.
    pub recovered: usize,
    /// Median detection time, ms.
    pub detect_p50_ms: f64,
    /// Median recovery time, ms.
    pub recover_p50_ms: f64,
    /// 99th percentile recovery time, ms.
    pub recover_p99_ms: f64,
    /// Worst recovery time, ms.
    pub recover_max_ms: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// How long after a failure the affected edge is watched, ms.
const FAILURE_WATCH_MS: u64 = 5_000;

/// Injects `count` independent failures, each on its own copy of the converged mesh
/// `base`: even runs crash the first relay of some relayed flow (or cut a link if no flow
/// is relayed), odd runs cut a random link of some flow. The failure happens at a random
/// phase within the next second so it lands anywhere between probes.
pub fn inject_failures(
    base: &VirtualNet,
    matrix: &RttMatrix,
    origin: usize,
    count: usize,
    seed: u64,
) -> Vec<FailureResult> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let origin_key = PeerIndex(origin as u16);
    let flows: Vec<(usize, Path<PeerIndex>)> = (0..matrix.len())
        .filter(|&e| e != origin)
        .filter_map(|e| Some((e, base.router(e).route(&origin_key)?.path.clone())))
        .collect();
    let relayed: Vec<&(usize, Path<PeerIndex>)> =
        flows.iter().filter(|(_, p)| !p.is_direct()).collect();
    let mut results = Vec::with_capacity(count);
    for run in 0..count {
        if flows.is_empty() {
            break;
        }
        let kill = run % 2 == 0 && !relayed.is_empty();
        let (edge, path) = if kill {
            relayed[rng.random_range(0..relayed.len())].clone()
        } else {
            flows[rng.random_range(0..flows.len())].clone()
        };
        let mut net = base.clone();
        net.reseed(seed.wrapping_mul(1_000_003).wrapping_add(run as u64));
        net.run_for_ms(rng.random_range(0..1000));
        let fail_us = net.now_us();
        let nodes = indices(&path);
        let (kind, element) = if kill {
            let relay = nodes[1 + rng.random_range(0..nodes.len() - 2)];
            net.crash(relay);
            (FailureKind::KillRelay, matrix.names()[relay].clone())
        } else {
            let k = rng.random_range(0..nodes.len() - 1);
            net.set_cut(nodes[k], nodes[k + 1], true);
            (
                FailureKind::CutLink,
                format!(
                    "{}-{}",
                    matrix.names()[nodes[k]],
                    matrix.names()[nodes[k + 1]]
                ),
            )
        };
        let mut detect = None;
        let mut recover = None;
        let until = fail_us + FAILURE_WATCH_MS * 1000;
        while let Some(node) = net.step(until) {
            if node != edge {
                continue;
            }
            let router = net.router(edge);
            let since_ms = (net.now_us() - fail_us) as f64 / 1000.0;
            let current = router.route(&origin_key).map(|r| r.path.clone());
            if detect.is_none()
                && (router.path_stats(&path).is_some_and(|s| s.is_dead())
                    || current.as_ref() != Some(&path))
            {
                detect = Some(since_ms);
            }
            if recover.is_none()
                && current
                    .as_ref()
                    .is_some_and(|c| c != &path && net.path_works(c))
            {
                recover = Some(since_ms);
            }
            if detect.is_some() && recover.is_some() {
                break;
            }
        }
        let after = net
            .router(edge)
            .route(&origin_key)
            .map(|r| indices(&r.path))
            .unwrap_or_default();
        results.push(FailureResult {
            kind,
            edge: matrix.names()[edge].clone(),
            element,
            path_before: names(matrix, &nodes),
            path_after: names(matrix, &after),
            detect_ms: detect,
            recover_ms: recover,
        });
    }
    results
}

/// Percentiles over failure results (unrecovered runs count as infinitely slow).
pub fn summarize_failures(results: &[FailureResult]) -> FailoverSummary {
    let mut recover: Vec<f64> = results
        .iter()
        .map(|r| r.recover_ms.unwrap_or(f64::INFINITY))
        .collect();
    recover.sort_by(f64::total_cmp);
    let mut detect: Vec<f64> = results.iter().filter_map(|r| r.detect_ms).collect();
    detect.sort_by(f64::total_cmp);
    FailoverSummary {
        runs: results.len(),
        recovered: results.iter().filter(|r| r.recover_ms.is_some()).count(),
        detect_p50_ms: percentile(&detect, 50.0),
        recover_p50_ms: percentile(&recover, 50.0),
        recover_p99_ms: percentile(&recover, 99.0),
        recover_max_ms: recover.last().copied().unwrap_or(f64::NAN),
    }
}

/// How fast a fresh mesh converges.
#[derive(Clone, Debug, Serialize)]
pub struct ConvergenceReport {
    /// Nodes in the mesh.
    pub nodes: usize,
    /// Time until every node knew every link of the mesh, ms.
    pub full_view_ms: Option<f64>,
    /// Time from which every edge's route stayed within 5 % of optimal until the end, ms.
    pub routes_within_5_percent_ms: Option<f64>,
    /// Time of the last route change of any node, ms.
    pub last_route_change_ms: f64,
    /// Observation length, ms.
    pub observed_ms: u64,
}

/// Watches a fresh mesh for `observe_ms`, sampling every 100 ms of virtual time.
pub fn convergence(
    matrix: &RttMatrix,
    origin: usize,
    config: NetConfig,
    seed: u64,
    observe_ms: u64,
) -> Result<(ConvergenceReport, VirtualNet), ConfigError> {
    let n = matrix.len();
    let mut net = VirtualNet::new(matrix, origin, config, seed)?;
    let optimal: Vec<f64> = (0..n).map(|e| matrix.optimal_path(e, origin).1).collect();
    let mut full_view = None;
    let mut good_since: Option<u64> = None;
    let full_links = n * (n - 1);
    let mut t = 0;
    while t < observe_ms {
        t += 100;
        net.run_until(t * 1000);
        if full_view.is_none()
            && (0..n).all(|i| net.router(i).link_state().iter().count() >= full_links)
        {
            full_view = Some(t as f64);
        }
        let good = (0..n).filter(|&e| e != origin).all(|e| {
            net.router(e)
                .route(&PeerIndex(origin as u16))
                .is_some_and(|r| net.path_rtt_ms(&r.path) <= optimal[e] * 1.05)
        });
        match (good, good_since) {
            (true, None) => good_since = Some(t),
            (false, _) => good_since = None,
            _ => {}
        }
    }
    let last = net
        .log()
        .last()
        .map_or(0.0, |e| e.event.at.since_epoch().as_secs_f64() * 1000.0);
    Ok((
        ConvergenceReport {
            nodes: n,
            full_view_ms: full_view,
            routes_within_5_percent_ms: good_since.map(|t| t as f64),
            last_route_change_ms: last,
            observed_ms: observe_ms,
        },
        net,
    ))
}

/// How fast a latency change on one link reaches every node.
#[derive(Clone, Debug, Serialize)]
pub struct PropagationReport {
    /// The changed link.
    pub link: (String, String),
    /// RTT before, ms.
    pub old_rtt_ms: f64,
    /// RTT after, ms.
    pub new_rtt_ms: f64,
    /// Time from the change until an endpoint published it (measurement lag), ms.
    pub first_published_ms: Option<f64>,
    /// Time from the change until every node's view showed it, ms.
    pub all_nodes_ms: Option<f64>,
}

/// On a converged mesh, raises the RTT of link `a`–`b` by `factor` and watches the
/// news spread: a node "knows" once either endpoint's report it holds shows at least half
/// the change. Sampled every 10 ms.
pub fn propagation(
    net: &mut VirtualNet,
    matrix: &RttMatrix,
    a: usize,
    b: usize,
    factor: f64,
) -> PropagationReport {
    let old = net.rtt_ms(a, b);
    let new = old * factor;
    net.set_rtt_ms(a, b, new);
    let threshold_us = ((old + (new - old) / 2.0) * 1000.0) as u32;
    let (pa, pb) = (PeerIndex(a as u16), PeerIndex(b as u16));
    let knows = |net: &VirtualNet, i: usize| {
        let db = net.router(i).link_state();
        [db.link(&pa, &pb), db.link(&pb, &pa)]
            .into_iter()
            .flatten()
            .any(|m| m.recent_us >= threshold_us || m.srtt_us >= threshold_us)
    };
    let start = net.now_us();
    let mut first = None;
    let mut all = None;
    let limit_ms = 120_000;
    let mut t = 0;
    while t < limit_ms && all.is_none() {
        t += 10;
        net.run_until(start + t * 1000);
        let count = (0..net.len())
            .filter(|&i| net.is_up(i) && knows(net, i))
            .count();
        if count > 0 && first.is_none() {
            first = Some(t as f64);
        }
        if count == net.len() {
            all = Some(t as f64);
        }
    }
    PropagationReport {
        link: (matrix.names()[a].clone(), matrix.names()[b].clone()),
        old_rtt_ms: old,
        new_rtt_ms: new,
        first_published_ms: first,
        all_nodes_ms: all,
    }
}

/// Routing-control traffic in steady state.
#[derive(Clone, Debug, Serialize)]
pub struct BandwidthReport {
    /// Nodes in the mesh.
    pub nodes: usize,
    /// Steady-state window, s (after the warm-up).
    pub window_s: f64,
    /// Mean gossip bytes sent per node per second in the window.
    pub gossip_bytes_per_node_per_s: f64,
    /// Largest per-node gossip rate in the window, bytes/s.
    pub gossip_bytes_per_node_per_s_max: f64,
    /// Mean gossip datagrams per node per second in the window.
    pub gossip_datagrams_per_node_per_s: f64,
    /// Mean gossip bytes per node per second during the warm-up (initial flood).
    pub warmup_gossip_bytes_per_node_per_s: f64,
    /// Mean probe bytes (own and relayed probes and replies) per node per second.
    pub probe_bytes_per_node_per_s: f64,
}

/// Runs a fresh mesh for `warmup_ms`, then measures traffic over `window_ms`.
pub fn bandwidth(
    matrix: &RttMatrix,
    origin: usize,
    config: NetConfig,
    seed: u64,
    warmup_ms: u64,
    window_ms: u64,
) -> Result<BandwidthReport, ConfigError> {
    let mut net = converge(matrix, origin, config, seed, warmup_ms)?;
    let n = net.len();
    let before: Vec<_> = (0..n).map(|i| net.traffic(i)).collect();
    net.run_for_ms(window_ms);
    let secs = window_ms as f64 / 1000.0;
    let per_node: Vec<f64> = (0..n)
        .map(|i| (net.traffic(i).gossip_bytes - before[i].gossip_bytes) as f64 / secs)
        .collect();
    let datagrams: u64 = (0..n)
        .map(|i| net.traffic(i).gossip_datagrams - before[i].gossip_datagrams)
        .sum();
    let probes: u64 = (0..n)
        .map(|i| net.traffic(i).probe_bytes - before[i].probe_bytes)
        .sum();
    let warmup: u64 = before.iter().map(|t| t.gossip_bytes).sum();
    Ok(BandwidthReport {
        nodes: n,
        window_s: secs,
        gossip_bytes_per_node_per_s: per_node.iter().sum::<f64>() / n as f64,
        gossip_bytes_per_node_per_s_max: per_node.iter().copied().fold(0.0, f64::max),
        gossip_datagrams_per_node_per_s: datagrams as f64 / n as f64 / secs,
        warmup_gossip_bytes_per_node_per_s: warmup as f64 / n as f64 / (warmup_ms as f64 / 1000.0),
        probe_bytes_per_node_per_s: probes as f64 / n as f64 / secs,
    })
}

/// Route stability under jitter.
#[derive(Clone, Debug, Serialize)]
pub struct FlappingReport {
    /// Simulated time, s.
    pub duration_s: f64,
    /// Per-datagram jitter, fraction of one-way latency.
    pub jitter_fraction: f64,
    /// Edges.
    pub edges: usize,
    /// Performance-driven switches (reason `Better`) after settling, all nodes.
    pub performance_switches: usize,
    /// Failovers (should be 0: nothing fails).
    pub failovers: usize,
    /// Most performance-driven switches by one node within any sliding 10-minute window.
    pub max_switches_per_node_per_10_min: usize,
    /// Nodes that made at least one performance-driven switch.
    pub nodes_that_switched: usize,
}

/// Runs a fresh mesh with `jitter_fraction` on every link for `duration_ms` and counts
/// route changes after the settling window.
pub fn flapping(
    matrix: &RttMatrix,
    origin: usize,
    mut config: NetConfig,
    seed: u64,
    duration_ms: u64,
    jitter_fraction: f64,
) -> Result<FlappingReport, ConfigError> {
    config.jitter_fraction = jitter_fraction;
    let settle = std::time::Duration::from_millis(config.routing.settle_ms);
    let net = converge(matrix, origin, config, seed, duration_ms)?;
    let n = net.len();
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failovers = 0;
    for logged in net.log() {
        match logged.event.reason {
            SwitchReason::Better => {
                per_node[logged.node].push(logged.event.at.since_epoch().as_secs_f64())
            }
            SwitchReason::Failover if logged.event.at.since_epoch() > settle => failovers += 1,
            _ => {}
        }
    }
    let max_window = per_node
        .iter()
        .map(|times| {
            (0..times.len())
                .map(|i| {
                    times[i..]
                        .iter()
                        .take_while(|&&t| t < times[i] + 600.0)
                        .count()
                })
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    Ok(FlappingReport {
        duration_s: duration_ms as f64 / 1000.0,
        jitter_fraction,
        edges: n - 1,
        performance_switches: per_node.iter().map(Vec::len).sum(),
        failovers,
        max_switches_per_node_per_10_min: max_window,
        nodes_that_switched: per_node.iter().filter(|t| !t.is_empty()).count(),
    })
}

/// Data packets carried by the real mesh core in virtual time, through a relay that dies
/// mid-stream ([`dataplane_failover`]).
#[derive(Clone, Debug, Serialize)]
pub struct DataPlaneReport {
    /// The edge that sends.
    pub edge: String,
    /// Its path to the origin when the relay died.
    pub path_before: Vec<String>,
    /// The relay that was crashed.
    pub relay: String,
    /// Its path at the end.
    pub path_after: Vec<String>,
    /// Packets sent, alternately QUIC and WireGuard, one every `interval_ms`.
    pub sent: usize,
    /// Packets delivered to the origin's QUIC or WireGuard side.
    pub delivered: usize,
    /// Of those, QUIC packets.
    pub delivered_quic: usize,
    /// Of those, WireGuard datagrams.
    pub delivered_wireguard: usize,
    /// Whether every delivered packet arrived byte for byte as sent, at most once.
    pub intact: bool,
    /// Packets sent after the crash that never arrived.
    pub lost_after_crash: usize,
    /// From the crash to the arrival of the first packet sent after it, ms.
    pub recovered_ms: Option<f64>,
    /// Frames the relay forwarded before it died.
    pub forwarded_by_relay: u64,
    /// Packets the relay took for itself instead of forwarding (must be 0: relays do not
    /// open what they carry).
    pub opened_by_relay: u64,
    /// Frames the origin's core refused (bad tag, replay, misrouted): 0 on a healthy mesh.
    pub refused_at_origin: u64,
    /// The send interval, ms.
    pub interval_ms: u64,
}

/// Why a data-plane run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The routing configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The mesh cores could not be built.
    #[error(transparent)]
    Wire(#[from] super::wire::WireError),
}

/// The timing of a [`dataplane_failover`] run, ms of virtual time.
#[derive(Clone, Copy, Debug)]
pub struct DataPlanePlan {
    /// Routing settles this long before the first packet.
    pub settle_ms: u64,
    /// One packet every this long.
    pub interval_ms: u64,
    /// Packets flow this long before the relay dies.
    pub before_ms: u64,
    /// And this long after.
    pub after_ms: u64,
}

impl Default for DataPlanePlan {
    fn default() -> Self {
        Self {
            settle_ms: 30_000,
            interval_ms: 10,
            before_ms: 2_000,
            after_ms: 3_000,
        }
    }
}

/// Builds a wired mesh (every datagram through a real [`MeshCore`]), lets routing settle,
/// then has the farthest edge with a relayed route send a packet to the origin every
/// interval, alternately QUIC and WireGuard; crashes the first relay of its path; and goes
/// on for a while (see [`DataPlanePlan`]). Returns `None` if no edge's route is relayed.
///
/// [`MeshCore`]: skylane_shared::mesh::MeshCore
pub fn dataplane_failover(
    matrix: &RttMatrix,
    origin: usize,
    config: NetConfig,
    seed: u64,
    plan: DataPlanePlan,
) -> Result<Option<DataPlaneReport>, DataPlaneError> {
    let DataPlanePlan {
        settle_ms,
        interval_ms,
        before_ms,
        after_ms,
    } = plan;
    use super::wire::DataKind;
    use std::sync::atomic::Ordering;
    let mut net = VirtualNet::new(matrix, origin, config, seed)?.with_wire(origin)?;
    net.run_for_ms(settle_ms);
    let origin_key = PeerIndex(origin as u16);
    let Some((edge, path)) = (0..matrix.len())
        .filter(|&e| e != origin)
        .filter_map(|e| Some((e, net.router(e).route(&origin_key)?.path.clone())))
        .filter(|(_, p)| !p.is_direct())
        .max_by(|(a, _), (b, _)| {
            matrix
                .rtt_ms(*a, origin)
                .total_cmp(&matrix.rtt_ms(*b, origin))
        })
    else {
        return Ok(None);
    };
    let nodes = indices(&path);
    let relay = nodes[1];
    let interval_ms = interval_ms.max(1);
    let total = (before_ms + after_ms) / interval_ms;
    let crash_at = before_ms / interval_ms;
    let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut crash_us = 0;
    let mut forwarded_by_relay = 0;
    for seq in 0..total {
        if seq == crash_at {
            forwarded_by_relay = net.forwarded(relay);
            crash_us = net.now_us();
            net.crash(relay);
        }
        let kind = if seq % 2 == 0 {
            DataKind::Quic
        } else {
            DataKind::Wireguard
        };
        let mut payload = seq.to_be_bytes().to_vec();
        payload.resize(1000, (seq % 251) as u8);
        if net.send_data(edge, origin, kind, &payload) {
            sent.push((net.now_us(), payload));
        } else {
            sent.push((net.now_us(), Vec::new()));
        }
        net.run_for_ms(interval_ms);
    }
    // Let the last packets arrive.
    net.run_for_ms(2_000);
    let Some(wire) = net.wire() else {
        return Ok(None);
    };
    let delivered: Vec<_> = net
        .deliveries()
        .iter()
        .filter(|d| d.node == origin && d.from == edge)
        .collect();
    let mut seen = std::collections::HashSet::new();
    let intact = delivered.iter().all(|d| {
        let Some(seq) = d.payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return false;
        };
        let seq = u64::from_be_bytes(seq);
        seen.insert(seq) && sent.get(seq as usize).is_some_and(|(_, p)| *p == d.payload)
    });
    let lost_after_crash = (crash_at..total).filter(|s| !seen.contains(s)).count();
    let recovered_ms = delivered
        .iter()
        .filter(|d| {
            d.payload
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .is_some_and(|b| u64::from_be_bytes(b) >= crash_at)
        })
        .map(|d| (d.at_us - crash_us) as f64 / 1000.0)
        .reduce(f64::min);
    let relay_counters = wire.core(relay).counters();
    let origin_counters = wire.core(origin).counters();
    let after = net
        .router(edge)
        .route(&origin_key)
        .map(|r| indices(&r.path))
        .unwrap_or_default();
    Ok(Some(DataPlaneReport {
        edge: matrix.names()[edge].clone(),
        path_before: names(matrix, &nodes),
        relay: matrix.names()[relay].clone(),
        path_after: names(matrix, &after),
        sent: sent.len(),
        delivered: delivered.len(),
        delivered_quic: delivered
            .iter()
            .filter(|d| d.kind == DataKind::Quic)
            .count(),
        delivered_wireguard: delivered
            .iter()
            .filter(|d| d.kind == DataKind::Wireguard)
            .count(),
        intact,
        lost_after_crash,
        recovered_ms,
        forwarded_by_relay,
        opened_by_relay: relay_counters.quic_received.load(Ordering::Relaxed)
            + relay_counters.wireguard_received.load(Ordering::Relaxed)
            + relay_counters.relayed_received.load(Ordering::Relaxed),
        refused_at_origin: origin_counters.bad_tag.load(Ordering::Relaxed)
            + origin_counters.replayed.load(Ordering::Relaxed)
            + origin_counters.misrouted.load(Ordering::Relaxed)
            + origin_counters.non_member.load(Ordering::Relaxed),
        interval_ms,
    }))
}
