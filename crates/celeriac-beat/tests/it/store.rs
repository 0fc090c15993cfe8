//! The store beat runs on: the conformance suite on the memory store, stores chosen from the
//! broker URL through the facade's driver table, and specs that no longer parse.

use std::sync::Arc;
use std::time::Duration;

use celeriac_beat::{
    Beat, BeatOptions, BeatStore, Control, DynStore, Entry, EntrySpec, MemoryStore, every,
};
use chrono::{DateTime, Utc};

use crate::support::{Recorder, log, ticks};

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

/// Opens the store a URL names, as the command line does: through the facade's drivers.
pub(crate) async fn open(url: &str) -> celeriac_core::Result<DynStore> {
    celeriac::default_drivers()
        .open_beat_store(url, &celeriac_core::Config::default())
        .await
}

async fn memory() -> Option<DynStore> {
    Some(Arc::new(MemoryStore::new()))
}

celeriac_test::beat_store_conformance!(memory);

#[test]
fn stores_and_events_are_send_and_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<MemoryStore>();
    is::<DynStore>();
    is::<celeriac_beat::BeatEvent>();
    is::<tokio::sync::broadcast::Receiver<celeriac_beat::BeatEvent>>();
}

#[tokio::test]
async fn the_broker_url_chooses_the_store() {
    let path = celeriac_test::services::temp_sqlite_path("beat-open");
    let s = open(&format!("sqlite://{}", path.display())).await.unwrap();
    assert!(format!("{s:?}").contains("SqliteBeatStore"), "{s:?}");
    let s = open("memory://").await.unwrap();
    assert!(format!("{s:?}").contains("MemoryBeatStore"), "{s:?}");
    let e = open("amqp://guest:guest@127.0.0.1:5672//")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no beat store for amqp://")
            && e.contains("memory")
            && e.contains("sqlite")
            && e.contains("redis")
            && e.contains("set `store` in [beat]"),
        "{e}"
    );
    assert!(!e.contains("guest:guest"), "{e}");
    let e = open("sqlite://:memory:").await.unwrap_err().to_string();
    assert!(e.contains("names no file"), "{e}");
    // Bad Redis URLs: a clear error, the password never shown.
    let e = open("redis://:s3cret@127.0.0.1:6379/notadb")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("database must be a number") && !e.contains("s3cret"),
        "{e}"
    );
    if let Some(url) = redis_url("beat-open") {
        let s = open(&url).await.unwrap();
        assert!(format!("{s:?}").contains("RedisBeatStore"), "{s:?}");
    }
}

/// A run-time entry whose stored JSON no longer parses as a spec fails the read that finds it,
/// naming the entry, as a corrupt row does: the command line reports it, and the leader logs it
/// and tries again each pass, firing again once the entry is fixed.
#[tokio::test(start_paused = true)]
async fn a_spec_that_no_longer_parses_is_reported_with_its_entry() {
    let store = MemoryStore::new();
    store
        .put_entry(
            "stale",
            &serde_json::json!({"task": "t", "every": 5, "retired": 1}),
        )
        .await
        .unwrap();
    let control = Control::new(Arc::new(store.clone()), Vec::new());
    for e in [
        control.list().await.unwrap_err(),
        control.pause("stale").await.unwrap_err(),
    ] {
        assert_eq!(e.kind(), celeriac_core::ErrorKind::Backend);
        assert!(
            e.to_string()
                .contains("the stored spec of entry \"stale\" is not a valid entry spec"),
            "{e}"
        );
    }

    let mut o = BeatOptions::default();
    o.instance = "a".to_owned();
    o.clock =
        celeriac_beat::Clock::tokio_at("2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
    let rec = Recorder::new("a", &log(), None);
    let beat = Beat::new(store.clone(), rec.clone(), o).entry(Entry::new(
        "e",
        "tasks.e",
        every(Duration::from_secs(10)),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(beat.run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(ticks(&rec.log, "e").is_empty(), "fired past a bad row");
    // Fixed (replaced through the control), the leader goes on.
    let mut spec = EntrySpec::new("t");
    spec.every = Some(5.0);
    control.add("stale", &spec).await.unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let _ = stop.send(());
    h.await.unwrap().unwrap();
    assert!(
        !ticks(&rec.log, "e").is_empty(),
        "never fired after the fix"
    );
}
