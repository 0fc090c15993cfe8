//! Events (Celery's `celeryev`): what the worker tells monitors (`celery events`, Flower,
//! `my-app events`, the dashboard).
//!
//! - Worker events always: `worker-online` at start, `worker-heartbeat` every
//!   [`WorkerOptions::heartbeat_interval`](crate::WorkerOptions::heartbeat_interval),
//!   `worker-offline` at the end (monitors mark a worker offline after two silent intervals).
//! - Task events only when enabled (`-E`, [`WorkerOptions::task_events`](crate::WorkerOptions::task_events),
//!   or remote control's `enable_events`): `task-received` and the outcome (`task-succeeded`,
//!   `task-failed`, `task-retried`, `task-rejected`, `task-revoked`) from a delivery layer,
//!   `task-started` from a run layer. Results and exceptions are Python reprs (≤1024
//!   characters), as Celery sends them.
//!
//! # A key design decision: task events travel in batches, off the task's path
//!
//! A layer only queues an event (a channel send, no I/O); one sender task publishes what has
//! queued as one `task.multi` message of up to 24 events, as Celery's worker does, waiting at
//! most [`FLUSH_AFTER`] for a batch to fill. So events cost each task a few allocations, not a
//! broker round trip, and a broker that is slow or down delays events, never tasks (events
//! that cannot be published are dropped with a warning, as Celery drops them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use celeriac_core::broadcast::event::{Event, EventKind, now_unix, py_repr, utcoffset_hours_west};
use celeriac_core::broadcast::{Broadcasted, Clock};
use celeriac_core::meta::RemoteError;
use celeriac_core::{BoxFuture, DynBroker, TaskState};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::tracker::{REPR_MAX, Tracker};

/// The most task events one message carries.
pub(crate) const BATCH: usize = 24;
/// The longest a task event waits for its batch to fill.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(20);

/// Sends one worker's events.
#[derive(Debug)]
pub(crate) struct Events {
    hostname: String,
    clock: Arc<Clock>,
    task_events: AtomicBool,
    /// The broker carries events.
    has: bool,
    /// This process's id, read once (each read is a system call, and it went into every
    /// task event: the largest single part of their cost in a profile).
    pid: u32,
    /// Task events to publish, as JSON text; taken away by `close`.
    queue: std::sync::Mutex<Option<mpsc::UnboundedSender<String>>>,
    broker: DynBroker,
}

impl Events {
    /// Events of worker `hostname` through `broker`'s broadcast channels, when it has them;
    /// task events on from the start when `task_events`. Returns the sender and the future
    /// that publishes queued task events (spawn it; it ends when the sender is dropped).
    pub(crate) fn new(
        broker: DynBroker,
        hostname: String,
        clock: Arc<Clock>,
        task_events: bool,
    ) -> (
        Arc<Events>,
        Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        let has = broker.broadcast().is_some();
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Arc::new(Events {
            hostname: hostname.clone(),
            clock,
            task_events: AtomicBool::new(task_events && has),
            has,
            pid: std::process::id(),
            queue: std::sync::Mutex::new(has.then_some(tx)),
            broker: broker.clone(),
        });
        let publisher = has.then(|| publish_batches(broker, hostname, rx));
        (events, publisher)
    }

    /// Whether the broker carries events at all.
    pub(crate) fn available(&self) -> bool {
        self.has
    }

    /// Stops taking task events; the publisher sends what was queued and ends.
    pub(crate) fn close(&self) {
        self.task_events.store(false, Ordering::Release);
        drop(self.lock().take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<String>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether task events are on.
    pub(crate) fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Acquire)
    }

    /// Turns task events on or off; returns whether that changed anything.
    pub(crate) fn set_task_events(&self, on: bool) -> bool {
        self.available() && self.task_events.swap(on, Ordering::AcqRel) != on
    }

    /// An event of `kind` from this worker, clock forwarded.
    pub(crate) fn event(&self, kind: EventKind) -> Event {
        Event::new(kind, &self.hostname, self.clock.forward())
    }

    /// Queues task event `kind` of task `uuid`, with its own `fields`, for the next batch.
    fn queue(&self, kind: EventKind, uuid: &str, fields: Fields<'_>) {
        if self.lock().is_none() {
            return;
        }
        let e = TaskEvent {
            kind: kind.as_str(),
            hostname: &self.hostname,
            timestamp: now_unix(),
            utcoffset: utcoffset_hours_west(),
            pid: self.pid,
            clock: self.clock.forward(),
            uuid,
            fields,
        };
        match serde_json::to_string(&e) {
            Ok(text) => {
                // Sent under the lock: an unbounded send only pushes, and it saves cloning
                // (and dropping) the sender for every event.
                if let Some(q) = self.lock().as_ref() {
                    let _ = q.send(text);
                }
            }
            Err(err) => tracing::warn!(error = %err, event = %kind, "cannot encode a task event"),
        }
    }

