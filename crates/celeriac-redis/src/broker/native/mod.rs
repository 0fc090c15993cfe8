//! The native layout: queues kept in Redis Streams with one consumer group, for queues that
//! no Python process sends to, serves or inspects (opted into per queue with the transport
//! option or URL parameter `native_queues`; see the [crate docs](crate)).
//!
//! # Why
//!
//! kombu's layout costs the server a good deal per task: the envelope is written twice (the
//! list and the `unacked` hash), the lease index is a sorted set with a member per delivery,
//! and every fetch and ack runs a script over both. A stream with a consumer group keeps the
//! same guarantees with the server's own bookkeeping: `XADD` stores a message once,
//! `XREADGROUP` hands it out and records it in the group's pending entries list (the PEL)
//! in one step, so a consumer killed at any instant loses nothing, and `XACK` + `XDEL`
//! settle it. No wake-up channel is needed: an idle consumer blocks in `XREADGROUP`.
//!
//! # Keys
//!
//! | key | type | content |
//! |---|---|---|
//! | `celeriac.stream.<queue>`, `…\x06\x163`, `\x06\x166`, `\x06\x169` | stream | one per priority step (kombu's buckets); fields `m` (kombu's envelope), `i` (task id), `r` (earlier deliveries, when any); group `celeriac` |
//! | `celeriac.delayed.<queue>` | zset | as in kombu's layout; a requeued member is `<redeliveries>\|<envelope>` |
//! | `_kombu.binding.<queue>` | set | written by `declare` as for kombu's layout, so `queues()` lists native queues too |
//!
//! # Semantics, and how they map onto the stream
//!
//! - **Leases.** A consumer's name is `c.<id>.<lease in ms>`. Every consumer sweeps once a
//!   second (in its fetch script, [`scripts::FETCH`]): the group's consumers and the lease in
//!   each name say which pending entries are overdue (`XPENDING … IDLE`), and `XCLAIM` with
//!   that minimum idle time takes them. `extend_lease(by)` moves the entry to the name
//!   `c.<id>.<by in ms>` with its idle time reset (`XCLAIM … JUSTID`): the lease is
//!   `by` from now, whatever the consumer's own.
//! - **Redelivery counts.** The PEL's delivery counter (raised by every claim) plus the
//!   entry's `r` field (carried over by a requeue, which appends a fresh entry).
//! - **Fencing.** Reject, requeue and lease extension check in their script that the entry is
//!   still pending for this consumer with the delivery count it fetched, and do nothing
//!   otherwise. Acks do not (see `ack.rs`): acking an entry whose lease ran out still
//!   means its task ran to the end once.
//! - **Priorities.** A stream per kombu bucket; the fetch reads them most urgent first.
//!   FIFO within a bucket.
//! - **Delays.** The delayed set of kombu's layout, promoted by [`scripts::PROMOTE`] into
//!   the streams.
//! - **A consumer over both layouts** (some queues native, some not) is two consumers read
//!   in turn, each with the full prefetch.

mod ack;
mod consume;
pub(crate) mod scripts;

use std::sync::Arc;

use celeriac_core::config::glob_match;
use celeriac_core::{
    BoxFuture, ConsumeOptions, Consumer, Delivery, Message, PublishOptions, Result,
};

use super::{Inner, encode, ms_of};
use crate::batch::Batcher;
use crate::conn::Redis;
use crate::keys::BrokerKeys;

pub(super) use self::ack::{AckRequest, start_acks};
pub(super) use self::consume::NativeConsumer;

/// The consumer group every native stream has.
pub(crate) const GROUP: &str = "celeriac";

/// Whether `queue` is in the native layout under `globs`.
pub(super) fn is_native(globs: &[String], queue: &str) -> bool {
    globs.iter().any(|g| glob_match(g, queue))
}

