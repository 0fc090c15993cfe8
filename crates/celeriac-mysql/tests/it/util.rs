//! Helpers: the test database, URLs and drivers.

use std::sync::Arc;

use celeriac_core::{Config, DynBackend, DynBroker};
use celeriac_mysql::{MysqlBackend, MysqlBroker, MysqlOptions};
use sqlx::Connection as _;

/// Where the shared server is.
pub(crate) const ADDR: &str = "127.0.0.1:3306";
/// The database every test uses.
pub(crate) const DB: &str = "celeriac_it";

/// The URL of the test database, or `None` (after a `SKIPPED:` notice) without a server.
pub(crate) async fn url() -> Option<String> {
    if !celeriac_test::services::require_service("mariadb", ADDR) {
        return None;
    }
    create_database(DB).await;
    Some(format!("mysql://root@{ADDR}/{DB}"))
}

/// Creates `name` as root unless it exists.
pub(crate) async fn create_database(name: &str) {
    let mut conn = sqlx::mysql::MySqlConnection::connect(&format!("mysql://root@{ADDR}/"))
        .await
        .expect("connect as root");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS {name}"
    )))
    .execute(&mut conn)
    .await
    .expect("create database");
}

/// A broker on the test database.
pub(crate) async fn broker() -> Option<MysqlBroker> {
    let url = url().await?;
    Some(
        MysqlBroker::connect(&url, &Config::default())
            .await
            .expect("open mysql broker"),
    )
}

/// A broker on the test database with `options` changed by `f`.
#[allow(dead_code)]
pub(crate) async fn broker_with(
    f: impl FnOnce(MysqlOptions) -> MysqlOptions,
) -> Option<MysqlBroker> {
    let url = url().await?;
    let options = f(MysqlOptions::from_url(&url, &Config::default()).expect("url"));
    Some(MysqlBroker::open(options).await.expect("open mysql broker"))
}

pub(crate) async fn dyn_broker() -> Option<DynBroker> {
    Some(Arc::new(broker().await?))
}

pub(crate) async fn dyn_backend() -> Option<DynBackend> {
    let url = url().await?;
    Some(Arc::new(
        MysqlBackend::connect(&url, &Config::default())
            .await
            .expect("open mysql backend"),
    ))
}

/// A task message with a fresh id.
pub(crate) fn msg() -> celeriac_core::Message {
    celeriac_test::services::test_message("tests.add")
}
