//! Real-process mode: the real `demo-origin`, `origin-connector` and `mesh-node` binaries on
//! loopback behind WAN-emulator links, real users (TCP, TLS, HTTP, websockets) measured
//! straight to the origin and through their edge in the same run, and the scenario's
//! faults applied while chat sessions keep talking.
//!
//! A run has three phases: warm-up (routing settles), measurements (per client region,
//! concurrently across regions, one sample at a time within a region, alternating direct
//! and edge), then the fault phase (`duration_s` long; faults at their `at_s` from its
//! start) while every region's chat sessions send a message every `chat_interval_ms` and
//! every node's `/status` is polled every 50 ms. With several connectors, an edge's route
//! is its route to the connector its routing prefers at the time (`/status`'s
//! `preferred_destination`, where its new flows go), and the return route is that
//! connector's route back. What it does not do: bandwidth or congestion emulation (see
//! `wan`).

mod cache;
pub mod client;
pub mod cluster;
mod faults;
mod measure;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::report::model::{OriginLoad, Report, RouteRow};
use crate::scenario::Plan;

pub use cluster::Cluster;

/// Why a real-process run failed.
#[derive(Debug, thiserror::Error)]
pub enum RealnetError {
    /// Keys, certificates, configs, ports, links or processes could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// An edge's tunnel never came up.
    #[error("edge {node} never became ready; last log lines:\n{log_tail}")]
    NotReady {
        /// The edge.
        node: String,
        /// Its last log lines.
        log_tail: String,
    },
    /// An emulated user failed.
    #[error("client: {0}")]
    Client(String),
    /// The run was interrupted (Ctrl-C or SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

/// A progress line on stderr, stamped with the time since the run began.
#[derive(Clone, Debug)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    /// Starts the clock.
    pub fn new(quiet: bool) -> Progress {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }

