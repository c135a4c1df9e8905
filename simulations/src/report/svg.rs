//! Hand-written SVG charts.
//!
//! Text is laid out with an estimate of its width (a per-character table for a sans-serif
//! font, below), so that nothing printed collides whatever the names: region labels on the
//! x axis tilt when they do not fit their group, legends wrap, and fault labels that would
//! overlap stack in rows above the plot. Every margin, and the canvas, grows to fit.

use std::fmt::Write as _;

use super::model::{FaultTimeline, Report};

const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Advance widths of the printable ASCII characters (`' '..='~'`) in thousandths of an em,
/// from DejaVu Sans (Verdana-like; wider than Helvetica or Arial, so the estimate errs on
/// the roomy side whichever sans-serif font the viewer picks).
const ASCII_WIDTHS: [u16; 95] = [
    318, 401, 460, 838, 636, 950, 780, 275, 390, 390, 500, 838, 318, 361, 318, 337, // ' '../
    636, 636, 636, 636, 636, 636, 636, 636, 636, 636, // 0..9
    337, 337, 838, 838, 838, 531, 1000, // :..@
    684, 686, 698, 770, 632, 575, 775, 752, 295, 295, 656, 557, 863, // A..M
    748, 787, 603, 787, 695, 635, 611, 732, 684, 989, 685, 611, 685, // N..Z
    390, 337, 390, 838, 500, 500, // [..`
    613, 635, 550, 635, 615, 352, 635, 634, 278, 278, 579, 278, 974, // a..m
    634, 612, 635, 635, 411, 521, 392, 634, 592, 818, 592, 592, 525, // n..z
    636, 337, 636, 838, // {..~
];

/// How much wider bold text is (DejaVu Sans Bold over Book, rounded up).
const BOLD_FACTOR: f64 = 1.15;
/// Glyph extent above the baseline, em (caps and ascenders, with a little room).
const ASCENT: f64 = 0.8;
/// Glyph extent below the baseline, em (descenders).
const DESCENT: f64 = 0.25;

/// Estimated advance width of `c`, em.
fn char_em(c: char) -> f64 {
    match c {
        ' '..='~' => f64::from(ASCII_WIDTHS[c as usize - ' ' as usize]) / 1000.0,
        '–' => 0.5,
        '—' | '…' => 1.0,
        '·' | '•' => 0.32,
        '→' | '←' | '⇒' | '≤' | '≥' | '±' | '×' => 0.84,
        c if u32::from(c) >= 0x2E80 => 1.0, // CJK and other full-width scripts
        c if c.is_alphabetic() => 0.7,      // accented Latin, Greek, Cyrillic
        _ => 0.8,
    }
}

/// Estimated width of `s` set in a sans-serif font at `size` px.
fn text_width(s: &str, size: f64, bold: bool) -> f64 {
    let em: f64 = s.chars().map(char_em).sum();
    em * size * if bold { BOLD_FACTOR } else { 1.0 }
}

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

/// The SVG's own font size (axis ticks, region labels, legends), px.
const FONT: f64 = 12.0;
/// Chart titles (bold), px.
const TITLE_FONT: f64 = 14.0;
/// Values over the bars, px.
const VALUE_FONT: f64 = 10.0;
/// Fault labels, px.
const FAULT_FONT: f64 = 11.0;
/// Baseline of a chart's title.
const TITLE_Y: f64 = 20.0;
/// Bottom of a chart's title (its descenders).
const TITLE_BOTTOM: f64 = TITLE_Y + DESCENT * TITLE_FONT;
/// Least room kept between a text and the canvas edge, px.
const EDGE: f64 = 4.0;
/// Tilt of x-axis labels that do not fit their group, degrees (drawn as `rotate(-TILT)`).
const TILT_DEG: f64 = 35.0;
/// Distance between legend rows, px.
const LEGEND_ROW: f64 = 18.0;
/// Gap between legend items in a row, px.
const LEGEND_GAP: f64 = 20.0;
/// Distance between rows of fault labels, px.
const FAULT_ROW: f64 = 14.0;
/// Least gap between two fault labels in a row, px.
const FAULT_GAP: f64 = 8.0;
/// Widest a fault label may be before it is cut with an ellipsis (full text in its
/// `<title>`), px.
const FAULT_MAX_W: f64 = 300.0;

