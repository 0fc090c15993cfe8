//! Result backend: precedence, waiting, expiry, groups, counters.

use std::time::{Duration, Instant};

use celeriac_core::{ErrorKind, ResultBackend, TaskMeta, TaskState};
use celeriac_sqlite::{SqliteBackend, SqliteOptions};

use crate::util::db;

async fn backend(name: &str) -> SqliteBackend {
    SqliteBackend::open(db(name), SqliteOptions::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn store_get_and_precedence() {
    let r = backend("precedence").await;
    assert!(r.get("t").await.unwrap().is_none());
    assert!(r.store(&TaskMeta::started("t", "host")).await.unwrap());
    assert_eq!(
        r.get("t").await.unwrap().unwrap().status,
        TaskState::Started
    );
    assert!(r.store(&TaskMeta::success("t", 7.into())).await.unwrap());
    // A late STARTED or a duplicate run never overwrites SUCCESS.
    assert!(!r.store(&TaskMeta::started("t", "host")).await.unwrap());
    assert!(!r.store(&TaskMeta::success("t", 8.into())).await.unwrap());
    let meta = r.get("t").await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, 7);
    r.forget("t").await.unwrap();
    assert!(r.get("t").await.unwrap().is_none());
}

#[tokio::test]
async fn columns_mirror_the_meta() {
    let path = db("columns");
    let r = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    r.store(&TaskMeta::success("t", 1.into())).await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (status, date_done, expires_at, meta): (String, Option<String>, Option<i64>, String) = raw
        .query_row(
            "SELECT status, date_done, expires_at, meta FROM celeriac_results",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(status, "SUCCESS");
    assert!(date_done.unwrap().ends_with("+00:00"));
    assert!(expires_at.unwrap() > chrono::Utc::now().timestamp_millis());
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(v["task_id"], "t");
}

#[tokio::test]
async fn wait_wakes_on_store_and_times_out() {
    let r = backend("wait").await;
    let r2 = r.clone();
    let storer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        r2.store(&TaskMeta::started("w", "h")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = Instant::now();
        r2.store(&TaskMeta::success("w", 1.into())).await.unwrap();
        at
    });
    let meta = r.wait("w", Some(Duration::from_secs(5))).await.unwrap();
    let latency = storer.await.unwrap().elapsed();
    assert_eq!(meta.status, TaskState::Success);
    assert!(latency < Duration::from_millis(500), "{latency:?}");
    let e = r
        .wait("never", Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
}

#[tokio::test]
async fn wait_sees_another_connections_store() {
    let path = db("wait_other");
    let r = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        // Let the waiter start waiting first (it would also find a result stored before).
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::spawn_blocking(move || {
            let raw = rusqlite::Connection::open(&path).unwrap();
            raw.busy_timeout(Duration::from_secs(5)).unwrap();
            let meta = serde_json::to_string(&TaskMeta::success("x", 2.into())).unwrap();
            raw.execute(
                "INSERT INTO celeriac_results (task_id, status, meta) VALUES ('x', 'SUCCESS', ?1)",
                [meta],
            )
            .unwrap();
        })
        .await
        .unwrap();
    });
    let meta = r.wait("x", Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(meta.result, 2);
    writer.await.unwrap();
}

#[tokio::test]
async fn expired_results_are_invisible() {
    let options = SqliteOptions::default().result_expires(Some(Duration::from_millis(100)));
    let path = db("expiry");
    let r = SqliteBackend::open(&path, options.clone()).await.unwrap();
    r.store(&TaskMeta::success("e", 1.into())).await.unwrap();
    r.save_group("g", &["e".to_owned()]).await.unwrap();
    assert_eq!(r.incr("c", 1).await.unwrap(), 1);
    assert!(r.get("e").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(r.get("e").await.unwrap().is_none());
    assert!(r.restore_group("g").await.unwrap().is_none());
    // An expired counter starts again.
    assert_eq!(r.incr("c", 1).await.unwrap(), 1);
    // An expired SUCCESS no longer blocks a new record.
    assert!(r.store(&TaskMeta::started("e", "h")).await.unwrap());
    // Expired rows are deleted by the next sweep (a fresh handle sweeps on its first store).
    r.store(&TaskMeta::success("old", 1.into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fresh = SqliteBackend::open(&path, options).await.unwrap();
    fresh
        .store(&TaskMeta::success("new", 1.into()))
        .await
        .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let ids: Vec<String> = raw
        .prepare("SELECT task_id FROM celeriac_results ORDER BY task_id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, vec!["new".to_owned()]);
}

#[tokio::test]
async fn groups_and_counters() {
    let r = backend("groups").await;
    let ids = vec!["a".to_owned(), "b".to_owned()];
    r.save_group("g", &ids).await.unwrap();
    assert_eq!(r.restore_group("g").await.unwrap(), Some(ids));
    assert_eq!(r.restore_group("nope").await.unwrap(), None);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let r = r.clone();
        tasks.push(tokio::spawn(
            async move { r.incr("chord", 1).await.unwrap() },
        ));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=20).collect::<Vec<i64>>());
    assert_eq!(r.incr("chord", -20).await.unwrap(), 0);
}

#[tokio::test]
async fn closed_backend_refuses_calls() {
    let r = backend("closed").await;
    r.close().await.unwrap();
    let e = r.get("x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn many_waiters_are_answered_and_a_cancelled_one_is_forgotten() {
    let r = backend("many_waiters").await;
    // One waiter gives up before its result exists; another waits for the same id.
    let e = r
        .wait("t0", Some(Duration::from_millis(20)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let waiters: Vec<_> = (0..50)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                r.wait(&format!("t{i}"), Some(Duration::from_secs(10)))
                    .await
            })
        })
        .collect();
    // A result that is not ready yet does not answer a waiter.
    r.store(&TaskMeta::started("t0", "h")).await.unwrap();
    let stores: Vec<_> = (0..50)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(
                async move { r.store(&TaskMeta::success(format!("t{i}"), i.into())).await },
            )
        })
        .collect();
    for s in stores {
        assert!(s.await.unwrap().unwrap());
    }
    for (i, w) in waiters.into_iter().enumerate() {
        let meta = w.await.unwrap().unwrap();
        assert_eq!(meta.task_id, format!("t{i}"));
        assert_eq!(meta.status, TaskState::Success);
        assert_eq!(meta.result, i);
    }
}

#[tokio::test]
async fn wait_with_zero_timeout_returns_a_stored_result() {
    let r = backend("wait_zero").await;
    r.store(&TaskMeta::success("done", 3.into())).await.unwrap();
    let meta = r.wait("done", Some(Duration::ZERO)).await.unwrap();
    assert_eq!(meta.result, 3);
    let e = r.wait("missing", Some(Duration::ZERO)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
}
