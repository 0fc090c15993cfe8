//! Clear errors for bad input: missing directory, not a database, locked, closed, bad URL.

use std::error::Error as _;
use std::time::Duration;

use celeriac_core::{Broker, ErrorKind, PublishOptions, ResultBackend, TaskMeta};
use celeriac_sqlite::{SqliteBackend, SqliteBroker, SqliteOptions};

use crate::util::{db, msg};

#[tokio::test]
async fn a_missing_directory_is_named() {
    let path = db("missing_dir").with_file_name("no-such-dir").join("x.db");
    let e = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(!e.is_transient());
    assert!(e.to_string().contains("x.db"), "{e}");
    let cause = e.source().expect("a cause").to_string();
    assert!(
        cause.contains("no-such-dir") && cause.contains("does not exist"),
        "{cause}"
    );
    let e = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
}

#[tokio::test]
async fn a_file_that_is_not_a_database() {
    let path = db("not_a_db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let e = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(e.to_string().contains("is not a sqlite database"), "{e}");
    assert!(e.source().is_some());
}

#[tokio::test]
async fn a_database_locked_beyond_busy_timeout_is_a_transient_error() {
    let path = db("locked");
    let options = SqliteOptions::default().busy_timeout(Duration::from_millis(100));
    let b = SqliteBroker::open(&path, options.clone()).await.unwrap();
    let r = SqliteBackend::open(&path, options).await.unwrap();
    // Another "process" holds the write lock.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let e = b
        .publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(e.is_transient(), "{e:?}");
    let cause = e.source().expect("a cause").to_string();
    assert!(cause.contains("locked"), "{cause}");
    let e = r
        .store(&TaskMeta::success("t", 1.into()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(e.is_transient());
    // Reads still work under WAL, and writes again once the lock is gone.
    assert_eq!(b.stats("q").await.unwrap().total(), 0);
    other.execute_batch("ROLLBACK").unwrap();
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lock_released_within_busy_timeout_is_waited_for() {
    let path = db("briefly-locked");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The publish starts while the lock is held and goes through once it is released: the
    // busy handler keeps retrying (quickly at first, then in millisecond steps).
    let publish = tokio::spawn(async move {
        b.publish("q", &msg(), PublishOptions::default()).await?;
        b.stats("q").await
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(!publish.is_finished(), "the publish waits for the lock");
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(publish.await.unwrap().unwrap().total(), 1);
}

/// A fetch that fails says why, with `{:#}` (as the worker logs it): here a table dropped
/// behind the broker's back; a corrupt file or a full disk read the same way.
// See: issue 23 (D)
#[tokio::test]
async fn a_fetch_error_names_its_cause() {
    let path = db("fetch_cause");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let mut c = b
        .consume(&["q".to_owned()], celeriac_core::ConsumeOptions::new(1))
        .await
        .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("DROP TABLE celeriac_messages").unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert_eq!(e.to_string(), "cannot fetch from sqlite queue");
    // SQLite's message, then rusqlite's code: `…: Error code 1: SQL logic error`.
    let chain = format!("{e:#}");
    assert!(
        chain.starts_with("cannot fetch from sqlite queue: no such table: celeriac_messages"),
        "{chain}"
    );
}

#[tokio::test]
async fn a_closed_broker_says_so() {
    let b = SqliteBroker::open(db("closed"), SqliteOptions::default())
        .await
        .unwrap();
    b.close().await.unwrap();
    let e = b.declare("q").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert_eq!(e.to_string(), "sqlite broker is closed");
    let e = b
        .consume(&["q".to_owned()], celeriac_core::ConsumeOptions::new(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    let config = celeriac_core::Config::default();
    for url in ["sqlite://", "sqlite://x.db?mode=ro"] {
        let e = SqliteBroker::connect(url, &config).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{url}");
    }
}
