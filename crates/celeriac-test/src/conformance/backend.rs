//! The result backend cases: what every [`ResultBackend`](celeriac_core::ResultBackend)
//! driver must do.
//!
//! Each `case_*` function takes a fresh handle from the driver's setup function, uses its own
//! task ids, and panics with a readable message when the driver breaks the contract.

use std::time::Duration;

use celeriac_core::protocol::new_id;
use celeriac_core::{DynBackend, ErrorKind, RemoteError, TaskMeta, TaskState};
use chrono::{SubsecRound, Utc};
use serde_json::{Map, json};
use tokio::time::{Instant, timeout};

use super::{CLOCK_TOLERANCE, EVENTUALLY, QUIET};

// ===== helpers =====

/// A fresh task id that names the case, for readable failures.
fn task_id(case: &str) -> String {
    format!("conformance-{case}-{}", new_id())
}

async fn store(backend: &DynBackend, meta: &TaskMeta) -> bool {
    backend
        .store(meta)
        .await
        .unwrap_or_else(|e| panic!("store {} {} failed: {e:?}", meta.task_id, meta.status))
}

async fn get(backend: &DynBackend, id: &str) -> Option<TaskMeta> {
    backend
        .get(id)
        .await
        .unwrap_or_else(|e| panic!("get {id} failed: {e:?}"))
}

/// A record of `id` in `state` whose result says which write it came from.
///
/// Times are whole microseconds: Celery's time format (and so any driver that stores text)
/// keeps no more.
fn meta_in(id: &str, state: &TaskState, write: u32) -> TaskMeta {
    let mut meta = if state.is_exception() {
        let e = RemoteError::new("ConformanceError", format!("{state} write {write}"));
        TaskMeta::exception(
            id,
            state.clone(),
            &e.with_traceback("Traceback (conformance)"),
        )
    } else {
        TaskMeta::new(
            id,
            state.clone(),
            json!({"state": state.as_str(), "write": write}),
        )
    };
    meta.date_done = meta.date_done.map(|t| t.trunc_subsecs(6));
    meta
}

// ===== cases =====

/// `store` then `get` returns the record unchanged, extended fields included.
pub async fn case_store_get_round_trip(backend: DynBackend) {
    let id = task_id("round-trip");
    let mut meta = TaskMeta::success(&id, json!({"sum": 5, "text": "ünï ✓", "list": [1, null]}));
    meta.date_done = Some(Utc::now().trunc_subsecs(6));
    meta.children = vec![json!([[new_id(), null], null])];
    meta.group_id = Some(new_id());
    meta.parent_id = Some(new_id());
    meta.name = Some("conformance.add".into());
    meta.args = Some(vec![json!(2), json!(3)]);
    meta.kwargs = Some(Map::from_iter([("k".to_owned(), json!("v"))]));
    meta.worker = Some("celeriac@conformance".into());
    meta.retries = Some(1);
    meta.queue = Some("conformance".into());
    assert!(
        store(&backend, &meta).await,
        "the first store of an id is written"
    );
    assert_eq!(
        get(&backend, &id).await,
        Some(meta),
        "extended SUCCESS record"
    );

    let id = task_id("round-trip-failure");
    let error = RemoteError::new("ValueError", "bad input")
        .with_module("builtins")
        .with_traceback("Traceback (most recent call last):\n  ...\nValueError: bad input");
    let mut failure = TaskMeta::exception(&id, TaskState::Failure, &error);
    failure.date_done = Some(Utc::now().trunc_subsecs(6));
    assert!(store(&backend, &failure).await);
    let got = get(&backend, &id).await.expect("stored FAILURE record");
    assert_eq!(got, failure, "FAILURE record");
    assert_eq!(
        got.error(),
        Some(error),
        "the exception is rebuilt from the record"
    );

    let id = task_id("round-trip-custom");
    let progress = meta_in(&id, &TaskState::Custom("PROGRESS".into()), 1);
    assert!(store(&backend, &progress).await);
    assert_eq!(
        get(&backend, &id).await,
        Some(progress),
        "custom-state record"
    );
}

