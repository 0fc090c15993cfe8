//! [`SqliteBroker`]: queues as rows of one table, leased to consumers.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use celeriac_core::protocol::envelope;
use celeriac_core::{
    Acker, BoxFuture, Broker, Capabilities, Config, ConsumeOptions, Consumer, Delivery, Error,
    ErrorKind, Message, PublishOptions, QueueStats, Requeue, Result, StoredState, TaskState,
};
use rusqlite::OptionalExtension;
use rusqlite::types::ValueRef;
use tokio::sync::Notify;

use crate::conn::{Conn, Db, Reply, Shared, now_ms};
use crate::options::{Location, SqliteOptions};
use crate::schema::{DELAYED, LEASED, READY};

const KIND: ErrorKind = ErrorKind::Broker;

/// Longest sleep of an idle consumer between checks, whatever the next due time says.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// A broker in a SQLite file (`sqlite://path.db`). Clones share one connection.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{Broker, ConsumeOptions};
/// use celeriac_sqlite::{SqliteBroker, SqliteOptions};
///
/// let broker = SqliteBroker::open("celeriac.db", SqliteOptions::default()).await?;
/// broker.declare("celery").await?;
/// let mut consumer = broker
///     .consume(&["celery".to_owned()], ConsumeOptions::new(8))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteBroker {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) conn: Arc<Conn>,
    lease: Duration,
    pub(crate) closed: AtomicBool,
    pub(crate) close_notify: Notify,
    /// When a broadcast send next deletes expired broadcast rows (Unix ms).
    pub(crate) next_sweep: AtomicI64,
}

