//! [`MysqlBroker`]: queues as rows of one InnoDB table, claimed with `SELECT … FOR UPDATE SKIP
//! LOCKED` and leased to consumers.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::protocol::envelope;
use celeriac_core::{
    Acker, BoxFuture, Broker, Capabilities, Config, ConsumeOptions, Consumer, Delivery, Error,
    ErrorKind, Message, PublishOptions, QueueStats, Requeue, Result,
};
use sqlx::mysql::{MySqlArguments, MySqlPool};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, MySql, Row as _};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::db::{self, map_err, millis};
use crate::options::MysqlOptions;

const KIND: ErrorKind = ErrorKind::Broker;

/// The first sleep of a consumer that found nothing; it doubles up to the poll interval.
const FIRST_IDLE: Duration = Duration::from_millis(1);

/// Message states (the `state` column).
pub(crate) const READY: i64 = 0;

/// A broker in a MariaDB or MySQL database (`mysql://…`, `mariadb://…`). Clones share one pool.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{Broker, ConsumeOptions};
/// use celeriac_mysql::{MysqlBroker, MysqlOptions};
///
/// let config = celeriac_core::Config::default();
/// let options = MysqlOptions::from_url("mysql://root@127.0.0.1:3306/test", &config)?;
/// let broker = MysqlBroker::open(options).await?;
/// broker.declare("celery").await?;
/// let mut consumer = broker
///     .consume(&["celery".to_owned()], ConsumeOptions::new(8))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MysqlBroker {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) pool: MySqlPool,
    pub(crate) options: MysqlOptions,
    pub(crate) closed: AtomicBool,
    pub(crate) close_notify: Notify,
    /// Fired after this process committed messages that may be ready.
    published: Notify,
    /// Fired after this process sent a broadcast row.
    pub(crate) broadcast_sent: Notify,
    known_queues: Mutex<HashSet<String>>,
    /// The ack batcher's queue (see [`ack_batcher`]).
    acks: mpsc::UnboundedSender<PendingAck>,
    /// When a broadcast send next deletes expired broadcast rows (Unix ms).
    pub(crate) next_sweep: AtomicI64,
}

impl MysqlBroker {
    /// Opens the broker: connects, and creates the tables on first use.
    ///
    /// Fails with [`ErrorKind::Broker`] when the server is unreachable (transient), the
    /// password is wrong, the database is missing, or the user may not create or read the
    /// tables; the message says which.
    pub async fn open(options: MysqlOptions) -> Result<Self> {
        let pool = db::open(&options, KIND).await?;
        Ok(Self::with_pool(pool, options))
    }

    /// Opens the broker for a `mysql://` or `mariadb://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(MysqlOptions::from_url(url, config)?).await
    }

    pub(crate) fn with_pool(pool: MySqlPool, options: MysqlOptions) -> Self {
        let (acks, queued) = mpsc::unbounded_channel();
        tokio::spawn(ack_batcher(pool.clone(), queued));
        MysqlBroker {
            inner: Arc::new(Inner {
                acks,
                pool,
                options,
                closed: AtomicBool::new(false),
                close_notify: Notify::new(),
                published: Notify::new(),
                broadcast_sent: Notify::new(),
                known_queues: Mutex::new(HashSet::new()),
                next_sweep: AtomicI64::new(0),
            }),
        }
    }

    /// The connection pool, for transactional enqueue with [`crate::publish_in`] or for
    /// reading the tables.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("mysql broker"))
        } else {
            Ok(())
        }
    }

    fn pool_ref(&self) -> &MySqlPool {
        &self.inner.pool
    }

    async fn ensure_queue(&self, queue: &str) -> Result<()> {
        if self
            .inner
            .known_queues
            .lock()
            .expect("queue set")
            .contains(queue)
        {
            return Ok(());
        }
        ensure_queue_on(self.pool_ref(), queue)
            .await
            .map_err(|e| map_err(KIND, "cannot declare mysql queue", e))?;
        self.inner
            .known_queues
            .lock()
            .expect("queue set")
            .insert(queue.to_owned());
        Ok(())
    }
}