/// An id that was never stored has no record.
pub async fn case_unknown_id_is_none(backend: DynBackend) {
    assert_eq!(get(&backend, &task_id("unknown")).await, None);
}

/// `get_many` answers every id in the order asked, `None` for unknown ones, the same records
/// as `get`.
pub async fn case_get_many(backend: DynBackend) {
    let done = task_id("many-done");
    let running = task_id("many-running");
    let unknown = task_id("many-unknown");
    store(&backend, &meta_in(&done, &TaskState::Success, 1)).await;
    store(&backend, &meta_in(&running, &TaskState::Started, 1)).await;
    let ids = vec![running.clone(), unknown, done.clone(), running.clone()];
    let got = backend
        .get_many(&ids)
        .await
        .unwrap_or_else(|e| panic!("get_many failed: {e:?}"));
    let states: Vec<Option<TaskState>> = got
        .iter()
        .map(|m| m.as_ref().map(|m| m.status.clone()))
        .collect();
    assert_eq!(
        states,
        [
            Some(TaskState::Started),
            None,
            Some(TaskState::Success),
            Some(TaskState::Started)
        ],
        "get_many of [running, unknown, done, running]"
    );
    assert_eq!(got[2], get(&backend, &done).await, "get_many and get agree");
    let none = backend
        .get_many(&[])
        .await
        .unwrap_or_else(|e| panic!("get_many of no ids failed: {e:?}"));
    assert!(none.is_empty(), "get_many of no ids: {none:?}");
}

