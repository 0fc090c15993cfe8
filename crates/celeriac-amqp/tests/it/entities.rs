//! Entities and arguments as Celery declares them (celery-wire.md §8.1), and the properties
//! and headers of a published task message (§2.2, §8.2, §8.6).

use amqprs::channel::{
    BasicGetArguments, ExchangeDeclareArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::{FieldName, FieldTable, FieldValue};
use celeriac_core::{Broker, PublishOptions};
use celeriac_test::services::{test_message, unique_queue};

use crate::util::{self, raw};

fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert(FieldName::try_from(*k).unwrap(), v.clone());
    }
    t
}

/// Declares `queue` as kombu does for `Queue(name, Exchange(name, 'direct'), routing_key=name)`
/// with `args`; RabbitMQ answers PRECONDITION_FAILED if our declaration differs.
async fn declare_like_kombu(queue: &str, args: FieldTable) -> Result<(), String> {
    let (conn, ch) = raw().await;
    let mut ex = ExchangeDeclareArguments::new(queue, "direct");
    ex.durable = true;
    ch.exchange_declare(ex).await.map_err(|e| e.to_string())?;
    let mut qa = QueueDeclareArguments::new(queue);
    qa.durable(true).arguments(args);
    let r = ch
        .queue_declare(qa.finish())
        .await
        .map_err(|e| e.to_string());
    let _ = conn.close().await;
    r.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_redeclaring_our_entities_gets_no_precondition_failed() {
    if !util::rabbit_up() {
        return;
    }
    // Classic, no priority: kombu's default `celery` queue.
    let q = unique_queue("celery-like");
    util::broker("").await.declare(&q).await.unwrap();
    declare_like_kombu(&q, FieldTable::new())
        .await
        .expect("kombu's plain declaration matches ours");

    // task_queue_max_priority = 10 → {"x-max-priority": 10}, an `I` from py-amqp.
    let q = unique_queue("celery-prio");
    util::broker("max_priority=10")
        .await
        .declare(&q)
        .await
        .unwrap();
    declare_like_kombu(&q, table(&[("x-max-priority", FieldValue::I(10))]))
        .await
        .expect("kombu's priority declaration matches ours");
    // The check is live: a different declaration is refused.
    // (RabbitMQ closes the channel with PRECONDITION_FAILED; amqprs reports a closed channel.)
    declare_like_kombu(&q, FieldTable::new())
        .await
        .expect_err("a queue declared without x-max-priority must conflict");

    // task_default_queue_type = "quorum".
    let q = unique_queue("celery-quorum");
    util::broker("queue_type=quorum")
        .await
        .declare(&q)
        .await
        .unwrap();
    declare_like_kombu(
        &q,
        table(&[("x-queue-type", FieldValue::S("quorum".try_into().unwrap()))]),
    )
    .await
    .expect("kombu's quorum declaration matches ours");
    let (conn, ch) = raw().await;
    let _ = ch.queue_delete(QueueDeleteArguments::new(&q)).await;
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_message_carries_celery_properties_and_headers() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("max_priority=10").await;
    let q = unique_queue("props");
    broker.declare(&q).await.unwrap();
    let mut m = test_message("tasks.add");
    m.properties.reply_to = Some("8d9e2f3a-1b2c-3d4e-8f90-a1b2c3d4e5f6".to_owned());
    m.headers.timelimit.hard = Some(30.0);
    m.headers.expires = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
    broker
        .publish(&q, &m, PublishOptions::default().priority(Some(7)))
        .await
        .unwrap();

    // Confirmed publish: the broker already holds it, no waiting needed.
    let (conn, ch) = raw().await;
    let (_, props, body) = ch
        .basic_get(BasicGetArguments::new(&q).no_ack(true).finish())
        .await
        .unwrap()
        .expect("a confirmed publish is in the queue at once");
    let _ = conn.close().await;
    assert_eq!(body, m.body);
    assert_eq!(props.delivery_mode(), Some(2));
    assert_eq!(props.priority(), Some(7));
    assert_eq!(props.correlation_id().map(String::as_str), Some(m.id()));
    assert_eq!(
        props.reply_to().map(String::as_str),
        m.properties.reply_to.as_deref()
    );
    assert_eq!(
        props.content_type().map(String::as_str),
        Some("application/json")
    );
    assert_eq!(props.content_encoding().map(String::as_str), Some("utf-8"));
    let ttl: i64 = props.expiration().expect("expiration").parse().unwrap();
    assert!((55_000..=60_000).contains(&ttl), "expiration {ttl} ms");
    let h = props.headers().expect("application_headers");
    let get = |k: &str| h.get(&FieldName::try_from(k).unwrap()).cloned();
    assert!(matches!(get("task"), Some(FieldValue::S(s)) if s.as_ref() == "tasks.add"));
    assert!(matches!(get("id"), Some(FieldValue::S(s)) if s.as_ref() == m.id()));
    assert!(
        matches!(get("eta"), Some(FieldValue::V)),
        "nulls are void: {:?}",
        get("eta")
    );
    assert!(matches!(get("retries"), Some(FieldValue::I(0))));
    match get("timelimit") {
        Some(FieldValue::A(a)) => {
            let v: Vec<FieldValue> = a.into();
            assert!(
                matches!(v.as_slice(), [FieldValue::d(h), FieldValue::V] if *h == 30.0),
                "{v:?}"
            );
        }
        other => panic!("timelimit must be an array [hard, soft], got {other:?}"),
    }
    assert!(matches!(get("ignore_result"), Some(FieldValue::t(false))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_in_a_dead_lettering_queue() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let q = unique_queue("delay-entities");
    broker.declare(&q).await.unwrap();
    let due = chrono::Utc::now() + chrono::Duration::seconds(30);
    broker
        .publish(
            &q,
            &test_message("tasks.later"),
            PublishOptions::default().not_before(Some(due)),
        )
        .await
        .unwrap();
    let s = broker.stats(&q).await.unwrap();
    assert_eq!((s.ready, s.delayed), (0, 1));
    assert_eq!(broker.purge(&q).await.unwrap(), 1);
    assert_eq!(broker.stats(&q).await.unwrap().total(), 0);
}
