//! Result backend and broadcast behaviour beyond the conformance suites.

use std::time::Duration;

use celeriac_core::broadcast::{Broadcast as _, Broadcasted, EVENT_EXCHANGE, envelope};
use celeriac_core::{Config, ResultBackend, TaskMeta};
use celeriac_mysql::{MysqlBackend, MysqlOptions};
use serde_json::{Map, json};

use crate::util::{broker, url};

/// Results, groups and counters expire: invisible at once, deleted by the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_and_are_swept() {
    let Some(url) = url().await else { return };
    let options = MysqlOptions::from_url(&url, &Config::default())
        .unwrap()
        .result_expires(Some(Duration::from_millis(300)));
    let b = MysqlBackend::open(options).await.unwrap();
    let id = celeriac_core::protocol::new_id();
    b.store(&TaskMeta::success(&id, 7.into())).await.unwrap();
    b.save_group(&id, std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(b.incr(&id, 2).await.unwrap(), 2);
    assert!(b.get(&id).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        b.get(&id).await.unwrap().is_none(),
        "an expired result is invisible"
    );
    assert!(b.restore_group(&id).await.unwrap().is_none());
    assert_eq!(
        b.incr(&id, 1).await.unwrap(),
        1,
        "an expired counter starts again"
    );
    // An expired result no longer blocks a new state by precedence.
    b.store(&TaskMeta::success(&id, 8.into())).await.unwrap();
    assert_eq!(b.get(&id).await.unwrap().unwrap().result, 8);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        b.sweep().await.unwrap() >= 2,
        "the sweep deletes the expired rows"
    );
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM celeriac_results WHERE task_id = ?")
        .bind(&id)
        .fetch_one(b.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// Two sends commit out of order (the later id first): the inbox waits for the earlier id
/// instead of skipping it, and delivers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_does_not_skip_a_row_that_commits_late() {
    let Some(b) = broker().await else { return };
    let topic = format!("late.{}", &celeriac_core::protocol::new_id()[24..]);
    let mut inbox = b.event_inbox(&format!("{topic}.#")).await.unwrap();

    // The first send's transaction takes its id and stays open.
    let first = Broadcasted::new(format!("{topic}.first"), Map::new(), json!({"n": 1}));
    let body = String::from_utf8(envelope::encode(&first, EVENT_EXCHANGE)).unwrap();
    let mut tx = b.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO celeriac_broadcast (channel, routing_key, body, created_at) \
         VALUES ('event', ?, ?, CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))",
    )
    .bind(&first.routing_key)
    .bind(&body)
    .execute(&mut *tx)
    .await
    .unwrap();
    // The second commits at once, with the larger id.
    let second = Broadcasted::new(format!("{topic}.second"), Map::new(), json!({"n": 2}));
    b.send_event(&second).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(150), inbox.next()).await;
    assert!(
        early.is_err(),
        "the inbox went past the missing id: {early:?}"
    );
    tx.commit().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), inbox.next())
            .await
            .expect("delivered")
            .unwrap()
            .unwrap();
        got.push(m.routing_key);
    }
    assert_eq!(got, [first.routing_key, second.routing_key]);
}

/// Coordination tables are created on first use: twenty backends on a fresh database asking
/// at once all succeed, and agree on one holder; keys longer than an index allows (a unique
/// task's key holds its arguments) work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordination_tables_appear_once_under_twenty_first_users() {
    use celeriac_core::coord::Coordination as _;
    use sqlx::Connection as _;
    if url().await.is_none() {
        return;
    }
    let db = format!(
        "celeriac_it_coord_{}",
        &celeriac_core::protocol::new_id().replace('-', "")[20..]
    );
    crate::util::create_database(&db).await;
    let url = format!("mysql://root@{}/{db}", crate::util::ADDR);
    let mut backends = Vec::new();
    for _ in 0..20 {
        backends.push(
            MysqlBackend::connect(&url, &Config::default())
                .await
                .unwrap(),
        );
    }
    let key = format!("unique:tests.long:{}", "x".repeat(5000));
    let long = Duration::from_secs(30);
    let mut calls = tokio::task::JoinSet::new();
    for (i, b) in backends.iter().enumerate() {
        let (b, key) = (b.clone(), key.clone());
        calls.spawn(async move { b.lock(&key, &format!("h{i}"), long).await.unwrap() });
    }
    let holders = calls.join_all().await;
    assert!(
        holders.iter().all(|h| h == &holders[0]),
        "one holder, got {holders:?}"
    );
    let b = &backends[0];
    assert!(b.unlock(&key, &holders[0]).await.unwrap());
    assert!(b.acquire(&key, "a", 1, long).await.unwrap());
    assert!(!b.acquire(&key, "b", 1, long).await.unwrap());
    b.release(&key, "a").await.unwrap();
    assert!(b.acquire(&key, "b", 1, long).await.unwrap());
    let mut root = sqlx::mysql::MySqlConnection::connect(&url).await.unwrap();
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db}")))
        .execute(&mut root)
        .await;
}
