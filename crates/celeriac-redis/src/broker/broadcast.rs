//! The broker's broadcast channels (Celery's pidbox and `celeryev`), exactly as kombu's Redis
//! transport carries them, so `celery inspect`, `celery control`, `celery events` and Flower
//! talk to celeriac nodes and celeriac to Python ones.
//!
//! | what | Redis | kombu's name for it |
//! |---|---|---|
//! | control request | `PUBLISH /<db>.celery.pidbox <envelope>` | fanout exchange `celery.pidbox` |
//! | a node listening | `PSUBSCRIBE /<db>.celery.pidbox`, and `\x06\x16\x06\x16<node>.celery.pidbox` in `_kombu.binding.celery.pidbox` | queue `<node>.celery.pidbox` |
//! | reply | `SMEMBERS _kombu.binding.reply.celery.pidbox`, `LPUSH <queue>` for each member with the reply's routing key | direct exchange `reply.celery.pidbox` |
//! | a reply queue | `<key>\x06\x16\x06\x16<key>.reply.celery.pidbox` in that set; `BRPOP` on the list `<key>.reply.celery.pidbox` (and its priority lists) | queue `<oid>.reply.celery.pidbox` |
//! | event | `PUBLISH /<db>.celeryev/<routing key> <envelope>` | exchange `celeryev` (fanout on Redis) |
//! | an event listener | `PSUBSCRIBE /<db>.celeryev/<binding, # → *>`, and `<binding>\x06\x16\x06\x16celeryev.<id>` in `_kombu.binding.celeryev` | queue `celeryev.<uuid>` |
//!
//! Every key, channel and pattern starts with `global_keyprefix`. Messages are kombu's JSON
//! envelope ([`envelope`]) with the exchange and routing key in `delivery_info`.
//!
//! # Design decisions
//!
//! - **Pub/sub, at most once, as kombu.** Requests and events are published, not queued: a
//!   node that is not subscribed when a message goes out never sees it (a revoke sent while a
//!   worker restarts is lost to it, with Python workers too). Nothing is acknowledged.
//! - **One pub/sub connection per inbox.** Each control or event inbox subscribes on a
//!   connection of its own, as each kombu channel has its own subscriber. A reader then sets
//!   its own pace (a slow event monitor cannot hold back the control requests of the worker
//!   in the same process), losing and re-establishing a subscription touches no other inbox,
//!   and there is no routing table to keep; a process has a handful of inboxes, so the
//!   connections cost nothing worth sharing them for. An inbox is returned only once the
//!   server has confirmed its `PSUBSCRIBE`, so whatever is sent after that reaches it.
//! - **Reconnects.** A pub/sub connection that drops is re-opened with backoff and
//!   subscribed again, forever (what is published meanwhile is lost, as above). An idle one
//!   is pinged every [`HEALTH_CHECK`] (kombu's `health_check_interval`), so a half-open
//!   connection is noticed and replaced rather than waited on forever.
//! - **Replies are a direct-exchange publish** onto lists, as kombu routes them: the binding
//!   table says which queue takes a routing key; a reply nobody is bound for is dropped. A
//!   reply inbox waits with `BRPOP` (kombu's, one second at a time) on a connection of its
//!   own, so that waiting blocks nobody else; the wait runs in a task kept across cancelled
//!   `next()` calls, so a popped reply is never lost to a dropped future. Each wait also
//!   renews the lists' expiry to Celery's `control_queue_expires` (10 s), as kombu does when
//!   it reads a queue declared with `x-expires`: the lists of a client that died go away.
//! - **Bindings as kombu 5.7 keeps those of expiring queues.** Each inbox adds its queue's
//!   member to the exchange's table and moves the exchange's deadline in
//!   `_kombu.binding_deadlines` an hour ahead (kombu: `max(2 × x-expires, 1 h)`), then
//!   renews it every twenty minutes while the inbox lives, so kombu's sweep never deletes a
//!   table in use, and after each reconnect, so a server restarted without its data learns it
//!   again. Dropping the inbox removes the member and deletes the queue's lists, as
//!   kombu does when it deletes an auto-delete queue.
//! - **Filtering.** An event inbox's `PSUBSCRIBE` glob (`worker.#` → `worker.*`) can match
//!   more than the AMQP topic pattern it stands for (`task.*` also matches `task.a.b`), so
//!   events are checked against the binding with [`topic_matches`] too.
//! - **Malformed messages are skipped**: anything that is not JSON, not an envelope, or not
//!   `application/json` is logged (`warn`) and the inbox goes on with the next message.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::broadcast::{
    Broadcast, Broadcasted, CONTROL_EXCHANGE, EVENT_EXCHANGE, Inbox, REPLY_EXCHANGE, envelope,
    topic_matches,
};
use celeriac_core::protocol::new_id;
use celeriac_core::{BoxFuture, Error, Result};
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Inner;
use crate::conn::{Backoff, Redis, is_connection_error, master_switch};
use crate::keys::{BrokerKeys, SEP, event_queue, pidbox_queue, reply_queue};
use crate::scripts;