/// Records `queue` in `celeriac_queues` unless it is there.
///
/// A plain read first: an `INSERT … ON DUPLICATE KEY UPDATE` of an existing row would lock it
/// until the transaction ends, and every transaction enqueueing to one queue would then wait
/// for the others (see [`crate::publish_in`]).
pub(crate) async fn ensure_queue_on<'e, E>(conn: E, queue: &str) -> sqlx::Result<()>
where
    E: sqlx::Executor<'e, Database = MySql> + Copy,
{
    let found = sqlx::query("SELECT 1 FROM celeriac_queues WHERE name = ?")
        .bind(queue)
        .fetch_optional(conn)
        .await?;
    if found.is_none() {
        sqlx::query("INSERT IGNORE INTO celeriac_queues (name) VALUES (?)")
            .bind(queue)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// A message ready to insert.
pub(crate) struct NewRow {
    priority: i64,
    not_before: Option<i64>,
    body: String,
}

pub(crate) fn new_row(queue: &str, message: &Message, options: &PublishOptions) -> Result<NewRow> {
    let priority = options
        .priority
        .or(message.properties.priority)
        .unwrap_or(0)
        .min(9);
    let body = envelope::encode(message, "", queue)?;
    let body = String::from_utf8(body)
        .map_err(|e| Error::protocol("envelope is not utf-8").with_source(e))?;
    Ok(NewRow {
        priority: i64::from(priority),
        not_before: options.not_before.map(|t| t.timestamp_millis()),
        body,
    })
}

/// One `INSERT` of `rows` into `queue`: a row whose not-before time is still to come is
/// delayed (state 1), the others ready (state 0), judged by the server's clock.
pub(crate) fn insert_query<'q>(
    queue: &'q str,
    rows: &'q [NewRow],
) -> Query<'q, MySql, MySqlArguments> {
    let mut sql = String::from(
        "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) VALUES ",
    );
    for i in 0..rows.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(concat!(
            "(?, ?, IF(COALESCE(?, 0) > ",
            now_ms!(),
            ", 1, 0), COALESCE(?, ",
            now_ms!(),
            "), ?)"
        ));
    }
    // The statement text is built per batch size; sqlx caches prepared statements by text.
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for r in rows {
        q = q
            .bind(queue)
            .bind(r.priority)
            .bind(r.not_before)
            .bind(r.not_before)
            .bind(r.body.as_str());
    }
    q
}

