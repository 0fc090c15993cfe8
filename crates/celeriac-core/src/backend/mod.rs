//! The result backend contract: where task states and results are kept.
//!
//! [`ResultBackend::store`] respects state precedence (see
//! [`TaskState::may_be_replaced_by`](crate::TaskState::may_be_replaced_by)): a late STARTED or a
//! duplicate run never overwrites SUCCESS. [`ResultBackend::wait`] returns when the task is
//! ready; drivers that can push (Redis pub/sub, Postgres LISTEN) do, the others poll with a
//! bounded backoff via [`poll_until_ready`].

pub mod revoke;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::meta::TaskMeta;

/// A result backend chosen at run time.
pub type DynBackend = Arc<dyn ResultBackend>;

/// A store of task results.
pub trait ResultBackend: Send + Sync + fmt::Debug + 'static {
    /// The driver's name, e.g. `sqlite`.
    fn driver(&self) -> &'static str;

    /// Stores `meta` unless the stored state takes precedence; returns whether it was written.
    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>>;

    /// Where this backend keeps task states, for brokers on the same server that can read a
    /// task's state with its message (see [`ConsumeOptions::result_probe`]); `None` (the
    /// default) when no broker can.
    ///
    /// [`ConsumeOptions::result_probe`]: crate::ConsumeOptions::result_probe
    fn result_probe(&self) -> Option<crate::ResultProbe> {
        None
    }

    /// The stored record of `task_id`, if any (an unknown id is PENDING to callers).
    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>>;

    /// The stored records of several ids at once, in the order asked (`None` for unknown ids).
    ///
    /// A worker reads the states of the tasks it runs with this a few times a second, to find
    /// revokes with `terminate`. The default reads one id after the other; drivers that can
    /// read many keys in one round trip should override it.
    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(task_ids.len());
            for id in task_ids {
                out.push(self.get(id).await?);
            }
            Ok(out)
        })
    }

    /// Waits until `task_id` is ready; fails with [`ErrorKind::Timeout`] after `timeout`.
    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>>;

    /// [`wait`](Self::wait) for a task sent a moment ago, whose result is almost surely not
    /// stored yet.
    ///
    /// Drivers that look for a stored result before they start watching for one (the Redis
    /// backend reads the key, and subscribes only when it is not there) can start watching at
    /// once, which saves a round trip on the way to the result. The default is `wait`.
    fn wait_just_sent<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        self.wait(task_id, timeout)
    }

    /// Deletes the record of `task_id`.
    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Saves the member ids of a group.
    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>>;

    /// The member ids of a saved group.
    fn restore_group<'a>(&'a self, group_id: &'a str)
    -> BoxFuture<'a, Result<Option<Vec<String>>>>;

    /// Atomically adds `by` to the counter `key` and returns the new value (chord counting).
    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>>;

    /// Closes the backend.
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// The queue results of tasks sent through this backend's app come back on, for backends
    /// that deliver results as messages (Celery's `rpc://`): the app puts it in each message's
    /// `reply_to`. `None` for stores that are read by task id.
    fn reply_to(&self) -> Option<String> {
        None
    }

    /// Announces a chord of `size` header members under `group_id`, before any member is
    /// sent, for backends with a chord protocol of their own (Celery's Redis backend sets
    /// `celery-taskset-meta-<gid>.s`, which Python workers need to fire the body). The default does
    /// nothing.
    fn set_chord_size<'a>(&'a self, group_id: &'a str, size: usize) -> BoxFuture<'a, Result<()>> {
        let _ = (group_id, size);
        Box::pin(async { Ok(()) })
    }

    /// Records a returned chord header member in the backend's own chord protocol, and says
    /// whether the chord is complete (then with every member's outcome, to one caller only).
    /// The default, and any chord the backend was not told the size of, is
    /// [`ChordStatus::NotNative`](crate::canvas::ChordStatus::NotNative): the worker counts
    /// with [`ResultBackend::incr`] instead (see [`crate::canvas`]).
    fn chord_part_return<'a>(
        &'a self,
        part: crate::canvas::ChordPart<'a>,
    ) -> BoxFuture<'a, Result<crate::canvas::ChordStatus>> {
        let _ = part;
        Box::pin(async { Ok(crate::canvas::ChordStatus::NotNative) })
    }
}

/// Waits for a ready record by polling `get`, backing off from 1 ms to `max_interval`.
///
/// For drivers that cannot push; the first checks are quick so short tasks are seen at once.
pub async fn poll_until_ready<B: ResultBackend + ?Sized>(
    backend: &B,
    task_id: &str,
    timeout: Option<Duration>,
    max_interval: Duration,
) -> Result<TaskMeta> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut interval = Duration::from_millis(1);
    loop {
        if let Some(meta) = backend.get(task_id).await? {
            if meta.status.is_ready() {
                return Ok(meta);
            }
        }
        let mut sleep = interval;
        if let Some(deadline) = deadline {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(timeout_error(task_id, timeout));
            }
            sleep = sleep.min(deadline - now);
        }
        tokio::time::sleep(sleep).await;
        interval = (interval * 2).min(max_interval);
    }
}

/// The error `wait` returns when the timeout passes.
pub fn timeout_error(task_id: &str, timeout: Option<Duration>) -> Error {
    let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
    Error::new(
        ErrorKind::Timeout,
        format!("task {task_id} not ready after {secs:.3}s"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TaskState;
    use crate::memory::MemoryBackend;

    #[tokio::test]
    async fn get_many_answers_in_order_with_none_for_unknown_ids() {
        let b = MemoryBackend::new();
        b.store(&TaskMeta::success("a", serde_json::json!(1)))
            .await
            .unwrap();
        b.store(&TaskMeta::new(
            "c",
            TaskState::Started,
            serde_json::Value::Null,
        ))
        .await
        .unwrap();
        let ids = ["c".to_owned(), "b".to_owned(), "a".to_owned()];
        let got = b.get_many(&ids).await.unwrap();
        let states: Vec<_> = got
            .iter()
            .map(|m| m.as_ref().map(|m| m.status.clone()))
            .collect();
        assert_eq!(
            states,
            [Some(TaskState::Started), None, Some(TaskState::Success)]
        );
        assert!(b.get_many(&[]).await.unwrap().is_empty());
    }
}
