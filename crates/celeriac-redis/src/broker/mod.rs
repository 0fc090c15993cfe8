//! [`RedisBroker`]: kombu's Redis transport, spoken from Rust.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_core::protocol::envelope::{self, RawObject};
use celeriac_core::protocol::new_id;
use celeriac_core::{
    Acker, BoxFuture, Broker, Capabilities, Config, ConsumeOptions, Consumer, Delivery, Error,
    ErrorKind, Message, PublishOptions, QueueStats, Requeue, Result, StoredState,
};
use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backend::decode_meta;
use crate::batch::Batcher;
use crate::conn::{Backoff, Redis, is_connection_error};
use crate::keys::{BrokerKeys, PRIORITY_STEPS, SEP, step_for};
use crate::options::RedisOptions;
use crate::scripts;

const KIND: ErrorKind = ErrorKind::Broker;

/// The longest a consumer waits before it looks at delayed messages, expired leases and the
/// closed flag again.
const MAX_BLOCK: Duration = Duration::from_secs(1);

/// How long an idle consumer waits before it polls when it cannot subscribe to its wake-up
/// channels (the server is probably down; fetching will report it).
const UNSUBSCRIBED_POLL: Duration = Duration::from_millis(20);

/// How long a fetch connection's replies may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(11);

/// The most messages one fetch script takes (bounded further by the free prefetch).
const FETCH_MAX: usize = 128;

/// The most acks one ack script settles.
const ACK_MAX: usize = 512;

/// The shortest a redelivery counter is kept after its last increment (longer when the
/// visibility timeout is: twice that).
const COUNTER_TTL: Duration = Duration::from_secs(7 * 86_400);

/// How often a consumer looks for deliveries whose visibility timeout ran out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The most delayed messages one promotion moves, and deliveries one sweep restores.
const BATCH_LIMIT: usize = 1000;

/// kombu's `unacked_mutex_expire`, in ms.
const MUTEX_EXPIRE_MS: u64 = 300_000;

/// Leases at least this long are written as whole seconds (see [`score`]).
const WHOLE_SECOND_LEASES: Duration = Duration::from_secs(10);

/// The envelope property that carries celeriac's exact priority next to kombu's bucket value.
const EXACT_PRIORITY: &str = "celeriac_priority";

/// A broker on a Redis server, sharing its queues with Python Celery (`redis://host:6379/0`).
///
/// Clones share one connection. See the [crate docs](crate) for the key layout and semantics.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{Broker, ConsumeOptions, Config};
/// use celeriac_redis::RedisBroker;
///
/// let broker = RedisBroker::connect("redis://127.0.0.1:6379/0", &Config::default()).await?;
/// broker.declare("celery").await?;
/// let mut consumer = broker
///     .consume(&["celery".to_owned()], ConsumeOptions::new(8))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: Arc<Redis>,
    keys: Arc<BrokerKeys>,
    visibility_timeout: Duration,
    /// How long a redelivery counter lives after its last increment, in seconds.
    counter_ttl: u64,
    closed: watch::Sender<bool>,
    /// Acks, several per script call under load (see [`Batcher`]).
    acks: Batcher<AckRequest>,
    /// Whether consumers' fetch connections ask for key tracking (cleared when the server
    /// turns out not to have it).
    tracking: AtomicBool,
}

