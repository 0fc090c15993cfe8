use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::{
    Acker, BoxFuture, Broker, Capabilities, ConsumeOptions, Consumer, Delivery, PublishOptions,
    QueueStats, Requeue,
};
use crate::error::{Error, Result};
use crate::protocol::Message;

/// Default lease of a delivery.
const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// An in-memory broker (`memory://`). Clones share the same queues.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    queues: Mutex<HashMap<String, Queue>>,
    notify: Notify,
    seq: AtomicU64,
    closed: AtomicBool,
    bus: super::broadcast::Bus,
}

#[derive(Debug)]
struct Stored {
    message: Message,
    priority: u8,
    redeliveries: u32,
}

#[derive(Debug, Default)]
struct Queue {
    /// Ready messages ordered by (priority descending, publish order).
    ready: BTreeMap<(Reverse<u8>, u64), Stored>,
    /// Delayed messages: (not_before, seq) -> message.
    delayed: BTreeMap<(Instant, u64), Stored>,
    /// Leased messages: seq -> lease.
    unacked: HashMap<u64, Lease>,
}

/// A message handed to a consumer.
#[derive(Debug)]
struct Lease {
    /// When the message returns to ready unless acked or extended.
    deadline: Instant,
    /// Tells this lease from a later one of the same message, so that a delivery whose lease
    /// expired cannot settle or extend the copy handed to another consumer.
    token: u64,
    stored: Stored,
}

impl Queue {
    /// Moves due delayed messages and expired leases back to ready; returns the next wake-up.
    fn maintain(&mut self, now: Instant) -> Option<Instant> {
        while let Some((&(at, seq), _)) = self.delayed.iter().next() {
            if at > now {
                break;
            }
            let stored = self.delayed.remove(&(at, seq)).expect("present");
            self.ready.insert((Reverse(stored.priority), seq), stored);
        }
        let expired: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            let mut stored = self.unacked.remove(&seq).expect("present").stored;
            stored.redeliveries += 1;
            self.ready.insert((Reverse(stored.priority), seq), stored);
        }
        let next_delay = self.delayed.keys().next().map(|(at, _)| *at);
        let next_lease = self.unacked.values().map(|lease| lease.deadline).min();
        match (next_delay, next_lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn to_instant(t: chrono::DateTime<chrono::Utc>) -> Instant {
    let now = chrono::Utc::now();
    let delta = (t - now).to_std().unwrap_or(Duration::ZERO);
    Instant::now() + delta
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("memory broker"))
        } else {
            Ok(())
        }
    }

    fn put(&self, queue: &str, message: &Message, options: &PublishOptions) {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let priority = options
            .priority
            .or(message.properties.priority)
            .unwrap_or(0)
            .min(9);
        let stored = Stored {
            message: message.clone(),
            priority,
            redeliveries: 0,
        };
        let mut queues = self.inner.queues.lock().expect("memory broker lock");
        let q = queues.entry(queue.to_owned()).or_default();
        match options.not_before {
            Some(t) if t > chrono::Utc::now() => {
                q.delayed.insert((to_instant(t), seq), stored);
            }
            _ => {
                q.ready.insert((Reverse(priority), seq), stored);
            }
        }
    }
}

