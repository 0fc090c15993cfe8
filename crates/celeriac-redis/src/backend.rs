//! [`RedisBackend`]: Celery's Redis result backend, spoken from Rust.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, ChordProtocol, JustSentWait, timeout_error};
use celeriac_core::canvas::{ChordPart, ChordStatus};
use celeriac_core::protocol::codec::json_from_slice;
use celeriac_core::{
    BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, ResultProbe, TaskMeta, TaskState,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::batch::Batcher;
use crate::conn::{Backoff, Redis};
use crate::keys::BackendKeys;
use crate::options::RedisOptions;
use crate::scripts;

const KIND: ErrorKind = ErrorKind::Backend;

/// A result backend on a Redis server, in Celery's format (`redis://host:6379/1`).
///
/// Clones share one command connection and one pub/sub connection. See the
/// [crate docs](crate) for the key layout.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use std::time::Duration;
/// use celeriac_core::{Config, ResultBackend, TaskMeta};
/// use celeriac_redis::RedisBackend;
///
/// let backend = RedisBackend::connect("redis://127.0.0.1:6379/1", &Config::default()).await?;
/// backend.store(&TaskMeta::success("some-id", serde_json::json!(5))).await?;
/// let meta = backend.wait("some-id", Some(Duration::from_secs(5))).await?;
/// assert_eq!(meta.result, serde_json::json!(5));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: Arc<Redis>,
    keys: BackendKeys,
    /// `result_expires` in whole seconds for `SETEX`, 0 for none.
    expires_secs: u64,
    subscriber: Subscriber,
    /// Result stores, several per script call under load (see [`Batcher`]).
    stores: Batcher<Store>,
    closed: AtomicBool,
}

/// The most documents one store script writes.
const STORE_MAX: usize = 256;

/// One document for the store batcher.
#[derive(Debug)]
struct Store {
    key: String,
    doc: Vec<u8>,
    /// The stored states that keep it from being written, as `|STATE|STATE|`.
    blocking: String,
}

