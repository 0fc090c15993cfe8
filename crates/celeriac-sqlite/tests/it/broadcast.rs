//! Broadcast channels in the file: rows as written, malformed rows, the sweep, listeners that
//! open late, closing, and files of the previous schema version. (Across processes: see
//! `multiprocess.rs`; the generic suite: `conformance.rs`.)

use std::time::Duration;

use celeriac_core::broadcast::{Broadcasted, Inbox};
use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_sqlite::{SqliteBroker, SqliteOptions};
use serde_json::{Map, Value, json};

use crate::util::{db, msg, next_within};

const SOON: Duration = Duration::from_secs(5);

async fn broker(path: &std::path::Path) -> SqliteBroker {
    SqliteBroker::open(path, SqliteOptions::default())
        .await
        .unwrap()
}

fn event(key: &str, n: i64) -> Broadcasted {
    let mut headers = Map::new();
    headers.insert("hostname".into(), json!("w1@test"));
    Broadcasted::new(key, headers, json!({"type": key.replace('.', "-"), "n": n}))
}

async fn next(inbox: &mut Box<dyn Inbox>) -> Broadcasted {
    tokio::time::timeout(SOON, inbox.next())
        .await
        .expect("a message in time")
        .expect("next")
        .expect("not closed")
}

async fn quiet(inbox: &mut Box<dyn Inbox>) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await {
        panic!("expected nothing, got {r:?}");
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn the_broker_says_it_carries_broadcasts() {
    let b = broker(&db("bc_caps")).await;
    assert!(b.capabilities().fanout);
    assert!(b.broadcast().is_some());
}

/// Each message is a row: its channel, routing key and kombu's envelope naming Celery's
/// exchange, readable with any SQLite client.
#[tokio::test]
async fn rows_hold_kombu_envelopes() {
    let path = db("bc_rows");
    let b = broker(&path).await;
    let ch = b.broadcast().unwrap();
    ch.send_event(&event("worker.heartbeat", 1)).await.unwrap();
    ch.send_control(&Broadcasted::new("", Map::new(), json!({"method": "ping"})))
        .await
        .unwrap();
    ch.send_reply(&Broadcasted::new(
        "k-1",
        Map::new(),
        json!({"w1": {"ok": "pong"}}),
    ))
    .await
    .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = raw
        .prepare("SELECT channel, routing_key, body FROM celeriac_broadcast ORDER BY id")
        .unwrap();
    let rows: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let want = [
        ("event", "worker.heartbeat", "celeryev"),
        ("control", "", "celery.pidbox"),
        ("reply", "k-1", "reply.celery.pidbox"),
    ];
    assert_eq!(rows.len(), want.len());
    for ((channel, key, body), (wc, wk, wx)) in rows.iter().zip(want) {
        assert_eq!((channel.as_str(), key.as_str()), (wc, wk));
        let doc: Value = serde_json::from_str(body).unwrap();
        assert_eq!(doc["content-type"], "application/json");
        assert_eq!(doc["properties"]["delivery_info"]["exchange"], wx);
        assert_eq!(doc["properties"]["delivery_info"]["routing_key"], wk);
    }
}

/// A row that is not an envelope is skipped (and logged); the next one arrives.
#[tokio::test]
async fn malformed_rows_are_skipped() {
    let path = db("bc_malformed");
    let b = broker(&path).await;
    let ch = b.broadcast().unwrap();
    let mut events = ch.event_inbox("#").await.unwrap();
    let mut control = ch.control_inbox("w1@test").await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(SOON).unwrap();
    let good = serde_json::to_string(&json!({
        "body": "e30=", "content-type": "application/json",
        "properties": {"body_encoding": "base64"}
    }))
    .unwrap();
    for (channel, body) in [
        ("event", rusqlite::types::Value::Text("not json".into())),
        ("event", rusqlite::types::Value::Text("[1, 2]".into())),
        (
            "event",
            rusqlite::types::Value::Text(r#"{"body": "{", "headers": {}}"#.into()),
        ),
        (
            "event",
            rusqlite::types::Value::Text(
                r#"{"body": "x", "content-type": "application/x-python-serialize"}"#.into(),
            ),
        ),
        ("event", rusqlite::types::Value::Integer(5)),
        ("event", rusqlite::types::Value::Blob(vec![0xff, 0x00])),
        ("control", rusqlite::types::Value::Text("{".into())),
        // Written by hand, but a valid envelope (body `{}`): delivered.
        ("control", rusqlite::types::Value::Text(good)),
    ] {
        raw.execute(
            "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
             VALUES (?1, 'task.bad', ?2, ?3)",
            (channel, body, now_ms()),
        )
        .unwrap();
    }
    ch.send_event(&event("task.good", 7)).await.unwrap();
    assert_eq!(next(&mut events).await, event("task.good", 7));
    let m = next(&mut control).await;
    assert_eq!(m.body, json!({}));
    assert_eq!(m.routing_key, "task.bad", "the row's routing key");
    quiet(&mut events).await;
    quiet(&mut control).await;
}

/// Like a pub/sub subscriber, an inbox sees what is sent after it opened, not before.
#[tokio::test]
async fn inboxes_start_at_the_newest_row() {
    let b = broker(&db("bc_late")).await;
    let ch = b.broadcast().unwrap();
    ch.send_event(&event("task.before", 1)).await.unwrap();
    let mut late = ch.event_inbox("#").await.unwrap();
    quiet(&mut late).await;
    ch.send_event(&event("task.after", 2)).await.unwrap();
    assert_eq!(next(&mut late).await, event("task.after", 2));
}

/// Reads take bounded batches: an inbox reads a backlog of more than one batch in order.
#[tokio::test]
async fn a_backlog_arrives_in_order() {
    let b = broker(&db("bc_backlog")).await;
    let ch = b.broadcast().unwrap();
    let mut all = ch.event_inbox("#").await.unwrap();
    let mut some = ch.event_inbox("task.*").await.unwrap();
    for n in 0..600 {
        let key = if n % 3 == 0 { "worker.x" } else { "task.x" };
        ch.send_event(&event(key, n)).await.unwrap();
        if n % 100 == 0 {
            ch.send_reply(&Broadcasted::new("nobody", Map::new(), json!(n)))
                .await
                .unwrap();
        }
    }
    for n in 0..600 {
        assert_eq!(next(&mut all).await.body["n"], n);
    }
    for n in (0..600).filter(|n| n % 3 != 0) {
        assert_eq!(next(&mut some).await.body["n"], n);
    }
    quiet(&mut all).await;
}

/// Rows past the 60 s horizon are deleted by a send; ids are never handed out again, so an
/// inbox does not take a new row for one it has read, even when the sweep emptied the table.
#[tokio::test]
async fn old_rows_are_swept_and_ids_never_reused() {
    let path = db("bc_sweep");
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(SOON).unwrap();
    let b = broker(&path).await;
    let ch = b.broadcast().unwrap();
    let old = now_ms() - 120_000;
    for n in 0..5 {
        raw.execute(
            "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
             VALUES ('event', 'task.old', ?1, ?2)",
            (format!("old {n}"), old),
        )
        .unwrap();
    }
    let mut inbox = ch.event_inbox("#").await.unwrap();
    // The first send of a broker sweeps.
    ch.send_event(&event("task.new", 1)).await.unwrap();
    let left: Vec<(i64, String)> = raw
        .prepare("SELECT id, routing_key FROM celeriac_broadcast ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(left, [(6, "task.new".to_owned())]);
    assert_eq!(next(&mut inbox).await, event("task.new", 1));

    // Empty the table as a sweep would after a quiet minute: the next row is still id 7.
    raw.execute("DELETE FROM celeriac_broadcast", []).unwrap();
    ch.send_event(&event("task.newer", 2)).await.unwrap();
    let id: i64 = raw
        .query_row("SELECT id FROM celeriac_broadcast", [], |r| r.get(0))
        .unwrap();
    assert_eq!(id, 7);
    assert_eq!(next(&mut inbox).await, event("task.newer", 2));
}

/// An inbox that fell behind the horizon misses what was swept (with a warning) and goes on
/// with what is left.
#[tokio::test]
async fn an_inbox_behind_the_horizon_skips_what_was_swept() {
    let path = db("bc_behind");
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(SOON).unwrap();
    let b = broker(&path).await;
    let ch = b.broadcast().unwrap();
    let mut inbox = ch.event_inbox("#").await.unwrap();
    // Rows that were sent while the reader slept, now past the horizon.
    let old = now_ms() - 120_000;
    for n in 0..3 {
        raw.execute(
            "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
             VALUES ('event', 'task.old', ?1, ?2)",
            (format!("old {n}"), old),
        )
        .unwrap();
    }
    ch.send_event(&event("task.new", 1)).await.unwrap();
    assert_eq!(next(&mut inbox).await, event("task.new", 1));
}

/// Closing the broker ends its inboxes and refuses sends.
#[tokio::test]
async fn closing_ends_inboxes() {
    let b = broker(&db("bc_close")).await;
    let ch = b.broadcast().unwrap();
    let mut inbox = ch.control_inbox("w1@test").await.unwrap();
    let waiting = tokio::spawn(async move { inbox.next().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.close().await.unwrap();
    let r = tokio::time::timeout(SOON, waiting).await.unwrap().unwrap();
    assert!(matches!(r, Ok(None)), "{r:?}");
    let e = ch.send_event(&event("task.x", 1)).await.unwrap_err();
    assert_eq!(e.kind(), celeriac_core::ErrorKind::Closed, "{e}");
}

/// The tables of schema version 1, as the previous release created them.
const V1_DDL: &str = "
CREATE TABLE celeriac_queues (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE celeriac_messages (
    id INTEGER PRIMARY KEY, queue TEXT NOT NULL, priority INTEGER NOT NULL,
    state INTEGER NOT NULL, visible_at INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL);
CREATE INDEX celeriac_messages_ready
    ON celeriac_messages (queue, priority DESC, id) WHERE state = 0;
CREATE INDEX celeriac_messages_waiting
    ON celeriac_messages (queue, visible_at) WHERE state <> 0;
CREATE TABLE celeriac_results (
    task_id TEXT PRIMARY KEY, status TEXT NOT NULL, date_done TEXT,
    expires_at INTEGER, meta TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX celeriac_results_expiry
    ON celeriac_results (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE celeriac_groups (
    group_id TEXT PRIMARY KEY, task_ids TEXT NOT NULL, expires_at INTEGER) WITHOUT ROWID;
CREATE TABLE celeriac_counters (
    key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires_at INTEGER) WITHOUT ROWID;
PRAGMA user_version = 1;
";

/// A file of schema version 1 (before broadcasts) opens, keeps its messages, and gains the
/// broadcast table; opening it again changes nothing.
#[tokio::test]
async fn a_version_1_file_is_upgraded() {
    let path = db("bc_v1");
    let m = msg();
    {
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch(V1_DDL).unwrap();
        let body =
            String::from_utf8(celeriac_core::protocol::envelope::encode(&m, "", "q").unwrap())
                .unwrap();
        raw.execute("INSERT INTO celeriac_queues VALUES ('q'); ", [])
            .unwrap();
        raw.execute(
            "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) \
             VALUES ('q', 0, 0, 0, ?1)",
            [body],
        )
        .unwrap();
    }
    let b = broker(&path).await;
    let raw = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    let wake: i64 = raw
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'celeriac_wake'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(wake, 1, "version 4's wake sequences");
    let mut c = b
        .consume(&["q".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut c, SOON).await;
    assert_eq!(d.message.as_ref().unwrap(), &m);
    d.ack().await.unwrap();
    let ch = b.broadcast().unwrap();
    let mut inbox = ch.event_inbox("#").await.unwrap();
    ch.send_event(&event("task.x", 1)).await.unwrap();
    assert_eq!(next(&mut inbox).await, event("task.x", 1));
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    drop((c, inbox, b));
    // A second opener (another process, say) finds the file current.
    let again = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    assert_eq!(again.stats("q").await.unwrap().ready, 1);
    let tables: i64 = raw
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'celeriac_broadcast'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1);
}
