//! [`SendOptions`]: how to send one task call, typed; Celery's `apply_async` map only at the
//! wire edge ([`SendOptions::from_wire`], [`SendOptions::to_wire`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::protocol::Signature;

/// Options of one send, Celery's `apply_async` options as Rust types.
///
/// The app's signatures, beat's entries and the worker's canvas all send with these. A
/// signature that travels inside a message (a callback, a chain step, a chord body) carries
/// them as Celery's options map instead, written by [`to_wire`](Self::to_wire) and read back
/// by [`from_wire`](Self::from_wire), so Python peers read ours and we read theirs.
///
/// ```
/// use std::time::Duration;
/// use celeriac_core::canvas::{Expires, SendOptions};
///
/// let mut o = SendOptions::default();
/// o.queue = Some("math".into());
/// o.countdown = Some(Duration::from_secs(10));
/// o.expires = Some(Expires::In(Duration::from_secs(60)));
/// let wire = o.to_wire();
/// assert_eq!(wire["queue"], "math");
/// assert_eq!(wire["countdown"], 10.0);
/// assert_eq!(SendOptions::from_wire(&wire)?, o);
/// # Ok::<(), celeriac_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct SendOptions {
    /// Use this id instead of a fresh one.
    pub task_id: Option<String>,
    /// The queue (else the task's queue, the routes, the default queue).
    pub queue: Option<String>,
    /// 0 to 9, higher first (values above 9 count as 9).
    pub priority: Option<u8>,
    /// Run no earlier than this long after sending.
    pub countdown: Option<Duration>,
    /// Run no earlier than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Revoke instead of running after this (else the task's own `expires`).
    pub expires: Option<Expires>,
    /// Hard time limit for this call (else the task's).
    pub time_limit: Option<Duration>,
    /// Soft time limit for this call (else the task's).
    pub soft_time_limit: Option<Duration>,
    /// Store no result (else the task's `ignore_result`).
    pub ignore_result: Option<bool>,
    /// Extra message headers, visible to the task through its context.
    pub headers: Map<String, Value>,
    /// The name monitors show instead of the task's (Celery's `shadow`).
    pub shadow: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// The first task of the workflow this one belongs to.
    pub root_id: Option<String>,
    /// The group this task is a member of.
    pub group_id: Option<String>,
    /// Its place in that group.
    pub group_index: Option<u32>,
    /// Where results go for a backend that sends them as messages (Celery's `rpc://`).
    pub reply_to: Option<String>,
    /// Run on success, with the result prepended (Celery's `link`).
    pub link: Vec<Signature>,
    /// Run on failure, with the failed task's id prepended (Celery's `link_error`).
    pub link_error: Vec<Signature>,
    /// The chord body this task is a header member of.
    pub chord: Option<Box<Signature>>,
}

/// When a task is revoked instead of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    /// At this time.
    At(DateTime<Utc>),
    /// This long after sending.
    In(Duration),
}