/// Adds the commands that publish `message` to native `queue` to `pipe`.
pub(super) fn add_publish(
    pipe: &mut redis::Pipeline,
    keys: &BrokerKeys,
    queue: &str,
    message: &Message,
    options: &PublishOptions,
    now_ms: i64,
) -> Result<()> {
    let priority = options
        .priority
        .or(message.properties.priority)
        .map(|p| p.min(9));
    let (bytes, step) = encode(message, queue, priority)?;
    match options.not_before {
        Some(t) if ms_of(t) > now_ms => {
            pipe.zadd(keys.delayed(queue), bytes, ms_of(t)).ignore();
        }
        _ => {
            pipe.cmd("XADD")
                .arg(keys.stream(queue, step))
                .arg("*")
                .arg("m")
                .arg(bytes)
                // The id the result probe reads under: Celery's correlation id, the task id.
                .arg("i")
                .arg(&message.properties.correlation_id)
                .ignore();
        }
    }
    Ok(())
}

/// Creates the group of each of `queue`'s streams where missing.
pub(super) async fn ensure_groups(redis: &Redis, keys: &BrokerKeys, queue: &str) -> Result<()> {
    redis
        .run("declare a native redis queue", |mut c| async move {
            let mut inv = scripts::ENSURE.prepare_invoke();
            for s in keys.streams(queue) {
                inv.key(s);
            }
            inv.arg(GROUP);
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(drop)
}

/// Deletes `queue`'s ready and delayed messages; returns how many.
pub(super) async fn purge(redis: &Redis, keys: &BrokerKeys, queue: &str) -> Result<u64> {
    redis
        .run("purge a native redis queue", |mut c| async move {
            let mut inv = scripts::PURGE.prepare_invoke();
            inv.key(keys.delayed(queue));
            for s in keys.streams(queue) {
                inv.key(s);
            }
            inv.arg(GROUP);
            inv.invoke_async(&mut c).await
        })
        .await
}

/// `(ready, delayed, unacked)` of `queue`.
pub(super) async fn counts(
    redis: &Redis,
    keys: &BrokerKeys,
    queue: &str,
) -> Result<(u64, u64, u64)> {
    let ((ready, unacked), delayed): ((u64, u64), u64) = redis
        .run("count a native redis queue", |mut c| async move {
            let mut inv = scripts::COUNT.prepare_invoke();
            for s in keys.streams(queue) {
                inv.key(s);
            }
            inv.arg(GROUP);
            let counted = inv.invoke_async(&mut c).await?;
            let delayed = redis::cmd("ZCARD")
                .arg(keys.delayed(queue))
                .query_async(&mut c)
                .await?;
            Ok((counted, delayed))
        })
        .await?;
    Ok((ready, delayed, unacked))
}

/// A consumer of `queues` on `broker`, each queue in its own layout: the native consumer,
/// kombu's, or both read in turn.
pub(super) fn consumer(
    broker: &Arc<Inner>,
    queues: &[String],
    options: ConsumeOptions,
) -> Box<dyn Consumer> {
    let (native, kombu): (Vec<String>, Vec<String>) = queues
        .iter()
        .cloned()
        .partition(|q| is_native(&broker.native, q));
    let kombu_consumer = |qs: &[String], o| {
        Box::new(super::consume::RedisConsumer::new(broker, qs, o)) as Box<dyn Consumer>
    };
    if native.is_empty() {
        return kombu_consumer(&kombu, options);
    }
    let n = Box::new(NativeConsumer::new(broker, &native, options.clone())) as Box<dyn Consumer>;
    if kombu.is_empty() {
        return n;
    }
    Box::new(Both {
        native: n,
        kombu: kombu_consumer(&kombu, options),
        native_first: false,
    })
}

/// A consumer over both layouts: the two consumers' `next()` raced, the one that went first
/// last time going second (both are cancel-safe: a fetch in flight is kept for the next call).
#[derive(Debug)]
struct Both {
    native: Box<dyn Consumer>,
    kombu: Box<dyn Consumer>,
    native_first: bool,
}

impl Consumer for Both {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            self.native_first = !self.native_first;
            let (first, second) = if self.native_first {
                (&mut self.native, &mut self.kombu)
            } else {
                (&mut self.kombu, &mut self.native)
            };
            tokio::select! {
                biased;
                r = first.next() => r,
                r = second.next() => r,
            }
        })
    }
}

/// The ack batcher's handle type, for [`Inner`].
pub(super) type Acks = Batcher<AckRequest>;
