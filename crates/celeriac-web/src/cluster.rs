//! What the event stream says about the cluster: workers, recent tasks, counters and time
//! series, kept in memory by the web server (as Flower keeps its state).
//!
//! [`Cluster::apply`] folds one Celery event in; everything else reads. Python and celeriac
//! workers send the same events, so a cluster of either (or both) is seen the same way. Task
//! events need workers started with `-E` (or `enable_events`, which the server sends).

use std::collections::{BTreeMap, HashMap, VecDeque};

use celeriac_core::broadcast::event::{Event, EventKind};
use serde::Serialize;
use serde_json::Value;

use crate::metrics::Histogram;

/// A worker as its events show it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// Node name, e.g. `celery@host`.
    pub hostname: String,
    /// Heard from within two heartbeat intervals, and not gone offline.
    pub online: bool,
    /// Unix time of the last event from it.
    pub last_seen: f64,
    /// Seconds between its heartbeats.
    pub freq: f64,
    /// `py-celery` or `celeriac`.
    pub sw_ident: Option<String>,
    /// Its version.
    pub sw_ver: Option<String>,
    /// Its operating system.
    pub sw_sys: Option<String>,
    /// Its load averages (1, 5, 15 minutes).
    pub loadavg: Vec<f64>,
    /// Tasks running now, by its last heartbeat.
    pub active: u64,
    /// Tasks it has run since it started.
    pub processed: u64,
    /// Its process id.
    pub pid: Option<u64>,
    /// Tasks it succeeded, as seen here.
    pub succeeded: u64,
    /// Tasks it failed, as seen here.
    pub failed: u64,
}

/// A task as its events show it. Arguments and results are the previews the events carry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskView {
    /// Task id.
    pub id: String,
    /// Registered name, once an event named it.
    pub name: Option<String>,
    /// Celery's state: `PENDING`, `RECEIVED`, `STARTED`, `SUCCESS`, `FAILURE`, `RETRY`,
    /// `REVOKED`, `REJECTED`.
    pub state: String,
    /// Preview of the positional arguments.
    pub args: Option<String>,
    /// Preview of the keyword arguments.
    pub kwargs: Option<String>,
    /// Preview of the return value.
    pub result: Option<String>,
    /// The exception, on failure or retry.
    pub exception: Option<String>,
    /// The traceback, on failure or retry.
    pub traceback: Option<String>,
    /// The worker that took it.
    pub worker: Option<String>,
    /// The queue it was sent to (from `task-sent`).
    pub queue: Option<String>,
    /// Times it was retried.
    pub retries: u64,
    /// Unix times of its steps.
    pub sent: Option<f64>,
    /// Received by a worker.
    pub received: Option<f64>,
    /// Started.
    pub started: Option<f64>,
    /// Finished (succeeded, failed, revoked or rejected).
    pub finished: Option<f64>,
    /// Seconds its body ran.
    pub runtime: Option<f64>,
    /// Earliest run time, when delayed.
    pub eta: Option<String>,
    /// Expiry time.
    pub expires: Option<String>,
    /// The task that sent it.
    pub parent_id: Option<String>,
    /// The first task of its workflow.
    pub root_id: Option<String>,
    /// Tasks it sent, as seen here.
    pub children: Vec<String>,
    /// Unix time of the last event about it.
    pub updated: f64,
    /// Order of the last update (larger is later), for paging.
    pub seq: u64,
}

/// Per-interval counts for the charts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bucket {
    /// Unix time of the interval's start.
    pub at: i64,
    /// Tasks succeeded in it.
    pub succeeded: u64,
    /// Tasks failed in it.
    pub failed: u64,
    /// Tasks retried in it.
    pub retried: u64,
    /// Sum of the runtimes of the finished tasks, seconds.
    pub runtime_sum: f64,
    /// Finished tasks with a runtime.
    pub runtime_count: u64,
    /// Sum of the waits (sent or received → started), seconds.
    pub wait_sum: f64,
    /// Started tasks with a known wait.
    pub wait_count: u64,
    /// Queue depths sampled in it (ready messages).
    pub queues: BTreeMap<String, u64>,
}

/// Seconds per chart bucket.
pub const BUCKET_SECS: i64 = 5;
/// Buckets kept: one hour.
pub const BUCKETS: usize = 720;
/// Distinct task names counted in the metrics; later names are counted as `other`.
const MAX_NAMES: usize = 1000;