impl SendOptions {
    /// Reads Celery's options map (`apply_async` names, §3.1 of the wire notes). Unknown keys
    /// are ignored, as a Python worker ignores options it does not know; a known key with a
    /// value of the wrong type is an error naming it.
    pub fn from_wire(map: &Map<String, Value>) -> Result<Self> {
        let o = Wire(map);
        Ok(SendOptions {
            task_id: o.str("task_id")?,
            queue: o.str("queue")?,
            priority: match o.get("priority") {
                None => None,
                Some(v) => Some(
                    v.as_u64()
                        .map(|p| p.min(9) as u8)
                        .ok_or_else(|| bad("priority", "an integer 0-9"))?,
                ),
            },
            countdown: o.duration("countdown")?,
            eta: o.time("eta")?,
            expires: match o.get("expires") {
                None => None,
                Some(Value::Number(_)) => o.duration("expires")?.map(Expires::In),
                Some(_) => o.time("expires")?.map(Expires::At),
            },
            time_limit: o.duration("time_limit")?,
            soft_time_limit: o.duration("soft_time_limit")?,
            // As Celery: anything but a boolean leaves the task's own setting.
            ignore_result: o.get("ignore_result").and_then(Value::as_bool),
            headers: match o.get("headers") {
                None => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return Err(bad("headers", "a map")),
            },
            shadow: o.str("shadow")?,
            parent_id: o.str("parent_id")?,
            root_id: o.str("root_id")?,
            group_id: o.str("group_id")?,
            group_index: match o.get("group_index") {
                None => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| bad("group_index", "a non-negative integer"))?,
                ),
            },
            reply_to: o.str("reply_to")?,
            link: o.sigs("link")?,
            link_error: o.sigs("link_error")?,
            chord: match o.get("chord") {
                None => None,
                Some(v) => Some(Box::new(
                    serde_json::from_value(v.clone())
                        .map_err(|_| bad("chord", "a signature map"))?,
                )),
            },
        })
    }

    /// Celery's options map of these options: only those that are set.
    pub fn to_wire(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        let time = |t: &DateTime<Utc>| Value::String(crate::time::format(*t));
        let secs = |d: &Duration| Value::from(d.as_secs_f64());
        let string = |s: &String| Value::String(s.clone());
        let sigs = |v: &[Signature]| {
            Value::Array(
                v.iter()
                    .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
                    .collect(),
            )
        };
        if let Some(v) = &self.task_id {
            put("task_id", string(v));
        }
        if let Some(v) = &self.queue {
            put("queue", string(v));
        }
        if let Some(v) = self.priority {
            put("priority", v.into());
        }
        if let Some(v) = &self.countdown {
            put("countdown", secs(v));
        }
        if let Some(v) = &self.eta {
            put("eta", time(v));
        }
        match &self.expires {
            Some(Expires::At(t)) => put("expires", time(t)),
            Some(Expires::In(d)) => put("expires", secs(d)),
            None => {}
        }
        if let Some(v) = &self.time_limit {
            put("time_limit", secs(v));
        }
        if let Some(v) = &self.soft_time_limit {
            put("soft_time_limit", secs(v));
        }
        if let Some(v) = self.ignore_result {
            put("ignore_result", v.into());
        }
        if !self.headers.is_empty() {
            put("headers", Value::Object(self.headers.clone()));
        }
        for (k, v) in [
            ("shadow", &self.shadow),
            ("parent_id", &self.parent_id),
            ("root_id", &self.root_id),
            ("group_id", &self.group_id),
            ("reply_to", &self.reply_to),
        ] {
            if let Some(v) = v {
                put(k, string(v));
            }
        }
        if let Some(v) = self.group_index {
            put("group_index", v.into());
        }
        if !self.link.is_empty() {
            put("link", sigs(&self.link));
        }
        if !self.link_error.is_empty() {
            put("link_error", sigs(&self.link_error));
        }
        if let Some(c) = &self.chord {
            put(
                "chord",
                serde_json::to_value(c.as_ref()).unwrap_or(Value::Null),
            );
        }
        m
    }

    /// When the task may run, counted from `now`: the `eta`, else `now + countdown`.
    pub fn run_at(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        match (self.eta, self.countdown) {
            (Some(t), _) => Ok(Some(t)),
            (None, Some(c)) => after(now, c, "countdown").map(Some),
            (None, None) => Ok(None),
        }
    }

    /// When the task expires, counted from `now`; `None` when these options do not say.
    pub fn expires_at(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        match self.expires {
            Some(Expires::At(t)) => Ok(Some(t)),
            Some(Expires::In(d)) => after(now, d, "expires").map(Some),
            None => Ok(None),
        }
    }
}

/// `now + d`, or an error naming the option when that is past the calendar's end.
pub(crate) fn after(now: DateTime<Utc>, d: Duration, key: &str) -> Result<DateTime<Utc>> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| bad(key, "a time that is not that far away"))
}

pub(crate) fn bad(key: &str, want: &str) -> Error {
    Error::protocol(format!("signature option {key} must be {want}"))
}

/// Reading Celery's options map: `null` is the same as absent.
struct Wire<'a>(&'a Map<String, Value>);

