//! Writing a run's results: `report.md` (tables), `report.json` (every figure) and SVG
//! charts drawn by hand (no plotting dependency): per-region latency, direct vs edge vs
//! bound, and the failover timeline (every chat echo over the fault phase, with the faults
//! marked). What it does not do: measure anything.

pub mod model;
mod svg;

use std::fmt::Write as _;
use std::path::Path;

use crate::stats::median;
use model::Report;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// JSON encoding failed.
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes every file into `dir` (created if missing); returns the file names written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<String>, ReportError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut files = Vec::new();
    let mut put = |name: &str, text: String| -> Result<(), ReportError> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
        files.push(name.to_owned());
        Ok(())
    };
    put("report.json", serde_json::to_string_pretty(report)?)?;
    let charts = svg::latency_charts(report);
    for (name, text) in &charts {
        put(name, text.clone())?;
    }
    if !report.echoes.is_empty() {
        put("failover.svg", svg::failover_chart(report))?;
    }
    put(
        "report.md",
        markdown(
            report,
            &charts.iter().map(|c| c.0.clone()).collect::<Vec<_>>(),
        ),
    )?;
    Ok(files)
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "—".into()
    }
}

/// The edges a fault affected, or a dash.
fn affected_cell(f: &model::FaultTimeline) -> String {
    if f.affected_edges.is_empty() {
        "—".into()
    } else {
        f.affected_edges.join(", ")
    }
}

/// Each affected route as "before ⇒ after", one per line, or a dash.
fn path_changes_cell(f: &model::FaultTimeline) -> String {
    let paths: Vec<String> = f
        .paths_before
        .iter()
        .zip(&f.paths_after)
        .map(|(b, a)| format!("{} ⇒ {}", b.join("→"), a.join("→")))
        .collect();
    if paths.is_empty() {
        "—".into()
    } else {
        paths.join("<br>")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.0}"))
}

/// The comparison table alone (also printed by `simulate demo`).
pub fn comparison_table(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| client region | edge | what | direct ms | bound direct | edge ms | bound edge | edge vs bound | saved |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|");
    for c in &report.comparison {
        for m in &c.metrics {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {:+.1} % | {} ms ({:.0} %) |",
                c.region,
                c.edge,
                m.metric,
                ms(m.direct_ms),
                ms(m.direct_bound_ms),
                ms(m.edge_ms),
                ms(m.edge_bound_ms),
                m.edge_over_bound_percent,
                ms(m.saved_ms),
                m.saved_percent
            );
        }
    }
    s
}

/// Most a purge may take beyond the one-way delay to an edge, at p50 (issue 11's target).
pub const PURGE_TARGET_EXTRA_MS: f64 = 150.0;

