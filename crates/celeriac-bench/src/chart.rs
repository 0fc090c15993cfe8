//! The results as SVG bar charts: one group of bars per row (a broker's figure), one bar per
//! contender, drawn to one linear scale from zero so that bar lengths compare honestly.
//!
//! Plain SVG text (no dependency): horizontal bars, the value written after each bar, a legend
//! on top. `scripts/bench` embeds the files in docs/BENCHMARKS.md and the README.

use std::fmt::Write as _;

/// One group of bars: a label and each contender's value (`None`: not measured).
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) label: String,
    pub(crate) values: Vec<Option<f64>>,
}

/// A chart: title, unit, contenders (names, in bar order) and groups.
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) unit: String,
    /// Whether longer bars are better (throughput) or worse (latency, memory): said in the
    /// subtitle.
    pub(crate) higher_is_better: bool,
    pub(crate) contenders: Vec<String>,
    pub(crate) groups: Vec<Group>,
}

/// Bar colours by contender position: celeriac first, then Celery, then peers (a
/// colour-blind-safe palette).
const COLOURS: [&str; 6] = [
    "#1b7837", "#762a83", "#2166ac", "#e08214", "#b2182b", "#4d4d4d",
];

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 250.0;
const VALUE_W: f64 = 90.0;
const BAR_H: f64 = 14.0;
const BAR_GAP: f64 = 3.0;
const GROUP_GAP: f64 = 12.0;
const TOP: f64 = 64.0;

impl Chart {
    /// The chart as an SVG document.
    pub(crate) fn svg(&self) -> String {
        let n = self.contenders.len().max(1) as f64;
        let group_h = n * BAR_H + (n - 1.0) * BAR_GAP;
        let height = TOP + self.groups.len() as f64 * (group_h + GROUP_GAP) + 16.0;
        let max = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().flatten())
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let scale = if max > 0.0 {
            (WIDTH - LABEL_W - VALUE_W - 10.0) / max
        } else {
            0.0
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
        let _ = writeln!(
            s,
            r##"<text x="10" y="20" font-size="15" font-weight="600" fill="#222">{}</text>"##,
            esc(&self.title)
        );
        let better = if self.higher_is_better {
            "longer is better"
        } else {
            "shorter is better"
        };
        let _ = writeln!(
            s,
            r##"<text x="10" y="38" fill="#555">{} ({better})</text>"##,
            esc(&self.unit)
        );
        let mut x = LABEL_W;
        for (i, c) in self.contenders.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="46" width="12" height="12" fill="{colour}"/><text x="{}" y="56" fill="#222">{}</text>"##,
                x + 16.0,
                esc(c)
            );
            x += 24.0 + 7.0 * c.chars().count() as f64;
        }
        let mut y = TOP;
        for g in &self.groups {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#222">{}</text>"##,
                LABEL_W - 8.0,
                y + group_h / 2.0 + 4.0,
                esc(&g.label)
            );
            for (i, v) in g.values.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                let by = y + i as f64 * (BAR_H + BAR_GAP);
                match v {
                    Some(v) if v.is_finite() => {
                        let w = (v * scale).max(1.0);
                        let _ = writeln!(
                            s,
                            r##"<rect x="{LABEL_W}" y="{by}" width="{w:.1}" height="{BAR_H}" fill="{colour}"><title>{}: {}</title></rect><text x="{:.1}" y="{}" fill="#333">{}</text>"##,
                            esc(self.contenders.get(i).map_or("", String::as_str)),
                            number(*v),
                            LABEL_W + w + 4.0,
                            by + BAR_H - 3.0,
                            number(*v)
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{}" y="{}" fill="#999">n/a</text>"##,
                            LABEL_W + 2.0,
                            by + BAR_H - 3.0
                        );
                    }
                }
            }
            y += group_h + GROUP_GAP;
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A value as the table writes it: whole above 100, two decimals below, thousands apart.
fn number(v: f64) -> String {
    if v >= 100.0 {
        let whole = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{v:.2}")
    }
}

/// Text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "Throughput <results>".into(),
            unit: "tasks/s".into(),
            higher_is_better: true,
            contenders: vec!["celeriac".into(), "Celery".into()],
            groups: vec![
                Group {
                    label: "redis".into(),
                    values: vec![Some(20_000.0), Some(1_000.0)],
                },
                Group {
                    label: "amqp".into(),
                    values: vec![Some(5_000.0), None],
                },
            ],
        }
    }

    #[test]
    fn bars_share_one_scale_from_zero_and_missing_values_say_so() {
        let svg = chart().svg();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        let widths: Vec<f64> = svg
            .split("<rect x=\"250\" ")
            .skip(1)
            .filter_map(|r| r.split('>').next())
            .filter(|r| r.contains("height=\"14\""))
            .filter_map(|r| r.split("width=\"").nth(1))
            .filter_map(|r| r.split('"').next())
            .filter_map(|w| w.parse().ok())
            .collect();
        // redis ours, redis Celery, amqp ours: 20k is the longest, the rest in proportion.
        assert_eq!(widths.len(), 3, "{svg}");
        assert!((widths[0] / widths[1] - 20.0).abs() < 0.1, "{widths:?}");
        assert!((widths[0] / widths[2] - 4.0).abs() < 0.01, "{widths:?}");
        assert!(svg.contains(">20,000<") && svg.contains(">n/a<"), "{svg}");
        assert!(svg.contains("Throughput &lt;results&gt;"));
    }

    #[test]
    fn numbers_are_written_as_in_the_table() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(999.6), "1,000");
        assert_eq!(number(0.4149), "0.41");
    }
}
