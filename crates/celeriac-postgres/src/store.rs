//! The connection side shared by the broker, the backend and the beat store: the pool, the
//! schema, the LISTEN connection and what it wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{Error, ErrorKind, Result};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{Notify, OnceCell, mpsc, oneshot, watch};

use crate::options::{PgOptions, db_error};
use crate::schema;

/// Milliseconds since the Unix epoch, by this process's clock.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Milliseconds of a duration, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// One pool, its schema, and the notifications it listens to.
#[derive(Debug)]
pub(crate) struct Store {
    /// Publishing, result stores and reads: commits wait for the WAL flush.
    pub(crate) pool: PgPool,
    /// Fetches and settling (`synchronous_commit = off`; see the crate docs, **Durability**).
    pub(crate) fast: PgPool,
    acks: OnceCell<mpsc::UnboundedSender<AckCmd>>,
    publishes: OnceCell<mpsc::UnboundedSender<PubCmd>>,
    pub(crate) options: PgOptions,
    /// `"schema".` to put before table names.
    pub(crate) s: String,
    pub(crate) kind: ErrorKind,
    pub(crate) closed: AtomicBool,
    pub(crate) close_notify: Notify,
    pub(crate) hub: Hub,
    listener: OnceCell<ListenerTask>,
}

/// The notification channels of one schema (channels are database-wide).
pub(crate) fn channel(schema: &str, what: &str) -> String {
    format!("celeriac.{schema}.{what}")
}

