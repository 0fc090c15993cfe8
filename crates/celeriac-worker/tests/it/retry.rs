//! Tests for retries (explicit and automatic) and rejections.

use std::time::Duration;

use celeriac_core::{TaskError, TaskState};
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_republishes_the_same_id_until_max_retries() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = with_options(
        blocking("tasks.flaky", move |ctx, _| {
            s.lock()
                .unwrap()
                .push((ctx.retries(), ctx.parent_id().map(str::to_owned)));
            Err(TaskError::retry_after(Duration::from_millis(20)))
        }),
        |o| o.max_retries = Some(2),
    );
    let h = start(vec![task], options(|_| {}));
    let mut m = message("tasks.flaky", vec![]);
    m.properties.priority = Some(3);
    let id = h.send(m).await;
    h.until("RETRY stored", || async {
        h.stored(&id)
            .await
            .is_some_and(|m| m.status == TaskState::Retry)
    })
    .await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    let e = meta.error().unwrap();
    assert_eq!(e.exc_type, "MaxRetriesExceededError");
    assert_eq!(meta.retries, Some(2));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [(0, None), (1, Some(id.clone())), (2, Some(id.clone()))],
        "retries count up; the parent becomes the task itself"
    );
    let report = h.stop().await;
    assert_eq!((report.retried, report.failed), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_in_the_broker_for_its_countdown() {
    let calls = Calls::default();
    let c = calls.clone();
    let h = start(
        vec![blocking("tasks.later", move |_, _| {
            if c.hit() == 1 {
                Err(TaskError::new("IOError", "down").into_retry(Some(Duration::from_secs(60))))
            } else {
                Ok(json!(1))
            }
        })],
        options(|_| {}),
    );
    let id = h.call("tasks.later", vec![]).await;
    h.until("parked", || async { h.stats().await.delayed == 1 })
        .await;
    let meta = h.stored(&id).await.unwrap();
    assert_eq!(meta.status, TaskState::Retry);
    assert_eq!(meta.error().unwrap().summary(), "IOError: down");
    assert_eq!(calls.get(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoretry_retries_matching_failures_then_fails_with_the_cause() {
    let calls = Calls::default();
    let c = calls.clone();
    let task = with_options(
        blocking("tasks.auto", move |_, _| {
            c.hit();
            Err(TaskError::new("ConnectionError", "refused"))
        }),
        |o| {
            o.autoretry = Some(|e| e.exc_type() == "ConnectionError");
            o.max_retries = Some(1);
            o.default_retry_delay = Duration::from_millis(10);
        },
    );
    let h = start(vec![task], options(|_| {}));
    let id = h.call("tasks.auto", vec![]).await;
    let e = h.result(&id).await.error().unwrap();
    assert_eq!(e.summary(), "ConnectionError: refused");
    assert_eq!(calls.get(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_drops_or_requeues_and_stores_nothing() {
    let calls = Calls::default();
    let c = calls.clone();
    let requeue_once = with_options(
        blocking("tasks.requeue", move |_, _| {
            if c.hit() == 1 {
                Err(TaskError::reject("not yet", true))
            } else {
                Ok(json!("second time"))
            }
        }),
        |o| o.acks_late = true,
    );
    let drop_it = with_options(
        blocking("tasks.drop", |_, _| Err(TaskError::reject("bad", false))),
        |o| o.acks_late = true,
    );
    let h = start(vec![requeue_once, drop_it], options(|_| {}));
    let id = h.call("tasks.requeue", vec![]).await;
    assert_eq!(h.result(&id).await.result, json!("second time"));
    let dropped = h.call("tasks.drop", vec![]).await;
    h.until("dropped", || async { h.stats().await.total() == 0 })
        .await;
    assert_eq!(h.stored(&dropped).await, None);
    let report = h.stop().await;
    assert_eq!((report.rejected, report.succeeded), (2, 1));
}
