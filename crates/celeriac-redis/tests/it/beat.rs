//! The beat store: the conformance suite under a fresh key prefix per case, the keys it
//! writes, the lease's expiry on the server, corrupt records and URLs.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState};
use celeriac_core::{DynBeatStore, ErrorKind};
use celeriac_redis::{RedisBeatStore, RedisOptions};
use chrono::Utc;

use crate::util::{self, URL};

async fn store_with(prefix: &str) -> RedisBeatStore {
    RedisBeatStore::connect_with(URL, RedisOptions::default().global_keyprefix(prefix))
        .await
        .expect("connect redis beat store")
}

async fn beat_store() -> Option<DynBeatStore> {
    if !util::redis_up() {
        return None;
    }
    Some(Arc::new(store_with(&util::prefix()).await))
}

celeriac_test::beat_store_conformance!(beat_store);

#[test]
fn the_store_is_send_and_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<RedisBeatStore>();
}

/// Keys live under the URL's `global_keyprefix` (percent-decoded, prepended verbatim), so
/// another prefix is another store.
#[tokio::test]
async fn keys_follow_the_urls_prefix() {
    if !util::redis_up() {
        return;
    }
    let prefix = util::prefix();
    let url = format!("{URL}?global_keyprefix={}", prefix.replace(':', "%3A"));
    let store = RedisBeatStore::connect(&url, &celeriac_core::Config::default())
        .await
        .unwrap();
    assert_eq!(store.lease_key(), format!("{prefix}celeriac.beat.lease"));
    store.trigger("e").await.unwrap();
    let mut raw = util::raw().await;
    let n: i64 = redis::cmd("HGET")
        .arg(format!("{prefix}celeriac.beat.triggers"))
        .arg("e")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let other = store_with(&util::prefix()).await;
    assert!(other.load().await.unwrap().is_empty());
}

#[tokio::test]
async fn opens_from_urls_through_the_driver_table() {
    let mut drivers = celeriac_core::Drivers::new();
    celeriac_redis::register(&mut drivers);
    let config = celeriac_core::Config::default();
    // Bad URLs: a clear error, the password never shown.
    let e = drivers
        .open_beat_store("redis://:s3cret@127.0.0.1:6379/notadb", &config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("database must be a number") && !e.contains("s3cret"),
        "{e}"
    );
    // Nothing listens on port 1: a transient connection error, redacted.
    let e = drivers
        .open_beat_store("redis://:s3cret@127.0.0.1:1/0", &config)
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(
        e.kind() == ErrorKind::Backend
            && e.is_transient()
            && text.contains("127.0.0.1:1")
            && !text.contains("s3cret"),
        "{text}"
    );
    let e = drivers
        .open_beat_store("sqlite://x.db", &config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("(known: memory, redis, rediss, unix, redis+socket, sentinel, socket)"),
        "{e}"
    );
    if !util::redis_up() {
        return;
    }
    let url = format!(
        "{URL}?global_keyprefix={}",
        util::prefix().replace(':', "%3A")
    );
    let store = drivers.open_beat_store(&url, &config).await.unwrap();
    assert!(format!("{store:?}").contains("RedisBeatStore"), "{store:?}");
    assert!(store.load().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_dead_leaders_lease_expires_on_the_server() {
    if !util::redis_up() {
        return;
    }
    let store = store_with(&util::prefix()).await;
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
    let st = EntryState::new(now);
    assert!(!store.save(&a, now, "e", &st).await.unwrap());
    assert!(store.save(&b, now, "e", &st).await.unwrap());
}

#[tokio::test]
async fn a_corrupt_record_is_a_clear_error_that_changes_nothing() {
    if !util::redis_up() {
        return;
    }
    let store = store_with(&util::prefix()).await;
    let key = store.lease_key().replace(".lease", ".state");
    let mut raw = util::raw().await;
    redis::cmd("HSET")
        .arg(&key)
        .arg("broken")
        .arg("{not json")
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    let e = store.load().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    let text = e.to_string();
    assert!(
        text.contains("\"broken\"") && text.contains("state") && text.contains("not valid JSON"),
        "{text}"
    );
    // The record is left as it was, for a person to look at.
    let kept: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("broken")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("{not json"));
}
