//! The broker cases: what every [`Broker`](celeriac_core::Broker) driver must do.
//!
//! Each `case_*` function takes a fresh handle from the driver's setup function, uses its own
//! queues, and panics with a readable message when the driver breaks the contract. Cases for an
//! optional capability (priority, lease extension) print a `SKIPPED:` notice and return when
//! [`capabilities`](celeriac_core::Broker::capabilities) says the driver lacks it.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::protocol::new_id;
use celeriac_core::{
    Body, ConsumeOptions, Consumer, ContentType, Delivery, DynBackend, DynBroker, Embed, ErrorKind,
    Headers, Message, PublishOptions, QueueStats, Requeue, Signature, TaskMeta, TaskState,
    TimeLimit,
};
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, json};
use tokio::time::{Instant, timeout};

use super::{CLOCK_TOLERANCE, EVENTUALLY, QUIET};
use crate::services::{test_message, unique_queue};

// ===== helpers =====

async fn consume(
    broker: &DynBroker,
    queues: &[String],
    options: ConsumeOptions,
) -> Box<dyn Consumer> {
    broker
        .consume(queues, options)
        .await
        .unwrap_or_else(|e| panic!("consume {queues:?} failed: {e:?}"))
}

async fn publish(broker: &DynBroker, queue: &str, message: &Message, options: PublishOptions) {
    broker
        .publish(queue, message, options)
        .await
        .unwrap_or_else(|e| panic!("publish to {queue} failed: {e:?}"));
}

/// Publishes `n` fresh messages with default options; returns their ids in publish order.
async fn publish_n(broker: &DynBroker, queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let m = test_message("conformance.task");
        publish(broker, queue, &m, PublishOptions::default()).await;
        ids.push(m.id().to_owned());
    }
    ids
}

/// The next delivery within `within`, or `None` when none came.
async fn next_within(consumer: &mut Box<dyn Consumer>, within: Duration) -> Option<Delivery> {
    match timeout(within, consumer.next()).await {
        Err(_) => None,
        Ok(Ok(Some(d))) => Some(d),
        Ok(Ok(None)) => panic!("consumer ended (Ok(None)) although the broker is open"),
        Ok(Err(e)) => panic!("consumer.next() failed: {e:?}"),
    }
}

/// The next delivery; fails the case when none comes within [`EVENTUALLY`].
async fn expect_delivery(consumer: &mut Box<dyn Consumer>, what: &str) -> Delivery {
    next_within(consumer, EVENTUALLY)
        .await
        .unwrap_or_else(|| panic!("no delivery within {EVENTUALLY:?}: expected {what}"))
}

/// Fails the case when a delivery comes within `window`.
async fn expect_quiet(consumer: &mut Box<dyn Consumer>, window: Duration, why: &str) {
    if let Some(d) = next_within(consumer, window).await {
        panic!(
            "unexpected delivery of {} from {} (redeliveries {}): {why}",
            id_of(&d),
            d.queue,
            d.redeliveries
        );
    }
}

fn id_of(d: &Delivery) -> String {
    match &d.message {
        Ok(m) => m.id().to_owned(),
        Err(e) => panic!("delivered message from {} does not decode: {e:?}", d.queue),
    }
}

async fn ack(d: Delivery) {
    d.ack()
        .await
        .unwrap_or_else(|e| panic!("ack failed: {e:?}"));
}

async fn stats(broker: &DynBroker, queue: &str) -> QueueStats {
    broker
        .stats(queue)
        .await
        .unwrap_or_else(|e| panic!("stats of {queue} failed: {e:?}"))
}

