//! Celery's result documents, the PUBLISH on the key, expiry, groups and waiting.

use std::time::Duration;

use celeriac_core::{ResultBackend, TaskMeta, TaskState};
use celeriac_redis::RedisOptions;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::util::{self, backend_with, raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_writes_celerys_document_publishes_it_and_sets_the_ttl() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(
        &p,
        RedisOptions::default().result_expires(Some(Duration::from_secs(600))),
    )
    .await;
    let key = backend.task_key("t1");
    assert_eq!(
        key,
        format!("{p}celery-task-meta-t1"),
        "prefix ends in ':' so no '_' is added"
    );

    let mut pubsub = redis::Client::open(util::URL)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let mut meta = TaskMeta::success("t1", json!(5));
    meta.name = Some("proj.tasks.add".into());
    assert!(backend.store(&meta).await.unwrap());

    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_channel_name(), key);
    let published: Vec<u8> = msg.get_payload().unwrap();
    let mut c = raw().await;
    let stored: Vec<u8> = c.get(&key).await.unwrap();
    assert_eq!(published, stored);
    let text = String::from_utf8(stored).unwrap();
    assert!(
        text.starts_with(
            r#"{"status":"SUCCESS","result":5,"traceback":null,"children":[],"date_done":""#
        ),
        "{text}"
    );
    assert!(
        text.ends_with(r#","name":"proj.tasks.add","task_id":"t1"}"#),
        "{text}"
    );
    let ttl: i64 = c.ttl(&key).await.unwrap();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");

    // SUCCESS is final: a late STARTED is not written nor published.
    assert!(
        !backend
            .store(&TaskMeta::started("t1", "w@h"))
            .await
            .unwrap()
    );
    let still: Value = serde_json::from_slice(&c.get::<_, Vec<u8>>(&key).await.unwrap()).unwrap();
    assert_eq!(still["status"], "SUCCESS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_prefix_rule_and_no_expiry() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let bare = p.trim_end_matches(':').to_owned();
    let backend = backend_with(&bare, RedisOptions::default().result_expires(None)).await;
    let key = backend.task_key("t2");
    assert_eq!(key, format!("{bare}_celery-task-meta-t2"));
    backend
        .store(&TaskMeta::success("t2", json!(null)))
        .await
        .unwrap();
    let mut c = raw().await;
    let ttl: i64 = c.ttl(&key).await.unwrap();
    assert_eq!(ttl, -1, "result_expires None keeps results");
    let _: () = c.del(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_celerys_tuple_and_python_written_ones_restore() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    backend
        .save_group("g1", &["a".to_owned(), "b".to_owned()])
        .await
        .unwrap();
    let mut c = raw().await;
    let v: Value = serde_json::from_slice(
        &c.get::<_, Vec<u8>>(format!("{p}celery-taskset-meta-g1"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"result": [["g1", null], [[["a", null], null], [["b", null], null]]]})
    );
    // As Python's json.dumps writes it.
    let py = r#"{"result": [["g2", null], [[["x", null], null], [["y", null], null]]]}"#;
    let _: () = c
        .set(format!("{p}celery-taskset-meta-g2"), py)
        .await
        .unwrap();
    assert_eq!(
        backend.restore_group("g2").await.unwrap(),
        Some(vec!["x".to_owned(), "y".to_owned()])
    );
}

/// A waiter on `task_id` (20 s timeout) in its own task.
fn spawn_wait(
    backend: &celeriac_redis::RedisBackend,
    task_id: &'static str,
) -> tokio::task::JoinHandle<celeriac_core::Result<TaskMeta>> {
    let b = backend.clone();
    tokio::spawn(async move { b.wait(task_id, Some(Duration::from_secs(20))).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_resolves_when_another_client_stores_and_reads_python_documents() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let key = backend.task_key("t3");
    let waiter = spawn_wait(&backend, "t3");
    // Give the waiter time to block (it subscribes, reads, then sleeps on the channel).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    // A Python worker's SETEX + PUBLISH, with Python's spacing and a NaN.
    let doc = r#"{"status": "SUCCESS", "result": [1, NaN], "traceback": null, "children": [], "date_done": "2026-01-05T10:15:31.176903+00:00", "task_id": "t3"}"#;
    let mut c = raw().await;
    let _: () = redis::pipe()
        .set_ex(&key, doc, 60)
        .publish(&key, doc)
        .query_async(&mut c)
        .await
        .unwrap();
    let meta = waiter.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "woken by pub/sub, took {:?}",
        started.elapsed()
    );
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, json!([1, null]));
}

/// A waiter takes the document the notice carries (no second read of the key); a state on the
/// way (STARTED) keeps it waiting for the ready one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_the_published_document_and_waits_past_a_started_one() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let key = backend.task_key("t5");
    let waiter = spawn_wait(&backend, "t5");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = raw().await;
    let started = r#"{"status": "STARTED", "result": {"pid": 1}, "task_id": "t5"}"#;
    let _: () = c.publish(&key, started).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "STARTED is not ready");
    // Published only, never stored: the waiter can have it only from the notice.
    let done =
        r#"{"status": "SUCCESS", "result": 7, "traceback": null, "children": [], "task_id": "t5"}"#;
    let _: () = c.publish(&key, done).await.unwrap();
    let meta = waiter.await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, json!(7));
    let stored: Option<Vec<u8>> = c.get(&key).await.unwrap();
    assert_eq!(stored, None);
}

