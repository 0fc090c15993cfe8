//! [`MysqlBackend`]: task results, groups and chord counters in MariaDB/MySQL tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, timeout_error};
use celeriac_core::{
    BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, TaskMeta, TaskState,
};
use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, Row as _};
use tokio::sync::Notify;

use crate::db::{self, map_err, millis};
use crate::options::MysqlOptions;

const KIND: ErrorKind = ErrorKind::Backend;

/// How often expired rows are deleted (lazily, by a store that finds the sweep due; ms).
const SWEEP_EVERY_MS: i64 = 60_000;
/// At most this many expired rows of each table are deleted per sweep.
const SWEEP_LIMIT: i64 = 1000;

/// A result backend in a MariaDB or MySQL database. Clones share one pool.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{ResultBackend, TaskMeta};
/// use celeriac_mysql::MysqlBackend;
///
/// let config = celeriac_core::Config::default();
/// let backend = MysqlBackend::connect("mysql://root@127.0.0.1/test", &config).await?;
/// backend.store(&TaskMeta::success("id-1", 4.into())).await?;
/// let meta = backend.wait("id-1", None).await?;
/// assert_eq!(meta.result, 4);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MysqlBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: MySqlPool,
    options: MysqlOptions,
    expires_ms: Option<i64>,
    next_sweep: AtomicI64,
    closed: AtomicBool,
    /// Fired after this process stored a result, for its own waiters.
    stored: Notify,
    /// Set once the coordination tables exist (created on first use; see `coord.rs`).
    coord_ready: tokio::sync::OnceCell<()>,
}

impl MysqlBackend {
    /// Opens the backend: connects, and creates the tables on first use.
    ///
    /// Fails with [`ErrorKind::Backend`] when the server is unreachable (transient), the
    /// password is wrong, the database is missing, or the user may not use the tables.
    pub async fn open(options: MysqlOptions) -> Result<Self> {
        let pool = db::open(&options, KIND).await?;
        Ok(Self::with_pool(pool, options))
    }

