//! [`RedisBroker`]: kombu's Redis transport, spoken from Rust.
//!
//! The broker is in five files:
//!
//! - this one: the [`RedisBroker`] type and its [`Broker`] impl (declaring, publishing,
//!   purging, counting and listing queues), and the envelope as kombu writes it ([`encode`],
//!   with celeriac's exact priority next to kombu's bucket) and as the transport reads it back
//!   ([`Info`], [`mark_redelivered`]);
//! - [`consume`]: consumers and their fetching: the script that pops and records messages in
//!   one step, the wake-ups of idle consumers (pub/sub and key tracking), the promotion of due
//!   delayed messages, and the lease score ([`consume::score`]);
//! - [`restore`]: kombu's `restore_visible`, which puts deliveries whose lease ran out (a dead
//!   or stuck consumer's) back in their lists;
//! - [`ack`]: settling: batched acks, rejects and requeues, lease extensions, and giving back
//!   what was fetched for a consumer that is gone;
//! - [`broadcast`]: the broadcast channels (Celery's pidbox and events) over pub/sub and reply
//!   lists, as kombu carries them.

mod ack;
mod broadcast;
mod consume;
mod native;
mod restore;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_core::protocol::envelope::{self, RawObject};
use celeriac_core::{
    BoxFuture, Broker, Capabilities, Config, ConsumeOptions, Consumer, Error, ErrorKind, Message,
    PublishOptions, QueueStats, Result,
};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::batch::Batcher;
use crate::conn::Redis;
use crate::keys::{BrokerKeys, SEP, step_for};
use crate::options::RedisOptions;

use self::ack::{AckRequest, start_acks};
use self::consume::RedisConsumer;

const KIND: ErrorKind = ErrorKind::Broker;

/// The shortest a redelivery counter is kept after its last increment (longer when the
/// visibility timeout is: twice that).
const COUNTER_TTL: Duration = Duration::from_secs(7 * 86_400);

