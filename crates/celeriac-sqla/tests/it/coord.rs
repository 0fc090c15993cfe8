//! Coordination beside Celery's tables: the tables of celeriac's own appear on first use in
//! the task table's schema, once, however many backends ask at the same moment; keys longer
//! than an index allows work.

use std::time::Duration;

use celeriac_core::coord::Coordination as _;
use celeriac_core::protocol::new_id;
use celeriac_sqla::{COORD_KEYS_TABLE, COORD_SLOTS_TABLE, SqlaBackend};

use crate::rows::exec;
use crate::util::{Server, config};

async fn first_use_in_a_fresh_schema(server: Server) {
    if !server.ready().await {
        return;
    }
    let schema = format!("coord_{}", &new_id().replace('-', "")[20..]);
    exec(
        server,
        match server {
            Server::Postgres => format!("CREATE SCHEMA {schema}"),
            Server::Maria => format!("CREATE DATABASE {schema}"),
        },
    )
    .await;
    let url = format!(
        "{}?task_schema={schema}&group_schema={schema}",
        server.db_url()
    );
    // Eight backends, as eight worker processes would have, each asking three times at once.
    let mut backends = Vec::new();
    for _ in 0..8 {
        backends.push(SqlaBackend::connect(&url, &config()).await.unwrap());
    }
    let key = format!("unique:tests.long:{}", "x".repeat(5000));
    let long = Duration::from_secs(30);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (b, key) = (backends[i % 8].clone(), key.clone());
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
    for b in &backends {
        celeriac_core::ResultBackend::close(b).await.unwrap();
    }
    // The tables are in the schema of the task table; then the schema goes.
    for table in [COORD_KEYS_TABLE, COORD_SLOTS_TABLE] {
        exec(
            server,
            format!("SELECT 1 FROM {schema}.{table} WHERE 1 = 0"),
        )
        .await;
    }
    exec(
        server,
        match server {
            Server::Postgres => format!("DROP SCHEMA {schema} CASCADE"),
            Server::Maria => format!("DROP DATABASE {schema}"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordination_tables_appear_once_in_the_task_schema_on_postgres() {
    first_use_in_a_fresh_schema(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordination_tables_appear_once_in_the_task_schema_on_mariadb() {
    first_use_in_a_fresh_schema(Server::Maria).await;
}
