//! Events (Celery's `celeryev`, §11 of the wire notes): what workers and clients announce.
//!
//! An [`Event`] is a JSON map with a `type` (`task-succeeded`, `worker-heartbeat`, ...), the
//! sender's `hostname`, `timestamp`, `utcoffset` (hours *west* of UTC), `pid` and Lamport
//! `clock`, plus fields of its type. Workers send task events in batches (a JSON list under
//! routing key `task.multi`), worker events one by one; readers accept both.

use serde_json::{Map, Value};

use super::Broadcasted;
use crate::error::{Error, Result};

/// The kinds of event Celery defines; anything else is [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A client sent a task (only with `task_send_sent_event`).
    TaskSent,
    /// A worker received a task.
    TaskReceived,
    /// A worker started running it.
    TaskStarted,
    /// It returned: `result` (a repr string) and `runtime`.
    TaskSucceeded,
    /// It failed: `exception` (a repr string) and `traceback`.
    TaskFailed,
    /// It will be retried: `exception`, `traceback`.
    TaskRetried,
    /// Its message was rejected: `requeue`.
    TaskRejected,
    /// It was revoked: `terminated`, `signum`, `expired`.
    TaskRevoked,
    /// A worker started.
    WorkerOnline,
    /// A worker is alive: `freq`, `active`, `processed`, `loadavg`.
    WorkerHeartbeat,
    /// A worker stopped.
    WorkerOffline,
    /// Any other type.
    Other(String),
}

impl EventKind {
    /// The `type` field: `task-succeeded`, `worker-heartbeat`, ...
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::TaskSent => "task-sent",
            EventKind::TaskReceived => "task-received",
            EventKind::TaskStarted => "task-started",
            EventKind::TaskSucceeded => "task-succeeded",
            EventKind::TaskFailed => "task-failed",
            EventKind::TaskRetried => "task-retried",
            EventKind::TaskRejected => "task-rejected",
            EventKind::TaskRevoked => "task-revoked",
            EventKind::WorkerOnline => "worker-online",
            EventKind::WorkerHeartbeat => "worker-heartbeat",
            EventKind::WorkerOffline => "worker-offline",
            EventKind::Other(s) => s,
        }
    }

    /// The kind named by a `type` field.
    pub fn parse(s: &str) -> EventKind {
        match s {
            "task-sent" => EventKind::TaskSent,
            "task-received" => EventKind::TaskReceived,
            "task-started" => EventKind::TaskStarted,
            "task-succeeded" => EventKind::TaskSucceeded,
            "task-failed" => EventKind::TaskFailed,
            "task-retried" => EventKind::TaskRetried,
            "task-rejected" => EventKind::TaskRejected,
            "task-revoked" => EventKind::TaskRevoked,
            "worker-online" => EventKind::WorkerOnline,
            "worker-heartbeat" => EventKind::WorkerHeartbeat,
            "worker-offline" => EventKind::WorkerOffline,
            other => EventKind::Other(other.to_owned()),
        }
    }

    /// The routing key it is published under: the type with `-` turned into `.`.
    pub fn routing_key(&self) -> String {
        self.as_str().replace('-', ".")
    }

    /// Whether it is about a task (`task-*`), rather than a worker.
    pub fn is_task(&self) -> bool {
        self.as_str().starts_with("task-")
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event.
///
/// ```
/// use celeriac_core::broadcast::event::{Event, EventKind};
/// let e = Event::new(EventKind::TaskSucceeded, "w1@host", 7)
///     .with("uuid", "id-1")
///     .with("result", "5")
///     .with("runtime", 0.01);
/// assert_eq!(e.kind(), EventKind::TaskSucceeded);
/// assert_eq!(e.uuid(), Some("id-1"));
/// let back = Event::from_value(e.to_value())?;
/// assert_eq!(back, e);
/// # Ok::<(), celeriac_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    fields: Map<String, Value>,
}

