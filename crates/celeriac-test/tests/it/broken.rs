//! Broken drivers: proof that the conformance cases can fail.
//!
//! Each test wraps the in-memory driver with one deliberate flaw and checks that the case
//! aimed at that flaw panics. These tests also use `#[tokio::test]` through celeriac-test's
//! re-export, which is how a driver crate without its own tokio dependency would write one.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState, Lease, Row};
use celeriac_core::memory::{MemoryBackend, MemoryBeatStore, MemoryBroker};
use celeriac_core::{
    Acker, BoxFuture, Broker, Capabilities, ConsumeOptions, Consumer, Delivery, DeliveryHandle,
    DynBackend, DynBeatStore, DynBroker, Message, PublishOptions, QueueStats, Requeue, Result,
    ResultBackend, TaskMeta,
};
use celeriac_test::conformance::{backend, beat, broker};

/// Runs `case` and fails unless it panics.
async fn assert_fails(case: impl Future<Output = ()> + Send + 'static) {
    let outcome = tokio::spawn(case).await;
    assert!(
        outcome.is_err_and(|e| e.is_panic()),
        "the case passed against a broken driver"
    );
}

// ===== a broken broker =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Ignores `not_before`.
    DeliversDelayedAtOnce,
    /// Claims priority support but stores everything at priority 0.
    IgnoresPriority,
    /// `extend_lease` does nothing.
    CannotExtendLeases,
    /// Loses user headers.
    DropsExtraHeaders,
}

#[derive(Debug)]
struct BrokenBroker {
    inner: MemoryBroker,
    flaw: Flaw,
}

fn broken_broker(flaw: Flaw) -> DynBroker {
    Arc::new(BrokenBroker {
        inner: MemoryBroker::new(),
        flaw,
    })
}

impl Broker for BrokenBroker {
    fn driver(&self) -> &'static str {
        "broken"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.declare(queue)
    }

    fn publish<'a>(
        &'a self,
        queue: &'a str,
        message: &'a Message,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut message = message.clone();
            let options = match self.flaw {
                Flaw::DeliversDelayedAtOnce => options.not_before(None),
                Flaw::IgnoresPriority => {
                    message.properties.priority = Some(0);
                    options.priority(Some(0))
                }
                Flaw::DropsExtraHeaders => {
                    message.headers.extra.clear();
                    options
                }
                Flaw::CannotExtendLeases => options,
            };
            self.inner.publish(queue, &message, options).await
        })
    }

    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            let inner = self.inner.consume(queues, options).await?;
            Ok(Box::new(BrokenConsumer {
                inner,
                flaw: self.flaw,
            }) as Box<dyn Consumer>)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.purge(queue)
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        self.inner.stats(queue)
    }

    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        self.inner.queues()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

#[derive(Debug)]
struct BrokenConsumer {
    inner: Box<dyn Consumer>,
    flaw: Flaw,
}

impl Consumer for BrokenConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            let delivery = self.inner.next().await?;
            Ok(delivery.map(|d| {
                if self.flaw != Flaw::CannotExtendLeases {
                    return d;
                }
                let (message, handle) = d.into_parts();
                let (queue, redeliveries) = (handle.queue.clone(), handle.redeliveries);
                Delivery::new(message, queue, redeliveries, Box::new(NoExtend(handle)))
            }))
        })
    }
}

#[derive(Debug)]
struct NoExtend(DeliveryHandle);