impl RedisBroker {
    /// Connects to the server of a `redis://`, `unix://` (or kombu's `redis+socket://`) URL with
    /// the settings of `config`.
    ///
    /// Fails with [`ErrorKind::Broker`] when the server is unreachable (transient) or refuses
    /// the credentials, or its TLS certificate is not trusted; with
    /// [`ErrorKind::Unsupported`] for `rediss://` when built without the `tls` feature.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::connect_with(url, RedisOptions::from_config(config)).await
    }

    /// Connects with explicit options; a `global_keyprefix` in the URL wins over the options'.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        let opened = Redis::open(url, &options, KIND).await?;
        let redis = Arc::new(opened.redis);
        let keys = Arc::new(BrokerKeys::new(&opened.prefix, opened.db));
        let acks = start_acks(redis.clone(), keys.clone());
        let visibility_timeout = options.get_visibility_timeout();
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                redis,
                keys,
                visibility_timeout,
                counter_ttl: COUNTER_TTL.max(visibility_timeout * 2).as_secs(),
                closed: watch::Sender::new(false),
                acks,
                tracking: AtomicBool::new(true),
            }),
        })
    }

    /// The key prefix in use (kombu's `global_keyprefix`, verbatim).
    pub fn global_keyprefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    fn check_open(&self) -> Result<()> {
        if *self.inner.closed.borrow() {
            Err(Error::closed("redis broker"))
        } else {
            Ok(())
        }
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Unix ms of a chrono time.
fn ms_of(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// celeriac's priority (0..9, higher first) as kombu's `priority` property (0..9, lower
/// first), bucket by bucket: 9 → 0, 7-8 → 3, 4-6 → 6, 0-3 → 9.
///
/// A plain `9 - p` would put 7, 8 and 9 in one bucket, the top one; this map keeps 9 alone on
/// top and the default 0 in the bottom bucket, and writes each bucket's own value so kombu,
/// reading the property, files the message in the same list.
pub(crate) fn kombu_priority(ours: u8) -> u8 {
    match ours.min(9) {
        9 => 0,
        7 | 8 => 3,
        4..=6 => 6,
        _ => 9,
    }
}

/// kombu's `priority` property of a message that carries no exact priority of ours (a Python
/// client's), as celeriac's: a value that maps back to the same bucket. Python's default 0
/// becomes 9, the top.
pub(crate) fn ours_from_kombu(kombu: u8) -> u8 {
    match step_for(kombu) {
        0 => 9,
        3 => 8,
        6 => 6,
        _ => 0,
    }
}

/// The envelope of `message` as kombu writes it, published to `queue` with `priority`
/// (ours); returns the bytes and the list step.
fn encode(message: &Message, queue: &str, priority: u8) -> Result<(Vec<u8>, u8)> {
    let kombu = kombu_priority(priority);
    let bytes = if message.properties.priority == kombu {
        envelope::encode(message, "", queue)?
    } else {
        let mut m = message.clone();
        m.properties.priority = kombu;
        envelope::encode(&m, "", queue)?
    };
    // The envelope ends with the properties object: splice our exact priority into it.
    debug_assert!(bytes.ends_with(b"}}"));
    let mut out = Vec::with_capacity(bytes.len() + 24);
    out.extend_from_slice(&bytes[..bytes.len() - 2]);
    out.extend_from_slice(format!(",\"{EXACT_PRIORITY}\":{priority}}}}}").as_bytes());
    Ok((out, step_for(kombu)))
}

/// Adds the commands that publish `message` to `pipe`; returns whether it is ready now (not
/// delayed), so the caller wakes the queue's consumers.
fn add_publish(
    pipe: &mut redis::Pipeline,
    keys: &BrokerKeys,
    queue: &str,
    message: &Message,
    options: &PublishOptions,
    now_ms: i64,
) -> Result<bool> {
    let priority = options
        .priority
        .unwrap_or(message.properties.priority)
        .min(9);
    let (bytes, step) = encode(message, queue, priority)?;
    match options.not_before {
        Some(t) if ms_of(t) > now_ms => {
            pipe.zadd(keys.delayed(queue), bytes, ms_of(t)).ignore();
            Ok(false)
        }
        _ => {
            pipe.lpush(keys.list(queue, step), bytes).ignore();
            Ok(true)
        }
    }
}

impl RedisBroker {
    /// Publishes `items` to `queue` in one pipeline, with one wake-up notice for idle
    /// consumers if any of them is ready now (not delayed). Several items go in one
    /// transaction, all or none; one item needs none (its wake-up follows it on the same
    /// connection either way), which spares the server a `MULTI` and an `EXEC` per publish.
    async fn send_publishes<'m>(
        &self,
        queue: &str,
        items: impl IntoIterator<Item = (&'m Message, &'m PublishOptions)>,
        what: &str,
    ) -> Result<()> {
        let keys = &self.inner.keys;
        let now = ms_of(chrono::Utc::now());
        let mut pipe = redis::pipe();
        let mut ready = false;
        for (n, (m, o)) in items.into_iter().enumerate() {
            if n == 1 {
                pipe.atomic();
            }
            ready |= add_publish(&mut pipe, keys, queue, m, o, now)?;
        }
        if ready {
            pipe.publish(keys.wake(queue), "").ignore();
        }
        self.inner
            .redis
            .run(what, |mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await
    }
}

impl Broker for RedisBroker {
    fn driver(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::all();
        // Fanout (kombu's pub/sub exchanges) is not implemented by this driver yet.
        c.fanout = false;
        c
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            // What kombu's queue_bind writes for Celery's `Queue(q, Exchange(q), routing_key=q)`.
            let member = BrokerKeys::binding_member(queue, queue);
            let keys = &self.inner.keys;
            self.inner
                .redis
                .run("declare a redis queue", |mut c| {
                    let member = member.clone();
                    async move {
                        redis::pipe()
                            .sadd(keys.binding(queue), &member)
                            .ignore()
                            .sadd(keys.binding_permanent(queue), &member)
                            .ignore()
                            .query_async::<()>(&mut c)
                            .await
                    }
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
            self.send_publishes(queue, [(message, &options)], "publish to redis")
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
            if messages.is_empty() {
                return Ok(());
            }
            let items = messages.iter().map(|(m, o)| (m, o));
            self.send_publishes(queue, items, "publish a batch to redis")
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
                return Err(Error::config("consume needs at least one queue"));
            }
            let probe = options
                .result_probe
                .filter(|p| p.store == self.inner.redis.identity)
                .map(|p| p.key_prefix)
                .unwrap_or_default();
            let shared = Arc::new(ConsumerShared {
                broker: self.inner.clone(),
                lease: options.lease.unwrap_or(self.inner.visibility_timeout),
                probe,
                permits: Arc::new(Semaphore::new(options.prefetch.max(1))),
                fetch: tokio::sync::Mutex::new(FetchState {
                    conn: None,
                    wake: None,
                    pushes: None,
                    lists: queues
                        .iter()
                        .flat_map(|q| self.inner.keys.lists(q))
                        .map(String::into_bytes)
                        .collect(),
                    order: queues.iter().cloned().collect(),
                    next_promote: Instant::now(),
                    next_sweep: Instant::now(),
                }),
            });
            Ok(Box::new(RedisConsumer {
                shared,
                pending: None,
                buffer: VecDeque::new(),
                closed: self.inner.closed.subscribe(),
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let keys = &self.inner.keys;
            let counts: Vec<u64> = self
                .inner
                .redis
                .run("purge a redis queue", |mut c| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    for list in keys.lists(queue) {
                        pipe.llen(&list).del(&list).ignore();
                    }
                    pipe.zcard(keys.delayed(queue))
                        .del(keys.delayed(queue))
                        .ignore();
                    pipe.query_async(&mut c).await
                })
                .await?;
            Ok(counts.iter().sum())
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let keys = &self.inner.keys;
            let counts: Vec<u64> = self
                .inner
                .redis
                .run("count a redis queue", |mut c| async move {
                    let mut pipe = redis::pipe();
                    for list in keys.lists(queue) {
                        pipe.llen(list);
                    }
                    pipe.zcard(keys.delayed(queue));
                    pipe.query_async(&mut c).await
                })
                .await?;
            let ready = counts[..4].iter().sum();
            let delayed = counts[4];
            let unacked = self.count_unacked(queue).await?;
            Ok(QueueStats::new(ready, delayed, unacked))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            let keys = &self.inner.keys;
            let mut names: Vec<String> = self
                .inner
                .redis
                .run("list redis queues", |mut c| async move {
                    let mut sets = Vec::new();
                    let mut cursor: u64 = 0;
                    loop {
                        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(keys.binding_pattern())
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut c)
                            .await?;
                        sets.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                    let mut names = Vec::new();
                    for set in sets {
                        let members: Vec<String> =
                            redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await?;
                        for m in members {
                            if let Some(q) = m.rsplit(SEP).next() {
                                if !q.is_empty() {
                                    names.push(q.to_owned());
                                }
                            }
                        }
                    }
                    Ok(names)
                })
                .await?;
            names.sort();
            names.dedup();
            Ok(names)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.send_replace(true);
            Ok(())
        })
    }
}

impl RedisBroker {
    /// Entries of the `unacked` hash whose routing key is `queue`.
    ///
    /// Exact for task messages (published to the anonymous exchange with the queue as routing
    /// key, as Celery and celeriac do); a message routed through a named exchange with another
    /// routing key is not counted. This reads the whole hash: O(all unacked deliveries).
    async fn count_unacked(&self, queue: &str) -> Result<u64> {
        let key = self.inner.keys.unacked();
        let key = &key;
        self.inner
            .redis
            .run("count unacked redis deliveries", |mut c| async move {
                let mut n = 0u64;
                let mut cursor: u64 = 0;
                loop {
                    let (next, batch): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await?;
                    for (_, v) in batch {
                        if let Ok((_, _, rk)) =
                            serde_json::from_slice::<(serde::de::IgnoredAny, String, String)>(&v)
                        {
                            if rk == queue {
                                n += 1;
                            }
                        }
                    }
                    if next == 0 {
                        return Ok(n);
                    }
                    cursor = next;
                }
            })
            .await
    }
}

// ===== consuming =====

#[derive(Debug)]
struct ConsumerShared {
    broker: Arc<Inner>,
    lease: Duration,
    /// The result key prefix to read each fetched task's state under, when the worker's
    /// backend is on this server (see [`scripts::FETCH`]); empty for none.
    probe: String,
    permits: Arc<Semaphore>,
    /// Held by the one fetch in flight.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Debug)]
struct FetchState {
    /// The connection this consumer fetches on.
    conn: Option<MultiplexedConnection>,
    /// The subscription to the wake-up channels of this consumer's queues.
    wake: Option<Wake>,
    /// The fetch connection's pushes when it has key tracking on: an invalidation says that
    /// someone wrote a list this consumer last found empty (see [`scripts::FETCH`]).
    pushes: Option<mpsc::UnboundedReceiver<redis::PushInfo>>,
    /// The keys of this consumer's lists.
    lists: HashSet<Vec<u8>>,
    /// Queues in kombu's round-robin order: the one just served moves to the end.
    order: VecDeque<String>,
    next_promote: Instant,
    next_sweep: Instant,
}

/// A pub/sub connection subscribed to the wake-up channels of a consumer's queues.
struct Wake {
    /// Kept so the connection stays open.
    _sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake").finish_non_exhaustive()
    }
}

/// A fetched delivery and the flag that, set, makes dropping it give the message back.
type Fetched = (Delivery, Arc<AtomicBool>);

/// A message the fetch script took and recorded, with what the transport read from it.
struct Popped {
    queue: String,
    raw: Vec<u8>,
    /// `raw` decoded.
    message: Result<Message>,
    tag: String,
    /// The lease token (the index score written).
    token: String,
    /// Redeliveries counted by our counter.
    count: u32,
    info: Info,
    /// The task's state, read with the message.
    stored: Option<StoredState>,
}

/// The consumer of [`RedisBroker::consume`].
///
/// Fetching runs in a spawned task whose result is kept across cancelled `next()` calls, so a
/// message taken from Redis is never lost to a dropped future. One fetch takes up to the free
/// prefetch; the deliveries wait here, leased, until `next()` hands them out. When the
/// consumer itself is dropped, messages fetched for it and not handed out go back to the head
/// of their lists.
#[derive(Debug)]
struct RedisConsumer {
    shared: Arc<ConsumerShared>,
    pending: Option<oneshot::Receiver<Result<Vec<Fetched>>>>,
    buffer: VecDeque<Fetched>,
    closed: watch::Receiver<bool>,
}

impl Consumer for RedisConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            if *self.closed.borrow() {
                return Ok(None);
            }
            if let Some((d, _)) = self.buffer.pop_front() {
                return Ok(Some(d));
            }
            let rx = match &mut self.pending {
                Some(rx) => rx,
                None => {
                    let (tx, rx) = oneshot::channel();
                    tokio::spawn(fetch_task(self.shared.clone(), tx));
                    self.pending.insert(rx)
                }
            };
            let mut closed = self.closed.clone();
            tokio::select! {
                r = rx => {
                    self.pending = None;
                    match r {
                        Ok(Ok(batch)) => {
                            self.buffer.extend(batch);
                            Ok(self.buffer.pop_front().map(|(d, _)| d))
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(Error::broker("redis consumer task ended unexpectedly")),
                    }
                }
                _ = closed.wait_for(|c| *c) => Ok(None),
            }
        })
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        // Last fetched first, so that the RPUSHes leave them in their original order.
        for (d, give_back) in self.buffer.drain(..).rev() {
            give_back.store(true, Ordering::Release);
            drop(d);
        }
    }
}