/// Counters and histograms for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// (task name, state) → count.
    pub(crate) tasks: BTreeMap<(String, String), u64>,
    /// Task name → runtime histogram.
    pub(crate) runtime: BTreeMap<String, Histogram>,
    /// Task name → wait histogram.
    pub(crate) wait: BTreeMap<String, Histogram>,
    /// Events read.
    pub(crate) events: u64,
}

/// The cluster's state, fed by events; see the [module docs](self).
#[derive(Debug)]
pub struct Cluster {
    workers: BTreeMap<String, WorkerView>,
    tasks: HashMap<String, TaskView>,
    /// (seq, id) in update order; stale pairs (a task updated again later) are skipped.
    order: VecDeque<(u64, String)>,
    max_tasks: usize,
    seq: u64,
    pub(crate) counters: Counters,
    buckets: VecDeque<Bucket>,
    /// Queue → latest stats sample.
    pub(crate) queues: BTreeMap<String, celeriac_core::QueueStats>,
}

impl Cluster {
    /// An empty state keeping at most `max_tasks` tasks (the least recently updated go first).
    pub fn new(max_tasks: usize) -> Self {
        Cluster {
            workers: BTreeMap::new(),
            tasks: HashMap::new(),
            order: VecDeque::new(),
            max_tasks: max_tasks.max(1),
            seq: 0,
            counters: Counters::default(),
            buckets: VecDeque::new(),
            queues: BTreeMap::new(),
        }
    }

    /// Folds `event` in; returns the id of the task it changed, if any.
    pub fn apply(&mut self, event: &Event) -> Option<String> {
        self.counters.events += 1;
        let now = event.timestamp();
        match event.kind() {
            EventKind::WorkerOnline | EventKind::WorkerHeartbeat | EventKind::WorkerOffline => {
                self.apply_worker(event, now);
                None
            }
            kind if kind.is_task() => {
                // Task events from a worker (not `task-sent` from a client) say it is alive.
                if kind != EventKind::TaskSent {
                    let w = self.worker_entry(event.hostname(), now);
                    w.last_seen = w.last_seen.max(now);
                    w.online = true;
                }
                self.apply_task(event, kind, now)
            }
            _ => None,
        }
    }

    /// The worker named `host`, made when first heard of (a task event names its worker
    /// too, so a worker is seen before its next heartbeat).
    fn worker_entry(&mut self, host: &str, now: f64) -> &mut WorkerView {
        self.workers
            .entry(host.to_owned())
            .or_insert_with(|| WorkerView {
                hostname: host.to_owned(),
                online: true,
                last_seen: now,
                freq: 2.0,
                sw_ident: None,
                sw_ver: None,
                sw_sys: None,
                loadavg: Vec::new(),
                active: 0,
                processed: 0,
                pid: None,
                succeeded: 0,
                failed: 0,
            })
    }

    fn apply_worker(&mut self, e: &Event, now: f64) {
        let w = self.worker_entry(e.hostname(), now);
        w.last_seen = w.last_seen.max(now);
        w.online = e.kind() != EventKind::WorkerOffline;
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
        if let Some(f) = e.get("freq").and_then(Value::as_f64) {
            w.freq = f;
        }
        w.sw_ident = text("sw_ident").or(w.sw_ident.take());
        w.sw_ver = text("sw_ver").or(w.sw_ver.take());
        w.sw_sys = text("sw_sys").or(w.sw_sys.take());
        if let Some(l) = e.get("loadavg").and_then(Value::as_array) {
            w.loadavg = l.iter().filter_map(Value::as_f64).collect();
        }
        if let Some(n) = e.get("active").and_then(Value::as_u64) {
            w.active = n;
        }
        if let Some(n) = e.get("processed").and_then(Value::as_u64) {
            w.processed = n;
        }
        if let Some(p) = e.get("pid").and_then(Value::as_u64) {
            w.pid = Some(p);
        }
    }

