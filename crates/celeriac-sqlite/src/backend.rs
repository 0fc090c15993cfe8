//! [`SqliteBackend`]: task results, groups and chord counters in a SQLite file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, timeout_error};
use celeriac_core::{
    BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, ResultProbe, TaskMeta, TaskState,
};
use rusqlite::OptionalExtension;

use crate::conn::{Conn, Db, now_ms};
use crate::options::{Location, SqliteOptions};

const KIND: ErrorKind = ErrorKind::Backend;

/// How often expired rows are deleted (lazily, by a store that finds the sweep due).
const SWEEP_EVERY_MS: i64 = 60_000;
/// At most this many expired results are deleted per sweep, to keep batches short.
const SWEEP_LIMIT: i64 = 1000;
/// Longest sleep of a waiter between reads, in case a change notice was missed.
const WAIT_RECHECK: Duration = Duration::from_millis(500);

/// A result backend in a SQLite file (`sqlite://path.db`). Clones share one connection.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{ResultBackend, TaskMeta};
/// use celeriac_sqlite::{SqliteBackend, SqliteOptions};
///
/// let backend = SqliteBackend::open("celeriac.db", SqliteOptions::default()).await?;
/// backend.store(&TaskMeta::success("id-1", 4.into())).await?;
/// let meta = backend.wait("id-1", None).await?;
/// assert_eq!(meta.result, 4);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Arc<Conn>,
    expires_ms: Option<i64>,
    next_sweep: AtomicI64,
    closed: AtomicBool,
}

