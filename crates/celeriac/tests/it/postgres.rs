//! Transactional enqueue on PostgreSQL (`celeriac::postgres::send_in`) with a real worker:
//! rollback → the task never runs; commit → it runs; before the commit no worker sees it.
//! Needs the server at 127.0.0.1:5432 (skips with a notice otherwise).

use std::time::Duration;

use celeriac::postgres::sqlx;
use celeriac::{App, ErrorKind, Signature};

#[celeriac::task(name = "txn.double")]
async fn double(x: i64) -> i64 {
    x * 2
}

const ADDR: &str = "127.0.0.1:5432";

fn url(schema: &str) -> String {
    format!("postgres://postgres@{ADDR}/test?schema={schema}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sent_in_a_transaction_exists_only_if_it_commits() {
    if !celeriac_test::services::require_service("postgres", ADDR) {
        return;
    }
    let schema = format!(
        "t_txn_{}",
        &celeriac::core::protocol::new_id().replace('-', "")[20..]
    );
    let app = App::builder()
        .broker_url(url(&schema))
        .result_backend(url(&schema))
        .task::<double>()
        .build()
        .await
        .expect("app on postgres");
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@{ADDR}/test"))
        .await
        .expect("pool");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".orders (id int PRIMARY KEY)"
    )))
    .execute(&pool)
    .await
    .expect("business table");

    let worker = app.worker(app.worker_options());
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    // Rolled back: neither the order nor the task exists, and the task never runs.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".orders (id) VALUES (1)"
    )))
    .execute(&mut *tx)
    .await
    .expect("insert");
    let lost = celeriac::postgres::send_in(&mut tx, &app, &double::s(1))
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
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".orders (id) VALUES (2)"
    )))
    .execute(&mut *tx)
    .await
    .expect("insert");
    let sig = Signature::<i64>::new("txn.double").arg(21);
    let kept = celeriac::postgres::send_in(&mut tx, &app, &sig)
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

    // The message is built as apply_async builds it: same queue, task and arguments.
    let prepared = app.prepare_send(&double::s(5)).unwrap();
    assert_eq!(prepared.queue, "celery");
    assert_eq!(prepared.message.task(), "txn.double");

    stop.warm();
    running.await.unwrap().unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .expect("drop schema");
}

/// `send_in` refuses an app whose broker is not PostgreSQL, with a clear error.
#[tokio::test]
async fn send_in_needs_a_postgres_broker() {
    if !celeriac_test::services::require_service("postgres", ADDR) {
        return;
    }
    let app = App::builder()
        .broker_url("memory://")
        .result_backend("memory://")
        .build()
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@{ADDR}/test"))
        .await
        .expect("pool");
    let mut conn = pool.acquire().await.unwrap();
    let e = celeriac::postgres::send_in(&mut conn, &app, &double::s(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("postgres"), "{e}");
}
