//! Faults: a private PostgreSQL server stops as if it crashed (`pg_ctl stop -m immediate`) in
//! the middle of a run of acks-late tasks, and starts again. Nothing committed is lost, the
//! consumer and the result waiters carry on by themselves, and every task runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{Broker, Config, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta};
use celeriac_postgres::{PgBackend, PgBroker};
use serde_json::json;
use tokio::time::Instant;

use crate::private_pg::{PASSWORD, PrivatePg};

/// Retries `f` until it succeeds or `within` passes (publishes during the outage).
async fn retry<T, F, Fut>(within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = celeriac_core::Result<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "still failing: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_run_loses_no_acks_late_task() {
    const N: usize = 600;
    let Some(pg) = PrivatePg::start_with("restart", "-c wal_writer_delay=10s") else {
        return;
    };
    let mut config = Config::default();
    // A short lease: acks lost with the connection come back quickly as redeliveries.
    config.visibility_timeout = Duration::from_secs(2);
    let url = pg.url("postgres", PASSWORD, "postgres");
    let broker = PgBroker::connect(&url, &config).await.unwrap();
    let backend = PgBackend::connect(&url, &config).await.unwrap();
    let waiter = PgBackend::connect(&url, &config).await.unwrap();
    let queue = "restart".to_owned();

    let mut ids = Vec::new();
    for _ in 0..N {
        let m = celeriac_test::services::test_message("t.restart");
        ids.push(m.id().to_owned());
        broker
            .publish(&queue, &m, PublishOptions::default())
            .await
            .unwrap();
    }
    // A result waiter that starts before the outage and ends after it.
    let last = ids[N - 1].clone();
    let waiting =
        tokio::spawn(async move { waiter.wait(&last, Some(Duration::from_secs(60))).await });

    // The consumer: "runs" a task (records its id), stores its result, then acks (acks late).
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let errors = Arc::new(Mutex::new(0usize));
    let consumer = {
        let (broker, backend, runs, errors, queue) = (
            broker.clone(),
            backend.clone(),
            runs.clone(),
            errors.clone(),
            queue.clone(),
        );
        tokio::spawn(async move {
            let mut c = broker
                .consume(&[queue], ConsumeOptions::new(16))
                .await
                .unwrap();
            loop {
                let d = match c.next().await {
                    Ok(Some(d)) => d,
                    Ok(None) => return,
                    Err(_) => {
                        *errors.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let id = d.message.as_ref().unwrap().id().to_owned();
                *runs.lock().unwrap().entry(id.clone()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
                let stored = backend.store(&TaskMeta::success(&id, json!(1))).await;
                if stored.is_err() || d.ack().await.is_err() {
                    // Not acked: it comes back after its lease, and runs again.
                    *errors.lock().unwrap() += 1;
                }
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while runs.lock().unwrap().len() < N / 3 {
        assert!(Instant::now() < deadline, "the consumer is too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pg.stop();
    let stopped = Instant::now();
    let ran_before = runs.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.start_again();
    let down = stopped.elapsed();

    // Published after the restart: delivered too (the publisher retries while it reconnects).
    let after = celeriac_test::services::test_message("t.restart");
    let after_id = after.id().to_owned();
    retry(Duration::from_secs(30), || {
        broker.publish(&queue, &after, PublishOptions::default())
    })
    .await;
    ids.push(after_id);

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = ids.iter().all(|id| runs.lock().unwrap().contains_key(id));
        if done {
            break;
        }
        let n = runs.lock().unwrap().len();
        assert!(
            Instant::now() < deadline,
            "only {n} of {} tasks ran after the restart",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = stopped.elapsed();
    // Every result is stored, and the waiter that spanned the outage got its answer.
    // (The last ones may still be on their way: a run is recorded before its result.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let stored = retry(Duration::from_secs(30), || backend.get_many(&ids)).await;
        let missing = stored.iter().filter(|m| m.is_none()).count();
        if missing == 0 || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let waited = waiting.await.unwrap();
    // Everything acked in the end: nothing left in the queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = retry(Duration::from_secs(10), || broker.stats(&queue)).await;
        if s.total() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "queue not drained: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.close().await.unwrap();
    consumer.await.unwrap();
    let runs = runs.lock().unwrap();
    let duplicates: usize = runs.values().map(|n| n - 1).sum();
    println!(
        "postgres restart: tasks {}, ran before the stop {ran_before}, server down {:.2}s, \
         all run {:.2}s after the stop, duplicates {duplicates}, consumer errors {}, \
         results missing {missing}",
        ids.len(),
        down.as_secs_f64(),
        recovered.as_secs_f64(),
        errors.lock().unwrap(),
    );
    assert_eq!(missing, 0, "results lost");
    assert!(waited.is_ok(), "the waiter across the outage: {waited:?}");
    assert_eq!(runs.len(), ids.len());
}

/// A private server whose WAL writer runs at its slowest (so that an asynchronous commit is
/// still unwritten at a crash right after it), with one message published to `queue` and
/// leased by a consumer.
struct Leased {
    pg: PrivatePg,
    url: String,
    broker: PgBroker,
    consumer: Box<dyn celeriac_core::Consumer>,
    delivery: celeriac_core::Delivery,
    message: celeriac_core::Message,
}

async fn leased_on_a_slow_wal(name: &str, queue: &str) -> Option<Leased> {
    let pg = PrivatePg::start_with(name, "-c wal_writer_delay=10s")?;
    let url = pg.url("postgres", PASSWORD, "postgres");
    let broker = PgBroker::connect(&url, &Config::default()).await.unwrap();
    let message = celeriac_test::services::test_message("t.crash");
    broker
        .publish(queue, &message, PublishOptions::default())
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&[queue.to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let delivery = consumer
        .next()
        .await
        .unwrap()
        .expect("the task is delivered");
    Some(Leased {
        pg,
        url,
        broker,
        consumer,
        delivery,
        message,
    })
}

/// A result store that returned `Ok` survives a crash, even when the task's ack runs only
/// after the restart (it waited for a connection through the outage). With the store's commit
/// still in the server's WAL buffers at the crash, the later ack would delete the message of a
/// task whose result is gone. The WAL writer is slowed to its longest cycle so that an
/// asynchronous commit surely is still unwritten at the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stored_before_a_crash_survives_it_when_the_ack_comes_after() {
    let Some(Leased {
        pg,
        url,
        broker,
        consumer: c,
        delivery: d,
        message: m,
    }) = leased_on_a_slow_wal("store-crash", "crash").await
    else {
        return;
    };
    let backend = PgBackend::connect(&url, &Config::default()).await.unwrap();
    let id = m.id().to_owned();
    // A publish commits synchronously: it writes out the WAL before it, the delivery's lease
    // included, so the lease survives the crash while the store below may not.
    let other = celeriac_test::services::test_message("t.other");
    broker
        .publish("elsewhere", &other, PublishOptions::default())
        .await
        .unwrap();
    backend
        .store(&TaskMeta::success(&id, json!(7)))
        .await
        .unwrap();
    pg.stop();
    pg.start_again();
    // The ack after the restart: it waits for a connection through the outage. (Should it
    // fail instead, the message stays and runs again: nothing is lost either way.)
    let acked = d.ack().await;
    let stored = retry(Duration::from_secs(30), || backend.get(&id)).await;
    let left = retry(Duration::from_secs(10), || broker.stats("crash")).await;
    assert!(
        stored.is_some() || left.total() > 0,
        "the task's message was acked ({acked:?}) and its result is gone (queue: {left:?})"
    );
    assert_eq!(
        stored.map(|m| m.result),
        Some(json!(7)),
        "a store that returned Ok is durable"
    );
    drop(c);
    broker.close().await.unwrap();
}

/// A lease lost in a crash (its fetch committed asynchronously) and the same message leased
/// again after the restart, with the same `deliveries` count: the first holder's ack must not
/// delete the second holder's message, which would then never run again should the second
/// holder die. The lease's end, part of the fencing token, tells the two leases apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_a_lease_lost_in_a_crash_leaves_the_new_lease_alone() {
    let Some(Leased {
        pg,
        url,
        broker,
        consumer: first,
        delivery: old,
        message: m,
    }) = leased_on_a_slow_wal("lease-crash", "lease").await
    else {
        return;
    };
    let config = Config::default();
    // The fetch's commit is still in the server's WAL buffers: the crash takes the lease.
    pg.stop();
    pg.start_again();
    let other = PgBroker::connect(&url, &config).await.unwrap();
    let queues = ["lease".to_owned()];
    let mut second = retry(Duration::from_secs(30), || {
        other.consume(&queues, ConsumeOptions::new(1))
    })
    .await;
    let new = tokio::time::timeout(Duration::from_secs(30), second.next())
        .await
        .expect("the message is ready again after the crash")
        .unwrap()
        .expect("delivered again");
    assert_eq!(new.message.as_ref().unwrap().id(), m.id());
    assert_eq!(
        new.redeliveries, 0,
        "the crash took the first lease's count with it: both leases have one delivery"
    );
    let _ = old.ack().await;
    let left = retry(Duration::from_secs(10), || other.stats("lease")).await;
    assert_eq!(
        left.total(),
        1,
        "the old holder's ack deleted the message leased to another consumer"
    );
    new.ack().await.unwrap();
    let left = retry(Duration::from_secs(10), || other.stats("lease")).await;
    assert_eq!(left.total(), 0, "the new holder's ack settles it");
    drop((first, second));
    broker.close().await.unwrap();
    other.close().await.unwrap();
}
