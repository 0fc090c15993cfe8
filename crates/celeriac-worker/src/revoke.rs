//! Durable revokes, and `terminate` for tasks that are already running.
//!
//! For the facade's `AsyncResult::revoke_with` (which writes the record) and the worker (which
//! reads it). There is no remote-control channel, so a revoke is a record in the result
//! backend: REVOKED with Celery's `TaskRevokedError` exception map as its result. A worker
//! checks it before it runs a task (so it sticks across restarts and holds on every worker),
//! and, while tasks run, reads their states every
//! [`WorkerOptions::revoke_poll_interval`](crate::WorkerOptions::revoke_poll_interval) in one
//! batch ([`ResultBackend::get_many`](celeriac_core::ResultBackend::get_many)) to find revokes that ask to terminate them.
//!
//! # The stored document
//!
//! A terminate request is one more key in the exception map, [`TERMINATE_KEY`], naming the
//! signal: `{"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
//! "exc_message": ["revoked"], "celeriac_terminate": "SIGTERM"}`. Celery rebuilds an exception
//! from `exc_type`, `exc_module` and `exc_message` only, so Python readers see the same
//! `TaskRevokedError` as for any revoke. When a worker has stopped the task it stores REVOKED
//! again with the reason `terminated`, as Celery's worker does.
//!
//! # Expiry
//!
//! A revoke lives exactly as long as the backend keeps the record: `result_expires` (Redis
//! sets it as the key's TTL, SQLite and PostgreSQL sweep expired rows; the in-memory backend
//! keeps everything). After that the id is unknown again, and a copy of the message that
//! arrives later runs. Celery's workers forget revoked ids too (after three hours by
//! default); send revoked tasks with `expires` when a late copy must never run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use celeriac_core::backend::revoke::{
    Signal, TERMINATE_KEY, revoked_meta, signal_name, terminate_signal,
};
use celeriac_core::{BoxFuture, DynBackend};
use tokio::sync::{Notify, oneshot};

use crate::pipeline::{Layer, Next, Outcome, Request};

/// Stops a running task when a revoke asks to terminate it: fires its cancellation, signals
/// its pool child (processes pool), and gives it `grace` to end before dropping it (which
/// aborts an async body and SIGKILLs a child that is still there). The task ends REVOKED.
#[derive(Debug)]
pub(crate) struct TerminateLayer {
    /// The running ids, which revokes (read from the backend or received through remote
    /// control) terminate.
    pub(crate) running: Arc<RunningIds>,
    pub(crate) grace: Duration,
}

impl Layer for TerminateLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let mut registration = self.running.register(req.id());
            let mut run = next.run(req);
            tokio::select! {
                biased;
                outcome = &mut run => outcome,
                signal = registration.requested() => {
                    tracing::warn!(signal, "revoked with terminate: stopping the task");
                    req.cancel.cancel();
                    if let Some(pid) = req.child.get() {
                        send_signal(pid, &signal).await;
                    }
                    if tokio::time::timeout(self.grace, &mut run).await.is_err() {
                        tracing::warn!("the terminated task did not stop within the grace; dropping it");
                    }
                    Outcome::Revoked { reason: "terminated".to_owned() }
                }
            }
        })
    }
}

/// The ids running on one worker, each with a way to tell its delivery to terminate it.
#[derive(Debug, Default)]
pub(crate) struct RunningIds {
    entries: Mutex<HashMap<u64, (String, oneshot::Sender<String>)>>,
    next: AtomicU64,
    changed: Notify,
}

/// One running task's registration; dropping it forgets the task.
#[derive(Debug)]
pub(crate) struct Registration {
    owner: Option<(Arc<RunningIds>, u64)>,
    rx: Option<oneshot::Receiver<String>>,
}

