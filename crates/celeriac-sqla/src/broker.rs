//! [`SqlaBroker`]: kombu's SQLAlchemy transport (`sqla+postgresql://…`, `sqla+mysql://…`).
//!
//! # How kombu's two tables carry celeriac's contract
//!
//! kombu writes a message as a row of `kombu_message` with `visible = true` and `version = 1`;
//! a consumer takes the oldest visible row `FOR UPDATE` and sets `visible = false` (and, through
//! SQLAlchemy's version counter, `version + 1`). Nothing else: no priority, no delay, no ack
//! (a delivered row stays invisible for ever), no redelivery. Python processes only ever look
//! at visible rows.
//!
//! celeriac keeps leases, delays and redeliveries in the same two columns, on rows Python
//! never looks at (invisible ones) and with values Python never writes (negative versions):
//!
//! | row | `visible` | `version` | `timestamp` |
//! |---|---|---|---|
//! | ready, delivered `d` times before | true | `d + 1` (kombu's fresh row: 1) | NULL |
//! | leased by a celeriac consumer (delivery `d`) | false | `-2d` | lease expiry |
//! | delayed or requeued later (after `d` deliveries) | false | `-(2d + 1)` | not before |
//! | delivered to a Python worker | false | positive | Python's local time |
//!
//! A fetch leases up to the free prefetch in one statement (`FOR UPDATE SKIP LOCKED`); ack
//! and reject-drop delete the row (kombu never deletes); the lease's version is its fencing
//! token, so a consumer whose lease ran out cannot settle the copy another consumer holds.
//! Consumers turn due invisible rows with a negative version back into ready rows
//! (`version = -version / 2 + 1`), which is how expired leases and delays come back.
//! Rows delivered to Python workers are never touched (their version is positive), so
//! they are never redelivered: kombu's own semantics for them.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::broker::{Acker, Capabilities, ConsumeOptions, Consumer, Delivery, Requeue};
use celeriac_core::protocol::envelope;
use celeriac_core::{
    BoxFuture, Broker, Config, Error, ErrorKind, Message, PublishOptions, QueueStats, Result,
};
use chrono::{DateTime, NaiveDateTime, Utc};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::db::{Pool, is_unique_violation, map_err, quote, retry_deadlocks};
use crate::schema::{self, Server, on_pool, sql};
use crate::url::{self, Dialect};

const KIND: ErrorKind = ErrorKind::Broker;
const QUEUE_SEQUENCE: &str = "queue_id_sequence";
const MESSAGE_SEQUENCE: &str = "message_id_sequence";
/// How often a consumer turns due leases and delays back into ready rows.
const PROMOTE_EVERY: Duration = Duration::from_millis(100);

/// Where kombu's tables are (kombu's `queue_tablename` / `message_tablename` transport
/// options), how often idle consumers look for new rows, whether to create the tables.
///
/// From a URL, the query keys `queue_table`, `message_table` and `polling_interval`
/// (seconds) set them and are not passed to the database.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SqlaBrokerOptions {
    /// The queue table, default `kombu_queue`.
    pub queue_table: String,
    /// The message table, default `kombu_message`.
    pub message_table: String,
    /// The longest an idle consumer waits before it looks again (rows other processes
    /// insert announce nothing). Default 200 ms (kombu polls every second).
    pub polling_interval: Duration,
    /// A delivery's lease unless the consumer asks for another (`visibility_timeout`).
    pub lease: Duration,
    /// Create missing tables, as kombu does on first use. Default true.
    pub create_tables: bool,
}

impl Default for SqlaBrokerOptions {
    fn default() -> Self {
        SqlaBrokerOptions {
            queue_table: "kombu_queue".to_owned(),
            message_table: "kombu_message".to_owned(),
            polling_interval: Duration::from_millis(200),
            lease: Duration::from_secs(3600),
            create_tables: true,
        }
    }
}

impl SqlaBrokerOptions {
    /// The options of `config` (its `visibility_timeout`).
    pub fn from_config(config: &Config) -> Self {
        SqlaBrokerOptions {
            lease: config.visibility_timeout,
            ..Self::default()
        }
    }

    /// Sets the table names.
    #[must_use]
    pub fn tables(mut self, queue: impl Into<String>, message: impl Into<String>) -> Self {
        self.queue_table = queue.into();
        self.message_table = message.into();
        self
    }

    /// Sets the polling interval of idle consumers.
    #[must_use]
    pub fn polling_interval(mut self, every: Duration) -> Self {
        self.polling_interval = every;
        self
    }
}

#[derive(Debug)]
struct Statements {
    /// PostgreSQL: many rows from arrays; MySQL: the head, then `publish_row` per row.
    publish_many: String,
    publish_row: String,
    queue_id: String,
    queue_insert: String,
    queue_names: String,
    publish: String,
    fetch_pg: String,
    fetch_my_select: String,
    fetch_my_update: String,
    promote: String,
    delete: String,
    requeue_now: String,
    requeue_later: String,
    extend: String,
    stats: String,
    purge: String,
}

