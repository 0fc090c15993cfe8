//! [`PgBroker`]: queues as rows of one table, leased with `FOR UPDATE SKIP LOCKED`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use celeriac_core::protocol::envelope;
use celeriac_core::{
    Acker, BoxFuture, Broker, Capabilities, Config, ConsumeOptions, Consumer, Delivery, Error,
    ErrorKind, Message, PublishOptions, QueueStats, Requeue, Result, StoredState, TaskState,
};
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::options::PgOptions;
use crate::store::{Store, ms, now_ms};

const KIND: ErrorKind = ErrorKind::Broker;

/// The longest an idle consumer sleeps between checks when no notification comes: a safety
/// net for a notification lost with a connection, not the way messages are found.
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// Row states.
pub(crate) const READY: i16 = 0;
pub(crate) const DELAYED: i16 = 1;

/// A broker in a PostgreSQL database (`postgres://…`). Clones share one pool.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{Broker, ConsumeOptions};
/// use celeriac_postgres::PgBroker;
///
/// let broker = PgBroker::connect("postgres://postgres@localhost/app", &Default::default()).await?;
/// broker.declare("celery").await?;
/// let mut consumer = broker
///     .consume(&["celery".to_owned()], ConsumeOptions::new(8))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgBroker {
    pub(crate) store: Arc<Store>,
    pub(crate) next_sweep: Arc<std::sync::atomic::AtomicI64>,
}

impl PgBroker {
    /// Opens the broker for a `postgres://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(PgOptions::from_url(url, config)?).await
    }

    /// Opens the broker with `options`; creates the tables if missing.
    pub async fn open(options: PgOptions) -> Result<Self> {
        Ok(PgBroker {
            store: Store::open(options, KIND, "broker").await?,
            next_sweep: Arc::default(),
        })
    }

    /// The pool, for callers that want to run their own statements on the broker's database.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.store.pool
    }

    /// The schema of the tables.
    pub fn schema(&self) -> &str {
        self.store.options.schema()
    }

    fn check_open(&self) -> Result<()> {
        self.store.check_open("postgres broker")
    }
}

// ===== publishing =====

/// A message ready to insert.
#[derive(Debug)]
pub(crate) struct NewRow {
    pub(crate) priority: i16,
    pub(crate) state: i16,
    pub(crate) visible_at: i64,
    pub(crate) task_id: Option<String>,
    pub(crate) body: String,
}

pub(crate) fn new_row(
    queue: &str,
    message: &Message,
    options: &PublishOptions,
    now: i64,
) -> Result<NewRow> {
    let priority = options
        .priority
        .or(message.properties.priority)
        .unwrap_or(0)
        .min(9);
    let body = envelope::encode(message, "", queue)?;
    let body = String::from_utf8(body)
        .map_err(|e| Error::protocol("envelope is not utf-8").with_source(e))?;
    let (state, visible_at) = match options.not_before {
        Some(t) if t.timestamp_millis() > now => (DELAYED, t.timestamp_millis()),
        _ => (READY, now),
    };
    Ok(NewRow {
        priority: i16::from(priority),
        state,
        visible_at,
        // What the result probe reads the state under; the worker uses the state only when
        // this is the id of the task it decodes (Celery sets them equal).
        task_id: Some(message.properties.correlation_id.clone()).filter(|s| !s.is_empty()),
        body,
    })
}

/// Inserts rows into queue `$1` (declaring it) and notifies consumers, in one statement.
const INSERT_SQL: &str = "WITH q AS (INSERT INTO {s}queues (name) VALUES ($1) ON CONFLICT DO NOTHING), \
     ins AS (INSERT INTO {s}messages (queue, priority, state, visible_at, task_id, body) \
             SELECT $1, * FROM unnest($2::smallint[], $3::smallint[], $4::bigint[], $5::text[], $6::text[])) \
     SELECT pg_notify($7, $1)";

/// Inserts `rows` into `queue` on `conn` (a pool connection or the caller's transaction).
pub(crate) async fn insert(
    conn: &mut PgConnection,
    schema_prefix: &str,
    notify_channel: &str,
    queue: &str,
    rows: &[NewRow],
) -> std::result::Result<(), sqlx::Error> {
    let sql = INSERT_SQL.replace("{s}", schema_prefix);
    sqlx::query(AssertSqlSafe(sql))
        .bind(queue)
        .bind(rows.iter().map(|r| r.priority).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.state).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.visible_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.task_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.body.as_str()).collect::<Vec<_>>())
        .bind(notify_channel)
        .execute(conn)
        .await
        .map(|_| ())
}