/// `s` cut to at most `max` px wide at `size`, with an ellipsis when cut.
fn truncate(s: &str, size: f64, max: f64) -> String {
    if text_width(s, size, false) <= max {
        return s.to_owned();
    }
    let budget = max - text_width("…", size, false);
    let mut width = 0.0;
    let mut out = String::new();
    for c in s.chars() {
        width += char_em(c) * size;
        if width > budget {
            break;
        }
        out.push(c);
    }
    // No dangling space, dash or opening bracket before the ellipsis.
    let kept = out.trim_end_matches(|c: char| c.is_whitespace() || "([{–—-,;:/".contains(c));
    format!("{kept}…")
}

/// A legend entry's swatch.
#[derive(Clone, Copy)]
enum Swatch {
    /// A 12 px square (bars).
    Square,
    /// A dot of radius 5 (scatter points).
    Dot,
}

impl Swatch {
    /// From the item's left edge to its label, px.
    fn text_offset(self) -> f64 {
        match self {
            Self::Square => 16.0,
            Self::Dot => 13.0,
        }
    }
}

/// Legend items flowed left to right from `x0`, wrapping before `x_max`, the first row's
/// baseline at `y0`. Returns the SVG and the last row's baseline.
fn legend(items: &[(Swatch, &str, &str)], x0: f64, x_max: f64, y0: f64) -> (String, f64) {
    let mut s = String::new();
    let (mut x, mut y) = (x0, y0);
    for &(swatch, colour, label) in items {
        let label = truncate(label, FONT, x_max - x0 - swatch.text_offset());
        let item_w = swatch.text_offset() + text_width(&label, FONT, false);
        if x > x0 && x + item_w > x_max {
            x = x0;
            y += LEGEND_ROW;
        }
        let _ = match swatch {
            Swatch::Square => write!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{colour}"/>"#,
                y - 10.0
            ),
            Swatch::Dot => write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{colour}"/>"#,
                x + 5.0,
                y - 4.0
            ),
        };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{y:.1}">{}</text>"#,
            x + swatch.text_offset(),
            esc(&label)
        );
        x += item_w + LEGEND_GAP;
    }
    (s, y)
}

/// One chart per metric: per region, a bar straight to the origin and a bar through the
/// edge, each with its lower bound marked as a black line. File names `latency-N.svg`.
pub fn latency_charts(r: &Report) -> Vec<(String, String)> {
    let Some(first) = r.comparison.first() else {
        return Vec::new();
    };
    first
        .metrics
        .iter()
        .enumerate()
        .map(|(k, m)| {
            (
                format!("latency-{}.svg", k + 1),
                latency_chart(r, k, &m.metric),
            )
        })
        .collect()
}

