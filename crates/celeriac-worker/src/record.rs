//! Writing task states to the result backend: [`Recorder`].
//!
//! For the delivery pipeline. One place decides what is stored: STARTED only when tracking is
//! on, SUCCESS and RETRY unless the task ignores results, FAILURE and REVOKED always (a
//! failure nobody can see is worse than a stored one). Every record carries Celery's extended
//! fields (name, args, kwargs, worker, retries, queue, parent and group ids). A backend error
//! is logged, never fatal: the task has run either way. But a transient one (a lost
//! connection, a full disk) on a final state (SUCCESS, FAILURE, REVOKED) is retried, backing
//! off from 100 ms to 5 s, until the state is stored; the delivery is settled only after, so
//! an acks-late task is never acknowledged without its result, and an early-acked one still
//! gets its result once the backend works again. Meanwhile the task holds its slot, which
//! stops the worker from taking more work than it can record; a cold shutdown drops the
//! wait (acks-late tasks are then handed back, as running ones are).

use std::time::Duration;

use celeriac_core::meta::RemoteError;
use celeriac_core::{BoxFuture, DynBackend, TaskMeta, TaskState};
use serde_json::Value;

use crate::pipeline::{Layer, Next, Outcome};
use crate::request::{CELERY_EXC, Request};

/// A traceback in Python's shape, so Celery tools show it as they show their own: where the
/// task ran (on worker `hostname`), the error's cause chain (or the text the task gave), then
/// `Type: message`. Stored with FAILURE and RETRY, and sent in `task-failed` events.
pub(crate) fn traceback(req: &Request, hostname: &str, err: &RemoteError) -> String {
    let mut tb = format!(
        "Traceback (most recent call last):\n  task {}[{}] on {}, queue {}, retries {}\n",
        req.name(),
        req.id(),
        hostname,
        req.queue,
        req.message.headers.retries
    );
    if let Some(detail) = &err.traceback {
        for line in detail.lines() {
            tb.push_str("    ");
            tb.push_str(line);
            tb.push('\n');
        }
    }
    tb.push_str(&err.summary());
    tb
}

/// Stores each outcome's state once the inner layers are done.
#[derive(Debug)]
pub(crate) struct RecordLayer(pub(crate) Recorder);

impl Layer for RecordLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let outcome = next.run(req).await;
            let r = &self.0;
            match &outcome {
                Outcome::Succeeded(value) => r.success(req, value.clone()).await,
                Outcome::Errored(err) => r.failure(req, &err.to_remote()).await,
                Outcome::Failed(err) | Outcome::DeadLettered { error: err, .. } => {
                    r.failure(req, err).await;
                }
                Outcome::Retried { cause, .. } => r.retry(req, cause).await,
                Outcome::Revoked { reason } => r.revoked(req, reason).await,
                _ => {}
            }
            outcome
        })
    }
}

/// Stores STARTED before the body runs, when the worker or the task tracks it.
#[derive(Debug)]
pub(crate) struct TrackStartedLayer {
    pub(crate) recorder: Recorder,
    /// The worker's `track_started`; a task's own option also turns it on.
    pub(crate) always: bool,
}

impl Layer for TrackStartedLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        if !(self.always || req.def.options.track_started) {
            return next.run(req);
        }
        Box::pin(async move {
            self.recorder.started(req).await;
            next.run(req).await
        })
    }
}

/// Stores task states for one worker.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    backend: Option<DynBackend>,
    hostname: String,
}

impl Recorder {
    pub(crate) fn new(backend: Option<DynBackend>, hostname: String) -> Self {
        Recorder { backend, hostname }
    }

    /// A record of `req` in `status` with `result`, extended fields filled.
    pub(crate) fn meta(&self, req: &Request, status: TaskState, result: Value) -> TaskMeta {
        let h = &req.message.headers;
        let mut m = TaskMeta::new(req.id(), status, result);
        m.name = Some(req.name().to_owned());
        m.args = Some(req.body.args.clone());
        m.kwargs = Some(req.body.kwargs.clone());
        m.worker = Some(self.hostname.clone());
        m.retries = Some(h.retries);
        m.queue = Some(req.queue.clone());
        m.parent_id = h.parent_id.clone();
        m.group_id = h.group.clone();
        m.reply_to = req.message.properties.reply_to.clone();
        m
    }

    fn exception(&self, req: &Request, status: TaskState, err: &RemoteError) -> TaskMeta {
        let mut m = self.meta(req, status.clone(), err.to_exception_map());
        m.traceback = match status {
            TaskState::Failure | TaskState::Retry => Some(self.traceback(req, err)),
            _ => err.traceback.clone(),
        };
        m
    }

    fn traceback(&self, req: &Request, err: &RemoteError) -> String {
        traceback(req, &self.hostname, err)
    }