    /// Opens the backend for a `mysql://` or `mariadb://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(MysqlOptions::from_url(url, config)?).await
    }

    pub(crate) fn with_pool(pool: MySqlPool, options: MysqlOptions) -> Self {
        MysqlBackend {
            inner: Arc::new(Inner {
                pool,
                expires_ms: options.get_result_expires().map(millis),
                options,
                next_sweep: AtomicI64::new(0),
                closed: AtomicBool::new(false),
                stored: Notify::new(),
                coord_ready: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    pub(crate) fn coord_ready(&self) -> &tokio::sync::OnceCell<()> {
        &self.inner.coord_ready
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("mysql result backend"))
        } else {
            Ok(())
        }
    }

    /// Whether this write should also delete expired rows.
    fn sweep_due(&self) -> bool {
        let now = chrono::Utc::now().timestamp_millis();
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

    /// Deletes expired results, groups and counters (a bounded batch of each).
    ///
    /// Public so an operator's job can run it; stores run it by themselves at most once a
    /// minute per process. Returns how many rows went.
    pub async fn sweep(&self) -> Result<u64> {
        let mut n = 0;
        for table in ["celeriac_results", "celeriac_groups", "celeriac_counters"] {
            let sql = format!(
                "DELETE FROM {table} WHERE expires_at <= {} LIMIT {SWEEP_LIMIT}",
                now_ms!()
            );
            n += sqlx::query(AssertSqlSafe(sql))
                .execute(&self.inner.pool)
                .await
                .map_err(|e| map_err(KIND, "cannot delete expired mysql results", e))?
                .rows_affected();
        }
        if n > 0 {
            tracing::debug!(deleted = n, "swept expired mysql results");
        }
        Ok(n)
    }
}

fn decode_meta(text: &str) -> Result<TaskMeta> {
    serde_json::from_str(text)
        .map_err(|e| Error::backend("stored task meta is not valid json").with_source(e))
}

const GET_SQL: &str = concat!(
    "SELECT meta FROM celeriac_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ",
    now_ms!(),
    ")"
);

impl ResultBackend for MysqlBackend {
    fn driver(&self) -> &'static str {
        "mysql"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            if self.sweep_due() {
                // In the background: a store never waits for the sweep.
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.sweep().await {
                        tracing::warn!(error = %format_args!("{e:#}"), "cannot sweep expired mysql results");
                    }
                });
            }
            let text = serde_json::to_string(meta)?;
            let status = meta.status.as_str();
            let date_done = meta.date_done.map(celeriac_core::time::format);
            let (text, date_done) = (&text, date_done.as_deref());
            let expires = self.inner.expires_ms;
            let pool = &self.inner.pool;
            // The common case first: the task's first state, one autocommitted INSERT (one
            // round trip, one commit). A row that exists fails it on the primary key.
            let first = sqlx::query(concat!(
                "INSERT INTO celeriac_results (status, date_done, expires_at, meta, task_id) \
                 VALUES (?, ?, ",
                now_ms!(),
                " + ?, ?, ?)"
            ))
            .bind(status)
            .bind(date_done)
            .bind(expires)
            .bind(text)
            .bind(&meta.task_id)
            .execute(pool)
            .await;
            match first {
                Ok(_) => {
                    self.inner.stored.notify_waiters();
                    return Ok(true);
                }
                Err(e) if db::db_number(&e) == Some(1062) => {}
                Err(e) => return Err(map_err(KIND, "cannot store result in mysql", e)),
            }
            // Otherwise a transaction that locks the row, checks precedence in Rust (the rule
            // lives in core), then writes. A row that did not exist is inserted; two first stores
            // racing make one fail on the primary key, and it runs again and sees the other.
            let stored = db::retry(KIND, "cannot store result in mysql", || async move {
                let mut tx = pool.begin().await?;
                let old: Option<(String, i64)> = sqlx::query(concat!(
                    "SELECT status, CAST(expires_at IS NOT NULL AND expires_at <= ",
                    now_ms!(),
                    " AS SIGNED) FROM celeriac_results WHERE task_id = ? FOR UPDATE"
                ))
                .bind(&meta.task_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?;
                let write = match &old {
                    None => true,
                    Some((_, expired)) if *expired != 0 => true,
                    Some((old, _)) => {
                        let old: TaskState = old.parse().unwrap_or_else(|e| match e {});
                        old.may_be_replaced_by(&meta.status)
                    }
                };
                if !write {
                    tx.rollback().await?;
                    return Ok(false);
                }
                let sql = if old.is_none() {
                    concat!(
                        "INSERT INTO celeriac_results (status, date_done, expires_at, meta, task_id) \
                         VALUES (?, ?, ",
                        now_ms!(),
                        " + ?, ?, ?)"
                    )
                } else {
                    concat!(
                        "UPDATE celeriac_results SET status = ?, date_done = ?, expires_at = ",
                        now_ms!(),
                        " + ?, meta = ? WHERE task_id = ?"
                    )
                };
                sqlx::query(sql)
                    .bind(status)
                    .bind(date_done)
                    .bind(expires)
                    .bind(text)
                    .bind(&meta.task_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            })
            .await;
            let stored = match stored {
                // A concurrent first store won the insert: run once more, now as an update.
                Err(e) if is_duplicate(&e) => return self.store(meta).await,
                other => other?,
            };
            if stored {
                self.inner.stored.notify_waiters();
            }
            Ok(stored)
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            self.check_open()?;
            let text: Option<String> = sqlx::query_scalar(GET_SQL)
                .bind(task_id)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(|e| map_err(KIND, "cannot read result from mysql", e))?;
            text.as_deref().map(decode_meta).transpose()
        })
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            let mut out: Vec<Option<TaskMeta>> = vec![None; task_ids.len()];
            let mut at = std::collections::HashMap::new();
            for (i, id) in task_ids.iter().enumerate() {
                at.entry(id.as_str()).or_insert_with(Vec::new).push(i);
            }
            // One query per 500 ids.
            for chunk in task_ids.chunks(500) {
                let mut sql = String::from(concat!(
                    "SELECT task_id, meta FROM celeriac_results WHERE (expires_at IS NULL OR expires_at > ",
                    now_ms!(),
                    ") AND task_id IN ("
                ));
                for i in 0..chunk.len() {
                    sql.push_str(if i == 0 { "?" } else { ", ?" });
                }
                sql.push(')');
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id);
                }
                let rows = q
                    .fetch_all(&self.inner.pool)
                    .await
                    .map_err(|e| map_err(KIND, "cannot read results from mysql", e))?;
                for r in rows {
                    let id: String = r
                        .try_get(0)
                        .map_err(|e| map_err(KIND, "cannot read results from mysql", e))?;
                    let text: String = r
                        .try_get(1)
                        .map_err(|e| map_err(KIND, "cannot read results from mysql", e))?;
                    let meta = decode_meta(&text)?;
                    for &i in at.get(id.as_str()).into_iter().flatten() {
                        out[i] = Some(meta.clone());
                    }
                }
            }
            Ok(out)
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(async move {
            // Polling with a backoff from 1 ms to the poll interval; a store of this process
            // wakes the waiter at once.
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let max = self.inner.options.get_poll_interval();
            let mut interval = Duration::from_millis(1);
            loop {
                let stored = self.inner.stored.notified();
                tokio::pin!(stored);
                stored.as_mut().enable();
                if let Some(meta) = self.get(task_id).await?
                    && meta.status.is_ready()
                {
                    return Ok(meta);
                }
                let mut sleep = interval;
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
                interval = (interval * 2).min(max);
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            sqlx::query("DELETE FROM celeriac_results WHERE task_id = ?")
                .bind(task_id)
                .execute(&self.inner.pool)
                .await
                .map_err(|e| map_err(KIND, "cannot forget mysql result", e))?;
            Ok(())
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
            sqlx::query(concat!(
                "INSERT INTO celeriac_groups (group_id, task_ids, expires_at) VALUES (?, ?, ",
                now_ms!(),
                " + ?) ON DUPLICATE KEY UPDATE task_ids = VALUES(task_ids), \
                 expires_at = VALUES(expires_at)"
            ))
            .bind(group_id)
            .bind(&text)
            .bind(self.inner.expires_ms)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_err(KIND, "cannot save group in mysql", e))?;
            Ok(())
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let text: Option<String> = sqlx::query_scalar(concat!(
                "SELECT task_ids FROM celeriac_groups WHERE group_id = ? \
                 AND (expires_at IS NULL OR expires_at > ",
                now_ms!(),
                ")"
            ))
            .bind(group_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| map_err(KIND, "cannot restore group from mysql", e))?;
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
            let pool = &self.inner.pool;
            let expires = self.inner.expires_ms;
            // MySQL has no RETURNING: the upsert locks the row, and the read in the same
            // transaction sees the value this increment made.
            db::retry(KIND, "cannot increment mysql counter", || async move {
                let mut tx = pool.begin().await?;
                sqlx::query(concat!(
                    "INSERT INTO celeriac_counters (name, value, expires_at) VALUES (?, ?, ",
                    now_ms!(),
                    " + ?) ON DUPLICATE KEY UPDATE \
                     value = IF(expires_at IS NOT NULL AND expires_at <= ",
                    now_ms!(),
                    ", VALUES(value), value + VALUES(value)), expires_at = VALUES(expires_at)"
                ))
                .bind(key)
                .bind(by)
                .bind(expires)
                .execute(&mut *tx)
                .await?;
                let v: i64 =
                    sqlx::query_scalar("SELECT value FROM celeriac_counters WHERE name = ?")
                        .bind(key)
                        .fetch_one(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(v)
            })
            .await
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        // Cluster rate limits, unique-task locks and concurrency slots (`coord.rs`).
        BackendCapabilities::none().coordination(self)
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            Ok(())
        })
    }
}

/// Whether `e` came from a duplicate primary key (two first stores of one task at once).
fn is_duplicate(e: &Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(sqlx::Error::Database(d)) = s.downcast_ref::<sqlx::Error>() {
            return d
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|d| d.number() == 1062);
        }
        source = s.source();
    }
    false
}
