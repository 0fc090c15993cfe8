//! Writing task states to the result backend: [`Recorder`].
//!
//! For the delivery pipeline. One place decides what is stored: STARTED only when tracking is
//! on, SUCCESS and RETRY unless the task ignores results, FAILURE and REVOKED always (a
//! failure nobody can see is worse than a stored one). Every record carries Celery's extended
//! fields (name, args, kwargs, worker, retries, queue, parent and group ids). A backend error
//! is logged, never fatal: the task has run either way.

use celeriac_core::meta::RemoteError;
use celeriac_core::{DynBackend, TaskMeta, TaskState};
use serde_json::Value;

use crate::request::{CELERY_EXC, Request};

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

    /// The result backend, if the worker has one.
    pub(crate) fn backend(&self) -> Option<&DynBackend> {
        self.backend.as_ref()
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

    /// A traceback in Python's shape, so Celery tools show it as they show their own: where the
    /// task ran, the error's cause chain (or the text the task gave), then `Type: message`.
    fn traceback(&self, req: &Request, err: &RemoteError) -> String {
        let mut tb = format!(
            "Traceback (most recent call last):\n  task {}[{}] on {}, queue {}, retries {}\n",
            req.name(),
            req.id(),
            self.hostname,
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

    /// FAILURE for a message that could not become a request (only its id is known).
    pub(crate) async fn refused(&self, task_id: &str, name: Option<&str>, err: &RemoteError) {
        let mut m = TaskMeta::exception(task_id, TaskState::Failure, err);
        m.name = name.map(str::to_owned);
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

    async fn store(&self, meta: &TaskMeta) {
        let Some(backend) = &self.backend else {
            return;
        };
        if let Err(e) = backend.store(meta).await {
            tracing::error!(error = %e, state = %meta.status, "cannot store the task's state");
        }
    }
}
