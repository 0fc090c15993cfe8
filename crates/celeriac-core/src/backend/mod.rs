//! The result backend contract: where task states and results are kept.
//!
//! [`ResultBackend::store`] respects state precedence (see
//! [`TaskState::may_be_replaced_by`](crate::TaskState::may_be_replaced_by)): a late STARTED or a
//! duplicate run never overwrites SUCCESS. [`ResultBackend::wait`] returns when the task is
//! ready; drivers that can push (Redis pub/sub, Postgres LISTEN) do, the others poll with a
//! bounded backoff via [`poll_until_ready`].
//!
//! The trait holds what every backend must do. What only some can do is a capability trait
//! of its own ([`ChordProtocol`], [`ReplyQueue`], [`JustSentWait`]) that a driver hands out
//! through [`ResultBackend::capabilities`]; callers check and fall back, nothing panics.
//!
//! # How to add a driver
//!
//! A driver is a crate that depends on `celeriac-core` alone. It implements the contract
//! ([`ResultBackend`] here; [`Broker`](crate::Broker) with its [`Consumer`](crate::Consumer)
//! and [`Acker`](crate::Acker) for a broker), hands out the capabilities it has, and registers
//! a URL scheme in the app's [`Drivers`](crate::Drivers). The conformance suites of the
//! `celeriac-test` crate (`conformance::backend`, `conformance::broker`) then run every case
//! of the contract against it, as they run against the drivers of this workspace.
//!
//! A backend that keeps results in a map, opened from `kv://` URLs:
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use celeriac_core::backend::{poll_until_ready, ResultBackend};
//! use celeriac_core::{BoxFuture, Config, Drivers, DynBackend, Result, TaskMeta};
//!
//! #[derive(Debug, Default)]
//! struct KvBackend {
//!     results: Mutex<HashMap<String, TaskMeta>>,
//!     groups: Mutex<HashMap<String, Vec<String>>>,
//!     counters: Mutex<HashMap<String, i64>>,
//! }
//!
//! impl ResultBackend for KvBackend {
//!     fn driver(&self) -> &'static str {
//!         "kv"
//!     }
//!     fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
//!         Box::pin(async move {
//!             let mut results = self.results.lock().unwrap();
//!             // State precedence: a late STARTED never replaces SUCCESS.
//!             if let Some(old) = results.get(&meta.task_id) {
//!                 if !old.status.may_be_replaced_by(&meta.status) {
//!                     return Ok(false);
//!                 }
//!             }
//!             results.insert(meta.task_id.clone(), meta.clone());
//!             Ok(true)
//!         })
//!     }
//!     fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
//!         Box::pin(async move { Ok(self.results.lock().unwrap().get(id).cloned()) })
//!     }
//!     fn wait<'a>(
//!         &'a self,
//!         id: &'a str,
//!         timeout: Option<Duration>,
//!     ) -> BoxFuture<'a, Result<TaskMeta>> {
//!         // No push: poll with the shared bounded backoff.
//!         Box::pin(poll_until_ready(self, id, timeout, Duration::from_millis(50)))
//!     }
//!     fn forget<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
//!         Box::pin(async move {
//!             self.results.lock().unwrap().remove(id);
//!             Ok(())
//!         })
//!     }
//!     fn save_group<'a>(&'a self, gid: &'a str, ids: &'a [String]) -> BoxFuture<'a, Result<()>> {
//!         Box::pin(async move {
//!             self.groups.lock().unwrap().insert(gid.to_owned(), ids.to_vec());
//!             Ok(())
//!         })
//!     }
//!     fn restore_group<'a>(&'a self, gid: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
//!         Box::pin(async move { Ok(self.groups.lock().unwrap().get(gid).cloned()) })
//!     }
//!     fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
//!         Box::pin(async move {
//!             let mut counters = self.counters.lock().unwrap();
//!             let n = counters.entry(key.to_owned()).or_default();
//!             *n += by;
//!             Ok(*n)
//!         })
//!     }
//!     fn close(&self) -> BoxFuture<'_, Result<()>> {
//!         Box::pin(async { Ok(()) })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! let mut drivers = Drivers::new();
//! drivers.add_backend("kv", |_url, _config| {
//!     Box::pin(async { Ok(Arc::new(KvBackend::default()) as DynBackend) })
//! });
//! let backend = drivers.open_backend("kv://", &Config::default()).await?;
//! backend.store(&TaskMeta::success("t1", 3.into())).await?;
//! let done = backend.wait("t1", Some(Duration::from_secs(1))).await?;
//! assert_eq!(done.result, 3);
//! # Ok(()) }
//! ```

pub mod revoke;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{BoxFuture, ResultProbe};
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

    /// What this backend can do beyond the contract, each an optional trait of its own
    /// (a chord protocol, a reply queue, ...). The default: nothing more.
    fn capabilities(&self) -> BackendCapabilities<'_> {
        BackendCapabilities::none()
    }
}

