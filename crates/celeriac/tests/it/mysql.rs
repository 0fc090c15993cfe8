//! Transactional enqueue on MariaDB/MySQL (`celeriac::mysql::send_in`) with a real worker:
//! rollback → the task never runs; commit → it runs; before the commit no worker sees it.
//! Needs the server at 127.0.0.1:3306 (skips with a notice otherwise).

use std::time::Duration;

use celeriac::mysql::sqlx::{self, Connection as _};
use celeriac::{App, ErrorKind, Signature};

#[celeriac::task(name = "txn.triple")]
async fn triple(x: i64) -> i64 {
    x * 3
}

const ADDR: &str = "127.0.0.1:3306";

/// A fresh database, so the default queue holds only this test's messages.
async fn fresh_database() -> String {
    let name = format!(
        "celeriac_txn_{}",
        &celeriac::core::protocol::new_id().replace('-', "")[20..]
    );
    let mut root = sqlx::mysql::MySqlConnection::connect(&format!("mysql://root@{ADDR}/"))
        .await
        .expect("connect as root");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut root)
        .await
        .expect("create database");
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sent_in_a_mysql_transaction_exists_only_if_it_commits() {
    if !celeriac_test::services::require_service("mariadb", ADDR) {
        return;
    }
    let db = fresh_database().await;
    let url = format!("mysql://root@{ADDR}/{db}?poll-interval-ms=20");
    let app = App::builder()
        .broker_url(&url)
        .result_backend(&url)
        .task::<triple>()
        .build()
        .await
        .expect("app on mysql");
    let pool = sqlx::MySqlPool::connect(&format!("mysql://root@{ADDR}/{db}"))
        .await
        .expect("pool");
    sqlx::query("CREATE TABLE orders (id INT PRIMARY KEY) ENGINE = InnoDB")
        .execute(&pool)
        .await
        .expect("business table");

    let worker = app.worker(app.worker_options());
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    // Rolled back: neither the order nor the task exists, and the task never runs.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders (id) VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    let lost = celeriac::mysql::send_in(&mut tx, &app, &triple::s(1))
        .await
        .expect("send_in");
    tx.rollback().await.expect("rollback");
    let e = lost
        .get_timeout(Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Timeout,
        "a rolled-back task ran: {e:?}"
    );
    assert_eq!(app.broker().stats("celery").await.unwrap().total(), 0);

    // Open: the worker cannot see it yet. Committed: it runs.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders (id) VALUES (2)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    let sig = Signature::<i64>::new("txn.triple").arg(14);
    let kept = celeriac::mysql::send_in(&mut tx, &app, &sig)
        .await
        .expect("send_in");
    assert_eq!(
        kept.get_timeout(Duration::from_millis(700))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout,
        "a task ran before its transaction committed"
    );
    tx.commit().await.expect("commit");
    assert_eq!(kept.get_timeout(Duration::from_secs(15)).await.unwrap(), 42);
    let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orders, 1, "only the committed order exists");

    // The message is built as apply_async builds it: same queue, task and arguments.
    let prepared = app.prepare_send(&triple::s(5)).unwrap();
    assert_eq!(prepared.queue, "celery");
    assert_eq!(prepared.message.task(), "txn.triple");

    stop.warm();
    running.await.unwrap().unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db}")))
        .execute(&pool)
        .await
        .expect("drop database");
}

/// `send_in` refuses an app whose broker is not MariaDB/MySQL, with a clear error.
#[tokio::test]
async fn send_in_needs_a_mysql_broker() {
    if !celeriac_test::services::require_service("mariadb", ADDR) {
        return;
    }
    let app = App::builder()
        .broker_url("memory://")
        .result_backend("memory://")
        .build()
        .await
        .unwrap();
    let mut conn = sqlx::mysql::MySqlConnection::connect(&format!("mysql://root@{ADDR}/"))
        .await
        .expect("connect");
    let e = celeriac::mysql::send_in(&mut conn, &app, &triple::s(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("MariaDB/MySQL"), "{e}");
}
