//! The fault phase: chat sessions through every client region's edge, the scenario's
//! faults applied on schedule, and the timeline of each fault read back from the nodes'
//! `/status` polls and the sessions' own echoes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::report::model::{EchoSample, FaultTimeline, SessionSummary};
use crate::scenario::{Fault, Plan};

use super::client::Users;
use super::{Cluster, Progress, RealnetError, RunOptions, StatusSample, Timeline, sleep_or_cancel};

/// How long after a fault its effects are attributed to it (less if the next fault comes
/// sooner).
const FAULT_WINDOW_S: f64 = 10.0;

/// What the fault phase recorded.
#[derive(Debug, Default)]
pub(crate) struct FaultRun {
    /// When each planned fault was applied, s into the phase.
    pub applied_s: Vec<f64>,
    /// Every echo.
    pub echoes: Vec<EchoSample>,
    /// (session, t_s, reason).
    pub breaks: Vec<(String, f64, String)>,
    /// (session label, edge node index).
    pub sessions: Vec<(String, usize)>,
}

#[derive(Default)]
struct Sink {
    echoes: Vec<EchoSample>,
    breaks: Vec<(String, f64, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error's message without the documentation link some carry (rustls appends one to an
/// unexpected EOF), which would fill the report's table.
fn brief(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    match text.find(": https://") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// One chat session: a message every `interval`, echoes timed; on a break it records the
/// reason and reconnects (after 300 ms) until `stop`.
async fn chat_session(
    label: String,
    users: Users,
    addr: std::net::SocketAddr,
    interval: Duration,
    epoch: Instant,
    sink: Arc<Mutex<Sink>>,
    stop: CancellationToken,
) {
    let t = || {
        Instant::now()
            .saturating_duration_since(epoch)
            .as_secs_f64()
    };
    let mut seq: u64 = 0;
    // One "reconnect failed" per outage, not one per attempt.
    let mut failing = false;
    while !stop.is_cancelled() {
        let ws = tokio::select! {
            r = users.open_websocket(addr) => r,
            () = stop.cancelled() => return,
        };
        let ws = match ws {
            Ok((ws, _)) => ws,
            Err(e) => {
                if !failing {
                    lock(&sink).breaks.push((
                        label.clone(),
                        t(),
                        format!("reconnect failed: {}", brief(&e)),
                    ));
                    failing = true;
                }
                if sleep_or_cancel(Duration::from_millis(300), &stop).await {
                    return;
                }
                continue;
            }
        };
        failing = false;
        let (mut tx, mut rx) = ws.split();
        let sent: Arc<Mutex<HashMap<u64, f64>>> = Arc::default();
        let mut tick = tokio::time::interval(interval);
        let reason = loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    lock(&sent).insert(seq, t());
                    if let Err(e) = tx.send(Message::Text(seq.to_string().into())).await {
                        break Some(format!("send: {}", brief(&e)));
                    }
                }
                msg = rx.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(sent_s) = text.parse::<u64>().ok().and_then(|s| lock(&sent).remove(&s)) {
                            let rtt_ms = (t() - sent_s) * 1000.0;
                            lock(&sink).echoes.push(EchoSample { session: label.clone(), sent_s, rtt_ms });
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break Some("closed by the server".into()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(format!("receive: {}", brief(&e))),
                },
                () = stop.cancelled() => break None,
            }
        };
        match reason {
            Some(reason) => {
                lock(&sink).breaks.push((label.clone(), t(), reason));
                if sleep_or_cancel(Duration::from_millis(300), &stop).await {
                    return;
                }
            }
            None => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), tx.send(Message::Close(None)))
                        .await;
                return;
            }
        }
    }
}