/// How long a binding table lives without a refresh (kombu 5.7: `max(2 × x-expires, 1 h)`,
/// an hour for Celery's pidbox, reply and event queues).
const BINDING_TTL: Duration = Duration::from_secs(3600);

/// How often a live inbox refreshes its binding (kombu: a third of the time to live).
const BINDING_REFRESH: Duration = Duration::from_secs(1200);

/// Celery's `control_queue_expires`: how long a reply list outlives its last reader.
const REPLY_EXPIRES: Duration = Duration::from_secs(10);

/// How long one wait for a reply blocks on the server (kombu's `brpop_timeout`).
const REPLY_WAIT: Duration = Duration::from_secs(1);

/// How long a reply connection's replies may take (a wait, plus slack).
const REPLY_RESPONSE_TIMEOUT: Duration = Duration::from_secs(11);

/// How long opening and subscribing a pub/sub connection may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pub/sub connection may stay silent before it is pinged (kombu's
/// `health_check_interval`).
const HEALTH_CHECK: Duration = Duration::from_secs(25);

/// How long a ping may take before the connection is taken for dead.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

impl Broadcast for Inner {
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = pidbox_queue(node);
            let member = BrokerKeys::binding_member("", &queue);
            let binding = Binding::bind(self, CONTROL_EXCHANGE, member, queue).await?;
            let pattern = self.keys.fanout_pattern(CONTROL_EXCHANGE, "");
            let inbox = Listener::open(self, "control", pattern, None, binding).await?;
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.publish_fanout(CONTROL_EXCHANGE, message, "broadcast a control request")
                .await
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            self.check_open()?;
            let key = new_id();
            let queue = reply_queue(&key);
            let member = BrokerKeys::binding_member(&key, &queue);
            let lists = self.keys.lists(&queue).to_vec();
            let binding = Binding::bind(self, REPLY_EXCHANGE, member, queue).await?;
            let conn_switches = self.redis.switch_count();
            let conn = self
                .redis
                .dedicated(REPLY_RESPONSE_TIMEOUT)
                .await
                .map_err(|e| self.redis.error("open a redis reply queue connection", e))?;
            let inbox = Replies {
                redis: self.redis.clone(),
                lists: lists.into(),
                conn: Some(conn),
                conn_switches,
                pending: None,
                closed: self.closed.subscribe(),
                bound: binding,
            };
            Ok((key, Box::new(inbox) as Box<dyn Inbox>))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let table = self.keys.binding(REPLY_EXCHANGE);
            let table = &table;
            let members: Vec<String> = self
                .redis
                .run("read the redis reply bindings", |mut c| async move {
                    redis::cmd("SMEMBERS").arg(table).query_async(&mut c).await
                })
                .await?;
            let queues = direct_lookup(&members, &message.routing_key);
            if queues.is_empty() {
                // kombu drops a message a direct exchange cannot route: nobody waits for it.
                tracing::debug!(
                    routing_key = %message.routing_key,
                    "no redis reply queue is bound for this reply; dropped"
                );
                return Ok(());
            }
            let bytes = envelope::encode(message, REPLY_EXCHANGE);
            let keys = &self.keys;
            self.redis
                .run("send a control reply to redis", |mut c| {
                    let mut pipe = redis::pipe();
                    for q in &queues {
                        // Priority 0: the bare list, where kombu's `_put` files it.
                        pipe.lpush(keys.list(q, 0), &bytes).ignore();
                    }
                    async move { pipe.query_async::<()>(&mut c).await }
                })
                .await
        })
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.publish_fanout(EVENT_EXCHANGE, message, "send an event")
                .await
        })
    }

    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a serde_json::Map<String, serde_json::Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let bytes =
                envelope::encode_json(routing_key, headers, body.as_bytes(), EVENT_EXCHANGE);
            self.publish_encoded(EVENT_EXCHANGE, routing_key, bytes, "send an event")
                .await
        })
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = event_queue(&new_id());
            let member = BrokerKeys::binding_member(binding, &queue);
            let bound = Binding::bind(self, EVENT_EXCHANGE, member, queue).await?;
            let pattern = self.keys.fanout_pattern(EVENT_EXCHANGE, binding);
            let inbox =
                Listener::open(self, "event", pattern, Some(binding.to_owned()), bound).await?;
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }
}