impl Event {
    /// An event of `kind` sent now by `hostname` (this process) at Lamport time `clock`, with
    /// the fields every event carries (`type`, `hostname`, `timestamp`, `utcoffset`, `pid`,
    /// `clock`).
    pub fn new(kind: EventKind, hostname: &str, clock: u64) -> Self {
        let mut fields = Map::new();
        fields.insert("type".into(), kind.as_str().into());
        fields.insert("hostname".into(), hostname.into());
        fields.insert("timestamp".into(), now_unix().into());
        fields.insert("utcoffset".into(), utcoffset_hours_west().into());
        fields.insert("pid".into(), std::process::id().into());
        fields.insert("clock".into(), clock.into());
        Event { fields }
    }

    /// Adds or replaces field `key`.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// Reads an event document; it needs a string `type` and `hostname`, and a number
    /// `timestamp` (what Celery's monitors index).
    pub fn from_value(v: Value) -> Result<Event> {
        let Value::Object(fields) = v else {
            return Err(Error::protocol("an event must be a map"));
        };
        for (key, ok) in [
            ("type", fields.get("type").is_some_and(Value::is_string)),
            (
                "hostname",
                fields.get("hostname").is_some_and(Value::is_string),
            ),
            (
                "timestamp",
                fields.get("timestamp").is_some_and(Value::is_number),
            ),
        ] {
            if !ok {
                return Err(Error::protocol(format!("an event needs a valid {key}")));
            }
        }
        Ok(Event { fields })
    }

    /// The events of one message: a single event or a batch (a list). Each bad element is an
    /// error of its own, so one bad event does not hide the others.
    pub fn from_message(m: &Broadcasted) -> Vec<Result<Event>> {
        match &m.body {
            Value::Array(items) => items.iter().cloned().map(Event::from_value).collect(),
            other => vec![Event::from_value(other.clone())],
        }
    }

    /// The event as a JSON map.
    pub fn to_value(&self) -> Value {
        Value::Object(self.fields.clone())
    }

    /// The event as a JSON map, without a copy.
    pub fn into_value(self) -> Value {
        Value::Object(self.fields)
    }

    /// Its kind.
    pub fn kind(&self) -> EventKind {
        EventKind::parse(self.str("type").unwrap_or_default())
    }

    /// The sender's node name.
    pub fn hostname(&self) -> &str {
        self.str("hostname").unwrap_or_default()
    }

    /// When it was sent (Unix seconds, UTC).
    pub fn timestamp(&self) -> f64 {
        self.fields
            .get("timestamp")
            .and_then(Value::as_f64)
            .unwrap_or_default()
    }

    /// The sender's Lamport clock.
    pub fn clock(&self) -> Option<u64> {
        self.fields.get("clock").and_then(Value::as_u64)
    }

    /// The task id, for task events.
    pub fn uuid(&self) -> Option<&str> {
        self.str("uuid")
    }

    /// Field `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// Every field.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }
}

/// Now, in Unix seconds.
pub fn now_unix() -> f64 {
    let now = chrono::Utc::now();
    now.timestamp() as f64 + f64::from(now.timestamp_subsec_micros()) / 1e6
}

/// This host's offset from UTC in hours *west* (Celery's `utcoffset`: UTC is 0, Berlin in
/// winter -1, New York in winter 5).
///
/// Read from the system at most once a minute: finding the local zone costs system calls,
/// and every event carries the offset.
pub fn utcoffset_hours_west() -> f64 {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CACHED: Mutex<Option<(Instant, f64)>> = Mutex::new(None);
    let mut cached = CACHED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, v)) = *cached {
        if at.elapsed() < Duration::from_secs(60) {
            return v;
        }
    }
    let east = chrono::Local::now().offset().local_minus_utc();
    // `0 - 0.0` would print as `-0.0` in monitors.
    let v = if east == 0 {
        0.0
    } else {
        -f64::from(east) / 3600.0
    };
    *cached = Some((Instant::now(), v));
    v
}