/// kombu's SQLAlchemy transport as a celeriac broker, on PostgreSQL or MariaDB/MySQL: a
/// Python client with `broker_url = "sqla+postgresql://…"` sends tasks our worker runs, and
/// our client's tasks run on a Python worker. Clones share one pool.
///
/// Capabilities: delay, lease extension and several processes; no priority (kombu's table
/// has none) and no fanout (so no events and no remote control, as on kombu's transport).
#[derive(Clone)]
pub struct SqlaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    server: Server,
    sql: Statements,
    options: SqlaBrokerOptions,
    /// Whether `timestamp` keeps fractions of a second (not a DATETIME(0) kombu made on
    /// MySQL): when not, deadlines are rounded up to the next second, never down.
    subsecond: bool,
    queue_ids: Mutex<HashMap<String, i32>>,
    published: Notify,
    /// Acks, deleted together: every ack waiting at a moment is one statement.
    acks: tokio::sync::mpsc::UnboundedSender<PendingAck>,
    /// Publishes, inserted together the same way.
    publishes: tokio::sync::mpsc::UnboundedSender<PendingPublish>,
    closed: AtomicBool,
    closing: Notify,
}

impl fmt::Debug for SqlaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlaBroker")
            .field("server", &self.inner.server)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn to_naive(t: DateTime<Utc>, subsecond: bool) -> NaiveDateTime {
    let n = t.naive_utc();
    if subsecond {
        return n;
    }
    // Round up to a whole second: the column would drop the fraction, delivering early.
    let whole = n.and_utc().timestamp();
    let up = if n.and_utc().timestamp_subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    };
    DateTime::from_timestamp(up, 0).map_or(n, |d| d.naive_utc())
}

impl SqlaBroker {
    /// Opens the broker for a `sqla+…` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(url, config, SqlaBrokerOptions::from_config(config)).await
    }

    /// Opens the broker for a `sqla+…` URL with explicit `options`; table options in the
    /// URL override those.
    pub async fn open(url: &str, config: &Config, mut options: SqlaBrokerOptions) -> Result<Self> {
        let parsed = url::parse(url, "sqla+")?;
        if let Some(t) = parsed.option("queue_table") {
            t.clone_into(&mut options.queue_table);
        }
        if let Some(t) = parsed.option("message_table") {
            t.clone_into(&mut options.message_table);
        }
        if let Some(p) = parsed.option("polling_interval") {
            let secs: f64 = p.parse().map_err(|_| {
                Error::config(format!("polling_interval={p:?} is not a number of seconds"))
            })?;
            options.polling_interval = Duration::from_secs_f64(secs.clamp(0.001, 60.0));
        }
        url::check_identifier(&options.queue_table, "queue table")?;
        url::check_identifier(&options.message_table, "message table")?;
        let pool = Pool::connect(&parsed, config, KIND).await?;
        let server = Server::detect(&pool, KIND).await?;
        if let Err(e) = prepare_tables(&pool, server, &options).await {
            if !options.create_tables {
                return Err(e);
            }
            tracing::debug!(error = %e, "creating kombu's tables again");
            prepare_tables(&pool, server, &options).await?;
        }
        let qseq = schema::sequence_exists(&pool, server, None, QUEUE_SEQUENCE, KIND).await?;
        let mseq = schema::sequence_exists(&pool, server, None, MESSAGE_SEQUENCE, KIND).await?;
        let subsecond = match &pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(_) => true,
            #[cfg(feature = "mysql")]
            Pool::My(p) => {
                let precision: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(datetime_precision AS SIGNED) FROM information_schema.columns \
                     WHERE table_schema = DATABASE() AND table_name = ? \
                     AND column_name = 'timestamp'",
                )
                .bind(&options.message_table)
                .fetch_optional(p)
                .await
                .map_err(|e| map_err(KIND, "cannot read kombu's message table", e))?;
                precision.unwrap_or(0) > 0
            }
        };
        let sql = statements(server, &options, qseq, mseq);
        let (publishes, to_insert) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(publish_batches(
            pool.clone(),
            sql.publish_many.clone(),
            sql.publish_row.clone(),
            to_insert,
        ));
        let (acks, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(ack_batches(
            pool.clone(),
            quote(server.dialect, None, &options.message_table),
            queued,
        ));
        Ok(SqlaBroker {
            inner: Arc::new(Inner {
                pool,
                server,
                sql,
                options,
                subsecond,
                queue_ids: Mutex::new(HashMap::new()),
                published: Notify::new(),
                acks,
                publishes,
                closed: AtomicBool::new(false),
                closing: Notify::new(),
            }),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("sqla broker"))
        } else {
            Ok(())
        }
    }

    /// The id of `queue` in `kombu_queue`, made when missing (kombu's `_get_or_create`).
    async fn queue_id(&self, queue: &str) -> Result<i32> {
        if let Some(id) = self.inner.queue_ids.lock().expect("queue ids").get(queue) {
            return Ok(*id);
        }
        let s = &self.inner.sql;
        let what = |e| map_err(KIND, &format!("cannot declare queue {queue}"), e);
        for _ in 0..3 {
            let found: Option<i32> = on_pool!(&self.inner.pool, p =>
                sqlx::query_scalar(sql(&s.queue_id)).bind(queue).fetch_optional(p).await)
            .map_err(what)?;
            if let Some(id) = found {
                self.inner
                    .queue_ids
                    .lock()
                    .expect("queue ids")
                    .insert(queue.to_owned(), id);
                return Ok(id);
            }
            let inserted = on_pool!(&self.inner.pool, p =>
                sqlx::query(sql(&s.queue_insert)).bind(queue).execute(p).await.map(|_| ()));
            match inserted {
                Ok(()) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(what(e)),
            }
        }
        Err(Error::broker(format!("cannot declare queue {queue}: it keeps vanishing")).transient())
    }

    async fn queue_ids(&self, queues: &[String]) -> Result<Vec<i32>> {
        let mut ids = Vec::with_capacity(queues.len());
        for q in queues {
            ids.push(self.queue_id(q).await?);
        }
        Ok(ids)
    }

    fn row_for(
        &self,
        queue: &str,
        message: &Message,
        options: &PublishOptions,
    ) -> Result<(bool, Option<NaiveDateTime>, String, i16)> {
        let payload = envelope::encode(message, "", queue)?;
        let payload = String::from_utf8(payload)
            .map_err(|e| Error::protocol("the envelope is not utf-8").with_source(e))?;
        Ok(match options.not_before {
            Some(t) if t > Utc::now() => {
                (false, Some(to_naive(t, self.inner.subsecond)), payload, -1)
            }
            _ => (true, None, payload, 1),
        })
    }
}

