//! The native layout (Redis Streams, `native_queues`): the whole broker conformance suite and
//! the probe case with every queue native, then what only this layout has: its keys, the
//! delivery counter across claims, lease extension beyond the consumer's lease, consumers
//! over both layouts, and a consumer killed with deliveries pending.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, DynBroker, PublishOptions, QueueStats, Requeue};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};
use redis::AsyncCommands;

use celeriac_core::{Consumer, Delivery};

use crate::util::{self, backend_with, broker_with, msg};

/// The next delivery within `within`, or `None`.
async fn next_within(c: &mut Box<dyn Consumer>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, c.next())
        .await
        .ok()
        .map(|r| r.expect("next").expect("not closed"))
}

fn native() -> RedisOptions {
    RedisOptions::default().native_queues(["*"])
}

async fn native_broker() -> Option<DynBroker> {
    if !util::redis_up() {
        return None;
    }
    Some(Arc::new(broker_with(&util::prefix(), native()).await))
}

celeriac_test::broker_conformance!(native_broker);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_reads_task_states_from_a_backend_on_the_same_server() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, native()).await;
    let backend = backend_with(&p, RedisOptions::default()).await;
    let elsewhere = RedisBackend::connect_with(
        "redis://127.0.0.1:6379/1",
        RedisOptions::default().global_keyprefix(&p),
    )
    .await
    .unwrap();
    celeriac_test::conformance::broker::case_result_probe(
        Arc::new(broker),
        Arc::new(backend),
        Arc::new(elsewhere),
    )
    .await;
}

/// Only the globs are native; a message lives in a stream entry, not in kombu's lists or
/// `unacked`; the URL's `native_queues` wins over the options'.
#[tokio::test]
async fn native_queues_are_streams_and_others_stay_kombus() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default().native_queues(["fast.*"])).await;
    assert!(broker.is_native("fast.x"));
    assert!(!broker.is_native("celery"));
    let url = format!("{}?native_queues=a%2Cb.*", util::URL);
    let by_url = RedisBroker::connect_with(&url, RedisOptions::default().global_keyprefix(&p))
        .await
        .unwrap();
    assert!(by_url.is_native("a") && by_url.is_native("b.c") && !by_url.is_native("fast.x"));

    for q in ["fast.x", "celery"] {
        broker.declare(q).await.unwrap();
        broker
            .publish(q, &msg(), PublishOptions::default())
            .await
            .unwrap();
    }
    let mut c = util::raw().await;
    let stream_len: u64 = redis::cmd("XLEN")
        .arg(format!("{p}celeriac.stream.fast.x"))
        .query_async(&mut c)
        .await
        .unwrap();
    let list_len: u64 = c.llen(format!("{p}fast.x")).await.unwrap();
    assert_eq!((stream_len, list_len), (1, 0));
    let kombu_len: u64 = c.llen(format!("{p}celery")).await.unwrap();
    assert_eq!(kombu_len, 1);
    let queues = broker.queues().await.unwrap();
    assert!(queues.contains(&"fast.x".to_owned()), "{queues:?}");

    let mut consumer = broker
        .consume(
            &["fast.x".to_owned(), "celery".to_owned()],
            ConsumeOptions::new(4),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut consumer, Duration::from_secs(5))
            .await
            .expect("a delivery from each layout");
        got.push(d.queue.clone());
        if d.queue == "fast.x" {
            let id = d.message.as_ref().unwrap().id().to_owned();
            let entries: Vec<String> = c.hvals(format!("{p}unacked")).await.unwrap();
            assert!(
                entries.iter().all(|e| !e.contains(&id)),
                "a native delivery is not in kombu's unacked"
            );
        }
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, ["celery", "fast.x"]);
    let stream_len: u64 = redis::cmd("XLEN")
        .arg(format!("{p}celeriac.stream.fast.x"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(stream_len, 0, "an ack deletes the entry");
}

/// Each lease that runs out counts a redelivery (the PEL's counter); a requeue carries the
/// count into the new entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_count_claims_and_requeues() {
    if !util::redis_up() {
        return;
    }
    let broker = broker_with(&util::prefix(), native()).await;
    let q = "counted".to_owned();
    broker.declare(&q).await.unwrap();
    let m = msg();
    broker
        .publish(&q, &m, PublishOptions::default())
        .await
        .unwrap();
    let lease = Duration::from_millis(300);
    let mut seen = Vec::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = broker
            .consume(
                std::slice::from_ref(&q),
                ConsumeOptions::new(1).lease(lease),
            )
            .await
            .unwrap();
        let d = next_within(&mut c, Duration::from_secs(10))
            .await
            .expect("redelivered after the lease");
        seen.push(d.redeliveries);
        // Held, never settled: its lease runs out.
        held.push((c, d));
    }
    assert_eq!(seen, [0, 1, 2]);
    let (_c, d) = held.pop().unwrap();
    d.reject(Requeue::Now).await.unwrap();
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(d.redeliveries, 3);
    // The old holders lost their leases: their settling does nothing.
    for (_c, old) in held {
        old.reject(Requeue::Now).await.unwrap();
    }
    d.ack().await.unwrap();
    assert_eq!(broker.stats(&q).await.unwrap(), QueueStats::new(0, 0, 0));
}