/// Runs the fault phase.
pub(crate) async fn fault_phase(
    plan: &Plan,
    cluster: &mut Cluster,
    users: &Users,
    epoch: &Mutex<Instant>,
    opts: &RunOptions<'_>,
    progress: &Progress,
) -> Result<FaultRun, RealnetError> {
    let start = Instant::now();
    *lock(epoch) = start;
    let sink = Arc::new(Mutex::new(Sink::default()));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut run = FaultRun::default();
    let interval = Duration::from_millis(plan.scenario.workload.chat_interval_ms);
    for (ci, c) in plan.clients.iter().enumerate() {
        for k in 0..plan.scenario.workload.chat_sessions {
            let label = format!("{}#{k}", c.region);
            run.sessions.push((label.clone(), c.edge));
            tracker.spawn(chat_session(
                label,
                users.clone(),
                cluster.doors[ci].edge,
                interval,
                start,
                sink.clone(),
                stop.clone(),
            ));
        }
    }
    progress.say(&format!(
        "fault phase: {} chat sessions, {} faults, {:.0} s",
        run.sessions.len(),
        plan.faults.len(),
        plan.scenario.duration_s
    ));
    let mut interrupted = false;
    for f in &plan.faults {
        let due = start + Duration::from_secs_f64(f.fault.at_s());
        if sleep_or_cancel(due.saturating_duration_since(Instant::now()), &opts.cancel).await {
            interrupted = true;
            break;
        }
        apply(cluster, f.nodes.as_slice(), &f.fault)?;
        let at = start.elapsed().as_secs_f64();
        run.applied_s.push(at);
        progress.say(&format!("t={at:.2} s: {}", f.fault.describe()));
    }
    if !interrupted {
        let end = start + Duration::from_secs_f64(plan.scenario.duration_s);
        interrupted =
            sleep_or_cancel(end.saturating_duration_since(Instant::now()), &opts.cancel).await;
    }
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    let sink = std::mem::take(&mut *lock(&sink));
    run.echoes = sink.echoes;
    run.breaks = sink.breaks;
    if interrupted {
        return Err(RealnetError::Interrupted);
    }
    Ok(run)
}

fn apply(cluster: &mut Cluster, nodes: &[usize], fault: &Fault) -> Result<(), RealnetError> {
    let profile_err =
        |e: crate::wan::ProfileError| RealnetError::Setup(format!("{}: {e}", fault.describe()));
    match (fault, nodes) {
        (Fault::Kill { .. }, [n]) => cluster.kill_node(*n),
        (Fault::Restart { .. }, [n]) => cluster.start_node(*n)?,
        (Fault::Cut { .. }, [a, b]) => cluster.link_pair(*a, *b).iter().for_each(|l| l.cut()),
        (Fault::Uncut { .. }, [a, b]) => cluster.link_pair(*a, *b).iter().for_each(|l| l.uncut()),
        (Fault::Slow { rtt_ms, .. }, [a, b]) => {
            for l in cluster.link_pair(*a, *b) {
                l.set_rtt(Duration::from_secs_f64(rtt_ms / 1000.0))
                    .map_err(profile_err)?;
            }
        }
        (Fault::Loss { loss, .. }, [a, b]) => {
            for l in cluster.link_pair(*a, *b) {
                l.set_loss(*loss).map_err(profile_err)?;
            }
        }
        _ => {
            return Err(RealnetError::Setup(format!(
                "fault {} has the wrong nodes",
                fault.describe()
            )));
        }
    }
    Ok(())
}

/// Whether `path` (node names) goes through what `fault` breaks.
fn uses(path: &[String], plan: &Plan, fault_nodes: &[usize], fault: &Fault) -> bool {
    let names: Vec<&str> = fault_nodes
        .iter()
        .map(|&n| plan.nodes[n].name.as_str())
        .collect();
    match fault {
        Fault::Kill { .. } => path.iter().any(|p| names.contains(&p.as_str())),
        Fault::Cut { .. } | Fault::Slow { .. } | Fault::Loss { .. } => path.windows(2).any(|w| {
            (w[0] == names[0] && w[1] == names[1]) || (w[0] == names[1] && w[1] == names[0])
        }),
        Fault::Restart { .. } | Fault::Uncut { .. } => false,
    }
}

