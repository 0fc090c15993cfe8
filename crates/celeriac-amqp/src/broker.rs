//! [`AmqpBroker`]: task queues on RabbitMQ, declared as Celery declares them.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use celeriac_core::broadcast::Broadcast;
use celeriac_core::broker::{
    Acker, BoxFuture, Capabilities, ConsumeOptions, Consumer, Delivery, PublishOptions, QueueStats,
    Requeue,
};
use celeriac_core::protocol::envelope;
use celeriac_core::{Broker, Config, Error, ErrorKind, Message, Result};
use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::broadcast::AmqpBroadcast;
use crate::conn::{self, Publisher, Servers, broker_error, confirmed, is_not_found};
use crate::fields::{from_table, to_table};
use crate::options::{AmqpOptions, PublishConfirms, QueueType};
use crate::wire::{
    Channel, Connection, Delivery as WireDelivery, FieldTable, FieldValue, Properties, QueueDeclare,
};

/// Header holding a delayed message's due time (Unix ms); ours, removed before decoding.
pub(crate) const NOT_BEFORE: &str = "celeriac-not-before";
/// Header counting redeliveries made by `reject(After)`; ours, removed before decoding.
const REDELIVERIES: &str = "celeriac-redeliveries";
/// How long an unused delay queue outlives its TTL before RabbitMQ deletes it.
const DELAY_QUEUE_SPARE: u64 = 60_000;
/// How many times an operation reconnects before it fails.
const ATTEMPTS: u32 = 8;
/// How long a consumer holds an ack back to send it with others (`basic.ack multiple`).
const ACK_DELAY: Duration = Duration::from_millis(2);

/// A RabbitMQ broker speaking Celery's AMQP conventions. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::Broker as _;
/// let broker = celeriac_amqp::AmqpBroker::connect(
///     "amqp://guest:guest@127.0.0.1:5672//",
///     &celeriac_core::Config::default(),
/// )
/// .await?;
/// broker.declare("celery").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.inner.servers.options().redacted)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The settings and the servers, with the one connections go to now.
    servers: Arc<Servers>,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    declared: Mutex<BTreeSet<String>>,
    /// Target queue → the delay queues this process published to.
    delay_queues: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Queue → (received but not yet handed to a caller, handed out and not yet settled).
    local: Mutex<HashMap<String, (u64, u64)>>,
    /// Deliveries received and not yet handed to a caller, by address, so `purge` can drop
    /// them too (they count as ready).
    buffered: Mutex<HashMap<usize, std::sync::Weak<LeaseState>>>,
    /// Remote control and events (their own connections).
    broadcast: AmqpBroadcast,
    /// Publishes not yet confirmed under `publish_confirms=pipelined`.
    pipeline: Mutex<Pipeline>,
    closed: watch::Sender<bool>,
}

/// The messages `publish` returned for before RabbitMQ confirmed them
/// ([`PublishConfirms::Pipelined`]), kept to publish again after a lost connection, and the
/// refusals not yet reported.
#[derive(Default)]
struct Pipeline {
    /// Oldest first.
    in_flight: VecDeque<InFlight>,
    /// Task ids (correlation ids) RabbitMQ refused, to report.
    refused: Vec<String>,
}

/// One message waiting for its confirm.
struct InFlight {
    routing_key: String,
    properties: Properties,
    body: Vec<u8>,
    confirm: oneshot::Receiver<bool>,
}

impl InFlight {
    fn id(&self) -> String {
        self.properties.correlation_id.clone().unwrap_or_default()
    }
}

impl Pipeline {
    /// Drops the confirmed messages at the front and notes the refused ones; `true` when a
    /// message's confirm died with its connection (it must be sent again).
    fn reap(&mut self) -> bool {
        while let Some(front) = self.in_flight.front_mut() {
            match front.confirm.try_recv() {
                Ok(true) => {}
                Ok(false) => {
                    let id = front.id();
                    self.refused.push(id);
                }
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => return true,
            }
            self.in_flight.pop_front();
        }
        false
    }

    /// The error reporting the refusals noted so far (and forgets them).
    fn take_refused(&mut self, queue: &str) -> Option<Error> {
        if self.refused.is_empty() {
            return None;
        }
        let ids = std::mem::take(&mut self.refused);
        Some(
            Error::broker(format!(
                "rabbitmq refused (nacked) {} message(s) published earlier without waiting \
                 (publish_confirms=pipelined), task ids: {}; the message for {queue} was not sent",
                ids.len(),
                ids.join(", ")
            ))
            .transient(),
        )
    }
}

