//! The rpc result backend: results as messages to the caller's reply queue.
//!
//! A binary of its own: the reply queues a process's consumers remember are process-wide, and
//! a message sent for a remembered task inherits its reply queue.

use celeriac_core::backend::ReplyQueue;
use std::time::Duration;

use celeriac_amqp::RpcBackend;
use celeriac_core::{
    Broker, Config, ConsumeOptions, ErrorKind, PublishOptions, ResultBackend, TaskMeta, TaskState,
};
use celeriac_test::services::{test_message, unique_queue};
use serde_json::json;

fn rabbit_up() -> bool {
    celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672")
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<RpcBackend>();
    check::<celeriac_amqp::AmqpBroker>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_travel_to_the_senders_reply_queue() {
    if !rabbit_up() {
        return;
    }
    let backend = RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672//", &Config::default())
        .await
        .expect("rpc backend");
    let broker = celeriac_amqp::AmqpBroker::connect(
        "amqp://guest:guest@127.0.0.1:5672//",
        &Config::default(),
    )
    .await
    .expect("broker");
    let q = unique_queue("rpc");
    broker.declare(&q).await.unwrap();
    let mut m = test_message("tasks.add");
    // As the app does (ResultBackend::reply_to).
    m.properties.reply_to = Some(backend.reply_to().to_owned());
    broker
        .publish(&q, &m, PublishOptions::default())
        .await
        .unwrap();

    // The worker side: receives the task, whose reply_to names a reply queue of this process.
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    let got = d.message.as_ref().expect("valid message");
    assert_eq!(
        got.properties.reply_to.as_deref(),
        Some(backend.reply_queue())
    );
    assert!(
        backend
            .store(&TaskMeta::started(m.id(), "w@h"))
            .await
            .unwrap()
    );
    assert!(
        backend
            .store(&TaskMeta::success(m.id(), json!(3)))
            .await
            .unwrap()
    );
    d.ack().await.unwrap();

    let meta = backend
        .wait(m.id(), Some(Duration::from_secs(10)))
        .await
        .expect("the result arrives");
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, json!(3));
    assert_eq!(
        backend.get("not-one-of-ours").await.unwrap(),
        None,
        "a foreign id is unknown (PENDING)"
    );
    let e = backend.save_group("g", &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = backend
        .wait("never-sent", Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    backend.close().await.unwrap();
}

/// A chain step sent by a worker (no reply_to of its own, its parent's id in `parent_id`)
/// carries the reply queue of the client that sent the first step, so the client reads the
/// final result; a message of nobody's task carries none (never the worker's own queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_steps_sent_by_a_worker_reply_to_the_client() {
    if !rabbit_up() {
        return;
    }
    let config = Config::default();
    let url = "amqp://guest:guest@127.0.0.1:5672//";
    let client = RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672//", &config)
        .await
        .expect("client rpc backend");
    let client_broker = celeriac_amqp::AmqpBroker::connect(url, &config)
        .await
        .unwrap();
    // The worker: its own broker handle and its own rpc backend (its own reply queue).
    let worker_backend = RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672//", &config)
        .await
        .expect("worker rpc backend");
    let worker_broker = celeriac_amqp::AmqpBroker::connect(url, &config)
        .await
        .unwrap();
    let q = unique_queue("rpc-chain");
    client_broker.declare(&q).await.unwrap();
    let mut first = test_message("tasks.add");
    first.properties.reply_to = Some(client.reply_to().to_owned());
    client_broker
        .publish(&q, &first, PublishOptions::default())
        .await
        .unwrap();

    let mut c = worker_broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next(&mut *c).await;
    let step1 = d.message.as_ref().unwrap().clone();
    assert!(
        worker_backend
            .store(&TaskMeta::success(step1.id(), json!(3)))
            .await
            .unwrap()
    );
    // The worker sends the next step after storing the first step's result, as ours does.
    let mut second = test_message("tasks.mul");
    second.headers.parent_id = Some(step1.id().to_owned());
    second.headers.root_id = Some(step1.id().to_owned());
    worker_broker
        .publish(&q, &second, PublishOptions::default())
        .await
        .unwrap();
    d.ack().await.unwrap();
    let d = next(&mut *c).await;
    let step2 = d.message.as_ref().unwrap().clone();
    assert_eq!(step2.id(), second.id());
    assert_eq!(
        step2.properties.reply_to.as_deref(),
        Some(client.reply_queue()),
        "the step carries the client's reply queue, not the worker's {}",
        worker_backend.reply_queue()
    );
    assert!(
        worker_backend
            .store(&TaskMeta::success(step2.id(), json!(6)))
            .await
            .unwrap()
    );
    d.ack().await.unwrap();
    let meta = client
        .wait(second.id(), Some(Duration::from_secs(20)))
        .await
        .expect("the final result reaches the client");
    assert_eq!(meta.result, json!(6));

    // Nobody's task: no reply_to at all.
    let orphan = test_message("tasks.add");
    worker_broker
        .publish(&q, &orphan, PublishOptions::default())
        .await
        .unwrap();
    let d = next(&mut *c).await;
    assert_eq!(d.message.as_ref().unwrap().properties.reply_to, None);
    d.ack().await.unwrap();
    for b in [client, worker_backend] {
        b.close().await.unwrap();
    }
}

async fn next(c: &mut dyn celeriac_core::Consumer) -> celeriac_core::Delivery {
    tokio::time::timeout(Duration::from_secs(20), c.next())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap()
}