impl Broker for MysqlBroker {
    fn driver(&self) -> &'static str {
        "mysql"
    }

    fn capabilities(&self) -> Capabilities {
        // Python Celery has no transport of this layout (kombu's SQLAlchemy one differs).
        let mut c = Capabilities::all();
        c.celery_peers = false;
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.ensure_queue(queue).await
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
            let row = new_row(queue, message, &options)?;
            self.ensure_queue(queue).await?;
            let rows = [row];
            insert_query(queue, &rows)
                .execute(self.pool_ref())
                .await
                .map_err(|e| map_err(KIND, "cannot publish to mysql queue", e))?;
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
            let rows = messages
                .iter()
                .map(|(m, o)| new_row(queue, m, o))
                .collect::<Result<Vec<_>>>()?;
            if rows.is_empty() {
                return Ok(());
            }
            self.ensure_queue(queue).await?;
            let (pool, rows) = (self.pool_ref(), &rows);
            db::retry(KIND, "cannot publish to mysql queue", || async move {
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(256) {
                    insert_query(queue, chunk).execute(&mut *tx).await?;
                }
                tx.commit().await
            })
            .await?;
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
            if queues.is_empty() {
                return Err(Error::broker("consume needs at least one queue"));
            }
            for q in queues {
                self.ensure_queue(q).await?;
            }
            Ok(Box::new(MysqlConsumer {
                broker: self.clone(),
                queues: queues.to_vec(),
                prefetch: options.prefetch.max(1),
                lease_ms: millis(
                    options
                        .lease
                        .unwrap_or(self.inner.options.get_visibility_timeout()),
                ),
                slots: Arc::new(Slots::default()),
                buffer: VecDeque::new(),
                pending: None,
                rotate: 0,
                idle: FIRST_IDLE,
                next_due: None,
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let r = sqlx::query(concat!(
                "DELETE FROM celeriac_messages WHERE queue = ? AND (state <> 2 OR visible_at <= ",
                now_ms!(),
                ")"
            ))
            .bind(queue)
            .execute(self.pool_ref())
            .await
            .map_err(|e| map_err(KIND, "cannot purge mysql queue", e))?;
            Ok(r.rows_affected())
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let rows = sqlx::query(concat!(
                "SELECT state, CAST(visible_at <= ",
                now_ms!(),
                " AS SIGNED), COUNT(*) FROM celeriac_messages WHERE queue = ? GROUP BY 1, 2"
            ))
            .bind(queue)
            .fetch_all(self.pool_ref())
            .await
            .map_err(|e| map_err(KIND, "cannot count mysql queue", e))?;
            let (mut ready, mut delayed, mut unacked) = (0u64, 0u64, 0u64);
            for r in rows {
                let state: i8 = r
                    .try_get(0)
                    .map_err(|e| map_err(KIND, "cannot count mysql queue", e))?;
                let due: i64 = r
                    .try_get(1)
                    .map_err(|e| map_err(KIND, "cannot count mysql queue", e))?;
                let n: i64 = r
                    .try_get(2)
                    .map_err(|e| map_err(KIND, "cannot count mysql queue", e))?;
                let n = u64::try_from(n).unwrap_or(0);
                match (i64::from(state), due != 0) {
                    (READY, _) | (_, true) => ready += n,
                    (2, false) => unacked += n,
                    (_, false) => delayed += n,
                }
            }
            Ok(QueueStats::new(ready, delayed, unacked))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            sqlx::query_scalar("SELECT name FROM celeriac_queues ORDER BY name")
                .fetch_all(self.pool_ref())
                .await
                .map_err(|e| map_err(KIND, "cannot list mysql queues", e))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.close_notify.notify_waiters();
            Ok(())
        })
    }

    /// Remote control and events in the same database, between every process that uses it
    /// (see the crate docs).
    fn broadcast(&self) -> Option<&dyn celeriac_core::broadcast::Broadcast> {
        Some(self)
    }
}

// ===== consumer =====

/// One leased row, not yet handed out.
#[derive(Debug)]
struct LeasedRow {
    id: i64,
    /// The row's `deliveries` after this lease: the lease's identity (fencing token).
    token: i64,
    queue: String,
    body: String,
}

/// What one fetch found.
#[derive(Debug, Default)]
struct Fetched {
    rows: Vec<LeasedRow>,
    /// How long until a delayed or leased row of these queues becomes due, when none is yet.
    next_due: Option<Duration>,
}