impl AmqpBroker {
    /// Connects to the RabbitMQ at `url` (`amqp://`, `amqps://`, `pyamqp://`), or to the first
    /// reachable server of a `;`-separated list of such URLs, tried in the order of the
    /// config's `broker_failover_strategy` (see [`AmqpOptions`]).
    ///
    /// Fails with [`ErrorKind::Config`] when RabbitMQ refuses the login or the vhost, and with a
    /// transient [`ErrorKind::Broker`] error when no server can be reached.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let options = AmqpOptions::from_url(url, config)?;
        Self::with_options(options).await
    }

    /// Connects with explicit options.
    pub async fn with_options(options: AmqpOptions) -> Result<Self> {
        if options.hosts.is_empty() {
            return Err(Error::config("amqp options name no server"));
        }
        let servers = Servers::new(options);
        let publisher = Publisher::open(&servers, "publisher").await?;
        let closed = watch::channel(false).0;
        Ok(AmqpBroker {
            inner: Arc::new(Inner {
                broadcast: AmqpBroadcast::new(servers.clone(), closed.subscribe()),
                servers,
                publisher: tokio::sync::Mutex::new(Some(publisher)),
                declared: Mutex::new(BTreeSet::new()),
                delay_queues: Mutex::new(HashMap::new()),
                local: Mutex::new(HashMap::new()),
                buffered: Mutex::new(HashMap::new()),
                pipeline: Mutex::new(Pipeline::default()),
                closed,
            }),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &AmqpOptions {
        self.inner.servers.options()
    }

    /// Waits until RabbitMQ confirmed every message published so far, publishing again those
    /// whose connection was lost first; fails when RabbitMQ refused (nacked) any of them, naming
    /// their task ids. Only `publish_confirms=pipelined` leaves anything to wait for (see
    /// [`PublishConfirms`]); [`close`](Broker::close) flushes too.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

// ===== impl Inner =====

impl Inner {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn closed_error(&self) -> Error {
        Error::closed("amqp broker")
    }

    async fn ensure<'g>(&self, guard: &'g mut Option<Publisher>) -> Result<&'g Publisher> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if !guard.as_ref().is_some_and(Publisher::is_open) {
            *guard = Some(conn::reopen_publisher(&self.servers, "publisher", ATTEMPTS).await?);
        }
        Ok(guard.as_ref().expect("publisher just opened"))
    }

    /// Publishes and waits for RabbitMQ's confirm.
    async fn send(&self, routing_key: &str, properties: &Properties, body: &[u8]) -> Result<()> {
        let rx = {
            let mut guard = self.publisher.lock().await;
            let p = self.ensure(&mut guard).await?;
            match p.send("", routing_key, properties, body).await {
                Ok(rx) => rx,
                Err(e) => {
                    *guard = None;
                    return Err(e);
                }
            }
        };
        confirmed(rx, routing_key).await
    }

    /// Publishes without waiting for the confirm ([`PublishConfirms::Pipelined`]): returns once
    /// the message is queued for the socket, keeping it until it is confirmed.
    async fn send_pipelined(
        &self,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<()> {
        let lost = {
            let mut pipe = self.pipeline.lock().expect("pipeline lock");
            let lost = pipe.reap();
            if let Some(e) = pipe.take_refused(routing_key) {
                return Err(e);
            }
            lost
        };
        let mut guard = self.publisher.lock().await;
        let p = self.ensure(&mut guard).await?;
        if lost {
            if let Err(e) = self.resend_lost(p).await {
                *guard = None;
                return Err(e);
            }
        }
        match p.send("", routing_key, properties, body).await {
            Ok(confirm) => {
                self.pipeline
                    .lock()
                    .expect("pipeline lock")
                    .in_flight
                    .push_back(InFlight {
                        routing_key: routing_key.to_owned(),
                        properties: properties.clone(),
                        body: body.to_vec(),
                        confirm,
                    });
                Ok(())
            }
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// Publishes again, on `p`, the kept messages whose confirm died with their connection.
    async fn resend_lost(&self, p: &Publisher) -> Result<()> {
        let lost: Vec<InFlight> = {
            let mut pipe = self.pipeline.lock().expect("pipeline lock");
            let mut dead = Vec::new();
            let mut alive = VecDeque::new();
            for mut m in std::mem::take(&mut pipe.in_flight) {
                match m.confirm.try_recv() {
                    Ok(true) => {}
                    Ok(false) => {
                        let id = m.id();
                        pipe.refused.push(id);
                    }
                    Err(oneshot::error::TryRecvError::Empty) => alive.push_back(m),
                    Err(oneshot::error::TryRecvError::Closed) => dead.push(m),
                }
            }
            pipe.in_flight = alive;
            dead
        };
        if !lost.is_empty() {
            tracing::warn!(
                count = lost.len(),
                "rabbitmq connection lost before it confirmed these messages; publishing them again"
            );
        }
        let mut lost = lost.into_iter();
        while let Some(mut m) = lost.next() {
            match p.send("", &m.routing_key, &m.properties, &m.body).await {
                Ok(confirm) => {
                    m.confirm = confirm;
                    self.pipeline
                        .lock()
                        .expect("pipeline lock")
                        .in_flight
                        .push_back(m);
                }
                Err(e) => {
                    // Keep them for the next attempt.
                    let mut pipe = self.pipeline.lock().expect("pipeline lock");
                    pipe.in_flight.push_front(m);
                    pipe.in_flight.extend(lost);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// See [`AmqpBroker::flush`].
    async fn flush(&self) -> Result<()> {
        let mut rounds = 0;
        loop {
            let waiting: Vec<InFlight> =
                std::mem::take(&mut self.pipeline.lock().expect("pipeline lock").in_flight).into();
            if waiting.is_empty() {
                break;
            }
            let mut lost = false;
            let mut kept = VecDeque::new();
            for mut m in waiting {
                match tokio::time::timeout(conn::CONFIRM_TIMEOUT, &mut m.confirm).await {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => {
                        let id = m.id();
                        self.pipeline
                            .lock()
                            .expect("pipeline lock")
                            .refused
                            .push(id);
                    }
                    Ok(Err(_)) => {
                        lost = true;
                        kept.push_back(m);
                    }
                    Err(_) => {
                        kept.push_back(m);
                    }
                }
            }
            {
                let mut pipe = self.pipeline.lock().expect("pipeline lock");
                kept.extend(std::mem::take(&mut pipe.in_flight));
                pipe.in_flight = kept;
            }
            rounds += 1;
            if !lost || rounds > ATTEMPTS {
                break;
            }
            let mut guard = self.publisher.lock().await;
            let p = self.ensure(&mut guard).await?;
            if let Err(e) = self.resend_lost(p).await {
                *guard = None;
                return Err(e);
            }
        }
        let mut pipe = self.pipeline.lock().expect("pipeline lock");
        if let Some(e) = pipe.take_refused("(flush)") {
            return Err(e);
        }
        if !pipe.in_flight.is_empty() {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "rabbitmq did not confirm {} message(s) published without waiting",
                    pipe.in_flight.len()
                ),
            )
            .transient());
        }
        Ok(())
    }

    /// Publishes every message, then waits for all their confirms: one round trip of confirm
    /// latency for the batch instead of one per message.
    async fn send_many(&self, routing_key: &str, messages: &[(Properties, &[u8])]) -> Result<()> {
        let mut confirms = Vec::with_capacity(messages.len());
        {
            let mut guard = self.publisher.lock().await;
            let p = self.ensure(&mut guard).await?;
            for (properties, body) in messages {
                match p.send("", routing_key, properties, body).await {
                    Ok(rx) => confirms.push(rx),
                    Err(e) => {
                        *guard = None;
                        return Err(e);
                    }
                }
            }
        }
        for rx in confirms {
            confirmed(rx, routing_key).await?;
        }
        Ok(())
    }

    /// A throwaway channel on the publisher's connection, for declares and counts (a 404
    /// closes only this channel).
    async fn admin(&self) -> Result<Channel> {
        let mut guard = self.publisher.lock().await;
        let p = self.ensure(&mut guard).await?;
        match conn::channel(p.connection()).await {
            Ok(ch) => Ok(ch),
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = Map::new();
        let options = self.servers.options();
        match options.queue_type {
            QueueType::Classic => {
                if let Some(p) = options.max_priority {
                    args.insert("x-max-priority".to_owned(), json!(p));
                }
            }
            QueueType::Quorum => {
                args.insert("x-queue-type".to_owned(), json!("quorum"));
            }
        }
        to_table(&args)
    }

    async fn declare(&self, queue: &str) -> Result<()> {
        let ch = self.admin().await?;
        let r = declare_topology(&ch, queue, self.queue_arguments()).await;
        let _ = ch.close().await;
        r?;
        self.declared
            .lock()
            .expect("declared lock")
            .insert(queue.to_owned());
        Ok(())
    }

    async fn declare_if_new(&self, queue: &str) -> Result<()> {
        if self.declared.lock().expect("declared lock").contains(queue) {
            return Ok(());
        }
        self.declare(queue).await
    }

    /// Stores `properties`/`body` for `queue`, delayed until `not_before_ms` when that is in
    /// the future.
    async fn park_or_send(
        &self,
        queue: &str,
        mut properties: Properties,
        body: &[u8],
        not_before_ms: Option<i64>,
    ) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        let Some(due) = not_before_ms.filter(|due| *due > now) else {
            return self.send(queue, &properties, body).await;
        };
        let delay = delay_step((due - now) as u64);
        let dq = format!("celeriac.delay.{queue}.{delay}");
        let mut args = Map::new();
        args.insert("x-message-ttl".to_owned(), json!(delay));
        args.insert("x-dead-letter-exchange".to_owned(), json!(""));
        args.insert("x-dead-letter-routing-key".to_owned(), json!(queue));
        args.insert("x-expires".to_owned(), json!(delay + DELAY_QUEUE_SPARE));
        let ch = self.admin().await?;
        let qa = QueueDeclare {
            durable: true,
            arguments: to_table(&args),
            ..QueueDeclare::default()
        };
        let r = ch.queue_declare(&dq, &qa).await;
        let _ = ch.close().await;
        r.map_err(|e| broker_error("declare delay queue", e))?;
        self.delay_queues
            .lock()
            .expect("delay lock")
            .entry(queue.to_owned())
            .or_default()
            .insert(dq.clone());
        properties
            .headers
            .get_or_insert_with(FieldTable::new)
            .insert(NOT_BEFORE.to_owned(), FieldValue::I64(due));
        self.send(&dq, &properties, body).await
    }

    /// Moves one delivery of `queue` between the local counts.
    fn count(&self, queue: &str, from: Phase, to: Phase) {
        let mut map = self.local.lock().expect("local counts lock");
        let (buffered, handed) = map.entry(queue.to_owned()).or_default();
        for (phase, delta) in [(from, -1i64), (to, 1)] {
            match phase {
                Phase::Buffered => *buffered = buffered.saturating_add_signed(delta),
                Phase::Handed => *handed = handed.saturating_add_signed(delta),
                Phase::New | Phase::Settled => {}
            }
        }
    }

    /// Passive-declares `queue` on a fresh channel: its ready count, or `None` if it is gone.
    async fn ready_count(&self, queue: &str) -> Result<Option<u64>> {
        let ch = self.admin().await?;
        let qa = QueueDeclare {
            passive: true,
            ..QueueDeclare::default()
        };
        let r = ch.queue_declare(queue, &qa).await;
        match r {
            Ok((_, n, _)) => {
                let _ = ch.close().await;
                Ok(Some(u64::from(n)))
            }
            Err(e) => {
                let e = broker_error("passive queue.declare", e);
                if is_not_found(&e) || !ch.is_open() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn known_delay_queues(&self, queue: &str) -> Vec<String> {
        self.delay_queues
            .lock()
            .expect("delay lock")
            .get(queue)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn forget_delay_queue(&self, queue: &str, dq: &str) {
        if let Some(s) = self.delay_queues.lock().expect("delay lock").get_mut(queue) {
            s.remove(dq);
        }
    }
}

/// Rounds a delay in ms down to two significant digits, so a few dozen delay queues per
/// decade serve every delay; the remainder is parked again when the message surfaces early.
pub(crate) fn delay_step(ms: u64) -> u64 {
    if ms < 100 {
        return ms.max(1);
    }
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms / scale * scale
}

/// Declares Celery's entities for `queue`: the direct exchange named like it (durable), the
/// durable queue with `args`, and the binding with the queue name as key.
async fn declare_topology(ch: &Channel, queue: &str, args: FieldTable) -> Result<()> {
    ch.exchange_declare(queue, "direct", true)
        .await
        .map_err(|e| broker_error("exchange.declare", e))?;
    let qa = QueueDeclare {
        durable: true,
        arguments: args,
        ..QueueDeclare::default()
    };
    ch.queue_declare(queue, &qa)
        .await
        .map_err(|e| broker_error("queue.declare", e))?;
    ch.queue_bind(queue, queue, queue)
        .await
        .map_err(|e| broker_error("queue.bind", e))?;
    Ok(())
}

/// The AMQP properties of a task message, as Celery sets them (celery-wire.md §2.2, §8.2).
pub(crate) fn properties_of(message: &Message, priority: Option<u8>) -> Result<Properties> {
    let headers = match serde_json::to_value(&message.headers)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let mut p = Properties {
        content_type: Some(message.content_type.clone()),
        content_encoding: Some(message.content_encoding.clone()),
        headers: Some(to_table(&headers)),
        delivery_mode: Some(message.properties.delivery_mode.clamp(1, 2)),
        // Celery sends 0 when no priority was given.
        priority: Some(priority.or(message.properties.priority).unwrap_or(0)),
        correlation_id: Some(message.properties.correlation_id.clone()),
        ..Properties::default()
    };
    // As Celery: the broker may drop the message at its expiry (the worker also checks).
    if let Some(expires) = message.headers.expires {
        let ms = (expires - Utc::now()).num_milliseconds().max(0);
        p.expiration = Some(ms.to_string());
    }
    p.reply_to = message.properties.reply_to.clone();
    Ok(p)
}

// ===== impl Broker =====

impl Broker for AmqpBroker {
    fn driver(&self) -> &'static str {
        "amqp"
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::all();
        c.priority = self.inner.servers.options().max_priority.is_some();
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.declare(queue))
    }

    fn publish<'a>(
        &'a self,
        queue: &'a str,
        message: &'a Message,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.inner.declare_if_new(queue).await?;
            let props = properties_of(message, options.priority)?;
            let due = options
                .not_before
                .map(|t| t.timestamp_millis())
                .filter(|due| *due > Utc::now().timestamp_millis());
            if due.is_none()
                && self.inner.servers.options().publish_confirms == PublishConfirms::Pipelined
            {
                return self
                    .inner
                    .send_pipelined(queue, &props, &message.body)
                    .await;
            }
            self.inner
                .park_or_send(queue, props, &message.body, due)
                .await
        })
    }

    fn publish_batch<'a>(
        &'a self,
        queue: &'a str,
        messages: &'a [(Message, PublishOptions)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(());
            }
            self.inner.declare_if_new(queue).await?;
            // Every message is encoded before the first is sent: a bad one sends nothing.
            let mut ready = Vec::with_capacity(messages.len());
            let mut delayed = Vec::new();
            let now = Utc::now();
            for (m, o) in messages {
                let props = properties_of(m, o.priority)?;
                match o.not_before.filter(|t| *t > now) {
                    Some(t) => delayed.push((props, m.body.as_slice(), t.timestamp_millis())),
                    None => ready.push((props, m.body.as_slice())),
                }
            }
            self.inner.send_many(queue, &ready).await?;
            for (props, body, due) in delayed {
                self.inner
                    .park_or_send(queue, props, body, Some(due))
                    .await?;
            }
            Ok(())
        })
    }

    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(self.inner.closed_error());
            }
            for q in queues {
                self.inner.declare_if_new(q).await?;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let inner = self.inner.clone();
            let queues = queues.to_vec();
            tokio::spawn(run_consumer(inner, queues, options, tx));
            Ok(Box::new(AmqpConsumer { rx }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let mut total = 0;
            let mut targets = vec![queue.to_owned()];
            targets.extend(self.inner.known_delay_queues(queue));
            for (i, q) in targets.iter().enumerate() {
                let ch = self.inner.admin().await?;
                match ch.queue_purge(q).await {
                    Ok(n) => {
                        total += u64::from(n);
                        let _ = ch.close().await;
                    }
                    Err(e) => {
                        let e = broker_error("queue.purge", e);
                        if !is_not_found(&e) && ch.is_open() {
                            return Err(e);
                        }
                        if i > 0 {
                            self.inner.forget_delay_queue(queue, q);
                        }
                    }
                }
            }
            // Prefetched deliveries not yet handed out count as ready, so they go too.
            let held: Vec<Arc<LeaseState>> = self
                .inner
                .buffered
                .lock()
                .expect("buffered lock")
                .values()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|s| s.queue == queue)
                .collect();
            for s in held {
                if s.advance(Phase::Buffered, Phase::Settled) {
                    s.changed.notify_one();
                    let _ = s.channel.basic_reject(s.tag, false).await;
                    total += 1;
                }
            }
            Ok(total)
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            let ready = self.inner.ready_count(queue).await?.unwrap_or(0);
            let (buffered, unacked) = self
                .inner
                .local
                .lock()
                .expect("local counts lock")
                .get(queue)
                .copied()
                .unwrap_or_default();
            // Prefetched deliveries not yet handed to a caller are ready as far as callers
            // can tell (RabbitMQ counts them unacked).
            let ready = ready + buffered;
            let mut delayed = 0;
            for dq in self.inner.known_delay_queues(queue) {
                match self.inner.ready_count(&dq).await? {
                    Some(n) => delayed += n,
                    None => self.inner.forget_delay_queue(queue, &dq),
                }
            }
            Ok(QueueStats::new(ready, delayed, unacked))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(self.inner.closed_error());
            }
            Ok(self
                .inner
                .declared
                .lock()
                .expect("declared lock")
                .iter()
                .cloned()
                .collect())
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Messages published without waiting are confirmed (or reported) first.
            let flushed = self.inner.flush().await;
            self.inner.closed.send_replace(true);
            if let Some(p) = self.inner.publisher.lock().await.take() {
                p.close().await;
            }
            self.inner.broadcast.close().await;
            flushed
        })
    }

    fn broadcast(&self) -> Option<&dyn Broadcast> {
        Some(&self.inner.broadcast)
    }
}

