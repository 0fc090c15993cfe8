//! What the worker holds right now: [`Tracker`], the requests between receipt and settlement.
//!
//! For remote control (`active`, `reserved`, `scheduled`, `query_task`) and the worker's
//! heartbeats (how many run). A request is registered when it is decoded and forgotten when
//! its delivery is settled; whether it is *active* (its body started), *scheduled* (held
//! for a future eta) or *reserved* (waiting for a rate-limit token or a slot) is read off the
//! request when asked, so the hot path only inserts and removes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::request::Request;

/// Where a held request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Received, waiting for a token or a slot.
    Reserved,
    /// Held until its eta (a broker without a delayed store).
    Scheduled,
    /// Its body runs.
    Active,
}

/// The requests a worker holds.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    held: Mutex<HashMap<u64, Arc<Request>>>,
    next: AtomicU64,
    /// Tasks accepted so far, by name (`stats.total`), and in all (`processed`).
    totals: Mutex<HashMap<String, u64>>,
    processed: AtomicU64,
}

/// A request's place in the tracker; dropping it forgets the request.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    tracker: &'a Tracker,
    token: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.token);
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Request>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `req` until the returned guard drops, and counts it as accepted.
    pub(crate) fn hold(&self, req: &Arc<Request>) -> Held<'_> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(token, req.clone());
        self.processed.fetch_add(1, Ordering::Relaxed);
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        match totals.get_mut(req.name()) {
            Some(n) => *n += 1,
            None => {
                totals.insert(req.name().to_owned(), 1);
            }
        }
        Held {
            tracker: self,
            token,
        }
    }

    /// The held requests and where each stands.
    pub(crate) fn snapshot(&self) -> Vec<(Standing, Arc<Request>)> {
        let now = Utc::now();
        self.lock()
            .values()
            .map(|r| (standing(r, now), r.clone()))
            .collect()
    }

    /// How many bodies run now.
    pub(crate) fn active(&self) -> usize {
        let now = Utc::now();
        self.lock()
            .values()
            .filter(|r| standing(r, now) == Standing::Active)
            .count()
    }

    /// Tasks accepted since the worker started.
    pub(crate) fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Tasks accepted since the worker started, by name.
    pub(crate) fn totals(&self) -> Map<String, Value> {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect()
    }
}

fn standing(r: &Request, now: chrono::DateTime<Utc>) -> Standing {
    if r.started_at().is_some() {
        Standing::Active
    } else if r.headers().eta.is_some_and(|eta| eta > now) {
        Standing::Scheduled
    } else {
        Standing::Reserved
    }
}

/// Celery's request-info map of `req` on worker `hostname` (`active`, `reserved`,
/// `scheduled`, `query_task` replies); with `safe`, args and kwargs as repr strings.
pub(crate) fn info(req: &Request, hostname: &str, safe: bool) -> Value {
    let name = req.headers().shadow.as_deref().unwrap_or(req.name());
    let (args, kwargs) = if safe {
        let repr = |v: Value| Value::String(celeriac_core::broadcast::event::py_repr(&v, REPR_MAX));
        (
            repr(Value::Array(req.args().to_vec())),
            repr(Value::Object(req.kwargs().clone())),
        )
    } else {
        (
            Value::Array(req.args().to_vec()),
            Value::Object(req.kwargs().clone()),
        )
    };
    json!({
        "id": req.id(),
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "type": req.name(),
        "hostname": hostname,
        "time_start": req.started_at(),
        "acknowledged": req.is_acked(),
        "delivery_info": {
            "exchange": "",
            "routing_key": req.queue(),
            "priority": req.message().properties.priority.unwrap_or(0),
            "redelivered": req.redeliveries() > 0,
        },
        "worker_pid": req.started_at().map(|_| req.child.get().unwrap_or_else(std::process::id)),
    })
}

/// Longest repr Celery puts in events and safe request infos.
pub(crate) const REPR_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::request_with;

    #[test]
    fn requests_are_held_until_dropped_and_stand_where_they_are() {
        let t = Tracker::default();
        let (a, _) = request_with("a", 0, |_, _| {});
        let (b, _) = request_with("b", 1, |m, _| {
            m.headers.eta = Some(Utc::now() + chrono::Duration::seconds(60));
        });
        let (a, b) = (Arc::new(a), Arc::new(b));
        let ha = t.hold(&a);
        let hb = t.hold(&b);
        a.mark_started();
        let mut s: Vec<(Standing, String)> = t
            .snapshot()
            .into_iter()
            .map(|(st, r)| (st, r.id().to_owned()))
            .collect();
        s.sort_by(|x, y| x.1.cmp(&y.1));
        assert_eq!(
            s,
            [
                (Standing::Active, "a".to_owned()),
                (Standing::Scheduled, "b".to_owned())
            ]
        );
        assert_eq!(t.active(), 1);
        drop(ha);
        drop(hb);
        assert!(t.snapshot().is_empty());
        assert_eq!(t.processed(), 2);
        assert_eq!(t.totals()["tasks.add"], 2);

        let i = info(&a, "w@h", true);
        assert_eq!(i["id"], "a");
        assert_eq!(i["args"], "[1, 2]");
        assert_eq!(i["delivery_info"]["routing_key"], "celery");
        assert!(i["time_start"].is_f64());
        assert_eq!(info(&b, "w@h", false)["args"], json!([1, 2]));
        assert_eq!(info(&b, "w@h", false)["worker_pid"], Value::Null);
    }
}
