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

/// Who a figure belongs to: celeriac, then the peers it is compared with, in column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Contender {
    Ours,
    Celery,
    RustyCelery,
    Apalis,
}

impl Contender {
    /// Every contender, in column (and bar) order.
    pub(crate) const ALL: [Contender; 4] = [
        Contender::Ours,
        Contender::Celery,
        Contender::RustyCelery,
        Contender::Apalis,
    ];

    /// The column heading.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Contender::Ours => "celeriac",
            Contender::Celery => "Celery",
            Contender::RustyCelery => "rusty-celery",
            Contender::Apalis => "apalis",
        }
    }

    /// The name in chart legends.
    fn legend(self) -> &'static str {
        match self {
            Contender::Celery => "Python Celery",
            other => other.name(),
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_name(name: &str) -> Option<Contender> {
        Contender::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Debug)]
struct Row {
    broker: String,
    metric: String,
    unit: &'static str,
    /// One value per [`Contender::ALL`].
    values: [Option<f64>; 4],
    better: Better,
}

impl Row {
    fn get(&self, c: Contender) -> Option<f64> {
        self.values[c.index()]
    }
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
        self.record(Contender::Ours, broker, metric, unit, b, v);
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
        self.record(Contender::Celery, broker, metric, unit, b, v);
    }

    /// Records a contender's figure for a metric.
    pub(crate) fn record(
        &mut self,
        who: Contender,
        broker: &str,
        metric: &str,
        unit: &'static str,
        b: Better,
        v: f64,
    ) {
        eprintln!(
            "{broker:>7} {metric:<52} {:<12} {v:>12.2} {unit}",
            who.name()
        );
        self.row(broker, metric, unit, b).values[who.index()] = Some(v);
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
                    values: [None; 4],
                    better,
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    /// The contenders shown: celeriac and Celery always, a peer when it has a figure.
    fn shown(&self) -> Vec<Contender> {
        Contender::ALL
            .into_iter()
            .filter(|&c| {
                matches!(c, Contender::Ours | Contender::Celery)
                    || self.rows.iter().any(|r| r.get(c).is_some())
            })
            .collect()
    }

    /// broker, metric, unit, then for each shown contender its value, and after each other
    /// than celeriac the ratio (how many times better celeriac is).
    fn cells(r: &Row, shown: &[Contender]) -> Vec<String> {
        let f = |v: Option<f64>| match v {
            Some(v) if v >= 100.0 => format!("{v:.0}"),
            Some(v) if v.is_finite() => format!("{v:.2}"),
            _ => "n/a".to_owned(),
        };
        let mut out = vec![r.broker.clone(), r.metric.clone(), r.unit.to_owned()];
        let ours = r.get(Contender::Ours);
        for &c in shown {
            out.push(f(r.get(c)));
            if c != Contender::Ours {
                out.push(ratio(ours, r.get(c), r.better));
            }
        }
        out
    }

    fn headings(shown: &[Contender]) -> Vec<&'static str> {
        let mut h = vec!["broker", "metric", "unit"];
        for &c in shown {
            h.push(c.name());
            if c != Contender::Ours {
                h.push("ratio");
            }
        }
        h
    }

    /// A plain-text table.
    pub(crate) fn text(&self) -> String {
        let shown = self.shown();
        let line = |cells: &[String]| {
            let mut l = format!("{:<7} {:<52} {:<8}", cells[0], cells[1], cells[2]);
            for c in &cells[3..] {
                let _ = write!(l, " {c:>12}");
            }
            l
        };
        let mut out = String::new();
        let heads: Vec<String> = Self::headings(&shown)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let _ = writeln!(out, "{}", line(&heads));
        for r in &self.rows {
            let _ = writeln!(out, "{}", line(&Self::cells(r, &shown)));
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// The table as Markdown (each ratio = how many times better celeriac is than the
    /// contender on its left).
    pub(crate) fn markdown(&self) -> String {
        let shown = self.shown();
        let heads = Self::headings(&shown);
        let mut out = String::new();
        let _ = writeln!(out, "Sizes: {:?}\n", self.sizes);
        let _ = writeln!(out, "| {} |", heads.join(" | "));
        let align: Vec<&str> = heads
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 3 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", Self::cells(r, &shown).join(" | "));
        }
        out.push('\n');
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}

/// How many times better `ours` is than `theirs`.
fn ratio(ours: Option<f64>, theirs: Option<f64>, better: Better) -> String {
    match (ours, theirs, better) {
        (Some(o), Some(c), Better::Higher) if c > 0.0 && o.is_finite() && c.is_finite() => {
            format!("{:.1}×", o / c)
        }
        (Some(o), Some(c), Better::Lower) if o > 0.0 && o.is_finite() && c.is_finite() => {
            format!("{:.1}×", c / o)
        }
        _ => "–".to_owned(),
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
    let specs: [ChartSpec; 6] = [
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
        (
            "realistic",
            "Realistic workload: 1 KiB args, 5 ms awaited I/O, 100 callers",
            true,
            &[(crate::ours::REALISTIC_THROUGHPUT, "")],
        ),
        (
            "realistic-latency",
            "Realistic workload: latency of a call, 100 callers",
            false,
            &[
                ("realistic: call p50", "p50"),
                ("realistic: call p99", "p99"),
            ],
        ),
    ];
    let mut out = Vec::new();
    for (stem, title, higher, metrics) in specs {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| metrics.iter().any(|(m, _)| *m == r.metric))
            .collect();
        // celeriac and Celery always, a peer when it has a bar in this chart.
        let shown: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(|&c| {
                matches!(c, Contender::Ours | Contender::Celery)
                    || mine.iter().any(|r| r.get(c).is_some())
            })
            .collect();
        let mut groups = Vec::new();
        let mut unit = String::new();
        for r in mine {
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
                values: shown.iter().map(|&c| r.get(c)).collect(),
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
                contenders: shown.iter().map(|c| c.legend().to_owned()).collect(),
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
    let split = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_owned())
            .collect()
    };
    // The columns of each contender, from the heading (the last one above a row wins).
    let mut columns: Vec<(Contender, usize)> = vec![(Contender::Ours, 3), (Contender::Celery, 4)];
    let mut rows = Vec::new();
    // The hand-written analysis below the marker may quote other runs' tables.
    let generated = text.split("<!-- analysis -->").next().unwrap_or(text);
    for l in generated.lines().filter(|l| l.starts_with("| ")) {
        let c = split(l);
        if l.starts_with("| broker ") {
            columns = c
                .iter()
                .enumerate()
                .filter_map(|(i, h)| Some((Contender::from_name(h)?, i)))
                .collect();
            continue;
        }
        let Some(unit) = c.get(2).and_then(|u| UNITS.iter().find(|x| *x == u)) else {
            continue;
        };
        let mut values = [None; 4];
        for &(who, i) in &columns {
            values[who.index()] = c.get(i).and_then(|v| number(v));
        }
        rows.push(Row {
            broker: c[0].clone(),
            metric: c[1].clone(),
            unit,
            values,
            better: Better::Higher,
        });
    }
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

    #[test]
    fn peers_get_columns_with_ratios_and_bars() {
        let sizes = crate::Sizes {
            n: 1,
            latency: 1,
            delayed: 1,
            scale: vec![1],
            runs: 1,
            py_n: 1,
            py_latency: 1,
            py_delayed: 1,
        };
        let mut r = Report::new(sizes);
        let m = "throughput, 1 worker, ignore_result (until drained)";
        r.ours("redis", m, "tasks/s", Better::Higher, 20_000.0);
        r.celery("redis", m, "tasks/s", Better::Higher, 1_000.0);
        r.record(
            Contender::Apalis,
            "redis",
            m,
            "tasks/s",
            Better::Higher,
            4_000.0,
        );
        r.ours("redis", "worker RSS idle", "MiB", Better::Lower, 10.0);
        r.record(
            Contender::Apalis,
            "redis",
            "worker RSS idle",
            "MiB",
            Better::Lower,
            5.0,
        );
        let md = r.markdown();
        assert!(
            md.contains("| broker | metric | unit | celeriac | Celery | ratio | apalis | ratio |"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| redis | {m} | tasks/s | 20000 | 1000 | 20.0× | 4000 | 5.0× |"
            )),
            "{md}"
        );
        assert!(
            md.contains("| worker RSS idle | MiB | 10.00 | n/a | – | 5.00 | 0.5× |"),
            "{md}"
        );
        // Redrawn from the Markdown: the peer is a third bar.
        let charts = charts_from_markdown(&md);
        let (stem, t) = &charts[0];
        assert_eq!(*stem, "throughput-ignore-result");
        assert_eq!(t.contenders, ["celeriac", "Python Celery", "apalis"]);
        assert_eq!(
            t.groups[0].values,
            [Some(20_000.0), Some(1_000.0), Some(4_000.0)]
        );
        let mem = &charts[1].1;
        assert_eq!(mem.groups[0].values, [Some(10.0), None, Some(5.0)]);
    }
}
