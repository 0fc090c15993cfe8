//! The broadcast channels of [`SqliteBroker`]: remote control (Celery's pidbox) and events
//! (`celeryev`) between every process that opens the file, so `inspect` and `events` work
//! without any server.
//!
//! # Rows
//!
//! Every message is one row of `celeriac_broadcast(id, channel, routing_key, body,
//! created_at)`: `channel` is `control`, `reply` or `event`, `routing_key` the message's
//! (empty for control requests, the reply queue's key for replies, the event type for
//! events), `body` kombu's JSON envelope as Redis carries it
//! ([`celeriac_core::broadcast::envelope`], with the exchange Celery would publish to), and
//! `created_at` Unix ms. Rows are readable with `sqlite3`. `id` is `AUTOINCREMENT`, so it
//! grows with every row and is never handed out twice, even after the sweep emptied the
//! table: inboxes rely on that.
//!
//! Sending is one `INSERT`, a command of the connection thread like any other, so it shares
//! the group commit of publishes and acks.
//!
//! # Inboxes: cursors over one table, as pub/sub
//!
//! An inbox is a cursor: the last id it has read, starting at the last id handed out when it
//! opened (`sqlite_sequence`), read in the connection thread before the call that opens it
//! returns. It sees every row committed after that, and nothing from before, as a pub/sub
//! subscriber would. Control inboxes read `channel = 'control'`, reply inboxes
//! `channel = 'reply' AND routing_key = <their key>`, event inboxes `channel = 'event'` with
//! the routing key checked against their binding by
//! [`topic_matches`](celeriac_core::broadcast::topic_matches) (in the connection thread,
//! before the body is read). One read takes at most [`READ_LIMIT`] rows of its channel, in id
//! order; when it finds fewer, the cursor moves to the sequence of its snapshot, past every
//! row of the other channels, so the next read starts at rows that are new. No index beyond
//! the primary key is needed: a read scans only rows added since the last one, and sends stay
//! one b-tree insert.
//!
//! Several inboxes of one node name all receive control requests: SQLite has no exclusive
//! queue to refuse the second one, unlike RabbitMQ.
//!
//! # Waking up
//!
//! An idle inbox costs no query. It waits for:
//!
//! - a commit of this process that added broadcast rows (fired by the connection thread);
//! - another process's broadcast row: while an inbox waits, the connection thread watches
//!   `PRAGMA data_version` as it does for idle consumers (at once on an inotify event for the
//!   `-wal` file, otherwise polling every 1 to 20 ms), and on a change reads the broadcast
//!   sequence, waking inboxes only when it grew, not for every task published or acked;
//! - a fallback of [`FALLBACK_POLL`], for events missed somehow.
//!
//! The inbox registers for the wake-up before it reads, so a row committed after its read
//! always wakes it. A reply crosses processes in about a millisecond (see the crate docs).
//!
//! # Transience
//!
//! Broadcast messages are transient (delivery at most once, as in Celery). Rows older than
//! [`HORIZON_MS`] are deleted by the sends themselves: at most once a second per broker, a
//! send also deletes the expired ones among the [`SWEEP_LIMIT`] oldest rows. A file nobody
//! sends to keeps its last rows, which no new inbox reads. An inbox that falls more than the
//! horizon behind misses what was swept meanwhile; it notices the gap in the ids and logs a
//! warning. A row that is not a valid envelope (hand-written, or not JSON) is logged at `warn`
//! and skipped; the inbox goes on.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use celeriac_core::broadcast::rows::{Channel, RowFilter as Filter};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, envelope};
use celeriac_core::protocol::new_id;
use celeriac_core::{BoxFuture, Error, ErrorKind, Result};
use rusqlite::Connection;
use rusqlite::types::ValueRef;

use crate::broker::SqliteBroker;
use crate::conn::{Conn, Db, Reply, broadcast_seq, now_ms};

const KIND: ErrorKind = ErrorKind::Broker;