/// `store` respects state precedence and says whether it wrote.
///
/// SUCCESS is final; a ready state is never replaced by a state that is not ready (a late
/// STARTED or RETRY from a redelivered copy); anything else is replaced.
pub async fn case_precedence(backend: DynBackend) {
    use TaskState::{Failure, Retry, Revoked, Started, Success};
    // The contract, spelled out so that the case does not trust TaskState alone.
    let named: [(TaskState, TaskState, bool); 8] = [
        (Success, Started, false),
        (Success, Retry, false),
        (Success, Failure, false),
        (Failure, Started, false),
        (Revoked, Retry, false),
        (Started, Success, true),
        (Started, Retry, true),
        (Retry, Started, true),
    ];
    let states = [
        Started,
        Retry,
        Success,
        Failure,
        Revoked,
        TaskState::Custom("PROGRESS".into()),
    ];
    let mut pairs = named.to_vec();
    for old in &states {
        for new in &states {
            pairs.push((old.clone(), new.clone(), old.may_be_replaced_by(new)));
        }
    }

    let mut wrong = Vec::new();
    for (old, new, replaced) in pairs {
        let id = task_id("precedence");
        let first = meta_in(&id, &old, 1);
        let second = meta_in(&id, &new, 2);
        assert!(
            store(&backend, &first).await,
            "the first store of {id} ({old})"
        );
        let written = store(&backend, &second).await;
        let expected = if replaced { &second } else { &first };
        let got = get(&backend, &id).await;
        if written != replaced || got.as_ref() != Some(expected) {
            wrong.push(format!(
                "{old} then {new}: store returned {written} (expected {replaced}), \
                 record is {} write {} (expected {} write {})",
                got.as_ref()
                    .map_or("missing".to_owned(), |m| m.status.to_string()),
                got.as_ref().map_or("?".to_owned(), |m| {
                    if m == &first {
                        "1".into()
                    } else if m == &second {
                        "2".into()
                    } else {
                        "?".into()
                    }
                }),
                expected.status,
                if replaced { 2 } else { 1 },
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "state precedence broken:\n  {}",
        wrong.join("\n  ")
    );
}

/// `wait` returns as soon as a ready state is stored, not on a state that is not ready.
pub async fn case_wait_resolves_on_ready_state(backend: DynBackend) {
    let id = task_id("wait");
    let waiter = {
        let (backend, id) = (backend.clone(), id.clone());
        tokio::spawn(async move { backend.wait(&id, Some(EVENTUALLY * 2)).await })
    };
    let mut waiter = waiter;
    assert!(store(&backend, &meta_in(&id, &TaskState::Started, 1)).await);
    assert!(
        store(
            &backend,
            &meta_in(&id, &TaskState::Custom("PROGRESS".into()), 2)
        )
        .await
    );
    assert!(store(&backend, &meta_in(&id, &TaskState::Retry, 3)).await);
    if let Ok(r) = timeout(QUIET, &mut waiter).await {
        panic!("wait returned on a state that is not ready: {r:?}");
    }

    let done = meta_in(&id, &TaskState::Success, 4);
    assert!(store(&backend, &done).await);
    let got = timeout(EVENTUALLY, waiter)
        .await
        .expect("wait must return once SUCCESS is stored")
        .expect("waiting task")
        .expect("wait");
    assert_eq!(got, done);

    // Failed states are ready too; and a ready record is returned at once.
    let id = task_id("wait-failure");
    let waiter = {
        let (backend, id) = (backend.clone(), id.clone());
        tokio::spawn(async move { backend.wait(&id, Some(EVENTUALLY * 2)).await })
    };
    let failed = meta_in(&id, &TaskState::Failure, 1);
    assert!(store(&backend, &failed).await);
    let got = timeout(EVENTUALLY, waiter)
        .await
        .expect("wait must return once FAILURE is stored")
        .expect("waiting task")
        .expect("wait returns the FAILURE record, it does not fail");
    assert_eq!(got, failed);
    let again = timeout(EVENTUALLY, backend.wait(&id, None))
        .await
        .expect("wait on a ready record returns at once")
        .expect("wait");
    assert_eq!(again, failed);
}

/// `wait` fails with [`ErrorKind::Timeout`] when the task is not ready in time.
pub async fn case_wait_times_out(backend: DynBackend) {
    let limit = Duration::from_millis(300);
    let unknown = task_id("wait-timeout");
    let started = task_id("wait-timeout-started");
    assert!(store(&backend, &meta_in(&started, &TaskState::Started, 1)).await);
    for id in [unknown, started] {
        let from = Instant::now();
        let r = timeout(EVENTUALLY, backend.wait(&id, Some(limit)))
            .await
            .unwrap_or_else(|_| {
                panic!("wait({id}, {limit:?}) did not return within {EVENTUALLY:?}")
            });
        let took = from.elapsed();
        match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "wait({id}) error: {e:?}"),
            Ok(meta) => panic!("wait({id}) returned a record that is not ready: {meta:?}"),
        }
        assert!(
            took + CLOCK_TOLERANCE >= limit,
            "wait gave up after {took:?}, before its timeout of {limit:?}"
        );
    }
}

/// `forget` deletes a record; forgetting an unknown id is fine.
pub async fn case_forget(backend: DynBackend) {
    let id = task_id("forget");
    assert!(store(&backend, &meta_in(&id, &TaskState::Success, 1)).await);
    assert!(get(&backend, &id).await.is_some());
    backend.forget(&id).await.expect("forget");
    assert_eq!(get(&backend, &id).await, None, "a forgotten record is gone");
    backend
        .forget(&task_id("forget-unknown"))
        .await
        .expect("forgetting an unknown id succeeds");
    // A forgotten id is new again: even STARTED may be written.
    assert!(store(&backend, &meta_in(&id, &TaskState::Started, 2)).await);
}

/// `save_group` / `restore_group` keep a group's member ids in order.
pub async fn case_groups(backend: DynBackend) {
    let group = task_id("group");
    let members: Vec<String> = (0..5).map(|_| new_id()).collect();
    backend
        .save_group(&group, &members)
        .await
        .expect("save_group");
    assert_eq!(
        backend.restore_group(&group).await.expect("restore_group"),
        Some(members)
    );
    assert_eq!(
        backend
            .restore_group(&task_id("group-unknown"))
            .await
            .expect("restore_group"),
        None,
        "an unknown group has no members"
    );
}

/// `incr` is atomic: 100 concurrent increments give 100, each caller seeing a distinct value.
pub async fn case_incr_is_atomic(backend: DynBackend) {
    const N: i64 = 100;
    let key = task_id("counter");
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (backend, key) = (backend.clone(), key.clone());
            tokio::spawn(async move { backend.incr(&key, 1).await })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("incr task").expect("incr"));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=N).collect::<Vec<_>>(),
        "each concurrent incr must return a distinct new value"
    );
    assert_eq!(backend.incr(&key, 0).await.expect("incr"), N);
    assert_eq!(backend.incr(&key, -5).await.expect("incr"), N - 5);
    assert_eq!(
        backend
            .incr(&task_id("counter-new"), 3)
            .await
            .expect("incr"),
        3,
        "a new counter starts at 0"
    );
}

