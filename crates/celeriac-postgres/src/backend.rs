//! [`PgBackend`]: task results, groups and chord counters in PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, timeout_error};
use celeriac_core::{
    BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, ResultProbe, TaskMeta,
};
use sqlx::AssertSqlSafe;
use tokio::sync::{mpsc, oneshot};

use crate::options::PgOptions;
use crate::store::{Store, ms, now_ms};

const KIND: ErrorKind = ErrorKind::Backend;

/// How often expired rows are deleted (by a store that finds the sweep due).
const SWEEP_EVERY_MS: i64 = 60_000;
/// At most this many expired results are deleted per sweep.
const SWEEP_LIMIT: i64 = 1000;
/// Longest sleep of a waiter between reads, in case a notification was lost with a
/// connection.
const WAIT_RECHECK: Duration = Duration::from_secs(2);

/// A result backend in a PostgreSQL database (`postgres://…`). Clones share one pool.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{ResultBackend, TaskMeta};
/// use celeriac_postgres::PgBackend;
///
/// let backend = PgBackend::connect("postgres://postgres@localhost/app", &Default::default()).await?;
/// backend.store(&TaskMeta::success("id-1", 4.into())).await?;
/// let meta = backend.wait("id-1", None).await?;
/// assert_eq!(meta.result, 4);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgBackend {
    store: Arc<Store>,
    next_sweep: Arc<AtomicI64>,
    batcher: Arc<tokio::sync::OnceCell<mpsc::UnboundedSender<StoreCmd>>>,
    /// Set once the coordination tables exist (created on first use).
    coord_ready: Arc<tokio::sync::OnceCell<()>>,
}

/// One result waiting for the batch.
#[derive(Debug)]
struct StoreCmd {
    task_id: String,
    status: String,
    expires_at: Option<i64>,
    meta: String,
    reply: oneshot::Sender<Result<bool>>,
}

/// The most results one statement carries.
const STORE_BATCH: usize = 1024;

/// Stores results (distinct task ids) unless the stored one takes precedence (SUCCESS is
/// final; another ready state yields only to a ready state; an expired row yields to
/// anything), and notifies waiters of each ready state written; the notification carries the
/// result when it is small, so waiters need not read it. One statement: each check and its
/// write see the same row, under its lock. Returns the ids written.
const STORE_MANY_SQL: &str = "WITH i AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) \
       AS i(task_id, status, expires_at, meta)), \
     w AS (INSERT INTO {s}results AS r (task_id, status, expires_at, meta) \
       SELECT task_id, status, expires_at, meta FROM i \
       ON CONFLICT (task_id) DO UPDATE \
         SET status = excluded.status, expires_at = excluded.expires_at, meta = excluded.meta \
         WHERE (r.expires_at IS NOT NULL AND r.expires_at <= $5) \
            OR (r.status <> 'SUCCESS' AND (r.status NOT IN ('FAILURE', 'REVOKED') \
                OR excluded.status IN ('SUCCESS', 'FAILURE', 'REVOKED'))) \
       RETURNING r.task_id, r.status, r.meta), \
     n AS (SELECT pg_notify($6, CASE WHEN octet_length(meta) < 7000 \
               THEN task_id || chr(10) || meta ELSE task_id END) \
           FROM w WHERE status IN ('SUCCESS', 'FAILURE', 'REVOKED')) \
     SELECT task_id, (SELECT count(*) FROM n) FROM w";