impl Inner {
    /// kombu's `_put_fanout`: `PUBLISH` the envelope on the exchange's channel for the
    /// message's routing key.
    async fn publish_fanout(
        &self,
        exchange: &str,
        message: &Broadcasted,
        what: &str,
    ) -> Result<()> {
        let bytes = envelope::encode(message, exchange);
        self.publish_encoded(exchange, &message.routing_key, bytes, what)
            .await
    }

    /// `PUBLISH`es an encoded envelope on the exchange's channel for `routing_key`.
    async fn publish_encoded(
        &self,
        exchange: &str,
        routing_key: &str,
        bytes: Vec<u8>,
        what: &str,
    ) -> Result<()> {
        let channel = self.keys.fanout_channel(exchange, routing_key);
        let (channel, bytes) = (&channel, &bytes);
        self.broadcasts
            .run(what, |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(bytes)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }
}

/// kombu's `DirectExchange.lookup`: the queues of the binding members (`routing_key SEP
/// pattern SEP queue`) whose routing key is `routing_key`, each once.
fn direct_lookup(members: &[String], routing_key: &str) -> Vec<String> {
    let mut queues: Vec<String> = members
        .iter()
        .filter_map(|m| {
            let mut parts = m.splitn(3, SEP);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(rk), Some(_), Some(queue)) if rk == routing_key && !queue.is_empty() => {
                    Some(queue.to_owned())
                }
                _ => None,
            }
        })
        .collect();
    queues.sort_unstable();
    queues.dedup();
    queues
}

/// An inbox's queue binding: made before the inbox is handed out, refreshed while it lives,
/// removed (with the queue's lists) when it is dropped.
#[derive(Debug)]
struct Binding {
    redis: Arc<Redis>,
    keys: Arc<BrokerKeys>,
    exchange: &'static str,
    member: String,
    queue: String,
    refresher: JoinHandle<()>,
}

impl Binding {
    async fn bind(
        broker: &Inner,
        exchange: &'static str,
        member: String,
        queue: String,
    ) -> Result<Binding> {
        let (redis, keys) = (broker.redis.clone(), broker.keys.clone());
        bind_expiring(&redis, &keys, exchange, &member).await?;
        let refresher = {
            let (redis, keys, member) = (redis.clone(), keys.clone(), member.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(BINDING_REFRESH).await;
                    if let Err(e) = bind_expiring(&redis, &keys, exchange, &member).await {
                        tracing::warn!(url = %redis.url, error = %e, exchange,
                            "cannot refresh a redis broadcast binding; will retry");
                    }
                }
            })
        };
        Ok(Binding {
            redis,
            keys,
            exchange,
            member,
            queue,
            refresher,
        })
    }

    /// Binds again after a lost connection: a server that restarted without its data has
    /// forgotten the binding, and replies would find no queue. Failures are logged; the
    /// periodic refresh tries again.
    async fn renew(&self) {
        if let Err(e) = bind_expiring(&self.redis, &self.keys, self.exchange, &self.member).await {
            tracing::warn!(url = %self.redis.url, error = %e, exchange = self.exchange,
                "cannot renew a redis broadcast binding; will retry");
        }
    }
}

