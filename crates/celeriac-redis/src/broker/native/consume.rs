//! Consuming the native layout: [`NativeConsumer`].
//!
//! A fetch runs [`scripts::FETCH`] (overdue leases first, once a second, then new entries,
//! most urgent stream first); when it finds nothing, the consumer blocks in `XREADGROUP` on
//! all its streams until a message comes or its next chore is due (promoting delayed
//! messages, sweeping leases), at most a second.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::protocol::{envelope, new_id};
use celeriac_core::{ConsumeOptions, Delivery, Error, Result};
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;

use super::ack::NativeAcker;
use super::{GROUP, scripts};
use crate::broker::consume::{Buffered, Fetch, Fetched, give_back, probed_state, result_probe};
use crate::broker::{BATCH_LIMIT, Info, Inner, ms_of, ours_from_kombu};
use crate::conn::Backoff;
use crate::keys::PRIORITY_STEPS;

/// The longest a consumer blocks before it looks at delayed messages, overdue leases and
/// the closed flag again.
const MAX_BLOCK: Duration = Duration::from_secs(1);

/// How long a fetch connection's replies may take (a blocking read takes up to
/// [`MAX_BLOCK`]).
const FETCH_TIMEOUT: Duration = Duration::from_secs(11);

/// The most messages one fetch takes (bounded further by the free prefetch).
const FETCH_MAX: usize = 128;

/// How often a consumer looks for deliveries whose lease ran out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An entry a fetch took.
#[derive(Debug)]
struct Entry {
    /// Index into the fetch's stream list.
    k: usize,
    id: String,
    raw: Vec<u8>,
    redeliveries: u32,
    count: u64,
    task_id: String,
    /// The stored result read by the probe, when the script ran one.
    doc: Option<Option<Vec<u8>>>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    broker: Arc<Inner>,
    /// `c.<id>.<lease ms>`.
    name: String,
    /// `c.<id>.`.
    name_prefix: Arc<str>,
    probe: String,
    permits: Arc<Semaphore>,
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Debug)]
struct FetchState {
    conn: Option<MultiplexedConnection>,
    /// The queues, in turn: the one just served moves to the end.
    order: VecDeque<String>,
    next_promote: Instant,
    next_sweep: Instant,
    switches: u64,
    /// Entries a blocking read returned beyond the free prefetch (only when several streams
    /// filled at once), with their stream and queue: handed out first.
    overflow: VecDeque<(Entry, Arc<str>, String)>,
}

/// The consumer of native queues (see the [module docs](super)).
pub(crate) type NativeConsumer = Buffered<Shared>;

impl NativeConsumer {
    /// A consumer of `queues` (at least one, all native).
    pub(crate) fn new(broker: &Arc<Inner>, queues: &[String], options: ConsumeOptions) -> Self {
        let probe = result_probe(broker, &options);
        let lease = options.lease.unwrap_or(broker.visibility_timeout);
        let name_prefix = format!("c.{}.", new_id());
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            name: format!("{name_prefix}{}", lease.as_millis().max(1)),
            name_prefix: name_prefix.into(),
            probe,
            permits: Arc::new(Semaphore::new(options.prefetch.max(1))),
            fetch: tokio::sync::Mutex::new(FetchState {
                conn: None,
                order: queues.iter().cloned().collect(),
                next_promote: Instant::now(),
                next_sweep: Instant::now(),
                switches: broker.redis.switch_count(),
                overflow: VecDeque::new(),
            }),
        });
        Buffered::with(shared, broker)
    }
}

impl Fetch for Shared {
    // Each message goes back to its stream's end, in the order fetched.
    const GIVE_BACK_REVERSED: bool = false;

    fn fetch<'a>(
        self: &'a Arc<Self>,
        tx: &'a oneshot::Sender<Result<Vec<Fetched>>>,
    ) -> impl std::future::Future<Output = Result<Vec<Fetched>>> + Send + 'a {
        self.fetch_batch(tx)
    }
}

impl Shared {
    fn closed(&self) -> bool {
        *self.broker.closed.borrow()
    }

