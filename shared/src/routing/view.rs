//! The operator's view of the mesh, as one node sees it (serializable for the admin API).

use serde::Serialize;

use super::probe::ProbeClass;
use super::route::ChosenRoute;
use super::stats::PathState;
use super::time::Timestamp;
use super::wire::{NodeKey, Path};

/// Everything a node knows about the mesh, for display.
#[derive(Clone, Debug, Serialize)]
#[serde(bound(serialize = "N: NodeKey"))]
pub struct MeshView<N> {
    /// The node reporting.
    pub node: N,
    /// When the view was taken.
    pub at: Timestamp,
    /// Every link reported by any origin (including this node's own).
    pub links: Vec<LinkView<N>>,
    /// The paths this node probes itself.
    pub paths: Vec<PathView<N>>,
    /// The route chosen for each destination.
    pub routes: Vec<ChosenRoute<N>>,
    /// The destination new flows go to (nearest healthy connector).
    pub preferred_destination: Option<N>,
}

/// One link as reported by its origin.
#[derive(Clone, Debug, Serialize)]
#[serde(bound(serialize = "N: NodeKey"))]
pub struct LinkView<N> {
    /// Reporting node.
    pub from: N,
    /// Far end.
    pub to: N,
    /// Smoothed RTT, ms.
    pub srtt_ms: f64,
    /// Recent RTT, ms.
    pub recent_ms: f64,
    /// Loss fraction.
    pub loss: f64,
    /// Whether the reporter considers the link alive.
    pub alive: bool,
    /// Version of the reporter's record.
    pub seq: u64,
    /// When the reporter's record last changed here.
    pub updated_at: Timestamp,
}

/// One path probed by this node.
#[derive(Clone, Debug, Serialize)]
#[serde(bound(serialize = "N: NodeKey"))]
pub struct PathView<N> {
    /// The path.
    pub path: Path<N>,
    /// Probe cadence class.
    pub class: ProbeClass,
    /// Liveness.
    pub state: PathState,
    /// Smoothed RTT, ms.
    pub srtt_ms: Option<f64>,
    /// RTT variation, ms.
    pub rttvar_ms: f64,
    /// Recent RTT, ms.
    pub recent_ms: Option<f64>,
    /// Loss fraction over the window.
    pub loss: f64,
}