/// The chart of metric `k`.
fn latency_chart(r: &Report, k: usize, metric: &str) -> String {
    // The canvas is at least `BASE_W` wide; it grows for many regions (each group at least
    // `MIN_GROUP`), for tilted labels reaching left of the plot, and for the title.
    const BASE_W: f64 = 760.0;
    const BASE_LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const PLOT_H: f64 = 260.0;
    const MIN_GROUP: f64 = 32.0;
    // Region labels: horizontal ones need this much room between them, px.
    const LABEL_GAP: f64 = 8.0;
    // Below the axis: the top of the region labels (clear of the "0" tick label), px.
    const LABEL_TOP: f64 = 8.0;

    let max = r
        .comparison
        .iter()
        .filter_map(|c| c.metrics.get(k))
        .flat_map(|m| [m.direct_ms, m.edge_ms, m.direct_bound_ms, m.edge_bound_ms])
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let ymax = nice_max(max);
    let n = r.comparison.len().max(1) as f64;
    let title = format!("{metric} — median ms (black line: lower bound)");
    let title_w = text_width(&title, TITLE_FONT, true);

    // Region labels: horizontal when the widest fits its group, else tilted, anchored at
    // their end under the group. Neighbours tilted by θ lie `group·sin θ` apart across the
    // text, more than a line's height with groups of at least `MIN_GROUP`.
    let mut group = ((BASE_W - BASE_LEFT - RIGHT) / n).max(MIN_GROUP);
    let label_w: Vec<f64> = r
        .comparison
        .iter()
        .map(|c| text_width(&c.region, FONT, false))
        .collect();
    let widest = label_w.iter().copied().fold(0.0, f64::max);
    let tilted = widest + LABEL_GAP > group;
    let (sin, cos) = TILT_DEG.to_radians().sin_cos();
    // How far a label reaches left of its group's centre, and below the axis.
    let reach_left = |w: f64| {
        if tilted {
            w * cos + (ASCENT - 0.3) * FONT * sin
        } else {
            w / 2.0
        }
    };
    let reach_down = |w: f64| {
        if tilted {
            LABEL_TOP + ASCENT * FONT * cos + w * sin + DESCENT * FONT * cos
        } else {
            LABEL_TOP + (ASCENT + DESCENT) * FONT
        }
    };
    let left = label_w
        .iter()
        .enumerate()
        .map(|(i, &w)| EDGE + reach_left(w) - group * (i as f64 + 0.5))
        .fold(BASE_LEFT, f64::max);
    let w = (left + n * group + RIGHT).max(left + title_w + RIGHT);
    group = (w - left - RIGHT) / n;
    let bar = (group * 0.35).min(40.0);

    // Values over the bars: horizontal when the widest fits over its bar, else vertical.
    let values: Vec<f64> = r
        .comparison
        .iter()
        .filter_map(|c| c.metrics.get(k))
        .flat_map(|m| [m.direct_ms, m.edge_ms])
        .filter(|v| v.is_finite())
        .collect();
    let widest_value = values
        .iter()
        .map(|v| text_width(&format!("{v:.0}"), VALUE_FONT, false))
        .fold(0.0, f64::max);
    let upright = widest_value + 3.0 <= bar + 4.0;
    // The top margin keeps every value label clear of the title.
    let top = values
        .iter()
        .map(|&v| {
            let above = if upright {
                ASCENT * VALUE_FONT
            } else {
                text_width(&format!("{v:.0}"), VALUE_FONT, false)
            };
            TITLE_BOTTOM + EDGE + 3.0 + above - PLOT_H * (1.0 - (v / ymax).clamp(0.0, 1.0))
        })
        .fold(40.0, f64::max);
    let axis = top + PLOT_H;
    let labels_bottom = axis + label_w.iter().copied().map(reach_down).fold(0.0, f64::max);
    let y = |v: f64| top + PLOT_H * (1.0 - (v / ymax).clamp(0.0, 1.0));

    let (legend_svg, legend_y) = legend(
        &[
            (
                Swatch::Square,
                "#999999",
                "straight to the origin (TCP+TLS+request)",
            ),
            (Swatch::Square, "#1f77b4", "through the region's edge"),
        ],
        left,
        w - RIGHT,
        labels_bottom + 14.0 + ASCENT * FONT,
    );
    let h = (legend_y + 18.0).ceil();
    let w = w.ceil();

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left:.1}" y="{TITLE_Y}" font-size="14" font-weight="bold">{}</text>"#,
        esc(&title)
    );
    for t in 0..=5 {
        let v = ymax * f64::from(t) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            w - RIGHT,
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
            let cx = x + bar / 2.0;
            if v.is_finite() {
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"><title>{label}: {v:.0} ms (bound {b:.0} ms)</title></rect>"#,
                    y(v),
                    y(0.0) - y(v)
                );
                let ty = y(v) - 3.0;
                if upright {
                    let _ = writeln!(
                        s,
                        r#"<text x="{cx:.1}" y="{ty:.1}" text-anchor="middle" font-size="10">{v:.0}</text>"#
                    );
                } else {
                    // Reads upwards, centred on the bar.
                    let tx = cx + 0.3 * VALUE_FONT;
                    let _ = writeln!(
                        s,
                        r#"<text x="{tx:.1}" y="{ty:.1}" transform="rotate(-90 {tx:.1} {ty:.1})" font-size="10">{v:.0}</text>"#
                    );
                }
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
        if tilted {
            // Anchored at its end; the middle of the text lines up with the group centre.
            let lx = gx + 0.3 * FONT * sin;
            let ly = axis + LABEL_TOP + ASCENT * FONT * cos;
            let _ = writeln!(
                s,
                r#"<text x="{lx:.1}" y="{ly:.1}" transform="rotate(-{TILT_DEG} {lx:.1} {ly:.1})" text-anchor="end">{}</text>"#,
                esc(&c.region)
            );
        } else {
            let _ = writeln!(
                s,
                r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                axis + LABEL_TOP + ASCENT * FONT,
                esc(&c.region)
            );
        }
    }
    s.push_str(&legend_svg);
    s.push_str("</svg>\n");
    s
}

/// A fault's label, placed.
struct FaultLabel<'a> {
    /// The fault.
    fault: &'a FaultTimeline,
    /// x of its line.
    fx: f64,
    /// What is printed (the description, maybe cut).
    text: String,
    /// Printed left of the line (near the right edge) rather than right of it.
    left_of_line: bool,
    /// Horizontal extent of the printed text.
    x0: f64,
    x1: f64,
    /// Row, 0 the highest.
    row: usize,
}