/// Polls `stats(queue)` until it equals `(ready, delayed, unacked)`; fails after [`EVENTUALLY`].
async fn expect_stats(broker: &DynBroker, queue: &str, expected: (u64, u64, u64), when: &str) {
    let expected = QueueStats::new(expected.0, expected.1, expected.2);
    let deadline = Instant::now() + EVENTUALLY;
    let mut interval = Duration::from_millis(1);
    loop {
        let got = stats(broker, queue).await;
        if got == expected {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "stats of {queue} {when}:\n  expected {expected:?}\n       got {got:?}\n\
                 (QueueStats::new(ready, delayed, unacked))"
            );
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

fn delayed_until(t: DateTime<Utc>) -> PublishOptions {
    PublishOptions::default().not_before(Some(t))
}

fn skipped(case: &str, broker: &DynBroker, capability: &str) {
    // Not eprintln!, which the test harness captures for passing tests.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {case} needs the {capability} capability, which the {} broker lacks",
        broker.driver()
    );
}

// ===== cases =====

/// publish → consume → ack: the message arrives once, unredelivered, and ack removes it.
pub async fn case_publish_consume_ack(broker: DynBroker) {
    let q = unique_queue("ack");
    broker.declare(&q).await.expect("declare");
    let m = test_message("conformance.ack");
    publish(&broker, &q, &m, PublishOptions::default()).await;
    expect_stats(&broker, &q, (1, 0, 0), "after one publish").await;

    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let d = expect_delivery(&mut c, "the published message").await;
    assert_eq!(id_of(&d), m.id(), "delivered a different message");
    assert_eq!(d.queue, q, "delivery names the wrong queue");
    assert_eq!(d.redeliveries, 0, "first delivery counted as a redelivery");
    assert!(!d.redelivered());
    expect_stats(&broker, &q, (0, 0, 1), "while the delivery is unacked").await;

    ack(d).await;
    expect_stats(&broker, &q, (0, 0, 0), "after ack").await;
    expect_quiet(&mut c, QUIET, "an acked message must not come back").await;
}

/// `declare` is idempotent and the queue is listed by `queues()`, empty.
pub async fn case_declare_lists_the_queue(broker: DynBroker) {
    let q = unique_queue("declare");
    broker.declare(&q).await.expect("declare");
    broker
        .declare(&q)
        .await
        .expect("declaring twice must succeed");
    let names = broker.queues().await.expect("queues");
    assert!(
        names.contains(&q),
        "declared queue {q} missing from queues() = {names:?}"
    );
    expect_stats(&broker, &q, (0, 0, 0), "of a new queue").await;
}

/// `reject(Drop)` removes the message for good.
pub async fn case_reject_drop_discards(broker: DynBroker) {
    let q = unique_queue("drop");
    broker.declare(&q).await.expect("declare");
    publish_n(&broker, &q, 1).await;
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let d = expect_delivery(&mut c, "the published message").await;
    d.reject(Requeue::Drop).await.expect("reject(Drop)");
    expect_stats(&broker, &q, (0, 0, 0), "after reject(Drop)").await;
    expect_quiet(&mut c, QUIET, "a dropped message must not come back").await;
}

/// `reject(Now)` redelivers at once, with `redeliveries` incremented.
pub async fn case_reject_now_redelivers(broker: DynBroker) {
    let q = unique_queue("requeue");
    broker.declare(&q).await.expect("declare");
    let ids = publish_n(&broker, &q, 1).await;
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let d = expect_delivery(&mut c, "the published message").await;
    assert_eq!(d.redeliveries, 0);
    d.reject(Requeue::Now).await.expect("reject(Now)");

    let again = expect_delivery(&mut c, "the message rejected with Requeue::Now").await;
    assert_eq!(id_of(&again), ids[0]);
    assert_eq!(again.redeliveries, 1, "reject(Now) must count a redelivery");
    assert!(again.redelivered());
    ack(again).await;
    expect_stats(&broker, &q, (0, 0, 0), "after ack").await;
}

/// `reject(After(d))` parks the message as delayed and redelivers it no sooner than `d`.
pub async fn case_reject_after_waits(broker: DynBroker) {
    let delay = Duration::from_millis(700);
    let q = unique_queue("reject-after");
    broker.declare(&q).await.expect("declare");
    let ids = publish_n(&broker, &q, 1).await;
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let d = expect_delivery(&mut c, "the published message").await;

    let rejected_at = Instant::now();
    d.reject(Requeue::After(delay))
        .await
        .expect("reject(After)");
    let s = stats(&broker, &q).await;
    // Only meaningful while the delay has not passed (a slow machine may get here late).
    if rejected_at.elapsed() + CLOCK_TOLERANCE < delay {
        assert_eq!(
            s,
            QueueStats::new(0, 1, 0),
            "a message rejected with After(d) is delayed until d has passed"
        );
    }

    let again = expect_delivery(&mut c, "the message rejected with Requeue::After").await;
    let waited = rejected_at.elapsed();
    assert!(
        waited + CLOCK_TOLERANCE >= delay,
        "redelivered after {waited:?}, before the requeue delay of {delay:?}"
    );
    assert_eq!(id_of(&again), ids[0]);
    assert_eq!(
        again.redeliveries, 1,
        "reject(After) must count a redelivery"
    );
    ack(again).await;
    expect_stats(&broker, &q, (0, 0, 0), "after ack").await;
}

/// A delivery that is not acked returns, to another consumer, once its lease has expired.
pub async fn case_lease_expiry_redelivers(broker: DynBroker) {
    let lease = Duration::from_millis(600);
    let q = unique_queue("lease");
    broker.declare(&q).await.expect("declare");
    let ids = publish_n(&broker, &q, 1).await;

    let mut first = consume(
        &broker,
        std::slice::from_ref(&q),
        ConsumeOptions::new(1).lease(lease),
    )
    .await;
    let leased_from = Instant::now();
    let held = expect_delivery(&mut first, "the published message").await;
    assert_eq!(held.redeliveries, 0);

    let mut second = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let again = expect_delivery(&mut second, "the message whose lease expired").await;
    let after = leased_from.elapsed();
    assert!(
        after + CLOCK_TOLERANCE >= lease,
        "redelivered after {after:?}, before the lease of {lease:?} ran out"
    );
    assert_eq!(id_of(&again), ids[0]);
    assert!(
        again.redeliveries >= 1,
        "a redelivery after lease expiry must count (redeliveries = {})",
        again.redeliveries
    );
    ack(again).await;
    expect_stats(&broker, &q, (0, 0, 0), "after the second consumer acked").await;
    drop(held);
}

/// `extend_lease` keeps a delivery from being handed out again while its task runs.
pub async fn case_extend_lease_keeps_the_message(broker: DynBroker) {
    if !broker.capabilities().lease_extension {
        return skipped(
            "case_extend_lease_keeps_the_message",
            &broker,
            "lease_extension",
        );
    }
    let lease = Duration::from_secs(1);
    let step = Duration::from_millis(250);
    let q = unique_queue("extend");
    broker.declare(&q).await.expect("declare");
    publish_n(&broker, &q, 1).await;

    let mut first = consume(
        &broker,
        std::slice::from_ref(&q),
        ConsumeOptions::new(1).lease(lease),
    )
    .await;
    let d = expect_delivery(&mut first, "the published message").await;
    let mut second = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    // Six steps of 250 ms outlast the 1 s lease; each extension pushes it 1 s ahead.
    for _ in 0..6 {
        expect_quiet(&mut second, step, "its lease was being extended").await;
        d.extend_lease(lease).await.expect("extend_lease");
    }
    expect_stats(&broker, &q, (0, 0, 1), "while the lease is extended").await;
    ack(d).await;
    expect_stats(&broker, &q, (0, 0, 0), "after ack").await;
    expect_quiet(&mut second, QUIET, "an acked message must not come back").await;
}

/// A delayed message is stored as delayed, never delivered before its not-before time, and
/// delivered after it; it does not hold back ready messages.
pub async fn case_delayed_never_early(broker: DynBroker) {
    let delay = chrono::Duration::milliseconds(600);
    let q = unique_queue("delayed");
    broker.declare(&q).await.expect("declare");

    let soon = Utc::now() + delay;
    let delayed = test_message("conformance.delayed");
    publish(&broker, &q, &delayed, delayed_until(soon)).await;
    let far = test_message("conformance.far");
    publish(
        &broker,
        &q,
        &far,
        delayed_until(Utc::now() + chrono::Duration::hours(1)),
    )
    .await;
    let ready = test_message("conformance.ready");
    publish(&broker, &q, &ready, PublishOptions::default()).await;

    let s = stats(&broker, &q).await;
    if Utc::now() + CLOCK_TOLERANCE < soon {
        assert_eq!(
            s,
            QueueStats::new(1, 2, 0),
            "two delayed messages and one ready"
        );
    }

    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(10)).await;
    let mut got_delayed = false;
    for _ in 0..2 {
        let d = expect_delivery(&mut c, "the ready and the due delayed message").await;
        let at = Utc::now();
        let id = id_of(&d);
        if id == delayed.id() {
            assert!(
                at + CLOCK_TOLERANCE >= soon,
                "delayed message delivered {:?} early",
                (soon - at).to_std().unwrap_or_default()
            );
            assert_eq!(d.redeliveries, 0);
            got_delayed = true;
        } else if id == far.id() {
            panic!("a message delayed by an hour was delivered at once");
        } else {
            assert_eq!(id, ready.id());
            assert!(!got_delayed || at + CLOCK_TOLERANCE >= soon);
        }
        ack(d).await;
    }
    assert!(got_delayed);
    expect_quiet(&mut c, QUIET, "the other message is delayed by an hour").await;
    expect_stats(&broker, &q, (0, 1, 0), "with the hour-long delay pending").await;
    assert_eq!(broker.purge(&q).await.expect("purge"), 1);
}