impl PgBroker {
    async fn insert_rows(&self, queue: &str, rows: &[NewRow]) -> Result<()> {
        let mut conn = self
            .store
            .pool
            .acquire()
            .await
            .map_err(|e| self.store.err("cannot publish to postgres queue", e))?;
        insert(
            &mut conn,
            &self.store.s,
            &self.store.hub.queue_ch,
            queue,
            rows,
        )
        .await
        .map_err(|e| self.store.err("cannot publish to postgres queue", e))
    }
}

impl Broker for PgBroker {
    fn driver(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        // Python Celery has no transport of this layout (kombu's SQLAlchemy one is another).
        let mut c = Capabilities::all();
        c.celery_peers = false;
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            sqlx::query(AssertSqlSafe(self.store.sql(
                "INSERT INTO {s}queues (name) VALUES ($1) ON CONFLICT DO NOTHING",
            )))
            .bind(queue)
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot declare postgres queue", e))?;
            Ok(())
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
            let r = new_row(queue, message, &options, now_ms())?;
            self.store.publish_one(queue, r).await
        })
    }

    fn publish_batch<'a>(
        &'a self,
        queue: &'a str,
        messages: &'a [(Message, PublishOptions)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let now = now_ms();
            let rows = messages
                .iter()
                .map(|(m, o)| new_row(queue, m, o, now))
                .collect::<Result<Vec<_>>>()?;
            if rows.is_empty() {
                return Ok(());
            }
            self.insert_rows(queue, &rows).await
        })
    }

    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            self.check_open()?;
            if queues.is_empty() {
                return Err(Error::broker("consume needs at least one queue"));
            }
            self.store.listen().await?;
            for q in queues {
                self.declare(q).await?;
            }
            let probe = options
                .result_probe
                .is_some_and(|p| p.store == self.store.options.identity());
            Ok(Box::new(PgConsumer {
                store: self.store.clone(),
                queues: queues.to_vec(),
                prefetch: options.prefetch.max(1),
                lease_ms: ms(options
                    .lease
                    .unwrap_or(self.store.options.visibility_timeout())),
                probe,
                slots: Arc::new(Slots::default()),
                buffer: VecDeque::new(),
                pending: None,
                next_due: None,
                rotate: 0,
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let r = sqlx::query(AssertSqlSafe(self.store.sql(
                "DELETE FROM {s}messages WHERE queue = $1 AND (state <> 2 OR visible_at <= $2)",
            )))
            .bind(queue)
            .bind(now_ms())
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot purge postgres queue", e))?;
            Ok(r.rows_affected())
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let row = sqlx::query(AssertSqlSafe(self.store.sql(
                "SELECT count(*) FILTER (WHERE state = 0 OR visible_at <= $2), \
                        count(*) FILTER (WHERE state = 1 AND visible_at > $2), \
                        count(*) FILTER (WHERE state = 2 AND visible_at > $2) \
                 FROM {s}messages WHERE queue = $1",
            )))
            .bind(queue)
            .bind(now_ms())
            .fetch_one(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot count postgres queue", e))?;
            let n = |i: usize| u64::try_from(row.get::<i64, _>(i)).unwrap_or(0);
            Ok(QueueStats::new(n(0), n(1), n(2)))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            sqlx::query_scalar(AssertSqlSafe(
                self.store.sql("SELECT name FROM {s}queues ORDER BY name"),
            ))
            .fetch_all(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot list postgres queues", e))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.store.close();
            Ok(())
        })
    }

    /// Remote control and events through the database (see the crate docs).
    fn broadcast(&self) -> Option<&dyn celeriac_core::broadcast::Broadcast> {
        Some(self)
    }
}

// ===== consumer =====

/// One leased row, not yet handed out.
#[derive(Debug)]
struct LeasedRow {
    id: i64,
    /// The row's `deliveries` after this lease: with `lease`, the lease's fencing token.
    token: i32,
    /// The lease's first end, written by the fetch to `visible_at` and to `lease`, which
    /// extensions leave alone (ms).
    lease: i64,
    queue: String,
    body: String,
    stored: Option<StoredState>,
}

/// What one fetch found.
#[derive(Debug)]
struct Fetched {
    rows: Vec<LeasedRow>,
    /// When the next delayed or leased row of these queues is due (ms), when the fetch found
    /// fewer rows than it asked for.
    next_due: Option<i64>,
}

/// The consumer's prefetch accounting, shared with its ackers.
#[derive(Debug, Default)]
struct Slots {
    outstanding: AtomicUsize,
    freed: Notify,
}

impl Slots {
    fn free(&self, n: usize) {
        if n > 0 {
            self.outstanding.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct PgConsumer {
    store: Arc<Store>,
    queues: Vec<String>,
    prefetch: usize,
    lease_ms: i64,
    probe: bool,
    slots: Arc<Slots>,
    buffer: VecDeque<LeasedRow>,
    /// A fetch in flight, on a task of its own so that cancelling `next` loses no row.
    pending: Option<(JoinHandle<Result<Fetched>>, usize)>,
    next_due: Option<i64>,
    rotate: usize,
}

/// The rows to lease from queue `$1`: up to `$2` ready ones (highest priority, then oldest)
/// and up to `$2` due ones (delays whose time came, leases that ran out, at `$4`), each
/// branch an index seek that skips rows other consumers are leasing this moment; the best
/// `$2` of them are leased until `$3`. One statement per fetch: due rows need no separate
/// promotion.
const CANDIDATES: &str = "WITH r AS (SELECT id FROM {s}messages WHERE queue = $1 AND state = 0 \
       ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED), \
     d AS (SELECT id FROM {s}messages WHERE queue = $1 AND state <> 0 AND visible_at <= $4 \
       ORDER BY visible_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
     c AS (SELECT m.id FROM {s}messages m WHERE m.id IN (SELECT id FROM r UNION ALL SELECT id FROM d) \
       ORDER BY m.priority DESC, m.id LIMIT $2), \
     l AS (UPDATE {s}messages m SET state = 2, visible_at = $3, lease = $3, \
       deliveries = m.deliveries + 1 \
       FROM c WHERE m.id = c.id RETURNING m.id, m.deliveries, m.priority, m.body, m.task_id) ";

/// Leases rows (see [`CANDIDATES`]).
const LEASE_SQL: &str = "SELECT l.id, l.deliveries, l.priority, l.body, l.task_id FROM l";

/// The same, reading each task's stored state with the fetch.
const LEASE_PROBE_SQL: &str = "SELECT l.id, l.deliveries, l.priority, l.body, l.task_id, r.status \
     FROM l LEFT JOIN {s}results r ON r.task_id = l.task_id \
          AND (r.expires_at IS NULL OR r.expires_at > $4)";

/// When the next delayed or leased row of queue `$1` becomes due.
const NEXT_DUE_SQL: &str =
    "SELECT min(visible_at) FROM {s}messages WHERE queue = $1 AND state <> 0";

async fn fetch(
    store: Arc<Store>,
    queues: Vec<String>,
    want: usize,
    lease_ms: i64,
    probe: bool,
) -> Result<Fetched> {
    let what = "cannot fetch from postgres queue";
    let mut conn = store.fast.acquire().await.map_err(|e| store.err(what, e))?;
    let now = now_ms();
    let until = now + lease_ms;
    let mut rows = Vec::new();
    let read_at = Instant::now();
    for queue in &queues {
        let left = want - rows.len();
        if left == 0 {
            break;
        }
        let sql = if probe { LEASE_PROBE_SQL } else { LEASE_SQL };
        let got = sqlx::query(AssertSqlSafe(store.sql(&format!("{CANDIDATES}{sql}"))))
            .bind(queue)
            .bind(i64::try_from(left).unwrap_or(i64::MAX))
            .bind(until)
            .bind(now)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| store.err(what, e))?;
        let mut got: Vec<(i16, LeasedRow)> = got
            .into_iter()
            .map(|r| {
                let stored = if probe {
                    r.get::<Option<String>, _>(4).map(|task_id| StoredState {
                        task_id,
                        state: r
                            .get::<Option<String>, _>(5)
                            .map(|s| s.parse::<TaskState>().unwrap_or_else(|e| match e {})),
                        read_at,
                    })
                } else {
                    None
                };
                (
                    r.get(2),
                    LeasedRow {
                        id: r.get(0),
                        token: r.get(1),
                        lease: until,
                        queue: queue.clone(),
                        body: r.get(3),
                        stored,
                    },
                )
            })
            .collect();
        // RETURNING does not keep the subquery's order.
        got.sort_by_key(|(priority, r)| (std::cmp::Reverse(*priority), r.id));
        rows.extend(got.into_iter().map(|(_, r)| r));
    }
    // Only an idle consumer needs the next due time: one that got rows fetches again at once.
    let next_due = if rows.is_empty() {
        let mut min: Option<i64> = None;
        for queue in &queues {
            let due: Option<i64> = sqlx::query_scalar(AssertSqlSafe(store.sql(NEXT_DUE_SQL)))
                .bind(queue)
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| store.err(what, e))?;
            min = match (min, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        min
    } else {
        None
    };
    Ok(Fetched { rows, next_due })
}

/// Gives leased rows back as never delivered (a consumer dropped or closed with rows it never
/// handed out).
fn release(store: &Arc<Store>, rows: Vec<(i64, i32, i64)>) {
    if rows.is_empty() || store.pool.is_closed() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let store = store.clone();
    rt.spawn(async move {
        let (ids, tokens, leases) = crate::store::fences(rows.into_iter());
        let r = sqlx::query(AssertSqlSafe(store.sql(
            "WITH u AS (UPDATE {s}messages m SET state = 0, deliveries = m.deliveries - 1 \
             FROM unnest($1::bigint[], $2::int[], $4::bigint[]) AS r(id, tok, lease) \
             WHERE m.id = r.id AND m.deliveries = r.tok AND m.lease = r.lease \
               AND m.state = 2 RETURNING m.queue) \
             SELECT pg_notify($3, queue) FROM (SELECT DISTINCT queue FROM u) d",
        )))
        .bind(ids)
        .bind(tokens)
        .bind(&store.hub.queue_ch)
        .bind(leases)
        .execute(&store.pool)
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot give back prefetched postgres messages; their leases will run out");
        }
    });
}

impl Drop for PgConsumer {
    fn drop(&mut self) {
        let rows: Vec<_> = self
            .buffer
            .drain(..)
            .map(|r| (r.id, r.token, r.lease))
            .collect();
        release(&self.store, rows);
        if let Some((handle, _)) = self.pending.take() {
            let store = self.store.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Ok(Ok(f)) = handle.await {
                        release(
                            &store,
                            f.rows.iter().map(|r| (r.id, r.token, r.lease)).collect(),
                        );
                    }
                });
            }
        }
    }
}

