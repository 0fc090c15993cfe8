//! The rows themselves: Celery ≤ 5.6 pickles refused, older table shapes, custom table names,
//! expiry, and chords counted in celeriac's own table.

use std::time::Duration;

use celeriac_core::protocol::new_id;
use celeriac_core::{ResultBackend, TaskMeta};
use celeriac_sqla::{SqlaBackend, SqlaBackendOptions};
use serde_json::json;

use crate::util::{Server, backend, config};

/// Runs one statement on the test database.
pub(crate) async fn exec(server: Server, statement: String) {
    use sqlx::Connection as _;
    let url = match server {
        Server::Postgres => format!("postgres://{}", server.location()),
        Server::Maria => format!("mysql://{}", server.location()),
    };
    match server {
        Server::Postgres => {
            let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut c)
                .await
                .expect("statement");
        }
        Server::Maria => {
            let mut c = sqlx::MySqlConnection::connect(&url).await.expect("connect");
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut c)
                .await
                .expect("statement");
        }
    }
}

fn unique_table(prefix: &str) -> String {
    format!("{prefix}_{}", &new_id().replace('-', "")[..12])
}

async fn pickled_rows_are_refused(server: Server) {
    let Some(b) = backend(server).await else {
        return;
    };
    let id = new_id();
    // What Celery 5.6's PickleType wrote for the result 4: pickle protocol 4 of the int.
    let row = match server {
        Server::Postgres => format!(
            "INSERT INTO celery_taskmeta (id, task_id, status, result) VALUES \
             (nextval('task_id_sequence'), '{id}', 'SUCCESS', '\\x8004944b042e'::bytea)"
        ),
        Server::Maria => format!(
            "INSERT INTO celery_taskmeta (id, task_id, status, result) VALUES \
             (NEXTVAL(task_id_sequence), '{id}', 'SUCCESS', x'8004944b042e')"
        ),
    };
    exec(server, row).await;
    let e = b.get(&id).await.expect_err("a pickled row is an error");
    let text = e.to_string();
    assert!(
        text.contains("pickle") && text.contains("never unpickles"),
        "{text}"
    );
    // Forgetting it works, and then the id is free again.
    b.forget(&id).await.unwrap();
    assert_eq!(b.get(&id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickled_rows_are_refused_on_postgres() {
    pickled_rows_are_refused(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickled_rows_are_refused_on_mariadb() {
    pickled_rows_are_refused(Server::Maria).await;
}

/// A table as Celery 5.6 made it (no `children`, no `stamps`), under a custom name: used as it
/// is when creating is off, completed with the missing columns when on (as Celery 5.7 does).
async fn older_tables_work(server: Server) {
    if !server.ready().await {
        return;
    }
    let task = unique_table("old_taskmeta");
    let group = unique_table("old_tasksetmeta");
    let (blob, time) = match server {
        Server::Postgres => ("BYTEA", "TIMESTAMP WITHOUT TIME ZONE"),
        Server::Maria => ("BLOB", "DATETIME"),
    };
    let serial = match server {
        Server::Postgres => "SERIAL",
        Server::Maria => "INTEGER AUTO_INCREMENT",
    };
    exec(
        server,
        format!(
            "CREATE TABLE {task} (id {serial} PRIMARY KEY, task_id VARCHAR(155) UNIQUE, \
             status VARCHAR(50), result {blob}, date_done {time}, traceback TEXT, \
             name VARCHAR(155), args {blob}, kwargs {blob}, worker VARCHAR(155), \
             retries INTEGER, queue VARCHAR(155))"
        ),
    )
    .await;
    exec(
        server,
        format!(
            "CREATE TABLE {group} (id {serial} PRIMARY KEY, taskset_id VARCHAR(155) UNIQUE, \
             result {blob}, date_done {time})"
        ),
    )
    .await;
    let options = SqlaBackendOptions::default()
        .tables(task.clone(), group.clone())
        .create_tables(false);
    let b = SqlaBackend::open(&server.db_url(), &config(), options.clone())
        .await
        .expect("open on the old tables");
    let mut meta = TaskMeta::success(new_id(), json!([1, "two"]));
    meta.name = Some("tasks.old".into());
    meta.children = vec![json!([[new_id(), null], null])];
    assert!(b.store(&meta).await.unwrap());
    let got = b.get(&meta.task_id).await.unwrap().expect("stored");
    assert_eq!(got.result, json!([1, "two"]));
    assert_eq!(got.name.as_deref(), Some("tasks.old"));
    assert!(got.children.is_empty(), "no children column: none kept");
    b.save_group("g-old", &[meta.task_id.clone()])
        .await
        .unwrap();
    assert_eq!(
        b.restore_group("g-old").await.unwrap(),
        Some(vec![meta.task_id.clone()])
    );

    // Creating on: the columns Celery 5.7 added are added.
    let b = SqlaBackend::open(&server.db_url(), &config(), options.create_tables(true))
        .await
        .expect("open again, creating");
    let mut meta = TaskMeta::success(new_id(), json!(7));
    meta.children = vec![json!([[new_id(), null], null])];
    assert!(b.store(&meta).await.unwrap());
    assert_eq!(
        b.get(&meta.task_id).await.unwrap().unwrap().children,
        meta.children
    );
    for t in [task, group] {
        exec(server, format!("DROP TABLE {t}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_tables_work_on_postgres() {
    older_tables_work(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_tables_work_on_mariadb() {
    older_tables_work(Server::Maria).await;
}

/// `cleanup` deletes what is older than `result_expires`, as `celery.backend_cleanup`.
async fn cleanup_deletes_old_rows(server: Server) {
    if !server.ready().await {
        return;
    }
    let b = SqlaBackend::open(
        &server.db_url(),
        &config(),
        SqlaBackendOptions::default().result_expires(Some(Duration::from_secs(3600))),
    )
    .await
    .unwrap();
    let mut old = TaskMeta::success(new_id(), json!(1));
    old.date_done = Some(chrono::Utc::now() - chrono::Duration::hours(2));
    let fresh = TaskMeta::success(new_id(), json!(2));
    assert!(b.store(&old).await.unwrap());
    assert!(b.store(&fresh).await.unwrap());
    // The first store also starts a sweep in the background, which may get there first.
    b.cleanup().await.unwrap();
    assert_eq!(b.get(&old.task_id).await.unwrap(), None, "expired");
    assert!(b.get(&fresh.task_id).await.unwrap().is_some(), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_old_rows_on_postgres() {
    cleanup_deletes_old_rows(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_old_rows_on_mariadb() {
    cleanup_deletes_old_rows(Server::Maria).await;
}

/// Our chords on the `db+` backend: counted with `incr` in `celeriac_sqla_counters`.
async fn our_chords_complete(server: Server) {
    if !server.ready().await {
        return;
    }
    let app = crate::interop::our_app(server).await;
    let queue = celeriac_test::services::unique_queue("sqla-chord");
    let mut options = app.worker_options();
    options.queues = vec![queue.clone()];
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    use celeriac::canvas::{chord, group};
    let c = chord(
        group((1..=6).map(|i| crate::interop::tasks::add::s(i, i).queue(&queue))),
        celeriac::Signature::<i64>::new("tasks.tsum").queue(&queue),
    )
    .apply_async(&app)
    .await
    .expect("send the chord");
    let got = c
        .get_timeout(Duration::from_secs(30))
        .await
        .expect("chord body");
    assert_eq!(got, 42);
    let members = c.header().join(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(members.len(), 6);
    stop.warm();
    let _ = tokio::time::timeout(Duration::from_secs(20), running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chords_complete_on_postgres() {
    our_chords_complete(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chords_complete_on_mariadb() {
    our_chords_complete(Server::Maria).await;
}

/// A missing database is named as such, and the password never shows.
async fn missing_database_is_clear(server: Server) {
    if !server.ready().await {
        return;
    }
    let url = match server {
        Server::Postgres => "db+postgresql://postgres:s3cret@127.0.0.1:5432/celeriac_no_such_db",
        Server::Maria => "db+mysql://root:@127.0.0.1:3306/celeriac_no_such_db",
    };
    let e = SqlaBackend::connect(url, &config())
        .await
        .expect_err("no such database");
    let text = format!("{e} {e:?}");
    assert!(text.contains("the database does not exist"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_database_is_clear_on_postgres() {
    missing_database_is_clear(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_database_is_clear_on_mariadb() {
    missing_database_is_clear(Server::Maria).await;
}