impl Broker for MemoryBroker {
    fn driver(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: true,
            priority: true,
            lease_extension: true,
            fanout: true,
            multi_process: false,
            celery_peers: false,
        }
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.inner
                .queues
                .lock()
                .expect("memory broker lock")
                .entry(queue.to_owned())
                .or_default();
            Ok(())
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
            self.put(queue, message, &options);
            self.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn publish_batch<'a>(
        &'a self,
        queue: &'a str,
        messages: &'a [(Message, PublishOptions)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            for (m, o) in messages {
                self.put(queue, m, o);
            }
            self.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            self.check_open()?;
            let consumer = MemoryConsumer {
                broker: self.clone(),
                queues: queues.to_vec(),
                prefetch: options.prefetch.max(1),
                lease: options.lease.unwrap_or(DEFAULT_LEASE),
                outstanding: Arc::new(AtomicUsize::new(0)),
                next_queue: 0,
            };
            Ok(Box::new(consumer) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_open()?;
            let mut queues = self.inner.queues.lock().expect("memory broker lock");
            let Some(q) = queues.get_mut(queue) else {
                return Ok(0);
            };
            let n = (q.ready.len() + q.delayed.len()) as u64;
            q.ready.clear();
            q.delayed.clear();
            Ok(n)
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        Box::pin(async move {
            self.check_open()?;
            let mut queues = self.inner.queues.lock().expect("memory broker lock");
            let Some(q) = queues.get_mut(queue) else {
                return Ok(QueueStats::default());
            };
            q.maintain(Instant::now());
            Ok(QueueStats::new(
                q.ready.len() as u64,
                q.delayed.len() as u64,
                q.unacked.len() as u64,
            ))
        })
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            self.check_open()?;
            let mut names: Vec<String> = self
                .inner
                .queues
                .lock()
                .expect("memory broker lock")
                .keys()
                .cloned()
                .collect();
            names.sort();
            Ok(names)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn broadcast(&self) -> Option<&dyn crate::broadcast::Broadcast> {
        Some(&self.inner.bus)
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    broker: MemoryBroker,
    queues: Vec<String>,
    prefetch: usize,
    lease: Duration,
    outstanding: Arc<AtomicUsize>,
    next_queue: usize,
}

impl MemoryConsumer {
    /// Takes one ready message, rotating over the queues; returns the next wake-up otherwise.
    fn try_take(&mut self) -> std::result::Result<Delivery, Option<Instant>> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut queues = self.broker.inner.queues.lock().expect("memory broker lock");
        let n = self.queues.len();
        for i in 0..n {
            let name = &self.queues[(self.next_queue + i) % n];
            let q = queues.entry(name.clone()).or_default();
            if let Some(w) = q.maintain(now) {
                wake = Some(wake.map_or(w, |x| x.min(w)));
            }
            if self.outstanding.load(Ordering::Acquire) >= self.prefetch {
                continue;
            }
            if let Some(((_, seq), stored)) = q.ready.pop_first() {
                self.next_queue = (self.next_queue + i + 1) % n;
                let token = self.broker.inner.seq.fetch_add(1, Ordering::Relaxed);
                let delivery = Delivery::new(
                    Ok(stored.message.clone()),
                    name.clone(),
                    stored.redeliveries,
                    Box::new(MemoryAcker {
                        broker: self.broker.clone(),
                        queue: name.clone(),
                        seq,
                        token,
                        outstanding: self.outstanding.clone(),
                        settled: AtomicBool::new(false),
                    }),
                );
                q.unacked.insert(
                    seq,
                    Lease {
                        deadline: now + self.lease,
                        token,
                        stored,
                    },
                );
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                return Ok(delivery);
            }
        }
        Err(wake)
    }
}

impl Consumer for MemoryConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            loop {
                if self.broker.inner.closed.load(Ordering::Acquire) {
                    return Ok(None);
                }
                let inner = self.broker.inner.clone();
                let notified = inner.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match self.try_take() {
                    Ok(d) => return Ok(Some(d)),
                    Err(wake) => {
                        let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                        tokio::select! {
                            () = notified => {}
                            () = tokio::time::sleep_until(wake) => {}
                        }
                    }
                }
            }
        })
    }
}

#[derive(Debug)]
struct MemoryAcker {
    broker: MemoryBroker,
    queue: String,
    seq: u64,
    token: u64,
    outstanding: Arc<AtomicUsize>,
    settled: AtomicBool,
}