    fn apply_task(&mut self, e: &Event, kind: EventKind, now: f64) -> Option<String> {
        let id = e.uuid()?.to_owned();
        self.seq += 1;
        let seq = self.seq;
        let text = |k: &str| {
            e.get(k).and_then(|v| match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            })
        };
        let t = self.tasks.entry(id.clone()).or_insert_with(|| TaskView {
            id: id.clone(),
            state: "PENDING".to_owned(),
            ..TaskView::default()
        });
        if let Some(n) = text("name") {
            t.name = Some(n);
        }
        let state = match kind {
            EventKind::TaskSent => {
                t.sent = Some(now);
                t.queue = text("queue").or(t.queue.take());
                "PENDING"
            }
            EventKind::TaskReceived => {
                t.received = Some(now);
                t.worker = Some(e.hostname().to_owned());
                "RECEIVED"
            }
            EventKind::TaskStarted => {
                t.started = Some(now);
                t.worker = Some(e.hostname().to_owned());
                "STARTED"
            }
            EventKind::TaskSucceeded => {
                t.finished = Some(now);
                t.result = text("result");
                "SUCCESS"
            }
            EventKind::TaskFailed => {
                t.finished = Some(now);
                t.exception = text("exception");
                t.traceback = text("traceback");
                "FAILURE"
            }
            EventKind::TaskRetried => {
                t.exception = text("exception");
                t.traceback = text("traceback");
                t.retries += 1;
                "RETRY"
            }
            EventKind::TaskRevoked => {
                t.finished = Some(now);
                "REVOKED"
            }
            EventKind::TaskRejected => {
                t.finished = Some(now);
                "REJECTED"
            }
            _ => return None,
        };
        // A late event of an earlier step (events of one task may arrive out of order
        // across batches) does not move a finished task back.
        if !is_final(&t.state) || is_final(state) {
            t.state = state.to_owned();
        }
        for (field, key) in [
            (&mut t.args, "args"),
            (&mut t.kwargs, "kwargs"),
            (&mut t.eta, "eta"),
            (&mut t.expires, "expires"),
            (&mut t.parent_id, "parent_id"),
            (&mut t.root_id, "root_id"),
        ] {
            if let Some(v) = text(key) {
                *field = Some(v);
            }
        }
        if let Some(r) = e.get("retries").and_then(Value::as_u64) {
            t.retries = t.retries.max(r);
        }
        if let Some(r) = e.get("runtime").and_then(Value::as_f64) {
            t.runtime = Some(r);
        }
        t.updated = now;
        t.seq = seq;
        let name = t.name.clone().unwrap_or_else(|| "unknown".to_owned());
        let parent = t.parent_id.clone();
        let worker = t.worker.clone();
        let runtime = t
            .runtime
            .filter(|_| matches!(kind, EventKind::TaskSucceeded | EventKind::TaskFailed));
        let wait = (kind == EventKind::TaskStarted)
            .then(|| t.sent.or(t.received).map(|from| (now - from).max(0.0)))
            .flatten();
        self.order.push_back((seq, id.clone()));
        if let Some(p) = parent
            && let Some(parent) = self.tasks.get_mut(&p)
            && !parent.children.contains(&id)
        {
            parent.children.push(id.clone());
        }
        self.count(&name, state, runtime, wait, now);
        if let Some(w) = worker.and_then(|w| self.workers.get_mut(&w)) {
            match kind {
                EventKind::TaskSucceeded => w.succeeded += 1,
                EventKind::TaskFailed => w.failed += 1,
                _ => {}
            }
        }
        self.evict();
        Some(id)
    }

    fn count(
        &mut self,
        name: &str,
        state: &str,
        runtime: Option<f64>,
        wait: Option<f64>,
        now: f64,
    ) {
        let names = self.counters.runtime.len().max(self.counters.wait.len());
        let known = self.counters.tasks.keys().any(|(n, _)| n == name);
        let name = if known || names < MAX_NAMES {
            name.to_owned()
        } else {
            "other".to_owned()
        };
        *self
            .counters
            .tasks
            .entry((name.clone(), state.to_owned()))
            .or_default() += 1;
        let bucket = self.bucket(now);
        match state {
            "SUCCESS" => bucket.succeeded += 1,
            "FAILURE" => bucket.failed += 1,
            "RETRY" => bucket.retried += 1,
            _ => {}
        }
        if let Some(r) = runtime {
            bucket.runtime_sum += r;
            bucket.runtime_count += 1;
            self.counters
                .runtime
                .entry(name.clone())
                .or_default()
                .observe(r);
        }
        if let Some(w) = wait {
            let bucket = self.bucket(now);
            bucket.wait_sum += w;
            bucket.wait_count += 1;
            self.counters.wait.entry(name).or_default().observe(w);
        }
    }

    /// The chart bucket of time `now`, made (and old ones dropped) as needed.
    fn bucket(&mut self, now: f64) -> &mut Bucket {
        let at = (now as i64).div_euclid(BUCKET_SECS) * BUCKET_SECS;
        let last = self.buckets.back().map(|b| b.at);
        if last.is_none_or(|l| at > l) {
            self.buckets.push_back(Bucket {
                at,
                ..Bucket::default()
            });
            while self.buckets.len() > BUCKETS {
                self.buckets.pop_front();
            }
        }
        // An event older than the newest bucket (a late batch) counts in its own bucket
        // when that is still kept, else in the oldest.
        let i = self.buckets.iter().rposition(|b| b.at <= at).unwrap_or(0);
        &mut self.buckets[i]
    }

    fn evict(&mut self) {
        while self.tasks.len() > self.max_tasks {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.tasks.get(&id).is_some_and(|t| t.seq == seq) {
                self.tasks.remove(&id);
            }
        }
        // Stale pairs pile up when the same tasks update often: compact now and then.
        if self.order.len() > self.max_tasks.saturating_mul(4).max(1024) {
            let tasks = &self.tasks;
            self.order
                .retain(|(seq, id)| tasks.get(id).is_some_and(|t| t.seq == *seq));
        }
    }

    /// Records a sample of queue depths taken at `now` (Unix seconds).
    pub fn sample_queues(&mut self, now: f64, stats: BTreeMap<String, celeriac_core::QueueStats>) {
        let bucket = self.bucket(now);
        bucket.queues = stats.iter().map(|(q, s)| (q.clone(), s.ready)).collect();
        self.queues = stats;
    }

    /// Marks workers silent for more than two heartbeat intervals as offline (Celery's rule).
    pub fn expire_workers(&mut self, now: f64) {
        for w in self.workers.values_mut() {
            if w.online && now - w.last_seen > w.freq * 2.0 + 1.0 {
                w.online = false;
            }
        }
    }

    /// The workers, by name.
    pub fn workers(&self) -> Vec<WorkerView> {
        self.workers.values().cloned().collect()
    }

    /// One task, if it is still kept.
    pub fn task(&self, id: &str) -> Option<&TaskView> {
        self.tasks.get(id)
    }

    /// How many tasks are kept.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks matching `filter`, most recently updated first.
    pub fn tasks(&self, filter: &TaskFilter) -> Vec<TaskView> {
        let mut out = Vec::new();
        for (seq, id) in self.order.iter().rev() {
            if out.len() >= filter.limit {
                break;
            }
            if filter.before.is_some_and(|b| *seq >= b) {
                continue;
            }
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            if t.seq != *seq || !filter.matches(t) {
                continue;
            }
            out.push(t.clone());
        }
        out
    }

    /// The chart buckets, oldest first.
    pub fn buckets(&self) -> impl Iterator<Item = &Bucket> {
        self.buckets.iter()
    }

    /// Totals by state over the tasks counted (not only those kept).
    pub fn totals(&self) -> BTreeMap<String, u64> {
        let mut t = BTreeMap::new();
        for ((_, state), n) in &self.counters.tasks {
            *t.entry(state.clone()).or_default() += n;
        }
        t
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "SUCCESS" | "FAILURE" | "REVOKED" | "REJECTED")
}

