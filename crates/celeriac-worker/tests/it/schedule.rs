//! Tests for when a task runs: duplicates, revocation, expiry, eta.

use celeriac_core::meta::RemoteError;
use celeriac_core::{ResultBackend, TaskMeta, TaskState};
use chrono::Utc;
use serde_json::json;

use crate::support::*;

fn counted(calls: &Calls) -> celeriac_core::TaskDef {
    let c = calls.clone();
    blocking("tasks.count", move |_, _| Ok(json!(c.hit())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_ready_result_is_not_run_again() {
    let calls = Calls::default();
    let h = start(vec![counted(&calls)], options(|_| {}));
    let done = message("tasks.count", vec![]);
    h.backend
        .store(&TaskMeta::success(done.id(), json!("earlier")))
        .await
        .unwrap();
    let revoked = message("tasks.count", vec![]);
    let e = RemoteError::new("TaskRevokedError", "revoked").with_module("celery.exceptions");
    h.backend
        .store(&TaskMeta::exception(revoked.id(), TaskState::Revoked, &e))
        .await
        .unwrap();
    h.send(done).await;
    h.send(revoked).await;
    let fresh = h.call("tasks.count", vec![]).await;
    h.result(&fresh).await;
    h.until("all settled", || async { h.stats().await.total() == 0 })
        .await;
    let report = h.stop().await;
    assert_eq!(calls.get(), 1, "only the fresh task ran");
    assert_eq!((report.skipped, report.revoked), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_task_is_revoked_not_run() {
    let calls = Calls::default();
    let h = start(vec![counted(&calls)], options(|_| {}));
    let mut m = message("tasks.count", vec![]);
    m.headers.expires = Some(Utc::now() - chrono::Duration::seconds(1));
    let id = h.send(m).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Revoked);
    assert_eq!(
        meta.result,
        json!({"exc_type": "TaskRevokedError", "exc_message": ["expired"], "exc_module": "celery.exceptions"})
    );
    h.until("acked", || async { h.stats().await.total() == 0 })
        .await;
    assert_eq!(h.stop().await.revoked, 1);
    assert_eq!(calls.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_eta_is_parked_in_the_broker_not_held() {
    let calls = Calls::default();
    let h = start(vec![counted(&calls)], options(|_| {}));
    let eta = Utc::now() + chrono::Duration::milliseconds(700);
    let mut m = message("tasks.count", vec![]);
    m.headers.eta = Some(eta);
    let id = h.send(m).await;
    h.until("parked as delayed, nothing held", || async {
        let s = h.stats().await;
        s.delayed == 1 && s.unacked == 0 && s.ready == 0
    })
    .await;
    assert_eq!(calls.get(), 0);
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Success);
    assert!(meta.date_done.unwrap() >= eta, "not run early");
    let report = h.stop().await;
    assert_eq!((report.requeued, report.succeeded), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_delayed_store_a_future_eta_is_held_unacked() {
    let calls = Calls::default();
    let h = start_on(
        TestBroker::new().without_delay(),
        vec![counted(&calls)],
        options(|_| {}),
    );
    let eta = Utc::now() + chrono::Duration::milliseconds(500);
    let mut m = message("tasks.count", vec![]);
    m.headers.eta = Some(eta);
    let id = h.send(m).await;
    h.until("held unacked", || async { h.stats().await.unacked == 1 })
        .await;
    let meta = h.result(&id).await;
    assert!(meta.date_done.unwrap() >= eta, "not run early");
    assert_eq!(h.stop().await.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_eta_task_is_handed_back_at_shutdown() {
    let h = start_on(
        TestBroker::new().without_delay(),
        vec![blocking("tasks.x", |_, _| Ok(json!(1)))],
        options(|_| {}),
    );
    let mut m = message("tasks.x", vec![]);
    m.headers.eta = Some(Utc::now() + chrono::Duration::hours(1));
    h.send(m).await;
    h.until("held", || async { h.stats().await.unacked == 1 })
        .await;
    let broker = h.broker.clone();
    let report = h.stop().await;
    assert_eq!(report.requeued, 1);
    use celeriac_core::Broker;
    let s = broker.stats(QUEUE).await.unwrap();
    assert_eq!((s.ready, s.unacked), (1, 0));
}
