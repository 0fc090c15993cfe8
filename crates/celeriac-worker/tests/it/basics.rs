//! Tests for running tasks: results, pools, concurrency and prefetch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use celeriac_core::{TaskError, TaskState};
use celeriac_worker::Pool;
use serde_json::json;

use crate::support::*;

fn add() -> celeriac_core::TaskDef {
    blocking("tasks.add", |_, mut a| {
        let x: i64 = a.take(0, "x")?;
        let y: i64 = a.take(1, "y")?;
        a.finish(&["x", "y"])?;
        Ok(json!(x + y))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_success_with_extended_fields() {
    for pool in [Pool::Async, Pool::Threads] {
        let h = start(
            vec![
                add(),
                async_task("tasks.echo", |ctx, mut a| async move {
                    let v: String = a.take(0, "v")?;
                    Ok(json!(format!("{v} from {}", ctx.hostname())))
                }),
            ],
            options(|o| o.pool = pool),
        );
        let mut m = message("tasks.add", vec![json!(2), json!(3)]);
        m.headers.parent_id = Some("parent".into());
        m.headers.group = Some("group".into());
        let id = h.send(m).await;
        let meta = h.result(&id).await;
        assert_eq!(meta.status, TaskState::Success);
        assert_eq!(meta.result, json!(5));
        assert_eq!(meta.name.as_deref(), Some("tasks.add"));
        assert_eq!(meta.args, Some(vec![json!(2), json!(3)]));
        assert_eq!(meta.kwargs, Some(Default::default()));
        assert_eq!(meta.worker.as_deref(), Some("w1@test"));
        assert_eq!(meta.retries, Some(0));
        assert_eq!(meta.queue.as_deref(), Some(QUEUE));
        assert_eq!(meta.parent_id.as_deref(), Some("parent"));
        assert_eq!(meta.group_id.as_deref(), Some("group"));
        assert!(meta.date_done.is_some());

        let id = h.call("tasks.echo", vec![json!("hi")]).await;
        assert_eq!(h.result(&id).await.result, json!("hi from w1@test"));
        let report = h.stop().await;
        assert_eq!(report.succeeded, 2, "{pool}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_store_the_exception_and_its_traceback() {
    let h = start(
        vec![blocking("tasks.fail", |_, _| {
            Err(TaskError::new("ValueError", "bad input").with_traceback("at line 1"))
        })],
        options(|_| {}),
    );
    let id = h.call("tasks.fail", vec![]).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result,
        json!({"exc_type": "ValueError", "exc_message": ["bad input"], "exc_module": "builtins"})
    );
    let tb = meta.traceback.expect("traceback");
    assert!(
        tb.starts_with("Traceback (most recent call last):\n  task tasks.fail["),
        "{tb}"
    );
    assert!(
        tb.contains("\n    at line 1\n"),
        "the task's own text is kept: {tb}"
    );
    assert!(tb.ends_with("ValueError: bad input"), "{tb}");
    assert_eq!(h.stop().await.failed, 1);
}

/// Blocks every running task until released; records the most seen at once.
#[derive(Clone, Default)]
struct Gate {
    state: Arc<(Mutex<(bool, usize)>, Condvar)>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Gate {
    fn enter(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let (lock, cv) = &*self.state;
        let mut open = lock.lock().unwrap();
        while !open.0 {
            open = cv.wait(open).unwrap();
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
    fn open(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().0 = true;
        cv.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_at_most_concurrency_and_prefetches_concurrency_plus_buffer() {
    for pool in [Pool::Async, Pool::Threads] {
        let gate = Gate::default();
        let g = gate.clone();
        let task = with_options(
            blocking("tasks.wait", move |_, _| {
                g.enter();
                Ok(json!(null))
            }),
            |o| o.acks_late = true,
        );
        let h = start(
            vec![task],
            options(|o| {
                o.pool = pool;
                o.concurrency = 2;
                o.prefetch_buffer = 1;
            }),
        );
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(h.call("tasks.wait", vec![]).await);
        }
        h.until("two tasks running", || async {
            gate.running.load(Ordering::SeqCst) == 2
        })
        .await;
        // acks-late: two running + one buffered are leased, the rest wait in the queue.
        h.until("prefetch of three", || async {
            let s = h.stats().await;
            s.unacked == 3 && s.ready == 3
        })
        .await;
        gate.open();
        for id in &ids {
            assert_eq!(h.result(id).await.status, TaskState::Success);
        }
        assert_eq!(gate.peak.load(Ordering::SeqCst), 2, "{pool}");
        assert_eq!(h.stop().await.succeeded, 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_blocking_task_does_not_hold_up_async_ones() {
    let gate = Gate::default();
    let g = gate.clone();
    let h = start(
        vec![
            blocking("tasks.block", move |_, _| {
                g.enter();
                Ok(json!(null))
            }),
            async_task("tasks.quick", |_, _| async { Ok(json!("quick")) }),
        ],
        options(|o| o.concurrency = 3),
    );
    let slow = h.call("tasks.block", vec![]).await;
    let slow2 = h.call("tasks.block", vec![]).await;
    h.until("both blocking tasks running", || async {
        gate.running.load(Ordering::SeqCst) == 2
    })
    .await;
    // The runtime has two threads, both would be taken if blocking bodies ran on them.
    let quick = h.call("tasks.quick", vec![]).await;
    assert_eq!(h.result(&quick).await.result, json!("quick"));
    gate.open();
    h.result(&slow).await;
    h.result(&slow2).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_started_stores_started_while_running() {
    let gate = Gate::default();
    let g = gate.clone();
    let h = start(
        vec![blocking("tasks.wait", move |_, _| {
            g.enter();
            Ok(json!(1))
        })],
        options(|o| o.track_started = true),
    );
    let id = h.call("tasks.wait", vec![]).await;
    h.until("STARTED stored", || async {
        h.stored(&id)
            .await
            .is_some_and(|m| m.status == TaskState::Started)
    })
    .await;
    let started = h.stored(&id).await.unwrap();
    assert_eq!(started.result["hostname"], json!("w1@test"));
    assert!(started.result["pid"].is_u64());
    assert_eq!(started.name.as_deref(), Some("tasks.wait"));
    gate.open();
    assert_eq!(h.result(&id).await.status, TaskState::Success);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_result_stores_failures_only() {
    let ignored = |name: &str, fail: bool| {
        with_options(
            blocking(name, move |_, _| {
                if fail {
                    Err(TaskError::fail("still stored"))
                } else {
                    Ok(json!(1))
                }
            }),
            |o| {
                o.ignore_result = true;
                o.track_started = true;
            },
        )
    };
    let h = start(
        vec![
            ignored("tasks.ok", false),
            ignored("tasks.bad", true),
            blocking("tasks.plain", |_, _| Ok(json!(2))),
        ],
        options(|_| {}),
    );
    let ok = h.call("tasks.ok", vec![]).await;
    let bad = h.call("tasks.bad", vec![]).await;
    assert_eq!(h.result(&bad).await.status, TaskState::Failure);
    // Header form of ignore_result, on a task that would store.
    let mut m = message("tasks.plain", vec![]);
    m.headers.ignore_result = true;
    let plain = h.send(m).await;
    h.until("all started", || async { h.stats().await.total() == 0 })
        .await;
    let backend = h.backend.clone();
    let report = h.stop().await;
    assert_eq!(report.succeeded, 2);
    assert_eq!(report.failed, 1);
    use celeriac_core::ResultBackend;
    for id in [ok, plain] {
        assert_eq!(
            backend.get(&id).await.unwrap(),
            None,
            "nothing stored for {id}"
        );
    }
}