async fn fetch_task(shared: Arc<ConsumerShared>, tx: oneshot::Sender<Result<Vec<Fetched>>>) {
    let r = shared.fetch_batch(&tx).await;
    if let Err(Ok(batch)) = tx.send(r) {
        // Nobody will take them: give them back at the consuming end, as kombu does at shutdown.
        for (d, give_back) in batch.into_iter().rev() {
            give_back.store(true, Ordering::Release);
            drop(d);
        }
    }
}

impl ConsumerShared {
    fn closed(&self) -> bool {
        *self.broker.closed.borrow()
    }

    /// Waits for a free prefetch slot and at least one message, and takes as many as there
    /// are free slots (up to [`FETCH_MAX`]); empty once the broker is closed.
    async fn fetch_batch(
        self: &Arc<Self>,
        tx: &oneshot::Sender<Result<Vec<Fetched>>>,
    ) -> Result<Vec<Fetched>> {
        let mut st = self.fetch.lock().await;
        let mut backoff = Backoff::new();
        loop {
            if self.closed() || tx.is_closed() {
                return Ok(Vec::new());
            }
            self.maintain(&mut st).await;
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.map_err(|_| Error::closed("redis consumer"))?,
                () = tokio::time::sleep(MAX_BLOCK) => continue,
            };
            let mut permits = vec![first];
            while permits.len() < FETCH_MAX {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let block = st
                .next_promote
                .min(st.next_sweep)
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), MAX_BLOCK);
            // Wake-ups that came before this fetch are answered by it.
            let subscribed = st.drain_wake();
            let popped = self.pop(&mut st, permits.len()).await;
            match popped {
                Ok(batch) if batch.is_empty() => {
                    drop(permits);
                    if subscribed {
                        st.wait_wake(block).await;
                    } else {
                        // Subscribe, then fetch again at once: a message published before the
                        // subscription woke nobody.
                        if !self.subscribe(&mut st).await {
                            tokio::time::sleep(UNSUBSCRIBED_POLL.min(block)).await;
                        }
                    }
                }
                Ok(batch) => {
                    if let Some(Popped { queue, .. }) = batch.last() {
                        if let Some(pos) = st.order.iter().position(|q| q == queue) {
                            if let Some(q) = st.order.remove(pos) {
                                st.order.push_back(q);
                            }
                        }
                    }
                    let out: Vec<Fetched> = batch
                        .into_iter()
                        .zip(permits)
                        .map(|(popped, permit)| self.register(popped, permit))
                        .collect();
                    if self.closed() {
                        for (d, give_back) in out.into_iter().rev() {
                            give_back.store(true, Ordering::Release);
                            drop(d);
                        }
                        return Ok(Vec::new());
                    }
                    return Ok(out);
                }
                Err(e) => {
                    st.conn = None;
                    st.pushes = None;
                    st.wake = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        url = %self.broker.redis.url,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "redis consumer lost its connection; reconnecting"
                    );
                    drop(permits);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Opens the wake-up subscription; false when the server cannot be reached.
    async fn subscribe(&self, st: &mut FetchState) -> bool {
        let channels: Vec<String> = st.order.iter().map(|q| self.broker.keys.wake(q)).collect();
        let r = async {
            let pubsub = self.broker.redis.client().get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&channels).await?;
            Ok::<_, redis::RedisError>(Wake {
                _sink: sink,
                stream,
            })
        };
        match tokio::time::timeout(MAX_BLOCK * 5, r).await {
            Ok(Ok(w)) => {
                st.wake = Some(w);
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(url = %self.broker.redis.url, error = %e, "redis consumer cannot subscribe to its wake-up channels");
                false
            }
            Err(_) => false,
        }
    }

