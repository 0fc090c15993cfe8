//! Tests for acknowledgement: early, late, and lease extension for long acks-late tasks.

use std::time::Duration;

use celeriac_core::TaskState;
use serde_json::json;

use crate::support::*;

fn waiting(name: &str, go: &Opening, acks_late: bool) -> celeriac_core::TaskDef {
    let go = go.clone();
    with_options(
        async_task(name, move |_, _| {
            let go = go.clone();
            async move {
                go.wait().await;
                Ok(json!(1))
            }
        }),
        |o| o.acks_late = acks_late,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_ack_when_the_task_starts_late_ack_when_it_ends() {
    let go = Opening::new();
    let h = start(
        vec![
            waiting("tasks.early", &go, false),
            waiting("tasks.late", &go, true),
        ],
        options(|o| o.track_started = true),
    );
    let early = h.call("tasks.early", vec![]).await;
    let late = h.call("tasks.late", vec![]).await;
    for id in [&early, &late] {
        h.until("started", || async {
            h.stored(id)
                .await
                .is_some_and(|m| m.status == TaskState::Started)
        })
        .await;
    }
    // Both run; only the acks-late one is still held.
    assert_eq!(h.stats().await.unacked, 1);
    go.open();
    h.result(&early).await;
    h.result(&late).await;
    h.until("acked", || async { h.stats().await.total() == 0 })
        .await;
    h.stop().await;
}

fn long(calls: &Calls) -> celeriac_core::TaskDef {
    let c = calls.clone();
    with_options(
        async_task("tasks.long", move |_, _| {
            let c = c.clone();
            async move {
                c.hit();
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(json!("done"))
            }
        }),
        |o| o.acks_late = true,
    )
}

#[tokio::test(start_paused = true)]
async fn a_long_acks_late_task_keeps_its_lease() {
    let calls = Calls::default();
    let h = start(
        vec![long(&calls)],
        options(|o| o.visibility_timeout = Duration::from_millis(1500)),
    );
    let id = h.call("tasks.long", vec![]).await;
    assert_eq!(h.result(&id).await.status, TaskState::Success);
    h.until("acked", || async { h.stats().await.total() == 0 })
        .await;
    let report = h.stop().await;
    assert_eq!(calls.get(), 1, "never redelivered while running");
    assert_eq!(report.succeeded, 1);
}

#[tokio::test(start_paused = true)]
async fn without_lease_extension_a_long_task_is_redelivered() {
    // The counter-test: shows what the lease keeper prevents.
    let calls = Calls::default();
    let h = start_on(
        TestBroker::new().without_lease_extension(),
        vec![long(&calls)],
        options(|o| o.visibility_timeout = Duration::from_millis(1500)),
    );
    let id = h.call("tasks.long", vec![]).await;
    h.result(&id).await;
    h.until("redelivered copy ran", || async { calls.get() >= 2 })
        .await;
    h.shutdown.cold();
}
