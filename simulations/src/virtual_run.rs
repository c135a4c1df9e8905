//! Virtual-time mode of `simulate run`: the scenario's topology and faults through
//! [`vnet`](crate::vnet), one real routing core (`skylane_shared::routing::Router`) per
//! node, the clock jumping from event to event. It measures route quality (each edge's
//! chosen path against the best over the scenario's nodes) and, per fault, when every
//! affected edge's route moved to a path that works. Deterministic per seed.
//!
//! What it does not model: processes, TLS, HTTP, the SWIM layer and per-link loss; such
//! faults are listed in the report's notes. A restart is a fresh router on the old node. Optionally
//! it adds a synthetic mesh of N nodes (`--synthetic-nodes`) to show failover at scale.

use std::fmt::Write as _;

use skylane_shared::routing::RoutingConfig;

use crate::report::model::{FaultTimeline, Report, RouteRow};
use crate::scenario::{Fault, Plan};
use crate::vnet::experiments;
use crate::vnet::{NetConfig, RttMatrix, VirtualNet};

/// Why a virtual run could not start.
#[derive(Debug, thiserror::Error)]
pub enum VirtualError {
    /// The routing section of `node_config` is not a valid routing config.
    #[error("node_config [routing]: {0}")]
    Routing(String),
    /// The sub-matrix of the scenario's regions could not be built.
    #[error("building the scenario's matrix: {0}")]
    Matrix(String),
}

/// How long after a fault the affected edges are watched, ms of virtual time.
const WATCH_MS: u64 = 10_000;

/// Virtual step while watching a fault, µs.
const STEP_US: u64 = 10_000;

fn routing_config(plan: &Plan) -> Result<RoutingConfig, VirtualError> {
    let table: toml::Table = plan
        .scenario
        .node_config
        .parse()
        .map_err(|e: toml::de::Error| VirtualError::Routing(e.to_string()))?;
    match table.get("routing") {
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| VirtualError::Routing(e.to_string())),
        None => Ok(RoutingConfig::default()),
    }
}

/// The matrix of the plan's nodes only (connectors = the origin's row), node `i` = plan
/// node `i`.
fn sub_matrix(plan: &Plan) -> Result<RttMatrix, VirtualError> {
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let mut csv = format!("region,{}\n", names.join(","));
    for (i, name) in names.iter().enumerate() {
        let row: Vec<String> = (0..plan.nodes.len())
            .map(|j| format!("{:.2}", if i == j { 0.0 } else { plan.node_rtt_ms(i, j) }))
            .collect();
        let _ = writeln!(csv, "{name},{}", row.join(","));
    }
    RttMatrix::parse(&csv).map_err(|e| VirtualError::Matrix(e.to_string()))
}

/// The route new flows from `edge` take: to the connector its routing prefers.
fn path_names(plan: &Plan, net: &VirtualNet, edge: usize) -> Option<Vec<String>> {
    let route = net.router(edge).nearest_destination()?;
    Some(
        route
            .path
            .nodes()
            .iter()
            .map(|p| plan.nodes[usize::from(p.0)].name.clone())
            .collect(),
    )
}

fn uses(path: &[String], names: &[&str], fault: &Fault) -> bool {
    match fault {
        Fault::Kill { .. } => path.iter().any(|p| names.contains(&p.as_str())),
        Fault::Cut { .. } | Fault::Slow { .. } | Fault::Loss { .. } => path.windows(2).any(|w| {
            (w[0] == names[0] && w[1] == names[1]) || (w[0] == names[1] && w[1] == names[0])
        }),
        _ => false,
    }
}