/// A Python `repr` of a JSON value as Celery's events carry results and arguments: strings
/// quoted with `'`, `None`/`True`/`False`, lists and dicts; cut to `max` characters with `...`.
pub fn py_repr(v: &Value, max: usize) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push_str("None"),
            Value::Bool(true) => out.push_str("True"),
            Value::Bool(false) => out.push_str("False"),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => py_str(s, out),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(x, out);
                }
                out.push(']');
            }
            Value::Object(m) => {
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_str(k, out);
                    out.push_str(": ");
                    go(x, out);
                }
                out.push('}');
            }
        }
    }
    fn py_str(s: &str, out: &mut String) {
        let quote = if s.contains('\'') && !s.contains('"') {
            '"'
        } else {
            '\''
        };
        out.push(quote);
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c == quote => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        out.push(quote);
    }
    let mut out = String::new();
    go(v, &mut out);
    if out.chars().count() > max {
        let mut cut: String = out.chars().take(max.saturating_sub(3)).collect();
        cut.push_str("...");
        return cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_name_their_type_and_routing_key() {
        for k in [
            EventKind::TaskSent,
            EventKind::TaskReceived,
            EventKind::TaskStarted,
            EventKind::TaskSucceeded,
            EventKind::TaskFailed,
            EventKind::TaskRetried,
            EventKind::TaskRejected,
            EventKind::TaskRevoked,
            EventKind::WorkerOnline,
            EventKind::WorkerHeartbeat,
            EventKind::WorkerOffline,
        ] {
            assert_eq!(EventKind::parse(k.as_str()), k);
        }
        assert_eq!(EventKind::TaskSucceeded.routing_key(), "task.succeeded");
        assert_eq!(EventKind::WorkerHeartbeat.routing_key(), "worker.heartbeat");
        assert_eq!(
            EventKind::parse("worker-elect"),
            EventKind::Other("worker-elect".into())
        );
        assert!(EventKind::TaskRevoked.is_task() && !EventKind::WorkerOnline.is_task());
    }

    #[test]
    fn single_and_batched_events_read_and_bad_ones_are_errors_alone() {
        let good = json!({"type": "task-started", "hostname": "w@h", "timestamp": 1.5, "uuid": "u", "clock": 3});
        let one = Broadcasted::new("task.started", Map::new(), good.clone());
        let e = Event::from_message(&one).pop().unwrap().unwrap();
        assert_eq!(
            (e.kind(), e.hostname(), e.uuid(), e.clock()),
            (EventKind::TaskStarted, "w@h", Some("u"), Some(3))
        );
        let batch = Broadcasted::new(
            "task.multi",
            Map::new(),
            json!([good, 5, {"type": "task-started"}, {"type": 1, "hostname": "h", "timestamp": 1}]),
        );
        let got = Event::from_message(&batch);
        assert_eq!(got.len(), 4);
        assert!(got[0].is_ok() && got[1].is_err() && got[2].is_err() && got[3].is_err());
    }

    #[test]
    fn new_events_carry_the_common_fields() {
        let e = Event::new(EventKind::WorkerHeartbeat, "w@h", 4).with("freq", 2.0);
        let v = e.to_value();
        for key in [
            "type",
            "hostname",
            "timestamp",
            "utcoffset",
            "pid",
            "clock",
            "freq",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert!((now_unix() - e.timestamp()).abs() < 5.0);
        let off = utcoffset_hours_west();
        assert!((-14.0..=12.0).contains(&off), "{off}");
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!(5), 100), "5");
        assert_eq!(py_repr(&json!("a'b"), 100), "\"a'b\"");
        assert_eq!(py_repr(&json!("x"), 100), "'x'");
        assert_eq!(
            py_repr(&json!([1, null, true, {"k": "v"}]), 100),
            "[1, None, True, {'k': 'v'}]"
        );
        assert_eq!(py_repr(&json!("abcdefgh"), 6), "'ab...");
    }
}