/// Higher priority first; FIFO among equal priorities; `None` takes the message's own
/// priority property.
pub async fn case_priority_order(broker: DynBroker) {
    if !broker.capabilities().priority {
        return skipped("case_priority_order", &broker, "priority");
    }
    let q = unique_queue("priority");
    broker.declare(&q).await.expect("declare");
    // (label, publish option, message property)
    let plan: [(&str, Option<u8>, u8); 7] = [
        ("a0", Some(0), 0),
        ("b5", Some(5), 0),
        ("c9", Some(9), 0),
        ("d5", Some(5), 9),
        ("e7-from-property", None, 7),
        ("f0", Some(0), 0),
        ("g9", Some(9), 0),
    ];
    let mut label_of = HashMap::new();
    for (label, option, property) in plan {
        let mut m = test_message("conformance.priority");
        m.properties.priority = Some(property);
        publish(&broker, &q, &m, PublishOptions::default().priority(option)).await;
        label_of.insert(m.id().to_owned(), label);
    }
    expect_stats(&broker, &q, (7, 0, 0), "after publishing").await;

    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(10)).await;
    let mut order = Vec::new();
    for _ in 0..plan.len() {
        let d = expect_delivery(&mut c, "the prioritised messages").await;
        order.push(label_of[&id_of(&d)]);
        ack(d).await;
    }
    assert_eq!(
        order,
        ["c9", "g9", "e7-from-property", "b5", "d5", "a0", "f0"],
        "delivery order: higher priority first, FIFO within a priority"
    );
}