/// Which tasks [`Cluster::tasks`] returns.
#[derive(Debug, Clone)]
pub struct TaskFilter {
    /// Only this state.
    pub state: Option<String>,
    /// Only this task name.
    pub name: Option<String>,
    /// Only tasks taken by this worker.
    pub worker: Option<String>,
    /// Only tasks whose id, name, arguments, result or exception contain this text.
    pub search: Option<String>,
    /// Only tasks updated before this sequence number (the next page).
    pub before: Option<u64>,
    /// At most this many.
    pub limit: usize,
}

impl Default for TaskFilter {
    fn default() -> Self {
        TaskFilter {
            state: None,
            name: None,
            worker: None,
            search: None,
            before: None,
            limit: 100,
        }
    }
}

impl TaskFilter {
    fn matches(&self, t: &TaskView) -> bool {
        if self
            .state
            .as_ref()
            .is_some_and(|s| !s.eq_ignore_ascii_case(&t.state))
        {
            return false;
        }
        if self
            .name
            .as_ref()
            .is_some_and(|n| t.name.as_ref() != Some(n))
        {
            return false;
        }
        if self
            .worker
            .as_ref()
            .is_some_and(|w| t.worker.as_ref() != Some(w))
        {
            return false;
        }
        if let Some(q) = &self.search {
            let q = q.to_lowercase();
            let hit =
                |s: &Option<String>| s.as_ref().is_some_and(|s| s.to_lowercase().contains(&q));
            if !(t.id.contains(&q)
                || hit(&t.name)
                || hit(&t.args)
                || hit(&t.kwargs)
                || hit(&t.result)
                || hit(&t.exception))
            {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_event(kind: EventKind, id: &str, at: f64) -> Event {
        let received = kind == EventKind::TaskReceived;
        let succeeded = kind == EventKind::TaskSucceeded;
        let mut e = Event::new(kind, "w1@h", 1)
            .with("uuid", id)
            .with("timestamp", at);
        if received {
            e = e.with("name", "tasks.add").with("args", "(1, 2)");
        }
        if succeeded {
            e = e.with("result", "3").with("runtime", 0.25);
        }
        e
    }

    #[test]
    fn a_task_moves_through_its_states_and_is_counted() {
        let mut c = Cluster::new(10);
        c.apply(&Event::new(EventKind::WorkerOnline, "w1@h", 1).with("timestamp", 100.0));
        for (kind, at) in [
            (EventKind::TaskReceived, 100.0),
            (EventKind::TaskStarted, 100.5),
            (EventKind::TaskSucceeded, 101.0),
        ] {
            assert_eq!(c.apply(&task_event(kind, "t1", at)).as_deref(), Some("t1"));
        }
        let t = c.task("t1").unwrap();
        assert_eq!(t.state, "SUCCESS");
        assert_eq!(t.name.as_deref(), Some("tasks.add"));
        assert_eq!(t.args.as_deref(), Some("(1, 2)"));
        assert_eq!(t.result.as_deref(), Some("3"));
        assert_eq!(t.runtime, Some(0.25));
        assert_eq!(c.totals()["SUCCESS"], 1);
        assert_eq!(c.workers()[0].succeeded, 1);
        let h = &c.counters.wait["tasks.add"];
        assert_eq!((h.count, h.sum), (1, 0.5));
        // A late `started` does not move a finished task back.
        c.apply(&task_event(EventKind::TaskStarted, "t1", 100.6));
        assert_eq!(c.task("t1").unwrap().state, "SUCCESS");
    }

    #[test]
    fn the_oldest_tasks_go_first_and_filters_page_newest_first() {
        let mut c = Cluster::new(3);
        for i in 0..5 {
            c.apply(&task_event(
                EventKind::TaskReceived,
                &format!("t{i}"),
                100.0 + f64::from(i),
            ));
        }
        // t1 updated again: it stays, t2 goes next.
        c.apply(&task_event(EventKind::TaskSucceeded, "t4", 110.0));
        assert_eq!(c.task_count(), 3);
        assert!(c.task("t0").is_none() && c.task("t1").is_none());
        let all = c.tasks(&TaskFilter::default());
        let ids: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t4", "t3", "t2"]);
        let page = c.tasks(&TaskFilter {
            before: Some(all[0].seq),
            limit: 1,
            ..TaskFilter::default()
        });
        assert_eq!(page[0].id, "t3");
        let done = c.tasks(&TaskFilter {
            state: Some("success".into()),
            ..TaskFilter::default()
        });
        assert_eq!(done.len(), 1);
        let found = c.tasks(&TaskFilter {
            search: Some("T3".into()),
            ..TaskFilter::default()
        });
        assert_eq!(found.len(), 1, "ids are searched case-insensitively");
    }

    #[test]
    fn silent_and_offline_workers_are_not_online() {
        let mut c = Cluster::new(10);
        c.apply(
            &Event::new(EventKind::WorkerHeartbeat, "a@h", 1)
                .with("timestamp", 100.0)
                .with("freq", 2.0),
        );
        c.apply(&Event::new(EventKind::WorkerHeartbeat, "b@h", 1).with("timestamp", 100.0));
        c.apply(&Event::new(EventKind::WorkerOffline, "b@h", 2).with("timestamp", 101.0));
        c.expire_workers(104.0);
        let w = c.workers();
        assert!(w[0].online && !w[1].online);
        c.expire_workers(106.0);
        assert!(!c.workers()[0].online);
    }
}