// ===== consumer =====

/// Deliveries from the consumer task; ends (`None`) when the broker closes.
struct AmqpConsumer {
    rx: mpsc::UnboundedReceiver<Result<Buffered>>,
}

/// A delivery waiting in a consumer's buffer, with its settle state.
type Buffered = (Delivery, Arc<LeaseState>);

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        // The consumer task closes its connection, so RabbitMQ requeues these.
        self.rx.close();
        while let Ok(item) = self.rx.try_recv() {
            if let Ok((_, state)) = item {
                state.advance(Phase::Buffered, Phase::Settled);
            }
        }
    }
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer").finish_non_exhaustive()
    }
}

impl Consumer for AmqpConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            match self.rx.recv().await {
                Some(Ok((d, state))) => {
                    if state.advance(Phase::Buffered, Phase::Handed) {
                        Ok(Some(d))
                    } else {
                        // Its lease ran out while it waited here; it was requeued.
                        self.next().await
                    }
                }
                Some(Err(e)) => Err(e),
                None => Ok(None),
            }
        })
    }
}

enum Ended {
    /// The broker closed or the consumer was dropped: stop.
    Done,
    /// The connection or channel was lost, or a consumer cancelled: reconnect.
    Lost,
}

/// Consumes `queues` until the broker closes or the consumer is dropped, reconnecting with
/// backoff whenever the connection or channel is lost.
async fn run_consumer(
    inner: Arc<Inner>,
    queues: Vec<String>,
    options: ConsumeOptions,
    tx: mpsc::UnboundedSender<Result<Buffered>>,
) {
    let mut attempt = 0u32;
    let mut connected_once = false;
    loop {
        match session(
            &inner,
            &queues,
            &options,
            &tx,
            &mut attempt,
            &mut connected_once,
        )
        .await
        {
            Ok(Ended::Done) => return,
            Ok(Ended::Lost) => {
                tracing::warn!(url = %inner.servers.options().redacted, queues = ?queues, "rabbitmq consumer lost its channel; reconnecting");
            }
            Err(e) if e.kind() == ErrorKind::Config && !connected_once => {
                let _ = tx.send(Err(e));
                return;
            }
            Err(e) => {
                tracing::warn!(url = %inner.servers.options().redacted, error = %e, attempt, "rabbitmq consumer failed; reconnecting");
            }
        }
        let mut closed = inner.closed.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(conn::backoff(attempt)) => {}
            _ = conn::closed_signal(&mut closed) => return,
            _ = tx.closed() => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

async fn session(
    inner: &Arc<Inner>,
    queues: &[String],
    options: &ConsumeOptions,
    tx: &mpsc::UnboundedSender<Result<Buffered>>,
    attempt: &mut u32,
    connected_once: &mut bool,
) -> Result<Ended> {
    if inner.is_closed() || tx.is_closed() {
        return Ok(Ended::Done);
    }
    let (connection, host) = conn::open(&inner.servers, "consumer").await?;
    *connected_once = true;
    let result = consume_on(inner, &connection, host, queues, options, tx, attempt).await;
    let _ = connection.close().await;
    result
}

async fn consume_on(
    inner: &Arc<Inner>,
    connection: &Connection,
    host: usize,
    queues: &[String],
    options: &ConsumeOptions,
    tx: &mpsc::UnboundedSender<Result<Buffered>>,
    attempt: &mut u32,
) -> Result<Ended> {
    let ch = conn::channel(connection).await?;
    // Acks are held back up to ACK_DELAY or a quarter of the prefetch, then go out together.
    // RabbitMQ counts held acks as unacked, so they take their room from the prefetch (not
    // added on top): the server never hands this consumer more than `prefetch` deliveries,
    // which also bounds what a killed worker leaves to be redelivered.
    let held = (options.prefetch / 4).clamp(1, 256);
    ch.batch_acks(ACK_DELAY, held);
    let prefetch = u16::try_from(options.prefetch).unwrap_or(u16::MAX);
    // RabbitMQ's "global" QoS is per channel, so the limit holds across all queues of this
    // consumer; quorum queues do not support it (Celery sets global=False for them). With
    // one queue, per consumer is the same limit and cheaper for the server.
    let global = inner.servers.options().queue_type == QueueType::Classic && queues.len() > 1;
    ch.basic_qos(prefetch, global)
        .await
        .map_err(|e| broker_error("basic.qos", e))?;
    let r = consume_loop(inner, connection, host, &ch, queues, options, tx, attempt).await;
    // Acks still held go out before the connection closes (RabbitMQ would requeue them).
    ch.flush_acks();
    r
}

#[allow(clippy::too_many_arguments)]
async fn consume_loop(
    inner: &Arc<Inner>,
    connection: &Connection,
    host: usize,
    ch: &Channel,
    queues: &[String],
    options: &ConsumeOptions,
    tx: &mpsc::UnboundedSender<Result<Buffered>>,
    attempt: &mut u32,
) -> Result<Ended> {
    // `None` marks a consumer that ended (cancelled by the server, channel closed).
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<(String, Option<WireDelivery>)>();
    for q in queues {
        declare_topology(ch, q, inner.queue_arguments()).await?;
        let (_, mut rx) = ch
            .basic_consume(q, false)
            .await
            .map_err(|e| broker_error("basic.consume", e))?;
        let raw_tx = raw_tx.clone();
        let q = q.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if raw_tx.send((q.clone(), Some(m))).is_err() {
                    return;
                }
            }
            let _ = raw_tx.send((q, None));
        });
    }
    drop(raw_tx);
    if *attempt > 0 {
        tracing::info!(url = %inner.servers.url(host), queues = ?queues, "rabbitmq consumer resumed");
    }
    *attempt = 0;
    let mut closed = inner.closed.subscribe();
    let lost = connection.closed();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            _ = conn::closed_signal(&mut closed) => return Ok(Ended::Done),
            _ = tx.closed() => return Ok(Ended::Done),
            _ = &mut lost => return Ok(Ended::Lost),
            m = raw_rx.recv() => {
                // One cancelled consumer (its queue deleted) is enough to start over: the
                // new session re-declares every queue.
                let Some((queue, Some(m))) = m else { return Ok(Ended::Lost) };
                if let Some(d) = to_delivery(inner, ch, &queue, m, options.lease).await? {
                    if tx.send(Ok(d)).is_err() {
                        return Ok(Ended::Done);
                    }
                }
            }
        }
    }
}

