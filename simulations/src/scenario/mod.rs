//! Scenario files for `simulate run`: the topology (origin region, edge regions, one or
//! more connectors beside the origin), the RTT matrix, the emulated clients and their workload,
//! a schedule of faults, and a duration.
//!
//! Parsing is two steps, as everywhere in the workspace: TOML into serde structs with
//! `deny_unknown_fields`, then [`Scenario::validate`] into a [`Plan`] whose names are checked
//! against the matrix and each other. Nothing binds a port before a plan exists. Errors name
//! the file and the key. What it does not do: run anything (`realnet` and `vnet` do).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vnet::{MatrixError, RttMatrix};

/// Name of the connector node in faults and reports when there is one; with several
/// they are `connector-1`, `connector-2`, ….
pub const CONNECTOR: &str = "connector";

/// The most connectors a scenario may run.
pub const MAX_CONNECTORS: usize = 4;

/// RTT between two connectors, ms: they sit beside the origin, in one site.
pub const CONNECTOR_SITE_RTT_MS: f64 = 0.5;

/// Why a scenario is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid TOML or not the expected shape (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, which names the key and line.
        message: String,
    },
    /// The RTT matrix could not be loaded.
    #[error("{path}: key `matrix`: {source}")]
    Matrix {
        /// The scenario file.
        path: String,
        /// What was wrong with the matrix.
        source: MatrixError,
    },
    /// A value is out of range or names something that does not exist.
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        /// The scenario file.
        path: String,
        /// The key, dotted (`faults[2].node`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name for reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// RTT matrix CSV (`region,<names>` header, symmetric, ms). A relative path starts at
    /// the scenario file's directory. Default: the measured 30-city matrix built into the
    /// binary (`simulations/data/rtt_matrix.csv`).
    #[serde(default)]
    pub matrix: Option<PathBuf>,
    /// Region of the origin; the connectors run beside it (no added latency).
    pub origin: String,
    /// How many connectors run beside the origin, 1..=4. Default 1 (named `connector`);
    /// with more they are `connector-1`, `connector-2`, …, each edge sends new flows to
    /// the one its routing prefers, and a killed one's edges move to another.
    #[serde(default = "default_connectors")]
    pub connectors: usize,
    /// One edge per region listed.
    pub edges: Vec<String>,
    /// Regions with emulated clients; default: every edge region. A region without an
    /// edge uses the nearest edge (by matrix RTT).
    #[serde(default)]
    pub client_regions: Option<Vec<String>>,
    /// RTT between a region's clients and the edge in the same region, ms. Default 5.
    #[serde(default = "default_local_rtt")]
    pub local_rtt_ms: f64,
    /// Jitter on every emulated link, as a fraction of its one-way delay. Default 0.
    #[serde(default)]
    pub jitter_fraction: f64,
    /// How long the run lasts after every edge is ready, s (faults happen inside it).
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// Time given to routing to settle before anything is measured, s. Default 6.
    #[serde(default = "default_warmup")]
    pub warmup_s: f64,
    /// Seed of the emulator's jitter and loss draws and of the virtual-time mode.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// What every client region does.
    #[serde(default)]
    pub workload: Workload,
    /// TOML appended to every node's config, e.g. `"[routing]\nsettle_ms = 3000\n"`.
    #[serde(default)]
    pub node_config: String,
    /// Whether the edges cache (the demo origin's static assets cached, `/api/` and `/ws`
    /// bypassed, the HTML revalidated every time). Real-process runs only; default false. With it, the page-load
    /// bound through the edge counts the assets as local, the origin's request count is
    /// reported, and `simulate run` times a purge's spread over the mesh (the demo does not).
    #[serde(default)]
    pub edge_cache: bool,
    /// Faults, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// The workload of each client region.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Measurements of each kind, per region and per way (direct, edge). Default 5.
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Long-lived chat websocket sessions per region, through its edge. Default 2.
    #[serde(default = "default_sessions")]
    pub chat_sessions: u32,
    /// Gap between a chat session's messages, ms. Default 100.
    #[serde(default = "default_chat_interval")]
    pub chat_interval_ms: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            samples: default_samples(),
            chat_sessions: default_sessions(),
            chat_interval_ms: default_chat_interval(),
        }
    }
}

