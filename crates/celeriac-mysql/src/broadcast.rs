//! The broadcast channels of [`MysqlBroker`]: remote control (Celery's pidbox) and events
//! (`celeryev`) between every process that uses the database.
//!
//! # Rows
//!
//! Every message is one row of `celeriac_broadcast(id, channel, routing_key, body,
//! created_at)`: `channel` is `control`, `reply` or `event`, `routing_key` the message's,
//! `body` kombu's JSON envelope ([`celeriac_core::broadcast::envelope`]), `created_at` the
//! server's Unix ms. Sending is one autocommitted `INSERT`.
//!
//! # Inboxes: cursors over one table, with a guard for out-of-order commits
//!
//! An inbox is a cursor over `id`, starting at the largest id when it opens, so it sees what
//! is sent after, as a pub/sub subscriber would. Unlike SQLite, InnoDB hands out
//! `AUTO_INCREMENT` ids before commit: two sends may commit in the other order, and a reader
//! between the two commits sees id 8 without id 7. So a read takes the rows after the cursor
//! (all channels, bodies only for its own, at most [`READ_LIMIT`]) and moves the cursor only
//! over contiguous ids; at a gap it stops and reads from there next time, until the gap is
//! [`GAP_WAIT`] old, when it gives up on that id (a rolled-back send, or a row swept away).
//! A gap thus costs at most [`GAP_WAIT`] of latency, and only to the rows behind it. The
//! server's `auto_increment_increment` is read at open, so a server that counts in steps
//! (Galera) does not look like one gap per row.
//!
//! # Waking up
//!
//! An idle inbox polls, with a sleep doubling from 1 ms to the poll interval (100 ms by
//! default); a send of this process wakes its inboxes at once.
//!
//! # Transience
//!
//! Rows older than [`HORIZON_MS`] are deleted by a sweep that sends start in the background,
//! at most once a second per broker (see `sweep` for why it never waits on a send).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use celeriac_core::broadcast::rows::{Channel, RowFilter as Filter};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, envelope};
use celeriac_core::protocol::new_id;
use celeriac_core::{BoxFuture, Error, ErrorKind, Result};
use sqlx::Row as _;

use crate::broker::MysqlBroker;
use crate::db::map_err;

const KIND: ErrorKind = ErrorKind::Broker;

/// How long a broadcast row lives (ms).
pub(crate) const HORIZON_MS: i64 = 60_000;
/// How often one broker's sends look for expired rows (ms).
const SWEEP_EVERY_MS: i64 = 1_000;
/// How many expired rows one sweep deletes at most.
const SWEEP_LIMIT: i64 = 10_000;
/// How many rows one read of an inbox takes.
const READ_LIMIT: i64 = 512;
/// How long an inbox waits for a missing id to commit before it skips it.
const GAP_WAIT: Duration = Duration::from_millis(500);
/// How long an inbox waits before reading again after a transient failure.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// Deletes the rows older than the horizon, at most [`SWEEP_LIMIT`].
///
/// The newest old id is found by a plain read first, and the delete then walks the primary
/// key up to it: a scan that reached a row whose send has not committed yet would wait for
/// its lock (InnoDB's `DELETE` does not skip locked rows), and a send must never wait for a
/// sweep, nor a sweep for a slow send.
async fn sweep(pool: sqlx::MySqlPool) {
    let r = async {
        let upto: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT MAX(id) FROM (SELECT id FROM celeriac_broadcast WHERE created_at < ",
            now_ms!(),
            " - ? ORDER BY created_at LIMIT ?) AS old"
        ))
        .bind(HORIZON_MS)
        .bind(SWEEP_LIMIT)
        .fetch_one(&pool)
        .await?;
        let Some(upto) = upto else { return Ok(0) };
        let r = sqlx::query(concat!(
            "DELETE FROM celeriac_broadcast WHERE id <= ? AND created_at < ",
            now_ms!(),
            " - ? ORDER BY id LIMIT ?"
        ))
        .bind(upto)
        .bind(HORIZON_MS)
        .bind(SWEEP_LIMIT)
        .execute(&pool)
        .await?;
        Ok::<u64, sqlx::Error>(r.rows_affected())
    }
    .await;
    match r {
        Ok(0) => {}
        Ok(n) => tracing::debug!(rows = n, "swept expired mysql broadcasts"),
        Err(e) => tracing::warn!(error = %e, "cannot sweep expired mysql broadcasts"),
    }
}