impl RedisBackend {
    /// Connects to the server of a `redis://`, `unix://` (or `socket://`) URL with the settings
    /// of `config`.
    ///
    /// Fails with [`ErrorKind::Backend`] when the server is unreachable (transient) or refuses
    /// the credentials, or its TLS certificate is not trusted; with
    /// [`ErrorKind::Unsupported`] for `rediss://` when built without the `tls` feature.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let options =
            RedisOptions::from_config(config).transport_options(config.backend_transport_options());
        Self::connect_with(url, options).await
    }

    /// Connects with explicit options; a `global_keyprefix` in the URL wins over the options'.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        let opened = Redis::open(url, &options, KIND).await?;
        let (prefix, redis) = (opened.prefix, Arc::new(opened.redis));
        let secs = expires_secs(options.get_result_expires());
        let stores = Batcher::start(
            redis.clone(),
            "store a redis result",
            STORE_MAX,
            move |batch: &[Store]| {
                let mut inv = scripts::STORE_MANY.prepare_invoke();
                inv.arg(secs);
                for s in batch {
                    inv.key(&s.key).arg(&s.doc).arg(&s.blocking);
                }
                inv.into()
            },
        );
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                subscriber: Subscriber::start(redis.clone()),
                redis,
                keys: BackendKeys::new(&prefix),
                expires_secs: secs,
                stores,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The key of a task's meta document (and the channel its changes are published on).
    pub fn task_key(&self, task_id: &str) -> String {
        self.inner.keys.task(task_id)
    }

    /// The key of a saved group.
    pub fn group_key(&self, group_id: &str) -> String {
        self.inner.keys.group(group_id)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("redis result backend"))
        } else {
            Ok(())
        }
    }

    /// Writes `value` at `key` with the expiry and publishes it on the key's channel, as
    /// Celery's `RedisBackend.set` does.
    async fn set(&self, what: &str, key: &str, value: &[u8]) -> Result<()> {
        let secs = self.inner.expires_secs;
        self.inner
            .redis
            .run(what, |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic();
                if secs > 0 {
                    pipe.set_ex(key, value, secs).ignore();
                } else {
                    pipe.set(key, value).ignore();
                }
                pipe.publish(key, value).ignore();
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    /// Celery's chord key `celery-taskset-meta-<gid><suffix>` (suffix `.j`, `.t` or `.s`; its
    /// `get_key_for_group`).
    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}{suffix}", self.inner.keys.group(group_id))
    }

    /// Celery's `RedisBackend.on_chord_part_return`: the member's `[1, id, state, result]` goes
    /// into the sorted set `.j` (score: its group index); when the set holds `.s` + `.t`
    /// members, the set is read and the three keys deleted in one transaction, so exactly one
    /// caller sees the chord complete. Every chord on this backend goes this way (never
    /// `NotNative`): celeriac's senders set `.s` too, before sending any member.
    async fn chord_part(&self, part: ChordPart<'_>) -> Result<ChordStatus> {
        let gid = part.group_id;
        let (jkey, tkey, skey) = (
            self.chord_key(gid, ".j"),
            self.chord_key(gid, ".t"),
            self.chord_key(gid, ".s"),
        );
        let meta = part.meta;
        let member = serde_json::to_vec(&json!([1, meta.task_id, meta.status, meta.result]))
            .map_err(|e| Error::protocol("cannot encode a chord part").with_source(e))?;
        let score = part
            .group_index
            .map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let secs = self.inner.expires_secs;
        let (jk, tk, sk) = (&jkey, &tkey, &skey);
        // Not retried after a lost reply: ZADD of the same member is idempotent, but a retry
        // could see a chord another caller already completed and deleted.
        let (ready, diff, size): (i64, Option<i64>, Option<String>) = self
            .inner
            .redis
            .run_once("record a chord part", |mut c| {
                let (member, score) = (member.clone(), score.clone());
                async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .cmd("ZADD")
                        .arg(jk)
                        .arg(&score)
                        .arg(&member)
                        .ignore()
                        .cmd("ZCOUNT")
                        .arg(jk)
                        .arg("-inf")
                        .arg("+inf")
                        .get(tk)
                        .get(sk);
                    if secs > 0 {
                        pipe.expire(jk, secs as i64).ignore();
                        pipe.expire(tk, secs as i64).ignore();
                        pipe.expire(sk, secs as i64).ignore();
                    }
                    pipe.query_async(&mut c).await
                }
            })
            .await?;
        // Python's client sets the size just before it sends the last member, so earlier
        // members may find none: they are recorded, and the last one completes the chord.
        let Some(size) = size else {
            return Ok(ChordStatus::Waiting);
        };
        let size: i64 = size
            .trim()
            .parse()
            .map_err(|_| Error::protocol(format!("chord size key {skey} is not an integer")))?;
        let total = size + diff.unwrap_or(0);
        if ready != total {
            return Ok(ChordStatus::Waiting);
        }
        let (members,): (Vec<Vec<u8>>,) = self
            .inner
            .redis
            .run_once("complete a chord", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("ZRANGE")
                    .arg(jk)
                    .arg(0)
                    .arg(-1)
                    .del(jk)
                    .ignore()
                    .del(tk)
                    .ignore()
                    .del(sk)
                    .ignore();
                pipe.query_async(&mut c).await
            })
            .await?;
        if i64::try_from(members.len()).unwrap_or(i64::MAX) != total {
            // Another caller took (and deleted) the complete set first.
            return Ok(ChordStatus::Waiting);
        }
        members
            .iter()
            .map(|m| decode_chord_part(m))
            .collect::<Result<Vec<_>>>()
            .map(ChordStatus::Complete)
    }

    /// Waits until `task_id` is ready: [`ResultBackend::wait`] when `look_first`, else
    /// [`ResultBackend::wait_just_sent`].
    async fn wait_for(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        look_first: bool,
    ) -> Result<TaskMeta> {
        self.check_open()?;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let key = self.inner.keys.task(task_id);
        // A result that is already there needs no subscription: one GET instead of SUBSCRIBE +
        // GET + UNSUBSCRIBE (under load most results are ready by the time they are asked
        // for). A task sent a moment ago has none yet, and that GET would only delay the
        // subscription.
        if look_first {
            if let Some(meta) = self.ready_meta(&key).await? {
                return Ok(meta);
            }
        }
        // Subscribe first, then read: a result stored in between is seen by that read.
        let mut watch = self.inner.subscriber.watch(&key);
        let subscribed = watch.subscribed();
        match deadline {
            Some(d) => tokio::time::timeout_at(d, subscribed)
                .await
                .map_err(|_| timeout_error(task_id, timeout))??,
            None => subscribed.await?,
        }
        // The first pass reads the key; later passes use what the last notice carried (the
        // store script publishes the document it wrote, as Celery's backend does), and read
        // the key only when a notice came without one (a reconnect) or could not be decoded.
        // The slot is looked at after the next wake-up is armed, so a notice that lands
        // in between is either seen here or wakes the wait.
        let mut first = true;
        loop {
            let notified = watch.slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let read = first
                || match watch.slot.published() {
                    Some(bytes) => match decode_meta(&bytes) {
                        Ok(meta) if meta.status.is_ready() => return Ok(meta),
                        // A state on the way (STARTED, RETRY): the ready one is published too.
                        Ok(_) => false,
                        Err(_) => true,
                    },
                    None => true,
                };
            first = false;
            if read {
                if let Some(meta) = self.ready_meta(&key).await? {
                    return Ok(meta);
                }
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return Err(timeout_error(task_id, timeout));
                    }
                }
                None => notified.await,
            }
            self.check_open()?;
        }
    }

    /// The meta stored at `key` when it is in a ready state.
    async fn ready_meta(&self, key: &str) -> Result<Option<TaskMeta>> {
        match self.get_raw(key).await? {
            Some(bytes) => Ok(Some(decode_meta(&bytes)?).filter(|m| m.status.is_ready())),
            None => Ok(None),
        }
    }

    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner
            .redis
            .run("read a redis result", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await
    }
}