/// Messages of one priority come out in publish order.
pub async fn case_fifo_within_a_priority(broker: DynBroker) {
    let q = unique_queue("fifo");
    broker.declare(&q).await.expect("declare");
    let ids = publish_n(&broker, &q, 10).await;
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let mut got = Vec::new();
    for _ in 0..ids.len() {
        let d = expect_delivery(&mut c, "the next message in publish order").await;
        got.push(id_of(&d));
        ack(d).await;
    }
    assert_eq!(got, ids, "messages of equal priority must come out FIFO");
}

/// `purge` deletes ready and delayed messages, returns how many, and leaves unacked ones.
pub async fn case_purge_counts_ready_and_delayed(broker: DynBroker) {
    let q = unique_queue("purge");
    broker.declare(&q).await.expect("declare");
    assert_eq!(
        broker.purge(&q).await.expect("purge"),
        0,
        "purge of an empty queue"
    );

    publish_n(&broker, &q, 3).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    for _ in 0..2 {
        publish(
            &broker,
            &q,
            &test_message("conformance.later"),
            delayed_until(later),
        )
        .await;
    }
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let held = expect_delivery(&mut c, "a ready message").await;
    expect_stats(&broker, &q, (2, 2, 1), "before purge").await;

    assert_eq!(
        broker.purge(&q).await.expect("purge"),
        4,
        "purge returns the count of ready + delayed messages"
    );
    expect_stats(
        &broker,
        &q,
        (0, 0, 1),
        "after purge (the unacked one stays)",
    )
    .await;
    ack(held).await;
    expect_stats(&broker, &q, (0, 0, 0), "after ack").await;
    assert_eq!(broker.purge(&q).await.expect("purge"), 0);
    expect_quiet(&mut c, QUIET, "the queue was purged").await;
}

