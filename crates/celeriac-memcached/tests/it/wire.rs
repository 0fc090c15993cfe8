//! The stored bytes, as Celery's cache backend (through python-memcached) writes and reads
//! them.

use celeriac_core::{Config, ErrorKind, RemoteError, ResultBackend, TaskMeta, TaskState};
use celeriac_memcached::MemcachedBackend;
use celeriac_memcached::client::flags;
use celeriac_test::memcached::Memcached;
use serde_json::{Value, json};

#[tokio::test]
async fn keys_flags_and_documents_are_celerys() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    let c = b.client().clone();

    let e = RemoteError::new("ValueError", "boom")
        .with_traceback("Traceback (most recent call last):\n");
    b.store(&TaskMeta::exception("t1", TaskState::Failure, &e))
        .await
        .unwrap();
    let item = c
        .get("celery-task-meta-t1")
        .await
        .unwrap()
        .expect("celery's key");
    assert_eq!(
        item.flags,
        flags::TEXT,
        "a str to python-memcached and pylibmc"
    );
    let doc: Value = serde_json::from_slice(&item.data).unwrap();
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "ValueError");
    assert_eq!(doc["task_id"], "t1");

    b.save_group("g1", &["a".into(), "b".into()]).await.unwrap();
    let item = c
        .get("celery-taskset-meta-g1")
        .await
        .unwrap()
        .expect("celery's group key");
    assert_eq!(item.flags, flags::TEXT);
    let doc: Value = serde_json::from_slice(&item.data).unwrap();
    assert_eq!(
        doc,
        json!({"result": [["g1", null], [[["a", null], null], [["b", null], null]]]})
    );

    // What python-memcached writes for Celery: a str (flags 16) holding the JSON document.
    let py = br#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-01-05T10:15:31.176903+00:00", "task_id": "t2"}"#;
    c.set("celery-task-meta-t2", flags::TEXT, py, 0)
        .await
        .unwrap();
    assert_eq!(b.get("t2").await.unwrap().unwrap().result, 5);
    // Bytes (flags 0) read the same.
    c.set("celery-task-meta-t3", flags::BYTES, py, 0)
        .await
        .unwrap();
    assert_eq!(
        b.get("t3").await.unwrap().unwrap().status,
        TaskState::Success
    );
    // A pickle is refused, never unpickled.
    c.set("celery-task-meta-t4", flags::PICKLE, b"\x80\x04K\x05.", 0)
        .await
        .unwrap();
    let e = b.get("t4").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("pickle"), "{e}");

    // Counters: an int to Python (flags 2), counted with memcached's incr.
    assert_eq!(b.incr("chord-unlock-g1", 1).await.unwrap(), 1);
    let item = c.get("chord-unlock-g1").await.unwrap().unwrap();
    assert_eq!(
        (item.flags, item.data.as_slice()),
        (flags::INTEGER, &b"1"[..])
    );
    // Python's chord sender sets the counter to 0 (an int), then workers incr it.
    c.set("chord-unlock-g2", flags::INTEGER, b"0", 0)
        .await
        .unwrap();
    assert_eq!(b.incr("chord-unlock-g2", 1).await.unwrap(), 1);
    assert_eq!(b.incr("chord-unlock-g2", -3).await.unwrap(), -2);
    assert_eq!(b.incr("chord-unlock-g2", 5).await.unwrap(), 3);
}

#[tokio::test]
async fn results_expire_as_result_expires_says() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let mut config = Config::default();
    config.result_expires = Some(std::time::Duration::from_secs(1));
    let b = MemcachedBackend::connect(&server.url(), &config)
        .await
        .unwrap();
    b.store(&TaskMeta::success("short", json!(1)))
        .await
        .unwrap();
    assert!(b.get("short").await.unwrap().is_some());
    // memcached's clock ticks in whole seconds: gone within 2 s + a tick.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    while b.get("short").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn chords_count_on_celerys_chord_unlock_key() {
    use celeriac_core::canvas::{ChordPart, ChordStatus};
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    let c = b.client().clone();
    let chords = b.capabilities().chords.expect("celery's chord protocol");
    let ids: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    b.save_group("g", &ids).await.unwrap();
    chords.set_chord_size("g", 3).await.unwrap();
    let counter = c.get("chord-unlock-g").await.unwrap().expect("the counter");
    assert_eq!(
        (counter.flags, counter.data.as_slice()),
        (flags::INTEGER, &b"0"[..])
    );
    let metas: Vec<TaskMeta> = (0..3)
        .map(|i| TaskMeta::success(format!("m{i}"), json!(i)))
        .collect();
    // Members return out of order; the third completes the chord, in header order.
    let mut seen = Vec::new();
    for i in [2, 0, 1] {
        b.store(&metas[i]).await.unwrap();
        let part = ChordPart::new("g", &metas[i], Some(i as u32));
        seen.push(chords.chord_part_return(part).await.unwrap());
    }
    assert_eq!(seen[..2], [ChordStatus::Waiting, ChordStatus::Waiting]);
    let ChordStatus::Complete(parts) = &seen[2] else {
        panic!("{seen:?}");
    };
    let results: Vec<&Value> = parts.iter().map(|m| &m.result).collect();
    assert_eq!(results, [&json!(0), &json!(1), &json!(2)]);
    // Celery deletes the group and the counter once the chord is complete.
    assert_eq!(c.get("chord-unlock-g").await.unwrap(), None);
    assert_eq!(b.restore_group("g").await.unwrap(), None);
    // A group without Celery's counter is not Celery's chord: the worker counts it itself.
    b.save_group("h", &ids).await.unwrap();
    let part = ChordPart::new("h", &metas[0], None);
    assert_eq!(
        chords.chord_part_return(part).await.unwrap(),
        ChordStatus::NotNative
    );
}

#[tokio::test]
async fn global_keyprefix_goes_before_every_key() {
    let Some(server) = Memcached::start() else {
        return;
    };
    // Celery's rule: a `_` after the prefix unless it ends in one of `: _ - .`.
    for (url_prefix, key_prefix) in [("app", "app_"), ("app%3A", "app:")] {
        let url = format!("{}?global_keyprefix={url_prefix}", server.url());
        let b = MemcachedBackend::connect(&url, &Config::default())
            .await
            .unwrap();
        let c = b.client().clone();
        b.store(&TaskMeta::success("t", json!(1))).await.unwrap();
        b.save_group("g", &["t".into()]).await.unwrap();
        b.incr("n", 1).await.unwrap();
        for key in ["celery-task-meta-t", "celery-taskset-meta-g", "n"] {
            let k = format!("{key_prefix}{key}");
            assert!(c.get(&k).await.unwrap().is_some(), "{k}");
            c.delete(&k).await.unwrap();
        }
        assert_eq!(b.chord_key("g"), format!("{key_prefix}chord-unlock-g"));
        // Waits read the prefixed key too, also through the shared poll.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                b.wait("late", Some(std::time::Duration::from_secs(5)))
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        b.store(&TaskMeta::success("late", json!(2))).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().result, 2);
        c.delete(&format!("{key_prefix}celery-task-meta-late"))
            .await
            .unwrap();
    }
}