/// How long a broadcast row lives (ms): past it, sends delete it. Longer than any reply wait
/// (Celery's default is 1 s) and than a heartbeat interval.
pub(crate) const HORIZON_MS: i64 = 60_000;
/// How often one broker's sends look for expired rows (ms).
const SWEEP_EVERY_MS: i64 = 1_000;
/// How many of the oldest rows one sweep looks at, so one send never holds the write lock
/// for long. Ten thousand a second outpaces any event stream a worker sends.
const SWEEP_LIMIT: i64 = 10_000;
/// How many rows of its channel one read of an inbox takes.
const READ_LIMIT: i64 = 256;
/// Longest wait of an idle inbox between reads, whatever the wake-ups say.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// How long an inbox waits before reading again after a transient failure (a locked file).
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// Deletes the expired rows among the [`SWEEP_LIMIT`] oldest.
fn sweep(db: &Db, before: i64) -> rusqlite::Result<usize> {
    db.conn
        .prepare_cached(
            "DELETE FROM celeriac_broadcast WHERE id IN \
             (SELECT id FROM celeriac_broadcast ORDER BY id LIMIT ?2) AND created_at < ?1",
        )?
        .execute((before, SWEEP_LIMIT))
}

/// A row as read, before decoding (which the inbox does, off the connection thread).
#[derive(Debug)]
struct Row {
    id: i64,
    routing_key: String,
    /// The body's bytes; `None` when the column holds neither text nor a blob.
    body: Option<Vec<u8>>,
}

/// What one read found.
#[derive(Debug)]
struct Read {
    rows: Vec<Row>,
    /// The cursor after this read.
    cursor: i64,
    /// How many ids after the old cursor no longer exist: rows swept before this inbox read
    /// them.
    missed: i64,
}

const READ_ALL_SQL: &str = "SELECT id, routing_key, body FROM celeriac_broadcast \
     WHERE id > ?1 AND channel = ?2 ORDER BY id LIMIT ?3";
const READ_KEY_SQL: &str = "SELECT id, routing_key, body FROM celeriac_broadcast \
     WHERE id > ?1 AND channel = ?2 AND routing_key = ?4 ORDER BY id LIMIT ?3";

/// Reads the rows after `cursor` for an inbox, in one snapshot (the batch's transaction).
fn read(
    conn: &Connection,
    channel: Channel,
    filter: &Filter,
    cursor: i64,
) -> rusqlite::Result<Read> {
    let first: Option<i64> = conn
        .prepare_cached("SELECT MIN(id) FROM celeriac_broadcast WHERE id > ?1")?
        .query_row([cursor], |r| r.get(0))?;
    let missed = first.map_or(0, |f| f - cursor - 1);
    let mut stmt = match filter {
        Filter::Key(_) => conn.prepare_cached(READ_KEY_SQL)?,
        Filter::All | Filter::Topic(_) => conn.prepare_cached(READ_ALL_SQL)?,
    };
    let mut found = match filter {
        Filter::Key(key) => stmt.query((cursor, channel.name(), READ_LIMIT, key))?,
        Filter::All | Filter::Topic(_) => stmt.query((cursor, channel.name(), READ_LIMIT))?,
    };
    let (mut rows, mut scanned, mut last) = (Vec::new(), 0, cursor);
    while let Some(r) = found.next()? {
        scanned += 1;
        last = r.get(0)?;
        let routing_key: String = r.get(1)?;
        if !filter.keeps(&routing_key) {
            continue;
        }
        let body = match r.get_ref(2)? {
            ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.to_vec()),
            _ => None,
        };
        rows.push(Row {
            id: last,
            routing_key,
            body,
        });
    }
    drop(found);
    drop(stmt);
    let cursor = if scanned < READ_LIMIT {
        // Nothing more of this channel in this snapshot: skip the other channels' rows too.
        last.max(broadcast_seq(conn)?)
    } else {
        last
    };
    Ok(Read {
        rows,
        cursor,
        missed,
    })
}

impl SqliteBroker {
    /// Whether this send should also delete expired rows.
    fn broadcast_sweep_due(&self, now: i64) -> bool {
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

    /// Inserts `m` on `channel` (and sweeps, when due).
    async fn send(&self, channel: Channel, m: &Broadcasted) -> Result<()> {
        let envelope = envelope::encode(m, channel.exchange());
        self.send_encoded(channel, m.routing_key.clone(), envelope)
            .await
    }

    /// Inserts an encoded envelope sent on `channel` under `key`.
    async fn send_encoded(&self, channel: Channel, key: String, envelope: Vec<u8>) -> Result<()> {
        self.check_open()?;
        let body = String::from_utf8(envelope)
            .map_err(|e| Error::protocol("broadcast envelope is not utf-8").with_source(e))?;
        let now = now_ms();
        let sweep_now = self.broadcast_sweep_due(now);
        self.conn()
            .call(KIND, true, "cannot send sqlite broadcast", move |db| {
                if sweep_now {
                    // A failed delete is undone alone and must not fail the send.
                    match sweep(db, now - HORIZON_MS) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(rows = n, "swept expired sqlite broadcasts"),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot sweep expired sqlite broadcasts");
                        }
                    }
                }
                db.conn
                    .prepare_cached(
                        "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute((channel.name(), &key, &body, now))?;
                db.broadcast_changed();
                Ok(())
            })
            .await
    }