impl Store {
    /// Connects, checks the credentials and the database at once, and creates the schema if
    /// missing.
    pub(crate) async fn open(options: PgOptions, kind: ErrorKind, what: &str) -> Result<Arc<Self>> {
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size())
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.connect_options().clone());
        // A connection of its own for the first contact: the pool would retry a refused
        // connection until its acquire timeout, and a wrong password must fail at once.
        let fast = PgPoolOptions::new()
            .max_connections(options.pool_size())
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(
                options
                    .connect_options()
                    .clone()
                    .options([("synchronous_commit", "off")]),
            );
        let mut conn = PgConnection::connect_with(options.connect_options())
            .await
            .map_err(|e| {
                db_error(
                    kind,
                    &format!(
                        "cannot connect the postgres {what} to {}",
                        options.redacted_url()
                    ),
                    e,
                )
            })?;
        schema::create(&mut conn, options.schema())
            .await
            .map_err(|e| {
                db_error(
                    kind,
                    &format!(
                        "cannot create the celeriac tables in schema {:?} of {}",
                        options.schema(),
                        options.redacted_url()
                    ),
                    e,
                )
            })?;
        let _ = conn.close().await;
        let s = format!("\"{}\".", options.schema());
        let hub = Hub::new(options.schema());
        Ok(Arc::new(Store {
            pool,
            fast,
            acks: OnceCell::new(),
            publishes: OnceCell::new(),
            options,
            s,
            kind,
            closed: AtomicBool::new(false),
            close_notify: Notify::new(),
            hub,
            listener: OnceCell::new(),
        }))
    }

    pub(crate) fn check_open(&self, what: &str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed(what))
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A database error of this store's kind.
    pub(crate) fn err(&self, what: &str, e: sqlx::Error) -> Error {
        db_error(self.kind, what, e)
    }

    /// Starts the LISTEN connection if it is not running; returns once it listens, so a
    /// notification sent after this returns is seen.
    pub(crate) async fn listen(&self) -> Result<()> {
        self.listener
            .get_or_try_init(|| {
                // A broker hears its queues and broadcast channels, a backend its results:
                // a worker's broker need not read every result notification.
                let channels = if self.kind == ErrorKind::Broker {
                    vec![self.hub.queue_ch.clone(), self.hub.broadcast_ch.clone()]
                } else {
                    vec![self.hub.result_ch.clone()]
                };
                ListenerTask::start(&self.pool, &self.hub, channels)
            })
            .await
            .map(|_| ())
            .map_err(|e| self.err("cannot listen for postgres notifications", e))
    }

    /// Closes: waiters end, later calls fail with `Closed`, connections are closed in the
    /// background.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.close_notify.notify_waiters();
        self.hub.wake_all();
        if let Some(l) = self.listener.get() {
            l.0.abort();
        }
        let (pool, fast) = (self.pool.clone(), self.fast.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                pool.close().await;
                fast.close().await;
            });
        }
    }

    /// Acks (deletes) the leased row `id` if it still holds lease `token`, batched with the
    /// acks of other deliveries that arrive meanwhile: one statement and one commit for all.
    pub(crate) async fn ack(&self, id: i64, token: i32, lease: i64) -> Result<()> {
        let tx = self
            .acks
            .get_or_init(|| async {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(ack_loop(
                    self.fast.clone(),
                    self.sql(
                        "DELETE FROM {s}messages m \
                     USING unnest($1::bigint[], $2::int[], $3::bigint[]) AS r(id, tok, lease) \
                     WHERE m.id = r.id AND m.deliveries = r.tok AND m.lease = r.lease",
                    ),
                    self.kind,
                    rx,
                ));
                tx
            })
            .await;
        let (reply, answer) = oneshot::channel();
        tx.send(AckCmd {
            id,
            token,
            lease,
            reply,
        })
        .map_err(|_| Error::closed("postgres ack queue"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Error::closed("postgres ack queue")))
    }

    /// Publishes one row to `queue`, batched with the publishes of this process that arrive
    /// meanwhile: one statement, one commit and one notification per queue for all (a commit
    /// that notifies holds PostgreSQL's notification lock until its WAL is flushed, so
    /// commits that notify run one at a time on the whole server: fewer, larger ones are
    /// what makes publishing scale).
    pub(crate) async fn publish_one(&self, queue: &str, row: crate::broker::NewRow) -> Result<()> {
        let tx = self
            .publishes
            .get_or_init(|| async {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(publish_loop(
                    self.pool.clone(),
                    self.sql(PUBLISH_MANY_SQL),
                    self.hub.queue_ch.clone(),
                    self.kind,
                    rx,
                ));
                tx
            })
            .await;
        let (reply, answer) = oneshot::channel();
        tx.send(PubCmd {
            queue: queue.to_owned(),
            row,
            reply,
        })
        .map_err(|_| Error::closed("postgres publisher"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Error::closed("postgres publisher")))
    }

    /// SQL with `{s}` replaced by the quoted schema and a dot.
    pub(crate) fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.s)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(l) = self.listener.get() {
            l.0.abort();
        }
    }
}

/// What notifications wake: consumers (a queue changed), inboxes (a broadcast row), result
/// waiters (by task id).
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    pub(crate) queue_ch: String,
    pub(crate) result_ch: String,
    pub(crate) broadcast_ch: String,
    pub(crate) queues: watch::Sender<u64>,
    pub(crate) broadcast: watch::Sender<u64>,
    results: Arc<Mutex<Results>>,
}

/// Result waiters by task id, and the ready results notified in the last moments.
#[derive(Debug, Default)]
struct Results {
    waiters: HashMap<String, Arc<Notify>>,
    /// Task id → (when notified, the TaskMeta JSON the notification carried).
    recent: HashMap<String, (std::time::Instant, String)>,
    order: std::collections::VecDeque<String>,
}

/// How many notified results a process keeps, and for how long: enough to bridge a `wait`
/// that starts after its task's result was stored (the usual case for short tasks), never a
/// cache of results.
const RECENT_MAX: usize = 8192;
const RECENT_FOR: Duration = Duration::from_secs(5);

impl Hub {
    fn new(schema: &str) -> Self {
        Hub {
            queue_ch: channel(schema, "queue"),
            result_ch: channel(schema, "result"),
            broadcast_ch: channel(schema, "broadcast"),
            queues: watch::Sender::new(0),
            broadcast: watch::Sender::new(0),
            results: Arc::new(Mutex::new(Results::default())),
        }
    }

