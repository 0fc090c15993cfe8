//! [`AsyncResult`]: a handle on a task's state and result.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{App, Error, Result};
pub use celeriac_core::backend::revoke::Signal;
use celeriac_core::{ErrorKind, RemoteError, TaskMeta, TaskState};

/// A handle on one task's result, by id.
///
/// Made by sending a task, or rebuilt from an id alone with [`AsyncResult::from_id`] (another
/// process, a web request). `T` is the output type [`AsyncResult::get`] decodes to; untyped
/// handles use `serde_json::Value`.
///
/// ```
/// # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
/// use std::time::Duration;
/// let r = celeriac::AsyncResult::<i64>::from_id(app, "0c2b6d7e-3a41-4f2e-b1a5-9e8d7c6b5a43");
/// if r.ready().await? {
///     let sum: i64 = r.get_timeout(Duration::from_secs(1)).await?;
/// #   let _ = sum;
/// }
/// # Ok(()) }
/// ```
pub struct AsyncResult<T = Value> {
    id: String,
    app: App,
    /// When this handle's task was sent, for handles made by sending it.
    sent_at: Option<tokio::time::Instant>,
    _output: PhantomData<fn() -> T>,
}

/// A wait that starts less than this after the task was sent tells the backend the result is
/// not there yet ([`ResultBackend::wait_just_sent`]): the fastest round trips take about half a
/// millisecond on one machine.
///
/// [`ResultBackend::wait_just_sent`]: celeriac_core::ResultBackend::wait_just_sent
const JUST_SENT: Duration = Duration::from_millis(1);