    /// Publishes a worker event now, on its own (`worker-online`, `worker-heartbeat`, ...).
    pub(crate) async fn send_now(&self, e: Event) {
        let Some(b) = self.broker.broadcast() else {
            return;
        };
        let kind = e.kind();
        let m = Broadcasted::new(kind.routing_key(), self.headers(), e.into_value());
        if let Err(err) = b.send_event(&m).await {
            tracing::warn!(error = %err, event = %kind, "cannot publish a worker event");
        }
    }

    fn headers(&self) -> Map<String, Value> {
        headers(&self.hostname)
    }
}

fn headers(hostname: &str) -> Map<String, Value> {
    let mut h = Map::new();
    h.insert("hostname".into(), hostname.into());
    h
}

/// Publishes queued task events in batches until the queue closes.
async fn publish_batches(
    broker: DynBroker,
    hostname: String,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let mut failing = false;
    let headers = headers(&hostname);
    let mut batch = String::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push('[');
        batch.push_str(&first);
        let mut n = 1;
        let deadline = tokio::time::Instant::now() + FLUSH_AFTER;
        while n < BATCH {
            let next = match rx.try_recv() {
                Ok(e) => e,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(e)) => e,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            batch.push(',');
            batch.push_str(&next);
            n += 1;
        }
        batch.push(']');
        let Some(b) = broker.broadcast() else {
            return;
        };
        match b.send_event_json("task.multi", &headers, &batch).await {
            Ok(()) if failing => {
                tracing::info!("publishing task events again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot publish task events; dropping them until the broker takes them again");
                    failing = true;
                }
            }
        }
    }
}

/// A worker event with Celery's worker fields: `freq`, `active`, `processed`, `loadavg` and
/// the software's identity.
pub(crate) fn worker_event(
    events: &Events,
    kind: EventKind,
    freq: Duration,
    tracker: &Tracker,
) -> Event {
    with_software(events.event(kind))
        .with("freq", freq.as_secs_f64())
        .with("active", tracker.active())
        .with("processed", tracker.processed())
        .with("loadavg", loadavg())
}

/// Adds `sw_ident`, `sw_ver` and `sw_sys`.
pub(crate) fn with_software(e: Event) -> Event {
    e.with("sw_ident", "celeriac")
        .with("sw_ver", env!("CARGO_PKG_VERSION"))
        .with("sw_sys", system_name())
}

/// Python's `platform.system()`: `Linux`, `Darwin`, ...
fn system_name() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages, two decimals (zeros where `/proc` has none).
pub(crate) fn loadavg() -> Vec<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .map(|x| (x.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0)
        .collect();
    v.resize(3, 0.0);
    v
}

/// Sends worker events until `stop` resolves: online now, a heartbeat every `freq`, offline
/// at the end.
pub(crate) async fn heartbeats(
    events: Arc<Events>,
    tracker: Arc<Tracker>,
    freq: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    if !events.available() {
        return;
    }
    events
        .send_now(worker_event(
            &events,
            EventKind::WorkerOnline,
            freq,
            &tracker,
        ))
        .await;
    let beats = async {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + freq, freq);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            events
                .send_now(worker_event(
                    &events,
                    EventKind::WorkerHeartbeat,
                    freq,
                    &tracker,
                ))
                .await;
        }
    };
    tokio::select! {
        () = beats => {}
        () = stop => {}
    }
    events
        .send_now(worker_event(
            &events,
            EventKind::WorkerOffline,
            freq,
            &tracker,
        ))
        .await;
}

/// `ExcType('message', ...)`: a Python repr of a task's exception.
pub(crate) fn exception_repr(e: &RemoteError) -> String {
    let args: Vec<String> = e.exc_args.iter().map(|a| py_repr(a, REPR_MAX)).collect();
    format!("{}({})", e.exc_type, args.join(", "))
}

/// `task-received` and the outcome's event around every delivery, while task events are on.
#[derive(Debug)]
pub(crate) struct TaskEventsLayer(pub(crate) Arc<Events>);

impl Layer for TaskEventsLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        let events = &self.0;
        if !events.task_events() {
            return next.run(req);
        }
        Box::pin(async move {
            events.queue(EventKind::TaskReceived, req.id(), received(req));
            let outcome = next.run(req).await;
            if let Some((kind, fields)) = ended(events, req, &outcome) {
                events.queue(kind, req.id(), fields);
            }
            outcome
        })
    }
}

/// `task-started` before each run, while task events are on.
#[derive(Debug)]
pub(crate) struct StartedEventLayer(pub(crate) Arc<Events>);

impl Layer for StartedEventLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        if self.0.task_events() {
            self.0
                .queue(EventKind::TaskStarted, req.id(), Fields::Started {});
        }
        next.run(req)
    }
}

/// A task event as Celery's monitors read it, written straight to JSON text.
#[derive(Serialize)]
struct TaskEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    hostname: &'a str,
    timestamp: f64,
    utcoffset: f64,
    pid: u32,
    clock: u64,
    uuid: &'a str,
    #[serde(flatten)]
    fields: Fields<'a>,
}