    /// Pops up to `want` messages (priority-major, queues in round-robin order) and records
    /// them as unacked, atomically.
    ///
    /// The fetch script reads most envelopes by string search rather than decoding them (see
    /// [`scripts::FETCH`]); this checks each such one as it parses it (which the delivery
    /// needs anyway) and has any that is not kombu's shape re-recorded by the decoding path
    /// before it is handed out, so every `unacked` entry ends up what kombu would write.
    async fn pop(&self, st: &mut FetchState, want: usize) -> redis::RedisResult<Vec<Popped>> {
        let conn = match &mut st.conn {
            Some(c) => c,
            None => {
                let c = self.open_fetch_conn(&mut st.pushes).await?;
                st.conn.insert(c)
            }
        };
        let track = if st.pushes.is_some() { "1" } else { "0" };
        let keys = &self.broker.keys;
        let token = score(self.lease, self.broker.visibility_timeout);
        let mut inv = scripts::FETCH.prepare_invoke();
        inv.key(keys.unacked()).key(keys.unacked_index());
        inv.arg(&token)
            .arg(new_id())
            .arg(want)
            .arg(st.order.len())
            .arg(keys.redelivered_prefix())
            .arg(&self.probe)
            .arg(track);
        let mut queues = Vec::with_capacity(PRIORITY_STEPS.len() * st.order.len());
        for step in PRIORITY_STEPS {
            for q in &st.order {
                inv.key(keys.list(q, step));
                queues.push(q);
            }
        }
        for q in &queues {
            inv.arg(q.as_str());
        }
        let r = inv.invoke_async::<Vec<redis::Value>>(conn).await;
        match r {
            Ok(flat) => {
                let read_at = std::time::Instant::now();
                let mut out = Vec::with_capacity(flat.len() / 7);
                let mut it = flat.into_iter();
                while let (
                    Some(i),
                    Some(raw),
                    Some(tag),
                    Some(count),
                    Some(searched),
                    Some(probed),
                    Some(doc),
                ) = (
                    it.next(),
                    it.next(),
                    it.next(),
                    it.next(),
                    it.next(),
                    it.next(),
                    it.next(),
                ) {
                    let i: usize = redis::from_redis_value(i)?;
                    let raw: Vec<u8> = redis::from_redis_value(raw)?;
                    let mut tag: String = redis::from_redis_value(tag)?;
                    let mut count: u32 = redis::from_redis_value(count)?;
                    let searched: i64 = redis::from_redis_value(searched)?;
                    let probed: String = redis::from_redis_value(probed)?;
                    let doc: Option<Vec<u8>> = redis::from_redis_value(doc)?;
                    let stored = probed_state(probed, doc.as_deref(), read_at);
                    let queue = queues
                        .get(i.saturating_sub(1))
                        .map_or_else(String::new, |q| (*q).clone());
                    // One parse gives both the message and what the transport reads.
                    let (message, info) = match envelope::decode_with_properties(&raw) {
                        Ok((m, props)) => {
                            let info = Info::from_parts(&props, m.headers.extra.get("redelivered"));
                            (Ok(m), info)
                        }
                        Err(e) => (Err(e), Info::read(&raw)),
                    };
                    if searched == 1 && !info.kombu_shape {
                        (tag, count) = self.repair(conn, &tag, &token, &raw, &queue).await?;
                    }
                    out.push(Popped {
                        queue,
                        raw,
                        message,
                        tag,
                        token: token.clone(),
                        count,
                        info,
                        stored,
                    });
                }
                Ok(out)
            }
            Err(e) => {
                if !is_connection_error(&e) {
                    tracing::warn!(url = %self.broker.redis.url, error = %e, "redis fetch failed");
                }
                Err(e)
            }
        }
    }