/// The raw parts of a delivery, kept to re-publish it on `reject(After)`.
struct Raw {
    properties: Properties,
    body: Vec<u8>,
    redeliveries: u32,
}

/// Turns a RabbitMQ delivery into ours; a message surfacing before its due time (from a
/// rounded-down delay queue) is parked again and `None` returned.
async fn to_delivery(
    inner: &Arc<Inner>,
    ch: &Channel,
    queue: &str,
    m: WireDelivery,
    lease: Option<Duration>,
) -> Result<Option<Buffered>> {
    let properties = m.properties;
    let body = m.body;
    let tag = m.delivery_tag;
    let mut headers = properties
        .headers
        .as_ref()
        .map(from_table)
        .unwrap_or_default();

    if let Some(due) = headers.get(NOT_BEFORE).and_then(Value::as_i64) {
        if due > Utc::now().timestamp_millis() {
            let mut props = properties.clone();
            if let Some(t) = &mut props.headers {
                t.remove(NOT_BEFORE);
            }
            inner.park_or_send(queue, props, &body, Some(due)).await?;
            ch.basic_ack(tag, false)
                .await
                .map_err(|e| broker_error("basic.ack", e))?;
            return Ok(None);
        }
    }
    let counted = headers
        .get(REDELIVERIES)
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let redeliveries = counted.saturating_add(u32::from(m.redelivered));
    headers.retain(|k, _| {
        !(k.starts_with("celeriac-")
            || k == "x-death"
            || k.starts_with("x-first-death")
            || k.starts_with("x-last-death"))
    });

    let mut props = Map::new();
    props.insert(
        "correlation_id".to_owned(),
        json!(properties.correlation_id.clone().unwrap_or_default()),
    );
    if let Some(r) = &properties.reply_to {
        props.insert("reply_to".to_owned(), json!(r));
    }
    props.insert(
        "delivery_mode".to_owned(),
        json!(properties.delivery_mode.unwrap_or(2)),
    );
    props.insert(
        "priority".to_owned(),
        json!(properties.priority.unwrap_or(0)),
    );
    props.insert("body_encoding".to_owned(), json!("base64"));
    let mut env = Map::new();
    env.insert("body".to_owned(), json!(B64.encode(&body)));
    if let Some(ct) = &properties.content_type {
        env.insert("content-type".to_owned(), json!(ct));
    }
    if let Some(ce) = &properties.content_encoding {
        env.insert("content-encoding".to_owned(), json!(ce));
    }
    env.insert("headers".to_owned(), Value::Object(headers));
    env.insert("properties".to_owned(), Value::Object(props));
    let message = match m.malformed {
        // Its properties could not be read whole: not a message we can trust to run.
        Some(why) => Err(Error::protocol(format!(
            "the message's AMQP properties cannot be decoded: {why}"
        ))),
        None => serde_json::to_vec(&Value::Object(env))
            .map_err(Error::from)
            .and_then(|bytes| envelope::decode(&bytes)),
    };
    if let Err(e) = &message {
        tracing::warn!(queue, error = %e, "received a message that is not a valid celery task message");
    }

    let state = Arc::new(LeaseState {
        inner: inner.clone(),
        queue: queue.to_owned(),
        phase: Mutex::new(Phase::New),
        channel: ch.clone(),
        tag,
        deadline: Mutex::new(lease.map(|l| Instant::now() + l)),
        changed: Notify::new(),
    });
    let acker = AmqpAcker {
        inner: inner.clone(),
        channel: ch.clone(),
        tag,
        queue: queue.to_owned(),
        raw: Raw {
            properties,
            body,
            redeliveries,
        },
        state: state.clone(),
    };
    if lease.is_some() {
        tokio::spawn(watch_lease(
            ch.clone(),
            tag,
            queue.to_owned(),
            state.clone(),
        ));
    }
    state.advance(Phase::New, Phase::Buffered);
    inner
        .buffered
        .lock()
        .expect("buffered lock")
        .insert(Arc::as_ptr(&state) as usize, Arc::downgrade(&state));
    let d = Delivery::new(message, queue, redeliveries, Box::new(acker));
    Ok(Some((d, state)))
}