/// Stores every result queued at the moment in one statement (a task id twice waits for the
/// next round, so precedence applies in order), answering each with whether it was written.
async fn store_loop(
    pool: sqlx::PgPool,
    sql: String,
    channel: String,
    mut rx: mpsc::UnboundedReceiver<StoreCmd>,
) {
    let mut carry: Vec<StoreCmd> = Vec::new();
    loop {
        let mut buf = std::mem::take(&mut carry);
        if buf.is_empty() {
            if rx.recv_many(&mut buf, STORE_BATCH).await == 0 {
                return;
            }
        } else {
            while buf.len() < STORE_BATCH {
                match rx.try_recv() {
                    Ok(c) => buf.push(c),
                    Err(_) => break,
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut batch = Vec::with_capacity(buf.len());
        for c in buf {
            if seen.insert(c.task_id.clone()) {
                batch.push(c);
            } else {
                carry.push(c);
            }
        }
        let r: std::result::Result<Vec<(String, i64)>, sqlx::Error> =
            sqlx::query_as(AssertSqlSafe(sql.as_str()))
                .bind(batch.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>())
                .bind(batch.iter().map(|c| c.status.as_str()).collect::<Vec<_>>())
                .bind(batch.iter().map(|c| c.expires_at).collect::<Vec<_>>())
                .bind(batch.iter().map(|c| c.meta.as_str()).collect::<Vec<_>>())
                .bind(now_ms())
                .bind(channel.as_str())
                .fetch_all(&pool)
                .await;
        match r {
            Ok(rows) => {
                let written: std::collections::HashSet<String> =
                    rows.into_iter().map(|(id, _)| id).collect();
                for c in batch {
                    let w = written.contains(&c.task_id);
                    let _ = c.reply.send(Ok(w));
                }
            }
            Err(e) => {
                let e = Arc::new(crate::options::db_error(
                    KIND,
                    "cannot store results in postgres",
                    e,
                ));
                for c in batch {
                    let err = Error::new(KIND, "cannot store result in postgres")
                        .with_source(crate::store::SharedError(e.clone()));
                    let err = if e.is_transient() {
                        err.transient()
                    } else {
                        err
                    };
                    let _ = c.reply.send(Err(err));
                }
            }
        }
    }
}

impl PgBackend {
    /// Opens the backend for a `postgres://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(PgOptions::from_url(url, config)?).await
    }

    /// Opens the backend with `options`; creates the tables if missing.
    pub async fn open(options: PgOptions) -> Result<Self> {
        Ok(PgBackend {
            store: Store::open(options, KIND, "result backend").await?,
            next_sweep: Arc::default(),
            batcher: Arc::default(),
            coord_ready: Arc::default(),
        })
    }

    fn check_open(&self) -> Result<()> {
        self.store.check_open("postgres result backend")
    }

    fn expires_at(&self, now: i64) -> Option<i64> {
        self.store
            .options
            .result_expires()
            .map(|e| now.saturating_add(ms(e)))
    }

    /// Whether this write should also delete expired rows.
    fn sweep_due(&self, now: i64) -> bool {
        let next = self.next_sweep.load(Ordering::Relaxed);
        now >= next
            && self
                .next_sweep
                .compare_exchange(
                    next,
                    now + SWEEP_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Deletes expired results, groups and counters (at most 1,000 results per call).
    /// Returns how many results went. Runs by itself at most once a minute, with a store.
    pub async fn sweep(&self) -> Result<u64> {
        let now = now_ms();
        let what = "cannot delete expired postgres results";
        let n = sqlx::query(AssertSqlSafe(self.store.sql(
            "DELETE FROM {s}results WHERE task_id IN (SELECT task_id FROM {s}results \
             WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )))
        .bind(now)
        .bind(SWEEP_LIMIT)
        .execute(&self.store.pool)
        .await
        .map_err(|e| self.store.err(what, e))?
        .rows_affected();
        for table in ["groups", "counters"] {
            sqlx::query(AssertSqlSafe(
                self.store
                    .sql(&format!("DELETE FROM {{s}}{table} WHERE expires_at <= $1")),
            ))
            .bind(now)
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err(what, e))?;
        }
        if n > 0 {
            tracing::debug!(deleted = n, "swept expired postgres results");
        }
        Ok(n)
    }
}

fn decode_meta(text: &str) -> Result<TaskMeta> {
    serde_json::from_str(text)
        .map_err(|e| Error::backend("stored task meta is not valid json").with_source(e))
}

impl ResultBackend for PgBackend {
    fn driver(&self) -> &'static str {
        "postgres"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let text = serde_json::to_string(meta)?;
            let now = now_ms();
            if self.sweep_due(now) {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.sweep().await {
                        tracing::warn!(error = %format_args!("{e:#}"), "result sweep failed");
                    }
                });
            }
            // Results of concurrent tasks share one statement and one commit. The commit
            // waits for the WAL flush (the publishing pool): the worker acks after a store
            // returns, and an ack may run only after a server crash and restart (it waits for a
            // connection through the outage), so a store must be durable when it returns.
            let tx = self
                .batcher
                .get_or_init(|| async {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(store_loop(
                        self.store.pool.clone(),
                        self.store.sql(STORE_MANY_SQL),
                        self.store.hub.result_ch.clone(),
                        rx,
                    ));
                    tx
                })
                .await;
            let (reply, answer) = oneshot::channel();
            tx.send(StoreCmd {
                task_id: meta.task_id.clone(),
                status: meta.status.as_str().to_owned(),
                expires_at: self.expires_at(now),
                meta: text,
                reply,
            })
            .map_err(|_| Error::closed("postgres result backend"))?;
            answer
                .await
                .unwrap_or_else(|_| Err(Error::closed("postgres result backend")))
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            self.check_open()?;
            let text: Option<String> = sqlx::query_scalar(AssertSqlSafe(self.store.sql(
                "SELECT meta FROM {s}results WHERE task_id = $1 \
                 AND (expires_at IS NULL OR expires_at > $2)",
            )))
            .bind(task_id)
            .bind(now_ms())
            .fetch_optional(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot read result from postgres", e))?;
            text.as_deref().map(decode_meta).transpose()
        })
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            if task_ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(self.store.sql(
                "SELECT task_id, meta FROM {s}results WHERE task_id = ANY($1) \
                 AND (expires_at IS NULL OR expires_at > $2)",
            )))
            .bind(task_ids)
            .bind(now_ms())
            .fetch_all(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot read results from postgres", e))?;
            let found: std::collections::HashMap<String, String> = rows.into_iter().collect();
            task_ids
                .iter()
                .map(|id| found.get(id).map(|t| decode_meta(t)).transpose())
                .collect()
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(async move {
            self.check_open()?;
            self.store.listen().await?;
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let waiter = self.store.hub.result_waiter(task_id);
            loop {
                let notified = waiter.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(text) = self.store.hub.recent_result(task_id)
                    && let Ok(meta) = decode_meta(&text)
                    && meta.status.is_ready()
                {
                    return Ok(meta);
                }
                // Not notified (yet, or long ago), or notified without the result (a large
                // one): read the row.
                if let Some(meta) = self.get(task_id).await?
                    && meta.status.is_ready()
                {
                    return Ok(meta);
                }
                let mut sleep = WAIT_RECHECK;
                if let Some(deadline) = deadline {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(timeout_error(task_id, timeout));
                    }
                    sleep = sleep.min(deadline - now);
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(sleep) => {}
                }
                self.check_open()?;
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            sqlx::query(AssertSqlSafe(
                self.store.sql("DELETE FROM {s}results WHERE task_id = $1"),
            ))
            .bind(task_id)
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot forget postgres result", e))?;
            self.store.hub.forget_result(task_id);
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
            sqlx::query(AssertSqlSafe(self.store.sql(
                "INSERT INTO {s}groups (group_id, task_ids, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (group_id) DO UPDATE \
                 SET task_ids = excluded.task_ids, expires_at = excluded.expires_at",
            )))
            .bind(group_id)
            .bind(text)
            .bind(self.expires_at(now_ms()))
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot save postgres group", e))?;
            Ok(())
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let text: Option<String> = sqlx::query_scalar(AssertSqlSafe(self.store.sql(
                "SELECT task_ids FROM {s}groups WHERE group_id = $1 \
                 AND (expires_at IS NULL OR expires_at > $2)",
            )))
            .bind(group_id)
            .bind(now_ms())
            .fetch_optional(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot restore postgres group", e))?;
            text.map(|t| {
                serde_json::from_str(&t).map_err(|e| {
                    Error::backend("stored group is not a json list of ids").with_source(e)
                })
            })
            .transpose()
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            self.check_open()?;
            let now = now_ms();
            sqlx::query_scalar(AssertSqlSafe(self.store.sql(
                "INSERT INTO {s}counters AS c (key, value, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET \
                   value = CASE WHEN c.expires_at IS NOT NULL AND c.expires_at <= $4 \
                           THEN excluded.value ELSE c.value + excluded.value END, \
                   expires_at = excluded.expires_at \
                 RETURNING value",
            )))
            .bind(key)
            .bind(by)
            .bind(self.expires_at(now))
            .bind(now)
            .fetch_one(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot count in postgres", e))
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        // Rows are keyed by the bare task id.
        BackendCapabilities::none()
            .probe(ResultProbe::new(self.store.options.identity(), ""))
            .coordination(self)
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.store.close();
            Ok(())
        })
    }
}

/// The coordination tables (cluster rate limits, unique-task locks, concurrency slots),
/// created on first use so that schemas made before them get them too.
const COORD_DDL: &str = "
CREATE TABLE IF NOT EXISTS {s}coord_keys (
    key     text PRIMARY KEY,
    holder  text,
    until   bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}coord_slots (
    key     text   NOT NULL,
    holder  text   NOT NULL,
    until   bigint NOT NULL,
    PRIMARY KEY (key, holder)
);";

impl PgBackend {
    /// Creates the coordination tables once per backend.
    async fn coord_tables(&self) -> Result<()> {
        self.check_open()?;
        self.coord_ready
            .get_or_try_init(|| async {
                let fail = |e| self.store.err("cannot create the coordination tables", e);
                // Under an advisory lock: concurrent `CREATE TABLE IF NOT EXISTS` of one table
                // can fail in PostgreSQL on the catalog's unique index.
                let mut tx = self.store.pool.begin().await.map_err(fail)?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(self.store.sql("celeriac-coord-ddl:{s}"))
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                sqlx::raw_sql(AssertSqlSafe(self.store.sql(COORD_DDL)))
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                tx.commit().await.map_err(fail)
            })
            .await
            .map(|_| ())
    }
}

/// Microseconds since the Unix epoch on the server's clock (every worker shares it).
const NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// Cluster rate limits, unique-task locks and concurrency slots as rows, each step one
/// statement (atomic on the server, on its clock).
impl celeriac_core::coord::Coordination for PgBackend {
    fn throttle<'a>(
        &'a self,
        key: &'a str,
        limit: celeriac_core::RateLimit,
    ) -> BoxFuture<'a, Result<celeriac_core::coord::Admission>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let interval = celeriac_core::coord::gcra_interval(limit) as i64;
            let key = format!("rate:{key}");
            // The row first, so that the first callers of a key queue on its row lock too.
            let sql = self.store.sql(
                "INSERT INTO {s}coord_keys (key, holder, until) VALUES ($1, NULL, 0) \
                 ON CONFLICT (key) DO NOTHING",
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(&key)
                .execute(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot throttle on postgres", e))?;
            // GCRA as in celeriac_core::coord::gcra: admitted from one interval before the
            // key's time to the later of it and now; the upsert moves it one interval past
            // that slot only when admitted. Returns the delay to the slot (us), else minus
            // the wait.
            let sql = self.store.sql(&format!(
                "WITH now AS (SELECT {NOW_US} AS t), \
                 cur AS (SELECT COALESCE((SELECT until FROM {{s}}coord_keys WHERE key = $1 \
                                          FOR UPDATE), 0) AS tat), \
                 ins AS (INSERT INTO {{s}}coord_keys (key, holder, until) \
                         SELECT $1, NULL, GREATEST(cur.tat, now.t) + $2 FROM cur, now \
                         WHERE now.t >= cur.tat - $2 \
                         ON CONFLICT (key) DO UPDATE SET until = excluded.until \
                         RETURNING 1) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM ins) THEN GREATEST(cur.tat - now.t, 0) \
                             ELSE now.t - (cur.tat - $2) END FROM cur, now"
            ));
            let answer: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(&key)
                .bind(interval)
                .fetch_one(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot throttle on postgres", e))?;
            Ok(celeriac_core::coord::Admission::from_micros(answer))
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let ttl = ttl.as_micros().min(i64::MAX as u128) as i64;
            // Takes the row when free, expired or already ours; returns who holds it after.
            let sql = self.store.sql(&format!(
                "INSERT INTO {{s}}coord_keys AS k (key, holder, until) \
                 VALUES ($1, $2, {NOW_US} + $3) \
                 ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                   WHERE k.holder IS NULL OR k.holder = excluded.holder OR k.until <= {NOW_US} \
                 RETURNING holder"
            ));
            let taken: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(format!("lock:{key}"))
                .bind(holder)
                .bind(ttl)
                .fetch_optional(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot take a postgres lock", e))?;
            if let Some(h) = taken {
                return Ok(h);
            }
            let sql = self
                .store
                .sql("SELECT holder FROM {s}coord_keys WHERE key = $1");
            let other: Option<Option<String>> = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(format!("lock:{key}"))
                .fetch_optional(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot read a postgres lock", e))?;
            // Released between the two statements: try again from the start.
            match other.flatten() {
                Some(h) => Ok(h),
                None => {
                    self.lock(key, holder, Duration::from_micros(ttl as u64))
                        .await
                }
            }
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let sql = self
                .store
                .sql("DELETE FROM {s}coord_keys WHERE key = $1 AND holder = $2");
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(format!("lock:{key}"))
                .bind(holder)
                .execute(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot release a postgres lock", e))?;
            Ok(done.rows_affected() == 1)
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
            self.coord_tables().await?;
            let ttl = ttl.as_micros().min(i64::MAX as u128) as i64;
            // One transaction, the key's slots locked by an advisory lock on the key, so that
            // concurrent takers count the same rows.
            let mut tx = self
                .store
                .pool
                .begin()
                .await
                .map_err(|e| self.store.err("cannot take a postgres slot", e))?;
            let fail = |e| self.store.err("cannot take a postgres slot", e);
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(format!("celeriac-coord-slots:{key}"))
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            let sql = self.store.sql(&format!(
                "DELETE FROM {{s}}coord_slots WHERE key = $1 AND until <= {NOW_US}"
            ));
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            let sql = self.store.sql(
                "SELECT count(*), count(*) FILTER (WHERE holder = $2) \
                 FROM {s}coord_slots WHERE key = $1",
            );
            let (held, mine): (i64, i64) = sqlx::query_as(AssertSqlSafe(sql))
                .bind(key)
                .bind(holder)
                .fetch_one(&mut *tx)
                .await
                .map_err(fail)?;
            if mine == 0 && held >= i64::from(limit) {
                return Ok(false);
            }
            let sql = self.store.sql(&format!(
                "INSERT INTO {{s}}coord_slots (key, holder, until) VALUES ($1, $2, {NOW_US} + $3) \
                 ON CONFLICT (key, holder) DO UPDATE SET until = excluded.until"
            ));
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(holder)
                .bind(ttl)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            Ok(true)
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let sql = self
                .store
                .sql("DELETE FROM {s}coord_slots WHERE key = $1 AND holder = $2");
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(holder)
                .execute(&self.store.pool)
                .await
                .map_err(|e| self.store.err("cannot free a postgres slot", e))?;
            Ok(())
        })
    }
}
