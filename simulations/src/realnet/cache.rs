//! What the edges' caches do for a run: how many requests still reached the origin, and how
//! fast a purge issued at one edge is applied by every other edge over the emulated links.
//!
//! Purges: one per edge in turn (`purge everything` through that edge's admin API, as an
//! operator would with `mesh-node purge`), each timed at every other edge from the purge's
//! issue time to the time that edge applied it — both read from the edges' own `/status`
//! (`cache.purges`), so polling adds no error. All processes share one machine and one
//! clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::procs;
use crate::report::model::PurgeSample;
use crate::scenario::Plan;

use super::{Cluster, Progress};

/// Longest wait for every edge to apply one purge.
const PURGE_WAIT: Duration = Duration::from_secs(5);
/// Gap between two purges, so one's flood is over before the next.
const PURGE_GAP: Duration = Duration::from_millis(300);
/// Purges per issuing edge.
const PURGES_PER_EDGE: usize = 2;

/// Requests the origin has seen through a proxy so far (its `/counts` `_forwarded`).
pub(crate) async fn origin_forwarded(cluster: &Cluster) -> Option<u64> {
    let addr = cluster.origin_http;
    tokio::task::spawn_blocking(move || {
        let counts = procs::json_body(&procs::http_get(addr, "/counts")?)?;
        Some(counts["_forwarded"].as_u64().unwrap_or(0))
    })
    .await
    .ok()
    .flatten()
}

/// Issues purges at each edge in turn and times them at every other edge.
pub(crate) async fn purge_spread(
    plan: &Plan,
    cluster: &Cluster,
    progress: &Progress,
) -> (Vec<PurgeSample>, Vec<String>) {
    let edges: Vec<(usize, SocketAddr)> = plan
        .edges()
        .filter(|&i| cluster.nodes[i].proc.is_some())
        .map(|i| (i, cluster.nodes[i].admin))
        .collect();
    let mut samples = Vec::new();
    let mut notes = Vec::new();
    for round in 0..edges.len() * PURGES_PER_EDGE {
        let (from, from_admin) = edges[round % edges.len()];
        let edges2 = edges.clone();
        let timed = tokio::task::spawn_blocking(move || time_one_purge(from_admin, &edges2))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match timed {
            Ok(applied) => {
                for (to, ms) in applied {
                    if to == from {
                        continue;
                    }
                    samples.push(PurgeSample {
                        purge: round,
                        from: plan.nodes[from].region.clone(),
                        edge: plan.nodes[to].region.clone(),
                        applied_after_ms: ms,
                        one_way_ms: plan.flood_rtt_ms(from, to) / 2.0,
                    });
                }
            }
            Err(e) => {
                let note = format!("purge at {}: {e}", plan.nodes[from].name);
                progress.say(&note);
                notes.push(note);
            }
        }
        tokio::time::sleep(PURGE_GAP).await;
    }
    (samples, notes)
}

/// Purges everything at `issuer`; waits until every edge in `edges` applied it; returns
/// (edge, issued → applied ms) for each.
fn time_one_purge(
    issuer: SocketAddr,
    edges: &[(usize, SocketAddr)],
) -> Result<Vec<(usize, f64)>, String> {
    let answer = procs::http_post_json(issuer, "/purge", r#"{"kind":"everything"}"#)
        .ok_or("the admin API did not answer")?;
    let id = procs::json_body(&answer)
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("unexpected answer {answer:?}"))?;
    let deadline = Instant::now() + PURGE_WAIT;
    let mut applied: Vec<Option<f64>> = vec![None; edges.len()];
    while applied.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            let missing = applied.iter().filter(|a| a.is_none()).count();
            return Err(format!(
                "{missing} edges had not applied purge {id} after {PURGE_WAIT:?}"
            ));
        }
        for (k, &(_, admin)) in edges.iter().enumerate() {
            if applied[k].is_some() {
                continue;
            }
            let Some(status) = procs::status(admin) else {
                continue;
            };
            applied[k] = status["cache"]["purges"].as_array().and_then(|ps| {
                let p = ps.iter().find(|p| p["id"] == id.as_str())?;
                let issued = p["issued_unix_ms"].as_f64()?;
                Some(p["applied_unix_ms"].as_f64()? - issued)
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(edges
        .iter()
        .zip(applied)
        .map(|(&(i, _), ms)| (i, ms.unwrap_or(f64::NAN)))
        .collect())
}