    /// Prints one line.
    pub fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("[{:6.1} s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// One `/status` poll of one node.
#[derive(Clone, Debug)]
pub(crate) struct StatusSample {
    /// Since the fault phase began, s (negative before it).
    pub t_s: f64,
    /// Node index.
    pub node: usize,
    /// The connector new flows go to (edges): routing's preferred destination.
    pub preferred: Option<String>,
    /// Route to that connector (edges), node names.
    pub path: Option<Vec<String>>,
    /// Every route this node holds: (destination, path). The connector's routes are the
    /// return paths to the edges.
    pub routes: Vec<(String, Vec<String>)>,
    /// (member, state) as this node sees them.
    pub members: Vec<(String, String)>,
}

/// Polls every live node's `/status` every 50 ms until `stop`.
pub(crate) async fn monitor(
    admins: Vec<std::net::SocketAddr>,
    epoch: Arc<Mutex<Instant>>,
    samples: Arc<Mutex<Vec<StatusSample>>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let admins2 = admins.clone();
        let polled = tokio::task::spawn_blocking(move || {
            admins2
                .iter()
                .map(|&a| crate::procs::status(a))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let t0 = *epoch.lock().unwrap_or_else(|e| e.into_inner());
        let t_s = signed_secs(now, t0);
        let mut out = Vec::new();
        for (node, status) in polled.into_iter().enumerate() {
            let Some(status) = status else { continue };
            let routes: Vec<(String, Vec<String>)> = status["mesh"]["routes"]
                .as_array()
                .map(|routes| {
                    routes
                        .iter()
                        .filter_map(|r| {
                            Some((
                                r["destination"].as_str()?.to_owned(),
                                serde_json::from_value::<Vec<String>>(r["path"].clone()).ok()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let preferred = status["mesh"]["preferred_destination"]
                .as_str()
                .map(str::to_owned);
            let path = preferred
                .as_ref()
                .and_then(|c| routes.iter().find(|(d, _)| d == c).map(|(_, p)| p.clone()));
            let members = status["mesh"]["members"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .filter_map(|m| {
                            Some((
                                m["name"].as_str()?.to_owned(),
                                m["state"].as_str()?.to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(StatusSample {
                t_s,
                node,
                preferred,
                path,
                routes,
                members,
            });
        }
        samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(out);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = stop.cancelled() => {}
        }
    }
}

/// The `/status` samples of a run by node, in time order, to look up what a node showed
/// at a given time.
pub(crate) struct Timeline<'a> {
    by_node: Vec<Vec<&'a StatusSample>>,
}

/// How old another node's sample may be to stand for "now": a poll round stamps every node
/// with one time, so a sample of the same round is 0 s old; a node that stopped answering
/// (killed) has none.
const SAMPLE_FRESH_S: f64 = 0.5;

impl<'a> Timeline<'a> {
    /// Indexes `samples` (in the order they were polled) of a plan with `nodes` nodes.
    pub(crate) fn new(samples: &'a [StatusSample], nodes: usize) -> Self {
        let mut by_node = vec![Vec::new(); nodes];
        for s in samples {
            if let Some(v) = by_node.get_mut(s.node) {
                v.push(s);
            }
        }
        Timeline { by_node }
    }

    /// Node `node`'s samples in time order.
    pub(crate) fn of(&self, node: usize) -> &[&'a StatusSample] {
        self.by_node.get(node).map_or(&[], Vec::as_slice)
    }

    /// Node `node`'s last sample at or before `t_s`, if it is fresh.
    fn at(&self, node: usize, t_s: f64) -> Option<&'a StatusSample> {
        let v = self.of(node);
        let k = v.partition_point(|s| s.t_s <= t_s);
        let s = *v.get(k.checked_sub(1)?)?;
        (t_s - s.t_s <= SAMPLE_FRESH_S).then_some(s)
    }

    /// The route back to the edge of `edge_sample`, as the connector that edge preferred
    /// then showed it in the same poll round.
    pub(crate) fn return_path(
        &self,
        plan: &Plan,
        edge_sample: &StatusSample,
    ) -> Option<Vec<String>> {
        let connector = plan.node_index(edge_sample.preferred.as_deref()?)?;
        let edge = &plan.nodes.get(edge_sample.node)?.name;
        self.at(connector, edge_sample.t_s)?
            .routes
            .iter()
            .find(|(d, _)| d == edge)
            .map(|(_, p)| p.clone())
    }
}

fn signed_secs(now: Instant, t0: Instant) -> f64 {
    if now >= t0 {
        (now - t0).as_secs_f64()
    } else {
        -(t0 - now).as_secs_f64()
    }
}

/// Options of a run beyond the scenario.
#[derive(Debug)]
pub struct RunOptions<'a> {
    /// Where the binaries are.
    pub bin_dir: &'a Path,
    /// Scratch directory for keys, configs and logs.
    pub work_dir: &'a Path,
    /// Cancelled by Ctrl-C / SIGTERM.
    pub cancel: CancellationToken,
    /// Keep the cluster running after the fault phase (for `simulate demo`).
    pub keep: bool,
    /// With the edges caching, time a purge's spread over the mesh after the measurements
    /// (`simulate run`; the demo, which must print its table within `--duration`, does not).
    pub time_purges: bool,
}

/// Runs a plan with real processes. Returns the report and, with `keep`, the running
/// cluster (the caller shuts it down).
pub async fn run(
    plan: &Plan,
    opts: RunOptions<'_>,
    progress: &Progress,
) -> Result<(Report, Option<Cluster>), RealnetError> {
    let say = |m: &str| progress.say(m);
    let cluster = tokio::select! {
        c = Cluster::start(plan, opts.bin_dir, opts.work_dir, Duration::from_secs(30), &say) => c?,
        () = opts.cancel.cancelled() => return Err(RealnetError::Interrupted),
    };
    let result = run_on(plan, cluster, &opts, progress).await;
    match result {
        Ok((report, cluster)) => {
            if opts.keep {
                Ok((report, Some(cluster)))
            } else {
                progress.say("stopping every process");
                cluster.shutdown(Duration::from_secs(2)).await;
                Ok((report, None))
            }
        }
        Err((e, cluster)) => {
            cluster.shutdown(Duration::from_millis(500)).await;
            Err(e)
        }
    }
}

type Failed = (RealnetError, Cluster);

async fn run_on(
    plan: &Plan,
    mut cluster: Cluster,
    opts: &RunOptions<'_>,
    progress: &Progress,
) -> Result<(Report, Cluster), Failed> {
    let users = match client::Users::new(&cluster.ca_pem) {
        Ok(u) => u,
        Err(e) => return Err((e, cluster)),
    };
    let admins: Vec<_> = cluster.nodes.iter().map(|n| n.admin).collect();
    let epoch = Arc::new(Mutex::new(Instant::now() + Duration::from_secs(3600)));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let monitor_task = tokio::spawn(monitor(
        admins,
        epoch.clone(),
        samples.clone(),
        stop.clone(),
    ));
    let stop_guard = stop.clone().drop_guard();

    let warmup = Duration::from_secs_f64(plan.scenario.warmup_s);
    progress.say(&format!(
        "every edge is ready; warming up for {warmup:?} while routes settle"
    ));
    if sleep_or_cancel(warmup, &opts.cancel).await {
        return Err((RealnetError::Interrupted, cluster));
    }
    let routes = current_routes(plan, &samples);
    for r in &routes {
        progress.say(&format!(
            "route {}: {} ({:.1} ms; direct {:.1} ms, best {:.1} ms)",
            r.edge,
            r.path.join(" → "),
            r.path_rtt_ms,
            r.direct_rtt_ms,
            r.best_rtt_ms
        ));
    }

    progress.say("measuring: direct vs through the edge, per client region");
    let forwarded_before = cache::origin_forwarded(&cluster).await;
    let (comparison, via_edges) = tokio::select! {
        c = measure::compare(plan, &cluster, &users, progress) => c,
        () = opts.cancel.cancelled() => return Err((RealnetError::Interrupted, cluster)),
    };
    let forwarded_after = cache::origin_forwarded(&cluster).await;
    let origin_load = forwarded_before
        .zip(forwarded_after)
        .map(|(before, after)| OriginLoad {
            user_requests_via_edges: via_edges,
            origin_requests_via_edges: after.saturating_sub(before),
        });
    if let Some(o) = &origin_load {
        progress.say(&format!(
            "the origin answered {} of the {} requests users sent through the edges",
            o.origin_requests_via_edges, o.user_requests_via_edges
        ));
    }
    let (purges, purge_notes) = if plan.scenario.edge_cache && opts.time_purges {
        progress.say("timing purges: one at each edge in turn, applied by every other");
        tokio::select! {
            p = cache::purge_spread(plan, &cluster, progress) => p,
            () = opts.cancel.cancelled() => return Err((RealnetError::Interrupted, cluster)),
        }
    } else {
        (Vec::new(), Vec::new())
    };

    let mut report = Report {
        scenario: plan.scenario.name.clone(),
        mode: "real".into(),
        matrix: plan.matrix_display(),
        origin: plan.scenario.origin.clone(),
        connectors: plan.nodes[..plan.connectors]
            .iter()
            .map(|n| n.name.clone())
            .collect(),
        edges: plan.scenario.edges.clone(),
        local_rtt_ms: plan.scenario.local_rtt_ms,
        routes,
        comparison,
        fault_phase_s: plan.scenario.duration_s,
        chat_interval_ms: plan.scenario.workload.chat_interval_ms,
        edge_cache: plan.scenario.edge_cache,
        origin_load,
        purges,
        notes: purge_notes,
        ..Report::default()
    };

    if !plan.faults.is_empty() || !opts.keep {
        let outcome = faults::fault_phase(plan, &mut cluster, &users, &epoch, opts, progress).await;
        let fault_run = match outcome {
            Ok(r) => r,
            Err(e) => return Err((e, cluster)),
        };
        let (timelines, sessions, notes) = faults::analyse(plan, &samples, &fault_run);
        report.faults = timelines;
        report.sessions = sessions;
        report.echoes = fault_run.echoes;
        report.notes.extend(notes);
    }
    drop(stop_guard);
    let _ = monitor_task.await;
    Ok((report, cluster))
}

/// Sleeps; true if cancelled first.
pub(crate) async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = cancel.cancelled() => true,
    }
}

fn current_routes(plan: &Plan, samples: &Mutex<Vec<StatusSample>>) -> Vec<RouteRow> {
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner());
    let timeline = Timeline::new(&samples, plan.nodes.len());
    plan.edges()
        .map(|i| {
            let last = timeline.of(i).iter().rev().find(|s| s.path.is_some());
            let path = last.and_then(|s| s.path.clone()).unwrap_or_default();
            let idx: Vec<usize> = path.iter().filter_map(|n| plan.node_index(n)).collect();
            let path_rtt_ms = idx.windows(2).map(|w| plan.node_rtt_ms(w[0], w[1])).sum();
            let (best, best_rtt_ms) = plan.best_path_to_connector(i, &[]);
            let return_path = last
                .and_then(|s| timeline.return_path(plan, s))
                .unwrap_or_default();
            let ridx: Vec<usize> = return_path
                .iter()
                .filter_map(|n| plan.node_index(n))
                .collect();
            RouteRow {
                return_path_rtt_ms: ridx.windows(2).map(|w| plan.node_rtt_ms(w[0], w[1])).sum(),
                return_path,
                edge: plan.nodes[i].region.clone(),
                path,
                path_rtt_ms,
                direct_rtt_ms: plan.direct_rtt_to_connector_ms(i),
                best_rtt_ms,
                best_path: best.iter().map(|&b| plan.nodes[b].name.clone()).collect(),
            }
        })
        .collect()
}