impl MemoryAcker {
    /// Frees the consumer's prefetch slot, once.
    fn release(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// This delivery's lease, unless it expired and the message went back to the queue.
    fn lease<'q>(&self, queues: &'q mut HashMap<String, Queue>) -> Option<&'q mut Lease> {
        queues
            .get_mut(&self.queue)?
            .unacked
            .get_mut(&self.seq)
            .filter(|lease| lease.token == self.token)
    }

    /// Removes the leased copy if this delivery still holds it.
    fn take(&self, queues: &mut HashMap<String, Queue>) -> Option<Stored> {
        self.release();
        self.lease(queues)?;
        queues
            .get_mut(&self.queue)?
            .unacked
            .remove(&self.seq)
            .map(|lease| lease.stored)
    }
}

impl Drop for MemoryAcker {
    /// A delivery dropped unsettled no longer counts against the prefetch; its message stays
    /// leased until the lease runs out, as if its consumer had died.
    fn drop(&mut self) {
        self.release();
    }
}

impl Acker for MemoryAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut queues = self.broker.inner.queues.lock().expect("memory broker lock");
            self.take(&mut queues);
            drop(queues);
            self.broker.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut queues = self.broker.inner.queues.lock().expect("memory broker lock");
            if let Some(mut stored) = self.take(&mut queues) {
                let q = queues.entry(self.queue.clone()).or_default();
                stored.redeliveries += 1;
                match requeue {
                    Requeue::Drop => {}
                    Requeue::Now => {
                        q.ready.insert((Reverse(stored.priority), self.seq), stored);
                    }
                    Requeue::After(d) => {
                        q.delayed.insert((Instant::now() + d, self.seq), stored);
                    }
                }
            }
            drop(queues);
            self.broker.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut queues = self.broker.inner.queues.lock().expect("memory broker lock");
            match self.lease(&mut queues) {
                Some(lease) => {
                    lease.deadline = Instant::now() + by;
                    Ok(())
                }
                None => Err(Error::lease_expired()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Body, ContentType, Headers, new_id};

    fn message() -> Message {
        let body = Body::new(vec![], serde_json::Map::new());
        Message::new(Headers::new("t", new_id()), &body, ContentType::Json).unwrap()
    }

    async fn leased_then_redelivered(
        broker: &MemoryBroker,
    ) -> (Delivery, Delivery, Box<dyn Consumer>) {
        let queues = ["q".to_owned()];
        broker
            .publish("q", &message(), PublishOptions::default())
            .await
            .unwrap();
        let lease = Duration::from_millis(50);
        let mut first = broker
            .consume(&queues, ConsumeOptions::new(1).lease(lease))
            .await
            .unwrap();
        let stale = first.next().await.unwrap().unwrap();
        let mut second = broker
            .consume(&queues, ConsumeOptions::new(1))
            .await
            .unwrap();
        let fresh = second.next().await.unwrap().unwrap();
        assert_eq!(fresh.redeliveries, 1);
        (stale, fresh, second)
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_whose_lease_expired_cannot_settle_the_new_copy() {
        let broker = MemoryBroker::new();
        let (stale, fresh, _second) = leased_then_redelivered(&broker).await;
        assert!(stale.extend_lease(Duration::from_secs(60)).await.is_err());
        stale.ack().await.unwrap();
        let s = broker.stats("q").await.unwrap();
        assert_eq!(s, QueueStats::new(0, 0, 1), "the new copy stays leased");
        fresh.ack().await.unwrap();
        assert_eq!(broker.stats("q").await.unwrap(), QueueStats::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_delivery_frees_its_prefetch_slot() {
        let broker = MemoryBroker::new();
        let queues = ["q".to_owned()];
        for _ in 0..2 {
            broker
                .publish("q", &message(), PublishOptions::default())
                .await
                .unwrap();
        }
        let mut c = broker
            .consume(&queues, ConsumeOptions::new(1))
            .await
            .unwrap();
        drop(c.next().await.unwrap().unwrap());
        let next = tokio::time::timeout(Duration::from_secs(1), c.next()).await;
        assert!(matches!(next, Ok(Ok(Some(_)))), "{next:?}");
    }
}
