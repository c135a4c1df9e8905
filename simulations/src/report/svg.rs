//! Hand-written SVG charts.

use std::fmt::Write as _;

use super::model::Report;

const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum above `v`.
fn nice_max(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

/// One chart per metric: per region, a bar straight to the origin and a bar through the
/// edge, each with its lower bound marked as a black line. File names `latency-N.svg`.
pub fn latency_charts(r: &Report) -> Vec<(String, String)> {
    let Some(first) = r.comparison.first() else {
        return Vec::new();
    };
    let metrics: Vec<String> = first.metrics.iter().map(|m| m.metric.clone()).collect();
    let mut out = Vec::new();
    for (k, metric) in metrics.iter().enumerate() {
        let (w, h, left, top, bottom) = (760.0, 360.0, 60.0, 40.0, 60.0);
        let max = r
            .comparison
            .iter()
            .filter_map(|c| c.metrics.get(k))
            .flat_map(|m| [m.direct_ms, m.edge_ms, m.direct_bound_ms, m.edge_bound_ms])
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let ymax = nice_max(max);
        let plot_h = h - top - bottom;
        let y = |v: f64| top + plot_h * (1.0 - (v / ymax).clamp(0.0, 1.0));
        let n = r.comparison.len().max(1) as f64;
        let group = (w - left - 20.0) / n;
        let bar = (group * 0.35).min(40.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14" font-weight="bold">{} — median ms (black line: lower bound)</text>"#,
            esc(metric)
        );
        for t in 0..=5 {
            let v = ymax * t as f64 / 5.0;
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
                w - 20.0,
                left - 5.0,
                yy + 4.0
            );
        }
        for (i, c) in r.comparison.iter().enumerate() {
            let Some(m) = c.metrics.get(k) else { continue };
            let gx = left + group * i as f64 + group / 2.0;
            for (j, (v, b, colour, label)) in [
                (m.direct_ms, m.direct_bound_ms, "#999999", "direct"),
                (m.edge_ms, m.edge_bound_ms, "#1f77b4", "edge"),
            ]
            .into_iter()
            .enumerate()
            {
                let x = gx - bar - 2.0 + j as f64 * (bar + 4.0);
                if v.is_finite() {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"><title>{label}: {v:.0} ms (bound {b:.0} ms)</title></rect>"#,
                        y(v),
                        y(0.0) - y(v)
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.0}</text>"#,
                        x + bar / 2.0,
                        y(v) - 3.0
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="2"/>"#,
                    x - 3.0,
                    y(b),
                    x + bar + 3.0,
                    y(b)
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                h - bottom + 16.0,
                esc(&c.region)
            );
        }
        let ly = h - 18.0;
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{:.1}" width="12" height="12" fill="#999999"/><text x="{:.1}" y="{ly:.1}">straight to the origin (TCP+TLS+request)</text>"##,
            ly - 10.0,
            left + 16.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="#1f77b4"/><text x="{:.1}" y="{ly:.1}">through the region's edge</text>"##,
            left + 300.0,
            ly - 10.0,
            left + 316.0
        );
        s.push_str("</svg>\n");
        out.push((format!("latency-{}.svg", k + 1), s));
    }
    out
}

/// Every chat echo's RTT over the fault phase (one colour per client region), faults as
/// red vertical lines.
pub fn failover_chart(r: &Report) -> String {
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 70.0);
    let regions: Vec<String> = {
        let mut v: Vec<String> = r
            .echoes
            .iter()
            .map(|e| e.session.split('#').next().unwrap_or("").to_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let mut rtts: Vec<f64> = r.echoes.iter().map(|e| e.rtt_ms).collect();
    rtts.sort_by(f64::total_cmp);
    let max = rtts.last().copied().unwrap_or(1.0);
    let ymax = nice_max(max);
    let xmax = r.fault_phase_s.max(1.0);
    let plot_w = w - left - 20.0;
    let plot_h = h - top - bottom;
    let x = |t: f64| left + plot_w * (t / xmax).clamp(0.0, 1.0);
    let y = |v: f64| top + plot_h * (1.0 - (v / ymax).clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14" font-weight="bold">Chat echo RTT (ms) of every message over the fault phase (s); red: faults</text>"#
    );
    for t in 0..=5 {
        let v = ymax * t as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            w - 20.0,
            left - 5.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    for t in 0..=10 {
        let tv = xmax * t as f64 / 10.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{tv:.0}</text>"#,
            x(tv),
            h - bottom + 16.0
        );
    }
    for e in &r.echoes {
        let region = e.session.split('#').next().unwrap_or("");
        let ci = regions.iter().position(|r| r == region).unwrap_or(0);
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}"/>"#,
            x(e.sent_s),
            y(e.rtt_ms),
            PALETTE[ci % PALETTE.len()]
        );
    }
    for f in &r.faults {
        let fx = x(f.applied_at_s);
        let _ = writeln!(
            s,
            r#"<line x1="{fx:.1}" y1="{top}" x2="{fx:.1}" y2="{:.1}" stroke="red" stroke-dasharray="4 3"/>"#,
            h - bottom
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="red" font-size="11">{}</text>"#,
            fx + 3.0,
            top + 12.0,
            esc(&f.description)
        );
    }
    for (i, region) in regions.iter().enumerate() {
        let lx = left + 110.0 * i as f64;
        let ly = h - 18.0;
        let _ = writeln!(
            s,
            r#"<circle cx="{lx:.1}" cy="{:.1}" r="5" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            PALETTE[i % PALETTE.len()],
            lx + 8.0,
            esc(region)
        );
    }
    s.push_str("</svg>\n");
    s
}