impl SqliteBackend {
    /// Opens the backend in the file at `path` (created if missing; `:memory:` for a private
    /// in-memory database).
    ///
    /// Fails with [`ErrorKind::Backend`] when the directory is missing, the file is not a
    /// SQLite database, or the database stays locked beyond the `busy_timeout` (transient).
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        Self::open_at(&Location::from_path(path.as_ref()), &options).await
    }

    /// Opens the backend for a `sqlite://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let location = Location::from_url(url)?;
        Self::open_at(&location, &SqliteOptions::from_config(config)).await
    }

    async fn open_at(location: &Location, options: &SqliteOptions) -> Result<Self> {
        let conn = Conn::open(location, options, KIND).await?;
        Ok(SqliteBackend {
            inner: Arc::new(Inner {
                conn,
                expires_ms: options
                    .get_result_expires()
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)),
                next_sweep: AtomicI64::new(0),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("sqlite result backend"))
        } else {
            Ok(())
        }
    }

    fn expires_at(&self, now: i64) -> Option<i64> {
        self.inner.expires_ms.map(|e| now.saturating_add(e))
    }

    /// Whether this write should also delete expired rows.
    fn sweep_due(&self, now: i64) -> bool {
        let next = self.inner.next_sweep.load(Ordering::Relaxed);
        now >= next
            && self
                .inner
                .next_sweep
                .compare_exchange(
                    next,
                    now + SWEEP_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

fn sweep(db: &Db, now: i64) -> rusqlite::Result<()> {
    let n = db
        .conn
        .prepare_cached(
            "DELETE FROM celeriac_results WHERE task_id IN \
             (SELECT task_id FROM celeriac_results WHERE expires_at <= ?1 LIMIT ?2)",
        )?
        .execute((now, SWEEP_LIMIT))?;
    db.conn
        .prepare_cached("DELETE FROM celeriac_groups WHERE expires_at <= ?1")?
        .execute([now])?;
    db.conn
        .prepare_cached("DELETE FROM celeriac_counters WHERE expires_at <= ?1")?
        .execute([now])?;
    if n > 0 {
        tracing::debug!(deleted = n, "swept expired sqlite results");
    }
    Ok(())
}

fn decode_meta(text: &str) -> Result<TaskMeta> {
    serde_json::from_str(text)
        .map_err(|e| Error::backend("stored task meta is not valid json").with_source(e))
}

impl ResultBackend for SqliteBackend {
    fn driver(&self) -> &'static str {
        "sqlite"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let text = serde_json::to_string(meta)?;
            let now = now_ms();
            let sweep_now = self.sweep_due(now);
            let expires_at = self.expires_at(now);
            let task_id = meta.task_id.clone();
            let status = meta.status.clone();
            let date_done = meta.date_done.map(celeriac_core::time::format);
            self.inner
                .conn
                .call(KIND, true, "cannot store result in sqlite", move |db| {
                    if sweep_now {
                        sweep(db, now)?;
                    }
                    let old: Option<String> = db
                        .conn
                        .prepare_cached(
                            "SELECT status FROM celeriac_results WHERE task_id = ?1 \
                             AND (expires_at IS NULL OR expires_at > ?2)",
                        )?
                        .query_row((&task_id, now), |r| r.get(0))
                        .optional()?;
                    if let Some(old) = old {
                        let old: TaskState = old.parse().unwrap_or_else(|e| match e {});
                        if !old.may_be_replaced_by(&status) {
                            return Ok(false);
                        }
                    }
                    db.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO celeriac_results \
                             (task_id, status, date_done, expires_at, meta) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute((&task_id, status.as_str(), &date_done, expires_at, &text))?;
                    db.results_changed();
                    Ok(true)
                })
                .await
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            self.check_open()?;
            let id = task_id.to_owned();
            let text: Option<String> = self
                .inner
                .conn
                .call(KIND, false, "cannot read result from sqlite", move |db| {
                    db.conn
                        .prepare_cached(
                            "SELECT meta FROM celeriac_results WHERE task_id = ?1 \
                             AND (expires_at IS NULL OR expires_at > ?2)",
                        )?
                        .query_row((&id, now_ms()), |r| r.get(0))
                        .optional()
                })
                .await?;
            text.as_deref().map(decode_meta).transpose()
        })
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            let ids = task_ids.to_vec();
            // One command on the connection thread: one read transaction for every id.
            let texts: Vec<Option<String>> = self
                .inner
                .conn
                .call(KIND, false, "cannot read results from sqlite", move |db| {
                    let mut stmt = db.conn.prepare_cached(
                        "SELECT meta FROM celeriac_results WHERE task_id = ?1 \
                         AND (expires_at IS NULL OR expires_at > ?2)",
                    )?;
                    let now = now_ms();
                    ids.iter()
                        .map(|id| stmt.query_row((id, now), |r| r.get(0)).optional())
                        .collect()
                })
                .await?;
            texts
                .iter()
                .map(|t| t.as_deref().map(decode_meta).transpose())
                .collect()
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let shared = self.inner.conn.shared.clone();
            // Other processes' stores reach us through the connection thread's data_version
            // watch, which fires the same notice as our own stores.
            let _watch = self.inner.conn.watch();
            loop {
                let stored = shared.results.notified();
                tokio::pin!(stored);
                stored.as_mut().enable();
                if let Some(meta) = self.get(task_id).await? {
                    if meta.status.is_ready() {
                        return Ok(meta);
                    }
                }
                let mut sleep = WAIT_RECHECK;
                if let Some(d) = deadline {
                    let now = tokio::time::Instant::now();
                    if now >= d {
                        return Err(timeout_error(task_id, timeout));
                    }
                    sleep = sleep.min(d - now);
                }
                tokio::select! {
                    () = stored => {}
                    () = tokio::time::sleep(sleep) => {}
                }
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let id = task_id.to_owned();
            self.inner
                .conn
                .call(KIND, true, "cannot forget sqlite result", move |db| {
                    db.conn
                        .prepare_cached("DELETE FROM celeriac_results WHERE task_id = ?1")?
                        .execute([&id])?;
                    Ok(())
                })
                .await
        })
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let text = serde_json::to_string(task_ids)?;
            let id = group_id.to_owned();
            let expires_at = self.expires_at(now_ms());
            self.inner
                .conn
                .call(KIND, true, "cannot save group in sqlite", move |db| {
                    db.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO celeriac_groups (group_id, task_ids, expires_at) \
                             VALUES (?1, ?2, ?3)",
                        )?
                        .execute((&id, &text, expires_at))?;
                    Ok(())
                })
                .await
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let id = group_id.to_owned();
            let text: Option<String> = self
                .inner
                .conn
                .call(KIND, false, "cannot restore group from sqlite", move |db| {
                    db.conn
                        .prepare_cached(
                            "SELECT task_ids FROM celeriac_groups WHERE group_id = ?1 \
                             AND (expires_at IS NULL OR expires_at > ?2)",
                        )?
                        .query_row((&id, now_ms()), |r| r.get(0))
                        .optional()
                })
                .await?;
            text.map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| Error::backend("stored group is not valid json").with_source(e))
            })
            .transpose()
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            self.check_open()?;
            let key = key.to_owned();
            let now = now_ms();
            let expires_at = self.expires_at(now);
            self.inner
                .conn
                .call(KIND, true, "cannot increment sqlite counter", move |db| {
                    db.conn
                        .prepare_cached(
                            "INSERT INTO celeriac_counters (key, value, expires_at) \
                             VALUES (?1, ?2, ?3) \
                             ON CONFLICT (key) DO UPDATE SET \
                               value = CASE WHEN expires_at <= ?4 THEN excluded.value \
                                            ELSE value + excluded.value END, \
                               expires_at = excluded.expires_at \
                             RETURNING value",
                        )?
                        .query_row((&key, by, expires_at, now), |r| r.get(0))
                })
                .await
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        // Rows are keyed by the bare task id.
        let caps = BackendCapabilities::none().coordination(self);
        match &self.inner.conn.identity {
            Some(store) => caps.probe(ResultProbe::new(store.clone(), "")),
            None => caps,
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            Ok(())
        })
    }
}

