//! Revokes with `terminate` for running tasks (async pool here; the processes pool in
//! `processes.rs`), and a plain revoke that leaves a running task alone. Both stick across a
//! worker restart: the restarted worker runs on the same broker and backend.

use std::time::Duration;

use celeriac_core::backend::revoke::Signal;
use celeriac_core::{Broker as _, ResultBackend as _, TaskState};
use celeriac_worker::revoke::revoked_meta;
use serde_json::json;

use crate::support::*;

fn quick_watch(o: &mut celeriac_worker::WorkerOptions) {
    o.revoke_poll_interval = Duration::from_millis(50);
    o.cold_shutdown_grace = Duration::from_millis(300);
    o.track_started = true;
}

/// Whether `id`'s stored record is REVOKED with the reason `reason`.
async fn revoked_because(h: &Harness, id: &str, reason: &str) -> bool {
    h.stored(id).await.is_some_and(|m| {
        m.status == TaskState::Revoked && m.error().is_some_and(|e| e.message() == reason)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_cancels_a_running_async_task_and_sticks_across_a_restart() {
    let starts = Calls::default();
    let saw_cancel = Calls::default();
    let (s, c) = (starts.clone(), saw_cancel.clone());
    let task = with_options(
        async_task("tasks.forever", move |ctx, _| {
            let (s, c) = (s.clone(), c.clone());
            async move {
                s.hit();
                ctx.cancellation().cancelled().await;
                c.hit();
                Ok(json!("stopped"))
            }
        }),
        |o| o.acks_late = true,
    );
    let h = start(vec![task.clone()], options(quick_watch));
    let m = message("tasks.forever", vec![]);
    let copy = m.clone();
    let id = h.send(m).await;
    h.until("the task runs", || async { starts.get() == 1 })
        .await;
    h.backend
        .store(&revoked_meta(id.clone(), Some(Signal::Term)))
        .await
        .unwrap();
    h.until("the task is stopped and REVOKED(terminated)", || async {
        revoked_because(&h, &id, "terminated").await
    })
    .await;
    assert_eq!(saw_cancel.get(), 1, "the task saw its cancellation");
    h.until("acked", || async {
        let s = h.stats().await;
        (s.ready, s.unacked) == (0, 0)
    })
    .await;
    let (broker, backend) = (h.broker.clone(), h.backend.clone());
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded, report.failed), (1, 0, 0));

    // A restarted worker given the same message again does not run it.
    let h = start_with(broker, backend, vec![task], options(quick_watch));
    h.send(copy).await;
    h.until("the copy is settled", || async {
        let s = h.stats().await;
        (s.ready, s.unacked) == (0, 0)
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded), (1, 0));
    assert_eq!(starts.get(), 1, "never run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_without_terminate_leaves_a_running_task_alone_and_sticks_across_a_restart() {
    let starts = Calls::default();
    let cancelled = Calls::default();
    let (s, c) = (starts.clone(), cancelled.clone());
    // Runs until cancelled, then ignores even that: only a hand-back ends it.
    let stubborn = with_options(
        async_task("tasks.stubborn", move |ctx, _| {
            let (s, c) = (s.clone(), c.clone());
            async move {
                s.hit();
                ctx.cancellation().cancelled().await;
                c.hit();
                std::future::pending::<()>().await;
                Ok(json!("unreachable"))
            }
        }),
        |o| o.acks_late = true,
    );
    let stoppable = async_task("tasks.stoppable", |ctx, _| async move {
        ctx.cancellation().cancelled().await;
        Ok(json!("stopped"))
    });
    let tasks = vec![stubborn, stoppable];
    let h = start(tasks.clone(), options(quick_watch));
    let a = message("tasks.stubborn", vec![]);
    let a_copy = a.clone();
    let a = h.send(a).await;
    h.until("A runs", || async { starts.get() == 1 }).await;
    h.backend
        .store(&revoked_meta(a.clone(), None))
        .await
        .unwrap();

    // B, revoked with terminate after A's plain revoke was stored: once B is stopped, the
    // worker has read A's record too (one batch reads every running id).
    let b = h.call("tasks.stoppable", vec![]).await;
    h.until("B runs", || async {
        h.stored(&b)
            .await
            .is_some_and(|m| m.status == TaskState::Started)
    })
    .await;
    h.backend
        .store(&revoked_meta(b.clone(), Some(Signal::Term)))
        .await
        .unwrap();
    h.until("B is terminated", || async {
        revoked_because(&h, &b, "terminated").await
    })
    .await;
    assert_eq!(
        cancelled.get(),
        0,
        "A was not cancelled by its plain revoke"
    );
    assert!(revoked_because(&h, &a, "revoked").await);

    // A cold shutdown hands A back (acks-late, ignores its cancellation) ...
    let (broker, backend) = (h.broker.clone(), h.backend.clone());
    h.shutdown.cold();
    let report = h.join().await;
    assert_eq!((report.revoked, report.requeued), (1, 1));
    assert_eq!(broker.stats(QUEUE).await.unwrap().ready, 1);

    // ... and the restarted worker does not run it: the revoke stuck.
    let h = start_with(broker, backend, tasks, options(quick_watch));
    h.send(a_copy).await; // a second copy as well, as a duplicate delivery would be
    h.until("both copies settled", || async {
        let s = h.stats().await;
        (s.ready, s.unacked) == (0, 0)
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded), (2, 0));
    assert_eq!(starts.get(), 1, "A never ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_records_keep_the_shape_python_celery_reads() {
    let h = start(vec![], options(|_| {}));
    h.backend
        .store(&revoked_meta("x", Some(Signal::Kill)))
        .await
        .unwrap();
    let m = h.stored("x").await.unwrap();
    assert_eq!(
        m.result,
        json!({"exc_type": "TaskRevokedError", "exc_message": ["revoked"],
               "exc_module": "celery.exceptions", "celeriac_terminate": "SIGKILL"})
    );
    assert!(m.date_done.is_some());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_reaches_a_blocking_task_on_the_threads_pool_through_its_cancellation() {
    let starts = Calls::default();
    let saw_cancel = Calls::default();
    let (s, c) = (starts.clone(), saw_cancel.clone());
    let polite = blocking("tasks.polite", move |ctx, _| {
        s.hit();
        let deadline = std::time::Instant::now() + DEADLINE;
        while !ctx.is_cancelled() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        if ctx.is_cancelled() {
            c.hit();
        }
        Ok(json!(null))
    });
    let h = start(
        vec![polite],
        options(|o| {
            quick_watch(o);
            o.pool = celeriac_worker::Pool::Threads;
        }),
    );
    let id = h.call("tasks.polite", vec![]).await;
    h.until("the task runs", || async { starts.get() == 1 })
        .await;
    h.backend
        .store(&revoked_meta(id.clone(), Some(Signal::Int)))
        .await
        .unwrap();
    h.until("REVOKED(terminated)", || async {
        revoked_because(&h, &id, "terminated").await
    })
    .await;
    h.until("the thread saw its cancellation", || async {
        saw_cancel.get() == 1
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded), (1, 0));
}
