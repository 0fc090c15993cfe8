//! A RabbitMQ restart during a run (`rabbitmqctl stop_app` / `start_app`): no published
//! message is lost and the consumer resumes by itself.
//!
//! A binary of its own, not a module of `it`: restarting the server disturbs every test using
//! it, and cargo runs test binaries one after another, so nothing else runs meanwhile. Skips
//! without a server or without `rabbitmqctl`.

use std::collections::BTreeSet;
use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_core::{Broker, Config, ConsumeOptions, PublishOptions};
use celeriac_test::services::{require_service, test_message, unique_queue};

async fn rabbitmqctl(cmd: &str) -> Option<bool> {
    let status = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", cmd])
        .status()
        .await
        .ok()?;
    Some(status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_loses_no_message_and_consumers_resume() {
    if !require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    if rabbitmqctl("status").await != Some(true) {
        eprintln!("SKIPPED: the restart test needs rabbitmqctl with access to the local node");
        return;
    }
    let broker = AmqpBroker::connect("amqp://guest:guest@127.0.0.1:5672//", &Config::default())
        .await
        .expect("connect");
    let q = unique_queue("restart");
    broker.declare(&q).await.unwrap();
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(10))
        .await
        .unwrap();
    let mut expected = Vec::new();
    for _ in 0..3 {
        let m = test_message("tasks.before");
        expected.push(m.id().to_owned());
        broker
            .publish(&q, &m, PublishOptions::default())
            .await
            .unwrap();
    }
    // One delivery stays unacked across the restart: RabbitMQ must requeue it.
    let held = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();

    for cmd in ["stop_app", "start_app"] {
        assert_eq!(rabbitmqctl(cmd).await, Some(true), "rabbitmqctl {cmd}");
    }
    drop(held);
    for _ in 0..3 {
        let m = test_message("tasks.after");
        expected.push(m.id().to_owned());
        broker
            .publish(&q, &m, PublishOptions::default())
            .await
            .expect("publishing reconnects after the restart");
    }
    let mut seen = BTreeSet::new();
    while !expected.iter().all(|id| seen.contains(id)) {
        let d = tokio::time::timeout(Duration::from_secs(60), c.next())
            .await
            .unwrap_or_else(|_| panic!("consumer did not resume; seen {seen:?} of {expected:?}"))
            .unwrap()
            .expect("not closed");
        seen.insert(d.message.as_ref().unwrap().id().to_owned());
        let _ = d.ack().await;
    }
    let _ = broker.purge(&q).await;
}