impl PgConsumer {
    fn deliver(&self, row: LeasedRow) -> Delivery {
        let message = envelope::decode(row.body.as_bytes());
        if let Err(e) = &message {
            tracing::warn!(queue = %row.queue, row = row.id, error = %format_args!("{e:#}"), "undecodable message in postgres queue");
        }
        let acker = PgAcker {
            store: self.store.clone(),
            id: row.id,
            token: row.token,
            lease: row.lease,
            slots: self.slots.clone(),
            settled: AtomicBool::new(false),
        };
        let redeliveries = u32::try_from(row.token - 1).unwrap_or(0);
        Delivery::new(message, row.queue, redeliveries, Box::new(acker)).with_stored(row.stored)
    }

    /// Starts a fetch for every free prefetch slot; false when there is none.
    fn start_fetch(&mut self) -> bool {
        let held = self.slots.outstanding.load(Ordering::Acquire);
        let free = self.prefetch.saturating_sub(held);
        if free == 0 {
            return false;
        }
        let n = self.queues.len();
        self.rotate = (self.rotate + 1) % n;
        let queues: Vec<String> = (0..n)
            .map(|i| self.queues[(self.rotate + i) % n].clone())
            .collect();
        self.slots.outstanding.fetch_add(free, Ordering::AcqRel);
        let handle = tokio::spawn(fetch(
            self.store.clone(),
            queues,
            free,
            self.lease_ms,
            self.probe,
        ));
        self.pending = Some((handle, free));
        true
    }

