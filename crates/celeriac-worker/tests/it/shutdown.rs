//! Tests for warm and cold shutdown.

use std::time::Duration;

use celeriac_core::{Broker, TaskState};
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_shutdown_finishes_running_tasks_and_hands_back_the_rest() {
    let go = Opening::new();
    let g = go.clone();
    let task = async_task("tasks.wait", move |_, _| {
        let g = g.clone();
        async move {
            g.wait().await;
            Ok(json!("finished"))
        }
    });
    let h = start(
        vec![task],
        options(|o| {
            o.concurrency = 1;
            o.prefetch_buffer = 2;
            o.track_started = true;
        }),
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(h.call("tasks.wait", vec![]).await);
    }
    h.until("one running, two waiting for the slot", || async {
        started_one(&h, &ids).await.is_some() && h.stats().await.unacked == 2
    })
    .await;
    let running = started_one(&h, &ids).await.unwrap();
    h.shutdown.warm();
    h.until("waiting ones handed back", || async {
        h.stats().await.ready == 2
    })
    .await;
    go.open();
    let broker = h.broker.clone();
    let backend = h.backend.clone();
    let report = h.join().await;
    assert_eq!((report.succeeded, report.requeued), (1, 2));
    use celeriac_core::ResultBackend;
    assert_eq!(
        backend.get(&running).await.unwrap().unwrap().result,
        json!("finished")
    );
    let s = broker.stats(QUEUE).await.unwrap();
    assert_eq!((s.ready, s.unacked), (2, 0), "nothing lost, nothing held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_shutdown_cancels_and_requeues_acks_late_tasks_that_do_not_stop() {
    let stubborn = with_options(
        async_task("tasks.stubborn", |_, _| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(json!(null))
        }),
        |o| o.acks_late = true,
    );
    let polite = async_task("tasks.polite", |ctx, _| async move {
        ctx.cancellation().cancelled().await;
        Ok(json!("stopped when asked"))
    });
    let h = start(
        vec![stubborn, polite],
        options(|o| {
            o.cold_shutdown_grace = Duration::from_millis(100);
            o.track_started = true;
        }),
    );
    let a = h.call("tasks.stubborn", vec![]).await;
    let b = h.call("tasks.polite", vec![]).await;
    for id in [&a, &b] {
        h.until("started", || async {
            h.stored(id)
                .await
                .is_some_and(|m| m.status == TaskState::Started)
        })
        .await;
    }
    h.shutdown.warm();
    h.shutdown.cold();
    let broker = h.broker.clone();
    let backend = h.backend.clone();
    let report = h.join().await;
    assert_eq!((report.requeued, report.succeeded), (1, 1));
    use celeriac_core::ResultBackend;
    assert_eq!(
        backend.get(&b).await.unwrap().unwrap().result,
        json!("stopped when asked")
    );
    let s = broker.stats(QUEUE).await.unwrap();
    assert_eq!((s.ready, s.unacked), (1, 0), "the acks-late task is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_shutdown_waits_its_timeout_then_turns_cold() {
    let stubborn = with_options(
        async_task("tasks.stubborn", |_, _| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(json!(null))
        }),
        |o| o.acks_late = true,
    );
    let go = Opening::new();
    let g = go.clone();
    let gated = async_task("tasks.gated", move |_, _| {
        let g = g.clone();
        async move {
            g.wait().await;
            Ok(json!("finished in the soft window"))
        }
    });
    let h = start(
        vec![stubborn, gated],
        options(|o| {
            o.cold_shutdown_grace = Duration::from_millis(100);
            o.soft_shutdown_timeout = Some(Duration::from_millis(500));
            o.track_started = true;
        }),
    );
    let a = h.call("tasks.stubborn", vec![]).await;
    let b = h.call("tasks.gated", vec![]).await;
    for id in [&a, &b] {
        h.until("started", || async {
            h.stored(id)
                .await
                .is_some_and(|m| m.status == TaskState::Started)
        })
        .await;
    }
    h.shutdown.warm();
    // Still warm: the gated task may finish.
    go.open();
    let broker = h.broker.clone();
    let backend = h.backend.clone();
    let shutdown = h.shutdown.clone();
    let report = h.join().await;
    assert_eq!((report.succeeded, report.requeued), (1, 1));
    use celeriac_core::ResultBackend;
    assert_eq!(
        backend.get(&b).await.unwrap().unwrap().result,
        json!("finished in the soft window")
    );
    assert!(shutdown.is_shutting_down());
    let s = broker.stats(QUEUE).await.unwrap();
    assert_eq!((s.ready, s.unacked), (1, 0), "the acks-late task is back");
}

async fn started_one(h: &Harness, ids: &[String]) -> Option<String> {
    for id in ids {
        if h.stored(id)
            .await
            .is_some_and(|m| m.status == TaskState::Started)
        {
            return Some(id.clone());
        }
    }
    None
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_stop_a_worker_run_until_signal() {
    use celeriac_core::memory::{MemoryBackend, MemoryBroker};
    use tokio::signal::unix::{SignalKind, signal};
    // Installing a listener first replaces the default action (exit) for the whole process,
    // so a signal sent before the worker listens cannot kill the test binary.
    let _keep = signal(SignalKind::interrupt()).unwrap();
    let worker = celeriac_worker::Worker::new(
        std::sync::Arc::new(MemoryBroker::new()),
        Some(std::sync::Arc::new(MemoryBackend::new())),
        Default::default(),
        options(|_| {}),
    );
    let handle = worker.shutdown_handle();
    let run = tokio::spawn(worker.run_until_signal());
    // The worker's listener may not be installed yet: signal until it has reacted.
    let pid = std::process::id().to_string();
    until("a signal started a shutdown", || async {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status();
        tokio::time::sleep(Duration::from_millis(20)).await;
        handle.is_shutting_down()
    })
    .await;
    let report = tokio::time::timeout(DEADLINE, run).await.unwrap().unwrap();
    assert_eq!(report.unwrap(), celeriac_worker::WorkerReport::default());
}
