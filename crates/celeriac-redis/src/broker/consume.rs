//! Consuming: [`RedisConsumer`] and the fetching behind it.
//!
//! A fetch pops messages and records them as unacked in one script ([`scripts::FETCH`]); idle
//! consumers wait on their queues' wake-up channels and, where the server has it, on key
//! tracking. Each fetch first promotes due delayed messages and, once a second, has
//! [`restore_visible`] put expired deliveries back. The lease score that the fetch writes
//! ([`score`]) is also what [`super::ack`] extends and compares.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::protocol::envelope;
use celeriac_core::protocol::new_id;
use celeriac_core::{
    BoxFuture, ConsumeOptions, Consumer, Delivery, Error, Message, Result, StoredState,
};
use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::ack::RedisAcker;
use super::restore::restore_visible;
use super::{BATCH_LIMIT, Info, Inner, ms_of, now_secs, ours_from_kombu};
use crate::backend::decode_meta;
use crate::conn::{Backoff, is_connection_error, master_switch};
use crate::keys::{PRIORITY_STEPS, step_for};
use crate::scripts;

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

/// How often a consumer looks for deliveries whose visibility timeout ran out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Leases at least this long are written as whole seconds (see [`score`]).
const WHOLE_SECOND_LEASES: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct ConsumerShared {
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
    /// The Sentinel master switch count the connections were opened at (always 0 without
    /// Sentinel): when it moves they may be on the old master, and are reopened.
    switches: u64,
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
pub(crate) type Fetched = (Delivery, Arc<AtomicBool>);

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

/// A layout's fetching side, behind the [`Buffered`] consumer front.
pub(crate) trait Fetch: Send + Sync + std::fmt::Debug + 'static {
    /// Whether deliveries given back go last fetched first: kombu's lists take each one back
    /// at their head, so the reverse order keeps the original one.
    const GIVE_BACK_REVERSED: bool;

    /// Fetches one batch (up to the free prefetch); `tx` is the reply channel of the consumer
    /// waiting for it, closed once nobody does.
    fn fetch<'a>(
        self: &'a Arc<Self>,
        tx: &'a oneshot::Sender<Result<Vec<Fetched>>>,
    ) -> impl std::future::Future<Output = Result<Vec<Fetched>>> + Send + 'a;
}

/// Sets each delivery's give-back flag and drops it, so that its message goes back to the
/// broker (in reverse when `reversed`, see [`Fetch::GIVE_BACK_REVERSED`]).
pub(crate) fn give_back(batch: impl DoubleEndedIterator<Item = Fetched>, reversed: bool) {
    let back = |(d, flag): Fetched| {
        flag.store(true, Ordering::Release);
        drop(d);
    };
    if reversed {
        batch.rev().for_each(back);
    } else {
        batch.for_each(back);
    }
}

/// The result key prefix a consumer reads each fetched task's state under: the worker's
/// backend's, when it is on this server; empty for none.
pub(crate) fn result_probe(broker: &Inner, options: &ConsumeOptions) -> String {
    options
        .result_probe
        .as_ref()
        .filter(|p| p.store == broker.redis.identity)
        .map(|p| p.key_prefix.clone())
        .unwrap_or_default()
}

/// A consumer front over a layout's [`Fetch`].
///
/// Fetching runs in a spawned task whose result is kept across cancelled `next()` calls, so a
/// message taken from Redis is never lost to a dropped future. One fetch takes up to the free
/// prefetch; the deliveries wait here, leased, until `next()` hands them out. When the
/// consumer itself is dropped, messages fetched for it and not handed out go back to the
/// broker.
#[derive(Debug)]
pub(crate) struct Buffered<S: Fetch> {
    shared: Arc<S>,
    pending: Option<oneshot::Receiver<Result<Vec<Fetched>>>>,
    buffer: VecDeque<Fetched>,
    closed: watch::Receiver<bool>,
}