    /// Opens this consumer's fetch connection. Where the server has key tracking (6.0+) it
    /// speaks RESP3 with tracking on, and `pushes` gets its invalidations: the fetch script
    /// that finds every list empty reads them (see [`scripts::FETCH`]), so a write to any of
    /// them by another client, announced or not, wakes this consumer. `NOLOOP`: its own pops
    /// do not. Elsewhere it is a plain connection and `pushes` is `None`.
    async fn open_fetch_conn(
        &self,
        pushes: &mut Option<mpsc::UnboundedReceiver<redis::PushInfo>>,
    ) -> redis::RedisResult<MultiplexedConnection> {
        *pushes = None;
        let redis = &self.broker.redis;
        if self.broker.tracking.load(Ordering::Relaxed) {
            let (tx, rx) = mpsc::unbounded_channel();
            let refused = match redis.dedicated_resp3(FETCH_TIMEOUT, tx).await {
                Ok(mut c) => {
                    let on = redis::cmd("CLIENT")
                        .arg("TRACKING")
                        .arg("ON")
                        .arg("NOLOOP")
                        .query_async::<()>(&mut c)
                        .await;
                    match on {
                        Ok(()) => {
                            *pushes = Some(rx);
                            return Ok(c);
                        }
                        Err(e) if is_connection_error(&e) => return Err(e),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            // Either the server is down (the plain connection below fails too, and that is the
            // error to report) or it lacks RESP3 or tracking.
            let c = redis.dedicated(FETCH_TIMEOUT).await?;
            self.broker.tracking.store(false, Ordering::Relaxed);
            tracing::info!(
                url = %redis.url,
                error = %refused,
                "redis server has no key tracking (6.0+); idle consumers find messages that \
                 other clients push without a wake-up by polling every second"
            );
            return Ok(c);
        }
        redis.dedicated(FETCH_TIMEOUT).await
    }

    /// Re-records a delivery that the fetch script read by search and that turned out not to
    /// be kombu's shape ([`scripts::REPAIR`]); returns its tag and redelivery count as the
    /// decoding path sees them. Rare: only envelopes that no kombu or celeriac client writes.
    async fn repair(
        &self,
        conn: &mut MultiplexedConnection,
        tag: &str,
        token: &str,
        raw: &[u8],
        queue: &str,
    ) -> redis::RedisResult<(String, u32)> {
        let keys = &self.broker.keys;
        let mut inv = scripts::REPAIR.prepare_invoke();
        inv.key(keys.unacked())
            .key(keys.unacked_index())
            .arg(tag)
            .arg(token)
            .arg(raw)
            .arg(new_id())
            .arg(queue)
            .arg(keys.redelivered_prefix());
        let r: Option<(String, u32)> = inv.invoke_async(conn).await?;
        // None: the lease is already gone (restored by another consumer); keep the tag, whose
        // settling will then report the lost lease as usual.
        Ok(r.unwrap_or_else(|| (tag.to_owned(), 0)))
    }

    /// Builds the delivery of a message [`ConsumerShared::pop`] took and recorded.
    fn register(self: &Arc<Self>, popped: Popped, permit: OwnedSemaphorePermit) -> Fetched {
        let Popped {
            queue,
            raw,
            message,
            tag,
            token,
            count,
            info,
            stored,
        } = popped;
        let message = message.map(|mut m| {
            m.headers.extra.remove("redelivered");
            m.properties.priority = info
                .exact_priority
                .unwrap_or_else(|| ours_from_kombu(info.kombu_priority));
            m
        });
        // Our counter counts every restore and requeue; kombu's flag (a message restored by a
        // Python worker) counts as one.
        let redeliveries = count.max(u32::from(info.redelivered));
        let give_back = Arc::new(AtomicBool::new(false));
        let acker = RedisAcker {
            broker: self.broker.clone(),
            queue: queue.clone(),
            tag,
            token: Mutex::new(token),
            counted: count > 0,
            raw,
            step: step_for(info.kombu_priority),
            permit: Mutex::new(Some(permit)),
            settled: AtomicBool::new(false),
            give_back: give_back.clone(),
        };
        (
            Delivery::new(message, queue, redeliveries, Box::new(acker)).with_stored(stored),
            give_back,
        )
    }

    /// Promotes due delayed messages and restores expired deliveries, each when its time
    /// has come.
    async fn maintain(&self, st: &mut FetchState) {
        let now = Instant::now();
        if now >= st.next_promote {
            let mut next = now + MAX_BLOCK;
            for q in st.order.clone() {
                match self.promote(&q).await {
                    Ok(Some(due_ms)) => {
                        let wait = (due_ms - ms_of(chrono::Utc::now())).max(0);
                        next = next.min(now + Duration::from_millis(wait as u64));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(queue = %q, error = %e, "cannot promote delayed redis messages")
                    }
                }
            }
            st.next_promote = next;
        }
        if now >= st.next_sweep {
            st.next_sweep = now + SWEEP_EVERY;
            if let Err(e) = restore_visible(&self.broker).await {
                tracing::warn!(error = %e, "cannot restore expired redis deliveries");
            }
        }
    }

    async fn promote(&self, queue: &str) -> Result<Option<i64>> {
        let keys = &self.broker.keys;
        let (_moved, next): (u64, Option<f64>) = self
            .broker
            .redis
            .run("promote delayed redis messages", |mut c| async move {
                let mut inv = scripts::PROMOTE.prepare_invoke();
                inv.key(keys.delayed(queue));
                for l in keys.lists(queue) {
                    inv.key(l);
                }
                inv.arg(ms_of(chrono::Utc::now()))
                    .arg(BATCH_LIMIT)
                    .arg(keys.wake(queue));
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(next.map(|s| s as i64))
    }
}

impl FetchState {
    /// Consumes the wake-ups received so far; false when not subscribed (or the subscription
    /// just ended).
    fn drain_wake(&mut self) -> bool {
        if let Some(p) = &mut self.pushes {
            while p.try_recv().is_ok() {}
        }
        let Some(w) = &mut self.wake else {
            return false;
        };
        loop {
            match w.stream.next().now_or_never() {
                Some(Some(_)) => {}
                Some(None) => {
                    self.wake = None;
                    return false;
                }
                None => return true,
            }
        }
    }

    /// Waits for a wake-up, at most `timeout` (the slow poll that finds messages pushed by
    /// clients that do not announce them, like Python's).
    async fn wait_wake(&mut self, timeout: Duration) {
        let Some(w) = &mut self.wake else {
            return;
        };
        let lists = &self.lists;
        let pushed = async {
            match &mut self.pushes {
                Some(p) => loop {
                    match p.recv().await {
                        Some(push) if !may_wake(&push, lists) => {}
                        // Or the connection closed: the fetch then fails and reconnects.
                        _ => break,
                    }
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            woken = w.stream.next() => {
                if woken.is_none() {
                    self.wake = None;
                }
            }
            () = pushed => {}
            () = tokio::time::sleep(timeout) => {}
        }
    }
}

/// Whether a push on a fetch connection may mean a message: an invalidation of one of the
/// consumer's `lists` or of every key (a flush), or anything but an invalidation. Servers
/// before 7.2 track every key a script declares once it reads any, so writes by acks to
/// `unacked` and its index come too; they wake nobody.
fn may_wake(push: &redis::PushInfo, lists: &HashSet<Vec<u8>>) -> bool {
    if push.kind != redis::PushKind::Invalidate {
        return true;
    }
    match push.data.first() {
        Some(redis::Value::Array(keys)) => keys
            .iter()
            .any(|k| matches!(k, redis::Value::BulkString(b) if lists.contains(b))),
        _ => true,
    }
}

/// What the fetch script's result probe read for one message: nothing when it could not
/// tell the task id (`probed` empty) or the stored document does not decode (the worker then
/// reads the state itself and meets the same error there).
fn probed_state(
    probed: String,
    doc: Option<&[u8]>,
    read_at: std::time::Instant,
) -> Option<StoredState> {
    if probed.is_empty() {
        return None;
    }
    let state = match doc {
        None => None,
        Some(bytes) => Some(decode_meta(bytes).ok()?.status),
    };
    Some(StoredState {
        task_id: probed,
        state,
        read_at,
    })
}

/// The index score of a delivery leased for `lease`: kombu's sweep restores entries older
/// than `now - visibility_timeout`, so a lease ending at `now + lease` is written as
/// `now + lease - visibility_timeout` (just `now` for the default lease, as kombu writes).
/// The exact text is the lease token: settling compares it with the stored score.
///
/// Leases of [`WHOLE_SECOND_LEASES`] or more (the default one is the visibility timeout, an
/// hour) are rounded up to a whole second. While the index holds at most 128 members it is a
/// listpack, and the server stores an integral score as an integer there; a fractional one is
/// text that every `ZADD` parses again (`strtod`) for each member it walks past, which was a
/// sixth of the server's time in a drain. Rounding up keeps the lease at least as long as
/// asked, and tokens stay distinct: a delivery is restored only once its score is at most `now
/// - visibility_timeout`, so the next lease on it scores at least the old one plus its length.
fn score(lease: Duration, visibility_timeout: Duration) -> String {
    let s = now_secs() + lease.as_secs_f64() - visibility_timeout.as_secs_f64();
    if lease >= WHOLE_SECOND_LEASES {
        format!("{}", s.ceil() as i64)
    } else {
        format!("{s:.6}")
    }
}

/// The envelope with kombu's redelivered flags in `headers` and `properties.delivery_info`.
fn mark_redelivered(raw: &[u8]) -> Vec<u8> {
    let Ok(mut env) = serde_json::from_slice::<Value>(raw) else {
        return raw.to_vec();
    };
    if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(di) = env
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(Value::as_object_mut)
    {
        di.insert("redelivered".into(), Value::Bool(true));
    }
    serde_json::to_vec(&env).unwrap_or_else(|_| raw.to_vec())
}

/// What the transport reads from an envelope.
#[derive(Debug, Default)]
struct Info {
    kombu_priority: u8,
    exact_priority: Option<u8>,
    redelivered: bool,
    /// A JSON object whose `properties` is an object with a string `delivery_tag` and a
    /// `delivery_info` object with string `exchange` and `routing_key`: where kombu reads
    /// them (what a fetch by search must be checked against).
    kombu_shape: bool,
}

impl Info {
    fn read(raw: &[u8]) -> Info {
        #[derive(Deserialize, Default)]
        struct Env<'a> {
            #[serde(default)]
            headers: Option<HeaderFlags>,
            // An object, not a struct: derived structs also accept arrays, and the shape
            // check must see keys.
            #[serde(borrow, default)]
            properties: Option<RawObject<'a>>,
        }
        /// Only the header the transport reads: the others are skipped by the parser, not
        /// built into a `Value` (the worker decodes the message separately).
        #[derive(Deserialize, Default)]
        struct HeaderFlags {
            #[serde(default)]
            redelivered: Option<Value>,
        }
        // Derived structs accept a JSON array too: only an object is kombu's envelope.
        if raw.trim_ascii_start().first() != Some(&b'{') {
            return Info::default();
        }
        let Ok(env) = serde_json::from_slice::<Env<'_>>(raw) else {
            return Info::default();
        };
        let p = env.properties.unwrap_or_default();
        Info::from_parts(&p, env.headers.and_then(|h| h.redelivered).as_ref())
    }

    /// What the transport reads from an envelope's properties and its `redelivered` header.
    fn from_parts(p: &RawObject<'_>, redelivered_header: Option<&Value>) -> Info {
        let di = p.object("delivery_info");
        let di_str = |k: &str| di.as_ref().is_some_and(|d| d.is_str(k));
        // kombu: int(priority) clamped to 0..9, anything else is 0.
        let kp = p.f64("priority").map_or(0, |f| f.clamp(0.0, 9.0) as u8);
        let header_redelivered = redelivered_header.and_then(Value::as_bool).unwrap_or(false);
        Info {
            kombu_priority: kp,
            exact_priority: p
                .u64(EXACT_PRIORITY)
                .map(|v| v.min(9) as u8)
                .filter(|v| kombu_priority(*v) == kp),
            redelivered: di
                .as_ref()
                .and_then(|d| d.bool("redelivered"))
                .unwrap_or(false)
                || header_redelivered,
            kombu_shape: p.is_str("delivery_tag") && di_str("exchange") && di_str("routing_key"),
        }
    }
}

/// kombu's `restore_visible`: puts deliveries whose lease ran out back in their lists.
///
/// Looks first without the lock (cheap and usually empty); takes `unacked_mutex` only when
/// there is work, as kombu holds it while it restores.
async fn restore_visible(broker: &Inner) -> Result<u64> {
    let keys = &broker.keys;
    let ceil = now_secs() - broker.visibility_timeout.as_secs_f64();
    let ceil_text = format!("{ceil:.6}");
    let expired: Vec<String> = broker
        .redis
        .run("look for expired redis deliveries", |mut c| {
            let ceil_text = &ceil_text;
            async move {
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(keys.unacked_index())
                    .arg(ceil_text)
                    .arg(0)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(BATCH_LIMIT)
                    .query_async(&mut c)
                    .await
            }
        })
        .await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let token = new_id();
    let locked: bool = broker
        .redis
        .run("take the unacked_mutex", |mut c| {
            let token = &token;
            async move {
                let r: Option<String> = redis::cmd("SET")
                    .arg(keys.unacked_mutex())
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(MUTEX_EXPIRE_MS)
                    .query_async(&mut c)
                    .await?;
                Ok(r.is_some())
            }
        })
        .await?;
    if !locked {
        return Ok(0);
    }
    let mut restored = 0;
    let mut result = Ok(());
    for tag in expired {
        match restore_by_tag(broker, &tag, &ceil_text).await {
            Ok(true) => restored += 1,
            Ok(false) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = broker
        .redis
        .run("release the unacked_mutex", |mut c| {
            let token = &token;
            async move {
                scripts::UNLOCK
                    .key(keys.unacked_mutex())
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await;
    if restored > 0 {
        tracing::info!(
            restored,
            "restored redis deliveries whose visibility timeout ran out"
        );
    }
    result.map(|()| restored)
}

async fn restore_by_tag(broker: &Inner, tag: &str, ceil: &str) -> Result<bool> {
    let keys = &broker.keys;
    let value: Option<Vec<u8>> = broker
        .redis
        .run("read an unacked redis delivery", |mut c| async move {
            redis::cmd("HGET")
                .arg(keys.unacked())
                .arg(tag)
                .query_async(&mut c)
                .await
        })
        .await?;
    let (target, queue, payload, value) = match value {
        None => (keys.list("", 0), String::new(), Vec::new(), Vec::new()),
        Some(v) => match serde_json::from_slice::<(Value, String, String)>(&v) {
            Ok((env, exchange, routing_key)) => {
                let raw = serde_json::to_vec(&env)?;
                let queue = lookup(broker, &exchange, &routing_key).await?;
                let info = Info::read(&raw);
                let target = keys.list(&queue, step_for(info.kombu_priority));
                (target, queue, mark_redelivered(&raw), v)
            }
            Err(e) => {
                tracing::warn!(tag, error = %e, "unacked redis entry is not [envelope, exchange, routing_key]; left in place");
                return Ok(false);
            }
        },
    };
    let (wake, counter) = (
        keys.wake(&queue),
        format!("{}{tag}", keys.redelivered_prefix()),
    );
    let done: i64 = broker
        .redis
        .run("restore an unacked redis delivery", |mut c| {
            let (target, payload, value) = (&target, &payload, &value);
            let (wake, counter) = (&wake, &counter);
            async move {
                scripts::RESTORE
                    .key(keys.unacked())
                    .key(keys.unacked_index())
                    .key(target)
                    .arg(tag)
                    .arg(value)
                    .arg(ceil)
                    .arg(payload)
                    .arg(wake)
                    .arg(counter)
                    .arg(broker.counter_ttl)
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await?;
    Ok(done == 1)
}

/// kombu's `_lookup`: the queue a message published to `exchange` with `routing_key` goes to.
///
/// The anonymous exchange routes by queue name; a named one through its binding set (direct
/// match on the routing key), falling back to the routing key.
async fn lookup(broker: &Inner, exchange: &str, routing_key: &str) -> Result<String> {
    if exchange.is_empty() {
        return Ok(routing_key.to_owned());
    }
    let key = broker.keys.binding(exchange);
    let key = &key;
    let members: Vec<String> = broker
        .redis
        .run("read a kombu binding table", |mut c| async move {
            redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await
        })
        .await?;
    for m in members {
        let parts: Vec<&str> = m.split(SEP).collect();
        if parts.len() == 3 && parts[0] == routing_key {
            return Ok(parts[2].to_owned());
        }
    }
    Ok(routing_key.to_owned())
}

// ===== settling =====

/// An ack for the batcher: a delivery and the lease this consumer holds on it.
#[derive(Debug)]
struct AckRequest {
    tag: String,
    token: String,
    /// The fetch found a redelivery counter for it: the ack deletes it.
    counted: bool,
}

/// Starts the ack batcher: every ack waiting is settled in one script call.
fn start_acks(redis: Arc<Redis>, keys: Arc<BrokerKeys>) -> Batcher<AckRequest> {
    Batcher::start(
        redis,
        "ack redis deliveries",
        ACK_MAX,
        move |batch: &[AckRequest]| {
            let mut inv = scripts::ACK_MANY.prepare_invoke();
            inv.key(keys.unacked())
                .key(keys.unacked_index())
                .arg(keys.redelivered_prefix());
            for a in batch {
                inv.arg(&a.tag)
                    .arg(&a.token)
                    .arg(if a.counted { "1" } else { "0" });
            }
            inv
        },
    )
}

#[derive(Debug)]
struct RedisAcker {
    broker: Arc<Inner>,
    queue: String,
    tag: String,
    /// The score this consumer last wrote in `unacked_index`: the lease's identity.
    token: Mutex<String>,
    /// The fetch found a redelivery counter (a count above 0), which the ack deletes.
    counted: bool,
    raw: Vec<u8>,
    step: u8,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    settled: AtomicBool,
    /// Set when the delivery was fetched for a consumer that is gone: dropping it then puts
    /// the message back at once.
    give_back: Arc<AtomicBool>,
}

impl RedisAcker {
    fn release(&self) {
        self.settled.store(true, Ordering::Release);
        self.permit.lock().expect("permit lock").take();
    }

    fn token(&self) -> String {
        self.token.lock().expect("token lock").clone()
    }

    fn counter_key(&self) -> String {
        format!("{}{}", self.broker.keys.redelivered_prefix(), self.tag)
    }

    async fn settle(
        &self,
        what: &str,
        mode: &str,
        target: String,
        payload: &[u8],
        score: i64,
    ) -> Result<bool> {
        let keys = &self.broker.keys;
        let token = self.token();
        let r: Result<i64> = self
            .broker
            .redis
            .run(what, |mut c| {
                let (target, token) = (&target, &token);
                async move {
                    scripts::SETTLE
                        .key(keys.unacked())
                        .key(keys.unacked_index())
                        .key(target)
                        .arg(&self.tag)
                        .arg(token)
                        .arg(mode)
                        .arg(payload)
                        .arg(score)
                        .arg(keys.wake(&self.queue))
                        .arg(self.counter_key())
                        .arg(self.broker.counter_ttl)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        self.release();
        Ok(r? == 1)
    }
}

impl Acker for RedisAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Acks go through the broker's batcher: concurrent acks share one script call.
            let r = self
                .broker
                .acks
                .submit(AckRequest {
                    tag: self.tag.clone(),
                    token: self.token(),
                    counted: self.counted,
                })
                .await;
            self.release();
            r.map(drop)
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let keys = &self.broker.keys;
            match requeue {
                Requeue::Drop => self
                    .settle("reject a redis delivery", "ack", keys.unacked(), b"", 0)
                    .await
                    .map(drop),
                Requeue::Now => {
                    // kombu's reject(requeue=True): back of the queue (LPUSH), flagged.
                    let payload = mark_redelivered(&self.raw);
                    self.settle(
                        "requeue a redis delivery",
                        "lpush",
                        keys.list(&self.queue, self.step),
                        &payload,
                        0,
                    )
                    .await
                    .map(drop)
                }
                Requeue::After(d) => {
                    let payload = mark_redelivered(&self.raw);
                    let due = ms_of(chrono::Utc::now()) + d.as_millis() as i64;
                    self.settle(
                        "delay a redis delivery",
                        "zadd",
                        keys.delayed(&self.queue),
                        &payload,
                        due,
                    )
                    .await
                    .map(drop)
                }
            }
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let keys = &self.broker.keys;
            let old = self.token();
            let new = score(by, self.broker.visibility_timeout);
            let done: i64 = self
                .broker
                .redis
                .run("extend a redis lease", |mut c| {
                    let (old, new) = (&old, &new);
                    async move {
                        scripts::EXTEND
                            .key(keys.unacked_index())
                            .arg(&self.tag)
                            .arg(old)
                            .arg(new)
                            .invoke_async(&mut c)
                            .await
                    }
                })
                .await?;
            if done == 1 {
                *self.token.lock().expect("token lock") = new;
                Ok(())
            } else {
                Err(Error::broker(
                    "lease already expired: the message was handed to another consumer",
                ))
            }
        })
    }
}

impl Drop for RedisAcker {
    /// A delivery dropped unsettled frees its prefetch slot; its message stays in `unacked`
    /// until the visibility timeout restores it, as if its consumer had died. One fetched for a
    /// consumer that is gone, never handed out, goes back at once.
    fn drop(&mut self) {
        if self.settled.load(Ordering::Acquire) {
            return;
        }
        self.release();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.give_back.load(Ordering::Acquire) {
            return;
        }
        let broker = self.broker.clone();
        let (tag, token, raw, queue, step) = (
            self.tag.clone(),
            self.token(),
            self.raw.clone(),
            self.queue.clone(),
            self.step,
        );
        rt.spawn(async move {
            let keys = &broker.keys;
            let target = keys.list(&queue, step);
            let wake = keys.wake(&queue);
            let r = broker
                .redis
                .run("give back a redis delivery", |mut c| {
                    let (target, tag, token, raw, wake) = (&target, &tag, &token, &raw, &wake);
                    async move {
                        scripts::SETTLE
                            .key(keys.unacked())
                            .key(keys.unacked_index())
                            .key(target)
                            .arg(tag)
                            .arg(token)
                            .arg("rpush")
                            .arg(raw)
                            .arg(0)
                            .arg(wake)
                            .arg("")
                            .arg(0)
                            .invoke_async::<i64>(&mut c)
                            .await
                    }
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot give back a redis delivery; the visibility timeout will");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_leases_score_whole_seconds_and_short_ones_keep_microseconds() {
        let hour = Duration::from_secs(3600);
        let before = now_secs();
        let long: f64 = score(hour, hour).parse().unwrap();
        let later: f64 = score(Duration::from_secs(3610), hour).parse().unwrap();
        let short = score(Duration::from_millis(300), hour);
        assert_eq!(long.fract(), 0.0, "{long}");
        assert!(
            long >= before && long <= now_secs() + 1.0,
            "{long} vs {before}"
        );
        assert_eq!(later.fract(), 0.0, "{later}");
        assert!(later - long >= 10.0, "{later} - {long}");
        let (_, micros) = short.split_once('.').expect("a fractional score");
        assert_eq!(micros.len(), 6, "{short}");
        let short: f64 = short.parse().unwrap();
        assert!((short - (before + 0.3 - 3600.0)).abs() < 1.0, "{short}");
    }

    #[test]
    fn only_pushes_about_the_lists_wake_a_consumer() {
        use redis::{PushInfo, PushKind, Value};
        let lists: HashSet<Vec<u8>> = [b"p:q".to_vec(), b"p:q\x06\x163".to_vec()].into();
        let invalidate = |data: Vec<Value>| PushInfo {
            kind: PushKind::Invalidate,
            data,
        };
        let keys = |names: &[&str]| {
            vec![Value::Array(
                names
                    .iter()
                    .map(|n| Value::BulkString(n.as_bytes().to_vec()))
                    .collect(),
            )]
        };
        assert!(may_wake(&invalidate(keys(&["p:q"])), &lists));
        assert!(may_wake(
            &invalidate(keys(&["p:unacked", "p:q\x06\x163"])),
            &lists
        ));
        assert!(!may_wake(&invalidate(keys(&["p:unacked_index"])), &lists));
        assert!(!may_wake(&invalidate(keys(&["p:q2"])), &lists));
        // A flush invalidates every key.
        assert!(may_wake(&invalidate(vec![Value::Nil]), &lists));
        // The connection's end.
        assert!(may_wake(
            &PushInfo {
                kind: PushKind::Disconnection,
                data: Vec::new(),
            },
            &lists
        ));
    }

    #[test]
    fn priorities_map_onto_kombu_buckets() {
        // Ours 9 (most urgent) is kombu's 0, the bare list polled first.
        let bucket: Vec<u8> = (0..=9).map(|p| step_for(kombu_priority(p))).collect();
        assert_eq!(bucket, [9, 9, 9, 9, 6, 6, 6, 3, 3, 0]);
        for k in 0..=9 {
            // A Python message read and re-published by us stays in its bucket.
            assert_eq!(
                step_for(kombu_priority(ours_from_kombu(k))),
                step_for(k),
                "{k}"
            );
        }
        assert_eq!(ours_from_kombu(0), 9, "Python's default is our top");
    }

    #[test]
    fn the_envelope_carries_kombus_and_our_priority() {
        let mut m = celeriac_core::Message::new(
            celeriac_core::Headers::new("t", "i"),
            &celeriac_core::Body::new(vec![], serde_json::Map::new()),
            celeriac_core::ContentType::Json,
        )
        .unwrap();
        m.properties.priority = 7;
        let (bytes, step) = encode(&m, "q", 7).unwrap();
        assert_eq!(step, 3);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["properties"]["priority"], 3);
        assert_eq!(v["properties"]["celeriac_priority"], 7);
        let info = Info::read(&bytes);
        assert_eq!((info.kombu_priority, info.exact_priority), (3, Some(7)));
        assert!(!info.redelivered);
        let again = Info::read(&mark_redelivered(&bytes));
        assert!(again.redelivered);
        assert_eq!(again.exact_priority, info.exact_priority);
    }

    #[test]
    fn info_reads_kombus_flags_and_shape() {
        let base = serde_json::json!({
            "body": "e30=",
            "headers": {"id": "x", "timelimit": [null, null], "redelivered": true},
            "properties": {
                "delivery_tag": "t",
                "delivery_info": {"exchange": "", "routing_key": "q"},
                "priority": 0
            }
        });
        let info = Info::read(&serde_json::to_vec(&base).unwrap());
        assert!(info.redelivered, "the header alone marks a redelivery");
        assert!(info.kombu_shape);
        for (what, edit) in [
            ("tag not a string", serde_json::json!({"delivery_tag": 1})),
            ("no delivery_info", serde_json::json!({"delivery_tag": "t"})),
            (
                "no routing key",
                serde_json::json!({"delivery_tag": "t", "delivery_info": {"exchange": ""}}),
            ),
        ] {
            let mut v = base.clone();
            v["properties"] = edit;
            let info = Info::read(&serde_json::to_vec(&v).unwrap());
            assert!(!info.kombu_shape, "{what}");
        }
        let mut v = base.clone();
        v["properties"] = serde_json::json!(["t", {"exchange": "", "routing_key": "q"}]);
        assert!(
            !Info::read(&serde_json::to_vec(&v).unwrap()).kombu_shape,
            "an array"
        );
        let array = serde_json::to_vec(&serde_json::json!([base["headers"], base["properties"]]));
        assert!(
            !Info::read(&array.unwrap()).kombu_shape,
            "a top-level array"
        );
    }
}