/// Adds `member` to `exchange`'s binding table and moves the table's deadline
/// ([`scripts::BIND_EXPIRING`]).
async fn bind_expiring(
    redis: &Redis,
    keys: &BrokerKeys,
    exchange: &str,
    member: &str,
) -> Result<()> {
    let (table, deadlines) = (keys.binding(exchange), keys.binding_deadlines());
    let (table, deadlines) = (&table, &deadlines);
    redis
        .run("bind a redis broadcast queue", |mut c| async move {
            scripts::BIND_EXPIRING
                .key(table)
                .key(deadlines)
                .arg(member)
                .arg(exchange)
                .arg(BINDING_TTL.as_millis() as u64)
                .invoke_async::<()>(&mut c)
                .await
        })
        .await
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.refresher.abort();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (redis, keys) = (self.redis.clone(), self.keys.clone());
        let (exchange, member, queue) = (
            self.exchange,
            std::mem::take(&mut self.member),
            std::mem::take(&mut self.queue),
        );
        // kombu's `_delete` of an auto-delete queue: the member leaves both tables, the lists
        // go.
        runtime.spawn(async move {
            let r = redis
                .run_once("unbind a redis broadcast queue", |mut c| {
                    let mut pipe = redis::pipe();
                    pipe.srem(keys.binding(exchange), &member)
                        .ignore()
                        .srem(keys.binding_permanent(exchange), &member)
                        .ignore();
                    for list in keys.lists(&queue) {
                        pipe.del(list).ignore();
                    }
                    async move { pipe.query_async::<()>(&mut c).await }
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, exchange, "cannot remove a redis broadcast binding");
            }
        });
    }
}

/// A control or event inbox: a pub/sub connection with one `PSUBSCRIBE` pattern.
struct Listener {
    redis: Arc<Redis>,
    /// `control` or `event`, for logs.
    what: &'static str,
    pattern: String,
    /// The topic pattern received messages must match (event inboxes).
    binding: Option<String>,
    /// The prefix of the channels, `<global_keyprefix>/<db>.`, for reading a routing key
    /// from a channel name.
    channel_prefix: String,
    sub: Option<Subscription>,
    backoff: Backoff,
    closed: watch::Receiver<bool>,
    bound: Binding,
}

struct Subscription {
    sink: PubSubSink,
    stream: PubSubStream,
    /// When the connection last showed it is alive (a message or a pong).
    alive_at: Instant,
    /// With Sentinel: told when the master moves (the subscription is then renewed there).
    switches: Option<watch::Receiver<u64>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroadcastInbox")
            .field("what", &self.what)
            .field("pattern", &self.pattern)
            .field("subscribed", &self.sub.is_some())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Subscribes; returns once the server has confirmed the subscription.
    async fn open(
        broker: &Inner,
        what: &'static str,
        pattern: String,
        binding: Option<String>,
        bound: Binding,
    ) -> Result<Listener> {
        let sub = subscribe(&broker.redis, &pattern).await.map_err(|e| {
            broker
                .redis
                .error(&format!("subscribe to redis {what} messages"), e)
        })?;
        Ok(Listener {
            redis: broker.redis.clone(),
            what,
            pattern,
            binding,
            channel_prefix: broker.keys.fanout_channel("", ""),
            sub: Some(sub),
            backoff: Backoff::new(),
            closed: broker.closed.subscribe(),
            bound,
        })
    }

    /// A message received on `channel`, if it is a good one for this inbox.
    fn read(&self, channel: &str, payload: &[u8]) -> Option<Broadcasted> {
        if payload.is_empty() {
            // kombu ignores empty payloads too.
            return None;
        }
        let mut m = match envelope::decode(payload) {
            Ok((_, m)) => m,
            Err(e) => {
                tracing::warn!(channel, error = %e, payload = %preview(payload),
                    "skipping a malformed redis {} message", self.what);
                return None;
            }
        };
        if m.routing_key.is_empty() {
            // kombu routes by channel; the envelope's routing key is what its consumers read,
            // but a message without one still has the channel's.
            if let Some(rk) = channel_routing_key(channel, &self.channel_prefix) {
                m.routing_key = rk.to_owned();
            }
        }
        if let Some(b) = &self.binding {
            if !topic_matches(b, &m.routing_key) {
                return None;
            }
        }
        Some(m)
    }
}

/// Opens a pub/sub connection and `PSUBSCRIBE`s `pattern`, confirmed.
async fn subscribe(redis: &Redis, pattern: &str) -> redis::RedisResult<Subscription> {
    let r = async {
        let mut switches = redis.switches();
        if let Some(rx) = &mut switches {
            rx.borrow_and_update();
        }
        let (mut sink, stream) = redis.pubsub().await?.split();
        sink.psubscribe(pattern).await?;
        Ok(Subscription {
            sink,
            stream,
            alive_at: Instant::now(),
            switches,
        })
    };
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, r).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "redis subscription timed out",
        ))),
    }
}