/// A delivery's client-side lease: RabbitMQ has none, so the consumer enforces it.
/// Where a delivery is, for the local counts and so it is settled once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    New,
    Buffered,
    Handed,
    Settled,
}

struct LeaseState {
    inner: Arc<Inner>,
    queue: String,
    phase: Mutex<Phase>,
    channel: Channel,
    tag: u64,
    deadline: Mutex<Option<Instant>>,
    changed: Notify,
}

impl LeaseState {
    /// Moves the delivery from `from` to `to`; `false` if it was elsewhere.
    fn advance(&self, from: Phase, to: Phase) -> bool {
        let mut phase = self.phase.lock().expect("phase lock");
        if *phase != from {
            return false;
        }
        *phase = to;
        self.moved(from, to);
        true
    }

    fn moved(&self, from: Phase, to: Phase) {
        self.inner.count(&self.queue, from, to);
        let key = std::ptr::from_ref(self) as usize;
        if from == Phase::Buffered {
            self.inner
                .buffered
                .lock()
                .expect("buffered lock")
                .remove(&key);
        }
    }

    fn is_settled(&self) -> bool {
        *self.phase.lock().expect("phase lock") == Phase::Settled
    }

    /// Marks the delivery settled, from wherever it is; `false` if it already was.
    fn settle(&self) -> bool {
        let mut phase = self.phase.lock().expect("phase lock");
        if *phase == Phase::Settled {
            return false;
        }
        self.moved(*phase, Phase::Settled);
        *phase = Phase::Settled;
        drop(phase);
        self.changed.notify_one();
        true
    }
}