/// Runs the plan in virtual time.
pub fn run(
    plan: &Plan,
    synthetic_nodes: Option<usize>,
    progress: &dyn Fn(&str),
) -> Result<Report, VirtualError> {
    let routing = routing_config(plan)?;
    let matrix = sub_matrix(plan)?;
    let config = NetConfig {
        jitter_fraction: plan.scenario.jitter_fraction,
        loss: 0.0,
        routing: routing.clone(),
    };
    let connectors: Vec<usize> = (0..plan.connectors).collect();
    let mut net =
        VirtualNet::with_destinations(&matrix, &connectors, config.clone(), plan.scenario.seed)
            .map_err(|e| VirtualError::Routing(e.to_string()))?;
    let warmup_us = (plan.scenario.warmup_s * 1e6) as u64;
    net.run_until(warmup_us);
    let mut report = Report {
        scenario: plan.scenario.name.clone(),
        mode: "virtual".into(),
        matrix: plan.matrix_display(),
        origin: plan.scenario.origin.clone(),
        connectors: plan.nodes[..plan.connectors]
            .iter()
            .map(|n| n.name.clone())
            .collect(),
        edges: plan.scenario.edges.clone(),
        local_rtt_ms: plan.scenario.local_rtt_ms,
        fault_phase_s: plan.scenario.duration_s,
        ..Report::default()
    };
    for e in plan.edges() {
        let path = path_names(plan, &net, e).unwrap_or_default();
        let idx: Vec<usize> = path.iter().filter_map(|n| plan.node_index(n)).collect();
        let (best, best_rtt_ms) = plan.best_path_to_connector(e, &[]);
        report.routes.push(RouteRow {
            edge: plan.nodes[e].region.clone(),
            path_rtt_ms: idx.windows(2).map(|w| plan.node_rtt_ms(w[0], w[1])).sum(),
            path,
            return_path: Vec::new(),
            return_path_rtt_ms: f64::NAN,
            direct_rtt_ms: plan.direct_rtt_to_connector_ms(e),
            best_rtt_ms,
            best_path: best.iter().map(|&b| plan.nodes[b].name.clone()).collect(),
        });
    }
    progress(&format!(
        "converged after {:.1} virtual s",
        plan.scenario.warmup_s
    ));
    let mut down = vec![false; plan.nodes.len()];
    for f in &plan.faults {
        let at_us = warmup_us + (f.fault.at_s() * 1e6) as u64;
        net.run_until(at_us.max(net.now_us()));
        let applied = net.now_us();
        let names: Vec<&str> = f
            .nodes
            .iter()
            .map(|&n| plan.nodes[n].name.as_str())
            .collect();
        let killed = match f.fault {
            Fault::Kill { .. } => f.nodes.first().copied(),
            _ => None,
        };
        let affected: Vec<(usize, Vec<String>)> = plan
            .edges()
            .filter(|&e| !down[e] && Some(e) != killed)
            .filter_map(|e| Some((e, path_names(plan, &net, e)?)))
            .filter(|(_, p)| uses(p, &names, &f.fault))
            .collect();
        match (&f.fault, f.nodes.as_slice()) {
            (Fault::Kill { .. }, [n]) => {
                net.crash(*n);
                down[*n] = true;
            }
            (Fault::Restart { .. }, [n]) => {
                net.restart(*n)
                    .map_err(|e| VirtualError::Routing(e.to_string()))?;
                down[*n] = false;
            }
            (Fault::Cut { .. }, [a, b]) => net.set_cut(*a, *b, true),
            (Fault::Uncut { .. }, [a, b]) => net.set_cut(*a, *b, false),
            (Fault::Slow { rtt_ms, .. }, [a, b]) => net.set_rtt_ms(*a, *b, *rtt_ms),
            _ => {
                report.notes.push(format!(
                    "{} at {} s: not modelled in virtual time (loss is global)",
                    f.fault.describe(),
                    f.fault.at_s()
                ));
                continue;
            }
        }
        let mut moved: Vec<Option<(u64, Vec<String>)>> = vec![None; affected.len()];
        let end = applied + WATCH_MS * 1000;
        while net.now_us() < end && moved.iter().any(Option::is_none) {
            net.run_until(net.now_us() + STEP_US);
            for (k, (e, _)) in affected.iter().enumerate() {
                if moved[k].is_some() {
                    continue;
                }
                let works = net
                    .router(*e)
                    .nearest_destination()
                    .is_some_and(|r| net.path_works(&r.path));
                if let Some(p) = path_names(plan, &net, *e)
                    && works
                    && !uses(&p, &names, &f.fault)
                {
                    moved[k] = Some((net.now_us() - applied, p));
                }
            }
        }
        let all_moved = moved.iter().all(Option::is_some);
        let worst = moved
            .iter()
            .flatten()
            .map(|(us, _)| *us as f64 / 1000.0)
            .fold(0.0, f64::max);
        report.faults.push(FaultTimeline {
            at_s: f.fault.at_s(),
            applied_at_s: (applied - warmup_us) as f64 / 1e6,
            description: f.fault.describe(),
            affected_edges: affected
                .iter()
                .map(|(e, _)| plan.nodes[*e].region.clone())
                .collect(),
            paths_before: affected.iter().map(|(_, p)| p.clone()).collect(),
            paths_after: moved
                .iter()
                .map(|m| m.as_ref().map(|m| m.1.clone()).unwrap_or_default())
                .collect(),
            route_moved_after_ms: (all_moved && !affected.is_empty()).then_some(worst),
            member_suspected_after_ms: None,
            flowing_again_after_ms: (all_moved && !affected.is_empty()).then_some(worst),
            longest_stall_ms: None,
            sessions_observed: 0,
            sessions_broken: Vec::new(),
            sessions_on_killed_edge: 0,
        });
        progress(&format!(
            "{}: {} edges affected, all moved: {all_moved}",
            f.fault.describe(),
            affected.len()
        ));
    }
    if let Some(n) = synthetic_nodes {
        progress(&format!(
            "synthetic mesh of {n} nodes: converging 60 virtual s"
        ));
        let synth = RttMatrix::synthesize(n, plan.scenario.seed);
        let base = experiments::converge(&synth, 0, config, plan.scenario.seed, 60_000)
            .map_err(|e| VirtualError::Routing(e.to_string()))?;
        let summary = experiments::summarize(&experiments::edge_routes(&base, &synth, 0));
        let failures = experiments::inject_failures(&base, &synth, 0, 50, plan.scenario.seed);
        let fs = experiments::summarize_failures(&failures);
        report.notes.push(format!(
            "synthetic mesh, {n} nodes (seed {}): {} of {} edges within 5 % of the optimal route, {} relayed; \
             50 failures (relay kills and link cuts): {} recovered, recovery p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            plan.scenario.seed,
            summary.within_5_percent,
            summary.edges,
            summary.relayed,
            fs.recovered,
            fs.recover_p50_ms,
            fs.recover_p99_ms,
            fs.recover_max_ms
        ));
    }
    Ok(report)
}

/// The route and failover tables as text (stdout of `simulate run --mode virtual`).
pub fn summary_table(r: &Report) -> String {
    let mut s =
        String::from("| edge | path | path ms | direct ms | best ms |\n|---|---|---:|---:|---:|\n");
    for rr in &r.routes {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            rr.edge,
            rr.path.join(" → "),
            rr.path_rtt_ms,
            rr.direct_rtt_ms,
            rr.best_rtt_ms
        );
    }
    s.push_str("\n| fault | affected | moved after ms |\n|---|---|---:|\n");
    for f in &r.faults {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            f.description,
            f.affected_edges.join(", "),
            f.route_moved_after_ms
                .map_or("—".into(), |v| format!("{v:.0}"))
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "\n{n}");
    }
    s
}
