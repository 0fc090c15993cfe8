//! Retries, delays, expiry, revoke, rate limits and time limits, across processes.

use std::time::Duration;

use celeriac::TaskState;
use celeriac_examples::{add, flaky, limited, sleep};
use chrono::Utc;

use crate::support::{T, WorkerProcess, client, sqlite_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_until_success() {
    let (url, _) = sqlite_url("retries");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let r = flaky::delay(&app, 3).await.unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 3);
    let meta = r.meta().await.unwrap();
    assert_eq!(meta.retries, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_and_eta_never_run_early() {
    let (url, _) = sqlite_url("countdown");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let sent = Utc::now();
    let by_countdown = add::s(1, 2)
        .countdown(Duration::from_millis(1500))
        .apply_async(&app)
        .await
        .unwrap();
    let eta = sent + chrono::Duration::milliseconds(1200);
    let by_eta = add::s(3, 4).eta(eta).apply_async(&app).await.unwrap();
    let now = add::delay(&app, 0, 0).await.unwrap();
    assert_eq!(now.get_timeout(T).await.unwrap(), 0);
    assert_eq!(by_countdown.get_timeout(T).await.unwrap(), 3);
    assert_eq!(by_eta.get_timeout(T).await.unwrap(), 7);
    let done = by_countdown.meta().await.unwrap().date_done.unwrap();
    assert!(
        done >= sent + chrono::Duration::milliseconds(1500),
        "ran at {done}, sent at {sent}"
    );
    let done = by_eta.meta().await.unwrap().date_done.unwrap();
    assert!(done >= eta, "ran at {done}, eta {eta}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tasks_are_revoked_not_run() {
    let (url, _) = sqlite_url("expires");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let r = add::s(1, 1)
        .countdown(Duration::from_millis(800))
        .expires_in(Duration::from_millis(300))
        .apply_async(&app)
        .await
        .unwrap();
    let e = r.get_timeout(T).await.unwrap_err();
    let remote = e.remote().unwrap();
    assert_eq!(remote.exc_type, "TaskRevokedError");
    assert_eq!(remote.message(), "expired");
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_task_does_not_run() {
    let (url, _) = sqlite_url("revoke");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let r = add::s(5, 5)
        .countdown(Duration::from_millis(700))
        .apply_async(&app)
        .await
        .unwrap();
    r.revoke().await.unwrap();
    // Wait for a task sent after it to run; by then the revoked one was due long ago.
    let after = add::s(0, 1)
        .countdown(Duration::from_millis(1200))
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(after.get_timeout(T).await.unwrap(), 1);
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked);
    assert_eq!(r.error().await.unwrap().unwrap().message(), "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_space_out_runs() {
    let (url, _) = sqlite_url("rate");
    let _w = WorkerProcess::start(&url, &["-c", "8"]);
    let app = client(&url).await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        handles.push(limited::delay(&app).await.unwrap());
    }
    let mut stamps = Vec::new();
    for h in handles {
        stamps.push(h.get_timeout(T).await.unwrap());
    }
    stamps.sort_by(f64::total_cmp);
    // 10/s with no burst: 8 runs need at least 7 intervals of 100 ms.
    let span = stamps[7] - stamps[0];
    assert!(
        span >= 0.69,
        "8 runs at 10/s took only {span:.3}s: {stamps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_time_limit_cancels_the_task() {
    let (url, _) = sqlite_url("soft-limit");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let r = sleep::s(30.0)
        .soft_time_limit(Duration::from_millis(300))
        .apply_async(&app)
        .await
        .unwrap();
    let e = r.get_timeout(T).await.unwrap_err();
    assert_eq!(e.remote().unwrap().exc_type, "SoftTimeLimitExceeded");
    let quick = sleep::s(0.05)
        .soft_time_limit(Duration::from_secs(10))
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(quick.get_timeout(T).await.unwrap(), 0.05);
}