/// `stats` counts ready, delayed and unacked messages through ack and requeue.
pub async fn case_stats_count_each_state(broker: DynBroker) {
    let q = unique_queue("stats");
    broker.declare(&q).await.expect("declare");
    publish_n(&broker, &q, 4).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    publish(
        &broker,
        &q,
        &test_message("conformance.later"),
        delayed_until(later),
    )
    .await;
    expect_stats(
        &broker,
        &q,
        (4, 1, 0),
        "after publishing 4 ready + 1 delayed",
    )
    .await;

    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(2)).await;
    let a = expect_delivery(&mut c, "a first message").await;
    let b = expect_delivery(&mut c, "a second message").await;
    expect_stats(&broker, &q, (2, 1, 2), "with two deliveries unacked").await;
    ack(a).await;
    expect_stats(&broker, &q, (2, 1, 1), "after one ack").await;
    b.reject(Requeue::Now).await.expect("reject(Now)");
    expect_stats(&broker, &q, (3, 1, 0), "after requeueing the other").await;
    assert_eq!(broker.purge(&q).await.expect("purge"), 4);
}

/// A consumer never holds more unacked deliveries than its prefetch; settling one frees a slot.
pub async fn case_prefetch_limit(broker: DynBroker) {
    let q = unique_queue("prefetch");
    broker.declare(&q).await.expect("declare");
    publish_n(&broker, &q, 5).await;

    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(2)).await;
    let a = expect_delivery(&mut c, "the first of two prefetched").await;
    let b = expect_delivery(&mut c, "the second of two prefetched").await;
    expect_quiet(
        &mut c,
        QUIET,
        "prefetch is 2 and two deliveries are unacked",
    )
    .await;
    expect_stats(&broker, &q, (3, 0, 2), "with the prefetch limit reached").await;

    ack(a).await;
    let third = expect_delivery(&mut c, "a third message once one was acked").await;
    expect_quiet(&mut c, QUIET, "prefetch is 2 again").await;

    b.reject(Requeue::Drop).await.expect("reject(Drop)");
    let fourth = expect_delivery(&mut c, "a fourth message once one was rejected").await;
    expect_quiet(&mut c, QUIET, "prefetch is 2 again").await;
    ack(third).await;
    ack(fourth).await;
    let fifth = expect_delivery(&mut c, "the last message").await;
    ack(fifth).await;
    expect_stats(&broker, &q, (0, 0, 0), "after all were settled").await;
}

