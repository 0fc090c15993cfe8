//! Settling: the [`Acker`] of a Redis delivery.
//!
//! Acks go through the broker's [`Batcher`], several per script call under load; rejects,
//! requeues and lease extensions each run one script that does nothing when the lease token
//! (the index score the fetch wrote) has changed, that is when the message was restored and
//! handed to someone else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{Acker, BoxFuture, Error, Requeue, Result};
use tokio::sync::OwnedSemaphorePermit;

use super::consume::score;
use super::{Inner, mark_redelivered, ms_of};
use crate::batch::Batcher;
use crate::conn::Redis;
use crate::keys::BrokerKeys;
use crate::scripts;

/// The most acks one ack script settles.
const ACK_MAX: usize = 512;

/// An ack for the batcher: a delivery and the lease this consumer holds on it.
#[derive(Debug)]
pub(super) struct AckRequest {
    tag: String,
    token: String,
    /// The fetch found a redelivery counter for it: the ack deletes it.
    counted: bool,
}

/// Starts the ack batcher: every ack waiting is settled in one script call.
pub(super) fn start_acks(redis: Arc<Redis>, keys: Arc<BrokerKeys>) -> Batcher<AckRequest> {
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
            inv.into()
        },
    )
}

/// The acker of a delivery, built by the fetch that took it (hence the `pub(super)` fields).
#[derive(Debug)]
pub(super) struct RedisAcker {
    pub(super) broker: Arc<Inner>,
    pub(super) queue: String,
    pub(super) tag: String,
    /// The score this consumer last wrote in `unacked_index`: the lease's identity.
    pub(super) token: Mutex<String>,
    /// The fetch found a redelivery counter (a count above 0), which the ack deletes.
    pub(super) counted: bool,
    pub(super) raw: Vec<u8>,
    pub(super) step: u8,
    pub(super) permit: Mutex<Option<OwnedSemaphorePermit>>,
    pub(super) settled: AtomicBool,
    /// Set when the delivery was fetched for a consumer that is gone: dropping it then puts
    /// the message back at once.
    pub(super) give_back: Arc<AtomicBool>,
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
                Err(Error::lease_expired())
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
