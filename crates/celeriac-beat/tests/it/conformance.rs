//! The store contract, run on every store: memory, SQLite, and the real Redis.

use std::time::Duration;

use celeriac_beat::{
    BeatStore, DynStore, EntrySpec, EntryState, MemoryStore, RedisStore, SqliteStore, open_store,
};
use chrono::{DateTime, Utc};

pub(crate) const REDIS_ADDR: &str = "127.0.0.1:6379";

/// A Redis URL whose keys live under a prefix of their own, or `None` (skipped) without Redis.
pub(crate) fn redis_url(test: &str) -> Option<String> {
    if !celeriac_test::services::require_service("redis", REDIS_ADDR) {
        return None;
    }
    let prefix = celeriac_test::services::unique_queue(test);
    Some(format!(
        "redis://{REDIS_ADDR}/0?global_keyprefix={prefix}%3A"
    ))
}

fn t(s: &str) -> DateTime<Utc> {
    celeriac_core::time::parse(s).unwrap()
}

/// Every rule a store must keep; `store` must be empty.
async fn conformance(store: &dyn BeatStore) {
    let ttl = Duration::from_secs(10);
    let now = t("2026-01-01T00:00:00Z");

    // Terms: the first holder gets token 1; others are refused while it is current.
    let a = store.acquire("a", now, ttl).await.unwrap().unwrap();
    assert_eq!((a.holder.as_str(), a.token), ("a", 1));
    assert_eq!(a.expires_at, now + chrono::Duration::seconds(10));
    assert!(store.acquire("b", now, ttl).await.unwrap().is_none());
    // Renewal keeps the token and moves the expiry.
    let a2 = store
        .acquire("a", t("2026-01-01T00:00:05Z"), ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a2.token, 1);
    assert_eq!(a2.expires_at, t("2026-01-01T00:00:15Z"));
    assert!(
        store
            .acquire("b", t("2026-01-01T00:00:14Z"), ttl)
            .await
            .unwrap()
            .is_none(),
        "renewed lease still current"
    );

    // The leader's writes, read back.
    let mut st = EntryState::new(now);
    st.total_run_count = 4;
    st.last_run_at = Some(t("2026-01-01T00:00:04Z"));
    assert!(store.save(&a2, now, "e", &st).await.unwrap());
    let rows = store.load().await.unwrap();
    assert_eq!(rows["e"].state.as_ref(), Some(&st));
    assert!(rows["e"].spec.is_none() && !rows["e"].paused && rows["e"].triggers == 0);

    // Lapsed: b takes a new term with a larger token; the stale leader is refused.
    let later = t("2026-01-01T00:00:16Z");
    let b = store.acquire("b", later, ttl).await.unwrap().unwrap();
    assert_eq!(b.token, 2);
    let mut stale = st.clone();
    stale.total_run_count = 99;
    assert!(!store.save(&a2, later, "e", &stale).await.unwrap());
    assert_eq!(store.load().await.unwrap()["e"].state.as_ref(), Some(&st));
    // An old lease cannot be released by its old holder either.
    store.release(&a2).await.unwrap();
    assert!(store.acquire("a", later, ttl).await.unwrap().is_none());
    assert!(store.save(&b, later, "e", &st).await.unwrap());
    // Even the right token is refused once its expiry has passed.
    assert!(
        !store
            .save(&b, t("2026-01-01T00:01:00Z"), "e", &st)
            .await
            .unwrap()
    );
    // Released: the next holder gets a new term at once.
    store.release(&b).await.unwrap();
    let a3 = store.acquire("a", later, ttl).await.unwrap().unwrap();
    assert_eq!(a3.token, 3);
    assert!(!store.save(&b, later, "e", &st).await.unwrap());

    // Run-time entries and controls.
    let mut spec = EntrySpec::new("tasks.added");
    spec.every = Some(5.0);
    spec.queue = Some("q".into());
    store.put_entry("added", &spec).await.unwrap();
    assert!(store.save(&a3, later, "added", &st).await.unwrap());
    store.set_paused("added", true).await.unwrap();
    store.trigger("added").await.unwrap();
    store.trigger("added").await.unwrap();
    store.set_paused("e", true).await.unwrap();
    store.set_paused("e", false).await.unwrap();
    let rows = store.load().await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let added = &rows["added"];
    assert_eq!(added.spec.as_ref(), Some(&spec));
    assert!(added.paused);
    assert_eq!(added.triggers, 2);
    assert_eq!(added.state.as_ref(), Some(&st));
    assert!(!rows["e"].paused);
    // Replacing an entry starts its state afresh, keeps its controls.
    spec.every = Some(7.0);
    store.put_entry("added", &spec).await.unwrap();
    let rows = store.load().await.unwrap();
    assert_eq!(rows["added"].spec.as_ref().unwrap().every, Some(7.0));
    assert!(rows["added"].state.is_none());
    // Only run-time entries can be removed; removing takes everything about them.
    assert!(!store.remove_entry("e").await.unwrap());
    assert!(store.remove_entry("added").await.unwrap());
    assert!(!store.remove_entry("added").await.unwrap());
    let rows = store.load().await.unwrap();
    assert_eq!(rows.keys().collect::<Vec<_>>(), vec!["e"]);
}