impl SqliteBroker {
    /// Opens the broker in the file at `path` (created if missing; `:memory:` for a private
    /// in-memory database).
    ///
    /// Fails with [`ErrorKind::Broker`] when the directory is missing, the file is not a
    /// SQLite database, or the database stays locked beyond the `busy_timeout` (transient).
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let location = Location::from_path(path.as_ref());
        Self::open_at(&location, &options).await
    }

    /// Opens the broker for a `sqlite://` URL with the settings of `config`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let location = Location::from_url(url)?;
        Self::open_at(&location, &SqliteOptions::from_config(config)).await
    }

    async fn open_at(location: &Location, options: &SqliteOptions) -> Result<Self> {
        let conn = Conn::open(location, options, KIND).await?;
        Ok(SqliteBroker {
            inner: Arc::new(Inner {
                conn,
                lease: options.get_visibility_timeout(),
                closed: AtomicBool::new(false),
                close_notify: Notify::new(),
                next_sweep: AtomicI64::new(0),
            }),
        })
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("sqlite broker"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn conn(&self) -> &Conn {
        &self.inner.conn
    }
}

/// A message ready to insert.
struct Row {
    priority: i64,
    state: i64,
    visible_at: i64,
    body: String,
}

fn row(queue: &str, message: &Message, options: &PublishOptions, now: i64) -> Result<Row> {
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
    Ok(Row {
        priority: i64::from(priority),
        state,
        visible_at,
        body,
    })
}

fn ensure_queue(db: &mut Db, queue: &str) -> rusqlite::Result<()> {
    if !db.known_queues.contains(queue) {
        db.conn
            .prepare_cached("INSERT OR IGNORE INTO celeriac_queues (name) VALUES (?1)")?
            .execute([queue])?;
        db.known_queues.insert(queue.to_owned());
    }
    Ok(())
}

fn insert(db: &mut Db, queue: &str, rows: &[Row]) -> rusqlite::Result<()> {
    ensure_queue(db, queue)?;
    let mut stmt = db.conn.prepare_cached(
        "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for r in rows {
        stmt.execute((queue, r.priority, r.state, r.visible_at, &r.body))?;
    }
    drop(stmt);
    // Delayed rows too: an idle consumer must learn the new, earlier due time.
    db.messages_changed();
    Ok(())
}

impl Broker for SqliteBroker {
    fn driver(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        // Python Celery has no SQLite transport of this layout.
        let mut c = Capabilities::all();
        c.celery_peers = false;
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = queue.to_owned();
            self.conn()
                .call(KIND, true, "cannot declare sqlite queue", move |db| {
                    ensure_queue(db, &queue)
                })
                .await
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
            let r = row(queue, message, &options, now_ms())?;
            let queue = queue.to_owned();
            self.conn()
                .call(KIND, true, "cannot publish to sqlite queue", move |db| {
                    insert(db, &queue, std::slice::from_ref(&r))
                })
                .await
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
                .map(|(m, o)| row(queue, m, o, now))
                .collect::<Result<Vec<_>>>()?;
            let queue = queue.to_owned();
            self.conn()
                .call(KIND, true, "cannot publish to sqlite queue", move |db| {
                    db.all_or_nothing("publish_batch", |db| insert(db, &queue, &rows))
                })
                .await
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
            let names = queues.to_vec();
            self.conn()
                .call(KIND, true, "cannot declare sqlite queue", move |db| {
                    names.iter().try_for_each(|q| ensure_queue(db, q))
                })
                .await?;
            let shared = self.inner.conn.shared.clone();
            let probe = options
                .result_probe
                .is_some_and(|p| self.inner.conn.identity.as_deref() == Some(p.store.as_str()));
            Ok(Box::new(SqliteConsumer {
                probe,
                broker: self.clone(),
                queues: queues.to_vec(),
                prefetch: options.prefetch.max(1),
                lease: options.lease.unwrap_or(self.inner.lease),
                slots: Arc::new(Slots::default()),
                buffer: Leased::new(shared),
                pending: None,
                reserved: 0,
                next_due: None,
                rotate: 0,
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = queue.to_owned();
            let n = self
                .conn()
                .call(KIND, true, "cannot purge sqlite queue", move |db| {
                    db.conn
                        .prepare_cached(
                            "DELETE FROM celeriac_messages \
                             WHERE queue = ?1 AND (state <> 2 OR visible_at <= ?2)",
                        )?
                        .execute((&queue, now_ms()))
                })
                .await?;
            Ok(n as u64)
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = queue.to_owned();
            self.conn()
                .call(KIND, false, "cannot count sqlite queue", move |db| {
                    let now = now_ms();
                    let ready: i64 = db
                        .conn
                        .prepare_cached(
                            "SELECT COUNT(*) FROM celeriac_messages WHERE queue = ?1 AND state = 0",
                        )?
                        .query_row([&queue], |r| r.get(0))?;
                    let mut ready = u64::try_from(ready).unwrap_or(0);
                    let (mut delayed, mut unacked) = (0u64, 0u64);
                    let mut stmt = db.conn.prepare_cached(
                        "SELECT state, visible_at <= ?2, COUNT(*) FROM celeriac_messages \
                         WHERE queue = ?1 AND state <> 0 GROUP BY 1, 2",
                    )?;
                    let mut rows = stmt.query((&queue, now))?;
                    while let Some(r) = rows.next()? {
                        let (state, due, n): (i64, bool, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                        let n = u64::try_from(n).unwrap_or(0);
                        match (due, state) {
                            (true, _) => ready += n,
                            (false, LEASED) => unacked += n,
                            (false, _) => delayed += n,
                        }
                    }
                    Ok(QueueStats::new(ready, delayed, unacked))
                })
                .await
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            self.conn()
                .call(KIND, false, "cannot list sqlite queues", |db| {
                    let mut stmt = db
                        .conn
                        .prepare_cached("SELECT name FROM celeriac_queues ORDER BY name")?;
                    let names = stmt.query_map([], |r| r.get(0))?;
                    names.collect()
                })
                .await
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.close_notify.notify_waiters();
            Ok(())
        })
    }

    /// Remote control and events in the same file, between every process that opens it (see
    /// the crate docs).
    fn broadcast(&self) -> Option<&dyn celeriac_core::broadcast::Broadcast> {
        Some(self)
    }
}

// ===== consumer =====

/// One leased row, not yet handed out.
#[derive(Debug)]
struct LeasedRow {
    id: i64,
    /// The row's `deliveries` after this lease: the lease's identity.
    token: i64,
    queue: String,
    /// The envelope's text, or why the row has none (see [`row_body`]).
    body: Result<String>,
    /// The task's state, read with the fetch when the consumer probes.
    stored: Option<StoredState>,
}

/// Leased rows on their way to a consumer. Rows still here when it drops are given back.
#[derive(Debug)]
struct Leased {
    rows: VecDeque<LeasedRow>,
    shared: Arc<Shared>,
}

impl Leased {
    fn new(shared: Arc<Shared>) -> Self {
        Leased {
            rows: VecDeque::new(),
            shared,
        }
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if !self.rows.is_empty() {
            self.shared
                .release(self.rows.drain(..).map(|r| (r.id, r.token)));
        }
    }
}

/// What one fetch found.
#[derive(Debug)]
struct Fetched {
    rows: Leased,
    /// The earliest time a delayed or leased row of these queues becomes ready (ms).
    next_due: Option<i64>,
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
struct SqliteConsumer {
    /// Whether fetches read each task's state (the worker's backend is in this file).
    probe: bool,
    broker: SqliteBroker,
    queues: Vec<String>,
    prefetch: usize,
    lease: Duration,
    slots: Arc<Slots>,
    buffer: Leased,
    /// A fetch in flight; kept across cancellation so its rows are not lost.
    pending: Option<Reply<Fetched>>,
    reserved: usize,
    next_due: Option<i64>,
    rotate: usize,
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        if !self.buffer.rows.is_empty() {
            let shared = &self.broker.inner.conn.shared;
            shared.release(self.buffer.rows.drain(..).map(|r| (r.id, r.token)));
            self.broker.conn().wake();
        }
    }
}

/// Makes due rows of queue `?1` ready: delayed ones whose time came, leases that ran out.
const PROMOTE_SQL: &str = "UPDATE celeriac_messages SET state = 0 \
     WHERE queue = ?1 AND state <> 0 AND visible_at <= ?2";

/// Leases up to `?2` ready rows of queue `?1` until `?3`, highest priority then oldest first.
const LEASE_SQL: &str = "UPDATE celeriac_messages \
     SET state = 2, visible_at = ?3, deliveries = deliveries + 1 \
     WHERE id IN (SELECT id FROM celeriac_messages WHERE queue = ?1 AND state = 0 \
                  ORDER BY priority DESC, id LIMIT ?2) \
     RETURNING id, deliveries, priority, body";

/// When the next delayed or leased row of queue `?1` becomes due.
const NEXT_DUE_SQL: &str =
    "SELECT MIN(visible_at) FROM celeriac_messages WHERE queue = ?1 AND state <> 0";

fn fetch(
    db: &Db,
    queues: &[String],
    want: usize,
    lease_ms: i64,
    shared: Arc<Shared>,
    probe: bool,
) -> rusqlite::Result<Fetched> {
    let now = now_ms();
    let mut rows = Leased::new(shared);
    for queue in queues {
        let left = want - rows.rows.len();
        if left == 0 {
            break;
        }
        db.conn.prepare_cached(PROMOTE_SQL)?.execute((queue, now))?;
        let mut stmt = db.conn.prepare_cached(LEASE_SQL)?;
        let mut got = stmt
            .query_map((queue, left as i64, now + lease_ms), |r| {
                Ok((
                    r.get::<_, i64>(2)?,
                    LeasedRow {
                        id: r.get(0)?,
                        token: r.get(1)?,
                        queue: queue.clone(),
                        body: row_body(r.get(0)?, r.get_ref(3)?),
                        stored: None,
                    },
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // RETURNING does not keep the subquery's order.
        got.sort_by_key(|(priority, r)| (std::cmp::Reverse(*priority), r.id));
        rows.rows.extend(got.into_iter().map(|(_, r)| r));
    }
    if probe {
        read_states(db, &mut rows.rows, now)?;
    }
    let next_due = if rows.rows.len() < want {
        let mut stmt = db.conn.prepare_cached(NEXT_DUE_SQL)?;
        let mut min: Option<i64> = None;
        for queue in queues {
            let due: Option<i64> = stmt.query_row([queue], |r| r.get(0)).optional()?.flatten();
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

/// The text of the body of leased row `id`, whatever SQLite stored it as.
///
/// Rows are written as TEXT, but another tool may have written one as a BLOB or with bytes
/// that are not UTF-8. Reading such a row as a `String` failed the whole fetch after its
/// `UPDATE … RETURNING` had leased every row of the batch, so the rows fetched with it stayed
/// leased until their lease ran out, and then failed again. So a body is read as bytes: the
/// bytes of a TEXT or a BLOB that are UTF-8 are the envelope's text (a BLOB holding a valid
/// envelope runs like any message); other bytes become an error, which the consumer hands
/// over as that one row's undecodable delivery.
fn row_body(id: i64, body: ValueRef<'_>) -> Result<String> {
    let (bytes, class) = match body {
        ValueRef::Text(b) => (b, "text"),
        ValueRef::Blob(b) => (b, "blob"),
        // The column is NOT NULL with TEXT affinity: numbers are stored as text.
        other => {
            return Err(Error::protocol(format!(
                "sqlite row {id} has a body of type {}, not text",
                other.data_type()
            )));
        }
    };
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|e| {
        Error::protocol(format!(
            "the body of sqlite row {id} ({class}, {} bytes) is not utf-8 text",
            bytes.len()
        ))
        .with_source(e)
    })
}

/// The stored state of each row's task, in the fetch's transaction: what the worker would
/// read before running it, without a call of its own. The task id is taken from the
/// envelope's `correlation_id` by search ([`correlation_id`]); the worker uses the state only
/// when that is the id it decodes, so a message the search misreads costs a useless lookup,
/// never a wrong answer.
fn read_states(db: &Db, rows: &mut VecDeque<LeasedRow>, now: i64) -> rusqlite::Result<()> {
    let read_at = std::time::Instant::now();
    let mut stmt = db.conn.prepare_cached(
        "SELECT status FROM celeriac_results WHERE task_id = ?1 \
         AND (expires_at IS NULL OR expires_at > ?2)",
    )?;
    for row in rows {
        let Some(id) = row.body.as_deref().ok().and_then(correlation_id) else {
            continue;
        };
        let status: Option<String> = stmt.query_row((id, now), |r| r.get(0)).optional()?;
        row.stored = Some(StoredState {
            task_id: id.to_owned(),
            state: status.map(|s| s.parse::<TaskState>().unwrap_or_else(|e| match e {})),
            read_at,
        });
    }
    Ok(())
}

/// The `correlation_id` of a kombu envelope (Celery sets it to the task id), found by search
/// rather than by decoding: the key must occur once, followed by `:` and a string without
/// escapes; `None` otherwise.
fn correlation_id(body: &str) -> Option<&str> {
    const KEY: &str = "\"correlation_id\"";
    let at = body.find(KEY)?;
    let rest = &body[at + KEY.len()..];
    if rest.contains(KEY) {
        return None;
    }
    let value = rest.trim_start().strip_prefix(':')?.trim_start();
    let value = value.strip_prefix('"')?;
    let id = &value[..value.find('"')?];
    (!id.is_empty() && !id.contains('\\')).then_some(id)
}

impl SqliteConsumer {
    fn closed(&self) -> bool {
        self.broker.inner.closed.load(Ordering::Acquire)
    }

    fn deliver(&self, row: LeasedRow) -> Delivery {
        let message = row.body.and_then(|b| envelope::decode(b.as_bytes()));
        if let Err(e) = &message {
            tracing::warn!(queue = %row.queue, row = row.id, error = %format_args!("{e:#}"), "undecodable message in sqlite queue");
        }
        let acker = SqliteAcker {
            conn: self.broker.inner.conn.clone(),
            id: row.id,
            token: row.token,
            slots: self.slots.clone(),
            settled: AtomicBool::new(false),
        };
        let redeliveries = u32::try_from(row.token - 1).unwrap_or(u32::MAX);
        Delivery::new(message, row.queue, redeliveries, Box::new(acker)).with_stored(row.stored)
    }

    /// Sends a fetch for every free prefetch slot; false when there is none.
    fn start_fetch(&mut self) -> Result<bool> {
        let held = self.slots.outstanding.load(Ordering::Acquire);
        let free = self.prefetch.saturating_sub(held);
        if free == 0 {
            return Ok(false);
        }
        let n = self.queues.len();
        self.rotate = (self.rotate + 1) % n;
        let queues: Vec<String> = (0..n)
            .map(|i| self.queues[(self.rotate + i) % n].clone())
            .collect();
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX / 4);
        let shared = self.broker.inner.conn.shared.clone();
        let probe = self.probe;
        let rx = self
            .broker
            .conn()
            .submit(true, move |db| {
                fetch(db, &queues, free, lease_ms, shared, probe)
            })
            .ok_or_else(|| Error::new(KIND, "the sqlite connection thread has stopped"))?;
        self.slots.outstanding.fetch_add(free, Ordering::AcqRel);
        self.reserved = free;
        self.pending = Some(rx);
        Ok(true)
    }

    /// Awaits the fetch in flight (cancel-safe) and buffers what it found; returns how many.
    async fn finish_fetch(&mut self) -> Result<usize> {
        let Some(rx) = self.pending.as_mut() else {
            return Ok(0);
        };
        let r = Conn::wait(rx, KIND, "cannot fetch from sqlite queue").await;
        self.pending = None;
        let reserved = std::mem::take(&mut self.reserved);
        match r {
            Ok(mut fetched) => {
                let got = fetched.rows.rows.len();
                self.slots.free(reserved - got);
                self.buffer.rows.extend(fetched.rows.rows.drain(..));
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
        let shared = self.broker.inner.conn.shared.clone();
        let slots = self.slots.clone();
        let broker = self.broker.clone();
        loop {
            if self.closed() {
                // Give back what was prefetched but never handed out.
                let rows: Vec<_> = self
                    .buffer
                    .rows
                    .drain(..)
                    .map(|r| (r.id, r.token))
                    .collect();
                if !rows.is_empty() {
                    shared.release(rows);
                    self.broker.conn().wake();
                }
                return Ok(None);
            }
            if let Some(row) = self.buffer.rows.pop_front() {
                return Ok(Some(self.deliver(row)));
            }
            // Listen before looking, so a publish between the two is not missed.
            let published = shared.messages.notified();
            let freed = slots.freed.notified();
            let closed = broker.inner.close_notify.notified();
            tokio::pin!(published, freed, closed);
            published.as_mut().enable();
            freed.as_mut().enable();
            closed.as_mut().enable();
            if self.closed() {
                continue;
            }
            if self.pending.is_none() && !self.start_fetch()? {
                tokio::select! {
                    () = freed => {}
                    () = closed => {}
                }
                continue;
            }
            if self.finish_fetch().await? > 0 {
                continue;
            }
            let _watch = self.broker.conn().watch();
            let now = now_ms();
            let wait = self
                .next_due
                .map_or(IDLE_RECHECK, |due| {
                    Duration::from_millis(u64::try_from(due - now).unwrap_or(0))
                })
                .min(IDLE_RECHECK);
            tokio::select! {
                () = published => {}
                () = closed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Consumer for SqliteConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(self.next_delivery())
    }
}

// ===== acker =====

#[derive(Debug)]
struct SqliteAcker {
    conn: Arc<Conn>,
    id: i64,
    token: i64,
    slots: Arc<Slots>,
    settled: AtomicBool,
}

impl SqliteAcker {
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.slots.free(1);
        }
    }
}

impl Drop for SqliteAcker {
    fn drop(&mut self) {
        // A delivery dropped unsettled stays leased until its lease runs out, but no longer
        // counts against the consumer's prefetch.
        self.settle();
    }
}

impl Acker for SqliteAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            let (id, token) = (self.id, self.token);
            self.conn
                .call(KIND, true, "cannot ack sqlite message", move |db| {
                    db.conn
                        .prepare_cached(
                            "DELETE FROM celeriac_messages WHERE id = ?1 AND deliveries = ?2",
                        )?
                        .execute((id, token))
                })
                .await?;
            Ok(())
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle();
            let (id, token) = (self.id, self.token);
            self.conn
                .call(KIND, true, "cannot reject sqlite message", move |db| {
                    match requeue {
                        Requeue::Drop => db
                            .conn
                            .prepare_cached(
                                "DELETE FROM celeriac_messages WHERE id = ?1 AND deliveries = ?2",
                            )?
                            .execute((id, token))?,
                        Requeue::Now => {
                            db.messages_changed();
                            db.conn
                                .prepare_cached(
                                    "UPDATE celeriac_messages SET state = 0 \
                                     WHERE id = ?1 AND deliveries = ?2",
                                )?
                                .execute((id, token))?
                        }
                        Requeue::After(d) => {
                            db.messages_changed();
                            let at = now_ms().saturating_add(
                                i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4),
                            );
                            db.conn
                                .prepare_cached(
                                    "UPDATE celeriac_messages SET state = 1, visible_at = ?3 \
                                     WHERE id = ?1 AND deliveries = ?2",
                                )?
                                .execute((id, token, at))?
                        }
                    };
                    Ok(())
                })
                .await
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let (id, token) = (self.id, self.token);
            let until =
                now_ms().saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 4));
            let n = self
                .conn
                .call(KIND, true, "cannot extend sqlite lease", move |db| {
                    db.conn
                        .prepare_cached(
                            "UPDATE celeriac_messages SET state = 2, visible_at = ?3 \
                             WHERE id = ?1 AND deliveries = ?2",
                        )?
                        .execute((id, token, until))
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fetching must cost O(log n) however long the queue: every statement seeks an index and
    /// none sorts.
    #[test]
    fn fetch_statements_use_the_partial_indexes() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::schema::migrate(&conn).unwrap();
        for (sql, index) in [
            (PROMOTE_SQL, "celeriac_messages_waiting"),
            (LEASE_SQL, "celeriac_messages_ready"),
            (NEXT_DUE_SQL, "celeriac_messages_waiting"),
        ] {
            let p = crate::schema::query_plan(&conn, sql);
            assert!(p.contains(index), "{sql}\n{p}");
            assert!(!p.contains("TEMP B-TREE"), "{sql}\n{p}");
            assert!(!p.contains("SCAN celeriac_messages"), "{sql}\n{p}");
        }
    }

    /// The search finds what our encoder writes, and gives up rather than guess.
    #[test]
    fn correlation_id_is_found_by_search_or_not_at_all() {
        let m = celeriac_test_message();
        let body = String::from_utf8(envelope::encode(&m, "", "q").unwrap()).unwrap();
        assert_eq!(correlation_id(&body), Some(m.id()));
        for (text, want) in [
            (r#"{"properties": {"correlation_id": "abc"}}"#, Some("abc")),
            (r#"{"correlation_id":"abc"}"#, Some("abc")),
            // Twice: which one is the property cannot be told without decoding.
            (
                r#"{"headers": {"correlation_id": "x"}, "properties": {"correlation_id": "y"}}"#,
                None,
            ),
            (r#"{"correlation_id": 5}"#, None),
            (r#"{"correlation_id": ""}"#, None),
            (r#"{"correlation_id": "a\"b"}"#, None),
            ("{}", None),
        ] {
            assert_eq!(correlation_id(text), want, "{text}");
        }
    }

    fn celeriac_test_message() -> Message {
        let headers = celeriac_core::Headers::new("tests.add", celeriac_core::protocol::new_id());
        let body = celeriac_core::Body::new(vec![], serde_json::Map::new());
        Message::new(headers, &body, celeriac_core::ContentType::Json).unwrap()
    }
}