/// The consumer's prefetch accounting, shared with its ackers.
#[derive(Debug, Default)]
struct Slots {
    /// Deliveries reserved by a fetch in flight, buffered, or handed out and not settled.
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
struct MysqlConsumer {
    broker: MysqlBroker,
    queues: Vec<String>,
    prefetch: usize,
    lease_ms: i64,
    slots: Arc<Slots>,
    buffer: VecDeque<LeasedRow>,
    /// A fetch in flight (a task of its own, so a cancelled `next` loses no row) and the
    /// slots it reserved.
    pending: Option<(JoinHandle<Result<Fetched>>, usize)>,
    rotate: usize,
    /// The next idle sleep.
    idle: Duration,
    next_due: Option<Duration>,
}

/// Gives leased rows back as never delivered (a consumer dropped or closed with rows it did
/// not hand out).
async fn release(pool: MySqlPool, rows: Vec<(i64, i64)>) {
    for (id, token) in rows {
        if let Err(e) = sqlx::query(
            "UPDATE celeriac_messages SET state = 0, deliveries = deliveries - 1 \
             WHERE id = ? AND deliveries = ?",
        )
        .bind(id)
        .bind(token)
        .execute(&pool)
        .await
        {
            tracing::warn!(row = id, error = %e, "cannot give back a mysql message; it returns when its lease runs out");
        }
    }
}

impl Drop for MysqlConsumer {
    fn drop(&mut self) {
        let rows: Vec<_> = self.buffer.drain(..).map(|r| (r.id, r.token)).collect();
        let pending = self.pending.take();
        if rows.is_empty() && pending.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.broker.inner.pool.clone();
        let published = self.broker.clone();
        rt.spawn(async move {
            let mut rows = rows;
            if let Some((handle, _)) = pending
                && let Ok(Ok(f)) = handle.await
            {
                rows.extend(f.rows.iter().map(|r| (r.id, r.token)));
            }
            release(pool, rows).await;
            published.inner.published.notify_waiters();
        });
    }
}

/// Claims up to `want` ready rows of `queues` (in that order) for `lease_ms`.
///
/// First one cheap read without locks (the probe): is any row ready, and when is the next
/// delayed or leased one due? An idle consumer's poll costs only that. Then, when there is
/// work, one transaction: make due rows ready (delayed ones whose time came, leases that ran
/// out), `SELECT … FOR UPDATE SKIP LOCKED` the best ready rows (rows another consumer is
/// claiming are skipped, not waited for), and mark them leased. MySQL has no `UPDATE …
/// RETURNING`, hence the select-then-update in one transaction; the row locks make it atomic.
async fn fetch(
    pool: MySqlPool,
    queues: Vec<String>,
    want: usize,
    lease_ms: i64,
) -> Result<Fetched> {
    const WHAT: &str = "cannot fetch from mysql queue";
    let mut probe = String::from("SELECT MIN(IF(k = 0, t, NULL)), MIN(IF(k = 1, t, NULL)), ");
    probe.push_str(now_ms!());
    probe.push_str(" FROM (");
    for i in 0..queues.len() {
        if i > 0 {
            probe.push_str(" UNION ALL ");
        }
        probe.push_str(
            "(SELECT 0 AS k, 0 AS t FROM celeriac_messages WHERE queue = ? AND state = 0 LIMIT 1) \
             UNION ALL (SELECT 1, MIN(visible_at) FROM celeriac_messages WHERE queue = ? AND state = 1) \
             UNION ALL (SELECT 1, MIN(visible_at) FROM celeriac_messages WHERE queue = ? AND state = 2)",
        );
    }
    probe.push_str(") AS x");
    let mut q = sqlx::query(AssertSqlSafe(probe));
    for queue in &queues {
        q = q.bind(queue).bind(queue).bind(queue);
    }
    let row = q
        .fetch_one(&pool)
        .await
        .map_err(|e| map_err(KIND, WHAT, e))?;
    let ready: Option<i64> = row.try_get(0).map_err(|e| map_err(KIND, WHAT, e))?;
    let due: Option<i64> = row.try_get(1).map_err(|e| map_err(KIND, WHAT, e))?;
    let now: i64 = row.try_get(2).map_err(|e| map_err(KIND, WHAT, e))?;
    let promote = due.is_some_and(|d| d <= now);
    if ready.is_none() && !promote {
        return Ok(Fetched {
            rows: Vec::new(),
            next_due: due.map(|d| Duration::from_millis(u64::try_from(d - now).unwrap_or(0))),
        });
    }
    const PROMOTE_SQL: &str = concat!(
        "UPDATE celeriac_messages SET state = 0 \
         WHERE queue = ? AND state IN (1, 2) AND visible_at <= ",
        now_ms!()
    );
    let (pool, queues) = (&pool, &queues);
    let rows = db::retry(KIND, WHAT, || async move {
        let mut tx = pool.begin().await?;
        let mut found: Vec<LeasedRow> = Vec::new();
        for queue in queues {
            if found.len() >= want {
                break;
            }
            if promote {
                sqlx::query(PROMOTE_SQL)
                    .bind(queue)
                    .execute(&mut *tx)
                    .await?;
            }
            let rows = sqlx::query(
                "SELECT id, deliveries, body FROM celeriac_messages \
                 WHERE queue = ? AND state = 0 ORDER BY priority DESC, id LIMIT ? \
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(queue)
            .bind(i64::try_from(want - found.len()).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                let deliveries: i32 = r.try_get(1)?;
                found.push(LeasedRow {
                    id: r.try_get(0)?,
                    token: i64::from(deliveries) + 1,
                    queue: queue.clone(),
                    body: r.try_get(2)?,
                });
            }
        }
        if !found.is_empty() {
            let mut sql = String::from(concat!(
                "UPDATE celeriac_messages SET state = 2, visible_at = ",
                now_ms!(),
                " + ?, deliveries = deliveries + 1 WHERE id IN ("
            ));
            for i in 0..found.len() {
                sql.push_str(if i == 0 { "?" } else { ", ?" });
            }
            sql.push(')');
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(lease_ms);
            for r in &found {
                q = q.bind(r.id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(found)
    })
    .await?;
    Ok(Fetched {
        rows,
        next_due: None,
    })
}

impl MysqlConsumer {
    fn closed(&self) -> bool {
        self.broker.inner.closed.load(Ordering::Acquire)
    }

    fn deliver(&self, row: LeasedRow) -> Delivery {
        let message = envelope::decode(row.body.as_bytes());
        if let Err(e) = &message {
            tracing::warn!(queue = %row.queue, row = row.id, error = %format_args!("{e:#}"), "undecodable message in mysql queue");
        }
        let acker = MysqlAcker {
            broker: self.broker.clone(),
            id: row.id,
            token: row.token,
            slots: self.slots.clone(),
            settled: AtomicBool::new(false),
        };
        let redeliveries = u32::try_from(row.token - 1).unwrap_or(u32::MAX);
        Delivery::new(message, row.queue, redeliveries, Box::new(acker))
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
            self.broker.inner.pool.clone(),
            queues,
            free,
            self.lease_ms,
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
        let (_, reserved) = self.pending.take().expect("a fetch in flight");
        let r = r.map_err(|e| {
            self.slots.free(reserved);
            Error::new(KIND, "a mysql fetch task failed").with_source(e)
        })?;
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
        let slots = self.slots.clone();
        let broker = self.broker.clone();
        loop {
            if self.closed() {
                let rows: Vec<_> = self.buffer.drain(..).map(|r| (r.id, r.token)).collect();
                if let Some((handle, reserved)) = self.pending.take() {
                    // Let it finish, then give its rows back with the buffer's.
                    let pool = broker.inner.pool.clone();
                    self.slots.free(reserved);
                    tokio::spawn(async move {
                        let mut rows = rows;
                        if let Ok(Ok(f)) = handle.await {
                            rows.extend(f.rows.iter().map(|r| (r.id, r.token)));
                        }
                        release(pool, rows).await;
                    });
                } else if !rows.is_empty() {
                    tokio::spawn(release(broker.inner.pool.clone(), rows));
                }
                return Ok(None);
            }
            if let Some(row) = self.buffer.pop_front() {
                return Ok(Some(self.deliver(row)));
            }
            // Listen before looking, so a publish between the two is not missed.
            let published = broker.inner.published.notified();
            let freed = slots.freed.notified();
            let closed = broker.inner.close_notify.notified();
            tokio::pin!(published, freed, closed);
            published.as_mut().enable();
            freed.as_mut().enable();
            closed.as_mut().enable();
            if self.closed() {
                continue;
            }
            if self.pending.is_none() && !self.start_fetch() {
                tokio::select! {
                    () = freed => {}
                    () = closed => {}
                }
                continue;
            }
            match self.finish_fetch().await {
                Ok(0) => {}
                Ok(_) => {
                    self.idle = FIRST_IDLE;
                    continue;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %format_args!("{e:#}"), "mysql fetch failed; retrying");
                }
                Err(e) => return Err(e),
            }
            // Nothing ready: poll again after a sleep that doubles while idle, up to the
            // poll interval, and never past the next due time.
            let mut wait = self.idle;
            if let Some(due) = self.next_due {
                wait = wait.min(due + Duration::from_millis(1));
            }
            self.idle = (self.idle * 2).min(self.broker.inner.options.get_poll_interval());
            tokio::select! {
                () = published => { self.idle = FIRST_IDLE; }
                () = closed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Consumer for MysqlConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(self.next_delivery())
    }
}

// ===== acker =====

/// An ack waiting for the batcher: the row, its lease's token, and who waits for the outcome.
type PendingAck = (
    i64,
    i64,
    oneshot::Sender<std::result::Result<(), (String, bool)>>,
);

/// The most acks one `DELETE` settles.
const ACK_BATCH: usize = 256;

/// Group commit for acks: takes every ack queued at that moment (up to [`ACK_BATCH`]) and
/// deletes their rows in one statement, `WHERE (id = ? AND deliveries = ?) OR …`, a primary
/// key lookup per pair that keeps each ack's fence. On the server every commit is a log
/// flush, so a worker finishing many tasks at once pays one per batch instead of one per
/// task; an ack alone waits no longer than before. Ends when the broker's last handle drops.
async fn ack_batcher(pool: MySqlPool, mut queued: mpsc::UnboundedReceiver<PendingAck>) {
    let mut batch: Vec<PendingAck> = Vec::with_capacity(ACK_BATCH);
    while queued.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let mut sql = String::from("DELETE FROM celeriac_messages WHERE ");
        for i in 0..batch.len() {
            sql.push_str(if i == 0 {
                "(id = ? AND deliveries = ?)"
            } else {
                " OR (id = ? AND deliveries = ?)"
            });
        }
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, token, _) in &batch {
            q = q.bind(id).bind(token);
        }
        let r = q.execute(&pool).await;
        let outcome = r.map(drop).map_err(|e| {
            let e = map_err(KIND, "cannot ack mysql message", e);
            (format!("{e:#}"), e.is_transient())
        });
        for (_, _, reply) in batch.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }
}

#[derive(Debug)]
struct MysqlAcker {
    broker: MysqlBroker,
    id: i64,
    token: i64,
    slots: Arc<Slots>,
    settled: AtomicBool,
}

impl MysqlAcker {
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.slots.free(1);
        }
    }

    /// Runs `sql` with (id, token) and then `extra`; returns the rows it matched.
    async fn run(&self, sql: &'static str, extra: Option<i64>, what: &str) -> Result<u64> {
        let mut q = sqlx::query(sql);
        if let Some(v) = extra {
            q = q.bind(v);
        }
        let r = q
            .bind(self.id)
            .bind(self.token)
            .execute(&self.broker.inner.pool)
            .await
            .map_err(|e| map_err(KIND, what, e))?;
        Ok(r.rows_affected())
    }
}

impl Drop for MysqlAcker {
    fn drop(&mut self) {
        // A delivery dropped unsettled stays leased until its lease runs out, but no longer
        // counts against the consumer's prefetch.
        self.settle();
    }
}

impl Acker for MysqlAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            // The fence: a lease that ran out and was taken by another consumer has a new
            // `deliveries`, so this late ack deletes nothing.
            let (reply, outcome) = oneshot::channel();
            self.broker
                .inner
                .acks
                .send((self.id, self.token, reply))
                .map_err(|_| Error::new(KIND, "the mysql ack batcher has stopped"))?;
            match outcome.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err((message, transient))) => {
                    let e = Error::new(KIND, message);
                    Err(if transient { e.transient() } else { e })
                }
                Err(_) => Err(Error::new(KIND, "the mysql ack batcher has stopped")),
            }
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            const WHAT: &str = "cannot reject mysql message";
            match requeue {
                Requeue::Drop => {
                    self.run(
                        "DELETE FROM celeriac_messages WHERE id = ? AND deliveries = ?",
                        None,
                        WHAT,
                    )
                    .await?;
                }
                Requeue::Now => {
                    self.run(
                        "UPDATE celeriac_messages SET state = 0 WHERE id = ? AND deliveries = ?",
                        None,
                        WHAT,
                    )
                    .await?;
                    self.broker.inner.published.notify_waiters();
                }
                Requeue::After(d) => {
                    self.run(
                        concat!(
                            "UPDATE celeriac_messages SET state = 1, visible_at = ",
                            now_ms!(),
                            " + ? WHERE id = ? AND deliveries = ?"
                        ),
                        Some(millis(d)),
                        WHAT,
                    )
                    .await?;
                    self.broker.inner.published.notify_waiters();
                }
            }
            Ok(())
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let n = self
                .run(
                    concat!(
                        "UPDATE celeriac_messages SET state = 2, visible_at = ",
                        now_ms!(),
                        " + ? WHERE id = ? AND deliveries = ?"
                    ),
                    Some(millis(by)),
                    "cannot extend mysql lease",
                )
                .await?;
            if n == 0 {
                return Err(Error::broker(
                    "lease lost: the message was settled or handed to another consumer",
                ));
            }
            Ok(())
        })
    }
}