/// One scheduled fault.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Kill a node (SIGKILL): an edge by region, or a connector by name.
    Kill {
        /// When, s after the run starts.
        at_s: f64,
        /// Edge region or connector name (`connector`, or `connector-N` with several).
        node: String,
    },
    /// Start a killed node again with the same config.
    Restart {
        /// When.
        at_s: f64,
        /// Edge region or connector name.
        node: String,
    },
    /// Cut the mesh link between two nodes, both directions.
    Cut {
        /// When.
        at_s: f64,
        /// The two ends (edge regions or connector names).
        link: [String; 2],
    },
    /// Restore a cut link.
    Uncut {
        /// When.
        at_s: f64,
        /// The two ends.
        link: [String; 2],
    },
    /// Change a mesh link's RTT, both directions.
    Slow {
        /// When.
        at_s: f64,
        /// The two ends.
        link: [String; 2],
        /// New RTT, ms.
        rtt_ms: f64,
    },
    /// Set a mesh link's loss probability, both directions.
    Loss {
        /// When.
        at_s: f64,
        /// The two ends.
        link: [String; 2],
        /// Loss probability per datagram, 0..1.
        loss: f64,
    },
}

impl Fault {
    /// When it happens, s after the start.
    pub fn at_s(&self) -> f64 {
        match self {
            Fault::Kill { at_s, .. }
            | Fault::Restart { at_s, .. }
            | Fault::Cut { at_s, .. }
            | Fault::Uncut { at_s, .. }
            | Fault::Slow { at_s, .. }
            | Fault::Loss { at_s, .. } => *at_s,
        }
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        match self {
            Fault::Kill { node, .. } => format!("kill {node}"),
            Fault::Restart { node, .. } => format!("restart {node}"),
            Fault::Cut { link, .. } => format!("cut {}–{}", link[0], link[1]),
            Fault::Uncut { link, .. } => format!("restore {}–{}", link[0], link[1]),
            Fault::Slow { link, rtt_ms, .. } => {
                format!("slow {}–{} to {rtt_ms} ms", link[0], link[1])
            }
            Fault::Loss { link, loss, .. } => {
                format!("{:.0} % loss on {}–{}", loss * 100.0, link[0], link[1])
            }
        }
    }

    /// Whether traffic is expected to move away from something (kill, cut, slow, loss).
    pub fn is_disruptive(&self) -> bool {
        !matches!(self, Fault::Restart { .. } | Fault::Uncut { .. })
    }
}

fn default_name() -> String {
    "scenario".into()
}
fn default_connectors() -> usize {
    1
}
fn default_local_rtt() -> f64 {
    5.0
}
fn default_duration() -> f64 {
    40.0
}
fn default_warmup() -> f64 {
    6.0
}
fn default_seed() -> u64 {
    1
}
fn default_samples() -> u32 {
    5
}
fn default_sessions() -> u32 {
    2
}
fn default_chat_interval() -> u64 {
    100
}

/// A node of the plan: the connectors first, then the edges in file order.
#[derive(Clone, Debug, Serialize)]
pub struct PlanNode {
    /// Mesh name (`connector` or `connector-N`, or the edge's region in lower case).
    pub name: String,
    /// A connector (beside the origin), not an edge.
    pub connector: bool,
    /// Its region (matrix row).
    pub region: String,
    /// Matrix index.
    pub matrix_index: usize,
}

/// A client region and the edge it uses.
#[derive(Clone, Debug, Serialize)]
pub struct ClientRegion {
    /// The region.
    pub region: String,
    /// Matrix index.
    pub matrix_index: usize,
    /// Index into [`Plan::nodes`] of its edge.
    pub edge: usize,
    /// RTT from these clients to that edge, ms.
    pub edge_rtt_ms: f64,
    /// RTT from these clients straight to the origin, ms.
    pub origin_rtt_ms: f64,
}

/// A fault with its names resolved to node indices.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedFault {
    /// As written.
    pub fault: Fault,
    /// Indices into [`Plan::nodes`]: one for kill/restart, two for link faults.
    pub nodes: Vec<usize>,
}