/// Microseconds since the Unix epoch: the clock every process on this file shares.
fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Cluster rate limits, unique-task locks and concurrency slots as rows, each step one write
/// command (so it runs under the file's write lock, atomic for every process on the file).
impl celeriac_core::coord::Coordination for SqliteBackend {
    fn throttle<'a>(
        &'a self,
        key: &'a str,
        limit: celeriac_core::RateLimit,
    ) -> BoxFuture<'a, Result<celeriac_core::coord::Admission>> {
        Box::pin(async move {
            self.check_open()?;
            let key = format!("rate:{key}");
            self.inner
                .conn
                .call(KIND, true, "cannot throttle on sqlite", move |db| {
                    let tat: i64 = db
                        .conn
                        .prepare_cached("SELECT until FROM celeriac_coord_keys WHERE key = ?1")?
                        .query_row([&key], |r| r.get(0))
                        .optional()?
                        .unwrap_or(0);
                    let now = now_us();
                    let (admission, next) = celeriac_core::coord::gcra_admission(
                        tat.max(0) as u64,
                        now.max(0) as u64,
                        limit,
                    );
                    if let Some(next) = next {
                        db.conn
                            .prepare_cached(
                                "INSERT INTO celeriac_coord_keys (key, holder, until) \
                                 VALUES (?1, NULL, ?2) \
                                 ON CONFLICT (key) DO UPDATE SET until = excluded.until",
                            )?
                            .execute((&key, next as i64))?;
                    }
                    Ok(admission)
                })
                .await
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.check_open()?;
            let (key, holder) = (format!("lock:{key}"), holder.to_owned());
            let ttl = ttl.as_millis().min(i64::MAX as u128) as i64;
            self.inner
                .conn
                .call(KIND, true, "cannot take a sqlite lock", move |db| {
                    let now = now_ms();
                    let held: Option<(Option<String>, i64)> = db
                        .conn
                        .prepare_cached(
                            "SELECT holder, until FROM celeriac_coord_keys WHERE key = ?1",
                        )?
                        .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    if let Some((Some(other), until)) = held {
                        if until > now && other != holder {
                            return Ok(other);
                        }
                    }
                    db.conn
                        .prepare_cached(
                            "INSERT INTO celeriac_coord_keys (key, holder, until) \
                             VALUES (?1, ?2, ?3) \
                             ON CONFLICT (key) DO UPDATE SET \
                               holder = excluded.holder, until = excluded.until",
                        )?
                        .execute((&key, &holder, now.saturating_add(ttl)))?;
                    Ok(holder)
                })
                .await
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let (key, holder) = (format!("lock:{key}"), holder.to_owned());
            self.inner
                .conn
                .call(KIND, true, "cannot release a sqlite lock", move |db| {
                    let n = db
                        .conn
                        .prepare_cached(
                            "DELETE FROM celeriac_coord_keys WHERE key = ?1 AND holder = ?2",
                        )?
                        .execute((&key, &holder))?;
                    Ok(n == 1)
                })
                .await
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let (key, holder) = (key.to_owned(), holder.to_owned());
            let ttl = ttl.as_millis().min(i64::MAX as u128) as i64;
            self.inner
                .conn
                .call(KIND, true, "cannot take a sqlite slot", move |db| {
                    let now = now_ms();
                    db.conn
                        .prepare_cached(
                            "DELETE FROM celeriac_coord_slots WHERE key = ?1 AND until <= ?2",
                        )?
                        .execute((&key, now))?;
                    let (held, mine): (i64, i64) = db
                        .conn
                        .prepare_cached(
                            "SELECT count(*), count(*) FILTER (WHERE holder = ?2) \
                             FROM celeriac_coord_slots WHERE key = ?1",
                        )?
                        .query_row((&key, &holder), |r| Ok((r.get(0)?, r.get(1)?)))?;
                    if mine == 0 && held >= i64::from(limit) {
                        return Ok(false);
                    }
                    db.conn
                        .prepare_cached(
                            "INSERT INTO celeriac_coord_slots (key, holder, until) \
                             VALUES (?1, ?2, ?3) \
                             ON CONFLICT (key, holder) DO UPDATE SET until = excluded.until",
                        )?
                        .execute((&key, &holder, now.saturating_add(ttl)))?;
                    Ok(true)
                })
                .await
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let (key, holder) = (key.to_owned(), holder.to_owned());
            self.inner
                .conn
                .call(KIND, true, "cannot release a sqlite slot", move |db| {
                    db.conn
                        .prepare_cached(
                            "DELETE FROM celeriac_coord_slots WHERE key = ?1 AND holder = ?2",
                        )?
                        .execute((&key, &holder))?;
                    Ok(())
                })
                .await
        })
    }
}