/// Builds the timelines.
pub(crate) fn analyse(
    plan: &Plan,
    samples: &Mutex<Vec<StatusSample>>,
    run: &FaultRun,
) -> (Vec<FaultTimeline>, SessionSummary, Vec<String>) {
    let samples = lock(samples);
    let timeline = Timeline::new(&samples, plan.nodes.len());
    let mut notes = Vec::new();
    let mut timelines = Vec::new();
    // Nodes down at each point, to tell broken sessions from sessions on a dead edge.
    let mut down = vec![false; plan.nodes.len()];
    for (fi, f) in plan.faults.iter().enumerate() {
        let Some(&applied) = run.applied_s.get(fi) else {
            notes.push(format!(
                "{} was never applied (run interrupted)",
                f.fault.describe()
            ));
            continue;
        };
        // Effects belong to this fault until the next one is applied.
        let until = run
            .applied_s
            .get(fi + 1)
            .map_or(applied + FAULT_WINDOW_S, |&next| {
                next.min(applied + FAULT_WINDOW_S)
            });
        let killed: Option<usize> = match f.fault {
            Fault::Kill { .. } => f.nodes.first().copied(),
            _ => None,
        };
        match (&f.fault, f.nodes.first()) {
            (Fault::Kill { .. }, Some(&n)) => down[n] = true,
            (Fault::Restart { .. }, Some(&n)) => down[n] = false,
            _ => {}
        }
        let mut affected = Vec::new();
        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut moved: Option<f64> = Some(0.0);
        if f.fault.is_disruptive() {
            for e in plan.edges().filter(|&e| !down[e]) {
                // The edge's route to the connector it prefers, and that connector's route
                // back to it: a flow uses both.
                let forward = |s: &StatusSample| s.path.clone();
                let back = |s: &StatusSample| timeline.return_path(plan, s);
                let broken = |p: &Vec<String>| uses(p, plan, &f.nodes, &f.fault);
                let mut hit = false;
                let mut shown = None;
                let mut moved_at: Option<f64> = Some(applied);
                for (k, get) in [
                    &forward as &dyn Fn(&StatusSample) -> Option<Vec<String>>,
                    &back,
                ]
                .into_iter()
                .enumerate()
                {
                    let own = timeline.of(e);
                    let Some(path) = own
                        .iter()
                        .rev()
                        .filter(|s| s.t_s <= applied)
                        .find_map(|s| get(s))
                    else {
                        continue;
                    };
                    if !broken(&path) {
                        continue;
                    }
                    hit = true;
                    let new = own
                        .iter()
                        .filter(|s| s.t_s > applied && s.t_s <= until)
                        .find_map(|s| get(s).filter(|p| !broken(p)).map(|p| (s.t_s, p)));
                    match new {
                        Some((t, p)) => {
                            moved_at = moved_at.map(|m| m.max(t));
                            if k == 0 || shown.is_none() {
                                shown = Some((path, p));
                            }
                        }
                        None => {
                            moved_at = None;
                            shown.get_or_insert((path, Vec::new()));
                        }
                    }
                }
                if !hit {
                    continue;
                }
                affected.push(e);
                let (b, a) = shown.unwrap_or_default();
                before.push(b);
                after.push(a);
                moved = match (moved, moved_at) {
                    (Some(m), Some(t)) => Some(m.max((t - applied) * 1000.0)),
                    _ => None,
                };
            }
        }
        if affected.is_empty() {
            moved = None;
        }
        let suspected = killed.and_then(|k| {
            let name = &plan.nodes[k].name;
            samples
                .iter()
                .filter(|s| s.node != k && s.t_s > applied && s.t_s <= until)
                .find(|s| s.members.iter().any(|(m, st)| m == name && st != "alive"))
                .map(|s| (s.t_s - applied) * 1000.0)
        });
        // The affected sessions' echoes: the longest gap between receipts that ends inside
        // the window.
        let sessions: Vec<&str> = run
            .sessions
            .iter()
            .filter(|(_, e)| affected.contains(e))
            .map(|(l, _)| l.as_str())
            .collect();
        let mut stall: Option<(f64, f64)> = None;
        for s in &sessions {
            let mut receipts: Vec<f64> = run
                .echoes
                .iter()
                .filter(|e| e.session == *s)
                .map(|e| e.sent_s + e.rtt_ms / 1000.0)
                .collect();
            receipts.sort_by(f64::total_cmp);
            for w in receipts.windows(2) {
                if w[1] > applied && w[1] <= until && w[0] >= applied - FAULT_WINDOW_S {
                    let gap = (w[1] - w[0]) * 1000.0;
                    if stall.is_none_or(|(g, _)| gap > g) {
                        stall = Some((gap, (w[1] - applied) * 1000.0));
                    }
                }
            }
        }
        let on_killed = killed.map_or(0, |k| run.sessions.iter().filter(|(_, e)| *e == k).count());
        let broken = run
            .breaks
            .iter()
            .filter(|(l, t, _)| {
                *t >= applied
                    && *t <= until
                    && !run
                        .sessions
                        .iter()
                        .any(|(s, e)| s == l && Some(*e) == killed)
            })
            .map(|(l, t, r)| format!("{l} at {:.2} s: {r}", t - applied))
            .collect();
        timelines.push(FaultTimeline {
            at_s: f.fault.at_s(),
            applied_at_s: applied,
            description: f.fault.describe(),
            affected_edges: affected
                .iter()
                .map(|&e| plan.nodes[e].region.clone())
                .collect(),
            paths_before: before,
            paths_after: after,
            route_moved_after_ms: moved,
            member_suspected_after_ms: suspected,
            flowing_again_after_ms: stall.map(|s| s.1),
            longest_stall_ms: stall.map(|s| s.0),
            sessions_observed: sessions.len(),
            sessions_broken: broken,
            sessions_on_killed_edge: on_killed,
        });
    }
    let summary = SessionSummary {
        started: run.sessions.len(),
        echoes: run.echoes.len(),
        breaks: run
            .breaks
            .iter()
            .map(|(l, t, r)| format!("{l} at {t:.2} s: {r}"))
            .collect(),
    };
    (timelines, summary, notes)
}