impl MysqlBroker {
    fn broadcast_sweep_due(&self) -> bool {
        let now = chrono::Utc::now().timestamp_millis();
        let next_sweep = &self.inner.next_sweep;
        let next = next_sweep.load(Ordering::Relaxed);
        now >= next
            && next_sweep
                .compare_exchange(
                    next,
                    now + SWEEP_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    async fn send(&self, channel: Channel, m: &Broadcasted) -> Result<()> {
        let envelope = envelope::encode(m, channel.exchange());
        self.send_encoded(channel, &m.routing_key, envelope).await
    }

    async fn send_encoded(&self, channel: Channel, key: &str, envelope: Vec<u8>) -> Result<()> {
        self.check_open()?;
        let body = String::from_utf8(envelope)
            .map_err(|e| Error::protocol("broadcast envelope is not utf-8").with_source(e))?;
        let pool = &self.inner.pool;
        if self.broadcast_sweep_due() {
            // In the background: a send never waits for the sweep.
            tokio::spawn(sweep(pool.clone()));
        }
        sqlx::query(concat!(
            "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) VALUES (?, ?, ?, ",
            now_ms!(),
            ")"
        ))
        .bind(channel.name())
        .bind(key)
        .bind(&body)
        .execute(pool)
        .await
        .map_err(|e| map_err(KIND, "cannot send mysql broadcast", e))?;
        self.inner.broadcast_sent.notify_waiters();
        Ok(())
    }

    async fn open_inbox(&self, channel: Channel, filter: Filter) -> Result<MysqlInbox> {
        self.check_open()?;
        const WHAT: &str = "cannot open mysql broadcast inbox";
        let row = sqlx::query(
            "SELECT CAST(COALESCE(MAX(id), 0) AS SIGNED), CAST(@@auto_increment_increment AS SIGNED) \
             FROM celeriac_broadcast",
        )
        .fetch_one(&self.inner.pool)
        .await
        .map_err(|e| map_err(KIND, WHAT, e))?;
        let cursor: i64 = row.try_get(0).map_err(|e| map_err(KIND, WHAT, e))?;
        let step: i64 = row.try_get(1).map_err(|e| map_err(KIND, WHAT, e))?;
        Ok(MysqlInbox {
            broker: self.clone(),
            channel,
            filter,
            cursor,
            step: step.max(1),
            gap_since: None,
            buffer: VecDeque::new(),
            idle: Duration::from_millis(1),
        })
    }
}

/// Remote control and events in the broker's database: see the module docs.
impl Broadcast for MysqlBroker {
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self.open_inbox(Channel::Control, Filter::All).await?;
            tracing::debug!(node, "listening for remote control in mysql");
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.send(Channel::Control, message))
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            let key = new_id();
            let inbox = self
                .open_inbox(Channel::Reply, Filter::Key(key.clone()))
                .await?;
            Ok((key, Box::new(inbox) as Box<dyn Inbox>))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.send(Channel::Reply, message))
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.send(Channel::Event, message))
    }

    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a serde_json::Map<String, serde_json::Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let envelope = envelope::encode_json(
            routing_key,
            headers,
            body.as_bytes(),
            Channel::Event.exchange(),
        );
        Box::pin(async move {
            self.send_encoded(Channel::Event, routing_key, envelope)
                .await
        })
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self
                .open_inbox(Channel::Event, Filter::Topic(binding.to_owned()))
                .await?;
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }
}

/// A row of this inbox's channel and filter.
#[derive(Debug)]
struct Found {
    id: i64,
    routing_key: String,
    body: String,
}

struct MysqlInbox {
    broker: MysqlBroker,
    channel: Channel,
    filter: Filter,
    /// Every id up to this one has been read or given up on.
    cursor: i64,
    /// The server's `auto_increment_increment`.
    step: i64,
    /// The missing id after the cursor, and since when it is missing.
    gap_since: Option<(i64, Instant)>,
    buffer: VecDeque<Found>,
    idle: Duration,
}