    /// Opens an inbox on `channel`, positioned after the last row sent so far.
    async fn open_inbox(&self, channel: Channel, filter: Filter) -> Result<SqliteInbox> {
        self.check_open()?;
        let cursor = self
            .conn()
            .call(KIND, false, "cannot open sqlite broadcast inbox", |db| {
                broadcast_seq(&db.conn)
            })
            .await?;
        Ok(SqliteInbox {
            broker: self.clone(),
            channel,
            filter,
            cursor,
            buffer: VecDeque::new(),
            pending: None,
        })
    }
}

/// Remote control and events in the broker's file: see the crate docs (**Broadcast**).
impl Broadcast for SqliteBroker {
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self.open_inbox(Channel::Control, Filter::All).await?;
            tracing::debug!(node, "listening for remote control in sqlite");
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
        Box::pin(self.send_encoded(Channel::Event, routing_key.to_owned(), envelope))
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

/// One inbox: a cursor over the broadcast table, and the rows read but not yet returned.
struct SqliteInbox {
    broker: SqliteBroker,
    channel: Channel,
    filter: Filter,
    /// The last id read.
    cursor: i64,
    buffer: VecDeque<Row>,
    /// A read in flight; kept across cancellation so its rows are not lost.
    pending: Option<Reply<Read>>,
}

impl fmt::Debug for SqliteInbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("database", &self.broker.conn().location)
            .field("channel", &self.channel.name())
            .field("filter", &self.filter)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl SqliteInbox {
    fn closed(&self) -> bool {
        self.broker.inner.closed.load(Ordering::Acquire)
    }

    /// The message of a row; `None` (logged) when the row is malformed.
    fn decode(&self, row: Row) -> Option<Broadcasted> {
        let decoded = match &row.body {
            Some(bytes) => envelope::decode(bytes),
            None => Err(Error::protocol("its body is neither text nor a blob")),
        };
        match decoded {
            Ok((_, mut m)) => {
                // The column is what the inbox filtered on, so it is what it reports.
                m.routing_key = row.routing_key;
                Some(m)
            }
            Err(e) => {
                tracing::warn!(
                    channel = self.channel.name(),
                    row = row.id,
                    error = %e,
                    "skipping a malformed sqlite broadcast row"
                );
                None
            }
        }
    }

    /// Awaits a read (sent first unless one is in flight; cancel-safe) and buffers what it
    /// found; returns how many rows.
    async fn read(&mut self) -> Result<usize> {
        if self.pending.is_none() {
            let (channel, filter, cursor) = (self.channel, self.filter.clone(), self.cursor);
            let rx = self
                .broker
                .conn()
                .submit(false, move |db| read(&db.conn, channel, &filter, cursor))
                .ok_or_else(|| Error::new(KIND, "the sqlite connection thread has stopped"))?;
            self.pending = Some(rx);
        }
        let rx = self.pending.as_mut().expect("a read in flight");
        let r = Conn::wait(rx, KIND, "cannot read sqlite broadcasts").await;
        self.pending = None;
        let read = r?;
        if read.missed > 0 {
            tracing::warn!(
                channel = self.channel.name(),
                missed = read.missed,
                horizon_s = HORIZON_MS / 1000,
                "a sqlite broadcast inbox fell behind: rows expired before it read them"
            );
        }
        self.cursor = read.cursor;
        let n = read.rows.len();
        self.buffer.extend(read.rows);
        Ok(n)
    }

    async fn next_message(&mut self) -> Result<Option<Broadcasted>> {
        let shared = self.broker.inner.conn.shared.clone();
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
            // Listen before looking, so a row committed after the read wakes us.
            let sent = shared.broadcast.notified();
            let closed = broker.inner.close_notify.notified();
            tokio::pin!(sent, closed);
            sent.as_mut().enable();
            closed.as_mut().enable();
            let _listen = self.broker.conn().listen();
            if self.closed() {
                continue;
            }
            match self.read().await {
                Ok(0) => {}
                Ok(_) => continue,
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, channel = self.channel.name(), "cannot read sqlite broadcasts; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = sent => {}
                () = closed => {}
                () = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }
}

impl Inbox for SqliteInbox {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(self.next_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads seek the primary key from the cursor on and never sort: their cost is the rows
    /// added since the last read, however many the table holds.
    #[test]
    fn reads_seek_from_the_cursor() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::schema::migrate(&conn).unwrap();
        for sql in [
            READ_ALL_SQL,
            READ_KEY_SQL,
            "SELECT MIN(id) FROM celeriac_broadcast WHERE id > ?1",
        ] {
            let p = crate::schema::query_plan(&conn, sql);
            assert!(p.contains("INTEGER PRIMARY KEY (rowid>?)"), "{sql}\n{p}");
            assert!(!p.contains("TEMP B-TREE"), "{sql}\n{p}");
        }
    }

    fn insert(conn: &Connection, channel: &str, key: &str) -> i64 {
        conn.execute(
            "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
             VALUES (?1, ?2, '{}', 0)",
            (channel, key),
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    fn ids(r: &Read) -> Vec<i64> {
        r.rows.iter().map(|r| r.id).collect()
    }

    /// A read takes its channel's rows past the cursor, at most [`READ_LIMIT`]; when it found
    /// fewer, its cursor moves past the other channels' rows too.
    #[test]
    fn reads_filter_bound_and_move_the_cursor() {
        let conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&conn).unwrap();
        let c1 = insert(&conn, "control", "");
        let r1 = insert(&conn, "reply", "k1");
        insert(&conn, "reply", "k2");
        let e1 = insert(&conn, "event", "task.started");
        insert(&conn, "event", "worker.heartbeat");
        let last = insert(&conn, "event", "task.multi");

        let all = Filter::All;
        let r = read(&conn, Channel::Control, &all, 0).unwrap();
        assert_eq!((ids(&r), r.cursor, r.missed), (vec![c1], last, 0));
        let key = Filter::Key("k1".to_owned());
        let r = read(&conn, Channel::Reply, &key, 0).unwrap();
        assert_eq!((ids(&r), r.cursor), (vec![r1], last));
        let topic = Filter::Topic("task.*".to_owned());
        let r = read(&conn, Channel::Event, &topic, 0).unwrap();
        assert_eq!((ids(&r), r.cursor), (vec![e1, last], last));
        assert_eq!(r.rows[0].routing_key, "task.started");
        let r = read(&conn, Channel::Event, &topic, last).unwrap();
        assert_eq!((ids(&r), r.cursor), (vec![], last));

        // A full read stops at its last row; the next one goes on from there.
        let first = insert(&conn, "event", "task.x");
        for _ in 1..READ_LIMIT + 10 {
            insert(&conn, "event", "task.x");
        }
        let r = read(&conn, Channel::Event, &all, last).unwrap();
        assert_eq!(r.rows.len() as i64, READ_LIMIT);
        assert_eq!(r.cursor, first + READ_LIMIT - 1);
        let r = read(&conn, Channel::Event, &all, r.cursor).unwrap();
        assert_eq!(r.rows.len(), 10);
    }

    /// Rows swept before an inbox read them show as a gap after its cursor.
    #[test]
    fn reads_count_the_rows_swept_before_them() {
        let conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&conn).unwrap();
        for _ in 0..5 {
            insert(&conn, "event", "task.x");
        }
        conn.execute("DELETE FROM celeriac_broadcast WHERE id <= 3", [])
            .unwrap();
        let r = read(&conn, Channel::Event, &Filter::All, 0).unwrap();
        assert_eq!((ids(&r), r.missed), (vec![4, 5], 3));
        let r = read(&conn, Channel::Event, &Filter::All, 3).unwrap();
        assert_eq!(r.missed, 0);
        // The table emptied: no gap to see, and the next id is still new.
        conn.execute("DELETE FROM celeriac_broadcast", []).unwrap();
        assert_eq!(
            read(&conn, Channel::Event, &Filter::All, 5).unwrap().missed,
            0
        );
        assert_eq!(insert(&conn, "event", "task.x"), 6);
    }

    #[test]
    fn channels_name_celerys_exchanges() {
        assert_eq!(Channel::Control.exchange(), "celery.pidbox");
        assert_eq!(Channel::Reply.exchange(), "reply.celery.pidbox");
        assert_eq!(Channel::Event.exchange(), "celeryev");
    }
}