impl Registration {
    /// Resolves with the signal's name once a terminate revoke for the task is seen; never
    /// otherwise. Cancel-safe.
    pub(crate) async fn requested(&mut self) -> String {
        match self.rx.as_mut() {
            Some(rx) => match rx.await {
                Ok(signal) => signal,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((ids, token)) = self.owner.take() {
            ids.lock().remove(&token);
        }
    }
}

impl RunningIds {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (String, oneshot::Sender<String>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `task_id` until the registration is dropped.
    pub(crate) fn register(self: &Arc<Self>, task_id: &str) -> Registration {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token, (task_id.to_owned(), tx));
        self.changed.notify_one();
        Registration {
            owner: Some((self.clone(), token)),
            rx: Some(rx),
        }
    }

    /// The distinct ids running now.
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().values().map(|(id, _)| id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Tells every running copy of `task_id` to terminate with `signal`; returns how many.
    fn fire(&self, task_id: &str, signal: &str) -> usize {
        let mut entries = self.lock();
        let tokens: Vec<u64> = entries
            .iter()
            .filter(|(_, (id, _))| id == task_id)
            .map(|(t, _)| *t)
            .collect();
        for t in &tokens {
            if let Some((_, tx)) = entries.remove(t) {
                let _ = tx.send(signal.to_owned());
            }
        }
        tokens.len()
    }

    /// Reads the running ids' states every `interval` while any run, firing terminate revokes.
    /// Runs until aborted.
    pub(crate) async fn watch(self: Arc<Self>, backend: DynBackend, interval: Duration) {
        let mut failing = false;
        loop {
            // Sleep until something runs (registrations notify).
            loop {
                let changed = self.changed.notified();
                if !self.lock().is_empty() {
                    break;
                }
                changed.await;
            }
            tokio::time::sleep(interval).await;
            let ids = self.ids();
            if ids.is_empty() {
                continue;
            }
            match backend.get_many(&ids).await {
                Ok(metas) => {
                    if failing {
                        tracing::info!("reading running tasks' states again");
                        failing = false;
                    }
                    for (id, meta) in ids.iter().zip(metas) {
                        let Some(signal) = meta.as_ref().and_then(terminate_signal) else {
                            continue;
                        };
                        if self.fire(id, signal) > 0 {
                            tracing::warn!(task_id = %id, signal, "task revoked with terminate");
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot read running tasks' states; terminate revokes wait");
                        failing = true;
                    }
                }
            }
        }
    }
}

/// Ids revoked through remote control, kept in memory as Celery's workers keep them: at most
/// [`Revoked::MAX`] ids, each for [`Revoked::EXPIRES`]; the oldest go first.
#[derive(Debug, Default)]
pub(crate) struct Revoked {
    inner: Mutex<RevokedInner>,
    /// How many ids are kept, read without the lock on every task's way through the gate.
    len: std::sync::atomic::AtomicUsize,
    /// Stamped headers revoked (`revoke_by_stamped_headers`): header name → revoked values.
    stamps: Mutex<HashMap<String, Vec<serde_json::Value>>>,
    any_stamps: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct RevokedInner {
    at: HashMap<String, std::time::Instant>,
    order: std::collections::VecDeque<(std::time::Instant, String)>,
}

impl Revoked {
    /// Celery's `CELERY_WORKER_REVOKES_MAX`.
    pub(crate) const MAX: usize = 50_000;
    /// Celery's `CELERY_WORKER_REVOKE_EXPIRES`: three hours.
    pub(crate) const EXPIRES: Duration = Duration::from_secs(3 * 3600);

    fn lock(&self) -> MutexGuard<'_, RevokedInner> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        while let Some((t, id)) = inner.order.front() {
            let stale = now.duration_since(*t) > Self::EXPIRES || inner.order.len() > Self::MAX;
            if !stale {
                break;
            }
            let (t, id) = (*t, id.clone());
            inner.order.pop_front();
            if inner.at.get(&id) == Some(&t) {
                inner.at.remove(&id);
            }
        }
        self.len.store(inner.at.len(), Ordering::Release);
        inner
    }

    /// Adds `id`; returns whether it was new.
    pub(crate) fn add(&self, id: &str) -> bool {
        let mut inner = self.lock();
        let now = std::time::Instant::now();
        let new = inner.at.insert(id.to_owned(), now).is_none();
        inner.order.push_back((now, id.to_owned()));
        self.len.store(inner.at.len(), Ordering::Release);
        new
    }

    /// Whether `id` was revoked.
    pub(crate) fn contains(&self, id: &str) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lock().at.contains_key(id)
    }

    /// Revokes tasks whose stamped header `name` has one of the values, for each pair.
    pub(crate) fn add_stamps(&self, pairs: &[(String, Vec<serde_json::Value>)]) {
        let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        for (name, values) in pairs {
            let kept = stamps.entry(name.clone()).or_default();
            for v in values {
                if !kept.contains(v) {
                    kept.push(v.clone());
                }
            }
        }
        self.any_stamps.store(!stamps.is_empty(), Ordering::Release);
    }

    /// Whether a message with `headers` carries a revoked stamp (a header whose value, or
    /// one of whose values, was revoked).
    pub(crate) fn stamped(&self, headers: &celeriac_core::Headers) -> bool {
        if !self.any_stamps.load(Ordering::Acquire) {
            return false;
        }
        let stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        stamps
            .iter()
            .any(|(name, revoked)| match headers.extra.get(name) {
                Some(serde_json::Value::Array(vs)) => vs.iter().any(|v| revoked.contains(v)),
                Some(v) => revoked.contains(v),
                None => false,
            })
    }

    /// The revoked ids, sorted.
    pub(crate) fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().at.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }
}

impl RunningIds {
    /// Tells every running copy of each of `ids` to terminate with `signal` now (a revoke
    /// received through remote control); returns the ids that were running.
    pub(crate) fn terminate(&self, ids: &[String], signal: Signal) -> Vec<String> {
        ids.iter()
            .filter(|id| self.fire(id, signal.name()) > 0)
            .cloned()
            .collect()
    }
}

/// Sends `signal` (a name from [`signal_name`]) to process `pid` with the system's `kill`
/// (the workspace forbids `unsafe`, so no direct system call).
pub(crate) async fn send_signal(pid: u32, signal: &str) {
    let short = signal.trim_start_matches("SIG");
    let status = tokio::process::Command::new("kill")
        .args(["-s", short, &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => {
            tracing::warn!(pid, signal, "sent the signal to the task's pool child")
        }
        Ok(s) => {
            tracing::warn!(pid, signal, status = %s, "cannot signal the task's pool child (gone already?)")
        }
        Err(e) => {
            tracing::error!(pid, signal, error = %e, "cannot run kill to signal the task's pool child")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::ResultBackend as _;
    use celeriac_core::memory::MemoryBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watch_fires_only_terminate_revokes_of_running_ids() {
        let backend = MemoryBackend::new();
        let ids = Arc::new(RunningIds::default());
        let watcher = tokio::spawn(
            ids.clone()
                .watch(Arc::new(backend.clone()), Duration::from_millis(10)),
        );
        let mut plain = ids.register("plain");
        let mut kill = ids.register("kill");
        let mut twice = ids.register("kill");
        backend.store(&revoked_meta("plain", None)).await.unwrap();
        backend
            .store(&revoked_meta("kill", Some(Signal::Kill)))
            .await
            .unwrap();
        let deadline = Duration::from_secs(10);
        assert_eq!(
            tokio::time::timeout(deadline, kill.requested())
                .await
                .unwrap(),
            "SIGKILL"
        );
        assert_eq!(
            tokio::time::timeout(deadline, twice.requested())
                .await
                .unwrap(),
            "SIGKILL"
        );
        // Fired entries are gone; the plain revoke is still watched and never fires.
        assert_eq!(ids.ids(), ["plain"]);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), plain.requested())
                .await
                .is_err()
        );
        drop(plain);
        assert!(ids.ids().is_empty(), "a dropped registration is forgotten");
        watcher.abort();
    }
}