    /// The streams of this consumer's queues, most urgent step first, queues in turn; with
    /// the queue of each.
    fn streams(&self, st: &FetchState) -> Vec<(Arc<str>, String)> {
        let keys = &self.broker.keys;
        PRIORITY_STEPS
            .iter()
            .flat_map(|step| {
                st.order
                    .iter()
                    .map(move |q| (Arc::from(keys.stream(q, *step)), q.clone()))
            })
            .collect()
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
            let switches = self.broker.redis.switch_count();
            if switches != st.switches {
                st.switches = switches;
                st.conn = None;
            }
            self.promote_due(&mut st).await;
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
            if !st.overflow.is_empty() {
                let n = permits.len().min(st.overflow.len());
                let out = st
                    .overflow
                    .drain(..n)
                    .zip(permits)
                    .map(|((e, stream, queue), p)| self.register(e, stream, queue, p))
                    .collect();
                return Ok(out);
            }
            let streams = self.streams(&st);
            let sweep = Instant::now() >= st.next_sweep;
            let block = st
                .next_promote
                .min(st.next_sweep)
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), MAX_BLOCK);
            let r = self
                .take(&mut st, &streams, permits.len(), sweep, block)
                .await;
            if sweep && r.is_ok() {
                st.next_sweep = Instant::now() + SWEEP_EVERY;
            }
            match r {
                Ok(entries) if entries.is_empty() => drop(permits),
                Ok(entries) => {
                    if let Some((_, q)) = entries.last().and_then(|e| streams.get(e.k)) {
                        if let Some(pos) = st.order.iter().position(|x| x == q) {
                            if let Some(q) = st.order.remove(pos) {
                                st.order.push_back(q);
                            }
                        }
                    }
                    let mut permits = permits.into_iter();
                    let mut out = Vec::with_capacity(entries.len());
                    for e in entries {
                        let (stream, queue) = streams[e.k].clone();
                        match permits.next() {
                            Some(p) => out.push(self.register(e, stream, queue, p)),
                            None => st.overflow.push_back((e, stream, queue)),
                        }
                    }
                    if self.closed() {
                        give_back(out.into_iter(), Self::GIVE_BACK_REVERSED);
                        return Ok(Vec::new());
                    }
                    return Ok(out);
                }
                Err(e) => {
                    st.conn = None;
                    drop(permits);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        url = %self.broker.redis.url,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "native redis consumer lost its connection; reconnecting"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Takes up to `want` entries; when there are none, blocks in `XREADGROUP` for up to
    /// `block`. May return more than `want` (a blocking read over several streams that filled
    /// at once).
    ///
    /// The hot path runs no script: a consumer of one queue with no sweep due reads its most
    /// urgent stream with a plain `XREADGROUP` and, in the same round trip, the lengths of the
    /// other three (`XLEN`). Reading the most urgent stream first never breaks priority order;
    /// only when it gave fewer than `want` and another stream has entries does the fetch
    /// script ([`scripts::FETCH`]) read on. A script costs the server several times the
    /// commands it runs, which is what made kombu's layout expensive.
    async fn take(
        &self,
        st: &mut FetchState,
        streams: &[(Arc<str>, String)],
        want: usize,
        sweep: bool,
        block: Duration,
    ) -> redis::RedisResult<Vec<Entry>> {
        let conn = match &mut st.conn {
            Some(c) => c,
            None => st
                .conn
                .insert(self.broker.redis.dedicated(FETCH_TIMEOUT).await?),
        };
        let mut entries = Vec::new();
        let mut read_on = true;
        if streams.len() == PRIORITY_STEPS.len() && !sweep {
            let mut pipe = redis::pipe();
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.name)
                .arg("COUNT")
                .arg(want)
                .arg("STREAMS")
                .arg(&*streams[0].0)
                .arg(">");
            for (s, _) in &streams[1..] {
                pipe.cmd("XLEN").arg(&**s);
            }
            match pipe.query_async::<Vec<Value>>(conn).await {
                Ok(mut replies) if !replies.is_empty() => {
                    let lens: Vec<u64> = replies
                        .split_off(1)
                        .into_iter()
                        .map(|v| redis::from_redis_value(v).unwrap_or(1))
                        .collect();
                    let first = replies.pop().unwrap_or(Value::Nil);
                    entries = blocked_entries(first, streams)?;
                    read_on = entries.len() < want && lens.iter().any(|n| *n > 0);
                }
                Ok(_) => {}
                // No group yet (or deleted behind our back): the script creates it.
                Err(e) if e.code() == Some("NOGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        if read_on {
            let mut inv = scripts::FETCH.prepare_invoke();
            for (s, _) in streams {
                inv.key(&**s);
            }
            inv.arg(GROUP)
                .arg(&self.name)
                .arg(want - entries.len())
                .arg(&self.probe)
                .arg(if sweep { "1" } else { "0" })
                .arg(BATCH_LIMIT);
            let flat: Vec<Value> = inv.invoke_async(conn).await?;
            for e in flat.chunks_exact(7) {
                let k: usize = redis::from_redis_value_ref(&e[0])?;
                let doc: Option<Vec<u8>> = redis::from_redis_value_ref(&e[6])?;
                entries.push(Entry {
                    k: k.saturating_sub(1),
                    id: redis::from_redis_value_ref(&e[1])?,
                    raw: redis::from_redis_value_ref(&e[2])?,
                    redeliveries: redis::from_redis_value_ref::<u64>(&e[3])?
                        .min(u64::from(u32::MAX)) as u32,
                    count: redis::from_redis_value_ref(&e[4])?,
                    task_id: redis::from_redis_value_ref(&e[5])?,
                    doc: (!self.probe.is_empty()).then_some(doc),
                });
            }
        }
        if entries.is_empty() {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&self.name)
                .arg("COUNT")
                .arg(want)
                .arg("BLOCK")
                .arg(block.as_millis().max(1) as u64)
                .arg("STREAMS");
            for (s, _) in streams {
                cmd.arg(&**s);
            }
            for _ in streams {
                cmd.arg(">");
            }
            let reply: Value = match cmd.query_async(conn).await {
                Ok(v) => v,
                // A group deleted behind our back: the next fetch script creates it again.
                Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            entries = blocked_entries(reply, streams)?;
        }
        if !self.probe.is_empty() {
            // The task states of entries read without the script: one MGET for the batch.
            let probed: Vec<usize> = (0..entries.len())
                .filter(|i| entries[*i].doc.is_none() && !entries[*i].task_id.is_empty())
                .collect();
            if !probed.is_empty() {
                let mut mget = redis::cmd("MGET");
                for i in &probed {
                    mget.arg(format!("{}{}", self.probe, entries[*i].task_id));
                }
                // A failing read (say, a user not allowed to read result keys): no states.
                if let Ok(docs) = mget.query_async::<Vec<Option<Vec<u8>>>>(conn).await {
                    for (i, doc) in probed.into_iter().zip(docs) {
                        entries[i].doc = Some(doc);
                    }
                }
            }
        }
        Ok(entries)
    }

    /// Builds the delivery of a fetched entry.
    fn register(
        self: &Arc<Self>,
        e: Entry,
        stream: Arc<str>,
        queue: String,
        permit: OwnedSemaphorePermit,
    ) -> Fetched {
        let read_at = std::time::Instant::now();
        let stored = e
            .doc
            .and_then(|doc| probed_state(e.task_id.clone(), doc.as_deref(), read_at));
        let message = match envelope::decode_with_properties(&e.raw) {
            Ok((mut m, props)) => {
                let info = Info::from_parts(&props, m.headers.extra.get("redelivered"));
                m.headers.extra.remove("redelivered");
                m.properties.priority = info
                    .exact_priority
                    .or_else(|| ours_from_kombu(info.kombu_priority));
                Ok(m)
            }
            Err(err) => Err(err),
        };
        let give_back = Arc::new(AtomicBool::new(false));
        let acker = NativeAcker {
            broker: self.broker.clone(),
            queue: queue.clone(),
            stream,
            id: e.id,
            name_prefix: self.name_prefix.clone(),
            count: e.count,
            raw: e.raw,
            task_id: e.task_id,
            redeliveries: e.redeliveries,
            permit: Mutex::new(Some(permit)),
            settled: AtomicBool::new(false),
            give_back: give_back.clone(),
        };
        (
            Delivery::new(message, queue, e.redeliveries, Box::new(acker)).with_stored(stored),
            give_back,
        )
    }

    /// Moves due delayed messages of each queue into its streams, when their time has come.
    async fn promote_due(&self, st: &mut FetchState) {
        let now = Instant::now();
        if now < st.next_promote {
            return;
        }
        let mut next = now + MAX_BLOCK;
        for q in st.order.clone() {
            match self.promote(&q).await {
                Ok(Some(due_ms)) => {
                    let wait = (due_ms - ms_of(chrono::Utc::now())).max(0);
                    next = next.min(now + Duration::from_millis(wait as u64));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue = %q, error = %e, "cannot promote delayed native redis messages")
                }
            }
        }
        st.next_promote = next;
    }

    async fn promote(&self, queue: &str) -> Result<Option<i64>> {
        let keys = &self.broker.keys;
        let (_moved, next): (u64, Option<f64>) = self
            .broker
            .redis
            .run(
                "promote delayed native redis messages",
                |mut c| async move {
                    let mut inv = scripts::PROMOTE.prepare_invoke();
                    inv.key(keys.delayed(queue));
                    for s in keys.streams(queue) {
                        inv.key(s);
                    }
                    inv.arg(ms_of(chrono::Utc::now())).arg(BATCH_LIMIT);
                    inv.invoke_async(&mut c).await
                },
            )
            .await?;
        Ok(next.map(|s| s as i64))
    }
}

/// The entries of an `XREADGROUP` reply: `[[stream, [[id, [field, value, …]], …]],
/// …]` (or nil when it timed out). New entries: delivered once, their `r` earlier.
fn blocked_entries(reply: Value, streams: &[(Arc<str>, String)]) -> redis::RedisResult<Vec<Entry>> {
    let mut out = Vec::new();
    let per_stream: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(out),
        Value::Array(items) => items
            .into_iter()
            .filter_map(|i| match i {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let v = kv.pop()?;
                    let k = kv.pop()?;
                    Some((k, v))
                }
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv,
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected XREADGROUP reply",
                format!("{other:?}"),
            )));
        }
    };
    for (key, entries) in per_stream {
        let key: String = redis::from_redis_value(key)?;
        let Some(k) = streams.iter().position(|(s, _)| **s == *key) else {
            continue;
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let (id, fields): (String, Vec<(String, Vec<u8>)>) = redis::from_redis_value(entry)?;
            let (mut raw, mut task_id, mut r) = (Vec::new(), String::new(), 0u32);
            for (f, v) in fields {
                match f.as_str() {
                    "m" => raw = v,
                    "i" => task_id = String::from_utf8_lossy(&v).into_owned(),
                    "r" => {
                        r = std::str::from_utf8(&v)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0)
                    }
                    _ => {}
                }
            }
            out.push(Entry {
                k,
                id,
                raw,
                redeliveries: r,
                count: 1,
                task_id,
                doc: None,
            });
        }
    }
    Ok(out)
}
