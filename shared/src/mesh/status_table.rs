//! Renders a node's [`MeshStatus`] as plain-text tables for `mesh-node status`.

use std::fmt::Write as _;

use super::control::MeshStatus;

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn percent(loss: f64) -> String {
    format!("{:.1}%", loss * 100.0)
}

fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Lays out rows in columns, the first row being the header.
/// A table's header row.
fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// The node's view as text: members, routes, probed paths, and the gossiped links.
pub fn render(status: &MeshStatus) -> String {
    let mut out = format!("node {}\n\nMEMBERS\n", status.node);
    let mut rows = vec![header(&[
        "name", "role", "region", "state", "address", "heard s", "direct", "rtt ms",
    ])];
    for m in &status.members {
        rows.push(vec![
            if m.this_node {
                format!("{} (this node)", m.name)
            } else {
                m.name.clone()
            },
            m.role.to_string(),
            m.region.clone().unwrap_or_else(|| "-".into()),
            m.state.clone().unwrap_or_else(|| "-".into()),
            match (&m.address, m.address_learned) {
                (Some(a), true) => format!("{a} (learned)"),
                (Some(a), false) => a.clone(),
                (None, _) => "-".into(),
            },
            m.heard_s_ago
                .map_or_else(|| "-".into(), |s| format!("{s:.1}")),
            m.direct_state.clone().unwrap_or_else(|| "-".into()),
            ms(m.direct_rtt_ms),
        ]);
    }
    out.push_str(&table(&rows));

    out.push_str("\nROUTES\n");
    if status.routes.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let mut rows = vec![header(&[
            "destination",
            "path",
            "rtt ms",
            "loss",
            "cost ms",
            "reason",
            "since",
        ])];
        for r in &status.routes {
            let preferred = status.preferred_destination.as_deref() == Some(&r.destination);
            rows.push(vec![
                if preferred {
                    format!("{} *", r.destination)
                } else {
                    r.destination.clone()
                },
                r.path.join(" → "),
                format!("{:.1}", r.rtt_ms),
                percent(r.loss),
                format!("{:.1}", r.cost_ms),
                r.reason.clone(),
                age(r.since_s),
            ]);
        }
        out.push_str(&table(&rows));
        out.push_str("  * where new flows go (nearest healthy destination)\n");
    }

    out.push_str("\nNODES (their reports, every 10 s)\n");
    if status.reports.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let mut rows = vec![header(&[
            "node", "req/s", "err/s", "open", "tunnels", "cache", "routes", "age",
        ])];
        let mut reports: Vec<_> = status.reports.iter().collect();
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        for r in reports {
            let routes: Vec<String> = r
                .routes
                .iter()
                .map(|p| match p.split_last() {
                    Some((dest, [])) => dest.clone(),
                    Some((dest, via)) => format!("{dest} via {}", via.join(" → ")),
                    None => String::new(),
                })
                .collect();
            rows.push(vec![
                r.node.clone(),
                format!("{:.1}", r.load.requests_per_s),
                format!("{:.1}", r.load.errors_per_s),
                r.load.open_connections.to_string(),
                r.load.tunnels_up.to_string(),
                r.load
                    .cache_hit_ratio
                    .map_or_else(|| "-".into(), |h| format!("{:.1} %", h * 100.0)),
                format!(
                    "{}{}",
                    routes.join(", "),
                    if r.routes_truncated { ", …" } else { "" }
                ),
                age(r.age_s),
            ]);
        }
        out.push_str(&table(&rows));
    }

    out.push_str("\nPROBED PATHS\n");
    let mut rows = vec![header(&[
        "path",
        "class",
        "state",
        "srtt ms",
        "rttvar ms",
        "recent ms",
        "loss",
    ])];
    for p in &status.paths {
        rows.push(vec![
            p.path.join(" → "),
            p.class.clone(),
            p.state.clone(),
            ms(p.srtt_ms),
            format!("{:.1}", p.rttvar_ms),
            ms(p.recent_ms),
            percent(p.loss),
        ]);
    }
    out.push_str(&table(&rows));

    out.push_str("\nMESH LINKS (gossiped)\n");
    let mut rows = vec![header(&[
        "from",
        "to",
        "srtt ms",
        "recent ms",
        "loss",
        "alive",
        "version",
        "age",
    ])];
    for l in &status.links {
        rows.push(vec![
            l.from.clone(),
            l.to.clone(),
            format!("{:.1}", l.srtt_ms),
            format!("{:.1}", l.recent_ms),
            percent(l.loss),
            if l.alive { "yes" } else { "no" }.into(),
            l.version.to_string(),
            age(l.age_s),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Role;
    use crate::mesh::control::{MemberStatus, NodeReport, RouteStatus};
    use crate::mesh::report::Load;

    #[test]
    fn renders_members_and_routes_in_columns() {
        let status = MeshStatus {
            node: "syd".into(),
            members: vec![MemberStatus {
                name: "fra".into(),
                role: Role::Connector,
                region: Some("Frankfurt".into()),
                id: "00".into(),
                this_node: false,
                state: Some("alive".into()),
                incarnation: Some(0),
                address: Some("10.0.0.1:7000".into()),
                address_learned: true,
                heard_s_ago: Some(0.25),
                direct_state: Some("up".into()),
                direct_rtt_ms: Some(290.04),
            }],
            routes: vec![RouteStatus {
                destination: "fra".into(),
                path: vec!["syd".into(), "sin".into(), "fra".into()],
                cost_ms: 250.0,
                rtt_ms: 249.5,
                loss: 0.0,
                reason: "better".into(),
                since_s: 300.0,
            }],
            preferred_destination: Some("fra".into()),
            reports: vec![NodeReport {
                node: "syd".into(),
                age_s: 4.0,
                load: Load {
                    requests_per_s: 12.5,
                    errors_per_s: 0.1,
                    open_connections: 3,
                    tunnels_up: 1,
                    cache_hit_ratio: Some(0.875),
                },
                routes: vec![vec!["sin".into(), "fra".into()]],
                routes_truncated: false,
            }],
            ..MeshStatus::default()
        };
        let text = render(&status);
        assert!(text.contains("syd → sin → fra"), "{text}");
        assert!(text.contains("fra *"), "{text}");
        assert!(text.contains("290.0"), "{text}");
        assert!(text.contains("5m00s"), "{text}");
        assert!(text.contains("fra via sin"), "{text}");
        assert!(text.contains("87.5 %"), "{text}");
        assert!(text.contains("10.0.0.1:7000 (learned)"), "{text}");
    }
}