/// The routing key in a fanout channel name (`<prefix>/<db>.<exchange>/<routing key>`).
fn channel_routing_key<'c>(channel: &'c str, channel_prefix: &str) -> Option<&'c str> {
    channel
        .strip_prefix(channel_prefix)?
        .split_once('/')
        .map(|(_, rk)| rk)
}

/// Whether the broker is closed (or gone: then nobody can close it any more).
fn is_closed(closed: &watch::Receiver<bool>) -> bool {
    *closed.borrow() || closed.has_changed().is_err()
}

/// Resolves when the broker closes (or is gone).
async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await;
}

/// The start of a payload, for a log line.
fn preview(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(&payload[..payload.len().min(200)]);
    if payload.len() > 200 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

impl Inbox for Listener {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move {
            let mut closed = self.closed.clone();
            loop {
                if is_closed(&closed) {
                    return Ok(None);
                }
                let Some(sub) = &mut self.sub else {
                    match subscribe(&self.redis, &self.pattern).await {
                        Ok(s) => {
                            tracing::info!(url = %self.redis.url, pattern = %self.pattern,
                                "redis {} inbox subscribed again", self.what);
                            self.sub = Some(s);
                            self.backoff = Backoff::new();
                            self.bound.renew().await;
                        }
                        Err(e) => {
                            let delay = self.backoff.next_delay();
                            tracing::warn!(url = %self.redis.url, error = %e,
                                retry_in_ms = delay.as_millis() as u64,
                                "redis {} inbox cannot subscribe; retrying", self.what);
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                () = closing(&mut closed) => return Ok(None),
                            }
                        }
                    }
                    continue;
                };
                let check_at = sub.alive_at + HEALTH_CHECK;
                tokio::select! {
                    msg = sub.stream.next() => match msg {
                        Some(msg) => {
                            sub.alive_at = Instant::now();
                            let channel = msg.get_channel_name().to_owned();
                            if let Some(m) = self.read(&channel, msg.get_payload_bytes()) {
                                return Ok(Some(m));
                            }
                        }
                        None => {
                            tracing::warn!(url = %self.redis.url,
                                "redis {} inbox lost its connection; reconnecting (messages published meanwhile are lost)",
                                self.what);
                            self.sub = None;
                        }
                    },
                    () = tokio::time::sleep_until(check_at) => {
                        match tokio::time::timeout(PING_TIMEOUT, sub.sink.ping::<redis::Value>()).await {
                            Ok(Ok(_)) => sub.alive_at = Instant::now(),
                            Ok(Err(e)) if !is_connection_error(&e) => sub.alive_at = Instant::now(),
                            _ => {
                                tracing::warn!(url = %self.redis.url,
                                    "redis {} inbox's connection does not answer; reconnecting",
                                    self.what);
                                self.sub = None;
                            }
                        }
                    }
                    () = master_switch(&mut sub.switches) => {
                        tracing::info!(url = %self.redis.url,
                            "redis {} inbox follows the new master (messages published meanwhile are lost)",
                            self.what);
                        self.sub = None;
                    }
                    () = closing(&mut closed) => return Ok(None),
                }
            }
        })
    }
}

/// A reply inbox: `BRPOP` on the reply queue's lists, on a connection of its own.
struct Replies {
    redis: Arc<Redis>,
    lists: Arc<[String]>,
    conn: Option<MultiplexedConnection>,
    /// The Sentinel master switch count `conn` was opened at (always 0 without Sentinel).
    conn_switches: u64,
    /// The wait in flight, kept across cancelled `next()` calls.
    pending: Option<JoinHandle<redis::RedisResult<Option<Vec<u8>>>>>,
    closed: watch::Receiver<bool>,
    bound: Binding,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisReplyInbox")
            .field("list", &self.lists.first())
            .finish_non_exhaustive()
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }
}