async fn prepare_tables(pool: &Pool, server: Server, o: &SqlaBrokerOptions) -> Result<()> {
    let d = server.dialect;
    let cols = schema::columns(pool, None, &o.message_table, KIND).await?;
    let qcols = schema::columns(pool, None, &o.queue_table, KIND).await?;
    if !cols.is_empty() && !qcols.is_empty() {
        return Ok(());
    }
    if !o.create_tables {
        return Err(Error::broker(format!(
            "kombu's tables {} and {} do not exist (and create_tables is off)",
            o.queue_table, o.message_table
        )));
    }
    let queue = quote(d, None, &o.queue_table);
    let message = quote(d, None, &o.message_table);
    let ts = quote(d, None, "timestamp");
    let suffix = schema::table_suffix(server);
    let (mut ddl, qid) = schema::id_column(server, None, QUEUE_SEQUENCE);
    ddl.push(format!(
        "CREATE TABLE IF NOT EXISTS {queue} ({qid}, name VARCHAR(200), PRIMARY KEY (id), \
         UNIQUE (name)){suffix}"
    ));
    let (mddl, mid) = schema::id_column(server, None, MESSAGE_SEQUENCE);
    ddl.extend(mddl);
    let boolean = match d {
        Dialect::Postgres => "BOOLEAN",
        Dialect::MySql => "BOOL",
    };
    ddl.push(format!(
        "CREATE TABLE IF NOT EXISTS {message} ({mid}, visible {boolean}, {ts} {time}, \
         payload {text} NOT NULL, version SMALLINT NOT NULL, queue_id INTEGER, \
         PRIMARY KEY (id), CONSTRAINT {fk} FOREIGN KEY (queue_id) REFERENCES {queue} (id)){suffix}",
        time = server.datetime(),
        text = server.text(),
        fk = quote(d, None, "FK_kombu_message_queue"),
    ));
    let mt = &o.message_table;
    for (name, on) in [
        (format!("ix_{mt}_visible"), "visible".to_owned()),
        (format!("ix_{mt}_timestamp"), ts.clone()),
        // kombu names this one the same whatever the table is called.
        (
            "ix_kombu_message_timestamp_id".to_owned(),
            format!("{ts}, id"),
        ),
    ] {
        ddl.push(format!(
            "CREATE INDEX IF NOT EXISTS {} ON {message} ({on})",
            quote(d, None, &name)
        ));
    }
    schema::run_ddl(pool, &ddl, KIND).await
}

