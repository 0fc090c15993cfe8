//! The broadcast channels of [`PgBroker`]: remote control (Celery's pidbox) and events
//! (`celeryev`) between every process connected to the database, so `inspect`, `control` and
//! `events` work on PostgreSQL.
//!
//! Every message is one row of `broadcast(id, channel, routing_key, body, created_at)`:
//! `channel` is `control`, `reply` or `event`, `body` kombu's JSON envelope (as Redis carries
//! it). Sending is one `INSERT` plus a `NOTIFY` in the same statement. An inbox is a cursor
//! over the table, starting at the newest row when it opens (so, as with pub/sub, it sees what
//! is sent after, not before); it wakes on the notification, with a one-second fallback poll.
//!
//! `bigserial` ids are handed out before commit, so a row with a smaller id may become
//! visible after a larger one was read. An inbox therefore rereads the last
//! [`LOOKBACK`] ids on every read and skips those it has seen: a row committed that late is
//! still delivered, once. Rows live one minute; sends delete older ones at most once a second.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use celeriac_core::broadcast::rows::{Channel, RowFilter as Filter};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, envelope};
use celeriac_core::protocol::new_id;
use celeriac_core::{BoxFuture, Result};
use serde_json::{Map, Value};
use sqlx::AssertSqlSafe;

use crate::broker::PgBroker;
use crate::store::{Store, now_ms};

/// How long a broadcast row lives (ms).
const HORIZON_MS: i64 = 60_000;
/// How far back (in ids) each read looks for rows that committed late.
const LOOKBACK: i64 = 64;
/// The most rows one read takes.
const READ_LIMIT: i64 = 256;
/// The longest an idle inbox waits without a notification.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

impl PgBroker {
    async fn send_encoded(&self, channel: Channel, routing_key: &str, body: Vec<u8>) -> Result<()> {
        self.store.check_open("postgres broker")?;
        let body = String::from_utf8(body).map_err(|e| {
            celeriac_core::Error::protocol("a broadcast envelope is not utf-8").with_source(e)
        })?;
        let now = now_ms();
        sqlx::query(AssertSqlSafe(self.store.sql(
            "WITH i AS (INSERT INTO {s}broadcast (channel, routing_key, body, created_at) \
             VALUES ($1, $2, $3, $4)) SELECT pg_notify($5, $1)",
        )))
        .bind(channel.name())
        .bind(routing_key)
        .bind(body)
        .bind(now)
        .bind(&self.store.hub.broadcast_ch)
        .execute(&self.store.pool)
        .await
        .map_err(|e| {
            self.store
                .err("cannot send a broadcast message on postgres", e)
        })?;
        let next = self.next_sweep.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_sweep
                .compare_exchange(next, now + 1000, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let r = sqlx::query(AssertSqlSafe(
                self.store
                    .sql("DELETE FROM {s}broadcast WHERE created_at < $1"),
            ))
            .bind(now - HORIZON_MS)
            .execute(&self.store.pool)
            .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "cannot delete old broadcast rows");
            }
        }
        Ok(())
    }

    async fn open_inbox(&self, channel: Channel, filter: Filter) -> Result<Box<dyn Inbox>> {
        self.store.check_open("postgres broker")?;
        self.store.listen().await?;
        let cursor: i64 = sqlx::query_scalar(AssertSqlSafe(
            self.store
                .sql("SELECT coalesce(max(id), 0) FROM {s}broadcast"),
        ))
        .fetch_one(&self.store.pool)
        .await
        .map_err(|e| self.store.err("cannot open a postgres broadcast inbox", e))?;
        Ok(Box::new(PgInbox {
            store: self.store.clone(),
            channel,
            filter,
            cursor,
            floor: cursor,
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
            buffer: VecDeque::new(),
        }))
    }
}

