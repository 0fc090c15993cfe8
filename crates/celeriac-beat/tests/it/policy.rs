//! Missed-tick policies, restarts and run-time control, on virtual time with the memory store.

use std::time::Duration;

use celeriac_beat::{
    Beat, BeatEvent, BeatOptions, Clock, Control, Entry, EntrySpec, MemoryStore, MissedTicks, every,
};
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use crate::support::{Recorder, assert_unique, log, missing, ticks};

const STEP: Duration = Duration::from_secs(10);

fn options(instance: &str, missed: MissedTicks) -> BeatOptions {
    let mut o = BeatOptions::default();
    o.instance = instance.to_owned();
    o.lease = Duration::from_secs(3);
    o.missed = missed;
    o.clock = Clock::tokio_at("2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
    o
}

/// Runs `beat` for `d` of virtual time.
async fn run_for(beat: Beat, d: Duration) {
    let (stop, stopped) = oneshot::channel::<()>();
    let h = tokio::spawn(beat.run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(d).await;
    let _ = stop.send(());
    h.await.unwrap().unwrap();
}

fn beat(store: &MemoryStore, rec: &Recorder, o: BeatOptions) -> Beat {
    Beat::new(store.clone(), rec.clone(), o).entry(Entry::new("e", "tasks.e", every(STEP)))
}

#[tokio::test(start_paused = true)]
async fn catch_up_once_after_downtime() {
    let store = MemoryStore::new();
    let log = log();
    let rec = Recorder::new("a", &log, None);
    let o = options("a", MissedTicks::CatchUpOnce);
    let clock = o.clock.clone();
    run_for(
        beat(&store, &rec, o.clone()),
        STEP * 3 + Duration::from_secs(1),
    )
    .await;
    assert_eq!(ticks(&log, "e").len(), 3);
    // Down for 10 ticks; then one catch-up send for all of them, then the grid again.
    tokio::time::sleep(STEP * 10).await;
    run_for(
        beat(&store, &rec, o.clone()),
        STEP * 2 + Duration::from_secs(1),
    )
    .await;
    let sent = ticks(&log, "e");
    assert_unique(&sent);
    assert_eq!(sent.len(), 3 + 1 + 2, "{sent:?}");
    // The catch-up stands for the latest missed tick, sent at once on restart.
    let catch_up = sent[3];
    assert!(
        clock.now() - catch_up < chrono::Duration::seconds(25),
        "{catch_up}"
    );
    assert_eq!(
        missing(&sent[3..], STEP),
        Vec::<chrono::DateTime<chrono::Utc>>::new()
    );
}

#[tokio::test(start_paused = true)]
async fn skip_after_downtime() {
    let store = MemoryStore::new();
    let log = log();
    let rec = Recorder::new("a", &log, None);
    let o = options("a", MissedTicks::Skip);
    run_for(
        beat(&store, &rec, o.clone()),
        STEP * 3 + Duration::from_secs(1),
    )
    .await;
    tokio::time::sleep(STEP * 10 + Duration::from_secs(5)).await;
    let restart = o.clock.now();
    run_for(beat(&store, &rec, o.clone()), STEP * 2).await;
    let sent = ticks(&log, "e");
    assert_eq!(sent.len(), 3 + 2, "{sent:?}");
    // Nothing stands for the missed ticks: the first send after the restart is a new tick.
    assert!(sent[3] > restart, "{} <= {restart}", sent[3]);
}

#[tokio::test(start_paused = true)]
async fn a_paused_old_leader_cannot_fire() {
    // Instance a leads, then its lease lapses while it is stuck; b takes over; a's late
    // writes are refused by the fencing token.
    let store = MemoryStore::new();
    let log = log();
    let o = options("a", MissedTicks::CatchUpOnce);
    let a_lease = {
        use celeriac_beat::BeatStore;
        store
            .acquire("a", o.clock.now(), o.lease)
            .await
            .unwrap()
            .unwrap()
    };
    tokio::time::sleep(o.lease + Duration::from_secs(1)).await;
    let mut ob = options("b", MissedTicks::CatchUpOnce);
    ob.clock = o.clock.clone();
    let b = beat(&store, &Recorder::new("b", &log, None), ob);
    run_for(b, STEP + Duration::from_secs(1)).await;
    use celeriac_beat::BeatStore;
    let state = store.load().await.unwrap()["e"].state.clone().unwrap();
    assert!(
        !store
            .save(&a_lease, o.clock.now(), "e", &state)
            .await
            .unwrap()
    );
    assert_eq!(ticks(&log, "e").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn run_time_changes_reach_the_leader() {
    let store = MemoryStore::new();
    let log = log();
    let rec = Recorder::new("a", &log, None);
    let o = options("a", MissedTicks::CatchUpOnce);
    let b = Beat::new(store.clone(), rec, o);
    let control: Control = b.control();
    let (stop, stopped) = oneshot::channel::<()>();
    let h = tokio::spawn(b.run(async {
        let _ = stopped.await;
    }));
    let mut spec = EntrySpec::new("tasks.added");
    spec.every = Some(5.0);
    control.add("added", &spec).await.unwrap();
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(ticks(&log, "added").len(), 3);
    control.pause("added").await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(ticks(&log, "added").len(), 3, "paused entries do not fire");
    control.trigger("added").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let manual = log.lock().unwrap().iter().filter(|s| s.manual).count();
    assert_eq!(manual, 1, "a trigger fires once, even when paused");
    control.resume("added").await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        ticks(&log, "added").len(),
        5,
        "resumed without a catch-up storm"
    );
    let listed = control.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].total_run_count, 6);
    control.remove("added").await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(ticks(&log, "added").len(), 5, "removed entries do not fire");
    assert!(control.remove("added").await.is_err());
    assert!(
        control
            .pause("nope")
            .await
            .unwrap_err()
            .to_string()
            .contains("no beat entry")
    );
    let _ = stop.send(());
    h.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn one_off_fires_once() {
    let store = MemoryStore::new();
    let log = log();
    let o = options("a", MissedTicks::CatchUpOnce);
    let when = o.clock.now() + chrono::Duration::seconds(30);
    let b = Beat::new(store.clone(), Recorder::new("a", &log, None), o.clone()).entry(Entry::new(
        "once",
        "tasks.once",
        celeriac_beat::at(when),
    ));
    run_for(b, Duration::from_secs(60)).await;
    let b = Beat::new(store.clone(), Recorder::new("a", &log, None), o).entry(Entry::new(
        "once",
        "tasks.once",
        celeriac_beat::at(when),
    ));
    run_for(b, Duration::from_secs(60)).await;
    assert_eq!(ticks(&log, "once"), vec![when]);
}

#[tokio::test(start_paused = true)]
async fn every_fire_is_a_tick_event() {
    let store = MemoryStore::new();
    let log = log();
    let o = options("a", MissedTicks::CatchUpOnce);
    let b = beat(&store, &Recorder::new("a", &log, None), o.clone());
    let mut events = b.subscribe();
    let control = b.control();
    let (stop, stopped) = oneshot::channel::<()>();
    let h = tokio::spawn(b.run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(STEP * 3 + Duration::from_secs(1)).await;
    control.trigger("e").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(());
    h.await.unwrap().unwrap();

    let mut got = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push(e);
    }
    let sent = log.lock().unwrap().clone();
    assert_eq!(sent.len(), 4, "{sent:?}");
    // Leading first, then one tick per send with the same id and tick, then NotLeading.
    assert!(
        matches!(&got[0], BeatEvent::Leading { instance, term: 1 } if instance == "a"),
        "{got:?}"
    );
    assert!(
        matches!(got.last(), Some(BeatEvent::NotLeading { term: 1, .. })),
        "{got:?}"
    );
    let tick_events: Vec<_> = got
        .iter()
        .filter_map(|e| match e {
            BeatEvent::Tick {
                entry,
                task,
                task_id,
                scheduled,
                sent_at,
                term,
                manual,
                ..
            } => Some((entry, task, task_id, *scheduled, *sent_at, *term, *manual)),
            _ => None,
        })
        .collect();
    assert_eq!(tick_events.len(), sent.len(), "{got:?}");
    for ((entry, task, task_id, scheduled, sent_at, term, manual), s) in
        tick_events.iter().zip(&sent)
    {
        assert_eq!((entry.as_str(), task.as_str()), ("e", "tasks.e"));
        assert_eq!(*task_id, &s.task_id);
        assert_eq!(*scheduled, s.tick);
        assert_eq!(*manual, s.manual);
        assert_eq!(*term, 1);
        assert!(sent_at >= scheduled, "{sent_at} < {scheduled}");
    }
    assert_eq!(tick_events.iter().filter(|t| t.6).count(), 1);
}