/// Seconds for `SETEX`, 0 for none (Celery rounds to whole seconds).
fn expires_secs(expires: Option<Duration>) -> u64 {
    expires.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// The stored states a record in `new` must not replace (what `may_be_replaced_by` forbids),
/// as `|STATE|STATE|` for the store script (empty when none does).
///
/// A custom state is never ready, so it never blocks a write; the known ones are listed.
fn blocking_states(new: &TaskState) -> String {
    [
        TaskState::Success,
        TaskState::Failure,
        TaskState::Revoked,
        TaskState::Started,
        TaskState::Retry,
        TaskState::Received,
        TaskState::Rejected,
        TaskState::Pending,
    ]
    .into_iter()
    .filter(|old| !old.may_be_replaced_by(new))
    .map(|old| match old {
        TaskState::Success => "SUCCESS",
        TaskState::Failure => "FAILURE",
        TaskState::Revoked => "REVOKED",
        TaskState::Started => "STARTED",
        TaskState::Retry => "RETRY",
        TaskState::Received => "RECEIVED",
        TaskState::Rejected => "REJECTED",
        _ => "PENDING",
    })
    .fold(String::new(), |mut out, state| {
        if out.is_empty() {
            out.push('|');
        }
        out.push_str(state);
        out.push('|');
        out
    })
}

/// One `[1, task_id, state, result]` member of a chord's `.j` set.
fn decode_chord_part(bytes: &[u8]) -> Result<TaskMeta> {
    let bad = || Error::protocol("a chord part is not celery's [1, id, state, result]");
    let v = json_from_slice(bytes)?;
    let Value::Array(a) = v else {
        return Err(bad());
    };
    let (Some(Value::String(id)), Some(Value::String(state)), Some(result)) =
        (a.get(1), a.get(2), a.get(3))
    else {
        return Err(bad());
    };
    let state: TaskState = state.parse().map_err(|_| bad())?;
    Ok(TaskMeta::new(id.clone(), state, result.clone()))
}

pub(crate) fn decode_meta(bytes: &[u8]) -> Result<TaskMeta> {
    let v = json_from_slice(bytes)?;
    serde_json::from_value(v)
        .map_err(|e| Error::protocol("stored task meta is not celery's format").with_source(e))
}

impl ResultBackend for RedisBackend {
    fn driver(&self) -> &'static str {
        "redis"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let store = Store {
                key: self.inner.keys.task(&meta.task_id),
                doc: serde_json::to_vec(meta)?,
                blocking: blocking_states(&meta.status),
            };
            self.inner.stores.submit(store).await
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            self.check_open()?;
            match self.get_raw(&self.inner.keys.task(task_id)).await? {
                Some(bytes) => decode_meta(&bytes).map(Some),
                None => Ok(None),
            }
        })
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            if task_ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = task_ids.iter().map(|id| self.inner.keys.task(id)).collect();
            let raw: Vec<Option<Vec<u8>>> = self
                .inner
                .redis
                .run("read redis results", |mut c| {
                    let keys = &keys;
                    async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
                })
                .await?;
            raw.into_iter()
                .map(|r| r.as_deref().map(decode_meta).transpose())
                .collect()
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(self.wait_for(task_id, timeout, true))
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let key = self.inner.keys.task(task_id);
            let key = &key;
            self.inner
                .redis
                .run("forget a redis result", |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                })
                .await
        })
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let tuple = celeriac_core::meta::group_tuple(group_id, task_ids);
            let doc = serde_json::to_vec(&json!({ "result": tuple }))?;
            self.set("save a redis group", &self.inner.keys.group(group_id), &doc)
                .await
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let Some(bytes) = self.get_raw(&self.inner.keys.group(group_id)).await? else {
                return Ok(None);
            };
            let v: Value = json_from_slice(&bytes)?;
            v.get("result")
                .and_then(celeriac_core::meta::group_tuple_members)
                .map(Some)
                .ok_or_else(|| {
                    Error::protocol("stored group is not celery's [[gid, parent], [members]]")
                })
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            self.check_open()?;
            let key = self.inner.keys.counter(key);
            let secs = self.inner.expires_secs;
            let key = &key;
            // Not retried after a lost reply: the increment may have happened.
            let (n,): (i64,) = self
                .inner
                .redis
                .run_once("increment a redis counter", |mut c| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic().incr(key, by);
                    if secs > 0 {
                        pipe.expire(key, secs as i64).ignore();
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            Ok(n)
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        BackendCapabilities::none()
            .coordination(self)
            .chords(self)
            .just_sent(self)
            .probe(ResultProbe::new(
                self.inner.redis.identity.clone(),
                self.inner.keys.task(""),
            ))
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.subscriber.close();
            Ok(())
        })
    }
}