    /// Awaits the fetch in flight (cancel-safe) and buffers what it found; returns how many.
    async fn finish_fetch(&mut self) -> Result<usize> {
        let Some((handle, _)) = self.pending.as_mut() else {
            return Ok(0);
        };
        let r = handle.await;
        let (_, reserved) = self.pending.take().unwrap_or_else(|| unreachable!());
        let r =
            r.unwrap_or_else(|e| Err(Error::broker("a postgres fetch task failed").with_source(e)));
        match r {
            Ok(fetched) => {
                let got = fetched.rows.len();
                self.slots.free(reserved - got);
                self.buffer.extend(fetched.rows);
                self.next_due = fetched.next_due;
                Ok(got)
            }
            Err(e) => {
                self.slots.free(reserved);
                Err(e)
            }
        }
    }

    async fn next_delivery(&mut self) -> Result<Option<Delivery>> {
        let store = self.store.clone();
        let slots = self.slots.clone();
        let mut changes = store.hub.queues.subscribe();
        loop {
            if store.is_closed() {
                let rows: Vec<_> = self
                    .buffer
                    .drain(..)
                    .map(|r| (r.id, r.token, r.lease))
                    .collect();
                release(&store, rows);
                return Ok(None);
            }
            if let Some(row) = self.buffer.pop_front() {
                return Ok(Some(self.deliver(row)));
            }
            let freed = slots.freed.notified();
            let closed = store.close_notify.notified();
            tokio::pin!(freed, closed);
            freed.as_mut().enable();
            closed.as_mut().enable();
            if store.is_closed() {
                continue;
            }
            // Listen before looking, so a publish between the two is not missed.
            changes.borrow_and_update();
            if self.pending.is_none() && !self.start_fetch() {
                tokio::select! {
                    () = freed => {}
                    () = closed => {}
                }
                continue;
            }
            if self.finish_fetch().await? > 0 {
                continue;
            }
            let wait = self
                .next_due
                .map_or(SAFETY_POLL, |due| {
                    Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
                })
                .min(SAFETY_POLL);
            tokio::select! {
                _ = changes.changed() => {}
                () = closed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Consumer for PgConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(self.next_delivery())
    }
}

// ===== acker =====

#[derive(Debug)]
struct PgAcker {
    store: Arc<Store>,
    id: i64,
    token: i32,
    /// The lease's `lease` column (its first end): with `token`, its fencing token.
    lease: i64,
    slots: Arc<Slots>,
    settled: AtomicBool,
}

impl PgAcker {
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.slots.free(1);
        }
    }
}