// ===== coordination (a capability: cluster rate limits, unique tasks, concurrency caps) =====

/// The backend's coordination store, or `None` after a `SKIPPED:` notice.
fn coordination<'a>(
    backend: &'a DynBackend,
    case: &str,
) -> Option<&'a dyn celeriac_core::coord::Coordination> {
    let c = backend.capabilities().coordination;
    if c.is_none() {
        eprintln!(
            "SKIPPED: {case} needs the coordination capability, which the {} backend lacks",
            backend.driver()
        );
    }
    c
}

/// `throttle` hands out slots one interval apart for a key (the next one up to an interval
/// ahead), tells a caller that is earlier than that how long to wait, and keeps keys apart;
/// concurrent callers that start at their slots together keep the rate.
pub async fn case_coord_throttle(backend: DynBackend) {
    use celeriac_core::coord::Admission;
    let Some(c) = coordination(&backend, "case_coord_throttle") else {
        return;
    };
    let key = task_id("throttle");
    let ten: celeriac_core::RateLimit = "10/s".parse().unwrap();
    let interval = Duration::from_millis(100);
    assert_eq!(
        c.throttle(&key, ten).await.unwrap(),
        Admission::At(Duration::ZERO),
        "an unused key's slot is now"
    );
    match c.throttle(&key, ten).await.unwrap() {
        Admission::At(d) if d > Duration::ZERO && d <= interval => {}
        other => {
            panic!("a second call at once gets the next slot, up to one interval on: {other:?}")
        }
    }
    let wait = match c.throttle(&key, ten).await.unwrap() {
        Admission::Wait(w) if w > Duration::ZERO && w <= interval => w,
        other => panic!("a third call at once must wait up to one interval: {other:?}"),
    };
    let other = task_id("throttle-other");
    assert_eq!(
        c.throttle(&other, ten).await.unwrap(),
        Admission::At(Duration::ZERO)
    );
    tokio::time::sleep(wait).await;
    match c.throttle(&key, ten).await.unwrap() {
        Admission::At(d) if d <= interval => {}
        other => panic!("after the wait a slot is free: {other:?}"),
    }

    // Eight callers sharing 100/s, each starting at its slot: 21 starts take at least 20
    // intervals.
    let key = task_id("throttle-shared");
    let hundred: celeriac_core::RateLimit = "100/s".parse().unwrap();
    let started = std::sync::atomic::AtomicU32::new(0);
    let t0 = Instant::now();
    let caller = || async {
        loop {
            if started.load(std::sync::atomic::Ordering::SeqCst) >= 21 {
                return;
            }
            match c.throttle(&key, hundred).await.unwrap() {
                Admission::At(delay) => {
                    tokio::time::sleep(delay).await;
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Admission::Wait(wait) => tokio::time::sleep(wait).await,
            }
        }
    };
    futures_join_all((0..8).map(|_| caller())).await;
    let n = started.load(std::sync::atomic::Ordering::SeqCst);
    let elapsed = t0.elapsed();
    let floor = Duration::from_millis(10) * (n - 1) - CLOCK_TOLERANCE;
    assert!(
        elapsed >= floor,
        "{n} starts at 100/s took {elapsed:?}: the budget is not shared"
    );
}

/// Runs the futures to completion, concurrently, on this task.
async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: impl IntoIterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// A lock has one holder until it is released by that holder or its time runs out.
pub async fn case_coord_lock(backend: DynBackend) {
    let Some(c) = coordination(&backend, "case_coord_lock") else {
        return;
    };
    let key = task_id("lock");
    let long = Duration::from_secs(30);
    assert_eq!(c.lock(&key, "a", long).await.unwrap(), "a");
    assert_eq!(c.lock(&key, "b", long).await.unwrap(), "a");
    assert_eq!(
        c.lock(&key, "a", long).await.unwrap(),
        "a",
        "its holder again"
    );
    assert!(!c.unlock(&key, "b").await.unwrap(), "b does not hold it");
    assert_eq!(c.lock(&key, "b", long).await.unwrap(), "a");
    assert!(c.unlock(&key, "a").await.unwrap());
    assert!(!c.unlock(&key, "a").await.unwrap(), "released already");
    assert_eq!(c.lock(&key, "b", long).await.unwrap(), "b");

    let key = task_id("lock-expiry");
    assert_eq!(
        c.lock(&key, "a", Duration::from_millis(200)).await.unwrap(),
        "a"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        c.lock(&key, "b", long).await.unwrap(),
        "b",
        "an expired lock frees itself"
    );

    // Twenty at once: one holder.
    let key = task_id("lock-race");
    let holders = std::sync::Mutex::new(Vec::new());
    futures_join_all((0..20).map(|i| {
        let (key, holders) = (&key, &holders);
        async move {
            let h = c.lock(key, &format!("h{i}"), long).await.unwrap();
            holders.lock().unwrap().push(h);
        }
    }))
    .await;
    let holders = holders.into_inner().unwrap();
    let first = &holders[0];
    assert!(
        holders.iter().all(|h| h == first),
        "one holder, got {holders:?}"
    );
}

/// Slots: at most `limit` holders at once; a release or an expired lease frees one.
pub async fn case_coord_slots(backend: DynBackend) {
    let Some(c) = coordination(&backend, "case_coord_slots") else {
        return;
    };
    let key = task_id("slots");
    let long = Duration::from_secs(30);
    assert!(c.acquire(&key, "a", 2, long).await.unwrap());
    assert!(c.acquire(&key, "b", 2, long).await.unwrap());
    assert!(
        !c.acquire(&key, "c", 2, long).await.unwrap(),
        "both slots held"
    );
    assert!(
        c.acquire(&key, "a", 2, long).await.unwrap(),
        "a renews its own"
    );
    c.release(&key, "a").await.unwrap();
    assert!(c.acquire(&key, "c", 2, long).await.unwrap());
    c.release(&key, "nobody").await.unwrap();

    let key = task_id("slots-expiry");
    assert!(
        c.acquire(&key, "a", 1, Duration::from_millis(200))
            .await
            .unwrap()
    );
    assert!(!c.acquire(&key, "b", 1, long).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        c.acquire(&key, "b", 1, long).await.unwrap(),
        "an expired lease frees its slot"
    );

    // Twenty at once for three slots: exactly three.
    let key = task_id("slots-race");
    let won = std::sync::atomic::AtomicU32::new(0);
    futures_join_all((0..20).map(|i| {
        let (key, won) = (&key, &won);
        async move {
            if c.acquire(key, &format!("h{i}"), 3, long).await.unwrap() {
                won.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }))
    .await;
    assert_eq!(won.load(std::sync::atomic::Ordering::SeqCst), 3);
}