impl ChordProtocol for RedisBackend {
    fn set_chord_size<'a>(&'a self, group_id: &'a str, size: usize) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let key = self.chord_key(group_id, ".s");
            let secs = self.inner.expires_secs;
            let key = &key;
            self.inner
                .redis
                .run("set a chord's size", |mut c| async move {
                    let mut pipe = redis::pipe();
                    if secs > 0 {
                        pipe.set_ex(key, size, secs).ignore();
                    } else {
                        pipe.set(key, size).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await
        })
    }

    fn chord_part_return<'a>(&'a self, part: ChordPart<'a>) -> BoxFuture<'a, Result<ChordStatus>> {
        Box::pin(async move {
            self.check_open()?;
            self.chord_part(part).await
        })
    }
}

impl JustSentWait for RedisBackend {
    fn wait_just_sent<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(self.wait_for(task_id, timeout, false))
    }
}

// ===== pub/sub =====

/// One pub/sub connection per backend, shared by every `wait`.
///
/// A task keeps the connection: it subscribes to a task's channel when the first waiter of
/// that task comes and unsubscribes when the last one leaves, and wakes the waiters of a
/// channel when a message arrives on it, handing them the document it carries. Commands
/// queued while it was busy go out together, one `SUBSCRIBE` and one `UNSUBSCRIBE` per batch
/// (see [`batch`]), rather than one round trip each: many clients waiting at once is the
/// common case under load. When the connection drops it reconnects with backoff, subscribes
/// again, and wakes every waiter so that each reads its key once more (a result stored while
/// the connection was down is not missed; Celery's client re-reads the same way).
#[derive(Debug)]
struct Subscriber {
    commands: mpsc::UnboundedSender<Command>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

#[derive(Debug)]
struct Channel {
    waiters: usize,
    slot: Arc<Slot>,
}

/// What a channel's waiters share: the wake-up and the last document published on it.
#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    published: Mutex<Option<Arc<[u8]>>>,
}

impl Slot {
    /// Wakes every waiter; `published` is the notice's document, `None` when waiters must
    /// read the key themselves (after a reconnect, or when the backend closes).
    fn wake(&self, published: Option<&[u8]>) {
        *self.published.lock().expect("slot lock") = published.map(Arc::from);
        self.notify.notify_waiters();
    }