impl Drop for PgAcker {
    fn drop(&mut self) {
        // A delivery dropped unsettled stays leased until its lease runs out, but no longer
        // counts against the consumer's prefetch.
        self.settle();
    }
}

impl Acker for PgAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            self.store.ack(self.id, self.token, self.lease).await
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            let lease = self.lease;
            let q = match requeue {
                Requeue::Drop => sqlx::query(AssertSqlSafe(self.store.sql(
                    "DELETE FROM {s}messages WHERE id = $1 AND deliveries = $2 AND lease = $3",
                )))
                .bind(self.id)
                .bind(self.token)
                .bind(lease),
                Requeue::Now => sqlx::query(AssertSqlSafe(self.store.sql(
                    "WITH u AS (UPDATE {s}messages SET state = 0 \
                     WHERE id = $1 AND deliveries = $2 AND lease = $4 RETURNING queue) \
                     SELECT pg_notify($3, queue) FROM u",
                )))
                .bind(self.id)
                .bind(self.token)
                .bind(&self.store.hub.queue_ch)
                .bind(lease),
                Requeue::After(d) => sqlx::query(AssertSqlSafe(self.store.sql(
                    "WITH u AS (UPDATE {s}messages SET state = 1, visible_at = $4 \
                     WHERE id = $1 AND deliveries = $2 AND lease = $5 RETURNING queue) \
                     SELECT pg_notify($3, queue) FROM u",
                )))
                .bind(self.id)
                .bind(self.token)
                .bind(&self.store.hub.queue_ch)
                .bind(now_ms().saturating_add(ms(d)))
                .bind(lease),
            };
            q.execute(&self.store.fast)
                .await
                .map_err(|e| self.store.err("cannot reject postgres message", e))?;
            Ok(())
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let r = sqlx::query(AssertSqlSafe(self.store.sql(
                "UPDATE {s}messages SET state = 2, visible_at = $3 \
                 WHERE id = $1 AND deliveries = $2 AND lease = $4",
            )))
            .bind(self.id)
            .bind(self.token)
            .bind(now_ms().saturating_add(ms(by)))
            .bind(self.lease)
            .execute(&self.store.fast)
            .await
            .map_err(|e| self.store.err("cannot extend postgres lease", e))?;
            if r.rows_affected() == 0 {
                return Err(Error::broker(
                    "lease lost: the message was settled or handed to another consumer",
                ));
            }
            Ok(())
        })
    }
}