fn statements(server: Server, o: &SqlaBrokerOptions, qseq: bool, mseq: bool) -> Statements {
    let d = server.dialect;
    let queue = quote(d, None, &o.queue_table);
    let m = quote(d, None, &o.message_table);
    let ts = quote(d, None, "timestamp");
    let p = |n: usize| server.param(n);
    let (qid_col, qid_val) = if qseq {
        (
            "id, ",
            format!("{}, ", server.nextval(None, QUEUE_SEQUENCE)),
        )
    } else {
        ("", String::new())
    };
    let (mid_col, mid_val) = if mseq {
        (
            "id, ",
            format!("{}, ", server.nextval(None, MESSAGE_SEQUENCE)),
        )
    } else {
        ("", String::new())
    };
    // `-version / 2 + 1`: a lease (-2d) or a delay (-(2d+1)) back to a ready row (d + 1).
    let half = match d {
        Dialect::Postgres => "(-version) / 2 + 1",
        Dialect::MySql => "(-version) DIV 2 + 1",
    };
    let columns = format!("INSERT INTO {m} ({mid_col}visible, {ts}, payload, version, queue_id)");
    Statements {
        publish_many: match d {
            Dialect::Postgres => format!(
                "{columns} SELECT {mid_val}v, t, p, n, q FROM UNNEST($1::bool[], \
                 $2::timestamp[], $3::text[], $4::int2[], $5::int4[]) AS u(v, t, p, n, q)"
            ),
            Dialect::MySql => format!("{columns} VALUES "),
        },
        publish_row: format!("({mid_val}?, ?, ?, ?, ?)"),
        queue_id: format!("SELECT id FROM {queue} WHERE name = {}", p(1)),
        queue_insert: format!(
            "INSERT INTO {queue} ({qid_col}name) VALUES ({qid_val}{})",
            p(1)
        ),
        queue_names: format!("SELECT name FROM {queue} ORDER BY name"),
        publish: format!(
            "INSERT INTO {m} ({mid_col}visible, {ts}, payload, version, queue_id) \
             VALUES ({mid_val}{}, {}, {}, {}, {})",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        ),
        fetch_pg: format!(
            "WITH picked AS (SELECT id FROM {m} WHERE queue_id = ANY($1) AND visible = true \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE {m} AS m SET visible = false, {ts} = $3, version = -2 * m.version \
             FROM picked WHERE m.id = picked.id RETURNING m.id, m.payload, m.version, m.queue_id"
        ),
        fetch_my_select: format!(
            "SELECT id, payload, version, queue_id FROM {m} WHERE queue_id IN ({{ids}}) \
             AND visible = true ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
        ),
        fetch_my_update: format!(
            "UPDATE {m} SET visible = false, {ts} = ?, version = -2 * version WHERE id IN ({{ids}})"
        ),
        promote: match d {
            Dialect::Postgres => format!(
                "UPDATE {m} SET visible = true, {ts} = NULL, version = {half} \
                 WHERE queue_id = ANY($1) AND visible = false AND version < 0 AND {ts} <= $2"
            ),
            Dialect::MySql => format!(
                "UPDATE {m} SET visible = true, {ts} = NULL, version = {half} \
                 WHERE queue_id IN ({{ids}}) AND visible = false AND version < 0 AND {ts} <= ?"
            ),
        },
        delete: format!("DELETE FROM {m} WHERE id = {} AND version = {}", p(1), p(2)),
        requeue_now: format!(
            "UPDATE {m} SET visible = true, {ts} = NULL, version = {} WHERE id = {} AND version = {}",
            p(1),
            p(2),
            p(3)
        ),
        requeue_later: format!(
            "UPDATE {m} SET {ts} = {}, version = {} WHERE id = {} AND version = {}",
            p(1),
            p(2),
            p(3),
            p(4)
        ),
        extend: format!(
            "UPDATE {m} SET {ts} = {} WHERE id = {} AND version = {}",
            p(1),
            p(2),
            p(3)
        ),
        stats: format!(
            "SELECT \
             CAST(COALESCE(SUM(CASE WHEN visible THEN 1 ELSE 0 END), 0) AS SIGNED_TYPE), \
             CAST(COALESCE(SUM(CASE WHEN NOT visible AND version < 0 AND MOD(version, 2) <> 0 \
                  THEN 1 ELSE 0 END), 0) AS SIGNED_TYPE), \
             CAST(COALESCE(SUM(CASE WHEN NOT visible AND version < 0 AND MOD(version, 2) = 0 \
                  THEN 1 ELSE 0 END), 0) AS SIGNED_TYPE) \
             FROM {m} WHERE queue_id = {}",
            p(1)
        )
        .replace(
            "SIGNED_TYPE",
            match d {
                Dialect::Postgres => "BIGINT",
                Dialect::MySql => "SIGNED",
            },
        ),
        purge: format!(
            "DELETE FROM {m} WHERE queue_id = {} AND (visible OR version > 0 OR MOD(version, 2) <> 0)",
            p(1)
        ),
    }
}

/// A row taken by a fetch.
#[derive(Debug)]
struct Taken {
    id: i32,
    payload: String,
    /// The version before the fetch: `d + 1` for a row delivered `d` times before.
    version: i16,
    queue_id: i32,
}

impl SqlaBroker {
    /// Turns due leases and delays of `queue_ids` back into ready rows.
    async fn promote(&self, queue_ids: &[i32]) -> Result<u64> {
        retry_deadlocks(|| self.promote_once(queue_ids)).await
    }