/// `extend_lease` beyond the consumer's own lease holds the message that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_extends_beyond_the_consumers_own() {
    if !util::redis_up() {
        return;
    }
    let broker = broker_with(&util::prefix(), native()).await;
    let q = "extended".to_owned();
    broker.declare(&q).await.unwrap();
    broker
        .publish(&q, &msg(), PublishOptions::default())
        .await
        .unwrap();
    let mut first = broker
        .consume(
            std::slice::from_ref(&q),
            ConsumeOptions::new(1).lease(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let d = next_within(&mut first, Duration::from_secs(5))
        .await
        .unwrap();
    d.extend_lease(Duration::from_secs(3)).await.unwrap();
    let mut second = broker
        .consume(
            std::slice::from_ref(&q),
            ConsumeOptions::new(1).lease(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert!(
        next_within(&mut second, Duration::from_millis(1500))
            .await
            .is_none(),
        "the extended lease holds"
    );
    d.ack().await.unwrap();
}

/// The server's CPU time (user + system, µs) so far, from `INFO cpu`.
async fn server_cpu_us(c: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(c).await.unwrap();
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (field("used_cpu_user") + field("used_cpu_sys")) * 1e6
}

/// Not a test: the server's CPU per message of each layout, publish + fetch + ack, one
/// consumer with a prefetch of 512 and 8 publishers. Run with
/// `cargo test -p celeriac-redis --test it --release -- --ignored --nocapture layout_cost`;
/// other clients of the server count too, so run it on a quiet server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn layout_cost() {
    if !util::redis_up() {
        return;
    }
    const N: usize = 40_000;
    for layout in ["kombu", "native", "kombu", "native"] {
        let options = if layout == "native" {
            native()
        } else {
            RedisOptions::default()
        };
        let broker = Arc::new(broker_with(&util::prefix(), options).await);
        let q = "cost".to_owned();
        broker.declare(&q).await.unwrap();
        let mut raw = util::raw().await;
        let before = server_cpu_us(&mut raw).await;
        let clock = std::time::Instant::now();
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let broker = broker.clone();
            let q = q.clone();
            senders.spawn(async move {
                for _ in 0..N / 8 {
                    broker
                        .publish(&q, &msg(), PublishOptions::default())
                        .await
                        .unwrap();
                }
            });
        }
        let mut c = broker
            .consume(std::slice::from_ref(&q), ConsumeOptions::new(512))
            .await
            .unwrap();
        let mut acks = tokio::task::JoinSet::new();
        for _ in 0..N {
            let d = next_within(&mut c, Duration::from_secs(30)).await.unwrap();
            acks.spawn(async move { d.ack().await.unwrap() });
            while acks.len() > 256 {
                acks.join_next().await;
            }
        }
        while acks.join_next().await.is_some() {}
        while senders.join_next().await.is_some() {}
        let secs = clock.elapsed().as_secs_f64();
        let cpu = server_cpu_us(&mut raw).await - before;
        println!(
            "{layout}: {N} messages in {secs:.2} s ({:.0}/s), server CPU {:.1} µs per message",
            N as f64 / secs,
            cpu / N as f64
        );
        assert_eq!(broker.stats(&q).await.unwrap().total(), 0);
    }
}
