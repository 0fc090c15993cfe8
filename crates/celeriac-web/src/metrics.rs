//! `/metrics` in Prometheus' text format (version 0.0.4), written by hand: a few counters,
//! gauges and histograms do not need a metrics library.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `celeriac_tasks_total` | counter | `name`, `state` (`RECEIVED`, `STARTED`, `SUCCESS`, `FAILURE`, `RETRY`, `REVOKED`, `REJECTED`, `PENDING` for `task-sent`) |
//! | `celeriac_task_runtime_seconds` | histogram | `name` |
//! | `celeriac_task_wait_seconds` | histogram | `name`: sent (or received) → started |
//! | `celeriac_queue_messages` | gauge | `queue`, `state` (`ready`, `delayed`, `unacked`) |
//! | `celeriac_dead_letters` | gauge | `queue` (the queue the letters came from) |
//! | `celeriac_workers_up` | gauge | |
//! | `celeriac_worker_up` | gauge | `hostname` |
//! | `celeriac_worker_active_tasks` | gauge | `hostname` |
//! | `celeriac_worker_processed_tasks` | gauge | `hostname` |
//! | `celeriac_events_total` | counter | |
//! | `celeriac_tracked_tasks` | gauge | tasks kept in memory |

use std::fmt::Write as _;

use crate::cluster::Cluster;

/// Upper bounds of the histogram buckets, seconds (Prometheus' defaults, plus 30 and 60).
const BOUNDS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram with [`BOUNDS`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    /// Observations at or below each bound (not cumulative).
    buckets: [u64; BOUNDS.len()],
    /// All observations.
    pub(crate) count: u64,
    /// Their sum.
    pub(crate) sum: f64,
}

impl Histogram {
    pub(crate) fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if let Some(i) = BOUNDS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// A label value escaped as the text format wants (`\`, `"` and newlines).
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    series: &std::collections::BTreeMap<String, Histogram>,
) {
    header(out, name, "histogram", help);
    for (task, h) in series {
        let task = label(task);
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(h.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{name=\"{task}\",le=\"{}\"}} {cumulative}",
                float(*bound)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{name=\"{task}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{name=\"{task}\"}} {}", float(h.sum));
        let _ = writeln!(out, "{name}_count{{name=\"{task}\"}} {}", h.count);
    }
}

/// The exposition of `cluster`, with `dead` = (queue, dead letters) counts.
pub(crate) fn render(cluster: &Cluster, dead: &[(String, u64)]) -> String {
    let mut out = String::new();
    let c = &cluster.counters;
    header(
        &mut out,
        "celeriac_tasks_total",
        "counter",
        "Task events seen, by task name and the state they moved the task to.",
    );
    for ((name, state), n) in &c.tasks {
        let _ = writeln!(
            out,
            "celeriac_tasks_total{{name=\"{}\",state=\"{}\"}} {n}",
            label(name),
            label(state)
        );
    }
    histogram(
        &mut out,
        "celeriac_task_runtime_seconds",
        "How long task bodies ran.",
        &c.runtime,
    );
    histogram(
        &mut out,
        "celeriac_task_wait_seconds",
        "Time from sent (or received, without task-sent events) to started.",
        &c.wait,
    );
    header(
        &mut out,
        "celeriac_queue_messages",
        "gauge",
        "Messages in each queue, by state, at the last sample.",
    );
    for (queue, s) in &cluster.queues {
        for (state, n) in [
            ("ready", s.ready),
            ("delayed", s.delayed),
            ("unacked", s.unacked),
        ] {
            let _ = writeln!(
                out,
                "celeriac_queue_messages{{queue=\"{}\",state=\"{state}\"}} {n}",
                label(queue)
            );
        }
    }
    header(
        &mut out,
        "celeriac_dead_letters",
        "gauge",
        "Messages in each queue's dead-letter queue.",
    );
    for (queue, n) in dead {
        let _ = writeln!(
            out,
            "celeriac_dead_letters{{queue=\"{}\"}} {n}",
            label(queue)
        );
    }
    let workers = cluster.workers();
    header(
        &mut out,
        "celeriac_workers_up",
        "gauge",
        "Workers heard from within two heartbeats.",
    );
    let _ = writeln!(
        out,
        "celeriac_workers_up {}",
        workers.iter().filter(|w| w.online).count()
    );
    header(
        &mut out,
        "celeriac_worker_up",
        "gauge",
        "1 while the worker is online.",
    );
    for w in &workers {
        let _ = writeln!(
            out,
            "celeriac_worker_up{{hostname=\"{}\"}} {}",
            label(&w.hostname),
            u8::from(w.online)
        );
    }
    header(
        &mut out,
        "celeriac_worker_active_tasks",
        "gauge",
        "Tasks running on the worker, by its last heartbeat.",
    );
    for w in &workers {
        let _ = writeln!(
            out,
            "celeriac_worker_active_tasks{{hostname=\"{}\"}} {}",
            label(&w.hostname),
            w.active
        );
    }
    header(
        &mut out,
        "celeriac_worker_processed_tasks",
        "gauge",
        "Tasks the worker has run since it started, by its last heartbeat.",
    );
    for w in &workers {
        let _ = writeln!(
            out,
            "celeriac_worker_processed_tasks{{hostname=\"{}\"}} {}",
            label(&w.hostname),
            w.processed
        );
    }
    header(
        &mut out,
        "celeriac_events_total",
        "counter",
        "Events read from the broker.",
    );
    let _ = writeln!(out, "celeriac_events_total {}", c.events);
    header(
        &mut out,
        "celeriac_tracked_tasks",
        "gauge",
        "Tasks kept in memory for the dashboard.",
    );
    let _ = writeln!(out, "celeriac_tracked_tasks {}", cluster.task_count());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let mut h = Histogram::default();
        for v in [0.001, 0.2, 0.2, 100.0, f64::NAN] {
            h.observe(v);
        }
        let mut series = std::collections::BTreeMap::new();
        series.insert("a\"b".to_owned(), h);
        let mut out = String::new();
        histogram(&mut out, "x", "help", &series);
        assert!(
            out.contains("x_bucket{name=\"a\\\"b\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{name=\"a\\\"b\",le=\"0.25\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{name=\"a\\\"b\",le=\"60\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{name=\"a\\\"b\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_count{name=\"a\\\"b\"} 4\n"), "{out}");
    }
}
