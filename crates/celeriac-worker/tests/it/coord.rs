//! Coordination across workers: a cluster rate limit and a concurrency cap shared by two
//! workers on one broker and one result backend (the memory backend's coordination store;
//! the Redis and SQLite stores pass the same conformance cases).
//! See: issue 28

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::RateLimitScope;
use celeriac_core::memory::MemoryBackend;
use serde_json::json;
use tokio::time::Instant;

use crate::support::*;
use celeriac_core::Broker as _;

/// Two workers sharing `backend` and `broker`, running `tasks`, four slots each.
fn two_workers(
    broker: &TestBroker,
    backend: &MemoryBackend,
    tasks: impl Fn() -> Vec<celeriac_core::TaskDef>,
) -> (Harness, Harness) {
    let o = |name: &str| {
        options(|o| {
            o.hostname = name.into();
            o.concurrency = 4;
            o.prefetch_buffer = 4;
        })
    };
    (
        start_with(broker.clone(), backend.clone(), tasks(), o("w1@test")),
        start_with(broker.clone(), backend.clone(), tasks(), o("w2@test")),
    )
}

/// `tasks.limited` under a cluster rate limit of `limit`, recording when each run starts.
fn limited(starts: &Arc<Mutex<Vec<Instant>>>, limit: &str) -> celeriac_core::TaskDef {
    let starts = starts.clone();
    with_options(
        async_task("tasks.limited", move |_, _| {
            let starts = starts.clone();
            async move {
                starts.lock().unwrap().push(Instant::now());
                Ok(json!(null))
            }
        }),
        |o| {
            o.rate_limit = Some(limit.parse().unwrap());
            o.rate_limit_scope = RateLimitScope::Cluster;
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rate_limit_is_one_budget_for_every_worker() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let tasks = || vec![limited(&starts, "20/s")];
    let (broker, backend) = (TestBroker::new(), MemoryBackend::new());
    let (w1, w2) = two_workers(&broker, &backend, tasks);
    let mut ids = Vec::new();
    for _ in 0..21 {
        ids.push(w1.call("tasks.limited", vec![]).await);
    }
    for id in &ids {
        assert_eq!(
            w1.result(id).await.status,
            celeriac_core::TaskState::Success
        );
    }
    let mut t = starts.lock().unwrap().clone();
    t.sort();
    let span = t[t.len() - 1] - t[0];
    // 21 starts at 20/s shared: 20 intervals of 50 ms. Two workers each with the whole
    // budget (Celery's per-worker limit) would take half of that.
    assert!(
        span >= Duration::from_millis(950),
        "21 starts took {span:?}: the budget is not shared"
    );
    assert!(span < Duration::from_secs(3), "{span:?}");
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_caps_running_tasks_across_workers() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tasks = || {
        let (running, most) = (running.clone(), most.clone());
        vec![with_options(
            async_task("tasks.capped", move |_, _| {
                let (running, most) = (running.clone(), most.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(json!(null))
                }
            }),
            |o| o.max_concurrency = Some(2),
        )]
    };
    let (broker, backend) = (TestBroker::new(), MemoryBackend::new());
    let (w1, w2) = two_workers(&broker, &backend, tasks);
    let mut ids = Vec::new();
    for _ in 0..16 {
        ids.push(w1.call("tasks.capped", vec![]).await);
    }
    for id in &ids {
        assert_eq!(
            w1.result(id).await.status,
            celeriac_core::TaskState::Success
        );
    }
    // Eight slots across the two workers, two allowed: never more, and the cap is reached.
    assert_eq!(most.load(Ordering::SeqCst), 2);
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_tasks_lock_is_released_when_it_ends() {
    use celeriac_core::ResultBackend as _;
    use celeriac_core::coord::UNIQUE_HEADER;
    let tasks = vec![
        blocking("tasks.ok", |_, _| Ok(json!(1))),
        blocking("tasks.bad", |_, _| {
            Err(celeriac_core::TaskError::new("ValueError", "no"))
        }),
    ];
    let h = start(tasks, options(|_| {}));
    let caps = h.backend.capabilities();
    let store = caps.coordination.unwrap();
    for task in ["tasks.ok", "tasks.bad"] {
        let mut m = message(task, vec![]);
        let key = format!("unique:{task}");
        assert_eq!(
            store
                .lock(&key, m.id(), Duration::from_secs(60))
                .await
                .unwrap(),
            m.id()
        );
        m.headers
            .extra
            .insert(UNIQUE_HEADER.into(), key.clone().into());
        let id = h.send(m).await;
        h.result(&id).await;
        h.until("the lock is released", || async {
            store
                .lock(&key, "next", Duration::from_secs(60))
                .await
                .unwrap()
                == "next"
        })
        .await;
    }
    h.stop().await;
}

/// Twelve deliveries fetched in one batch start in the order they were queued, under a
/// per-worker and under a cluster rate limit (tokio runs the last spawned task first; the
/// limit's queue serves them by arrival).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_deliveries_start_in_the_order_they_were_queued() {
    for scope in [RateLimitScope::Worker, RateLimitScope::Cluster] {
        let order = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let order = order.clone();
            with_options(
                async_task("tasks.ordered", move |_, mut a| {
                    let order = order.clone();
                    async move {
                        let i: u64 = a.take(0, "i")?;
                        order.lock().unwrap().push(i);
                        Ok(json!(null))
                    }
                }),
                |o| {
                    o.rate_limit = Some("100/s".parse().unwrap());
                    o.rate_limit_scope = scope;
                },
            )
        };
        let broker = TestBroker::new();
        let mut ids = Vec::new();
        for i in 0..12 {
            let m = message("tasks.ordered", vec![json!(i)]);
            ids.push(m.id().to_owned());
            broker
                .publish(QUEUE, &m, celeriac_core::PublishOptions::default())
                .await
                .unwrap();
        }
        let w = start_with(
            broker,
            MemoryBackend::new(),
            vec![task],
            options(|o| {
                o.concurrency = 16;
                o.prefetch_buffer = 16;
            }),
        );
        for id in &ids {
            w.result(id).await;
        }
        w.stop().await;
        let order = order.lock().unwrap().clone();
        assert_eq!(order, (0..12).collect::<Vec<u64>>(), "{scope:?}");
    }
}

/// `celery control rate_limit` sent to every worker moves a cluster-scoped limit for the
/// whole cluster: each worker's new limit feeds the one shared budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_set_by_remote_control_is_shared_by_every_worker() {
    use celeriac_core::broadcast::Clock;
    use celeriac_core::broadcast::control::{Request, collect};

    let starts = Arc::new(Mutex::new(Vec::new()));
    let tasks = || vec![limited(&starts, "200/s")];
    let (broker, backend) = (TestBroker::new(), MemoryBackend::new());
    let (w1, w2) = two_workers(&broker, &backend, tasks);
    let channels = broker.inner.broadcast().expect("memory broadcast");
    let args = json!({"task_name": "tasks.limited", "rate_limit": "10/s"});
    let mut replies = Vec::new();
    for _ in 0..50 {
        replies = collect(
            channels,
            &Clock::new(),
            Request::new("rate_limit", serde_json::from_value(args.clone()).unwrap()),
            Duration::from_secs(1),
            Some(2),
        )
        .await
        .unwrap();
        if replies.len() == 2 {
            break;
        }
    }
    assert_eq!(replies.len(), 2, "both workers answer: {replies:?}");
    let mut ids = Vec::new();
    for _ in 0..11 {
        ids.push(w1.call("tasks.limited", vec![]).await);
    }
    for id in &ids {
        w1.result(id).await;
    }
    let mut t = starts.lock().unwrap().clone();
    t.sort();
    let span = t[t.len() - 1] - t[0];
    // 11 starts at the new 10/s, shared: 10 intervals of 100 ms (a quarter interval early
    // at most each). Per-worker budgets would take half; the old limit a fiftieth.
    assert!(
        span >= Duration::from_millis(760),
        "11 starts took {span:?}: the new limit is not shared"
    );
    assert!(span < Duration::from_secs(3), "{span:?}");
    w1.stop().await;
    w2.stop().await;
}