/// Several consumers on one queue, fed while they run, receive each message exactly once.
pub async fn case_concurrent_consumers_exactly_once(broker: DynBroker) {
    const MESSAGES: usize = 200;
    const CONSUMERS: usize = 4;
    let q = unique_queue("concurrent");
    broker.declare(&q).await.expect("declare");

    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let received = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + EVENTUALLY * 2;
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(4)).await;
        let (seen, received) = (seen.clone(), received.clone());
        consumers.push(tokio::spawn(async move {
            while received.load(Ordering::SeqCst) < MESSAGES && Instant::now() < deadline {
                if let Some(d) = next_within(&mut c, Duration::from_millis(100)).await {
                    *seen.lock().expect("lock").entry(id_of(&d)).or_default() += 1;
                    ack(d).await;
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let publisher = {
        let broker = broker.clone();
        let q = q.clone();
        tokio::spawn(async move { publish_n(&broker, &q, MESSAGES).await })
    };
    let ids = publisher.await.expect("publisher task");
    for c in consumers {
        c.await.expect("consumer task");
    }

    let seen = seen.lock().expect("lock").clone();
    let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && duplicated.is_empty() && seen.len() == MESSAGES,
        "{CONSUMERS} consumers must receive each of {MESSAGES} messages exactly once: \
         {} missing, duplicated {duplicated:?}, {} distinct received",
        missing.len(),
        seen.len()
    );
    expect_stats(&broker, &q, (0, 0, 0), "after every message was acked").await;
}

/// One consumer over several queues receives from all of them, each delivery naming its queue.
pub async fn case_one_consumer_many_queues(broker: DynBroker) {
    let queues: Vec<String> = (0..3).map(|i| unique_queue(&format!("multi{i}"))).collect();
    let mut queue_of = HashMap::new();
    for q in &queues {
        broker.declare(q).await.expect("declare");
        for id in publish_n(&broker, q, 2).await {
            queue_of.insert(id, q.clone());
        }
    }
    let mut c = consume(&broker, &queues, ConsumeOptions::new(10)).await;
    for _ in 0..queue_of.len() {
        let d = expect_delivery(&mut c, "a message from one of the three queues").await;
        let id = id_of(&d);
        let expected = queue_of
            .remove(&id)
            .unwrap_or_else(|| panic!("message {id} delivered twice or never published"));
        assert_eq!(d.queue, expected, "delivery names the wrong queue");
        ack(d).await;
    }
    assert!(queue_of.is_empty());
    expect_quiet(&mut c, QUIET, "every message was acked").await;
}

/// `publish_batch` stores every message with its own options, in order.
pub async fn case_publish_batch(broker: DynBroker) {
    let q = unique_queue("batch");
    broker.declare(&q).await.expect("declare");
    broker
        .publish_batch(&q, &[])
        .await
        .expect("an empty batch is fine");
    let later = Utc::now() + chrono::Duration::hours(1);
    let mut batch: Vec<(Message, PublishOptions)> = (0..4)
        .map(|_| (test_message("conformance.batch"), PublishOptions::default()))
        .collect();
    batch.insert(2, (test_message("conformance.later"), delayed_until(later)));
    broker
        .publish_batch(&q, &batch)
        .await
        .expect("publish_batch");
    expect_stats(
        &broker,
        &q,
        (4, 1, 0),
        "after a batch of 4 ready + 1 delayed",
    )
    .await;

    let expected: Vec<String> = batch
        .iter()
        .filter(|(_, o)| o.not_before.is_none())
        .map(|(m, _)| m.id().to_owned())
        .collect();
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let d = expect_delivery(&mut c, "the batch's ready messages").await;
        got.push(id_of(&d));
        ack(d).await;
    }
    assert_eq!(got, expected, "a batch is delivered in order");
    assert_eq!(
        broker.purge(&q).await.expect("purge"),
        1,
        "the delayed one remains"
    );
}

/// A message comes back exactly as published: every header, property and body byte.
pub async fn case_message_round_trips(broker: DynBroker) {
    let q = unique_queue("round-trip");
    broker.declare(&q).await.expect("declare");
    let now = Utc::now().trunc_subsecs(6);
    let id = new_id();
    let mut headers = Headers::new("conformance.round_trip", id.clone());
    headers.shadow = Some("shadow-name".into());
    headers.eta = Some(now - chrono::Duration::days(1));
    headers.expires = Some(now + chrono::Duration::days(1));
    headers.group = Some(new_id());
    headers.group_index = Some(3);
    headers.retries = 2;
    headers.timelimit = TimeLimit {
        hard: Some(30.0),
        soft: Some(10.5),
    };
    headers.root_id = Some(new_id());
    headers.parent_id = Some(new_id());
    headers.argsrepr = Some("(1, 'ünï')".into());
    headers.kwargsrepr = Some("{'k': 'v'}".into());
    headers.origin = Some("gen42@host.example".into());
    headers.ignore_result = true;
    headers.replaced_task_nesting = 1;
    headers.stamped_headers = Some(vec!["tenant".into()]);
    headers.stamps.insert("tenant".into(), json!("acme"));
    headers
        .extra
        .insert("x-trace".into(), json!({"spans": [1, null, "ü"]}));
    let body = Body {
        args: vec![
            json!(1),
            json!("ünïcødé ✓ \"quoted\" back\\slash\nnewline"),
            json!({"nested": [true, null, 1.5, -7]}),
        ],
        kwargs: Map::from_iter([("k".to_owned(), json!("v"))]),
        embed: Embed {
            callbacks: Some(vec![Signature::new("conformance.cb", vec![json!(1)])]),
            ..Embed::default()
        },
    };
    let mut rich = Message::new(headers, &body, ContentType::Json).expect("encode");
    rich.properties.reply_to = Some(format!("reply-{id}"));
    rich.properties.priority = Some(3);

    let mut binary = test_message("conformance.binary");
    binary.content_type = "application/x-conformance-binary".into();
    binary.content_encoding = "binary".into();
    binary.body = (0..=255u8).chain((0..=255u8).rev()).collect();

    for original in [&rich, &binary] {
        publish(&broker, &q, original, PublishOptions::default()).await;
    }
    let mut c = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(2)).await;
    for _ in 0..2 {
        let d = expect_delivery(&mut c, "the published messages").await;
        let got = d
            .message
            .as_ref()
            .expect("delivered message decodes")
            .clone();
        let original = if got.id() == rich.id() {
            &rich
        } else {
            &binary
        };
        assert_eq!(&got, original, "the message must come back unchanged");
        if got.id() == rich.id() {
            assert_eq!(got.decode_body().expect("decode body"), body);
        }
        ack(d).await;
    }
}

/// Dropping a `next()` future (a timeout, a `select!`) loses no message.
pub async fn case_next_is_cancel_safe(broker: DynBroker) {
    const MESSAGES: usize = 20;
    // Mostly short waits that cancel `next()` at different points, and a patient one now and
    // then so that a slow driver still makes progress.
    const WAITS_MS: [u64; 8] = [0, 1, 2, 3, 5, 8, 13, 1000];
    let q = unique_queue("cancel");
    broker.declare(&q).await.expect("declare");
    let ids = publish_n(&broker, &q, MESSAGES).await;
    expect_stats(&broker, &q, (MESSAGES as u64, 0, 0), "after publishing").await;

    let mut c = consume(
        &broker,
        std::slice::from_ref(&q),
        ConsumeOptions::new(MESSAGES),
    )
    .await;
    let mut got = Vec::new();
    let mut cancelled = 0usize;
    let deadline = Instant::now() + EVENTUALLY;
    let mut i = 0;
    while got.len() < MESSAGES && Instant::now() < deadline {
        match next_within(&mut c, Duration::from_millis(WAITS_MS[i % WAITS_MS.len()])).await {
            Some(d) => {
                got.push(id_of(&d));
                ack(d).await;
            }
            None => cancelled += 1,
        }
        i += 1;
    }
    got.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        got, expected,
        "every message must be received once although {cancelled} next() calls were cancelled"
    );
    expect_stats(&broker, &q, (0, 0, 0), "after every message was acked").await;
}