impl Wire<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(key, "a string")),
        }
    }

    /// Seconds as a number; negative counts as zero.
    fn duration(&self, key: &str) -> Result<Option<Duration>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let s = v.as_f64().ok_or_else(|| bad(key, "seconds"))?;
                Duration::try_from_secs_f64(s.max(0.0))
                    .map(Some)
                    .map_err(|_| bad(key, "seconds (a finite number)"))
            }
        }
    }

    fn time(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => crate::time::parse(&s)
                .map(Some)
                .map_err(|_| bad(key, "an ISO 8601 time")),
        }
    }

    fn sigs(&self, key: &str) -> Result<Vec<Signature>> {
        let v = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(v @ Value::Array(_)) => v.clone(),
            Some(v @ Value::Object(_)) => Value::Array(vec![v.clone()]),
            Some(_) => return Err(bad(key, "a signature map or a list of them")),
        };
        serde_json::from_value(v).map_err(|_| bad(key, "a signature map or a list of them"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_option_survives_the_wire() {
        let mut headers = Map::new();
        headers.insert("tenant".into(), json!("acme"));
        let o = SendOptions {
            task_id: Some("t".into()),
            queue: Some("q".into()),
            priority: Some(7),
            countdown: Some(Duration::from_millis(1500)),
            eta: Some(crate::time::parse("2030-01-02T03:04:05.678901+00:00").unwrap()),
            expires: Some(Expires::At(
                crate::time::parse("2031-01-01T00:00:00+00:00").unwrap(),
            )),
            time_limit: Some(Duration::from_secs(30)),
            soft_time_limit: Some(Duration::from_secs(20)),
            ignore_result: Some(true),
            headers,
            shadow: Some("alias".into()),
            parent_id: Some("p".into()),
            root_id: Some("r".into()),
            group_id: Some("g".into()),
            group_index: Some(3),
            reply_to: Some("client".into()),
            link: vec![Signature::new("tasks.cb", vec![json!(1)])],
            link_error: vec![Signature::new("tasks.eb", vec![])],
            chord: Some(Box::new(Signature::new("tasks.body", vec![]))),
        };
        let wire = o.to_wire();
        assert_eq!(wire["countdown"], json!(1.5));
        assert_eq!(wire["link"][0]["task"], json!("tasks.cb"));
        assert_eq!(SendOptions::from_wire(&wire).unwrap(), o);
        assert!(SendOptions::default().to_wire().is_empty());
    }

    #[test]
    fn celerys_forms_are_read_and_wrong_types_named() {
        let wire = json!({
            "expires": 60, "priority": 12, "link": {"task": "tasks.one"},
            "ignore_result": "yes", "unknown": [1], "eta": null, "countdown": -3
        });
        let o = SendOptions::from_wire(wire.as_object().unwrap()).unwrap();
        assert_eq!(o.expires, Some(Expires::In(Duration::from_secs(60))));
        assert_eq!(o.priority, Some(9));
        assert_eq!(o.link.len(), 1);
        assert_eq!(o.ignore_result, None);
        assert_eq!(o.eta, None);
        assert_eq!(o.countdown, Some(Duration::ZERO));
        for (key, value) in [
            ("countdown", json!("soon")),
            ("priority", json!(-1)),
            ("group_index", json!(-1)),
            ("headers", json!([1])),
            ("eta", json!("tomorrow")),
            ("link", json!(3)),
            ("task_id", json!(5)),
            ("countdown", json!(1e300)),
        ] {
            let mut m = Map::new();
            m.insert(key.into(), value.clone());
            let e = SendOptions::from_wire(&m).unwrap_err().to_string();
            assert!(e.contains(key), "{key}={value}: {e}");
        }
    }

    #[test]
    fn times_count_from_now_and_refuse_to_overflow() {
        let now = Utc::now();
        let mut o = SendOptions::default();
        assert_eq!(o.run_at(now).unwrap(), None);
        o.countdown = Some(Duration::from_secs(5));
        assert_eq!(
            o.run_at(now).unwrap(),
            Some(now + chrono::Duration::seconds(5))
        );
        o.eta = Some(now);
        assert_eq!(o.run_at(now).unwrap(), Some(now), "eta wins");
        o.expires = Some(Expires::In(Duration::from_secs(u64::MAX / 4)));
        assert!(o.expires_at(now).is_err());
    }
}
