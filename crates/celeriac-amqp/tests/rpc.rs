//! The rpc result backend: results as messages to the caller's reply queue.
//!
//! A binary of its own: an open rpc backend makes every publish of the process without a
//! `reply_to` carry the backend's reply queue, which would change messages other tests compare.

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
    let m = test_message("tasks.add");
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
    assert!(
        got.properties.reply_to.is_some(),
        "our client sets reply_to"
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
