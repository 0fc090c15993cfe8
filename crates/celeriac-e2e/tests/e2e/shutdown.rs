//! Graceful shutdown and crashes lose nothing.

use std::time::Duration;

use celeriac_examples::stamp;

use crate::support::{T, WorkerProcess, client, sqlite_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_tasks_and_hands_back_the_rest() {
    let (url, _) = sqlite_url("graceful");
    let mut w = WorkerProcess::start(&url, &["-c", "2", "--prefetch-buffer", "4"]);
    let app = client(&url).await;
    let mut results = Vec::new();
    for _ in 0..12 {
        results.push(stamp::delay(&app, 0.4).await.unwrap());
    }
    // Let the worker take some, then ask it to stop while tasks run.
    let first = results[0].clone();
    tokio::time::timeout(T, async {
        while first.state().await.unwrap() == celeriac::TaskState::Pending
            && !w.log().contains("tasks.stamp")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("worker never started a task");
    w.signal("TERM");
    let status = w.wait(T).await;
    assert!(
        status.success(),
        "warm shutdown should exit 0: {status:?}\n{}",
        w.log()
    );

    // A second worker gets everything the first did not finish.
    let _w2 = WorkerProcess::start(&url, &["-c", "4"]);
    for r in &results {
        r.get_timeout(T)
            .await
            .unwrap_or_else(|e| panic!("task {} lost: {e:?}", r.id()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_late_tasks_survive_a_killed_worker() {
    let (url, _) = sqlite_url("sigkill");
    // A short lease so the test does not wait an hour for redelivery.
    let config = format!("{}.toml", url.trim_start_matches("sqlite://"));
    std::fs::write(&config, "visibility_timeout = 1.0\n").unwrap();
    let app = client(&url).await;
    let mut w = WorkerProcess::start_with_config(&url, &config, &["-c", "2"]);
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(stamp::delay(&app, 0.5).await.unwrap());
    }
    w.wait_for_log("tasks.stamp", T).await;
    w.signal("KILL");
    w.wait(T).await;
    let _w2 = WorkerProcess::start_with_config(&url, &config, &["-c", "4"]);
    for r in &results {
        r.get_timeout(T)
            .await
            .unwrap_or_else(|e| panic!("task {} lost after SIGKILL: {e:?}", r.id()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_late_tasks_survive_a_killed_worker_on_redis() {
    if !celeriac_test::services::require_service("redis", "127.0.0.1:6379") {
        return;
    }
    let url = "redis://127.0.0.1:6379/7";
    let queue = celeriac_test::services::unique_queue("sigkill");
    // A short visibility timeout so the test does not wait an hour for the restore.
    let (_, path) = sqlite_url("sigkill-redis");
    let config = format!("{}.toml", path.display());
    std::fs::write(&config, "visibility_timeout = 1.0\n").unwrap();
    let app = client(url).await;
    let mut w = WorkerProcess::start_with_config(url, &config, &["-c", "2", "-Q", &queue]);
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(
            stamp::s(0.5)
                .queue(queue.clone())
                .apply_async(&app)
                .await
                .unwrap(),
        );
    }
    w.wait_for_log("tasks.stamp", T).await;
    w.signal("KILL");
    w.wait(T).await;
    // The killed worker's deliveries sit in kombu's unacked hash until the next consumer
    // restores them after the visibility timeout.
    let _w2 = WorkerProcess::start_with_config(url, &config, &["-c", "4", "-Q", &queue]);
    for r in &results {
        r.get_timeout(T)
            .await
            .unwrap_or_else(|e| panic!("task {} lost after SIGKILL on redis: {e:?}", r.id()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_shutdown_lets_short_tasks_finish_and_hands_back_the_rest() {
    let (url, db) = sqlite_url("soft-shutdown");
    let config = format!("{}.toml", db.display());
    std::fs::write(&config, "track_started = true\n").unwrap();
    let app = client(&url).await;
    let mut a = WorkerProcess::start_with_config(
        &url,
        &config,
        &[
            "-P",
            "processes",
            "-c",
            "2",
            "-n",
            "a@soft",
            "--soft-shutdown-timeout",
            "4",
        ],
    );
    // One task far longer than the soft timeout (4 s, plus the 2 s cold grace), one well
    // within it.
    let long = stamp::delay(&app, 12.0).await.unwrap();
    let short = stamp::delay(&app, 1.0).await.unwrap();
    tokio::time::timeout(T, async {
        loop {
            let (l, s) = (long.state().await.unwrap(), short.state().await.unwrap());
            if l == celeriac::TaskState::Started && s == celeriac::TaskState::Started {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("both tasks never ran together:\n{}", a.log()));
    a.signal("TERM");
    let status = a.wait(T).await;
    assert!(status.success(), "{status:?}\n{}", a.log());
    let log = a.log();
    assert!(log.contains("soft shutdown timeout expired"), "{log}");

    // The short one finished in the soft window, on A.
    let meta = short.meta().await.unwrap();
    assert_eq!(meta.status, celeriac::TaskState::Success, "{log}");
    assert_eq!(meta.worker.as_deref(), Some("a@soft"));
    // The long one was handed back, not acked and not finished.
    assert_ne!(long.state().await.unwrap(), celeriac::TaskState::Success);
    let stats = app.broker().stats("celery").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (1, 0), "{stats:?}\n{log}");

    // Another worker runs it to the end: nothing lost.
    let _b = WorkerProcess::start_with_config(&url, &config, &["-c", "2", "-n", "b@soft"]);
    long.get_timeout(T).await.unwrap();
    assert_eq!(long.meta().await.unwrap().worker.as_deref(), Some("b@soft"));
}