impl fmt::Debug for MysqlInbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlInbox")
            .field("channel", &self.channel.name())
            .field("filter", &self.filter)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl MysqlInbox {
    fn closed(&self) -> bool {
        self.broker.inner.closed.load(Ordering::Acquire)
    }

    /// Reads the rows after the cursor (see the module docs); returns how many of this
    /// inbox's it buffered.
    async fn read(&mut self) -> Result<usize> {
        const WHAT: &str = "cannot read mysql broadcasts";
        let (key_check, key) = match &self.filter {
            Filter::Key(k) => ("routing_key = ?", k.as_str()),
            _ => ("? = ?", ""),
        };
        let sql = format!(
            "SELECT id, routing_key, IF(channel = ? AND {key_check}, body, NULL) \
             FROM celeriac_broadcast WHERE id > ? ORDER BY id LIMIT {READ_LIMIT}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(self.channel.name());
        q = match &self.filter {
            Filter::Key(_) => q.bind(key),
            _ => q.bind("").bind(""),
        };
        let rows = q
            .bind(self.cursor)
            .fetch_all(&self.broker.inner.pool)
            .await
            .map_err(|e| map_err(KIND, WHAT, e))?;
        let mut n = 0;
        for r in rows {
            let id: i64 = r.try_get(0).map_err(|e| map_err(KIND, WHAT, e))?;
            let expected = self.cursor + self.step;
            if id > expected {
                // A gap: the ids before this one may belong to sends not committed yet. Wait
                // for them up to GAP_WAIT, then skip the whole gap.
                match self.gap_since {
                    Some((m, since)) if m == expected && since.elapsed() >= GAP_WAIT => {
                        self.gap_since = None;
                    }
                    Some((m, _)) if m == expected => return Ok(n),
                    _ => {
                        self.gap_since = Some((expected, Instant::now()));
                        return Ok(n);
                    }
                }
            }
            if id <= self.cursor {
                continue;
            }
            self.cursor = id;
            self.gap_since = None;
            let body: Option<String> = r.try_get(2).map_err(|e| map_err(KIND, WHAT, e))?;
            let Some(body) = body else { continue };
            let routing_key: String = r.try_get(1).map_err(|e| map_err(KIND, WHAT, e))?;
            if !self.filter.keeps(&routing_key) {
                continue;
            }
            self.buffer.push_back(Found {
                id,
                routing_key,
                body,
            });
            n += 1;
        }
        Ok(n)
    }

    fn decode(&self, row: Found) -> Option<Broadcasted> {
        match envelope::decode(row.body.as_bytes()) {
            Ok((_, mut m)) => {
                m.routing_key = row.routing_key;
                Some(m)
            }
            Err(e) => {
                tracing::warn!(
                    channel = self.channel.name(),
                    row = row.id,
                    error = %e,
                    "skipping a malformed mysql broadcast row"
                );
                None
            }
        }
    }

    async fn next_message(&mut self) -> Result<Option<Broadcasted>> {
        let broker = self.broker.clone();
        loop {
            if self.closed() {
                return Ok(None);
            }
            if let Some(row) = self.buffer.pop_front() {
                if let Some(m) = self.decode(row) {
                    return Ok(Some(m));
                }
                continue;
            }
            let sent = broker.inner.broadcast_sent.notified();
            let closed = broker.inner.close_notify.notified();
            tokio::pin!(sent, closed);
            sent.as_mut().enable();
            closed.as_mut().enable();
            if self.closed() {
                continue;
            }
            match self.read().await {
                Ok(0) => {}
                Ok(_) => {
                    self.idle = Duration::from_millis(1);
                    continue;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, channel = self.channel.name(), "cannot read mysql broadcasts; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut wait = self.idle;
            if self.gap_since.is_some() {
                wait = wait.min(Duration::from_millis(20));
            }
            self.idle = (self.idle * 2).min(broker.inner.options.get_poll_interval());
            tokio::select! {
                () = sent => { self.idle = Duration::from_millis(1); }
                () = closed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Inbox for MysqlInbox {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(self.next_message())
    }
}
