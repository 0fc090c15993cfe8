//! Settling a native delivery: batched acks (`XACK` + `XDEL`), fenced rejects, requeues and
//! lease extensions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{Acker, BoxFuture, Error, Requeue, Result};
use tokio::sync::OwnedSemaphorePermit;

use super::{GROUP, scripts};
use crate::batch::{Batcher, Call};
use crate::broker::{Inner, ms_of};
use crate::conn::Redis;

/// The most acks one ack script settles.
const ACK_MAX: usize = 512;

/// An ack for the batcher: an entry of a stream.
#[derive(Debug)]
pub(crate) struct AckRequest {
    stream: Arc<str>,
    id: String,
}

/// Starts the ack batcher: every ack waiting is settled by one `XACK` and one `XDEL` per
/// stream, pipelined (plain commands cost the server far less than a script). Unfenced, on
/// purpose: an entry is only claimed by another consumer after its lease ran out, and acking
/// it then still means that its task ran to the end once (the other consumer's ack finds it
/// gone). An entry already gone counts as settled, as kombu's ack does.
pub(crate) fn start_acks(redis: Arc<Redis>) -> Batcher<AckRequest> {
    Batcher::start(
        redis,
        "ack native redis deliveries",
        ACK_MAX,
        move |batch: &[AckRequest]| {
            let mut streams: Vec<(&Arc<str>, Vec<&str>)> = Vec::new();
            for a in batch {
                match streams.iter_mut().find(|(s, _)| **s == a.stream) {
                    Some((_, ids)) => ids.push(&a.id),
                    None => streams.push((&a.stream, vec![&a.id])),
                }
            }
            let mut pipe = redis::pipe();
            for (stream, ids) in streams {
                pipe.cmd("XACK")
                    .arg(&**stream)
                    .arg(GROUP)
                    .arg(&ids)
                    .ignore();
                pipe.cmd("XDEL").arg(&**stream).arg(&ids).ignore();
            }
            Call::Pipeline(pipe)
        },
    )
}

/// The acker of a native delivery, built by the fetch that took it.
#[derive(Debug)]
pub(super) struct NativeAcker {
    pub(super) broker: Arc<Inner>,
    pub(super) queue: String,
    pub(super) stream: Arc<str>,
    pub(super) id: String,
    /// `c.<consumer id>.`: every name this consumer holds entries under starts so.
    pub(super) name_prefix: Arc<str>,
    /// The PEL's delivery count at the fetch: with the owner, the lease's identity.
    pub(super) count: u64,
    pub(super) raw: Vec<u8>,
    pub(super) task_id: String,
    pub(super) redeliveries: u32,
    pub(super) permit: Mutex<Option<OwnedSemaphorePermit>>,
    pub(super) settled: AtomicBool,
    /// Set when the delivery was fetched for a consumer that is gone: dropping it then puts
    /// the message back at once.
    pub(super) give_back: Arc<AtomicBool>,
}

impl NativeAcker {
    fn release(&self) {
        self.settled.store(true, Ordering::Release);
        self.permit.lock().expect("permit lock").take();
    }

    /// Runs [`scripts::SETTLE`]; true when this consumer still held the delivery.
    async fn settle(
        &self,
        what: &str,
        mode: &str,
        target: &str,
        redeliveries: u32,
        due: i64,
    ) -> Result<bool> {
        let r = settle(
            &self.broker,
            what,
            Settle {
                stream: &self.stream,
                id: &self.id,
                name_prefix: &self.name_prefix,
                count: self.count,
                mode,
                target,
                raw: &self.raw,
                task_id: &self.task_id,
                redeliveries,
                due,
            },
        )
        .await;
        self.release();
        r
    }
}

/// The arguments of [`scripts::SETTLE`].
struct Settle<'a> {
    stream: &'a str,
    id: &'a str,
    name_prefix: &'a str,
    count: u64,
    mode: &'a str,
    target: &'a str,
    raw: &'a [u8],
    task_id: &'a str,
    redeliveries: u32,
    due: i64,
}

async fn settle(broker: &Inner, what: &str, s: Settle<'_>) -> Result<bool> {
    let done: i64 = broker
        .redis
        .run(what, |mut c| {
            let s = &s;
            async move {
                scripts::SETTLE
                    .key(s.stream)
                    .key(s.target)
                    .arg(GROUP)
                    .arg(s.id)
                    .arg(s.name_prefix)
                    .arg(s.count)
                    .arg(s.mode)
                    .arg(s.raw)
                    .arg(s.task_id)
                    .arg(s.redeliveries)
                    .arg(s.due)
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await?;
    Ok(done == 1)
}

impl Acker for NativeAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let acks = self
                .broker
                .native_acks
                .as_ref()
                .ok_or_else(|| Error::broker("native redis acks are not running"))?;
            let r = acks
                .submit(AckRequest {
                    stream: self.stream.clone(),
                    id: self.id.clone(),
                })
                .await;
            self.release();
            r.map(drop)
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let next = self.redeliveries.saturating_add(1);
            match requeue {
                Requeue::Drop => self
                    .settle("reject a native redis delivery", "drop", &self.stream, 0, 0)
                    .await
                    .map(drop),
                // kombu's requeue puts it at the back; so does a fresh entry.
                Requeue::Now => self
                    .settle(
                        "requeue a native redis delivery",
                        "xadd",
                        &self.stream,
                        next,
                        0,
                    )
                    .await
                    .map(drop),
                Requeue::After(d) => {
                    let due = ms_of(chrono::Utc::now()) + d.as_millis() as i64;
                    let delayed = self.broker.keys.delayed(&self.queue);
                    self.settle("delay a native redis delivery", "zadd", &delayed, next, due)
                        .await
                        .map(drop)
                }
            }
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let name = format!("{}{}", self.name_prefix, by.as_millis().max(1));
            let done: i64 = self
                .broker
                .redis
                .run("extend a native redis lease", |mut c| {
                    let name = &name;
                    async move {
                        scripts::EXTEND
                            .key(&*self.stream)
                            .arg(GROUP)
                            .arg(&self.id)
                            .arg(&*self.name_prefix)
                            .arg(self.count)
                            .arg(name)
                            .invoke_async(&mut c)
                            .await
                    }
                })
                .await?;
            if done == 1 {
                Ok(())
            } else {
                Err(Error::lease_expired())
            }
        })
    }
}

impl Drop for NativeAcker {
    /// A delivery dropped unsettled frees its prefetch slot; its entry stays pending until
    /// its lease runs out, as if its consumer had died. One fetched for a consumer that is
    /// gone, never handed out, goes back at once (at the back of its stream).
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
        let (stream, id, prefix, count, raw, task_id, redeliveries) = (
            self.stream.clone(),
            self.id.clone(),
            self.name_prefix.clone(),
            self.count,
            self.raw.clone(),
            self.task_id.clone(),
            self.redeliveries,
        );
        rt.spawn(async move {
            let s = Settle {
                stream: &stream,
                id: &id,
                name_prefix: &prefix,
                count,
                mode: "xadd",
                target: &stream,
                raw: &raw,
                task_id: &task_id,
                redeliveries,
                due: 0,
            };
            if let Err(e) = settle(&broker, "give back a native redis delivery", s).await {
                tracing::warn!(error = %e, "cannot give back a native redis delivery; its lease will");
            }
        });
    }
}
