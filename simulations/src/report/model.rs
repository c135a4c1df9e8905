//! The figures of one run, as written to `report.json` (every number the Markdown and the
//! charts show comes from here).

use serde::Serialize;

/// One run's results.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `real` (processes on loopback) or `virtual` (vnet, virtual time).
    pub mode: String,
    /// The command line that made it.
    pub command: String,
    /// Where it ran (`uname -srm`, CPU count).
    pub machine: String,
    /// UTC start time (RFC 3339).
    pub started_utc: String,
    /// The matrix file.
    pub matrix: String,
    /// Origin region.
    pub origin: String,
    /// The connectors beside the origin, by mesh name.
    pub connectors: Vec<String>,
    /// Edge regions.
    pub edges: Vec<String>,
    /// RTT between clients and the edge of their own region, ms.
    pub local_rtt_ms: f64,
    /// Each edge's route to the connector it preferred when measurements started.
    pub routes: Vec<RouteRow>,
    /// Direct vs edge vs bounds, per client region.
    pub comparison: Vec<RegionComparison>,
    /// One timeline per injected fault.
    pub faults: Vec<FaultTimeline>,
    /// Chat sessions over the fault phase.
    pub sessions: SessionSummary,
    /// Chat echoes over the fault phase (for the timeline chart).
    pub echoes: Vec<EchoSample>,
    /// Length of the fault phase, s.
    pub fault_phase_s: f64,
    /// Gap between a chat session's messages, ms.
    pub chat_interval_ms: u64,
    /// Whether the edges cached (the scenario's `edge_cache`).
    pub edge_cache: bool,
    /// What reached the origin during the measurements (real mode).
    pub origin_load: Option<OriginLoad>,
    /// Purges issued at one edge and timed at every other (real mode, `edge_cache`).
    pub purges: Vec<PurgeSample>,
    /// Notes (anything that went wrong but did not stop the run).
    pub notes: Vec<String>,
}

/// The origin's load during the measurements.
#[derive(Clone, Debug, Serialize)]
pub struct OriginLoad {
    /// HTTP requests the users sent through the edges (the warm-up page loads included).
    pub user_requests_via_edges: u64,
    /// Requests that reached the origin through the edges (they carry `X-Forwarded-For`).
    pub origin_requests_via_edges: u64,
}

/// One purge as one edge applied it.
#[derive(Clone, Debug, Serialize)]
pub struct PurgeSample {
    /// Which purge of the run (0, 1, …).
    pub purge: usize,
    /// The edge it was issued at (region).
    pub from: String,
    /// The edge that applied it (region).
    pub edge: String,
    /// Issued → applied there, ms (wall clocks of one machine).
    pub applied_after_ms: f64,
    /// One-way delay of the fastest chain of members between the two (the bulletin floods:
    /// every member passes it on), ms.
    pub one_way_ms: f64,
}

/// An edge's route.
#[derive(Clone, Debug, Serialize)]
pub struct RouteRow {
    /// Edge region.
    pub edge: String,
    /// Path as the edge reported it (node names).
    pub path: Vec<String>,
    /// Matrix RTT of that path, ms.
    pub path_rtt_ms: f64,
    /// The connector's route back to this edge (its `/status`): replies take it.
    pub return_path: Vec<String>,
    /// Matrix RTT of the return path, ms.
    pub return_path_rtt_ms: f64,
    /// Matrix RTT of the direct path, ms.
    pub direct_rtt_ms: f64,
    /// Best path RTT over the scenario's nodes (≤ 2 relays), ms.
    pub best_rtt_ms: f64,
    /// That path.
    pub best_path: Vec<String>,
}

/// One client region's comparison.
#[derive(Clone, Debug, Serialize)]
pub struct RegionComparison {
    /// Client region.
    pub region: String,
    /// The edge its users reach.
    pub edge: String,
    /// RTT users ↔ that edge, ms.
    pub edge_rtt_ms: f64,
    /// RTT users ↔ origin, ms.
    pub origin_rtt_ms: f64,
    /// RTT of the best edge → connector path (matrix), ms.
    pub best_path_rtt_ms: f64,
    /// One row per metric.
    pub metrics: Vec<MetricRow>,
}

/// One metric, both ways, with bounds.
#[derive(Clone, Debug, Serialize)]
pub struct MetricRow {
    /// What was timed.
    pub metric: String,
    /// Median straight to the origin, ms.
    pub direct_ms: f64,
    /// Median through the edge, ms.
    pub edge_ms: f64,
    /// Lower bound straight to the origin, ms.
    pub direct_bound_ms: f64,
    /// Lower bound through the edge, ms.
    pub edge_bound_ms: f64,
    /// How far the edge median is above its bound, %.
    pub edge_over_bound_percent: f64,
    /// direct − edge, ms.
    pub saved_ms: f64,
    /// (direct − edge) / direct, %.
    pub saved_percent: f64,
    /// Every direct sample, ms.
    pub direct_samples_ms: Vec<f64>,
    /// Every edge sample, ms.
    pub edge_samples_ms: Vec<f64>,
    /// Samples that failed (both ways).
    pub failures: u32,
}

/// What happened around one fault.
#[derive(Clone, Debug, Serialize)]
pub struct FaultTimeline {
    /// When, s into the fault phase (as scheduled).
    pub at_s: f64,
    /// When it was actually applied, s into the fault phase.
    pub applied_at_s: f64,
    /// What.
    pub description: String,
    /// Edges whose route to the connector, or the connector's route back to them, used
    /// what broke.
    pub affected_edges: Vec<String>,
    /// Their paths just before (the edge's own route when it was hit, else the return).
    pub paths_before: Vec<Vec<String>>,
    /// Those paths once moved.
    pub paths_after: Vec<Vec<String>>,
    /// Fault → every affected route (both directions) avoids it in the nodes' `/status`,
    /// ms (polled every 50 ms, so ± 50 ms).
    pub route_moved_after_ms: Option<f64>,
    /// Fault → first node reporting the killed node not `alive` (SWIM), ms.
    pub member_suspected_after_ms: Option<f64>,
    /// Fault → the chat echo that ended the longest stall of an affected session, ms.
    pub flowing_again_after_ms: Option<f64>,
    /// Longest gap between echoes of an affected session around the fault, ms.
    pub longest_stall_ms: Option<f64>,
    /// Chat sessions through the affected edges.
    pub sessions_observed: usize,
    /// Sessions that broke within 10 s after the fault, with the reason.
    pub sessions_broken: Vec<String>,
    /// Sessions on a killed edge itself (they cannot survive; counted separately).
    pub sessions_on_killed_edge: usize,
}

/// Chat sessions summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionSummary {
    /// Sessions started.
    pub started: usize,
    /// Echoes received.
    pub echoes: usize,
    /// Every break: session, time (s into the fault phase), reason.
    pub breaks: Vec<String>,
}

/// One chat echo.
#[derive(Clone, Debug, Serialize)]
pub struct EchoSample {
    /// Session label (`Sydney#0`).
    pub session: String,
    /// Sent at, s into the fault phase.
    pub sent_s: f64,
    /// Echo RTT, ms.
    pub rtt_ms: f64,
}
