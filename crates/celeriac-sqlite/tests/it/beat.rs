//! The beat store: the conformance suite on a fresh file per case, opening from URLs, files
//! written before the store moved into this crate, corrupt rows, and one connection thread per
//! file shared with the broker and the backend.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState};
use celeriac_core::{Broker, DynBeatStore, ErrorKind, PublishOptions, ResultBackend, TaskMeta};
use celeriac_sqlite::{SqliteBackend, SqliteBeatStore, SqliteBroker, SqliteOptions};

use crate::util::{db, msg};

async fn beat_store() -> Option<DynBeatStore> {
    let store = SqliteBeatStore::open(db("beat_conformance"), SqliteOptions::default())
        .await
        .expect("open sqlite beat store");
    Some(Arc::new(store))
}

celeriac_test::beat_store_conformance!(beat_store);

#[test]
fn the_store_is_send_and_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<SqliteBeatStore>();
}

#[tokio::test]
async fn opens_from_urls_through_the_driver_table() {
    let mut drivers = celeriac_core::Drivers::new();
    celeriac_sqlite::register(&mut drivers);
    let config = celeriac_core::Config::default();
    let url = format!("sqlite://{}", db("beat_url").display());
    let store = drivers.open_beat_store(&url, &config).await.unwrap();
    assert!(
        format!("{store:?}").contains("SqliteBeatStore"),
        "{store:?}"
    );
    assert!(store.load().await.unwrap().is_empty());
    // Beat instances meet in a file: a private in-memory database is refused.
    for (bad, says) in [
        ("sqlite://:memory:", "names no file"),
        ("sqlite://", "names no file"),
        ("sqlite://x.db?mode=ro", "takes no query"),
    ] {
        let e = drivers.open_beat_store(bad, &config).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        assert!(e.to_string().contains(says), "{bad}: {e}");
    }
    let e = drivers
        .open_beat_store("redis://localhost", &config)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("(known: memory, sqlite)"), "{e}");
    let missing = db("beat_missing_dir").join("x.db");
    let e = SqliteBeatStore::open(&missing, SqliteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
}

/// A file whose beat tables were written before the store moved into this crate (same tables,
/// same JSON) reads the same, and keeps its lease.
#[tokio::test]
async fn reads_the_tables_beat_wrote_before() {
    let path = db("beat_before");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let far = chrono::Utc::now() + chrono::Duration::hours(1);
    conn.execute_batch(&format!(
        "CREATE TABLE celeriac_beat_lease (
             id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL,
             token INTEGER NOT NULL, expires_at INTEGER NOT NULL);
         CREATE TABLE celeriac_beat_entries (
             name TEXT PRIMARY KEY, spec TEXT, paused INTEGER NOT NULL DEFAULT 0,
             triggers INTEGER NOT NULL DEFAULT 0, state TEXT) WITHOUT ROWID;
         INSERT INTO celeriac_beat_lease VALUES (1, 'old', 7, {});
         INSERT INTO celeriac_beat_entries VALUES
             ('added', '{{\"task\":\"tasks.a\",\"every\":5.0,\"queue\":\"q\"}}', 1, 2,
              '{{\"last_run_at\":\"2026-01-01T00:00:05Z\",\"since\":\"2026-01-01T00:00:00Z\",\
\"total_run_count\":3,\"triggers_done\":2,\"pending\":null}}');",
        far.timestamp_millis()
    ))
    .unwrap();
    drop(conn);
    let store = SqliteBeatStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let rows = store.load().await.unwrap();
    let row = &rows["added"];
    assert_eq!(
        row.spec.as_ref().unwrap(),
        &serde_json::json!({"task": "tasks.a", "every": 5.0, "queue": "q"})
    );
    assert!(row.paused && row.triggers == 2);
    let state = row.state.as_ref().unwrap();
    assert_eq!(state.total_run_count, 3);
    // The old holder's lease is still current: another instance waits, the next term is 8.
    let now = chrono::Utc::now();
    let ttl = Duration::from_secs(10);
    assert!(store.acquire("new", now, ttl).await.unwrap().is_none());
    let lease = store
        .acquire("new", far + chrono::Duration::seconds(1), ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.token, 8);
}