/// The fields of each kind of task event, beyond those every event has.
#[derive(Serialize)]
#[serde(untagged)]
enum Fields<'a> {
    Received {
        name: &'a str,
        args: String,
        kwargs: String,
        root_id: Option<&'a str>,
        parent_id: Option<&'a str>,
        retries: u32,
        eta: Option<String>,
        expires: Option<String>,
    },
    Started {},
    Succeeded {
        result: String,
        runtime: f64,
    },
    Failed {
        exception: String,
        traceback: String,
    },
    Rejected {
        requeue: bool,
    },
    Revoked {
        terminated: bool,
        signum: Option<u8>,
        expired: bool,
    },
}

fn received(req: &Request) -> Fields<'_> {
    let h = req.headers();
    Fields::Received {
        name: req.name(),
        args: py_repr(&Value::Array(req.args().to_vec()), REPR_MAX),
        kwargs: py_repr(&Value::Object(req.kwargs().clone()), REPR_MAX),
        root_id: h.root_id.as_deref(),
        parent_id: h.parent_id.as_deref(),
        retries: h.retries,
        eta: h.eta.map(celeriac_core::time::format),
        expires: h.expires.map(celeriac_core::time::format),
    }
}

fn ended<'a>(
    events: &Events,
    req: &'a Request,
    outcome: &Outcome,
) -> Option<(EventKind, Fields<'a>)> {
    let failed = |e: &RemoteError| Fields::Failed {
        exception: exception_repr(e),
        traceback: crate::record::traceback(req, &events.hostname, e),
    };
    let revoked = |terminated: bool, expired: bool| Fields::Revoked {
        terminated,
        signum: None,
        expired,
    };
    Some(match outcome {
        Outcome::Succeeded(v) => (
            EventKind::TaskSucceeded,
            Fields::Succeeded {
                result: py_repr(v, REPR_MAX),
                runtime: req.runtime().unwrap_or_default().as_secs_f64(),
            },
        ),
        Outcome::Failed(e) | Outcome::DeadLettered { error: e, .. } => {
            (EventKind::TaskFailed, failed(e))
        }
        Outcome::Errored(err) => (EventKind::TaskFailed, failed(&err.to_remote())),
        Outcome::Retried { cause, .. } => (EventKind::TaskRetried, failed(cause)),
        Outcome::Rejected { requeue, .. } => (
            EventKind::TaskRejected,
            Fields::Rejected { requeue: *requeue },
        ),
        Outcome::Revoked { reason } => (
            EventKind::TaskRevoked,
            revoked(reason == "terminated", reason == "expired"),
        ),
        Outcome::Skipped(TaskState::Revoked) => (EventKind::TaskRevoked, revoked(false, false)),
        Outcome::Skipped(_) | Outcome::Parked(_) | Outcome::Requeued => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::Broker as _;
    use celeriac_core::memory::MemoryBroker;
    use serde_json::json;

    use crate::pipeline::testing::around;
    use crate::request::tests::request_with;

    #[tokio::test]
    async fn task_events_travel_in_batches_with_celerys_fields() {
        let broker = MemoryBroker::new();
        let dyn_broker: DynBroker = Arc::new(broker.clone());
        let mut inbox = broker
            .broadcast()
            .unwrap()
            .event_inbox("task.#")
            .await
            .unwrap();
        let (events, publisher) =
            Events::new(dyn_broker, "w1@test".into(), Arc::new(Clock::new()), true);
        tokio::spawn(publisher.unwrap());
        let (stack, _) = around(TaskEventsLayer(events.clone()), |_| {
            Outcome::Succeeded(json!({"sum": 3}))
        });
        let (req, _) = request_with("t-1", 0, |_, _| {});
        stack.run(&req).await;
        let m = tokio::time::timeout(Duration::from_secs(5), inbox.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.routing_key, "task.multi");
        assert_eq!(m.headers["hostname"], "w1@test");
        let batch: Vec<Event> = Event::from_message(&m)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let kinds: Vec<EventKind> = batch.iter().map(Event::kind).collect();
        assert_eq!(kinds, [EventKind::TaskReceived, EventKind::TaskSucceeded]);
        assert_eq!(batch[0].get("args").unwrap(), "[1, 2]");
        assert_eq!(batch[0].get("name").unwrap(), "tasks.add");
        assert_eq!(batch[1].get("result").unwrap(), "{'sum': 3}");
        assert!(batch[1].clock() > batch[0].clock());

        // Off: nothing queued, the layer steps aside.
        assert!(events.set_task_events(false));
        assert!(!events.set_task_events(false));
        let (req, _) = request_with("t-2", 0, |_, _| {});
        stack.run(&req).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), inbox.next())
                .await
                .is_err()
        );
    }

    #[test]
    fn exceptions_read_as_python_reprs() {
        let e = RemoteError::new("ValueError", "bad");
        assert_eq!(exception_repr(&e), "ValueError('bad')");
        assert_eq!(loadavg().len(), 3);
    }
}