    pub(crate) async fn started(&self, req: &Request) {
        if req.ignore_result() {
            return;
        }
        let pid_and_host = TaskMeta::started(req.id(), &self.hostname).result;
        self.store(&self.meta(req, TaskState::Started, pid_and_host))
            .await;
    }

    /// SUCCESS, unless results are ignored; a chord header member stores it anyway, because the
    /// body is built from the stored results.
    pub(crate) async fn success(&self, req: &Request, value: Value) {
        if !req.ignore_result() || req.body.embed.chord.is_some() {
            self.store(&self.meta(req, TaskState::Success, value)).await;
        }
    }

    pub(crate) async fn failure(&self, req: &Request, err: &RemoteError) {
        self.store(&self.exception(req, TaskState::Failure, err))
            .await;
    }

    pub(crate) async fn retry(&self, req: &Request, cause: &RemoteError) {
        if !req.ignore_result() {
            self.store(&self.exception(req, TaskState::Retry, cause))
                .await;
        }
    }

    /// REVOKED with Celery's `TaskRevokedError(reason)`, e.g. `expired`.
    pub(crate) async fn revoked(&self, req: &Request, reason: &str) {
        let err = RemoteError::new("TaskRevokedError", reason).with_module(CELERY_EXC);
        self.store(&self.exception(req, TaskState::Revoked, &err))
            .await;
    }

    /// FAILURE for a message that could not become a request (only its id, name and reply
    /// queue are known).
    pub(crate) async fn refused(
        &self,
        task_id: &str,
        name: Option<&str>,
        reply_to: Option<&str>,
        err: &RemoteError,
    ) {
        let mut m = TaskMeta::exception(task_id, TaskState::Failure, err);
        m.name = name.map(str::to_owned);
        m.reply_to = reply_to.map(str::to_owned);
        m.worker = Some(self.hostname.clone());
        self.store(&m).await;
    }

    /// The state of `task_id` if it is ready (SUCCESS, FAILURE, REVOKED): such a task is not
    /// run again. A backend error counts as not ready: running twice beats never running.
    pub(crate) async fn ready_state(&self, task_id: &str) -> Option<TaskState> {
        let backend = self.backend.as_ref()?;
        match backend.get(task_id).await {
            Ok(Some(m)) if m.status.is_ready() => Some(m.status),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the task's stored state; running it");
                None
            }
        }
    }

    /// Stores `meta`; a final state is stored again after a transient error, until it is.
    async fn store(&self, meta: &TaskMeta) {
        let Some(backend) = &self.backend else {
            return;
        };
        let mut failures = 0;
        loop {
            match backend.store(meta).await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, state = %meta.status, "stored the task's state");
                    }
                    return;
                }
                Err(e) if e.is_transient() && meta.status.is_ready() => {
                    let retry_in = store_backoff(failures);
                    tracing::error!(
                        error = %format_args!("{e:#}"),
                        state = %meta.status,
                        retry_in = retry_in.as_secs_f64(),
                        "cannot store the task's state; retrying (the message is not settled before)"
                    );
                    tokio::time::sleep(retry_in).await;
                    failures += 1;
                }
                Err(e) => {
                    tracing::error!(error = %format_args!("{e:#}"), state = %meta.status, "cannot store the task's state");
                    return;
                }
            }
        }
    }
}