/// `close` ends consumers with `Ok(None)` and later calls fail with [`ErrorKind::Closed`].
pub async fn case_close_ends_consumers(broker: DynBroker) {
    let q = unique_queue("close");
    broker.declare(&q).await.expect("declare");
    let mut waiting = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let mut idle = consume(&broker, std::slice::from_ref(&q), ConsumeOptions::new(1)).await;
    let waiter = tokio::spawn(async move {
        let r = waiting.next().await;
        (r.map(|d| d.map(|d| id_of(&d))), waiting)
    });

    broker.close().await.expect("close");
    let (r, mut waiting) = timeout(EVENTUALLY, waiter)
        .await
        .expect("a consumer waiting in next() must end when the broker closes")
        .expect("consumer task");
    match r {
        Ok(None) => {}
        Ok(Some(id)) => panic!("delivered {id} after close"),
        Err(e) => panic!("next() must return Ok(None) after close, got {e:?}"),
    }
    for (name, c) in [("the ended", &mut waiting), ("an idle", &mut idle)] {
        match timeout(EVENTUALLY, c.next()).await {
            Ok(Ok(None)) => {}
            other => {
                panic!("{name} consumer's next() after close: expected Ok(None), got {other:?}")
            }
        }
    }

    let m = test_message("conformance.closed");
    let closed = |what: &str, kind: Option<ErrorKind>| {
        assert_eq!(
            kind,
            Some(ErrorKind::Closed),
            "{what} after close must fail with ErrorKind::Closed"
        );
    };
    closed(
        "publish",
        broker
            .publish(&q, &m, PublishOptions::default())
            .await
            .err()
            .map(|e| e.kind()),
    );
    closed(
        "publish_batch",
        broker
            .publish_batch(&q, &[(m.clone(), PublishOptions::default())])
            .await
            .err()
            .map(|e| e.kind()),
    );
    closed(
        "consume",
        broker
            .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
            .await
            .err()
            .map(|e| e.kind()),
    );
    closed("declare", broker.declare(&q).await.err().map(|e| e.kind()));
    closed("purge", broker.purge(&q).await.err().map(|e| e.kind()));
    closed("stats", broker.stats(&q).await.err().map(|e| e.kind()));
    closed("queues", broker.queues().await.err().map(|e| e.kind()));
}