/// Requeues the delivery when its lease runs out before it is settled.
async fn watch_lease(ch: Channel, tag: u64, queue: String, state: Arc<LeaseState>) {
    loop {
        if state.is_settled() {
            return;
        }
        let Some(deadline) = *state.deadline.lock().expect("lease lock") else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                let current = *state.deadline.lock().expect("lease lock");
                if current.is_some_and(|d| d <= Instant::now()) && state.settle() {
                    tracing::warn!(queue, "lease expired; requeueing the delivery");
                    let _ = ch.basic_reject(tag, true).await;
                    return;
                }
            }
            _ = state.changed.notified() => {}
        }
    }
}

struct AmqpAcker {
    inner: Arc<Inner>,
    channel: Channel,
    tag: u64,
    queue: String,
    raw: Raw,
    state: Arc<LeaseState>,
}

impl fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpAcker")
            .field("queue", &self.queue)
            .field("delivery_tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl AmqpAcker {
    fn settle(&self) -> Result<()> {
        if !self.state.settle() {
            return Err(Error::broker(format!(
                "delivery from {} was already settled or its lease expired (requeued)",
                self.queue
            )));
        }
        Ok(())
    }
}

impl Acker for AmqpAcker {
    /// Held back to go out with other acks (see `ACK_DELAY`); a delivery whose ack dies with
    /// the connection is redelivered, as any unacked delivery.
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle()?;
            self.channel
                .ack_batched(self.tag)
                .map_err(|e| broker_error("basic.ack", e))
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match requeue {
                Requeue::Drop | Requeue::Now => {
                    self.settle()?;
                    self.channel
                        .basic_reject(self.tag, requeue == Requeue::Now)
                        .await
                        .map_err(|e| broker_error("basic.reject", e))
                }
                Requeue::After(delay) => {
                    if self.state.is_settled() {
                        return self.settle();
                    }
                    let mut props = self.raw.properties.clone();
                    props.headers.get_or_insert_with(FieldTable::new).insert(
                        REDELIVERIES.to_owned(),
                        FieldValue::I32(
                            i32::try_from(self.raw.redeliveries.saturating_add(1))
                                .unwrap_or(i32::MAX),
                        ),
                    );
                    let due = Utc::now().timestamp_millis()
                        + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                    // Publish the copy first: a crash in between duplicates, never loses.
                    self.inner
                        .park_or_send(&self.queue, props, &self.raw.body, Some(due))
                        .await?;
                    self.settle()?;
                    self.channel
                        .ack_batched(self.tag)
                        .map_err(|e| broker_error("basic.ack", e))
                }
            }
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut d = self.state.deadline.lock().expect("lease lock");
            if d.is_some() {
                *d = Some(Instant::now() + by);
                drop(d);
                self.state.changed.notify_one();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_steps_never_exceed_the_delay_and_stay_few() {
        assert_eq!(delay_step(0), 1);
        assert_eq!(delay_step(700), 700);
        assert_eq!(delay_step(1234), 1200);
        assert_eq!(delay_step(3_599_999), 3_500_000);
        let steps: BTreeSet<u64> = (1..200_000).map(delay_step).collect();
        assert!(steps.len() < 400, "{} steps", steps.len());
    }
}
