//! The results table: one row per figure, ours and Celery's side by side with the ratio.

use std::fmt::Write as _;

use crate::Sizes;

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