/// A notice whose payload is not a result document (another publisher on the channel) makes
/// the waiter read the key instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_notice_makes_the_waiter_read_the_key() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let key = backend.task_key("t6");
    let waiter = spawn_wait(&backend, "t6");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = raw().await;
    let doc = r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["x"]}, "traceback": "tb", "children": [], "task_id": "t6"}"#;
    let _: () = c.set_ex(&key, doc, 60).await.unwrap();
    let _: () = c.publish(&key, "not json").await.unwrap();
    let meta = waiter.await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(meta.traceback.as_deref(), Some("tb"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_sets_the_expiry() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(
        &p,
        RedisOptions::default().result_expires(Some(Duration::from_secs(100))),
    )
    .await;
    assert_eq!(backend.incr("chord-unlock-g", 2).await.unwrap(), 2);
    let mut c = raw().await;
    let ttl: i64 = c.ttl(format!("{p}chord-unlock-g")).await.unwrap();
    assert!((90..=100).contains(&ttl), "{ttl}");
}

/// Many waiters at once share the subscriber's batched `SUBSCRIBE` / `UNSUBSCRIBE`, while
/// other waiters on the same tasks come and leave (time out) in the same batches: each waiter
/// that stays still gets its task's result, whether it was stored before or after it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_stay_are_served_while_others_on_the_same_task_come_and_go() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let n = 200;
    let ids: Vec<String> = (0..n).map(|i| format!("batched-{i}")).collect();
    // Every tenth result is there before anyone asks (the read-first path).
    for id in ids.iter().step_by(10) {
        backend
            .store(&TaskMeta::success(id.as_str(), json!(id)))
            .await
            .unwrap();
    }
    let mut stayers = tokio::task::JoinSet::new();
    let mut leavers = tokio::task::JoinSet::new();
    for id in &ids {
        for leave_after_us in [0, 300] {
            let (b, id) = (backend.clone(), id.clone());
            leavers.spawn(async move {
                let wait = b.wait(&id, Some(Duration::from_micros(leave_after_us)));
                let _ = wait.await;
            });
        }
        let (b, id) = (backend.clone(), id.clone());
        stayers.spawn(async move {
            let meta = b.wait(&id, Some(Duration::from_secs(20))).await?;
            Ok::<_, celeriac_core::Error>((id, meta))
        });
    }
    for id in ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(_, id)| id)
    {
        backend
            .store(&TaskMeta::success(id.as_str(), json!(id)))
            .await
            .unwrap();
    }
    let mut served = 0;
    while let Some(r) = stayers.join_next().await {
        let (id, meta) = r.unwrap().unwrap();
        assert_eq!(meta.result, json!(id));
        served += 1;
    }
    assert_eq!(served, n);
    while leavers.join_next().await.is_some() {}
}

