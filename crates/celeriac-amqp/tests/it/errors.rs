//! Bad credentials and vhosts, unreachable ports, killed connections, malformed messages.

use std::time::Duration;

use amqprs::BasicProperties;
use amqprs::channel::{BasicPublishArguments, QueueDeclareArguments, QueueDeleteArguments};
use celeriac_amqp::AmqpBroker;
use celeriac_core::{Broker, Config, ConsumeOptions, ErrorKind, PublishOptions, Requeue};
use celeriac_test::services::{test_message, unique_queue};

use crate::util::{self, raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_vhost_are_clear_config_errors() {
    if !util::rabbit_up() {
        return;
    }
    let config = Config::default();
    let e = AmqpBroker::connect("amqp://guest:not-the-password@127.0.0.1:5672//", &config)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
    assert!(!e.is_transient());
    assert!(!format!("{e:?}").contains("not-the-password"), "{e:?}");

    let e = AmqpBroker::connect("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", &config)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_transient() {
    let e = AmqpBroker::connect("amqp://guest:guest@127.0.0.1:1//", &Config::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(e.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_delivered_as_an_error_and_dropped() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let q = unique_queue("malformed");
    broker.declare(&q).await.unwrap();
    let (conn, ch) = raw().await;
    let mut p = BasicProperties::default();
    p.with_content_type("application/json");
    ch.basic_publish(
        p.finish(),
        b"not json at all".to_vec(),
        BasicPublishArguments::new("", &q),
    )
    .await
    .unwrap();
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    assert!(d.message.is_err(), "garbage must not decode");
    d.reject(Requeue::Drop).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = broker.stats(&q).await.unwrap();
        if s.total() == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still there: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_reconnect_and_resume() {
    if !util::rabbit_up() {
        return;
    }
    let marker = unique_queue("killme");
    let broker = util::broker(&format!("connection_name={marker}")).await;
    let q = unique_queue("reconnect");
    broker.declare(&q).await.unwrap();
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(4))
        .await
        .unwrap();
    let first = test_message("tasks.before");
    broker
        .publish(&q, &first, PublishOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("first delivery")
        .unwrap()
        .unwrap();
    // Held unacked while the connection dies: RabbitMQ must hand it out again.
    let killed = util::kill_connections(&marker).await;
    assert!(
        killed >= 2,
        "killed {killed} connections (publisher and consumer)"
    );
    drop(d);

    let second = test_message("tasks.after");
    broker
        .publish(&q, &second, PublishOptions::default())
        .await
        .expect("publishing reconnects");
    let mut seen = Vec::new();
    while !(seen.contains(&first.id().to_owned()) && seen.contains(&second.id().to_owned())) {
        let d = tokio::time::timeout(Duration::from_secs(30), c.next())
            .await
            .expect("the consumer resumes after the connection was killed")
            .unwrap()
            .expect("not closed");
        seen.push(d.message.as_ref().unwrap().id().to_owned());
        d.ack().await.unwrap();
    }
}

/// A queue deleted under a consumer (RabbitMQ cancels it) is re-declared and consumed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_redeclared_and_consumed_again() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let q = unique_queue("deleted");
    let other = unique_queue("deleted-other");
    broker.declare(&q).await.unwrap();
    broker.declare(&other).await.unwrap();
    let mut c = broker
        .consume(&[q.clone(), other.clone()], ConsumeOptions::new(4))
        .await
        .unwrap();
    let (conn, ch) = raw().await;
    ch.queue_delete(QueueDeleteArguments::new(&q))
        .await
        .unwrap();
    let _ = conn.close().await;
    // Wait until the consumer has re-declared it (a publish before would be unroutable).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (conn, ch) = raw().await;
        let mut args = QueueDeclareArguments::new(&q);
        args.passive(true);
        let found = ch.queue_declare(args.finish()).await.is_ok();
        let _ = conn.close().await;
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{q} was never re-declared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = test_message("tasks.after_delete");
    broker
        .publish(&q, &m, PublishOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), c.next())
        .await
        .expect("the consumer resumes on the re-declared queue")
        .unwrap()
        .unwrap();
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();
}
