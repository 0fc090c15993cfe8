//! Entities and arguments as Celery declares them (celery-wire.md §8.1), and the properties
//! and headers of a published task message (§2.2, §8.2, §8.6).

use celeriac_amqp::wire::{FieldTable, FieldValue, QueueDeclare};
use celeriac_core::{Broker, PublishOptions};
use celeriac_test::services::{test_message, unique_queue};

use crate::util::{self, raw};

fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Declares `queue` as kombu does for `Queue(name, Exchange(name, 'direct'), routing_key=name)`
/// with `args`; RabbitMQ answers PRECONDITION_FAILED if our declaration differs.
async fn declare_like_kombu(queue: &str, args: FieldTable) -> Result<(), String> {
    let (conn, ch) = raw().await;
    ch.exchange_declare(queue, "direct", true)
        .await
        .map_err(|e| e.to_string())?;
    let mut qa = QueueDeclare::default();
    qa.durable = true;
    qa.arguments = args;
    let r = ch
        .queue_declare(queue, &qa)
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
    declare_like_kombu(&q, table(&[("x-max-priority", FieldValue::I32(10))]))
        .await
        .expect("kombu's priority declaration matches ours");
    // The check is live: a different declaration is refused.
    let e = declare_like_kombu(&q, FieldTable::new())
        .await
        .expect_err("a queue declared without x-max-priority must conflict");
    assert!(e.contains("406 PRECONDITION_FAILED"), "{e}");

    // task_default_queue_type = "quorum".
    let q = unique_queue("celery-quorum");
    util::broker("queue_type=quorum")
        .await
        .declare(&q)
        .await
        .unwrap();
    declare_like_kombu(&q, table(&[("x-queue-type", FieldValue::str("quorum"))]))
        .await
        .expect("kombu's quorum declaration matches ours");
    let (conn, ch) = raw().await;
    let _ = ch.queue_delete(&q).await;
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
    let got = ch
        .basic_get(&q, true)
        .await
        .unwrap()
        .expect("a confirmed publish is in the queue at once");
    let _ = conn.close().await;
    let props = &got.properties;
    assert_eq!(got.body, m.body);
    assert_eq!(props.delivery_mode, Some(2));
    assert_eq!(props.priority, Some(7));
    assert_eq!(props.correlation_id.as_deref(), Some(m.id()));
    assert_eq!(props.reply_to.as_deref(), m.properties.reply_to.as_deref());
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.content_encoding.as_deref(), Some("utf-8"));
    let ttl: i64 = props
        .expiration
        .as_ref()
        .expect("expiration")
        .parse()
        .unwrap();
    assert!((55_000..=60_000).contains(&ttl), "expiration {ttl} ms");
    let h = props.headers.as_ref().expect("application_headers");
    let get = |k: &str| h.get(k).cloned();
    assert_eq!(get("task"), Some(FieldValue::str("tasks.add")));
    assert_eq!(get("id"), Some(FieldValue::str(m.id())));
    assert_eq!(get("eta"), Some(FieldValue::Void), "nulls are void");
    assert_eq!(get("retries"), Some(FieldValue::I32(0)));
    assert_eq!(
        get("timelimit"),
        Some(FieldValue::Array(vec![
            FieldValue::F64(30.0),
            FieldValue::Void
        ])),
        "timelimit is an array [hard, soft]"
    );
    assert_eq!(get("ignore_result"), Some(FieldValue::Bool(false)));
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