impl Broadcast for PgBroker {
    fn control_inbox<'a>(&'a self, _node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(self.open_inbox(Channel::Control, Filter::All))
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = envelope::encode(message, Channel::Control.exchange());
            self.send_encoded(Channel::Control, &message.routing_key, body)
                .await
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            let key = new_id();
            let inbox = self
                .open_inbox(Channel::Reply, Filter::Key(key.clone()))
                .await?;
            Ok((key, inbox))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = envelope::encode(message, Channel::Reply.exchange());
            self.send_encoded(Channel::Reply, &message.routing_key, body)
                .await
        })
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = envelope::encode(message, Channel::Event.exchange());
            self.send_encoded(Channel::Event, &message.routing_key, body)
                .await
        })
    }

    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a Map<String, Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let env = envelope::encode_json(
                routing_key,
                headers,
                body.as_bytes(),
                Channel::Event.exchange(),
            );
            self.send_encoded(Channel::Event, routing_key, env).await
        })
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(self.open_inbox(Channel::Event, Filter::Topic(binding.to_owned())))
    }
}

#[derive(Debug)]
struct PgInbox {
    store: Arc<Store>,
    channel: Channel,
    filter: Filter,
    /// The largest id read.
    cursor: i64,
    /// The newest id when the inbox opened: rows up to it were sent before and are skipped.
    floor: i64,
    /// Ids read within the lookback window, oldest first.
    seen: VecDeque<i64>,
    seen_set: HashSet<i64>,
    buffer: VecDeque<Broadcasted>,
}

impl PgInbox {
    async fn read(&mut self) -> Result<()> {
        let (sql, key) = match &self.filter {
            Filter::Key(k) => (
                "SELECT id, routing_key, body FROM {s}broadcast \
                 WHERE id > $1 AND channel = $2 AND routing_key = $4 ORDER BY id LIMIT $3",
                Some(k.clone()),
            ),
            _ => (
                "SELECT id, routing_key, body FROM {s}broadcast \
                 WHERE id > $1 AND channel = $2 ORDER BY id LIMIT $3",
                None,
            ),
        };
        let mut q = sqlx::query_as::<_, (i64, String, String)>(AssertSqlSafe(self.store.sql(sql)))
            .bind(self.cursor - LOOKBACK)
            .bind(self.channel.name())
            .bind(READ_LIMIT);
        if let Some(k) = key {
            q = q.bind(k);
        }
        let rows = q
            .fetch_all(&self.store.pool)
            .await
            .map_err(|e| self.store.err("cannot read postgres broadcast messages", e))?;
        for (id, routing_key, body) in rows {
            if id <= self.floor || self.seen_set.contains(&id) || id <= self.cursor - LOOKBACK {
                continue;
            }
            self.seen.push_back(id);
            self.seen_set.insert(id);
            self.cursor = self.cursor.max(id);
            if !self.filter.keeps(&routing_key) {
                continue;
            }
            match envelope::decode(body.as_bytes()) {
                Ok((_, m)) => self.buffer.push_back(m),
                Err(e) => {
                    tracing::warn!(row = id, error = %format_args!("{e:#}"), "skipping a broadcast row that is not a valid envelope")
                }
            }
        }
        while let Some(&old) = self.seen.front() {
            if old > self.cursor - LOOKBACK {
                break;
            }
            self.seen.pop_front();
            self.seen_set.remove(&old);
        }
        Ok(())
    }

    async fn next_message(&mut self) -> Result<Option<Broadcasted>> {
        let store = self.store.clone();
        let mut changes = store.hub.broadcast.subscribe();
        loop {
            if store.is_closed() {
                return Ok(None);
            }
            if let Some(m) = self.buffer.pop_front() {
                return Ok(Some(m));
            }
            let closed = store.close_notify.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            changes.borrow_and_update();
            self.read().await?;
            if !self.buffer.is_empty() {
                continue;
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = closed => {}
                () = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }
}

impl Inbox for PgInbox {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(self.next_message())
    }
}
