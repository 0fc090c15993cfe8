//! `worker -B`: the example worker runs beat in-process; two such workers on one SQLite file
//! still send every tick once, and both stop cleanly on SIGTERM.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use celeriac::core::TaskState;
use chrono::{DateTime, Utc};

use crate::support::{T, WorkerProcess, client, sqlite_url};

/// The entry's interval.
const EVERY: Duration = Duration::from_secs(1);

/// `(tick, task id)` of every "beat sent" line in a worker's log.
fn sent(log: &str) -> Vec<(DateTime<Utc>, String)> {
    log.lines()
        .filter(|l| l.contains("beat sent"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("no {name} in {l:?}"))
                    .to_owned()
            };
            let tick = celeriac::core::time::parse(&field("tick")).expect("tick");
            (tick, field("task_id"))
        })
        .collect()
}

fn journal(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_beat_send_every_tick_once_and_stop_on_sigterm() {
    let (url, db) = sqlite_url("beat");
    let journal_path = db.with_extension("journal");
    let config_path = db.with_extension("toml");
    // The entry comes from celeriac.toml's [beat] table.
    std::fs::write(
        &config_path,
        format!(
            "[beat]\nlease = 10\npoll_interval = 0.2\n\n[beat.schedule.journal]\n\
             task = \"tasks.journal\"\nevery = {}\nargs = [{:?}]\n",
            EVERY.as_secs_f64(),
            journal_path.display().to_string()
        ),
    )
    .unwrap();
    let config = config_path.display().to_string();
    let mut workers = [
        WorkerProcess::start_with_config(&url, &config, &["-B", "--concurrency", "2"]),
        WorkerProcess::start_with_config(&url, &config, &["-B", "--concurrency", "2"]),
    ];
    // Wait for a run of periodic tasks (generous: the box may be loaded).
    let deadline = Instant::now() + Duration::from_secs(90);
    while journal(&journal_path).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "periodic task ran {} times; logs:\n{}\n---\n{}",
            journal(&journal_path).len(),
            workers[0].log(),
            workers[1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &workers {
        w.signal("TERM");
    }
    for w in &mut workers {
        let status = w.wait(T).await;
        assert!(status.success(), "exit {status:?}; log:\n{}", w.log());
        assert!(w.log().contains("beat stopped"), "{}", w.log());
    }

    // Every tick sent once, on the 1 s grid from the first to the last, none missing.
    let mut all: Vec<(DateTime<Utc>, String)> =
        workers.iter().flat_map(|w| sent(&w.log())).collect();
    all.sort();
    let ticks: Vec<DateTime<Utc>> = all.iter().map(|(t, _)| *t).collect();
    assert!(ticks.len() >= 6, "{all:?}");
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::from_std(EVERY).unwrap(),
            "ticks not on the interval's grid (a duplicate or a gap): {ticks:?}"
        );
    }
    let ids: HashSet<&str> = all.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "a task id sent twice");

    // The store agrees with the logs (opened from the broker URL, as the workers opened it).
    let store = celeriac::default_drivers()
        .open_beat_store(&url, &celeriac::Config::default())
        .await
        .unwrap();
    let state = store.load().await.unwrap()["journal"]
        .state
        .clone()
        .expect("beat state");
    assert_eq!(state.total_run_count, all.len() as u64);
    // (The log shows microseconds.)
    let fmt = celeriac::core::time::format;
    assert_eq!(state.last_run_at.map(fmt), ticks.last().copied().map(fmt));
    assert!(state.pending.is_none(), "{state:?}");

    // Each sent task ran once (its result is in the backend) or still waits in the queue.
    let app = client(&url).await;
    let ran = journal(&journal_path);
    let ran_set: HashSet<&str> = ran.iter().map(String::as_str).collect();
    assert_eq!(
        ran_set.len(),
        ran.len(),
        "a periodic task ran twice: {ran:?}"
    );
    for id in &ran {
        assert!(ids.contains(id.as_str()), "{id} ran but beat never sent it");
        let meta = app.result::<serde_json::Value>(id).meta().await.unwrap();
        assert_eq!(meta.status, TaskState::Success, "{id}: {meta:?}");
    }
    let queued = app.broker().stats("celery").await.unwrap().total();
    assert_eq!(
        ran.len() as u64 + queued,
        all.len() as u64,
        "sent = ran + still queued"
    );
}
