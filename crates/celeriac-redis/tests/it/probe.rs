//! The result probe: a fetch reads each task's stored state when the worker's backend is on
//! the broker's server, so the worker's duplicate and revoke check needs no read of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use celeriac_core::{
    Broker, ConsumeOptions, DynBackend, DynBroker, Message, PublishOptions, ResultBackend,
    TaskMeta, TaskState,
};
use celeriac_redis::{RedisBackend, RedisOptions};
use celeriac_worker::{Worker, WorkerOptions};
use serde_json::{Value, json};

use crate::util::{self, backend_with, broker_with, msg, next_within};

async fn publish(broker: &impl Broker, q: &str, m: &Message) {
    broker
        .publish(q, m, PublishOptions::default())
        .await
        .unwrap();
}

/// The shared probe case: states come with the fetch for a backend on the same server,
/// database and prefix, not for one on another database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_reads_task_states_from_a_backend_on_the_same_server() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
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

/// A message the fetch script cannot read by search (a backslash in it) comes without a
/// state: the worker reads it itself.
#[tokio::test]
async fn no_state_is_read_for_a_message_read_by_decoding() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let backend = backend_with(&p, RedisOptions::default()).await;
    let q = "unprobed".to_owned();
    broker.declare(&q).await.unwrap();
    let mut escaped = msg();
    escaped
        .headers
        .extra
        .insert("note".into(), json!("C:\\temp \"quoted\""));
    publish(&broker, &q, &escaped).await;
    let options = ConsumeOptions::new(1).result_probe(backend.capabilities().probe);
    let mut c = broker
        .consume(std::slice::from_ref(&q), options)
        .await
        .unwrap();
    let d = next_within(&mut c, Duration::from_secs(10)).await;
    assert_eq!(d.stored, None);
    assert_eq!(d.message.as_ref().unwrap().headers.id, escaped.headers.id);
    d.ack().await.unwrap();
}

/// A worker on Redis with a Redis backend: a task revoked before it was fetched is not run;
/// a message whose `correlation_id` names another (revoked) task is checked under its own id
/// and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_skips_a_revoked_task_and_checks_a_mismatched_id_itself() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let backend = backend_with(&p, RedisOptions::default()).await;
    let q = "probed-worker".to_owned();
    broker.declare(&q).await.unwrap();
    let revoked = msg();
    backend
        .store(&TaskMeta::new(
            revoked.headers.id.clone(),
            TaskState::Revoked,
            Value::Null,
        ))
        .await
        .unwrap();
    let mut mismatched = msg();
    mismatched.properties.correlation_id = revoked.headers.id.clone();
    publish(&broker, &q, &revoked).await;
    publish(&broker, &q, &mismatched).await;

    let (registry, runs) = util::counting_registry();
    let mut options = WorkerOptions::default();
    options.queues = vec![q.clone()];
    options.hostname = "probe@test".into();
    let worker = Worker::new(
        Arc::new(broker.clone()) as DynBroker,
        Some(Arc::new(backend.clone()) as DynBackend),
        Arc::new(registry),
        options,
    );
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let done = backend
        .wait(&mismatched.headers.id, Some(Duration::from_secs(20)))
        .await
        .expect("the mismatched task ran");
    assert_eq!(done.status, TaskState::Success);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = broker.stats(&q).await.unwrap();
        if (s.ready, s.unacked) == (0, 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.warm();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.revoked, 1, "{report:?}");
    assert_eq!(report.succeeded, 1, "{report:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "only the mismatched task ran"
    );
}