/// How long to wait before storing a final state again after its `failures`th failure (from
/// 0): 100 ms, doubling up to 5 s.
fn store_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use celeriac_core::memory::MemoryBackend;
    use celeriac_core::{ResultBackend, TaskError};

    use super::*;
    use crate::pipeline::testing::around;
    use crate::request::tests::request_with;

    #[tokio::test]
    async fn each_outcome_stores_its_state_with_celerys_extended_fields() {
        let backend = MemoryBackend::new();
        let recorder = || Recorder::new(Some(Arc::new(backend.clone())), "w@h".into());
        type Case = (&'static str, fn() -> Outcome, Option<TaskState>);
        let cases: [Case; 5] = [
            (
                "ok",
                || Outcome::Succeeded(5.into()),
                Some(TaskState::Success),
            ),
            (
                "err",
                || Outcome::Errored(TaskError::fail("no")),
                Some(TaskState::Failure),
            ),
            (
                "rev",
                || Outcome::Revoked {
                    reason: "expired".into(),
                },
                Some(TaskState::Revoked),
            ),
            ("req", || Outcome::Requeued, None),
            ("skip", || Outcome::Skipped(TaskState::Success), None),
        ];
        for (id, outcome, state) in cases {
            let (stack, _) = around(RecordLayer(recorder()), move |_| outcome());
            let (req, _) = request_with(id, 0, |_, _| {});
            stack.run(&req).await;
            let stored = backend.get(id).await.unwrap();
            assert_eq!(stored.as_ref().map(|m| m.status.clone()), state, "{id}");
            if let Some(m) = stored {
                assert_eq!(m.name.as_deref(), Some("tasks.add"));
                assert_eq!(m.worker.as_deref(), Some("w@h"));
                assert_eq!(m.queue.as_deref(), Some("celery"));
            }
        }
        let (stack, _) = around(RecordLayer(recorder()), |_| Outcome::Succeeded(1.into()));
        let (req, _) = request_with("ignored", 0, |_, o| o.ignore_result = true);
        stack.run(&req).await;
        assert!(backend.get("ignored").await.unwrap().is_none());
    }

    /// A backend whose first `fails` stores fail, transiently or not.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryBackend,
        fails: std::sync::atomic::AtomicUsize,
        transient: bool,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl ResultBackend for Flaky {
        fn driver(&self) -> &'static str {
            "flaky"
        }

        fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, celeriac_core::Result<bool>> {
            use std::sync::atomic::Ordering::SeqCst;
            self.calls.fetch_add(1, SeqCst);
            let failing = self
                .fails
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !failing {
                return self.inner.store(meta);
            }
            let e = celeriac_core::Error::backend("cannot store result")
                .with_source(std::io::Error::other("database or disk is full"));
            let e = if self.transient { e.transient() } else { e };
            Box::pin(async move { Err(e) })
        }

        fn get<'a>(
            &'a self,
            task_id: &'a str,
        ) -> BoxFuture<'a, celeriac_core::Result<Option<TaskMeta>>> {
            self.inner.get(task_id)
        }

        fn wait<'a>(
            &'a self,
            task_id: &'a str,
            timeout: Option<Duration>,
        ) -> BoxFuture<'a, celeriac_core::Result<TaskMeta>> {
            self.inner.wait(task_id, timeout)
        }

        fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, celeriac_core::Result<()>> {
            self.inner.forget(task_id)
        }

        fn save_group<'a>(
            &'a self,
            group_id: &'a str,
            task_ids: &'a [String],
        ) -> BoxFuture<'a, celeriac_core::Result<()>> {
            self.inner.save_group(group_id, task_ids)
        }

        fn restore_group<'a>(
            &'a self,
            group_id: &'a str,
        ) -> BoxFuture<'a, celeriac_core::Result<Option<Vec<String>>>> {
            self.inner.restore_group(group_id)
        }

        fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, celeriac_core::Result<i64>> {
            self.inner.incr(key, by)
        }

        fn close(&self) -> BoxFuture<'_, celeriac_core::Result<()>> {
            self.inner.close()
        }
    }

    /// A final state that cannot be stored for a while (a full disk, a lost connection) is
    /// stored again until it is: the layer returns, and the delivery is settled, only then.
    /// A permanent error is not retried.
    // See: issue 23 (D)
    #[tokio::test(start_paused = true)]
    async fn a_final_state_is_stored_again_until_it_is_stored() {
        use std::sync::atomic::Ordering::SeqCst;
        for (transient, calls, stored) in [(true, 6, true), (false, 1, false)] {
            let backend = Arc::new(Flaky {
                inner: MemoryBackend::new(),
                fails: 5.into(),
                transient,
                calls: 0.into(),
            });
            let recorder = Recorder::new(Some(backend.clone()), "w@h".into());
            let (stack, _) = around(RecordLayer(recorder), |_| Outcome::Succeeded(5.into()));
            let (req, _) = request_with("full", 0, |_, _| {});
            let started = tokio::time::Instant::now();
            stack.run(&req).await;
            assert_eq!(backend.calls.load(SeqCst), calls, "transient: {transient}");
            let m = backend.inner.get("full").await.unwrap();
            assert_eq!(m.is_some(), stored, "transient: {transient}");
            if transient {
                // 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of backoff.
                assert_eq!(started.elapsed(), Duration::from_millis(3_100));
            }
        }
        assert_eq!(store_backoff(0), Duration::from_millis(100));
        assert_eq!(store_backoff(40), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn started_is_stored_only_when_tracked() {
        let backend = MemoryBackend::new();
        let layer = TrackStartedLayer {
            recorder: Recorder::new(Some(Arc::new(backend.clone())), "w@h".into()),
            always: false,
        };
        let (stack, _) = around(layer, |_| Outcome::Requeued);
        let (req, _) = request_with("quiet", 0, |_, _| {});
        stack.run(&req).await;
        assert!(backend.get("quiet").await.unwrap().is_none());
        let (req, _) = request_with("tracked", 0, |_, o| o.track_started = true);
        stack.run(&req).await;
        let m = backend.get("tracked").await.unwrap().unwrap();
        assert_eq!(m.status, TaskState::Started);
    }
}