/// A validated scenario.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The scenario as written.
    pub scenario: Scenario,
    /// The matrix file used; `None`: the built-in one.
    pub matrix_path: Option<PathBuf>,
    /// The matrix.
    pub matrix: RttMatrix,
    /// The origin region's matrix index.
    pub origin_index: usize,
    /// Connectors first (`0..connectors`), then edges.
    pub nodes: Vec<PlanNode>,
    /// How many of [`Plan::nodes`] are connectors.
    pub connectors: usize,
    /// Client regions.
    pub clients: Vec<ClientRegion>,
    /// Faults sorted by time.
    pub faults: Vec<PlannedFault>,
}

impl Plan {
    /// The matrix for reports, as the scenario names it (so reports do not name this
    /// machine's directories), or the built-in one.
    pub fn matrix_display(&self) -> String {
        match &self.scenario.matrix {
            Some(p) => p.display().to_string(),
            None => crate::vnet::matrix::BUILTIN_NAME.into(),
        }
    }

    /// RTT between two plan nodes, ms (connectors at the origin's region, and
    /// [`CONNECTOR_SITE_RTT_MS`] from each other).
    pub fn node_rtt_ms(&self, a: usize, b: usize) -> f64 {
        if a != b && self.is_connector(a) && self.is_connector(b) {
            return CONNECTOR_SITE_RTT_MS;
        }
        self.matrix
            .rtt_ms(self.nodes[a].matrix_index, self.nodes[b].matrix_index)
    }

    /// Whether plan node `i` is a connector.
    pub fn is_connector(&self, i: usize) -> bool {
        i < self.connectors
    }

    /// The edges' indices into [`Plan::nodes`].
    pub fn edges(&self) -> std::ops::Range<usize> {
        self.connectors..self.nodes.len()
    }

    /// The RTT from node `i` straight to the nearest connector, ms.
    pub fn direct_rtt_to_connector_ms(&self, i: usize) -> f64 {
        (0..self.connectors)
            .filter(|&c| c != i)
            .map(|c| self.node_rtt_ms(i, c))
            .fold(f64::INFINITY, f64::min)
    }

    /// Shortest RTT from `a` to `b` over chains of any plan nodes, ms: what a message
    /// flooded by every member (the bulletin) takes at best, there and back.
    pub fn flood_rtt_ms(&self, a: usize, b: usize) -> f64 {
        let n = self.nodes.len();
        let mut best: Vec<f64> = (0..n).map(|i| self.node_rtt_ms(a, i)).collect();
        best[a] = 0.0;
        let mut done = vec![false; n];
        // Dijkstra over the complete graph of the plan's nodes.
        while let Some(u) = (0..n)
            .filter(|&i| !done[i])
            .min_by(|&x, &y| best[x].total_cmp(&best[y]))
        {
            done[u] = true;
            for v in 0..n {
                let via = best[u] + self.node_rtt_ms(u, v);
                if via < best[v] {
                    best[v] = via;
                }
            }
        }
        best[b]
    }

    /// Best path RTT from node `from` to any connector not `excluded` over the plan's
    /// edges with at most two relays (what routing should find), and that path as node
    /// indices; no path and an infinite RTT if every connector is excluded.
    pub fn best_path_to_connector(&self, from: usize, excluded: &[usize]) -> (Vec<usize>, f64) {
        let mut best = (Vec::new(), f64::INFINITY);
        if excluded.contains(&from) {
            return best;
        }
        let ok = |i: usize| i != from && !self.is_connector(i) && !excluded.contains(&i);
        for c in (0..self.connectors).filter(|c| *c != from && !excluded.contains(c)) {
            let direct = self.node_rtt_ms(from, c);
            if direct < best.1 {
                best = (vec![from, c], direct);
            }
            for r1 in (0..self.nodes.len()).filter(|&i| ok(i)) {
                let one = self.node_rtt_ms(from, r1) + self.node_rtt_ms(r1, c);
                if one < best.1 {
                    best = (vec![from, r1, c], one);
                }
                for r2 in (0..self.nodes.len()).filter(|&i| ok(i) && i != r1) {
                    let two = self.node_rtt_ms(from, r1)
                        + self.node_rtt_ms(r1, r2)
                        + self.node_rtt_ms(r2, c);
                    if two < best.1 {
                        best = (vec![from, r1, r2, c], two);
                    }
                }
            }
        }
        best
    }