    async fn promote_once(&self, queue_ids: &[i32]) -> Result<u64> {
        let now = to_naive(Utc::now(), true);
        let s = &self.inner.sql;
        let what = |e| map_err(KIND, "cannot release expired leases", e);
        match &self.inner.pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(p) => sqlx::query(sql(&s.promote))
                .bind(queue_ids)
                .bind(now)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
                .map_err(what),
            #[cfg(feature = "mysql")]
            Pool::My(p) => {
                let stmt = s.promote.replace("{ids}", &marks(queue_ids.len()));
                let mut q = sqlx::query(sql(&stmt));
                for id in queue_ids {
                    q = q.bind(id);
                }
                q.bind(now)
                    .execute(p)
                    .await
                    .map(|r| r.rows_affected())
                    .map_err(what)
            }
        }
    }

    /// Leases up to `n` ready rows of `queue_ids` until `until`.
    async fn fetch(&self, queue_ids: &[i32], n: usize, until: NaiveDateTime) -> Result<Vec<Taken>> {
        retry_deadlocks(|| self.fetch_once(queue_ids, n, until)).await
    }

    async fn fetch_once(
        &self,
        queue_ids: &[i32],
        n: usize,
        until: NaiveDateTime,
    ) -> Result<Vec<Taken>> {
        let s = &self.inner.sql;
        let what = |e| map_err(KIND, "cannot fetch messages", e);
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let mut rows: Vec<Taken> = match &self.inner.pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(p) => {
                let rows: Vec<(i32, String, i16, Option<i32>)> = sqlx::query_as(sql(&s.fetch_pg))
                    .bind(queue_ids)
                    .bind(limit)
                    .bind(until)
                    .fetch_all(p)
                    .await
                    .map_err(what)?;
                rows.into_iter()
                    .map(|(id, payload, v, q)| Taken {
                        id,
                        payload,
                        // RETURNING gives the new version, -2 × the old one.
                        version: (-v) / 2,
                        queue_id: q.unwrap_or_default(),
                    })
                    .collect()
            }
            #[cfg(feature = "mysql")]
            Pool::My(p) => {
                let mut tx = p.begin().await.map_err(what)?;
                let stmt = s.fetch_my_select.replace("{ids}", &marks(queue_ids.len()));
                let mut q = sqlx::query_as(sql(&stmt));
                for id in queue_ids {
                    q = q.bind(id);
                }
                let rows: Vec<(i32, String, i16, Option<i32>)> =
                    q.bind(limit).fetch_all(&mut *tx).await.map_err(what)?;
                if rows.is_empty() {
                    tx.commit().await.map_err(what)?;
                    return Ok(Vec::new());
                }
                let stmt = s.fetch_my_update.replace("{ids}", &marks(rows.len()));
                let mut q = sqlx::query(sql(&stmt)).bind(until);
                for r in &rows {
                    q = q.bind(r.0);
                }
                q.execute(&mut *tx).await.map_err(what)?;
                tx.commit().await.map_err(what)?;
                rows.into_iter()
                    .map(|(id, payload, version, q)| Taken {
                        id,
                        payload,
                        version,
                        queue_id: q.unwrap_or_default(),
                    })
                    .collect()
            }
        };
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// Runs a settle statement; returns whether the lease still held.
    async fn settle(&self, stmt: &str, binds: SettleBinds) -> Result<bool> {
        retry_deadlocks(|| self.settle_once(stmt, binds)).await
    }

    async fn settle_once(&self, stmt: &str, binds: SettleBinds) -> Result<bool> {
        let what = |e| map_err(KIND, "cannot settle delivery", e);
        let n = on_pool!(&self.inner.pool, p => {
            let mut q = sqlx::query(sql(stmt));
            if let Some(t) = binds.time {
                q = q.bind(t);
            }
            if let Some(v) = binds.new_version {
                q = q.bind(v);
            }
            q.bind(binds.id).bind(binds.token).execute(p).await.map(|r| r.rows_affected())
        })
        .map_err(what)?;
        Ok(n > 0)
    }
}

#[derive(Debug, Clone, Copy)]
struct SettleBinds {
    time: Option<NaiveDateTime>,
    new_version: Option<i16>,
    id: i32,
    token: i16,
}

fn marks(n: usize) -> String {
    vec!["?"; n.max(1)].join(", ")
}