/// What a result backend can do beyond the [`ResultBackend`] contract: each capability is a
/// trait of its own that a driver implements when it can, and hands out here.
///
/// Callers ask for what they need and fall back when it is missing, e.g. the worker counts a
/// chord's parts with [`ResultBackend::incr`] unless the backend speaks a chord protocol of
/// its own:
///
/// ```
/// # use celeriac_core::ResultBackend;
/// # async fn part_done(backend: &dyn ResultBackend, gid: &str) -> celeriac_core::Result<()> {
/// match backend.capabilities().chords {
///     Some(chords) => { /* chords.chord_part_return(...) */ }
///     None => { backend.incr(gid, 1).await?; }
/// }
/// # Ok(()) }
/// ```
///
/// A driver fills the fields it supports:
///
/// ```
/// # use celeriac_core::backend::{BackendCapabilities, ReplyQueue};
/// #[derive(Debug)]
/// struct Rpc { queue: String }
/// impl ReplyQueue for Rpc {
///     fn reply_to(&self) -> &str { &self.queue }
/// }
/// impl Rpc {
///     // Called from its `ResultBackend::capabilities`.
///     fn capabilities(&self) -> BackendCapabilities<'_> {
///         BackendCapabilities::none().reply_queue(self)
///     }
/// }
/// # assert!(Rpc { queue: "q".into() }.capabilities().reply_queue.is_some());
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct BackendCapabilities<'a> {
    /// A chord protocol of the backend's own (Celery's Redis chord keys), which Python
    /// workers count chord parts with.
    pub chords: Option<&'a dyn ChordProtocol>,
    /// Results travel as messages to the sending process's reply queue (Celery's `rpc://`).
    pub reply_queue: Option<&'a dyn ReplyQueue>,
    /// A faster wait for a task sent a moment ago.
    pub just_sent: Option<&'a dyn JustSentWait>,
    /// Where the backend keeps task states, in terms a broker on the same server can use
    /// to read a task's state with its message (see
    /// [`ConsumeOptions::result_probe`](crate::ConsumeOptions::result_probe)).
    pub probe: Option<ResultProbe>,
    /// Rate limits, locks and slots shared by every worker on this store (cluster rate
    /// limits, unique tasks, concurrency caps; see [`crate::coord`]).
    pub coordination: Option<&'a dyn crate::coord::Coordination>,
    /// Python workers join chords on this backend only through Celery's
    /// `celery.chord_unlock` task (they count no chord parts: Celery's `db+` SQL tables), so
    /// a chord sent here sends one too ([`crate::canvas::announce_chord`]).
    pub chord_unlock: bool,
}

impl<'a> BackendCapabilities<'a> {
    /// No capability beyond the contract.
    pub fn none() -> Self {
        Self::default()
    }

    /// With a chord protocol.
    #[must_use]
    pub fn chords(mut self, chords: &'a dyn ChordProtocol) -> Self {
        self.chords = Some(chords);
        self
    }

    /// With a reply queue.
    #[must_use]
    pub fn reply_queue(mut self, queue: &'a dyn ReplyQueue) -> Self {
        self.reply_queue = Some(queue);
        self
    }

    /// With a wait for tasks just sent.
    #[must_use]
    pub fn just_sent(mut self, wait: &'a dyn JustSentWait) -> Self {
        self.just_sent = Some(wait);
        self
    }

    /// With a result probe.
    #[must_use]
    pub fn probe(mut self, probe: ResultProbe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// With a coordination store.
    #[must_use]
    pub fn coordination(mut self, store: &'a dyn crate::coord::Coordination) -> Self {
        self.coordination = Some(store);
        self
    }

    /// Chords here are joined by `celery.chord_unlock` (see [`Self::chord_unlock`]).
    #[must_use]
    pub fn chord_unlock(mut self) -> Self {
        self.chord_unlock = true;
        self
    }
}

impl fmt::Debug for BackendCapabilities<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendCapabilities")
            .field("chords", &self.chords.is_some())
            .field("reply_queue", &self.reply_queue.map(ReplyQueue::reply_to))
            .field("just_sent", &self.just_sent.is_some())
            .field("probe", &self.probe)
            .field("coordination", &self.coordination.is_some())
            .field("chord_unlock", &self.chord_unlock)
            .finish()
    }
}

/// A chord protocol of the backend's own: Celery's Redis backend counts a chord's returned
/// parts in keys of its own (`celery-taskset-meta-<gid>.j/.t/.s`), which Python workers
/// rely on to fire the body. Without it the worker counts with [`ResultBackend::incr`]
/// (see [`crate::canvas`]).
pub trait ChordProtocol: Send + Sync {
    /// Announces a chord of `size` header members under `group_id`, before any member is
    /// sent.
    fn set_chord_size<'a>(&'a self, group_id: &'a str, size: usize) -> BoxFuture<'a, Result<()>>;

    /// Records a returned chord header member and says whether the chord is complete (then
    /// with every member's outcome, to one caller only). A chord the backend was not told
    /// the size of is [`ChordStatus::NotNative`](crate::canvas::ChordStatus::NotNative):
    /// count it with [`ResultBackend::incr`].
    fn chord_part_return<'a>(
        &'a self,
        part: crate::canvas::ChordPart<'a>,
    ) -> BoxFuture<'a, Result<crate::canvas::ChordStatus>>;
}

/// Results that travel as messages to the sender's own queue (Celery's `rpc://`) instead of
/// being stored by task id: the app puts [`reply_to`](Self::reply_to) in each message it
/// sends, and the worker sends the result there.
pub trait ReplyQueue: Send + Sync {
    /// The queue results of this process's tasks come back on.
    fn reply_to(&self) -> &str;
}

/// A wait for a task sent a moment ago, whose result is almost surely not stored yet.
///
/// Backends that look for a stored result before they start watching for one (the Redis
/// backend reads the key, and subscribes only when it is not there) can start watching at
/// once, which saves a round trip on the way to the result.
pub trait JustSentWait: Send + Sync {
    /// Like [`ResultBackend::wait`].
    fn wait_just_sent<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>>;
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