    /// Wakes everyone: after the listening connection was lost, notifications may have been
    /// missed.
    pub(crate) fn wake_all(&self) {
        self.queues.send_modify(|n| *n += 1);
        self.broadcast.send_modify(|n| *n += 1);
        let map = self.results.lock().unwrap_or_else(|e| e.into_inner());
        for n in map.waiters.values() {
            n.notify_waiters();
        }
    }

    /// A result notification: `<task id>` or `<task id>\n<TaskMeta JSON>`.
    fn result_ready(&self, payload: &str) {
        let (task_id, meta) = match payload.split_once('\n') {
            Some((id, meta)) => (id, Some(meta)),
            None => (payload, None),
        };
        let mut r = self.results.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(meta) = meta {
            if r.order.len() >= RECENT_MAX
                && let Some(old) = r.order.pop_front()
            {
                r.recent.remove(&old);
            }
            if r.recent
                .insert(
                    task_id.to_owned(),
                    (std::time::Instant::now(), meta.to_owned()),
                )
                .is_none()
            {
                r.order.push_back(task_id.to_owned());
            }
        }
        if let Some(n) = r.waiters.get(task_id) {
            n.notify_waiters();
        }
    }

    /// The ready result of `task_id` notified in the last [`RECENT_FOR`], if any.
    pub(crate) fn recent_result(&self, task_id: &str) -> Option<String> {
        let r = self.results.lock().unwrap_or_else(|e| e.into_inner());
        r.recent
            .get(task_id)
            .filter(|(at, _)| at.elapsed() < RECENT_FOR)
            .map(|(_, meta)| meta.clone())
    }

    /// Forgets a notified result (the row was deleted).
    pub(crate) fn forget_result(&self, task_id: &str) {
        let mut r = self.results.lock().unwrap_or_else(|e| e.into_inner());
        r.recent.remove(task_id);
    }

    /// A waiter for `task_id`'s notification; unregistered when dropped.
    pub(crate) fn result_waiter(&self, task_id: &str) -> ResultWaiter<'_> {
        let mut map = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let notify = map.waiters.entry(task_id.to_owned()).or_default().clone();
        ResultWaiter {
            hub: self,
            task_id: task_id.to_owned(),
            notify,
        }
    }
}

/// A registration for one task id's result notification.
#[derive(Debug)]
pub(crate) struct ResultWaiter<'a> {
    hub: &'a Hub,
    task_id: String,
    pub(crate) notify: Arc<Notify>,
}

impl Drop for ResultWaiter<'_> {
    fn drop(&mut self) {
        let mut map = self.hub.results.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and ours; others still wait otherwise.
        if Arc::strong_count(&self.notify) <= 2 {
            map.waiters.remove(&self.task_id);
        }
    }
}

/// The task reading the LISTEN connection.
#[derive(Debug)]
struct ListenerTask(tokio::task::AbortHandle);

