//! Three beat instances on one store (the broker's SQLite file, or the broker's Redis), real
//! time, short intervals. Each scenario runs on both.

use std::sync::Arc;
use std::time::Duration;

use celeriac_beat::{Beat, BeatOptions, DynStore, Entry, every};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{Recorder, assert_unique, log, missing, ticks};

const STEP: Duration = Duration::from_millis(250);
const LEASE: Duration = Duration::from_millis(800);

/// Where the instances meet: the broker URL (also the store's) and the queue beat sends to.
struct Site {
    url: String,
    queue: String,
}

impl Site {
    fn sqlite(test: &str) -> Site {
        let path = celeriac_test::services::temp_sqlite_path(test);
        Site {
            url: format!("sqlite://{}", path.display()),
            queue: "beat".to_owned(),
        }
    }

    /// `None` (skipped with a notice) without a Redis server.
    fn redis(test: &str) -> Option<Site> {
        Some(Site {
            url: crate::store::redis_url(test)?,
            queue: celeriac_test::services::unique_queue(test),
        })
    }

    async fn store(&self) -> DynStore {
        crate::store::open(&self.url).await.unwrap()
    }
}

async fn app(site: &Site) -> celeriac::App {
    celeriac::App::builder()
        .broker_url(&site.url)
        .build()
        .await
        .unwrap()
}

fn options(instance: &str) -> BeatOptions {
    let mut o = BeatOptions::default();
    o.instance = instance.to_owned();
    o.lease = LEASE;
    o.poll_interval = Duration::from_millis(50);
    o
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<celeriac_core::Result<()>>,
}

async fn start(
    site: &Site,
    instance: &str,
    log: &Arc<std::sync::Mutex<Vec<crate::support::Sent>>>,
    app: &celeriac::App,
) -> Running {
    let beat = Beat::from_parts(
        site.store().await,
        Arc::new(Recorder::new(instance, log, Some(app))),
        options(instance),
    )
    .entry(Entry::new("tick", "tasks.tick", every(STEP)).queue(&site.queue));
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(beat.run(async {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        handle,
    }
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

async fn queued(app: &celeriac::App, site: &Site) -> u64 {
    app.broker().stats(&site.queue).await.unwrap().total()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_fire_every_tick_once_on_sqlite() {
    three_instances_fire_every_tick_once(Site::sqlite("beat-three")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_fire_every_tick_once_on_redis() {
    if let Some(site) = Site::redis("beat-three") {
        three_instances_fire_every_tick_once(site).await;
    }
}

async fn three_instances_fire_every_tick_once(site: Site) {
    let app = app(&site).await;
    let log = log();
    let mut beats = Vec::new();
    for name in ["a", "b", "c"] {
        beats.push(start(&site, name, &log, &app).await);
    }
    tokio::time::sleep(STEP * 32).await;
    for b in beats {
        b.stop().await;
    }
    let sent = ticks(&log, "tick");
    assert!(sent.len() >= 10, "only {} ticks in 8 s", sent.len());
    assert_unique(&sent);
    assert_eq!(
        missing(&sent, STEP),
        Vec::<chrono::DateTime<chrono::Utc>>::new(),
        "ticks missed"
    );
    assert_eq!(
        queued(&app, &site).await,
        sent.len() as u64,
        "messages in the broker"
    );
    // The store agrees.
    let rows = site.store().await.load().await.unwrap();
    let state = rows["tick"].state.clone().unwrap();
    assert_eq!(state.total_run_count, sent.len() as u64);
    assert_eq!(state.last_run_at, sent.iter().max().copied());
    assert!(state.pending.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_another_takes_over_within_the_lease_on_sqlite() {
    leader_killed_another_takes_over_within_the_lease(Site::sqlite("beat-kill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_another_takes_over_within_the_lease_on_redis() {
    if let Some(site) = Site::redis("beat-kill") {
        leader_killed_another_takes_over_within_the_lease(site).await;
    }
}

async fn leader_killed_another_takes_over_within_the_lease(site: Site) {
    let app = app(&site).await;
    let log = log();
    let mut beats = Vec::new();
    for name in ["a", "b", "c"] {
        beats.push((name, start(&site, name, &log, &app).await));
    }
    tokio::time::sleep(STEP * 6).await;
    let leader = log
        .lock()
        .unwrap()
        .last()
        .expect("a first leader fired")
        .instance
        .clone();
    // Kill it: dropped mid-run, no release of the lease.
    let idx = beats.iter().position(|(n, _)| *n == leader).unwrap();
    let (_, killed) = beats.remove(idx);
    killed.handle.abort();
    let killed_at = tokio::time::Instant::now();
    let _ = killed.handle.await;
    tokio::time::sleep(LEASE + STEP * 8).await;
    for (_, b) in beats {
        b.stop().await;
    }
    let all = log.lock().unwrap().clone();
    let first_new = all
        .iter()
        .find(|s| s.instance != leader)
        .expect("another instance took over");
    let took = first_new.at - killed_at;
    eprintln!("{}: take-over after {took:?} (lease {LEASE:?})", site.url);
    assert!(
        took <= LEASE + STEP + Duration::from_millis(400),
        "take-over after {took:?} (lease {LEASE:?})"
    );
    let sent = ticks(&log, "tick");
    assert_unique(&sent);
    // Catch-up once: ticks that fell while nobody led are sent once, as their latest tick;
    // so any gap sits between the kill and the take-over (itself within the lease, checked
    // above): at most the ticks of that window, plus the one the killed leader may have
    // recorded and not sent.
    let gaps = missing(&sent, STEP);
    let max_gap = (took.as_millis() / STEP.as_millis()) as usize + 1;
    assert!(
        gaps.len() <= max_gap,
        "missed {gaps:?} with a take-over after {took:?}"
    );
    // The killed leader may have been dropped after the broker took its last message but
    // before the recorder logged it: one message more than logged, never two.
    let q = queued(&app, &site).await;
    assert!(
        q == sent.len() as u64 || q == sent.len() as u64 + 1,
        "{q} messages in the broker for {} logged sends",
        sent.len()
    );
    // Every message stands for a tick recorded once in the store.
    let rows = site.store().await.load().await.unwrap();
    assert!(q <= rows["tick"].state.as_ref().unwrap().total_run_count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_last_run_on_sqlite() {
    restart_keeps_the_last_run(Site::sqlite("beat-restart")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_last_run_on_redis() {
    if let Some(site) = Site::redis("beat-restart") {
        restart_keeps_the_last_run(site).await;
    }
}

async fn restart_keeps_the_last_run(site: Site) {
    let app = app(&site).await;
    let log = log();
    let a = start(&site, "a", &log, &app).await;
    tokio::time::sleep(STEP * 4).await;
    a.stop().await;
    let before = ticks(&log, "tick");
    let last = *before.iter().max().expect("fired before the restart");
    // Restart at once (a new instance name): the next tick follows the last one, none
    // is sent again.
    let b = start(&site, "b", &log, &app).await;
    tokio::time::sleep(STEP * 4).await;
    b.stop().await;
    let all = ticks(&log, "tick");
    assert_unique(&all);
    let after: Vec<_> = all.iter().filter(|t| **t > last).collect();
    assert!(!after.is_empty(), "nothing fired after the restart");
    assert_eq!(
        missing(&all, STEP),
        Vec::<chrono::DateTime<chrono::Utc>>::new(),
        "ticks missed across the restart"
    );
    assert_eq!(queued(&app, &site).await, all.len() as u64);
}