impl Broker for SqlaBroker {
    fn driver(&self) -> &'static str {
        "sqla"
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.delay = true;
        c.lease_extension = true;
        c.multi_process = true;
        c.celery_peers = true;
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.queue_id(queue).await.map(|_| ())
        })
    }

    fn publish<'a>(
        &'a self,
        queue: &'a str,
        message: &'a Message,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let qid = self.queue_id(queue).await?;
            let row = self.row_for(queue, message, &options)?;
            let (done, answer) = tokio::sync::oneshot::channel();
            let pending = PendingPublish {
                row: (row.0, row.1, row.2, row.3, qid),
                done,
            };
            if self.inner.publishes.send(pending).is_err() {
                return Err(Error::closed("sqla broker"));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(Error::closed("sqla broker")))
                .map_err(|e| {
                    Error::new(e.kind(), format!("cannot publish to {queue}: {e}")).with_source(e)
                })?;
            self.inner.published.notify_waiters();
            Ok(())
        })
    }

    fn publish_batch<'a>(
        &'a self,
        queue: &'a str,
        messages: &'a [(Message, PublishOptions)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let qid = self.queue_id(queue).await?;
            let rows = messages
                .iter()
                .map(|(m, o)| self.row_for(queue, m, o))
                .collect::<Result<Vec<_>>>()?;
            let what = |e| map_err(KIND, &format!("cannot publish to {queue}"), e);
            on_pool!(&self.inner.pool, p => async {
                let mut tx = p.begin().await?;
                for (visible, at, payload, version) in rows {
                    sqlx::query(sql(&self.inner.sql.publish))
                        .bind(visible)
                        .bind(at)
                        .bind(payload)
                        .bind(version)
                        .bind(qid)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            }.await)
            .map_err(what)?;
            self.inner.published.notify_waiters();
            Ok(())
        })
    }

    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            self.check_open()?;
            let ids = self.queue_ids(queues).await?;
            let names = ids.iter().copied().zip(queues.iter().cloned()).collect();
            Ok(Box::new(SqlaConsumer {
                broker: self.clone(),
                queue_ids: ids,
                names,
                prefetch: options.prefetch.max(1),
                lease: options.lease.unwrap_or(self.inner.options.lease),
                held: Arc::new(AtomicUsize::new(0)),
                settled: Arc::new(Notify::new()),
                buffer: VecDeque::new(),
                pending: None,
                last_promote: None,
                idle: Duration::from_millis(2),
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let qid = self.queue_id(queue).await?;
            let before = self.stats(queue).await?;
            on_pool!(&self.inner.pool, p => sqlx::query(sql(&self.inner.sql.purge))
                .bind(qid)
                .execute(p)
                .await
                .map(|_| ()))
            .map_err(|e| map_err(KIND, &format!("cannot purge {queue}"), e))?;
            Ok(before.ready + before.delayed)
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let qid = self.queue_id(queue).await?;
            let (ready, delayed, unacked): (i64, i64, i64) = on_pool!(&self.inner.pool, p =>
                sqlx::query_as(sql(&self.inner.sql.stats)).bind(qid).fetch_one(p).await)
            .map_err(|e| map_err(KIND, &format!("cannot count {queue}"), e))?;
            let u = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(QueueStats::new(u(ready), u(delayed), u(unacked)))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            on_pool!(&self.inner.pool, p => sqlx::query_scalar(sql(&self.inner.sql.queue_names))
                .fetch_all(p)
                .await)
            .map_err(|e| map_err(KIND, "cannot list queues", e))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.closing.notify_waiters();
            self.inner.pool.close().await;
            Ok(())
        })
    }
}

/// A consumer of some queues: fetches up to its free prefetch at a time.
struct SqlaConsumer {
    broker: SqlaBroker,
    queue_ids: Vec<i32>,
    names: HashMap<i32, String>,
    prefetch: usize,
    lease: Duration,
    /// Deliveries handed out and not yet settled (or dropped).
    held: Arc<AtomicUsize>,
    settled: Arc<Notify>,
    buffer: VecDeque<Taken>,
    /// A fetch in flight: spawned, so a cancelled `next` loses no row it took.
    pending: Option<JoinHandle<Result<Vec<Taken>>>>,
    last_promote: Option<tokio::time::Instant>,
    idle: Duration,
}

impl fmt::Debug for SqlaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlaConsumer")
            .field("queues", &self.names)
            .field("prefetch", &self.prefetch)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl SqlaConsumer {
    fn delivery(&self, t: Taken) -> Delivery {
        let queue = self.names.get(&t.queue_id).cloned().unwrap_or_default();
        let deliveries = t.version.max(1);
        let message = envelope::decode(t.payload.as_bytes());
        self.held.fetch_add(1, Ordering::AcqRel);
        let acker = SqlaAcker {
            broker: self.broker.clone(),
            id: t.id,
            deliveries,
            token: deliveries.saturating_mul(-2),
            held: Some(HeldSlot {
                held: self.held.clone(),
                settled: self.settled.clone(),
            })
            .into(),
        };
        Delivery::new(
            message,
            queue,
            u32::try_from(deliveries - 1).unwrap_or(0),
            Box::new(acker),
        )
    }

    async fn next_inner(&mut self) -> Result<Option<Delivery>> {
        loop {
            if self.broker.inner.closed.load(Ordering::Acquire) {
                return Ok(None);
            }
            if let Some(t) = self.buffer.pop_front() {
                return Ok(Some(self.delivery(t)));
            }
            if let Some(handle) = self.pending.as_mut() {
                let taken = handle.await;
                self.pending = None;
                if self.broker.inner.closed.load(Ordering::Acquire) {
                    return Ok(None);
                }
                let taken =
                    taken.map_err(|e| Error::broker("fetch task failed").with_source(e))??;
                if taken.is_empty() {
                    self.wait_idle().await;
                } else {
                    self.idle = Duration::from_millis(2);
                    self.buffer.extend(taken);
                }
                continue;
            }
            let held = self.held.load(Ordering::Acquire);
            if held >= self.prefetch {
                let settled = self.settled.notified();
                tokio::pin!(settled);
                settled.as_mut().enable();
                if self.held.load(Ordering::Acquire) >= self.prefetch {
                    tokio::select! {
                        () = settled => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                continue;
            }
            let free = self.prefetch - held;
            let promote = self
                .last_promote
                .is_none_or(|t| t.elapsed() >= PROMOTE_EVERY);
            if promote {
                self.last_promote = Some(tokio::time::Instant::now());
            }
            let broker = self.broker.clone();
            let ids = self.queue_ids.clone();
            let lease = self.lease;
            self.pending = Some(tokio::spawn(async move {
                if promote && let Err(e) = broker.promote(&ids).await {
                    tracing::debug!(error = %e, "releasing expired leases failed");
                }
                let until =
                    Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                broker
                    .fetch(&ids, free, to_naive(until, broker.inner.subsecond))
                    .await
            }));
        }
    }

    /// Nothing to fetch: waits for a publish of this process, the next poll, or close.
    async fn wait_idle(&mut self) {
        let inner = &self.broker.inner;
        let published = inner.published.notified();
        let closing = inner.closing.notified();
        tokio::pin!(published, closing);
        published.as_mut().enable();
        closing.as_mut().enable();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let wait = self
            .idle
            .min(inner.options.polling_interval)
            .min(PROMOTE_EVERY);
        tokio::select! {
            () = published => {}
            () = closing => {}
            () = tokio::time::sleep(wait) => {}
        }
        self.idle = (self.idle * 2).min(inner.options.polling_interval);
    }
}

impl Consumer for SqlaConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(self.next_inner())
    }
}