/// One wait for a reply: `BRPOP` over the lists for up to [`REPLY_WAIT`], then the lists'
/// expiry renewed (in the same round trip).
async fn wait_reply(
    mut conn: MultiplexedConnection,
    lists: Arc<[String]>,
) -> redis::RedisResult<Option<Vec<u8>>> {
    let mut pipe = redis::pipe();
    pipe.cmd("BRPOP").arg(&*lists).arg(REPLY_WAIT.as_secs());
    for l in lists.iter() {
        pipe.pexpire(l, REPLY_EXPIRES.as_millis() as i64).ignore();
    }
    let (popped,): (Option<(Vec<u8>, Vec<u8>)>,) = pipe.query_async(&mut conn).await?;
    Ok(popped.map(|(_, v)| v))
}

impl Inbox for Replies {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move {
            let mut closed = self.closed.clone();
            let mut backoff = Backoff::new();
            loop {
                if is_closed(&closed) {
                    return Ok(None);
                }
                if self.pending.is_none() && self.conn_switches != self.redis.switch_count() {
                    // A Sentinel failover: wait on the new master.
                    self.conn = None;
                }
                let switches_now = self.redis.switch_count();
                let pending = match &mut self.pending {
                    Some(p) => p,
                    None => {
                        let conn = match &self.conn {
                            Some(c) => c.clone(),
                            None => match self.redis.dedicated(REPLY_RESPONSE_TIMEOUT).await {
                                Ok(c) => {
                                    self.conn_switches = switches_now;
                                    self.bound.renew().await;
                                    self.conn.insert(c).clone()
                                }
                                Err(e) => {
                                    self.lost(&e, &mut backoff, &mut closed).await;
                                    continue;
                                }
                            },
                        };
                        self.pending
                            .insert(tokio::spawn(wait_reply(conn, self.lists.clone())))
                    }
                };
                let r = tokio::select! {
                    r = pending => r,
                    () = closing(&mut closed) => return Ok(None),
                };
                self.pending = None;
                match r {
                    Ok(Ok(Some(raw))) => match envelope::decode(&raw) {
                        Ok((_, m)) => return Ok(Some(m)),
                        Err(e) => {
                            tracing::warn!(list = %self.lists[0], error = %e, payload = %preview(&raw),
                                "skipping a malformed redis control reply");
                        }
                    },
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) if is_connection_error(&e) => {
                        self.conn = None;
                        self.lost(&e, &mut backoff, &mut closed).await;
                    }
                    Ok(Err(e)) => {
                        return Err(self.redis.error("wait for control replies", e));
                    }
                    Err(e) => {
                        return Err(Error::broker(format!(
                            "redis reply wait ended unexpectedly: {e}"
                        )));
                    }
                }
            }
        })
    }
}

impl Replies {
    /// Logs a lost connection and waits before the next attempt (less when the broker
    /// closes meanwhile: the caller then sees it closed).
    async fn lost(
        &self,
        e: &redis::RedisError,
        backoff: &mut Backoff,
        closed: &mut watch::Receiver<bool>,
    ) {
        let delay = backoff.next_delay();
        tracing::warn!(url = %self.redis.url, error = %e, retry_in_ms = delay.as_millis() as u64,
            "redis reply inbox lost its connection; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = closing(closed) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_to_the_queues_bound_under_their_key() {
        let members = [
            BrokerKeys::binding_member("k1", "k1.reply.celery.pidbox"),
            BrokerKeys::binding_member("k2", "k2.reply.celery.pidbox"),
            BrokerKeys::binding_member("k1", "k1.reply.celery.pidbox"),
            BrokerKeys::binding_member("k1", "other"),
            "garbage".to_owned(),
            format!("k1{SEP}{SEP}"),
        ];
        assert_eq!(
            direct_lookup(&members, "k1"),
            ["k1.reply.celery.pidbox", "other"]
        );
        assert!(direct_lookup(&members, "k3").is_empty());
        assert!(direct_lookup(&members, "").is_empty());
    }

    #[test]
    fn routing_keys_read_from_channels() {
        let keys = BrokerKeys::new("pfx:", 3);
        let prefix = keys.fanout_channel("", "");
        assert_eq!(prefix, "pfx:/3.");
        let ch = keys.fanout_channel(EVENT_EXCHANGE, "task.multi");
        assert_eq!(channel_routing_key(&ch, &prefix), Some("task.multi"));
        let ch = keys.fanout_channel(CONTROL_EXCHANGE, "");
        assert_eq!(channel_routing_key(&ch, &prefix), None);
        assert_eq!(channel_routing_key("other/3.celeryev/x", &prefix), None);
    }
}
