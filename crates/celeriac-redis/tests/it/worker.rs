//! The worker's poison-message limit on Redis: possible only because the broker counts
//! redeliveries past one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, DynBroker, PublishOptions};
use celeriac_redis::RedisOptions;
use celeriac_worker::{Worker, WorkerOptions};

use crate::util::{self, broker_with, msg, next_within};

/// A message whose consumers keep dying (its lease runs out three times) is dead-lettered by a
/// worker with `max_redeliveries = 2`, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_restored_past_max_redeliveries_is_dead_lettered() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "poison".to_owned();
    broker.declare(&q).await.unwrap();
    let m = msg();
    broker
        .publish(&q, &m, PublishOptions::default())
        .await
        .unwrap();
    let queues = [q.clone()];
    for n in 0..3u32 {
        let mut c = broker
            .consume(
                &queues,
                ConsumeOptions::new(1).lease(Duration::from_millis(300)),
            )
            .await
            .unwrap();
        let d = next_within(&mut c, Duration::from_secs(20)).await;
        assert_eq!(d.redeliveries, n);
        // Dropped unsettled: as if its worker had died.
    }

    let (registry, runs) = util::counting_registry();
    let mut options = WorkerOptions::default();
    options.queues = vec![q.clone()];
    options.hostname = "poison@test".into();
    options.max_redeliveries = 2;
    let worker = Worker::new(
        Arc::new(broker.clone()) as DynBroker,
        None,
        Arc::new(registry),
        options,
    );
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let dead = format!("{q}.dead");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while broker.stats(&dead).await.unwrap().ready < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message never reached {dead}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.warm();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a poison message is not run"
    );
    let s = broker.stats(&q).await.unwrap();
    assert_eq!((s.ready, s.unacked), (0, 0));
}