/// Places fault labels in time order, each beside its line (which runs from the label down
/// to the plot): right of it, or left of it when the right edge is too close. Each goes in
/// the highest row where it overlaps no label, its line crosses no label in the rows
/// below, no line of the rows above crosses it, and its text fits whole (up to
/// `FAULT_MAX_W`); failing that, in the row with the most room, cut with an ellipsis. A
/// label right of its line always fits whole in a new row under the others (the lines
/// placed before it are all left of it).
fn place_fault_labels(
    faults: &[FaultTimeline],
    x: impl Fn(f64) -> f64,
    x_min: f64,
    x_max: f64,
) -> Vec<FaultLabel<'_>> {
    // A label cut to less than this (px) would say little: the row does not qualify.
    const MIN_W: f64 = 120.0;
    let mut order: Vec<&FaultTimeline> = faults.iter().collect();
    order.sort_by(|a, b| a.applied_at_s.total_cmp(&b.applied_at_s));
    let mut placed: Vec<FaultLabel<'_>> = Vec::new();
    for fault in order {
        let fx = x(fault.applied_at_s);
        let full = text_width(&fault.description, FAULT_FONT, false).min(FAULT_MAX_W);
        let room_right = x_max - (fx + 3.0);
        let room_left = fx - 3.0 - x_min;
        let left_of_line = room_right < full.min(MIN_W) && room_left > room_right;
        let need = full.min(if left_of_line { room_left } else { room_right });
        // The room in `row` (0 when it is unusable); `lines`: whether lines from the rows
        // above count.
        let room = |row: usize, lines: bool| {
            let own_line_hits = placed
                .iter()
                .any(|p| p.row > row && fx > p.x0 - 2.0 && fx < p.x1 + 2.0);
            if own_line_hits && lines {
                return 0.0;
            }
            // Distances from the start of the text (`fx ± 3`) outwards, to the edge and to
            // every obstacle on that side; an obstacle at or behind the start spoils the row.
            let dir = if left_of_line { -1.0 } else { 1.0 };
            let start = fx + 3.0 * dir;
            let mut room = if left_of_line { room_left } else { room_right };
            for p in &placed {
                if p.row == row {
                    let (near, far) = if left_of_line {
                        (p.x1, p.x0)
                    } else {
                        (p.x0, p.x1)
                    };
                    if (far - start) * dir + FAULT_GAP > 0.0 {
                        room = room.min((near - start) * dir - FAULT_GAP);
                    }
                } else if p.row < row && lines && (p.fx - start) * dir + 2.0 > 0.0 {
                    room = room.min((p.fx - start) * dir - 2.0);
                }
            }
            room.max(0.0)
        };
        let rows = placed.iter().map(|p| p.row + 1).max().unwrap_or(0);
        let (row, width) = (0..=rows)
            .map(|r| (r, room(r, true)))
            .find(|&(_, w)| w >= need - 0.01)
            .or_else(|| {
                (0..=rows)
                    .map(|r| (r, room(r, true)))
                    .filter(|&(_, w)| w >= need.min(MIN_W))
                    .fold(None, |best: Option<(usize, f64)>, c| match best {
                        Some(b) if b.1 >= c.1 => Some(b),
                        _ => Some(c),
                    })
            })
            .unwrap_or_else(|| (rows, room(rows, false)));
        let text = truncate(&fault.description, FAULT_FONT, width.min(FAULT_MAX_W));
        let tw = text_width(&text, FAULT_FONT, false);
        let (x0, x1) = if left_of_line {
            (fx - 3.0 - tw, fx - 3.0)
        } else {
            (fx + 3.0, fx + 3.0 + tw)
        };
        placed.push(FaultLabel {
            fault,
            fx,
            text,
            left_of_line,
            x0,
            x1,
            row,
        });
    }
    placed
}

