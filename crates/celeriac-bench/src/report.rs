//! The results table: one row per figure, ours and Celery's side by side with the ratio.

use std::fmt::Write as _;

use crate::Sizes;
use crate::chart::{Chart, Group};

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Better {
    Higher,
    Lower,
}

#[derive(Debug)]
struct Row {
    broker: String,
    metric: String,
    unit: &'static str,
    ours: Option<f64>,
    celery: Option<f64>,
    better: Better,
}

/// Everything measured in one invocation.
#[derive(Debug)]
pub(crate) struct Report {
    sizes: Sizes,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    pub(crate) fn new(sizes: Sizes) -> Report {
        Report {
            sizes,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn note(&mut self, note: &str) {
        eprintln!("note: {note}");
        self.notes.push(note.to_owned());
    }

    /// Records our figure for a metric.
    pub(crate) fn ours(
        &mut self,
        broker: &str,
        metric: &str,
        unit: &'static str,
        b: Better,
        v: f64,
    ) {
        eprintln!("{broker:>7} {metric:<52} ours   {v:>12.2} {unit}");
        self.row(broker, metric, unit, b).ours = Some(v);
    }

    /// Records Celery's figure for a metric.
    pub(crate) fn celery(
        &mut self,
        broker: &str,
        metric: &str,
        unit: &'static str,
        b: Better,
        v: f64,
    ) {
        eprintln!("{broker:>7} {metric:<52} celery {v:>12.2} {unit}");
        self.row(broker, metric, unit, b).celery = Some(v);
    }

    fn row(&mut self, broker: &str, metric: &str, unit: &'static str, better: Better) -> &mut Row {
        let i = match self
            .rows
            .iter()
            .position(|r| r.broker == broker && r.metric == metric)
        {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    broker: broker.to_owned(),
                    metric: metric.to_owned(),
                    unit,
                    ours: None,
                    celery: None,
                    better,
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    fn cells(r: &Row) -> [String; 6] {
        let f = |v: Option<f64>| match v {
            Some(v) if v >= 100.0 => format!("{v:.0}"),
            Some(v) => format!("{v:.2}"),
            None => "n/a".to_owned(),
        };
        let ratio = match (r.ours, r.celery, r.better) {
            (Some(o), Some(c), Better::Higher) if c > 0.0 => format!("{:.1}×", o / c),
            (Some(o), Some(c), Better::Lower) if o > 0.0 => format!("{:.1}×", c / o),
            _ => "–".to_owned(),
        };
        [
            r.broker.clone(),
            r.metric.clone(),
            r.unit.to_owned(),
            f(r.ours),
            f(r.celery),
            ratio,
        ]
    }

    /// A plain-text table.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<7} {:<52} {:<8} {:>12} {:>12} {:>8}",
            "broker", "metric", "unit", "celeriac", "celery", "ratio"
        );
        for r in &self.rows {
            let c = Self::cells(r);
            let _ = writeln!(
                out,
                "{:<7} {:<52} {:<8} {:>12} {:>12} {:>8}",
                c[0], c[1], c[2], c[3], c[4], c[5]
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// The table as Markdown (ratio = how many times better celeriac is).
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Sizes: {:?}\n", self.sizes);
        let _ = writeln!(
            out,
            "| broker | metric | unit | celeriac | Celery | ratio |\n|---|---|---|---:|---:|---:|"
        );
        for r in &self.rows {
            let c = Self::cells(r);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                c[0], c[1], c[2], c[3], c[4], c[5]
            );
        }
        out.push('\n');
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}

/// The charts drawn from the rows: (file stem, chart). Throughput with and without results,
/// sequential latency and worker memory, one group per broker and figure.
pub(crate) fn charts(report: &Report) -> Vec<(&'static str, Chart)> {
    charts_of(&report.rows)
}

/// A chart's file stem, title, whether higher is better, and its metrics with their short
/// labels.
type ChartSpec = (
    &'static str,
    &'static str,
    bool,
    &'static [(&'static str, &'static str)],
);

fn charts_of(rows: &[Row]) -> Vec<(&'static str, Chart)> {
    let specs: [ChartSpec; 4] = [
        (
            "throughput",
            "Throughput, one worker, results stored and read",
            true,
            &[("throughput, 1 worker, results stored and read", "")],
        ),
        (
            "throughput-ignore-result",
            "Throughput, one worker, ignore_result",
            true,
            &[("throughput, 1 worker, ignore_result (until drained)", "")],
        ),
        (
            "latency",
            "Latency of one task at a time, send to result",
            false,
            &[
                ("latency sequential p50", "p50"),
                ("latency sequential p99", "p99"),
            ],
        ),
        (
            "memory",
            "Worker memory (RSS)",
            false,
            &[
                ("worker RSS idle", "idle"),
                ("worker RSS peak while draining", "draining"),
            ],
        ),
    ];
    let mut out = Vec::new();
    for (stem, title, higher, metrics) in specs {
        let mut groups = Vec::new();
        let mut unit = String::new();
        for r in rows {
            let Some((_, what)) = metrics.iter().find(|(m, _)| *m == r.metric) else {
                continue;
            };
            unit = r.unit.to_owned();
            groups.push(Group {
                label: if what.is_empty() {
                    r.broker.clone()
                } else {
                    format!("{} · {what}", r.broker)
                },
                values: vec![r.ours, r.celery],
            });
        }
        if groups.is_empty() {
            continue;
        }
        out.push((
            stem,
            Chart {
                title: title.to_owned(),
                unit,
                higher_is_better: higher,
                contenders: vec!["celeriac".to_owned(), "Python Celery".to_owned()],
                groups,
            },
        ));
    }
    out
}

/// The charts of a results table as `--markdown` wrote it (docs/BENCHMARKS.md): to redraw
/// them without measuring again.
pub(crate) fn charts_from_markdown(text: &str) -> Vec<(&'static str, Chart)> {
    let number = |c: &str| c.trim().replace(',', "").parse::<f64>().ok();
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| broker "))
        .filter_map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            let cell = *c.get(2)?;
            let unit = UNITS.iter().find(|u| **u == cell)?;
            Some(Row {
                broker: c[0].to_owned(),
                metric: c[1].to_owned(),
                unit,
                ours: number(c.get(3)?),
                celery: number(c.get(4)?),
                better: Better::Higher,
            })
        })
        .collect();
    charts_of(&rows)
}

/// The units rows are written in.
const UNITS: [&str; 6] = ["tasks/s", "ms", "µs", "MiB", "s", "tasks"];

/// The median of some runs.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// p50, p90, p99 and max of samples in milliseconds.
pub(crate) fn percentiles(mut v: Vec<f64>) -> [f64; 4] {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return [f64::NAN; 4];
    }
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    [at(0.5), at(0.9), at(0.99), v[v.len() - 1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_redraw_from_the_markdown_table() {
        let md = "| broker | metric | unit | celeriac | Celery | ratio |\n|---|---|---|---:|---:|---:|\n\
| redis | throughput, 1 worker, results stored and read | tasks/s | 21000 | 1500 | 14.0× |\n\
| redis | latency sequential p50 | ms | 0.41 | 2.10 | 5.1× |\n\
| redis | latency sequential p99 | ms | 0.90 | n/a | – |\n\
| sqlite | throughput, 1 worker, results stored and read | tasks/s | 22840 | n/a | – |\n";
        let charts = charts_from_markdown(md);
        let names: Vec<&str> = charts.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["throughput", "latency"]);
        let t = &charts[0].1;
        assert_eq!(t.groups.len(), 2);
        assert_eq!(t.groups[0].values, [Some(21000.0), Some(1500.0)]);
        assert_eq!(t.groups[1].values, [Some(22840.0), None]);
        let l = &charts[1].1;
        assert_eq!(l.groups[1].label, "redis · p99");
        assert_eq!(l.unit, "ms");
    }
}