/// Stores that come together share script calls: each one still says whether it wrote, a
/// key named twice in a batch is checked against what the batch wrote before it, and every
/// written document is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stores_are_batched_and_keep_precedence_within_a_batch() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let mut pubsub = redis::Client::open(util::URL)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .psubscribe(format!("{p}celery-task-meta-*"))
        .await
        .unwrap();

    // SUCCESS then a late STARTED for one id, sent before the batcher can run: the STARTED
    // must lose to the SUCCESS written earlier in the same call, not win against the empty
    // key the call began with.
    let (first, late) = (
        TaskMeta::success("twice", json!(1)),
        TaskMeta::started("twice", "w@h"),
    );
    let (success, started) = tokio::join!(backend.store(&first), backend.store(&late));
    assert!(success.unwrap());
    assert!(!started.unwrap());
    let mut c = raw().await;
    let key = backend.task_key("twice");
    let doc: Value = serde_json::from_slice(&c.get::<_, Vec<u8>>(&key).await.unwrap()).unwrap();
    assert_eq!(doc["status"], "SUCCESS");

    // Many at once, some refused because their id already holds a final state.
    let n = 600;
    let stores = (0..n).map(|i| {
        let backend = backend.clone();
        tokio::spawn(async move {
            let id = format!("many-{i}");
            if i % 3 == 0 {
                backend.store(&TaskMeta::success(&id, json!(i))).await?;
                return backend.store(&TaskMeta::started(&id, "w@h")).await;
            }
            backend.store(&TaskMeta::success(&id, json!(i))).await
        })
    });
    let written: Vec<bool> = futures_util::future::join_all(stores)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    for (i, w) in written.iter().enumerate() {
        assert_eq!(*w, i % 3 != 0, "store {i}");
    }
    let keys: Vec<String> = (0..n)
        .map(|i| backend.task_key(&format!("many-{i}")))
        .collect();
    let docs: Vec<Vec<u8>> = c.mget(&keys).await.unwrap();
    for (i, d) in docs.iter().enumerate() {
        let d: Value = serde_json::from_slice(d).unwrap();
        assert_eq!(
            (d["status"].as_str(), d["result"].as_i64()),
            (Some("SUCCESS"), Some(i as i64))
        );
    }

    // One notice per written document: the first SUCCESS, then the n.
    let mut stream = pubsub.on_message();
    for _ in 0..=n {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a notice per written document")
            .unwrap();
        let d: Value = serde_json::from_slice(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
        assert_eq!(d["status"], "SUCCESS", "no refused STARTED is published");
    }
}

/// A wait on a task sent a moment ago subscribes before it reads the key (its result cannot
/// be there yet, so a read first would only delay the subscription); a plain wait reads first
/// and subscribes only when the result is missing. Both then take the stored result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_just_sent_task_subscribes_without_reading_first() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let backend = backend_with(&p, RedisOptions::default()).await;
    let monitor = redis::Client::open(util::URL)
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let mut lines = monitor.into_on_message::<String>();
    for (id, just_sent) in [("t-fresh", true), ("t-plain", false)] {
        let quoted = format!("\"{}\"", backend.task_key(id));
        let b = backend.clone();
        let waiter = tokio::spawn(async move {
            let timeout = Some(Duration::from_secs(20));
            if just_sent {
                celeriac_core::backend::JustSentWait::wait_just_sent(&b, id, timeout).await
            } else {
                b.wait(id, timeout).await
            }
        });
        // The commands naming the key, in the server's order, up to the subscription. A
        // MONITOR line is `<time> [<db> <client>] "COMMAND" "arg" ...`.
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("SUBSCRIBE") {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next())
                .await
                .expect("the waiter subscribes")
                .expect("monitor stream open");
            let Some((_, args)) = line.split_once("] ") else {
                continue;
            };
            if args.split(' ').any(|a| a == quoted) {
                let command = args.split(' ').next().unwrap_or_default();
                seen.push(command.trim_matches('"').to_ascii_uppercase());
            }
        }
        let expected: &[&str] = if just_sent {
            &["SUBSCRIBE"]
        } else {
            &["GET", "SUBSCRIBE"]
        };
        assert_eq!(seen, expected, "{id}");
        backend
            .store(&TaskMeta::success(id, json!(1)))
            .await
            .unwrap();
        let meta = waiter.await.unwrap().unwrap();
        assert_eq!((meta.status, meta.result), (TaskState::Success, json!(1)));
    }
}