impl Acker for NoExtend {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.0.ack())
    }

    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.0.reject(requeue))
    }

    fn extend_lease(&self, _by: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn early_delayed_delivery_is_caught() {
    let b = broken_broker(Flaw::DeliversDelayedAtOnce);
    assert_fails(broker::case_delayed_never_early(b)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn ignored_priority_is_caught() {
    let b = broken_broker(Flaw::IgnoresPriority);
    assert_fails(broker::case_priority_order(b)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn a_lease_that_cannot_be_extended_is_caught() {
    let b = broken_broker(Flaw::CannotExtendLeases);
    assert_fails(broker::case_extend_lease_keeps_the_message(b)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn lost_headers_are_caught() {
    let b = broken_broker(Flaw::DropsExtraHeaders);
    assert_fails(broker::case_message_round_trips(b)).await;
}

// ===== a broken result backend =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendFlaw {
    /// Every store overwrites.
    IgnoresPrecedence,
    /// `wait` returns on any stored state.
    WaitsForAnyState,
    /// `incr` reads, yields, then writes.
    RacyIncr,
}

#[derive(Debug)]
struct BrokenBackend {
    inner: MemoryBackend,
    flaw: BackendFlaw,
    counters: Mutex<HashMap<String, i64>>,
}

fn broken_backend(flaw: BackendFlaw) -> DynBackend {
    Arc::new(BrokenBackend {
        inner: MemoryBackend::new(),
        flaw,
        counters: Mutex::default(),
    })
}

impl ResultBackend for BrokenBackend {
    fn driver(&self) -> &'static str {
        "broken"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if self.flaw == BackendFlaw::IgnoresPrecedence {
                self.inner.forget(&meta.task_id).await?;
            }
            self.inner.store(meta).await
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        self.inner.get(task_id)
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        if self.flaw != BackendFlaw::WaitsForAnyState {
            return self.inner.wait(task_id, timeout);
        }
        Box::pin(async move {
            loop {
                if let Some(meta) = self.inner.get(task_id).await? {
                    return Ok(meta);
                }
                tokio::task::yield_now().await;
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.forget(task_id)
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.save_group(group_id, task_ids)
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        self.inner.restore_group(group_id)
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        if self.flaw != BackendFlaw::RacyIncr {
            return self.inner.incr(key, by);
        }
        Box::pin(async move {
            let old = self.counters.lock().expect("lock").get(key).copied();
            tokio::task::yield_now().await;
            let new = old.unwrap_or(0) + by;
            self.counters
                .lock()
                .expect("lock")
                .insert(key.to_owned(), new);
            Ok(new)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn ignored_precedence_is_caught() {
    let b = broken_backend(BackendFlaw::IgnoresPrecedence);
    assert_fails(backend::case_precedence(b)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn waiting_for_any_state_is_caught() {
    let b = broken_backend(BackendFlaw::WaitsForAnyState);
    assert_fails(backend::case_wait_resolves_on_ready_state(b)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn a_racy_counter_is_caught() {
    let b = broken_backend(BackendFlaw::RacyIncr);
    assert_fails(backend::case_incr_is_atomic(b)).await;
}

// ===== a broken beat store =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BeatFlaw {
    /// Hands a current lease to anyone who asks.
    SharesTheLease,
    /// Checks the token and holder of a save, not the lease's expiry.
    SavesPastExpiry,
    /// Replacing an entry drops its pause and triggers.
    ReplaceDropsControls,
}

#[derive(Debug)]
struct BrokenBeatStore {
    inner: MemoryBeatStore,
    flaw: BeatFlaw,
}

fn broken_beat_store(flaw: BeatFlaw) -> DynBeatStore {
    Arc::new(BrokenBeatStore {
        inner: MemoryBeatStore::new(),
        flaw,
    })
}

impl BeatStore for BrokenBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: chrono::DateTime<chrono::Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        Box::pin(async move {
            let lease = self.inner.acquire(holder, now, ttl).await?;
            if lease.is_none() && self.flaw == BeatFlaw::SharesTheLease {
                let expires = now + chrono::Duration::from_std(ttl).expect("ttl");
                return Ok(Some(Lease::new(holder, 1, expires)));
            }
            Ok(lease)
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        self.inner.release(lease)
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        self.inner.load()
    }

    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: chrono::DateTime<chrono::Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>> {
        let now = if self.flaw == BeatFlaw::SavesPastExpiry {
            now.min(lease.expires_at - chrono::Duration::milliseconds(1))
        } else {
            now
        };
        self.inner.save(lease, now, name, state)
    }

    fn put_entry<'a>(
        &'a self,
        name: &'a str,
        spec: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.flaw == BeatFlaw::ReplaceDropsControls {
                self.inner.remove_entry(name).await?;
            }
            self.inner.put_entry(name, spec).await
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        self.inner.remove_entry(name)
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        self.inner.set_paused(name, paused)
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.trigger(name)
    }
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn a_shared_lease_is_caught() {
    let s = broken_beat_store(BeatFlaw::SharesTheLease);
    assert_fails(beat::case_lease_terms(s)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn a_save_past_the_lease_is_caught() {
    let s = broken_beat_store(BeatFlaw::SavesPastExpiry);
    assert_fails(beat::case_stale_leader_is_fenced(s)).await;
}

#[celeriac_test::__private::tokio::test(
    flavor = "multi_thread",
    worker_threads = 2,
    crate = "celeriac_test::__private::tokio"
)]
async fn controls_lost_on_replace_are_caught() {
    let s = broken_beat_store(BeatFlaw::ReplaceDropsControls);
    assert_fails(beat::case_replacing_an_entry_resets_its_state(s)).await;
}
