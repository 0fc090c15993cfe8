//! Tests for soft and hard time limits.

use std::time::Duration;

use celeriac_core::{TaskState, TimeLimit};
use celeriac_worker::Pool;
use serde_json::json;

use crate::support::*;

#[tokio::test(start_paused = true)]
async fn the_soft_limit_fires_the_cancellation_from_the_header_or_the_options() {
    let cooperative = |name: &str| {
        async_task(name, |ctx, _| async move {
            tokio::select! {
                () = ctx.cancellation().cancelled() => Ok(json!("stopped early")),
                () = tokio::time::sleep(Duration::from_secs(60)) => Ok(json!("slept")),
            }
        })
    };
    let by_option = with_options(cooperative("tasks.opt"), |o| {
        o.soft_time_limit = Some(Duration::from_secs(1));
    });
    let h = start(vec![by_option, cooperative("tasks.hdr")], options(|_| {}));
    let a = h.call("tasks.opt", vec![]).await;
    let mut m = message("tasks.hdr", vec![]);
    m.headers.timelimit = TimeLimit {
        hard: None,
        soft: Some(0.5),
    };
    let b = h.send(m).await;
    assert_eq!(h.result(&a).await.result, json!("stopped early"));
    assert_eq!(h.result(&b).await.result, json!("stopped early"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_hard_limit_stops_an_async_task() {
    let task = with_options(
        async_task("tasks.stuck", |_, _| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(json!(null))
        }),
        |o| o.time_limit = Some(Duration::from_secs(2)),
    );
    let h = start(vec![task], options(|_| {}));
    let started = tokio::time::Instant::now();
    let id = h.call("tasks.stuck", vec![]).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result,
        json!({"exc_type": "TimeLimitExceeded", "exc_message": [2.0], "exc_module": "billiard.exceptions"})
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.stop().await.failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_task_past_its_hard_limit_fails_and_frees_its_slot() {
    for pool in [Pool::Async, Pool::Threads] {
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
        let saw_cancel = Calls::default();
        let seen = saw_cancel.clone();
        // Ignores the limit: blocks until the test lets it go, then notes the cancellation.
        let stuck = blocking("tasks.stuck", move |ctx, _| {
            let _ = release_rx.lock().unwrap().recv();
            if ctx.is_cancelled() {
                seen.hit();
            }
            Ok(json!("too late"))
        });
        let h = start(
            vec![stuck, blocking("tasks.next", |_, _| Ok(json!("next")))],
            options(|o| {
                o.pool = pool;
                o.concurrency = 1;
            }),
        );
        let mut m = message("tasks.stuck", vec![]);
        m.headers.timelimit = TimeLimit {
            hard: Some(0.2),
            soft: None,
        };
        let id = h.send(m).await;
        let meta = h.result(&id).await;
        assert_eq!(meta.error().unwrap().exc_type, "TimeLimitExceeded");
        // With one slot, this runs only if the stuck task's slot was freed.
        let next = h.call("tasks.next", vec![]).await;
        assert_eq!(h.result(&next).await.result, json!("next"), "{pool}");
        release_tx.send(()).unwrap();
        h.until("the thread saw the cancellation", || async {
            saw_cancel.get() == 1
        })
        .await;
        // The late return does not overwrite the stored FAILURE.
        assert_eq!(h.stored(&id).await.unwrap().status, TaskState::Failure);
        let report = h.stop().await;
        assert_eq!((report.failed, report.succeeded), (1, 1), "{pool}");
    }
}