#[tokio::test]
async fn a_corrupt_row_is_a_clear_error_that_changes_nothing() {
    let path = db("beat_corrupt");
    let store = SqliteBeatStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let lease = store
        .acquire("a", now, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .save(&lease, now, "fine", &EntryState::new(now))
            .await
            .unwrap()
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO celeriac_beat_entries (name, state) VALUES ('broken', '{not json')",
        [],
    )
    .unwrap();
    let e = store.load().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    let text = e.to_string();
    assert!(
        text.contains("\"broken\"") && text.contains("state") && text.contains("not valid JSON"),
        "{text}"
    );
    let kept: String = conn
        .query_row(
            "SELECT state FROM celeriac_beat_entries WHERE name = 'broken'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, "{not json");
}

/// A broker, a result backend and a beat store of one process on one file use the same
/// connection thread, and see each other's writes at once.
#[tokio::test]
async fn broker_backend_and_beat_store_share_one_file() {
    let path = db("beat_shared");
    let broker = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let store = SqliteBeatStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let backend = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    broker
        .publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    store.trigger("e").await.unwrap();
    backend
        .store(&TaskMeta::success("t1", 1.into()))
        .await
        .unwrap();
    assert_eq!(broker.stats("q").await.unwrap().ready, 1);
    assert_eq!(store.load().await.unwrap()["e"].triggers, 1);
    assert!(backend.get("t1").await.unwrap().is_some());
}

/// One connection thread per file and process, counted in `/proc` (Linux).
#[cfg(target_os = "linux")]
mod threads {
    use std::process::{Command, Stdio};

    use celeriac_sqlite::{SqliteBackend, SqliteBeatStore, SqliteBroker, SqliteOptions};

    use crate::util::db;

    const THREADS_DB: &str = "CELERIAC_SQLITE_IT_THREADS_DB";
    const THREADS_OTHER: &str = "CELERIAC_SQLITE_IT_THREADS_OTHER";

    #[expect(
        clippy::disallowed_methods,
        reason = "a test process's role, not configuration"
    )]
    fn env(name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    /// This process's threads. Not only those named `celeriac-sqlite`: a new thread names
    /// itself once it runs, so a count by name may miss the file watcher started a moment ago.
    /// The child runs one test on a current-thread runtime, so only the drivers add threads.
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    /// This process's open descriptors of the file at `path`: one per SQLite connection to it.
    fn handles_of(path: &str) -> usize {
        let path = std::fs::canonicalize(path).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| *target == path)
            .count()
    }

    /// The child side of [`one_file_one_connection_thread`]: opens the drivers one by one and
    /// prints the number of threads after each step, then the number of
    /// connections to the file.
    #[tokio::test]
    #[ignore = "run by one_file_one_connection_thread in a child process"]
    async fn threads_helper() {
        let (Some(path), Some(other)) = (env(THREADS_DB), env(THREADS_OTHER)) else {
            return;
        };
        // libtest has printed "test beat::threads::threads_helper ... " without a newline.
        println!();
        let o = SqliteOptions::default;
        let before = threads();
        let broker = SqliteBroker::open(&path, o()).await.unwrap();
        let with_broker = threads();
        let store = SqliteBeatStore::open(&path, o()).await.unwrap();
        let with_store = threads();
        let backend = SqliteBackend::open(&path, o()).await.unwrap();
        let mut drivers = celeriac_core::Drivers::new();
        celeriac_sqlite::register(&mut drivers);
        let by_url = drivers
            .open_beat_store(
                &format!("sqlite://{path}"),
                &celeriac_core::Config::default(),
            )
            .await
            .unwrap();
        let with_all = threads();
        let elsewhere = SqliteBeatStore::open(&other, o()).await.unwrap();
        let with_other = threads();
        println!("THREADS {before} {with_broker} {with_store} {with_all} {with_other}");
        println!("CONNECTIONS {}", handles_of(&path));
        drop((broker, store, backend, by_url, elsewhere));
    }

    /// One file, one connection thread per process: a beat store opened on the broker's file (by
    /// path, or by URL through the driver table) starts no thread and opens no connection, as
    /// the backend starts none; a store on another file does. Counted in a child process, whose
    /// threads and descriptors are its own.
    #[test]
    fn one_file_one_connection_thread() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "beat::threads::threads_helper",
                "--nocapture",
                "--include-ignored",
            ])
            .args(["--test-threads", "1"])
            .env(THREADS_DB, db("beat_threads"))
            .env(THREADS_OTHER, db("beat_threads_other"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "helper failed: {:?}", out.status);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let counts: Vec<usize> = stdout
            .lines()
            .find_map(|l| l.strip_prefix("THREADS "))
            .unwrap_or_else(|| panic!("no counts in {stdout:?}"))
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        let [before, with_broker, with_store, with_all, with_other] = counts[..] else {
            panic!("{counts:?}");
        };
        let per_file = with_broker - before;
        assert!(per_file >= 1, "the broker started no thread: {counts:?}");
        assert_eq!(with_store, with_broker, "the beat store started a thread");
        assert_eq!(with_all, with_broker, "the backend or the url store did");
        assert_eq!(with_other - with_all, per_file, "another file: {counts:?}");
        let connections = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CONNECTIONS "))
            .unwrap_or_else(|| panic!("no connection count in {stdout:?}"));
        assert_eq!(connections, "1", "connections to the shared file");
    }
}