    /// The node called `name` (mesh name or region, any case).
    pub fn node_index(&self, name: &str) -> Option<usize> {
        find_node(&self.nodes, name)
    }
}

fn find_node(nodes: &[PlanNode], name: &str) -> Option<usize> {
    nodes
        .iter()
        .position(|n| n.name.eq_ignore_ascii_case(name) || (!n.connector && n.region == name))
}

impl Scenario {
    /// Reads a scenario file. A relative `matrix` path in it is made relative to the
    /// file's directory here, so the plan does not depend on the current directory.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut scenario = Scenario::parse(&text, &path.display().to_string())?;
        if let Some(m) = &scenario.matrix
            && m.is_relative()
            && let Some(dir) = path.parent()
        {
            scenario.matrix = Some(dir.join(m));
        }
        Ok(scenario)
    }

    /// Parses TOML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })
    }

    /// Checks every value and name and resolves them. `source` names the file in errors.
    pub fn validate(self, source: &str) -> Result<Plan, ScenarioError> {
        let invalid = |key: &str, message: String| ScenarioError::Invalid {
            path: source.into(),
            key: key.into(),
            message,
        };
        let matrix_path = self.matrix.clone();
        let matrix = RttMatrix::from_file_or_builtin(matrix_path.as_deref()).map_err(|e| {
            ScenarioError::Matrix {
                path: source.into(),
                source: e,
            }
        })?;
        let region = |key: &str, name: &str| {
            matrix.index_of(name).ok_or_else(|| {
                invalid(
                    key,
                    format!(
                        "unknown region `{name}`; the matrix has: {}",
                        matrix.names().join(", ")
                    ),
                )
            })
        };
        let origin_index = region("origin", &self.origin)?;
        if self.edges.is_empty() {
            return Err(invalid(
                "edges",
                "at least one edge region is needed".into(),
            ));
        }
        if !(1..=MAX_CONNECTORS).contains(&self.connectors) {
            return Err(invalid(
                "connectors",
                format!("{} is outside 1..={MAX_CONNECTORS}", self.connectors),
            ));
        }
        let mut nodes: Vec<PlanNode> = (1..=self.connectors)
            .map(|k| PlanNode {
                name: if self.connectors == 1 {
                    CONNECTOR.into()
                } else {
                    format!("{CONNECTOR}-{k}")
                },
                connector: true,
                region: self.origin.clone(),
                matrix_index: origin_index,
            })
            .collect();
        let mut seen = BTreeSet::new();
        for (i, e) in self.edges.iter().enumerate() {
            let key = format!("edges[{i}]");
            let idx = region(&key, e)?;
            if idx == origin_index {
                return Err(invalid(
                    &key,
                    format!("`{e}` is the origin region; the connectors already sit there"),
                ));
            }
            if !seen.insert(idx) {
                return Err(invalid(&key, format!("`{e}` is listed twice")));
            }
            nodes.push(PlanNode {
                name: e.to_ascii_lowercase(),
                connector: false,
                region: e.clone(),
                matrix_index: idx,
            });
        }
        let check_range = |key: &str, v: f64, lo: f64, hi: f64| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(invalid(key, format!("{v} is outside {lo}..={hi}")))
            }
        };
        check_range("local_rtt_ms", self.local_rtt_ms, 0.0, 1000.0)?;
        check_range("jitter_fraction", self.jitter_fraction, 0.0, 0.5)?;
        check_range("duration_s", self.duration_s, 1.0, 86_400.0)?;
        check_range("warmup_s", self.warmup_s, 0.0, 600.0)?;
        if !(1..=1000).contains(&self.workload.samples) {
            return Err(invalid("workload.samples", "must be 1..=1000".into()));
        }
        if self.workload.chat_sessions > 100 {
            return Err(invalid("workload.chat_sessions", "at most 100".into()));
        }
        if !(10..=60_000).contains(&self.workload.chat_interval_ms) {
            return Err(invalid(
                "workload.chat_interval_ms",
                "must be 10..=60000".into(),
            ));
        }
        if let Err(e) = self.node_config.parse::<toml::Table>() {
            return Err(invalid("node_config", format!("not TOML: {e}")));
        }
        let client_names = self
            .client_regions
            .clone()
            .unwrap_or_else(|| self.edges.clone());
        let mut clients = Vec::new();
        for (i, c) in client_names.iter().enumerate() {
            let key = format!("client_regions[{i}]");
            let idx = region(&key, c)?;
            let (edge, edge_rtt_ms) = (self.connectors..nodes.len())
                .map(|n| {
                    let rtt = if nodes[n].matrix_index == idx {
                        self.local_rtt_ms
                    } else {
                        matrix.rtt_ms(idx, nodes[n].matrix_index)
                    };
                    (n, rtt)
                })
                .fold((self.connectors, f64::INFINITY), |best, x| {
                    if x.1 < best.1 { x } else { best }
                });
            clients.push(ClientRegion {
                region: c.clone(),
                matrix_index: idx,
                edge,
                edge_rtt_ms,
                origin_rtt_ms: if idx == origin_index {
                    self.local_rtt_ms
                } else {
                    matrix.rtt_ms(idx, origin_index)
                },
            });
        }
        let mut faults = Vec::new();
        for (i, f) in self.faults.iter().enumerate() {
            let at = f.at_s();
            if !(at.is_finite() && at >= 0.0 && at < self.duration_s) {
                return Err(invalid(
                    &format!("faults[{i}].at_s"),
                    format!("{at} is not inside the run (0..{})", self.duration_s),
                ));
            }
            let node = |key: &str, name: &str| {
                find_node(&nodes, name).ok_or_else(|| {
                    let connectors: Vec<String> = nodes
                        .iter()
                        .filter(|n| n.connector)
                        .map(|n| format!("`{}`", n.name))
                        .collect();
                    invalid(
                        &format!("faults[{i}].{key}"),
                        format!(
                            "`{name}` is neither an edge region nor a connector ({})",
                            connectors.join(", ")
                        ),
                    )
                })
            };
            let resolved = match f {
                Fault::Kill { node: n, .. } | Fault::Restart { node: n, .. } => {
                    vec![node("node", n)?]
                }
                Fault::Cut { link, .. }
                | Fault::Uncut { link, .. }
                | Fault::Slow { link, .. }
                | Fault::Loss { link, .. } => {
                    let (a, b) = (node("link", &link[0])?, node("link", &link[1])?);
                    if a == b {
                        return Err(invalid(
                            &format!("faults[{i}].link"),
                            "a link needs two different nodes".into(),
                        ));
                    }
                    vec![a, b]
                }
            };
            match f {
                Fault::Slow { rtt_ms, .. } => {
                    check_range(&format!("faults[{i}].rtt_ms"), *rtt_ms, 0.0, 10_000.0)?
                }
                Fault::Loss { loss, .. } => {
                    check_range(&format!("faults[{i}].loss"), *loss, 0.0, 1.0)?
                }
                _ => {}
            }
            faults.push(PlannedFault {
                fault: f.clone(),
                nodes: resolved,
            });
        }
        faults.sort_by(|a, b| a.fault.at_s().total_cmp(&b.fault.at_s()));
        Ok(Plan {
            connectors: self.connectors,
            scenario: self,
            matrix_path,
            matrix,
            origin_index,
            nodes,
            clients,
            faults,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
origin = "Frankfurt"
edges = ["Sydney", "Singapore"]
[[faults]]
kind = "kill"
at_s = 10
node = "Singapore"
[[faults]]
kind = "cut"
at_s = 5
link = ["Sydney", "connector"]
"#;

    #[test]
    fn valid_scenario_resolves_names_and_sorts_faults() -> anyhow::Result<()> {
        let plan = Scenario::parse(GOOD, "good.toml")?.validate("good.toml")?;
        assert_eq!(plan.nodes.len(), 3);
        assert_eq!(plan.nodes[1].name, "sydney");
        assert_eq!(plan.faults[0].nodes, vec![1, 0]);
        assert_eq!(plan.faults[1].nodes, vec![2]);
        // Sydney's best path goes through Singapore (docs/routing.md).
        let (path, _) = plan.best_path_to_connector(1, &[]);
        assert_eq!(path, vec![1, 2, 0]);
        // A flood from Sydney reaches the connector as fast as that path, never slower.
        let (_, best) = plan.best_path_to_connector(1, &[]);
        assert_eq!(plan.flood_rtt_ms(1, 0), best);
        assert!(plan.flood_rtt_ms(1, 0) < plan.node_rtt_ms(1, 0));
        assert_eq!(plan.flood_rtt_ms(2, 2), 0.0);
        Ok(())
    }

    #[test]
    fn two_connectors_come_first_and_each_edge_s_best_path_ends_at_either() -> anyhow::Result<()> {
        let text = "origin = \"Frankfurt\"\nedges = [\"Sydney\", \"Singapore\"]\nconnectors = 2\n\
                    [[faults]]\nkind = \"kill\"\nat_s = 3\nnode = \"connector-2\"\n";
        let plan = Scenario::parse(text, "two.toml")?.validate("two.toml")?;
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["connector-1", "connector-2", "sydney", "singapore"]);
        assert_eq!(plan.edges(), 2..4);
        assert_eq!(plan.faults[0].nodes, vec![1]);
        assert_eq!(plan.node_rtt_ms(0, 1), CONNECTOR_SITE_RTT_MS);
        assert_eq!(plan.clients[0].edge, 2);
        // Sydney still relays through Singapore, to whichever connector; with the first
        // excluded, to the second, at the same cost; with both, nowhere.
        let (path, rtt) = plan.best_path_to_connector(2, &[]);
        assert_eq!(path[..2], [2, 3]);
        let (other, rtt2) = plan.best_path_to_connector(2, &[path[2]]);
        assert_eq!((other[..2].to_vec(), rtt2), (vec![2, 3], rtt));
        assert_ne!(other[2], path[2]);
        assert!(plan.best_path_to_connector(2, &[0, 1]).0.is_empty());
        // "connector" alone names nothing when there are two.
        let bad = text.replace("connector-2", "connector");
        let err = Scenario::parse(&bad, "two.toml").and_then(|s| s.validate("two.toml"));
        assert!(err.is_err_and(|e| e.to_string().contains("`connector-1`, `connector-2`")));
        Ok(())
    }

    #[test]
    fn invalid_scenarios_name_the_key() {
        let cases = [
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\"]\ncolour = 1\n",
                "colour",
            ),
            ("origin = \"Atlantis\"\nedges = [\"Sydney\"]\n", "origin"),
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\", \"Sydney\"]\n",
                "edges[1]",
            ),
            ("origin = \"Frankfurt\"\nedges = []\n", "edges"),
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\"]\n[[faults]]\nkind = \"kill\"\nat_s = 1\nnode = \"Tokyo\"\n",
                "faults[0].node",
            ),
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\"]\nconnectors = 0\n",
                "connectors",
            ),
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\"]\n[workload]\nsamples = 0\n",
                "workload.samples",
            ),
            (
                "origin = \"Frankfurt\"\nedges = [\"Sydney\"]\n[workload]\nsamplez = 3\n",
                "samplez",
            ),
        ];
        for (text, key) in cases {
            let err = Scenario::parse(text, "bad.toml").and_then(|s| s.validate("bad.toml"));
            match err {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(e.to_string().contains(key), "{e} should name {key}"),
            }
        }
    }

    #[test]
    fn matrix_defaults_to_the_builtin_and_a_named_file_wins() -> anyhow::Result<()> {
        let plan = Scenario::parse(GOOD, "good.toml")?.validate("good.toml")?;
        assert_eq!(plan.matrix.len(), 30);
        assert!(plan.matrix_display().contains("built in"));
        // A scenario's relative matrix path starts at the scenario file's directory.
        let dir = std::env::temp_dir().join(format!("skylane-scenario-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(dir.join("data/tiny.csv"), "region,A,B\nA,0,40\nB,40,0\n")?;
        let file = dir.join("tiny.toml");
        std::fs::write(
            &file,
            "matrix = \"data/tiny.csv\"\norigin = \"A\"\nedges = [\"B\"]\n",
        )?;
        let plan = Scenario::from_file(&file)?.validate("tiny.toml");
        std::fs::remove_dir_all(&dir)?;
        let plan = plan?;
        assert_eq!(plan.matrix.names(), ["A", "B"]);
        assert_eq!(plan.node_rtt_ms(0, 1), 40.0);
        Ok(())
    }

    #[test]
    fn committed_scenarios_are_valid() -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            Scenario::from_file(&path)?.validate(&path.display().to_string())?;
        }
        Ok(())
    }
}