    /// The document the last notice carried.
    fn published(&self) -> Option<Arc<[u8]>> {
        self.published.lock().expect("slot lock").clone()
    }
}

#[derive(Debug)]
enum Command {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// A waiter's interest in one channel; leaving unsubscribes when it was the last.
struct Watch<'a> {
    subscriber: &'a Subscriber,
    channel: String,
    slot: Arc<Slot>,
    confirmed: Option<oneshot::Receiver<()>>,
}

impl Watch<'_> {
    /// Resolves once the server confirmed the subscription.
    async fn subscribed(&mut self) -> Result<()> {
        match self.confirmed.take() {
            Some(rx) => rx
                .await
                .map_err(|_| Error::closed("redis result subscriber")),
            None => Ok(()),
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut channels = self.subscriber.channels.lock().expect("channels lock");
        if let Some(c) = channels.get_mut(&self.channel) {
            c.waiters -= 1;
            if c.waiters == 0 {
                channels.remove(&self.channel);
                let _ = self
                    .subscriber
                    .commands
                    .send(Command::Unsubscribe(self.channel.clone()));
            }
        }
    }
}

impl Subscriber {
    fn start(redis: Arc<Redis>) -> Subscriber {
        let (tx, rx) = mpsc::unbounded_channel();
        let channels: Arc<Mutex<HashMap<String, Channel>>> = Arc::default();
        tokio::spawn(run_subscriber(redis, rx, channels.clone()));
        Subscriber {
            commands: tx,
            channels,
        }
    }

    fn close(&self) {
        // Wake every waiter: each sees the backend closed.
        for c in self.channels.lock().expect("channels lock").values() {
            c.slot.wake(None);
        }
    }

    fn watch(&self, channel: &str) -> Watch<'_> {
        let slot = {
            let mut channels = self.channels.lock().expect("channels lock");
            let c = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    waiters: 0,
                    slot: Arc::default(),
                });
            c.waiters += 1;
            c.slot.clone()
        };
        let (tx, rx) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Subscribe(channel.to_owned(), tx));
        Watch {
            subscriber: self,
            channel: channel.to_owned(),
            slot,
            confirmed: Some(rx),
        }
    }
}

/// `first` and every command queued behind it, as one `SUBSCRIBE` and one `UNSUBSCRIBE`:
/// returns the channels to subscribe, those to unsubscribe, and the acks to send once both
/// are done.
///
/// A channel named in the batch is subscribed when it has waiters now and unsubscribed when
/// it has none, whatever the order of its commands: `Watch` updates the waiter table before
/// it queues its command, so the table is at least as new as any queued command, and a
/// command still queued behind the batch only repeats what the table says (a repeated
/// `SUBSCRIBE` or `UNSUBSCRIBE` is harmless). So a waiter that came and left within one batch
/// costs nothing but the `UNSUBSCRIBE`, and one that left while another came keeps the
/// subscription.
fn batch(
    first: Command,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    channels: &Mutex<HashMap<String, Channel>>,
) -> (Vec<String>, Vec<String>, Vec<oneshot::Sender<()>>) {
    let mut named = Vec::new();
    let mut acks = Vec::new();
    let mut next = Some(first);
    while let Some(cmd) = next {
        match cmd {
            Command::Subscribe(ch, ack) => {
                named.push(ch);
                acks.push(ack);
            }
            Command::Unsubscribe(ch) => named.push(ch),
        }
        next = commands.try_recv().ok();
    }
    named.sort_unstable();
    named.dedup();
    let table = channels.lock().expect("channels lock");
    let (subscribe, unsubscribe) = named.into_iter().partition(|ch| table.contains_key(ch));
    (subscribe, unsubscribe, acks)
}