/// The most delayed messages one promotion moves, and deliveries one sweep restores.
const BATCH_LIMIT: usize = 1000;

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
    /// Broadcasts (events above all) go out on a connection of their own, so a burst of
    /// large event batches never holds up the acks and publishes of `redis`.
    broadcasts: Redis,
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
    /// Globs of the queues in the native layout ([`native`]).
    native: Vec<String>,
    /// The native layout's acks, when any queue is native.
    native_acks: Option<native::Acks>,
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
        let native_acks =
            (!opened.native_queues.is_empty()).then(|| native::start_acks(redis.clone()));
        let visibility_timeout = options.get_visibility_timeout();
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                broadcasts: redis.sibling(),
                redis,
                keys,
                visibility_timeout,
                counter_ttl: COUNTER_TTL.max(visibility_timeout * 2).as_secs(),
                closed: watch::Sender::new(false),
                acks,
                tracking: AtomicBool::new(true),
                native: opened.native_queues,
                native_acks,
            }),
        })
    }

    /// Whether `queue` is kept in the native layout (Redis Streams) rather than kombu's.
    pub fn is_native(&self, queue: &str) -> bool {
        native::is_native(&self.inner.native, queue)
    }

    /// The key prefix in use (kombu's `global_keyprefix`, verbatim).
    pub fn global_keyprefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()
    }
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if *self.closed.borrow() {
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
/// first), bucket by bucket: 9 → 0, 7-8 → 3, 4-6 → 6, 0-3 → 9. A message without a priority
/// has none of ours: it is written as Python writes its own, kombu's default 0.
///
/// A plain `9 - p` would put 7, 8 and 9 in one bucket, the top one; this map keeps 9 alone on
/// top and 0 in the bottom bucket, and writes each bucket's own value so kombu, reading the
/// property, files the message in the same list.
pub(crate) fn kombu_priority(ours: u8) -> u8 {
    match ours.min(9) {
        9 => 0,
        7 | 8 => 3,
        4..=6 => 6,
        _ => 9,
    }
}

/// kombu's `priority` property of a message that carries no exact priority of ours (a Python
/// client's, or ours sent without one), as celeriac's: a value that maps back to the same
/// bucket. Python's default 0, which is also what it writes for no priority, is none (and goes
/// back to the top list); 1 and 2 share that list with our 9.
pub(crate) fn ours_from_kombu(kombu: u8) -> Option<u8> {
    match (kombu, step_for(kombu)) {
        (0, _) => None,
        (_, 0) => Some(9),
        (_, 3) => Some(8),
        (_, 6) => Some(6),
        _ => Some(0),
    }
}

/// The envelope of `message` as kombu writes it, published to `queue` with `priority`
/// (ours, if any); returns the bytes and the list step.
fn encode(message: &Message, queue: &str, priority: Option<u8>) -> Result<(Vec<u8>, u8)> {
    let kombu = priority.map_or(0, kombu_priority);
    let bytes = if message.properties.priority.unwrap_or(0) == kombu {
        envelope::encode(message, "", queue)?
    } else {
        let mut m = message.clone();
        m.properties.priority = Some(kombu);
        envelope::encode(&m, "", queue)?
    };
    let Some(priority) = priority else {
        // As Python's: nothing of ours to add.
        return Ok((bytes, step_for(kombu)));
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
        .or(message.properties.priority)
        .map(|p| p.min(9));
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
        let is_native = self.is_native(queue);
        for (n, (m, o)) in items.into_iter().enumerate() {
            if n == 1 {
                pipe.atomic();
            }
            if is_native {
                // No wake-up: idle consumers block in XREADGROUP.
                native::add_publish(&mut pipe, keys, queue, m, o, now)?;
            } else {
                ready |= add_publish(&mut pipe, keys, queue, m, o, now)?;
            }
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
        Capabilities::all()
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            // What kombu's queue_bind writes for Celery's `Queue(q, Exchange(q), routing_key=q)`.
            let member = BrokerKeys::binding_member(queue, queue);
            let keys = &self.inner.keys;
            if self.is_native(queue) {
                native::ensure_groups(&self.inner.redis, keys, queue).await?;
            }
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
            if self.inner.native.is_empty() {
                return Ok(
                    Box::new(RedisConsumer::new(&self.inner, queues, options)) as Box<dyn Consumer>
                );
            }
            Ok(native::consumer(&self.inner, queues, options))
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let keys = &self.inner.keys;
            if self.is_native(queue) {
                return native::purge(&self.inner.redis, keys, queue).await;
            }
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
            if self.is_native(queue) {
                let (ready, delayed, unacked) =
                    native::counts(&self.inner.redis, keys, queue).await?;
                return Ok(QueueStats::new(ready, delayed, unacked));
            }
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

    fn broadcast(&self) -> Option<&dyn celeriac_core::broadcast::Broadcast> {
        Some(&*self.inner)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_onto_kombu_buckets() {
        // Ours 9 (most urgent) is kombu's 0, the bare list polled first.
        let bucket: Vec<u8> = (0..=9).map(|p| step_for(kombu_priority(p))).collect();
        assert_eq!(bucket, [9, 9, 9, 9, 6, 6, 6, 3, 3, 0]);
        for k in 0..=9 {
            // A Python message read and re-published by us stays in its bucket.
            assert_eq!(
                step_for(ours_from_kombu(k).map_or(0, kombu_priority)),
                step_for(k),
                "{k}"
            );
        }
        assert_eq!(ours_from_kombu(0), None, "Python's default is none");
        assert_eq!(ours_from_kombu(2), Some(9));
    }

    #[test]
    fn the_envelope_carries_kombus_and_our_priority() {
        let mut m = celeriac_core::Message::new(
            celeriac_core::Headers::new("t", "i"),
            &celeriac_core::Body::new(vec![], serde_json::Map::new()),
            celeriac_core::ContentType::Json,
        )
        .unwrap();
        m.properties.priority = Some(7);
        let (bytes, step) = encode(&m, "q", Some(7)).unwrap();
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

        // No priority: the bare list, kombu's 0 and nothing of ours, as Python writes it.
        m.properties.priority = None;
        let (bytes, step) = encode(&m, "q", None).unwrap();
        assert_eq!(step, 0);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["properties"]["priority"], 0);
        assert!(v["properties"].get("celeriac_priority").is_none(), "{v}");
        let info = Info::read(&bytes);
        assert_eq!((info.kombu_priority, info.exact_priority), (0, None));
        assert_eq!(ours_from_kombu(info.kombu_priority), None);
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