#[test]
fn stores_and_events_are_send_and_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<MemoryStore>();
    is::<SqliteStore>();
    is::<RedisStore>();
    is::<celeriac_beat::BeatEvent>();
    is::<tokio::sync::broadcast::Receiver<celeriac_beat::BeatEvent>>();
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    conformance(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    let path = celeriac_test::services::temp_sqlite_path("beat-conformance");
    conformance(&SqliteStore::open(&path).await.unwrap()).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let Some(url) = redis_url("beat-conf") else {
        return;
    };
    let store = RedisStore::open(&url).await.unwrap();
    assert!(
        store.lease_key().starts_with("beat-conf-")
            && store.lease_key().ends_with(":celeriac.beat.lease"),
        "{}",
        store.lease_key()
    );
    conformance(&store).await;
    // Another prefix is another store.
    let other = RedisStore::open(&redis_url("beat-conf").unwrap())
        .await
        .unwrap();
    assert!(other.load().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_broker_url_chooses_the_store() {
    let path = celeriac_test::services::temp_sqlite_path("beat-open");
    let s: DynStore = open_store(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(format!("{s:?}").contains("SqliteStore"));
    let e = open_store("amqp://guest:guest@127.0.0.1:5672//")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no beat store for amqp://") && e.contains("redis"),
        "{e}"
    );
    assert!(!e.contains("guest:guest"), "{e}");
    // Bad Redis URLs: a clear error, the password never shown.
    let e = open_store("redis://:s3cret@127.0.0.1:6379/notadb")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("database must be a number") && !e.contains("s3cret"),
        "{e}"
    );
    // Nothing listens on port 1: a connection error, redacted.
    let e = open_store("redis://:s3cret@127.0.0.1:1/0")
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("s3cret"),
        "{text}"
    );
    if let Some(url) = redis_url("beat-open") {
        let s = open_store(&url).await.unwrap();
        assert!(format!("{s:?}").contains("RedisStore"), "{s:?}");
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}

#[tokio::test]
async fn a_dead_leaders_redis_lease_expires_on_the_server() {
    let Some(url) = redis_url("beat-px") else {
        return;
    };
    let store = RedisStore::open(&url).await.unwrap();
    let now = Utc::now();
    let ttl = Duration::from_millis(300);
    let a = store.acquire("a", now, ttl).await.unwrap().unwrap();
    // By the callers' clock (frozen at `now`) a's lease is current for ever; only Redis's
    // `PX` can end it. Wait (generously) for the server to drop the key.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let b = loop {
        if let Some(b) = store.acquire("b", now, ttl * 100).await.unwrap() {
            break b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired in redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(b.token, a.token + 1);
    // a comes back: refused, and cannot write.
    assert!(store.acquire("a", now, ttl).await.unwrap().is_none());
    assert!(
        !store
            .save(&a, now, "e", &EntryState::new(now))
            .await
            .unwrap()
    );
    assert!(
        store
            .save(&b, now, "e", &EntryState::new(now))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_corrupt_redis_record_is_a_clear_error_that_changes_nothing() {
    let Some(url) = redis_url("beat-corrupt") else {
        return;
    };
    let store = RedisStore::open(&url).await.unwrap();
    let conn = celeriac_redis::RedisConnection::open(&url, Default::default())
        .await
        .unwrap();
    let key = store.lease_key().replace(".lease", ".state");
    conn.run_once("corrupt", |mut c| async move {
        celeriac_redis::redis::cmd("HSET")
            .arg(&key)
            .arg("broken")
            .arg("{not json")
            .query_async::<()>(&mut c)
            .await
    })
    .await
    .unwrap();
    let e = store.load().await.unwrap_err().to_string();
    assert!(
        e.contains("\"broken\"") && e.contains("state") && e.contains("not valid JSON"),
        "{e}"
    );
    // The record is left as it was, for a person to look at.
    let key = store.lease_key().replace(".lease", ".state");
    let kept: Option<String> = conn
        .run_once("read", |mut c| async move {
            celeriac_redis::redis::cmd("HGET")
                .arg(&key)
                .arg("broken")
                .query_async(&mut c)
                .await
        })
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("{not json"));
}