impl ListenerTask {
    async fn start(
        pool: &PgPool,
        hub: &Hub,
        channels: Vec<String>,
    ) -> std::result::Result<Self, sqlx::Error> {
        // A pool of its own (one connection, never timed out), so the listener never takes a
        // connection from the working pool and reconnects on its own.
        let lpool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = PgListener::connect_with(&lpool).await?;
        listener
            .listen_all(channels.iter().map(String::as_str))
            .await?;
        let hub = hub.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        backoff = Duration::from_millis(50);
                        let ch = n.channel();
                        if ch == hub.queue_ch {
                            hub.queues.send_modify(|g| *g += 1);
                        } else if ch == hub.result_ch {
                            hub.result_ready(n.payload());
                        } else if ch == hub.broadcast_ch {
                            hub.broadcast.send_modify(|g| *g += 1);
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("postgres listening connection lost; reconnected");
                        hub.wake_all();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres listening connection failed; retrying");
                        hub.wake_all();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        Ok(ListenerTask(task.abort_handle()))
    }
}

/// One ack waiting for the batch.
#[derive(Debug)]
struct AckCmd {
    id: i64,
    token: i32,
    lease: i64,
    reply: oneshot::Sender<Result<()>>,
}

/// The most acks one statement carries.
const ACK_BATCH: usize = 4096;

/// Takes every ack queued at the moment, deletes their rows in one statement, answers each;
/// while it runs, the next batch gathers. Ends when every sender is gone (the store dropped).
async fn ack_loop(
    pool: PgPool,
    sql: String,
    kind: ErrorKind,
    mut rx: mpsc::UnboundedReceiver<AckCmd>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let (ids, tokens, leases) = fences(batch.iter().map(|c| (c.id, c.token, c.lease)));
        let r = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(ids)
            .bind(tokens)
            .bind(leases)
            .execute(&pool)
            .await;
        match r {
            Ok(_) => {
                for c in batch.drain(..) {
                    let _ = c.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let e = Arc::new(db_error(kind, "cannot ack postgres messages", e));
                for c in batch.drain(..) {
                    let err = Error::new(kind, "cannot ack postgres message")
                        .with_source(SharedError(e.clone()));
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

/// Leases' fencing tokens `(id, deliveries, lease)` as the three arrays the settling
/// statements unnest.
pub(crate) fn fences(
    rows: impl Iterator<Item = (i64, i32, i64)>,
) -> (Vec<i64>, Vec<i32>, Vec<i64>) {
    let (mut ids, mut tokens, mut leases) = (Vec::new(), Vec::new(), Vec::new());
    for (id, token, lease) in rows {
        ids.push(id);
        tokens.push(token);
        leases.push(lease);
    }
    (ids, tokens, leases)
}

/// One error shared by the acks of a failed batch.
#[derive(Debug)]
pub(crate) struct SharedError(pub(crate) Arc<Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for SharedError {}

/// Inserts rows of several queues (declaring them) and notifies each queue once.
const PUBLISH_MANY_SQL: &str = "WITH q AS (INSERT INTO {s}queues (name) \
       SELECT DISTINCT name FROM unnest($1::text[]) AS n(name) ON CONFLICT DO NOTHING), \
     ins AS (INSERT INTO {s}messages (queue, priority, state, visible_at, task_id, body) \
       SELECT * FROM unnest($1::text[], $2::smallint[], $3::smallint[], $4::bigint[], $5::text[], $6::text[])) \
     SELECT pg_notify($7, name) FROM (SELECT DISTINCT name FROM unnest($1::text[]) AS n(name)) d";

/// One publish waiting for the batch.
#[derive(Debug)]
struct PubCmd {
    queue: String,
    row: crate::broker::NewRow,
    reply: oneshot::Sender<Result<()>>,
}

/// The most messages one publishing statement carries.
const PUBLISH_BATCH: usize = 1024;

/// Takes every publish queued at the moment and inserts them in one statement; answers each
/// (all succeed or all fail). Ends when the store is dropped.
async fn publish_loop(
    pool: PgPool,
    sql: String,
    channel: String,
    kind: ErrorKind,
    mut rx: mpsc::UnboundedReceiver<PubCmd>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let r = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(batch.iter().map(|c| c.queue.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.row.priority).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.row.state).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.row.visible_at).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|c| c.row.task_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                batch
                    .iter()
                    .map(|c| c.row.body.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(channel.as_str())
            .execute(&pool)
            .await;
        match r {
            Ok(_) => {
                for c in batch.drain(..) {
                    let _ = c.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let e = Arc::new(db_error(kind, "cannot publish to postgres queue", e));
                for c in batch.drain(..) {
                    let err = Error::new(kind, "cannot publish to postgres queue")
                        .with_source(SharedError(e.clone()));
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