impl Drop for SqlaConsumer {
    fn drop(&mut self) {
        // Rows fetched and not handed out (buffered, or in a fetch still running) go back
        // as they were: they were never delivered.
        let mut give_back: Vec<(i32, i16, i16)> = self
            .buffer
            .drain(..)
            .map(|t| (t.id, t.version.max(1), t.version.max(1).saturating_mul(-2)))
            .collect();
        let pending = self.pending.take();
        if give_back.is_empty() && pending.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.broker.clone();
        rt.spawn(async move {
            if let Some(p) = pending
                && let Ok(Ok(taken)) = p.await
            {
                give_back.extend(
                    taken
                        .iter()
                        .map(|t| (t.id, t.version.max(1), t.version.max(1).saturating_mul(-2))),
                );
            }
            for (id, version, token) in give_back {
                let binds = SettleBinds {
                    time: None,
                    new_version: Some(version),
                    id,
                    token,
                };
                if let Err(e) = broker.settle(&broker.inner.sql.requeue_now, binds).await {
                    tracing::debug!(error = %e, "cannot give back a prefetched message");
                }
            }
            broker.inner.published.notify_waiters();
        });
    }
}

/// One batch's error for each of its callers: kind, message (with the cause) and whether it
/// is transient.
fn copy_error(e: &Error) -> Error {
    let copy = Error::new(e.kind(), format!("{e:#}"));
    if e.is_transient() {
        copy.transient()
    } else {
        copy
    }
}

/// A row to insert: visible, timestamp, payload, version, queue id.
type Row = (bool, Option<NaiveDateTime>, String, i16, i32);

/// A publish waiting for its batch.
#[derive(Debug)]
struct PendingPublish {
    row: Row,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// Inserts published rows: each round takes every publish queued at that moment (up to
/// [`ACK_BATCH`]) and inserts them with one statement (one commit). When that fails, each row
/// is tried alone, so one bad row fails only its own publish. Ends when the broker is dropped.
async fn publish_batches(
    pool: Pool,
    many: String,
    row_sql: String,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<PendingPublish>,
) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while queued.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let rows: Vec<&Row> = batch.iter().map(|p| &p.row).collect();
        let all = retry_deadlocks(|| insert_rows(&pool, &many, &row_sql, &rows)).await;
        if all.is_ok() || batch.len() == 1 {
            for p in batch.drain(..) {
                let r = match &all {
                    Ok(()) => Ok(()),
                    Err(e) => Err(copy_error(e)),
                };
                let _ = p.done.send(r);
            }
            continue;
        }
        for p in batch.drain(..) {
            let one = [&p.row];
            let r = retry_deadlocks(|| insert_rows(&pool, &many, &row_sql, &one)).await;
            let _ = p.done.send(r);
        }
    }
}

async fn insert_rows(pool: &Pool, many: &str, row_sql: &str, rows: &[&Row]) -> Result<()> {
    let what = |e| map_err(KIND, "cannot insert messages", e);
    match pool {
        #[cfg(feature = "postgres")]
        Pool::Pg(p) => {
            let _ = row_sql;
            let visible: Vec<bool> = rows.iter().map(|r| r.0).collect();
            let at: Vec<Option<NaiveDateTime>> = rows.iter().map(|r| r.1).collect();
            let payload: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
            let version: Vec<i16> = rows.iter().map(|r| r.3).collect();
            let queue: Vec<i32> = rows.iter().map(|r| r.4).collect();
            sqlx::query(sql(many))
                .bind(visible)
                .bind(at)
                .bind(payload)
                .bind(version)
                .bind(queue)
                .execute(p)
                .await
                .map(|_| ())
                .map_err(what)
        }
        #[cfg(feature = "mysql")]
        Pool::My(p) => {
            let stmt = format!("{many}{}", vec![row_sql; rows.len()].join(", "));
            let mut q = sqlx::query(sql(&stmt));
            for r in rows {
                q = q.bind(r.0).bind(r.1).bind(r.2.as_str()).bind(r.3).bind(r.4);
            }
            q.execute(p).await.map(|_| ()).map_err(what)
        }
    }
}

