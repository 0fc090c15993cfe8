//! The rpc result backend: results as messages to the caller's reply queue.

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

/// A bare `rpc://` follows the broker's servers, as Celery's rpc backend uses the broker's
/// connection: with a failover list it connects through the list, and a broker that cannot
/// be reached is named in its error (before, it went to guest on localhost whatever the
/// broker was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_rpc_url_connects_to_the_brokers_servers() {
    if !rabbit_up() {
        return;
    }
    let dead = celeriac_test::services::free_port();
    let mut config = Config::default();
    config.broker_url = Some(format!(
        "amqp://guest:guest@127.0.0.1:{dead}//;amqp://guest:guest@127.0.0.1:5672//"
    ));
    let backend = RpcBackend::connect("rpc://", &config)
        .await
        .expect("through the second server of the broker's list");
    backend.close().await.unwrap();
    config.broker_url = Some(format!("amqp://guest:guest@127.0.0.1:{dead}//"));
    let e = match RpcBackend::connect("rpc://", &config).await {
        Ok(_) => panic!("connected although the broker's server is down"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&format!("127.0.0.1:{dead}")), "{e}");
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
    // As the app does (the backend's ReplyQueue capability).
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
    // As the worker does: the record names the message's reply queue.
    let reply_to = got.properties.reply_to.clone();
    let mut started = TaskMeta::started(m.id(), "w@h");
    started.reply_to = reply_to.clone();
    assert!(backend.store(&started).await.unwrap());
    let mut done = TaskMeta::success(m.id(), json!(3));
    done.reply_to = reply_to;
    assert!(backend.store(&done).await.unwrap());
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

/// A worker's backend sends a record to the queue the record names (the client's), never to
/// its own reply queue, and sends nothing for a record that names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_goes_to_the_queue_it_names_and_nowhere_else() {
    if !rabbit_up() {
        return;
    }
    let config = Config::default();
    let client = RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672//", &config)
        .await
        .expect("client rpc backend");
    // The worker: its own rpc backend, with its own reply queue.
    let worker = RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672//", &config)
        .await
        .expect("worker rpc backend");
    let mut step = TaskMeta::success("step-2", json!(6));
    step.reply_to = Some(client.reply_to().to_owned());
    assert!(worker.store(&step).await.unwrap());
    let meta = client
        .wait("step-2", Some(Duration::from_secs(20)))
        .await
        .expect("the result reaches the client");
    assert_eq!(meta.result, json!(6));
    assert_eq!(
        worker.get("step-2").await.unwrap(),
        None,
        "not the worker's"
    );

    let orphan = TaskMeta::success("orphan", json!(1));
    assert!(!worker.store(&orphan).await.unwrap(), "nowhere to send it");
    assert_eq!(worker.get("orphan").await.unwrap(), None);
    for b in [client, worker] {
        b.close().await.unwrap();
    }
}