/// The origin's load and, with the edge cache, the purges' spread.
fn cache_section(r: &Report) -> String {
    let mut s = String::new();
    if let Some(o) = &r.origin_load {
        let _ = writeln!(s, "\n## What reached the origin\n");
        let _ = writeln!(
            s,
            "During the measurements the users sent {} HTTP requests through the edges (without a \
             cache every one reaches the origin); the origin answered {} of them ({:.0} %){}.",
            o.user_requests_via_edges,
            o.origin_requests_via_edges,
            100.0 * o.origin_requests_via_edges as f64 / o.user_requests_via_edges.max(1) as f64,
            if r.edge_cache {
                ", the rest came from the edges' caches"
            } else {
                "; the edges do not cache in this run"
            }
        );
    }
    if r.purges.is_empty() {
        return s;
    }
    let _ = writeln!(s, "\n## Purges across the mesh\n");
    let _ = writeln!(
        s,
        "`purge everything` issued at each edge in turn ({} purges), timed at every other edge from \
         the purge's issue to that edge applying it (both from the edges' `/status`). One-way: the \
         fastest chain of emulated links between the two (every member passes the bulletin on). Target: p50 ≤ \
         one-way + {PURGE_TARGET_EXTRA_MS:.0} ms at every edge.\n",
        r.purges
            .iter()
            .map(|p| p.purge)
            .collect::<std::collections::HashSet<_>>()
            .len()
    );
    let _ = writeln!(
        s,
        "| edge | samples | applied after, p50 ms | max ms | one-way, p50 ms | p50 beyond one-way | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    let mut edges: Vec<&String> = r.purges.iter().map(|p| &p.edge).collect();
    edges.sort();
    edges.dedup();
    for edge in edges {
        let of_edge: Vec<_> = r.purges.iter().filter(|p| &p.edge == edge).collect();
        let after: Vec<f64> = of_edge.iter().map(|p| p.applied_after_ms).collect();
        let one_way: Vec<f64> = of_edge.iter().map(|p| p.one_way_ms).collect();
        let beyond: Vec<f64> = of_edge
            .iter()
            .map(|p| p.applied_after_ms - p.one_way_ms)
            .collect();
        // Rounded to whole ms, so a few µs early does not print as "-0".
        let b = median(&beyond).round() + 0.0;
        let _ = writeln!(
            s,
            "| {edge} | {} | {:.0} | {:.0} | {:.0} | {:+.0} ms | {} |",
            of_edge.len(),
            median(&after),
            after.iter().copied().fold(f64::NAN, f64::max),
            median(&one_way),
            b,
            if b <= PURGE_TARGET_EXTRA_MS {
                "met"
            } else {
                "missed"
            }
        );
    }
    s
}

fn markdown(r: &Report, charts: &[String]) -> String {
    let mut s = String::new();
    let virtual_time = r.mode == "virtual";
    let _ = writeln!(
        s,
        "# Simulation report: {} ({})\n",
        r.scenario,
        if virtual_time {
            "virtual time: vnet with the real routing core"
        } else {
            "real processes on loopback behind the WAN emulator"
        }
    );
    let _ = writeln!(s, "- command: `{}`", r.command);
    let _ = writeln!(s, "- machine: {}", r.machine);
    let _ = writeln!(s, "- started: {}", r.started_utc);
    let _ = writeln!(s, "- matrix: `{}`", r.matrix);
    let beside = match r.connectors.as_slice() {
        [] | [_] => "connector beside it".to_owned(),
        many => format!("connectors {} beside it", many.join(", ")),
    };
    let _ = writeln!(
        s,
        "- origin {} ({beside}), edges: {}; users ↔ their own region's edge: {} ms RTT\n",
        r.origin,
        r.edges.join(", "),
        r.local_rtt_ms
    );
    let _ = writeln!(s, "## Routes when measuring started\n");
    let _ = writeln!(
        s,
        "{}\n",
        if virtual_time {
            "Each edge's router's chosen path after the warm-up (virtual time); RTTs from the matrix."
        } else {
            "Paths as each node's `/status` reported them; RTTs from the matrix. The path is the \
             edge's route to the connector it sends new flows to; the return path is that \
             connector's own route back to the edge: replies take it."
        }
    );
    let _ = writeln!(
        s,
        "| edge | path (edge's /status) | path ms | return path (connector's /status) | return ms | direct ms | best ms (≤ 2 relays) |"
    );
    let _ = writeln!(s, "|---|---|---:|---|---:|---:|---:|");
    for rr in &r.routes {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {} | {:.1} | {:.1} ({}) |",
            rr.edge,
            rr.path.join(" → "),
            rr.path_rtt_ms,
            if rr.return_path.is_empty() {
                "—".into()
            } else {
                rr.return_path.join(" → ")
            },
            ms(rr.return_path_rtt_ms),
            rr.direct_rtt_ms,
            rr.best_rtt_ms,
            rr.best_path.join(" → ")
        );
    }
    if !r.comparison.is_empty() {
        let _ = writeln!(
            s,
            "\n## Straight to the origin vs through the nearest edge\n"
        );
        let _ = writeln!(
            s,
            "Medians of every sample (all samples in `report.json`). Bounds (docs/architecture.md, \"Measuring it\"), \
         with L = users↔edge RTT, P = best edge→connector path RTT, D = users↔origin RTT: websocket \
         and page `2L + 2(L+P)` through the edge vs `4D` direct; dynamic TTFB `2L + (L+P)` vs `3D`.{}\n",
            if r.edge_cache {
                " The edges cache here, warmed by one page load per region before measuring: the \
                 page's bound through the edge is `2L + (L+P) + L` (the HTML from the origin, its \
                 assets from the edge)."
            } else {
                ""
            }
        );
        s.push_str(&comparison_table(r));
        for c in charts {
            let _ = writeln!(s, "\n![{c}]({c})");
        }
    }
    s.push_str(&cache_section(r));
    if !r.faults.is_empty() && virtual_time {
        let _ = writeln!(s, "\n## Failover timeline\n");
        let _ = writeln!(
            s,
            "Times are ms of virtual time after the fault. *Moved*: every affected edge's router \
             holds a route that avoids the fault and works (checked every 10 ms).\n"
        );
        let _ = writeln!(
            s,
            "| at s | fault | affected edges | paths before → after | moved after ms |"
        );
        let _ = writeln!(s, "|---:|---|---|---|---:|");
        for f in &r.faults {
            let _ = writeln!(
                s,
                "| {:.2} | {} | {} | {} | {} |",
                f.applied_at_s,
                f.description,
                affected_cell(f),
                path_changes_cell(f),
                opt_ms(f.route_moved_after_ms)
            );
        }
    }
    if !r.faults.is_empty() && !virtual_time {
        let _ = writeln!(s, "\n## Failover timeline\n");
        let _ = writeln!(
            s,
            "Times are ms after the fault was applied. *Affected*: edges whose route to the connector, or the connector's route back to them, \
             used what broke. *Route moved*: both directions avoid it in the nodes' `/status` (\
             polled every 50 ms). *Suspected*: the first node whose \
             SWIM view marks a killed node not alive. *Flowing again*: the chat echo that ended the \
             longest stall of an affected session; *stall*: that longest gap between echoes \
             (messages every {} ms). *Broken*: sessions of live edges that failed within 10 s \
             of the fault (or before the next one); sessions on a killed edge cannot survive it \
             and are counted apart. A session through a killed connector cannot survive either: \
             its edge closes it once no path to that connector is left and another connector \
             serves, and the user reconnects through that one.\n",
            r.chat_interval_ms
        );
        let _ = writeln!(
            s,
            "| at s | fault | affected edges | paths before → after | route moved | suspected | flowing again | longest stall | sessions watched | broken |"
        );
        let _ = writeln!(s, "|---:|---|---|---|---:|---:|---:|---:|---:|---|");
        for f in &r.faults {
            let mut broken = if f.sessions_broken.is_empty() {
                "none".to_string()
            } else {
                f.sessions_broken.join("; ")
            };
            if f.sessions_on_killed_edge > 0 {
                let _ = write!(
                    broken,
                    " (+{} on the killed edge itself)",
                    f.sessions_on_killed_edge
                );
            }
            let _ = writeln!(
                s,
                "| {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f.applied_at_s,
                f.description,
                affected_cell(f),
                path_changes_cell(f),
                opt_ms(f.route_moved_after_ms),
                opt_ms(f.member_suspected_after_ms),
                opt_ms(f.flowing_again_after_ms),
                opt_ms(f.longest_stall_ms),
                f.sessions_observed,
                broken
            );
        }
        let _ = writeln!(
            s,
            "\nChat sessions: {} started, {} echoes, {} breaks in the whole fault phase{}",
            r.sessions.started,
            r.sessions.echoes,
            r.sessions.breaks.len(),
            if r.sessions.breaks.is_empty() {
                ".".to_string()
            } else {
                format!(":\n\n- {}", r.sessions.breaks.join("\n- "))
            }
        );
        if !r.echoes.is_empty() {
            let _ = writeln!(s, "\n![failover timeline](failover.svg)");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n\n- {}", r.notes.join("\n- "));
    }
    s
}