/// An ack waiting for its batch.
#[derive(Debug)]
struct PendingAck {
    id: i32,
    token: i16,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// Most acks deleted by one statement.
const ACK_BATCH: usize = 256;

/// Deletes acked rows: each round takes every ack queued at that moment (up to
/// [`ACK_BATCH`]) and deletes their rows in one statement, each only while it still holds its
/// lease version. Ends when the broker is dropped.
async fn ack_batches(
    pool: Pool,
    table: String,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<PendingAck>,
) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while queued.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let ids: Vec<i32> = batch.iter().map(|a| a.id).collect();
        let tokens: Vec<i16> = batch.iter().map(|a| a.token).collect();
        let r = retry_deadlocks(|| delete_acked(&pool, &table, &ids, &tokens)).await;
        match r {
            Ok(n) => {
                if (n as usize) < batch.len() {
                    tracing::debug!(
                        acked = batch.len(),
                        deleted = n,
                        "some acks came after their lease ran out"
                    );
                }
                for a in batch.drain(..) {
                    let _ = a.done.send(Ok(()));
                }
            }
            Err(e) => {
                for a in batch.drain(..) {
                    let _ = a.done.send(Err(copy_error(&e)));
                }
            }
        }
    }
}

async fn delete_acked(pool: &Pool, table: &str, ids: &[i32], tokens: &[i16]) -> Result<u64> {
    let what = |e| map_err(KIND, "cannot ack", e);
    match pool {
        #[cfg(feature = "postgres")]
        Pool::Pg(p) => {
            let stmt = format!(
                "DELETE FROM {table} WHERE (id, version) IN \
                 (SELECT * FROM UNNEST($1::int4[], $2::int2[]))"
            );
            sqlx::query(sql(&stmt))
                .bind(ids)
                .bind(tokens)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
                .map_err(what)
        }
        #[cfg(feature = "mysql")]
        Pool::My(p) => {
            let pairs = vec!["(?, ?)"; ids.len()].join(", ");
            let stmt = format!("DELETE FROM {table} WHERE (id, version) IN ({pairs})");
            let mut q = sqlx::query(sql(&stmt));
            for (id, token) in ids.iter().zip(tokens) {
                q = q.bind(id).bind(token);
            }
            q.execute(p).await.map(|r| r.rows_affected()).map_err(what)
        }
    }
}

/// Frees a prefetch slot once: on settle or when the delivery is dropped.
#[derive(Debug)]
struct HeldSlot {
    held: Arc<AtomicUsize>,
    settled: Arc<Notify>,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_waiters();
    }
}

struct SqlaAcker {
    broker: SqlaBroker,
    id: i32,
    /// This delivery's number (1 for the first).
    deliveries: i16,
    /// The row's version while leased to us: the fencing token.
    token: i16,
    held: Mutex<Option<HeldSlot>>,
}

impl fmt::Debug for SqlaAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlaAcker")
            .field("id", &self.id)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl SqlaAcker {
    fn release(&self) {
        drop(self.held.lock().expect("held slot").take());
    }

    fn binds(&self) -> SettleBinds {
        SettleBinds {
            time: None,
            new_version: None,
            id: self.id,
            token: self.token,
        }
    }

    fn lost(&self, what: &str) {
        tracing::debug!(
            message_id = self.id,
            "{what}: the lease had run out and the row went to another consumer or back"
        );
    }
}

impl Acker for SqlaAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let (done, answer) = tokio::sync::oneshot::channel();
            let pending = PendingAck {
                id: self.id,
                token: self.token,
                done,
            };
            let r = if self.broker.inner.acks.send(pending).is_ok() {
                answer
                    .await
                    .unwrap_or_else(|_| Err(Error::closed("sqla broker")))
            } else {
                Err(Error::closed("sqla broker"))
            };
            self.release();
            r
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let s = &self.broker.inner.sql;
            let r = match requeue {
                Requeue::Drop => self.broker.settle(&s.delete, self.binds()).await,
                Requeue::Now => {
                    let r = self
                        .broker
                        .settle(
                            &s.requeue_now,
                            SettleBinds {
                                new_version: Some(self.deliveries.saturating_add(1)),
                                ..self.binds()
                            },
                        )
                        .await;
                    self.broker.inner.published.notify_waiters();
                    r
                }
                Requeue::After(d) => {
                    let at =
                        Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
                    self.broker
                        .settle(
                            &s.requeue_later,
                            SettleBinds {
                                time: Some(to_naive(at, self.broker.inner.subsecond)),
                                new_version: Some(self.token.saturating_sub(1)),
                                ..self.binds()
                            },
                        )
                        .await
                }
            };
            self.release();
            if !r? {
                self.lost("reject");
            }
            Ok(())
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let at = Utc::now() + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
            let held = self
                .broker
                .settle(
                    &self.broker.inner.sql.extend,
                    SettleBinds {
                        time: Some(to_naive(at, self.broker.inner.subsecond)),
                        ..self.binds()
                    },
                )
                .await?;
            if held {
                Ok(())
            } else {
                Err(Error::broker(format!(
                    "the lease of message {} has run out; it may run again elsewhere",
                    self.id
                )))
            }
        })
    }
}
