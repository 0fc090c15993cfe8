//! Tests for dead letters: refused and poison messages go to `<queue>.dead`, and the library
//! functions list, inspect, requeue and purge them.

use std::sync::Arc;

use celeriac_core::{Broker, ResultBackend, TaskError, TaskState};
use celeriac_worker::dead;
use serde_json::json;

use crate::support::*;

const DEAD: &str = "celery.dead";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_dead_lettered_with_their_reason() {
    let h = start(
        vec![blocking("tasks.ok", |_, _| Ok(json!("ok")))],
        options(|_| {}),
    );
    // The test broker turns task `poison` into bytes that do not decode.
    h.call("poison", vec![]).await;
    let unknown = h.call("tasks.missing", vec![json!(1)]).await;
    let mut garbage = message("tasks.ok", vec![]);
    garbage.body = b"[1, 2".to_vec();
    let garbage = h.send(garbage).await;
    let ok = h.call("tasks.ok", vec![]).await;
    assert_eq!(h.result(&ok).await.status, TaskState::Success);
    h.until("three dead letters", || async {
        h.broker.stats(DEAD).await.is_ok_and(|s| s.ready == 3)
    })
    .await;
    let test_broker = h.broker.clone();
    let report = h.stop().await;
    assert_eq!((report.rejected, report.dead_lettered), (3, 3));

    let broker: &dyn Broker = &test_broker;
    assert_eq!(dead::dead_queues(broker).await.unwrap(), [DEAD]);
    let letters = dead::list(broker, "celery", 10).await.unwrap();
    let mut reasons: Vec<(String, String)> = letters
        .iter()
        .map(|d| (d.task().to_owned(), d.reason.clone()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0].0, dead::UNDECODABLE_TASK);
    assert!(
        reasons[0].1.starts_with("DecodeError: invalid envelope"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "tasks.missing");
    assert_eq!(reasons[1].1, "NotRegistered: tasks.missing");
    assert_eq!(reasons[2].0, "tasks.ok");
    assert!(reasons[2].1.starts_with("DecodeError"), "{reasons:?}");
    assert!(letters.iter().all(|d| d.queue == "celery"
        && d.worker.as_deref() == Some("w1@test")
        && d.deliveries == Some(1)));
    // Listing leaves them in place.
    assert_eq!(broker.stats(DEAD).await.unwrap().ready, 3);
    let one = dead::inspect(broker, DEAD, &unknown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.message.headers.id, unknown);
    assert!(
        dead::inspect(broker, DEAD, &garbage)
            .await
            .unwrap()
            .is_some()
    );
    assert!(dead::inspect(broker, DEAD, "nope").await.unwrap().is_none());
    assert_eq!(dead::purge(broker, "celery").await.unwrap(), 3);
    assert!(dead::list(broker, "celery", 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_too_often_is_dead_lettered_then_requeued() {
    // Rejects (requeue) its first four deliveries, as a crashing worker would hand it back.
    let calls = Calls::default();
    let c = calls.clone();
    let task = with_options(
        blocking("tasks.stubborn", move |_, _| {
            if c.hit() <= 4 {
                Err(TaskError::reject("not now", true))
            } else {
                Ok(json!("done"))
            }
        }),
        |o| o.acks_late = true,
    );
    let h = start(vec![task], options(|o| o.max_redeliveries = 2));
    let id = h.call("tasks.stubborn", vec![json!(7)]).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    let e = meta.error().unwrap();
    assert_eq!(e.exc_type, "DeliveryLimitExceeded");
    assert_eq!(
        e.message(),
        "delivered 4 times, more than max_redeliveries (2) allows"
    );
    assert_eq!(calls.get(), 3, "three runs, the fourth delivery is not run");
    // The dead letter is published before the original is acked: wait for both.
    h.until("dead-lettered and acked", || async {
        h.broker.stats(DEAD).await.is_ok_and(|s| s.ready == 1) && h.stats().await.total() == 0
    })
    .await;

    let test_broker = h.broker.clone();
    let broker: &dyn Broker = &test_broker;
    let letters = dead::list(broker, "celery", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].deliveries, Some(4));
    assert_eq!(letters[0].message.headers.id, id);
    let backend: Arc<dyn ResultBackend> = Arc::new(h.backend.clone());
    let n = dead::requeue(
        broker,
        Some(&*backend),
        DEAD,
        Some(std::slice::from_ref(&id)),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    // Forgotten FAILURE, fresh delivery count: it runs (and rejects once more) then succeeds.
    h.until("succeeded after requeue", || async {
        h.stored(&id)
            .await
            .is_some_and(|m| m.status == TaskState::Success)
    })
    .await;
    assert_eq!(calls.get(), 5);
    let report = h.stop().await;
    assert_eq!((report.dead_lettered, report.succeeded), (1, 1));
    assert_eq!(broker.stats(DEAD).await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_without_ids_moves_all_and_skips_placeholders() {
    let h = start(vec![], options(|_| {}));
    h.call("poison", vec![]).await;
    h.call("tasks.later", vec![]).await;
    h.call("tasks.later", vec![]).await;
    h.until("three dead letters", || async {
        h.broker.stats(DEAD).await.is_ok_and(|s| s.ready == 3)
    })
    .await;
    let test_broker = h.broker.clone();
    h.stop().await;
    let broker: &dyn Broker = &test_broker;
    assert_eq!(
        dead::requeue(broker, None, "celery", None).await.unwrap(),
        2
    );
    assert_eq!(broker.stats(QUEUE).await.unwrap().ready, 2);
    let left = dead::list(broker, DEAD, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].task(), dead::UNDECODABLE_TASK);
}