// ===== result probe (drivers that read task states with the fetch) =====

/// For drivers that read each task's state with the fetch ([`ConsumeOptions::result_probe`]);
/// not stamped by [`broker_conformance!`](crate::broker_conformance), since it needs a backend
/// on the broker's store: drivers call it by hand.
///
/// Consumed with `backend`'s probe, a task with nothing stored comes with "nothing stored", a
/// finished one and a revoked one with their states, each under its own id. Consumed without
/// a probe, or with `elsewhere`'s (a backend on another store), no state comes. A message
/// whose `correlation_id` names another task either comes without a state or with that other
/// task's (the worker compares the id and reads the state itself), never with a state filed
/// under its own id that belongs to the other.
pub async fn case_result_probe(broker: DynBroker, backend: DynBackend, elsewhere: DynBackend) {
    let probe = backend
        .capabilities()
        .probe
        .expect("the backend names where it keeps task states");
    assert!(
        elsewhere.capabilities().probe != Some(probe.clone()),
        "two stores with the same probe"
    );
    let q = unique_queue("probe");
    broker.declare(&q).await.expect("declare");
    let (fresh, done, revoked) = (
        test_message("conformance.task"),
        test_message("conformance.task"),
        test_message("conformance.task"),
    );
    let mut other = test_message("conformance.task");
    other.properties.correlation_id = revoked.id().to_owned();
    backend
        .store(&TaskMeta::success(done.id(), json!(3)))
        .await
        .expect("store");
    backend
        .store(&TaskMeta::new(
            revoked.id(),
            TaskState::Revoked,
            json!(null),
        ))
        .await
        .expect("store");
    for m in [&fresh, &done, &revoked, &other] {
        publish(&broker, &q, m, PublishOptions::default()).await;
    }

    let queues = [q.clone()];
    let mut c = consume(
        &broker,
        &queues,
        ConsumeOptions::new(10).result_probe(Some(probe)),
    )
    .await;
    let mut seen = HashMap::new();
    for _ in 0..4 {
        let d = next_within(&mut c, EVENTUALLY)
            .await
            .expect("a delivery in time");
        let id = d.message.as_ref().expect("decodes").id().to_owned();
        seen.insert(id, d.stored.clone());
        d.ack().await.expect("ack");
    }
    let state_of = |m: &Message| {
        let s = seen[m.id()].as_ref().expect("a state read with the fetch");
        assert_eq!(s.task_id, m.id(), "the state is filed under the task's id");
        s.state.clone()
    };
    assert_eq!(state_of(&fresh), None);
    assert_eq!(state_of(&done), Some(TaskState::Success));
    assert_eq!(state_of(&revoked), Some(TaskState::Revoked));
    if let Some(s) = &seen[other.id()] {
        assert_eq!(
            (s.task_id.as_str(), &s.state),
            (revoked.id(), &Some(TaskState::Revoked)),
            "a mismatched correlation_id is read under that id, not the task's"
        );
    }

    for probe in [None, elsewhere.capabilities().probe] {
        publish(
            &broker,
            &q,
            &test_message("conformance.task"),
            PublishOptions::default(),
        )
        .await;
        let mut c = consume(&broker, &queues, ConsumeOptions::new(1).result_probe(probe)).await;
        let d = next_within(&mut c, EVENTUALLY)
            .await
            .expect("a delivery in time");
        assert_eq!(d.stored, None, "no state without a probe of this store");
        d.ack().await.expect("ack");
    }
}