impl<T> Clone for AsyncResult<T> {
    fn clone(&self) -> Self {
        AsyncResult {
            id: self.id.clone(),
            app: self.app.clone(),
            sent_at: self.sent_at,
            _output: PhantomData,
        }
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl<T> AsyncResult<T> {
    /// A handle on the task `id` in `app`'s result backend.
    pub fn from_id(app: &App, id: impl Into<String>) -> Self {
        AsyncResult {
            id: id.into(),
            app: app.clone(),
            sent_at: None,
            _output: PhantomData,
        }
    }

    /// A handle on the task `id` that was sent just now.
    pub(crate) fn sent(app: &App, id: impl Into<String>) -> Self {
        AsyncResult {
            sent_at: Some(tokio::time::Instant::now()),
            ..AsyncResult::from_id(app, id)
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored record; PENDING when there is none.
    pub async fn meta(&self) -> Result<TaskMeta> {
        Ok(self
            .app
            .backend()
            .get(&self.id)
            .await?
            .unwrap_or_else(|| TaskMeta::pending(self.id.clone())))
    }

    /// The current state.
    pub async fn state(&self) -> Result<TaskState> {
        Ok(self.meta().await?.status)
    }

    /// Whether the task has finished (SUCCESS, FAILURE or REVOKED).
    pub async fn ready(&self) -> Result<bool> {
        Ok(self.state().await?.is_ready())
    }

    /// Whether the task succeeded.
    pub async fn successful(&self) -> Result<bool> {
        Ok(self.state().await? == TaskState::Success)
    }

    /// Whether the task failed (FAILURE).
    pub async fn failed(&self) -> Result<bool> {
        Ok(self.state().await? == TaskState::Failure)
    }

    /// The raw stored result: the value on success, the exception map on failure, null while
    /// pending.
    pub async fn result(&self) -> Result<Value> {
        Ok(self.meta().await?.result)
    }

    /// The stored exception, for FAILURE, RETRY and REVOKED.
    pub async fn error(&self) -> Result<Option<RemoteError>> {
        Ok(self.meta().await?.error())
    }

    /// The traceback of a failed task.
    pub async fn traceback(&self) -> Result<Option<String>> {
        Ok(self.meta().await?.traceback)
    }

    /// Deletes the stored result.
    pub async fn forget(&self) -> Result<()> {
        self.app.backend().forget(&self.id).await
    }

    /// Revokes the task: a worker that has not started it will not run it; a running one is
    /// left to finish (see [`AsyncResult::revoke_with`] to stop it).
    ///
    /// Stored as REVOKED in the result backend, so it holds across worker restarts and on every
    /// worker, for as long as the backend keeps results (`result_expires`). A task that is
    /// already ready is left as it is.
    pub async fn revoke(&self) -> Result<()> {
        self.revoke_with(RevokeOptions::default()).await
    }

    /// Revokes the task with options; Celery's `revoke(terminate=True, signal="SIGTERM")`.
    ///
    /// With [`RevokeOptions::terminate`], a worker running the task stops it within about
    /// half a second (`revoke_poll_interval`): it fires the task's cancellation, and under the
    /// processes pool sends the signal to the task's child (SIGKILL after the cold-shutdown
    /// grace if it is still there); an async task still running after the grace is aborted, a
    /// blocking one on a thread is abandoned (a thread cannot be killed). The task ends
    /// REVOKED (`TaskRevokedError('terminated')`), not FAILURE, and its message is acked.
    pub async fn revoke_with(&self, options: RevokeOptions) -> Result<()> {
        let signal = options
            .terminate
            .then(|| options.signal.unwrap_or_default());
        let existing = self.app.backend().get(&self.id).await?;
        if existing.as_ref().is_some_and(|m| m.status.is_ready()) {
            return Ok(());
        }
        let meta = celeriac_core::backend::revoke::revoked_meta(self.id.clone(), signal);
        self.app.backend().store(&meta).await?;
        Ok(())
    }

    /// Waits for a ready state and returns its record, without decoding.
    pub async fn wait_meta(&self, timeout: Option<Duration>) -> Result<TaskMeta> {
        let backend = self.app.backend();
        match self.sent_at {
            Some(at) if at.elapsed() < JUST_SENT => match backend.capabilities().just_sent {
                Some(wait) => wait.wait_just_sent(&self.id, timeout).await,
                None => backend.wait(&self.id, timeout).await,
            },
            _ => backend.wait(&self.id, timeout).await,
        }
    }
}

impl<T: DeserializeOwned> AsyncResult<T> {
    /// Waits for the task and returns its output.
    ///
    /// A failed or revoked task is an error of kind [`ErrorKind::TaskFailed`] whose
    /// [`Error::remote`] carries the exception type, message and traceback.
    pub async fn get(&self) -> Result<T> {
        self.get_inner(None).await
    }

    /// Like [`AsyncResult::get`], failing with [`ErrorKind::Timeout`] after `timeout`.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.get_inner(Some(timeout)).await
    }

    async fn get_inner(&self, timeout: Option<Duration>) -> Result<T> {
        let meta = self.wait_meta(timeout).await?;
        decode_ready(meta)
    }
}

/// How [`AsyncResult::revoke_with`] revokes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RevokeOptions {
    /// Also stop the task where it already runs.
    pub terminate: bool,
    /// The signal for a task running in a processes-pool child; `None` is SIGTERM. Parse a
    /// name (`"SIGKILL"`, `"kill"`) with `str::parse`.
    pub signal: Option<Signal>,
}

impl RevokeOptions {
    /// Revoke and terminate a running copy with SIGTERM.
    pub fn terminate() -> Self {
        RevokeOptions {
            terminate: true,
            signal: None,
        }
    }

    /// Terminate with `signal` instead of SIGTERM.
    #[must_use]
    pub fn signal(mut self, signal: Signal) -> Self {
        self.terminate = true;
        self.signal = Some(signal);
        self
    }
}

/// The output of a ready record, or the task's failure as an error.
pub(crate) fn decode_ready<T: DeserializeOwned>(meta: TaskMeta) -> Result<T> {
    if meta.status.propagates() {
        let remote = meta
            .error()
            .unwrap_or_else(|| RemoteError::new("Exception", "task failed"));
        return Err(Error::task_failed(remote));
    }
    serde_json::from_value(meta.result).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("task {} returned a value of another type", meta.task_id),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::ResultBackend;
    use celeriac_core::broker::BoxFuture;
    use celeriac_core::memory::MemoryBackend;
    use std::sync::{Arc, Mutex};

    async fn app() -> App {
        App::builder()
            .broker_url("memory://")
            .build()
            .await
            .unwrap()
    }

    /// The in-memory backend, noting which of its waits each caller picked.
    #[derive(Debug, Default)]
    struct NotingWaits {
        inner: MemoryBackend,
        waits: Mutex<Vec<&'static str>>,
    }

    impl NotingWaits {
        fn note(&self, wait: &'static str) {
            self.waits.lock().unwrap().push(wait);
        }
    }

    impl ResultBackend for NotingWaits {
        fn driver(&self) -> &'static str {
            self.inner.driver()
        }
        fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
            self.inner.store(meta)
        }
        fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
            self.inner.get(task_id)
        }
        fn wait<'a>(
            &'a self,
            task_id: &'a str,
            timeout: Option<Duration>,
        ) -> BoxFuture<'a, Result<TaskMeta>> {
            self.note("wait");
            self.inner.wait(task_id, timeout)
        }
        fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
            self.inner.forget(task_id)
        }
        fn save_group<'a>(
            &'a self,
            group_id: &'a str,
            task_ids: &'a [String],
        ) -> BoxFuture<'a, Result<()>> {
            self.inner.save_group(group_id, task_ids)
        }
        fn restore_group<'a>(
            &'a self,
            group_id: &'a str,
        ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
            self.inner.restore_group(group_id)
        }
        fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
            self.inner.incr(key, by)
        }
        fn close(&self) -> BoxFuture<'_, Result<()>> {
            self.inner.close()
        }
        fn capabilities(&self) -> celeriac_core::BackendCapabilities<'_> {
            celeriac_core::BackendCapabilities::none().just_sent(self)
        }
    }

    impl celeriac_core::backend::JustSentWait for NotingWaits {
        fn wait_just_sent<'a>(
            &'a self,
            task_id: &'a str,
            timeout: Option<Duration>,
        ) -> BoxFuture<'a, Result<TaskMeta>> {
            self.note("wait_just_sent");
            self.inner.wait(task_id, timeout)
        }
    }

    /// A handle made by sending tells the backend its result is not there yet when it is
    /// waited on at once; a later wait, a handle rebuilt from an id and its clones do not.
    #[tokio::test(start_paused = true)]
    async fn only_a_wait_right_after_the_send_is_a_just_sent_wait() {
        let backend = Arc::new(NotingWaits::default());
        let app = App::builder()
            .broker_url("memory://")
            .backend(backend.clone())
            .build()
            .await
            .unwrap();
        let sent = crate::Signature::<Value>::new("tests.noop")
            .apply_async(&app)
            .await
            .unwrap();
        let id = sent.id().to_owned();
        backend
            .store(&TaskMeta::success(id.clone(), serde_json::json!(2)))
            .await
            .unwrap();
        let later = sent.clone();
        assert_eq!(sent.get().await.unwrap(), serde_json::json!(2));
        tokio::time::sleep(JUST_SENT * 2).await;
        assert_eq!(later.get().await.unwrap(), serde_json::json!(2));
        let rebuilt = AsyncResult::<Value>::from_id(&app, id);
        assert_eq!(rebuilt.get().await.unwrap(), serde_json::json!(2));
        assert_eq!(
            *backend.waits.lock().unwrap(),
            ["wait_just_sent", "wait", "wait"]
        );
    }

    #[tokio::test]
    async fn revoke_with_terminate_stores_the_signal() {
        let app = app().await;
        let r = AsyncResult::<Value>::from_id(&app, "t1");
        let e = "SIGNOPE".parse::<Signal>().unwrap_err();
        assert!(e.to_string().contains("unknown signal \"SIGNOPE\""), "{e}");
        r.revoke_with(RevokeOptions::terminate().signal("kill".parse().unwrap()))
            .await
            .unwrap();
        let meta = r.meta().await.unwrap();
        assert_eq!(meta.status, TaskState::Revoked);
        assert_eq!(
            celeriac_core::backend::revoke::terminate_signal(&meta),
            Some("SIGKILL")
        );
        let err = r.error().await.unwrap().unwrap();
        assert_eq!(err.exc_type, "TaskRevokedError");

        let plain = AsyncResult::<Value>::from_id(&app, "t2");
        plain.revoke().await.unwrap();
        let meta = plain.meta().await.unwrap();
        assert_eq!(meta.status, TaskState::Revoked);
        assert_eq!(
            celeriac_core::backend::revoke::terminate_signal(&meta),
            None
        );
        assert_eq!(
            RevokeOptions::terminate().signal,
            None,
            "SIGTERM is the worker's default"
        );
    }

    #[tokio::test]
    async fn revoking_a_finished_task_changes_nothing() {
        let app = app().await;
        app.backend()
            .store(&TaskMeta::success("done", serde_json::json!(5)))
            .await
            .unwrap();
        let r = AsyncResult::<i64>::from_id(&app, "done");
        r.revoke_with(RevokeOptions::terminate()).await.unwrap();
        assert_eq!(r.get().await.unwrap(), 5);
    }
}
