//! A dispatch that records every firing (and optionally forwards it to an app).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_beat::{Dispatch, Firing};
use celeriac_core::{BoxFuture, Result};
use chrono::{DateTime, Utc};

/// One recorded send.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub instance: String,
    pub entry: String,
    pub tick: DateTime<Utc>,
    pub task_id: String,
    pub manual: bool,
    pub at: tokio::time::Instant,
}

/// Records sends into a shared log, then forwards them to `app` if set.
#[derive(Clone)]
pub(crate) struct Recorder {
    pub instance: String,
    pub log: Arc<Mutex<Vec<Sent>>>,
    pub app: Option<celeriac::App>,
}

impl Recorder {
    pub(crate) fn new(
        instance: &str,
        log: &Arc<Mutex<Vec<Sent>>>,
        app: Option<&celeriac::App>,
    ) -> Self {
        Recorder {
            instance: instance.to_owned(),
            log: log.clone(),
            app: app.cloned(),
        }
    }
}

impl Dispatch for Recorder {
    fn send<'a>(&'a self, f: &'a Firing) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Some(app) = &self.app {
                app.send(f).await?;
            }
            self.log.lock().unwrap().push(Sent {
                instance: self.instance.clone(),
                entry: f.entry.clone(),
                tick: f.tick,
                task_id: f.task_id.clone(),
                manual: f.manual,
                at: tokio::time::Instant::now(),
            });
            Ok(())
        })
    }
}

pub(crate) fn log() -> Arc<Mutex<Vec<Sent>>> {
    Arc::new(Mutex::new(Vec::new()))
}

pub(crate) fn ticks(log: &Arc<Mutex<Vec<Sent>>>, entry: &str) -> Vec<DateTime<Utc>> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.entry == entry && !s.manual)
        .map(|s| s.tick)
        .collect()
}

/// Fails with the duplicates if any tick was sent twice.
pub(crate) fn assert_unique(ticks: &[DateTime<Utc>]) {
    let mut sorted = ticks.to_vec();
    sorted.sort();
    let dups: Vec<_> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(dups.is_empty(), "ticks sent twice: {dups:?}");
}

/// The ticks of a `step` grid from the first to the last sent that are missing.
pub(crate) fn missing(ticks: &[DateTime<Utc>], step: Duration) -> Vec<DateTime<Utc>> {
    let mut sorted = ticks.to_vec();
    sorted.sort();
    let (Some(first), Some(last)) = (sorted.first().copied(), sorted.last().copied()) else {
        return Vec::new();
    };
    let step = chrono::Duration::from_std(step).unwrap();
    let mut out = Vec::new();
    let mut t = first;
    while t <= last {
        if sorted.binary_search(&t).is_err() {
            out.push(t);
        }
        t += step;
    }
    out
}