/// Every chat echo's RTT over the fault phase (one colour per client region), faults as
/// red vertical lines.
pub fn failover_chart(r: &Report) -> String {
    const W: f64 = 900.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const PLOT_H: f64 = 310.0;
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
    let plot_w = W - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot_w * (t / xmax).clamp(0.0, 1.0);

    // Fault labels in rows between the title and the plot.
    let labels = place_fault_labels(&r.faults, x, EDGE, W - EDGE);
    let row_y = |row: usize| TITLE_BOTTOM + 9.0 + ASCENT * FAULT_FONT + FAULT_ROW * row as f64;
    let top = labels
        .iter()
        .map(|l| row_y(l.row) + DESCENT * FAULT_FONT + 6.0)
        .fold(40.0, f64::max);
    let bottom = top + PLOT_H;
    let y = |v: f64| top + PLOT_H * (1.0 - (v / ymax).clamp(0.0, 1.0));
    let ticks_y = bottom + 16.0;

    let items: Vec<(Swatch, &str, &str)> = regions
        .iter()
        .enumerate()
        .map(|(i, region)| (Swatch::Dot, PALETTE[i % PALETTE.len()], region.as_str()))
        .collect();
    let (legend_svg, legend_y) = legend(
        &items,
        LEFT,
        W - RIGHT,
        ticks_y + DESCENT * FONT + 14.0 + ASCENT * FONT,
    );
    let h = (legend_y + 18.0).ceil();

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{TITLE_Y}" font-size="14" font-weight="bold">Chat echo RTT (ms) of every message over the fault phase (s); red: faults</text>"#
    );
    for t in 0..=5 {
        let v = ymax * f64::from(t) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            W - RIGHT,
            LEFT - 5.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    for t in 0..=10 {
        let tv = xmax * f64::from(t) / 10.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{ticks_y:.1}" text-anchor="middle">{tv:.0}</text>"#,
            x(tv)
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
    for l in &labels {
        let ly = row_y(l.row);
        let _ = writeln!(
            s,
            r#"<line x1="{fx:.1}" y1="{:.1}" x2="{fx:.1}" y2="{bottom:.1}" stroke="red" stroke-dasharray="4 3"/>"#,
            ly - ASCENT * FAULT_FONT,
            fx = l.fx
        );
        let (tx, anchor) = if l.left_of_line {
            (l.x1, r#" text-anchor="end""#)
        } else {
            (l.x0, "")
        };
        let _ = writeln!(
            s,
            r#"<g><title>{}</title><text x="{tx:.1}" y="{ly:.1}" fill="red" font-size="11"{anchor}>{}</text></g>"#,
            esc(&l.fault.description),
            esc(&l.text)
        );
    }
    s.push_str(&legend_svg);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::model::{EchoSample, FaultTimeline, MetricRow, RegionComparison, Report};
    use super::*;

    /// Long region names (the ones from issue 9 first).
    const LONG_NAMES: [&str; 13] = [
        "New Zealand North",
        "South Africa North",
        "Qatar Central",
        "Australia Southeast",
        "Germany West Central",
        "Switzerland North",
        "North Central US",
        "Brazil Southeast",
        "Canada Central",
        "Korea Central",
        "Israel Central",
        "Southeast Asia",
        "Poland Central",
    ];

    /// Thirty regions, one of them with a 30-character name.
    const MANY_NAMES: [&str; 30] = [
        "New Zealand North",
        "South Africa North",
        "Qatar Central",
        "Australia Southeast Melbourne1",
        "Germany West Central",
        "Switzerland North",
        "North Central US",
        "Brazil Southeast",
        "Canada Central",
        "Korea Central",
        "Israel Central",
        "Southeast Asia",
        "Poland Central",
        "Tokyo",
        "Lagos",
        "Dubai",
        "Mexico Central",
        "Italy North",
        "Spain Central",
        "Norway East",
        "Central India",
        "Jio India West",
        "France Central",
        "UK South",
        "West US 3",
        "East US 2",
        "Sweden Central",
        "Japan West",
        "Indonesia Central",
        "Chile Central",
    ];

    /// Faults bunched within a second of each other, with long descriptions, plus a few
    /// spread out and one at the very end of the phase.
    const FAULTS: [(f64, &str); 9] = [
        (5.0, "cut New Zealand North–South Africa North"),
        (5.2, "kill Qatar Central"),
        (5.45, "kill South Africa North"),
        (
            5.7,
            "restart Qatar Central and every relay in Germany West Central after the partition",
        ),
        (
            5.95,
            "degrade Australia Southeast–Korea Central (300 ms, 5 % loss)",
        ),
        (35.0, "restart South Africa North"),
        (35.6, "restore New Zealand North–South Africa North"),
        (38.0, "restart Qatar Central"),
        (49.8, "restore Australia Southeast–Korea Central"),
    ];

    const METRICS: [&str; 3] = [
        "websocket connect + first message",
        "dynamic request TTFB (/api/time)",
        "page load with assets (/ + 3 assets, HTTP/2)",
    ];

    fn fault(at_s: f64, description: &str) -> FaultTimeline {
        FaultTimeline {
            at_s,
            applied_at_s: at_s,
            description: description.to_owned(),
            affected_edges: Vec::new(),
            paths_before: Vec::new(),
            paths_after: Vec::new(),
            route_moved_after_ms: None,
            member_suspected_after_ms: None,
            flowing_again_after_ms: None,
            longest_stall_ms: None,
            sessions_observed: 0,
            sessions_broken: Vec::new(),
            sessions_on_killed_edge: 0,
        }
    }

    /// A report over `names` with made-up but plausible figures and `faults`.
    fn report(names: &[&str], faults: &[(f64, &str)]) -> Report {
        let comparison = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let metrics = METRICS
                    .iter()
                    .enumerate()
                    .map(|(k, metric)| {
                        let direct = 150.0 + ((i * 337 + k * 191) % 1250) as f64;
                        let edge = direct * (0.35 + 0.05 * ((i + k) % 8) as f64);
                        MetricRow {
                            metric: (*metric).to_owned(),
                            direct_ms: direct,
                            edge_ms: edge,
                            direct_bound_ms: direct * 0.92,
                            edge_bound_ms: edge * 0.9,
                            edge_over_bound_percent: 11.0,
                            saved_ms: direct - edge,
                            saved_percent: 100.0 * (direct - edge) / direct,
                            direct_samples_ms: vec![direct],
                            edge_samples_ms: vec![edge],
                            failures: 0,
                        }
                    })
                    .collect();
                RegionComparison {
                    region: (*name).to_owned(),
                    edge: (*name).to_owned(),
                    edge_rtt_ms: 2.0,
                    origin_rtt_ms: 200.0,
                    best_path_rtt_ms: 150.0,
                    metrics,
                }
            })
            .collect();
        let mut echoes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            for step in 0..100 {
                let t = f64::from(step) * 0.5 + 0.01 * i as f64;
                let spike = faults
                    .iter()
                    .filter(|(at, _)| t >= *at && t < at + 1.0)
                    .count() as f64;
                echoes.push(EchoSample {
                    session: format!("{name}#0"),
                    sent_s: t,
                    rtt_ms: 80.0 + 15.0 * i as f64 + 600.0 * spike,
                });
            }
        }
        Report {
            scenario: "issue-9".into(),
            mode: "real".into(),
            origin: names.first().map_or_else(String::new, |n| (*n).to_owned()),
            comparison,
            faults: faults.iter().map(|(at, d)| fault(*at, d)).collect(),
            echoes,
            fault_phase_s: 50.0,
            chat_interval_ms: 500,
            ..Report::default()
        }
    }

    /// A `<text>` element as drawn: its box's corners (rotation applied), and its text.
    #[derive(Debug)]
    struct TextBox {
        text: String,
        corners: [(f64, f64); 4],
    }

    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let key = format!(" {name}=\"");
        let start = tag.find(&key)? + key.len();
        let len = tag[start..].find('"')?;
        Some(&tag[start..start + len])
    }

    fn num(tag: &str, name: &str) -> Option<f64> {
        attr(tag, name).and_then(|v| v.parse().ok())
    }

    /// The text of an element's content: tags (and `<title>` tooltips) removed, entities
    /// decoded.
    fn plain(content: &str) -> String {
        let mut s = content.to_owned();
        while let (Some(a), Some(b)) = (s.find("<title>"), s.find("</title>")) {
            s.replace_range(a..b + "</title>".len(), "");
        }
        let mut out = String::new();
        let mut in_tag = false;
        for c in s.chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    /// Every `<text>` of `svg` as a box computed from the width estimate, and the SVG's size.
    fn text_boxes(svg: &str) -> (Vec<TextBox>, f64, f64) {
        let root = &svg[..svg.find('>').expect("svg tag")];
        let width = num(root, "width").expect("svg width");
        let height = num(root, "height").expect("svg height");
        let default_size = num(root, "font-size").unwrap_or(16.0);
        let mut boxes = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find("<text") {
            rest = &rest[start..];
            let tag_end = rest.find('>').expect("text tag end");
            let tag = &rest[..tag_end];
            let close = rest.find("</text>").expect("text close");
            let text = plain(&rest[tag_end + 1..close]);
            rest = &rest[close..];
            let x = num(tag, "x").unwrap_or(0.0);
            let y = num(tag, "y").unwrap_or(0.0);
            let size = num(tag, "font-size").unwrap_or(default_size);
            let bold = attr(tag, "font-weight") == Some("bold");
            let w = text_width(&text, size, bold);
            let x0 = match attr(tag, "text-anchor") {
                Some("middle") => x - w / 2.0,
                Some("end") => x - w,
                _ => x,
            };
            let (top, bottom) = (y - ASCENT * size, y + DESCENT * size);
            let mut corners = [(x0, top), (x0 + w, top), (x0 + w, bottom), (x0, bottom)];
            if let Some(t) = attr(tag, "transform") {
                let inner = t
                    .strip_prefix("rotate(")
                    .and_then(|t| t.strip_suffix(')'))
                    .expect("only rotate() transforms");
                let v: Vec<f64> = inner
                    .split([' ', ','])
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().expect("rotate argument"))
                    .collect();
                let (a, cx, cy) = (
                    v[0].to_radians(),
                    v.get(1).copied().unwrap_or(0.0),
                    v.get(2).copied().unwrap_or(0.0),
                );
                for c in &mut corners {
                    let (dx, dy) = (c.0 - cx, c.1 - cy);
                    *c = (
                        cx + dx * a.cos() - dy * a.sin(),
                        cy + dx * a.sin() + dy * a.cos(),
                    );
                }
            }
            boxes.push(TextBox { text, corners });
        }
        (boxes, width, height)
    }

    /// Whether two convex quadrilaterals overlap by more than a hair (separating axes).
    fn overlap(a: &[(f64, f64); 4], b: &[(f64, f64); 4]) -> bool {
        const TOUCH: f64 = 0.5;
        for poly in [a, b] {
            for i in 0..4 {
                let (p, q) = (poly[i], poly[(i + 1) % 4]);
                let axis = (q.1 - p.1, p.0 - q.0);
                let len = axis.0.hypot(axis.1);
                if len == 0.0 {
                    continue;
                }
                let project = |pts: &[(f64, f64); 4]| {
                    pts.iter()
                        .map(|c| (c.0 * axis.0 + c.1 * axis.1) / len)
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                            (lo.min(v), hi.max(v))
                        })
                };
                let ((alo, ahi), (blo, bhi)) = (project(a), project(b));
                if ahi <= blo + TOUCH || bhi <= alo + TOUCH {
                    return false;
                }
            }
        }
        true
    }

    /// Panics, naming them, if two texts of `svg` overlap or one leaves the canvas.
    fn assert_legible(name: &str, svg: &str) {
        let (boxes, width, height) = text_boxes(svg);
        assert!(!boxes.is_empty(), "{name}: no text");
        for b in &boxes {
            for &(x, y) in &b.corners {
                assert!(
                    (-0.5..=width + 0.5).contains(&x) && (-0.5..=height + 0.5).contains(&y),
                    "{name}: {:?} leaves the {width}×{height} canvas: {:?}",
                    b.text,
                    b.corners
                );
            }
        }
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                assert!(
                    !overlap(&a.corners, &b.corners),
                    "{name}: {:?} overlaps {:?}\n{:?}\n{:?}",
                    a.text,
                    b.text,
                    a.corners,
                    b.corners
                );
            }
        }
    }

    /// Panics if a fault's (red) line runs through a text.
    fn assert_lines_clear(name: &str, svg: &str) {
        let (boxes, _, _) = text_boxes(svg);
        let mut rest = svg;
        let mut lines = 0;
        while let Some(start) = rest.find("<line") {
            rest = &rest[start..];
            let tag = &rest[..rest.find('>').expect("line tag end")];
            rest = &rest[tag.len()..];
            if attr(tag, "stroke") != Some("red") {
                continue;
            }
            lines += 1;
            let (x, y1, y2) = (
                num(tag, "x1").expect("x1"),
                num(tag, "y1").expect("y1"),
                num(tag, "y2").expect("y2"),
            );
            let line = [(x - 0.5, y1), (x + 0.5, y1), (x + 0.5, y2), (x - 0.5, y2)];
            for b in &boxes {
                assert!(
                    !overlap(&line, &b.corners),
                    "{name}: the fault line at x={x} runs through {:?}",
                    b.text
                );
            }
        }
        assert!(lines > 0, "{name}: no fault lines");
    }

    #[test]
    fn width_estimate_tracks_glyph_widths() {
        let w = |s| text_width(s, 12.0, false);
        assert!(w("iiii") < w("oooo") && w("oooo") < w("mmmm"));
        assert!(w("l.") < w("WW"));
        let avg = w("the quick brown fox jumps over the lazy dog") / 43.0 / 12.0;
        assert!((0.5..0.65).contains(&avg), "{avg}");
        assert!(text_width("Tokyo", 14.0, true) > text_width("Tokyo", 14.0, false));
        assert!((w("New Zealand North") - 12.0 * 10.5).abs() < 12.0 * 1.5);
    }

    #[test]
    fn overlap_check_sees_overlaps() {
        let (boxes, _, _) = text_boxes(
            r#"<svg width="200" height="100" font-size="12"><text x="10" y="20">New Zealand North</text><text x="60" y="24">South Africa North</text><text x="10" y="60" transform="rotate(-90 10 60)">Qatar</text><text x="20" y="90">Qatar</text></svg>"#,
        );
        assert!(overlap(&boxes[0].corners, &boxes[1].corners));
        assert!(!overlap(&boxes[0].corners, &boxes[3].corners));
        assert!(!overlap(&boxes[2].corners, &boxes[3].corners));
        assert!(
            boxes[2]
                .corners
                .iter()
                .all(|c| c.0 <= 13.01 && c.1 <= 60.01)
        );
    }

    #[test]
    fn latency_charts_with_long_region_names_do_not_overlap() {
        let r = report(&LONG_NAMES, &FAULTS);
        let charts = latency_charts(&r);
        assert_eq!(charts.len(), METRICS.len());
        for (name, svg) in &charts {
            assert_legible(name, svg);
            for region in LONG_NAMES {
                assert!(svg.contains(region), "{name} lacks {region}");
            }
        }
    }

    #[test]
    fn failover_chart_with_bunched_faults_and_long_names_does_not_overlap() {
        let r = report(&LONG_NAMES, &FAULTS);
        let svg = failover_chart(&r);
        assert_legible("failover.svg", &svg);
        assert_lines_clear("failover.svg", &svg);
        for (_, description) in FAULTS {
            assert!(
                svg.contains(&esc(description)),
                "the full text of {description:?} is kept"
            );
        }
    }

    #[test]
    fn charts_stay_legible_for_one_to_thirty_regions() {
        for n in [1, 2, 3, 5, 8, 13, 20, 26, 30] {
            let r = report(&MANY_NAMES[..n], &FAULTS[..n.min(FAULTS.len())]);
            for (name, svg) in latency_charts(&r) {
                assert_legible(&format!("{n} regions, {name}"), &svg);
            }
            let failover = failover_chart(&r);
            assert_legible(&format!("{n} regions, failover"), &failover);
            assert_lines_clear(&format!("{n} regions, failover"), &failover);
        }
    }

    #[test]
    fn short_names_stay_horizontal() {
        let r = report(
            &["Sydney", "Tokyo", "Dubai", "Lagos", "NewYork"],
            &FAULTS[..2],
        );
        let charts = latency_charts(&r);
        let svg = &charts[0].1;
        assert!(!svg.contains("rotate("), "{svg}");
        assert_legible("short names", svg);
    }

    #[test]
    fn text_is_escaped() {
        let r = report(&["A&B <x>"], &[(1.0, "cut A&B <x>")]);
        let svg = failover_chart(&r);
        assert!(svg.contains("A&amp;B &lt;x&gt;") && !svg.contains("A&B"));
        assert!(latency_charts(&r)[0].1.contains("A&amp;B &lt;x&gt;"));
    }

    /// Writes sample charts for looking at: `SKYLANE_SVG_OUT=/tmp/charts cargo test -p
    /// skylane-simulations --lib report::svg -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to look at the charts"]
    fn write_sample_charts() {
        const SHORT: [&str; 7] = [
            "Sydney",
            "Singapore",
            "Tokyo",
            "Dubai",
            "Lagos",
            "NewYork",
            "SaoPaulo",
        ];
        // The faults of docs/case-study (whose labels collided at 35–40 s).
        const CASE_STUDY: [(f64, &str); 6] = [
            (5.0, "cut Tokyo–connector"),
            (15.0, "kill London"),
            (25.0, "kill Singapore"),
            (35.0, "restart London"),
            (38.0, "restart Singapore"),
            (40.0, "restore Tokyo–connector"),
        ];
        let dir = std::env::var("SKYLANE_SVG_OUT");
        let dir = dir.as_deref().unwrap_or("/tmp/skylane-charts");
        std::fs::create_dir_all(dir).expect("create the output directory");
        for (tag, names, faults) in [
            ("long", &LONG_NAMES[..], &FAULTS[..]),
            ("many", &MANY_NAMES[..], &FAULTS[..]),
            ("few", &MANY_NAMES[..3], &FAULTS[..]),
            ("one", &MANY_NAMES[..1], &FAULTS[..]),
            ("short", &SHORT[..], &FAULTS[..]),
            ("case-study", &SHORT[..], &CASE_STUDY[..]),
        ] {
            let r = report(names, faults);
            for (name, svg) in latency_charts(&r) {
                std::fs::write(format!("{dir}/{tag}-{name}"), svg).expect("write a chart");
            }
            std::fs::write(format!("{dir}/{tag}-failover.svg"), failover_chart(&r))
                .expect("write a chart");
        }
    }
}