impl<S: Fetch> Buffered<S> {
    pub(crate) fn with(shared: Arc<S>, broker: &Inner) -> Self {
        Buffered {
            shared,
            pending: None,
            buffer: VecDeque::new(),
            closed: broker.closed.subscribe(),
        }
    }
}

/// The consumer of [`RedisBroker::consume`](super::RedisBroker#method.consume) on kombu's
/// layout.
pub(super) type RedisConsumer = Buffered<ConsumerShared>;

impl RedisConsumer {
    /// A consumer of `queues` (at least one) on `broker`'s server; it fetches nothing until
    /// the first `next()`.
    pub(super) fn new(broker: &Arc<Inner>, queues: &[String], options: ConsumeOptions) -> Self {
        let shared = Arc::new(ConsumerShared {
            broker: broker.clone(),
            lease: options.lease.unwrap_or(broker.visibility_timeout),
            probe: result_probe(broker, &options),
            permits: Arc::new(Semaphore::new(options.prefetch.max(1))),
            fetch: tokio::sync::Mutex::new(FetchState {
                conn: None,
                wake: None,
                pushes: None,
                lists: queues
                    .iter()
                    .flat_map(|q| broker.keys.lists(q))
                    .map(String::into_bytes)
                    .collect(),
                order: queues.iter().cloned().collect(),
                next_promote: Instant::now(),
                next_sweep: Instant::now(),
                switches: broker.redis.switch_count(),
            }),
        });
        Buffered::with(shared, broker)
    }
}

impl<S: Fetch> Consumer for Buffered<S> {
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

impl<S: Fetch> Drop for Buffered<S> {
    fn drop(&mut self) {
        give_back(self.buffer.drain(..), S::GIVE_BACK_REVERSED);
    }
}

async fn fetch_task<S: Fetch>(shared: Arc<S>, tx: oneshot::Sender<Result<Vec<Fetched>>>) {
    let r = shared.fetch(&tx).await;
    if let Err(Ok(batch)) = tx.send(r) {
        // Nobody will take them: give them back at the consuming end, as kombu does at shutdown.
        give_back(batch.into_iter(), S::GIVE_BACK_REVERSED);
    }
}

impl Fetch for ConsumerShared {
    const GIVE_BACK_REVERSED: bool = true;

    fn fetch<'a>(
        self: &'a Arc<Self>,
        tx: &'a oneshot::Sender<Result<Vec<Fetched>>>,
    ) -> impl std::future::Future<Output = Result<Vec<Fetched>>> + Send + 'a {
        self.fetch_batch(tx)
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
        let mut announced = self.broker.redis.switches();
        loop {
            if self.closed() || tx.is_closed() {
                return Ok(Vec::new());
            }
            let switches = self.broker.redis.switch_count();
            if switches != st.switches {
                // A Sentinel failover: reconnect (to the new master) before fetching again.
                st.switches = switches;
                st.conn = None;
                st.pushes = None;
                st.wake = None;
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
                        give_back(out.into_iter(), Self::GIVE_BACK_REVERSED);
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
                    // A new master announced (now or while waiting): try it at once.
                    if let Some(rx) = &mut announced {
                        rx.borrow_and_update();
                    }
                    if self.broker.redis.switch_count() == st.switches {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = master_switch(&mut announced) => {}
                        }
                    }
                }
            }
        }
    }

    /// Opens the wake-up subscription; false when the server cannot be reached.
    async fn subscribe(&self, st: &mut FetchState) -> bool {
        let channels: Vec<String> = st.order.iter().map(|q| self.broker.keys.wake(q)).collect();
        let r = async {
            let pubsub = self.broker.redis.pubsub().await?;
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
                .or_else(|| ours_from_kombu(info.kombu_priority));
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
pub(super) fn probed_state(
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
pub(super) fn score(lease: Duration, visibility_timeout: Duration) -> String {
    let s = now_secs() + lease.as_secs_f64() - visibility_timeout.as_secs_f64();
    if lease >= WHOLE_SECOND_LEASES {
        format!("{}", s.ceil() as i64)
    } else {
        format!("{s:.6}")
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
}