async fn run_subscriber(
    redis: Arc<Redis>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
) {
    let mut backoff = Backoff::new();
    let mut waiting_acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut first = true;
    // With Sentinel: told when the master moves, so that the subscription leaves the old one.
    let mut switches = redis.switches();
    loop {
        if let Some(rx) = &mut switches {
            rx.borrow_and_update();
        }
        let pubsub = match redis.pubsub().await {
            Ok(p) => p,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(url = %redis.url, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "redis result subscriber cannot connect; retrying");
                tokio::time::sleep(delay).await;
                if commands.is_closed() {
                    return;
                }
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let current: Vec<String> = channels
            .lock()
            .expect("channels lock")
            .keys()
            .cloned()
            .collect();
        if !current.is_empty() {
            if let Err(e) = sink.subscribe(&current).await {
                tracing::warn!(url = %redis.url, error = %e, "redis result subscriber cannot subscribe; reconnecting");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        }
        backoff = Backoff::new();
        for ack in waiting_acks.drain(..) {
            let _ = ack.send(());
        }
        if !first {
            // Results stored while the connection was down published to nobody: every waiter
            // reads its key again.
            for c in channels.lock().expect("channels lock").values() {
                c.slot.wake(None);
            }
        }
        first = false;
        loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(first) = cmd else { return };
                    let (subscribe, unsubscribe, acks) = batch(first, &mut commands, &channels);
                    if !unsubscribe.is_empty() && sink.unsubscribe(&unsubscribe).await.is_err() {
                        waiting_acks.extend(acks);
                        break;
                    }
                    if !subscribe.is_empty() && sink.subscribe(&subscribe).await.is_err() {
                        waiting_acks.extend(acks);
                        break;
                    }
                    for ack in acks {
                        let _ = ack.send(());
                    }
                }
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let name = msg.get_channel_name();
                        if let Some(c) = channels.lock().expect("channels lock").get(name) {
                            c.slot.wake(Some(msg.get_payload_bytes()));
                        }
                    }
                    None => break,
                },
                () = crate::conn::master_switch(&mut switches) => break,
            }
        }
        tracing::warn!(url = %redis.url, "redis result subscriber lost its connection; reconnecting");
    }
}

impl RedisBackend {
    /// Runs a coordination script on the key `celeriac-coord-<kind>-<key>` (under the
    /// backend's prefix) with `args`; `once` for steps that must not run twice after a lost
    /// reply.
    async fn coord<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &redis::Script,
        (kind, key): (&str, &str),
        args: &[&str],
        once: bool,
    ) -> Result<T> {
        self.check_open()?;
        let key = self
            .inner
            .keys
            .counter(&format!("celeriac-coord-{kind}-{key}"));
        let invocation = || {
            let mut inv = script.prepare_invoke();
            inv.key(&key);
            for a in args {
                inv.arg(a);
            }
            inv
        };
        let redis = &self.inner.redis;
        if once {
            let inv = invocation();
            redis
                .run_once(what, |mut c| async move { inv.invoke_async(&mut c).await })
                .await
        } else {
            redis
                .run(what, |mut c| {
                    let inv = invocation();
                    async move { inv.invoke_async(&mut c).await }
                })
                .await
        }
    }
}

/// Cluster rate limits, unique-task locks and concurrency slots, each one Lua script on the
/// server (atomic, on the server's clock), under the backend's key prefix with a
/// `celeriac-coord-` stem.
impl celeriac_core::coord::Coordination for RedisBackend {
    fn throttle<'a>(
        &'a self,
        key: &'a str,
        limit: celeriac_core::RateLimit,
    ) -> BoxFuture<'a, Result<celeriac_core::coord::Admission>> {
        Box::pin(async move {
            let interval = celeriac_core::coord::gcra_interval(limit);
            // Not retried after a lost reply: the budget may have been taken.
            let answer: i64 = self
                .coord(
                    "throttle on redis",
                    &scripts::COORD_THROTTLE,
                    ("rate", key),
                    &[&interval.to_string()],
                    true,
                )
                .await?;
            Ok(celeriac_core::coord::Admission::from_micros(answer))
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            // Retried: taking it again as the same holder is the same step.
            self.coord(
                "take a redis lock",
                &scripts::COORD_LOCK,
                ("lock", key),
                &[holder, &ms.to_string()],
                false,
            )
            .await
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let n: i64 = self
                .coord(
                    "release a redis lock",
                    &scripts::COORD_UNLOCK,
                    ("lock", key),
                    &[holder],
                    false,
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            let n: i64 = self
                .coord(
                    "take a redis slot",
                    &scripts::COORD_ACQUIRE,
                    ("slots", key),
                    &[holder, &limit.to_string(), &ms.to_string()],
                    false,
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _: i64 = self
                .coord(
                    "release a redis slot",
                    &scripts::COORD_RELEASE,
                    ("slots", key),
                    &[holder],
                    false,
                )
                .await?;
            Ok(())
        })
    }
}
