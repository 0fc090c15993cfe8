//! The dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol, while workers run tasks in this process on the embedded SQLite broker.
//!
//! Skipped with a notice when no Chromium can be run, unless `CELERIAC_REQUIRE_SERVICES=1`.
//! With `CELERIAC_SCREENSHOTS=<dir>` the screenshots go to that directory (the ones in
//! `docs/img/` were taken so); otherwise under `target/celeriac-test/`.

mod cdp;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cdp::Browser;
use celeriac::web::WebOptions;
use celeriac::{App, TaskError};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

#[celeriac::task(name = "tasks.add")]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[celeriac::task(name = "tasks.boom")]
async fn boom() -> Result<i64, TaskError> {
    Err(TaskError::new("ValueError", "boom"))
}

/// Registered only by the second worker: the first one dead-letters it (not registered).
#[celeriac::task(name = "tasks.late")]
fn late(word: String) -> String {
    format!("{word} at last")
}

static SHOTS: AtomicBool = AtomicBool::new(false);

fn shot_path(name: &str) -> PathBuf {
    match std::env::var_os("CELERIAC_SCREENSHOTS") {
        Some(dir) => {
            SHOTS.store(true, Ordering::Relaxed);
            PathBuf::from(dir).join(name)
        }
        None => celeriac_test::services::test_dir().join(name),
    }
}

async fn app(url: &str, late_too: bool) -> App {
    let mut b = App::builder().broker_url(url).task::<add>().task::<boom>();
    if late_too {
        b = b.task::<late>();
    }
    b.build().await.expect("app")
}

/// A worker with task events on, running in this process; its stop handle and its task.
fn worker(
    app: &App,
    name: &str,
) -> (
    celeriac::worker::ShutdownHandle,
    tokio::task::JoinHandle<()>,
) {
    let mut o = app.worker_options();
    o.concurrency = 2;
    o.task_events = true;
    o.hostname = name.into();
    o.heartbeat_interval = Duration::from_millis(500);
    let w = app.worker(o);
    let stop = w.shutdown_handle();
    let run = tokio::spawn(async move {
        let _ = w.run().await;
    });
    (stop, run)
}

/// Serves the dashboard of `app` on a loopback port; the base URL.
async fn serve(app: &App, options: WebOptions) -> (String, tokio::task::JoinHandle<()>) {
    serve_at(app, options, "").await
}

/// Serves the dashboard of `app`, nested under `prefix` in an axum router when not empty; the
/// page's URL without its trailing slash.
async fn serve_at(
    app: &App,
    options: WebOptions,
    prefix: &str,
) -> (String, tokio::task::JoinHandle<()>) {
    let store = celeriac::default_drivers()
        .open_beat_store(app.config().broker_url(), app.config())
        .await
        .expect("beat store");
    let beat = celeriac::beat::Control::new(store, Vec::new());
    let mut spec = celeriac::beat::EntrySpec::new("tasks.add");
    spec.every = Some(3600.0);
    spec.args = vec![json!(1), json!(2)];
    let _ = beat.add("hourly-add", &spec).await;
    let web = app.web().beat(beat).options(options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{prefix}", listener.local_addr().unwrap());
    let prefix = prefix.to_owned();
    let server = tokio::spawn(async move {
        if prefix.is_empty() {
            let _ = web.serve(listener).await;
        } else {
            let _running = web.start();
            let router = axum::Router::new().nest(&prefix, web.router());
            let _ = axum::serve(listener, router).await;
        }
    });
    (url, server)
}

/// Waits until the workers view shows `host` with `concurrency`, asking the workers again
/// every few seconds (an answer can miss the API's one-second window on a busy machine).
async fn concurrency_shows(b: &mut Browser, host: &str, concurrency: &str) {
    let cell = format!(
        "(document.querySelector('#workers tr[data-worker=\"{host}\"] td.concurrency') || {{}}).textContent === '{concurrency}'"
    );
    let start = std::time::Instant::now();
    while b.eval(&cell).await != json!(true) {
        if start.elapsed() > T {
            b.wait_for(&cell, Duration::from_millis(1)).await; // fails, showing the page
        }
        if start.elapsed().as_secs() % 4 == 3 {
            b.click("#ask").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A JavaScript string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn number(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_and_steers_a_running_worker() {
    let Some(mut b) = Browser::launch().await else {
        return;
    };
    let db = celeriac_test::services::temp_sqlite_path("web-browser");
    let url = format!("sqlite://{}", db.display());
    let a = app(&url, false).await;
    let (stop_a, run_a) = worker(&a, "w1@browser");
    let (base, _server) = serve(&a, WebOptions::default()).await;

    // The overview lists the worker, online, from the event stream.
    let started = std::time::Instant::now();
    b.goto(&format!("{base}/")).await;
    b.wait_for(
        "document.querySelector('main').dataset.ready === 'overview'",
        T,
    )
    .await;
    eprintln!(
        "measured: the overview drawn {:?} after navigating; requests (ms): {}",
        started.elapsed(),
        b.eval("JSON.stringify(performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map(e => [e.name.replace(location.origin, ''), Math.round(e.duration)]))").await
    );
    b.wait_for(
        "document.querySelector('#workers tr[data-worker=\"w1@browser\"] .badge.on')",
        T,
    )
    .await;
    b.wait_for(
        "document.getElementById('live').classList.contains('on')",
        T,
    )
    .await;

    // The counts move while the page stays (no reload: the marker survives).
    b.eval("window.__same_page = 1").await;
    let before = number(
        &b.eval("document.querySelector('#card-succeeded b').textContent")
            .await,
    );
    assert!(before >= 0, "a succeeded count is shown");
    for i in 0..6 {
        add::delay(&a, i, 1)
            .await
            .unwrap()
            .get_timeout(T)
            .await
            .unwrap();
    }
    b.wait_for(
        &format!(
            "Number(document.querySelector('#card-succeeded b').textContent) >= {}",
            before + 6
        ),
        T,
    )
    .await;
    b.wait_for(
        "Number(document.querySelector('#workers tr[data-worker=\"w1@browser\"] td.processed').textContent) >= 6",
        T,
    )
    .await;
    assert_eq!(
        b.eval("window.__same_page").await,
        json!(1),
        "the page was reloaded"
    );

    // A failed task shows its exception and traceback on its page.
    let failed = boom::delay(&a).await.unwrap();
    let _ = failed.get_timeout(T).await;
    b.goto(&format!("{base}/#/task/{}", failed.id())).await;
    b.wait_for(
        "document.querySelector('#task .exception') && document.querySelector('#task .exception').textContent.includes(\"ValueError('boom')\")",
        T,
    )
    .await;
    let tb = b
        .eval("document.getElementById('traceback').textContent")
        .await;
    assert!(
        tb.as_str().is_some_and(|t| t.contains("ValueError")),
        "traceback shown: {tb}"
    );
    b.screenshot(&shot_path("dashboard-task.png")).await;

    // The task list filters by state through its form.
    b.goto(&format!("{base}/#/tasks")).await;
    b.wait_for(
        "document.querySelector('main').dataset.ready === 'tasks'",
        T,
    )
    .await;
    b.eval("document.querySelector('#filters select[name=state]').value = 'FAILURE'; document.querySelector('#filters button').click()")
        .await;
    b.wait_for(
        &format!(
            "location.hash.includes('state=FAILURE') && document.querySelector('main').dataset.ready === 'tasks' && document.querySelector('#tasks tr[data-id={}]')",
            js(failed.id())
        ),
        T,
    )
    .await;
    let states = b
        .eval("[...document.querySelectorAll('#tasks tbody .state')].map(e => e.textContent)")
        .await;
    assert!(
        states
            .as_array()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|x| x == "FAILURE")),
        "only failures listed: {states}"
    );
    b.goto(&format!("{base}/#/tasks?name=tasks.add&state=SUCCESS"))
        .await;
    b.wait_for(
        "document.querySelectorAll('#tasks tbody tr[data-id]').length >= 6",
        T,
    )
    .await;

    // Revoke from the button: a task held for an hour is revoked, stored REVOKED.
    let held = b
        .eval("api('/api/tasks/tasks.add', {args: [1, 1], options: {countdown: 3600}}).then(r => r.task_id)")
        .await;
    let held = held.as_str().expect("a task id").to_owned();
    b.goto(&format!("{base}/#/task/{held}")).await;
    b.wait_for(
        "document.getElementById('revoke') && !document.getElementById('revoke').disabled",
        T,
    )
    .await;
    b.click("#revoke").await;
    b.wait_for(
        "document.querySelector('h2 .state') && document.querySelector('h2 .state').textContent === 'REVOKED'",
        T,
    )
    .await;
    let meta = a
        .result::<Value>(&held)
        .wait_meta(Some(T))
        .await
        .expect("revoked is stored");
    assert_eq!(meta.status.as_str(), "REVOKED");
    // What the page sends passes the cross-site guard; a form-like post does not.
    let refused = b
        .eval("fetch('/api/tasks/x/revoke', {method: 'POST', body: '{}'}).then(r => r.json()).then(j => j.error)")
        .await;
    assert!(
        refused
            .as_str()
            .is_some_and(|e| e.contains("X-Requested-With")),
        "{refused}"
    );

    // Canvas: a group member's page links its group, with the group's progress.
    let g = celeriac::canvas::group((0..3).map(|i| add::s(i, 1)))
        .apply_async(&a)
        .await
        .unwrap();
    g.join(Some(T)).await.unwrap();
    b.goto(&format!("{base}/#/task/{}", g.results()[1].id()))
        .await;
    b.wait_for(
        &format!(
            "document.querySelector('#canvas') && document.querySelector('#canvas').textContent.includes({}) && (document.getElementById('group-progress') || {{}}).textContent.trim() === '3/3 done, 0 failed'",
            js(g.id())
        ),
        T,
    )
    .await;

    // Long arguments are cut: by the server, and again in the list's cells.
    let long = "x".repeat(5000);
    let echo = b
        .eval(&format!(
            "api('/api/tasks/tasks.add', {{args: [{}, 1]}}).then(r => r.task_id)",
            js(&long)
        ))
        .await;
    let echo = echo.as_str().expect("a task id").to_owned();
    b.goto(&format!("{base}/#/tasks?search={echo}")).await;
    let cell = format!("#tasks tr[data-id={}] td.code", js(&echo));
    b.wait_for(&format!("document.querySelector({})", js(&cell)), T)
        .await;
    let shown = b
        .eval(&format!(
            "document.querySelector({}).textContent",
            js(&cell)
        ))
        .await;
    let shown = shown.as_str().unwrap_or_default();
    assert!(
        shown.ends_with('…') && shown.chars().count() <= 81,
        "a cut preview in the list: {shown:?}"
    );
    b.goto(&format!("{base}/#/task/{echo}")).await;
    b.wait_for("document.querySelector('#task pre.value')", T)
        .await;
    let args = b
        .eval("document.querySelector('#task pre.value').textContent")
        .await;
    let args = args.as_str().unwrap_or_default();
    assert!(
        args.starts_with("['xxx") && args.chars().count() <= 2001,
        "a cut preview on the task page ({} characters)",
        args.chars().count()
    );

    // Workers: pool and concurrency from the workers' answers; the pool grows from its button.
    b.goto(&format!("{base}/#/workers")).await;
    concurrency_shows(&mut b, "w1@browser", "2").await;
    b.click("button[data-grow=\"w1@browser\"]").await;
    concurrency_shows(&mut b, "w1@browser", "3").await;
    b.eval("document.querySelector('section.worker select[name=task]').value = 'tasks.add'; document.querySelector('section.worker input[name=rate]').value = '100/m'")
        .await;
    b.click("button[data-rate=\"w1@browser\"]").await;
    b.wait_for(
        "document.getElementById('flash').textContent.includes('rate limit of tasks.add')",
        T,
    )
    .await;
    b.screenshot(&shot_path("dashboard-workers.png")).await;

    // Beat entries: pause, resume and run now from the buttons.
    b.goto(&format!("{base}/#/beat")).await;
    let entry = "#beat tr[data-entry=\"hourly-add\"]";
    b.wait_for(&format!("document.querySelector('{entry} .badge.on')"), T)
        .await;
    b.click(&format!("{entry} button[data-action=pause]")).await;
    b.wait_for(
        &format!("document.querySelector('{entry} .badge.off') && document.querySelector('{entry} button[data-action=resume]')"),
        T,
    )
    .await;
    b.click(&format!("{entry} button[data-action=resume]"))
        .await;
    b.wait_for(&format!("document.querySelector('{entry} .badge.on')"), T)
        .await;
    b.click(&format!("{entry} button[data-action=trigger]"))
        .await;
    b.wait_for(
        "document.getElementById('flash').textContent.includes('hourly-add: trigger')",
        T,
    )
    .await;

    // A dead letter: a task the first worker does not know.
    let letter = {
        let m = celeriac::core::protocol::Message::new(
            celeriac::core::protocol::Headers::new(
                "tasks.late",
                celeriac::core::protocol::new_id(),
            ),
            &celeriac::core::protocol::Body::new(vec![json!("requeued")], Default::default()),
            celeriac::core::ContentType::Json,
        )
        .unwrap();
        a.broker().declare("celery").await.unwrap();
        a.broker()
            .publish("celery", &m, Default::default())
            .await
            .unwrap();
        m.id().to_owned()
    };
    b.goto(&format!("{base}/#/dead?queue=celery")).await;
    let row = format!("#letters tr[data-id={}]", js(&letter));
    let mut seen = false;
    for _ in 0..60 {
        if b.eval(&format!("!!document.querySelector({})", js(&row)))
            .await
            == json!(true)
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.eval("route()").await;
    }
    assert!(seen, "the dead letter is listed");
    let reason = b
        .eval(&format!("document.querySelector({}).textContent", js(&row)))
        .await;
    assert!(reason.to_string().contains("NotRegistered"), "{reason}");

    // A worker that knows the task takes over; the first one goes offline.
    let b_app = app(&url, true).await;
    let (stop_b, run_b) = worker(&b_app, "w2@browser");
    // The first worker is shut down from its button (the page asks first: say yes).
    b.goto(&format!("{base}/#/workers")).await;
    b.wait_for(
        "document.querySelector('button[data-shutdown=\"w1@browser\"]')",
        T,
    )
    .await;
    b.eval("window.confirm = () => true").await;
    b.click("button[data-shutdown=\"w1@browser\"]").await;
    b.wait_for(
        "document.getElementById('flash').textContent.includes('shutdown sent to w1@browser')",
        T,
    )
    .await;
    drop(stop_a);
    tokio::time::timeout(T, run_a)
        .await
        .expect("the first worker stops on the button's shutdown")
        .unwrap();
    b.goto(&format!("{base}/#/dead?queue=celery")).await;
    b.wait_for(&format!("document.querySelector({})", js(&row)), T)
        .await;
    b.click(&format!("button[data-requeue={}]", js(&letter)))
        .await;
    b.wait_for(
        "document.getElementById('flash').textContent.includes('requeued 1 to celery')",
        T,
    )
    .await;
    let done: String = b_app
        .result::<String>(&letter)
        .get_timeout(T)
        .await
        .expect("the requeued letter runs on the second worker");
    assert_eq!(done, "requeued at last");
    b.goto(&format!("{base}/#/task/{letter}")).await;
    b.wait_for(
        "document.querySelector('h2 .state') && document.querySelector('h2 .state').textContent === 'SUCCESS'",
        T,
    )
    .await;

    // Back on the overview: one worker online, the other offline; the charts have data.
    b.goto(&format!("{base}/")).await;
    b.wait_for(
        "document.querySelector('#workers tr[data-worker=\"w1@browser\"] .badge.off') && document.querySelector('#workers tr[data-worker=\"w2@browser\"] .badge.on')",
        T,
    )
    .await;
    // Some traffic for the charts; spread over half a minute when taking the screenshots.
    let spread = std::env::var_os("CELERIAC_SCREENSHOTS").is_some();
    for round in 0..if spread { 8 } else { 1 } {
        for i in 0..(6 + 5 * (round % 3)) {
            add::delay(&b_app, i, round).await.unwrap();
            if i % 5 == 0 {
                boom::delay(&b_app).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_secs(if spread { 4 } else { 3 })).await;
    }
    let size = b.screenshot(&shot_path("dashboard-overview.png")).await;
    assert!(size > 10_000, "a screenshot with content ({size} bytes)");
    assert!(b.errors.is_empty(), "JavaScript errors: {:?}", b.errors);
    if SHOTS.load(Ordering::Relaxed) {
        eprintln!(
            "screenshots written to {:?}",
            std::env::var_os("CELERIAC_SCREENSHOTS")
        );
    }
    stop_b.warm();
    let _ = tokio::time::timeout(T, run_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_dashboard_offers_no_changes() {
    let Some(mut b) = Browser::launch().await else {
        return;
    };
    let db = celeriac_test::services::temp_sqlite_path("web-browser-ro");
    let a = app(&format!("sqlite://{}", db.display()), false).await;
    let (stop, run) = worker(&a, "w1@readonly");
    let mut o = WebOptions::default();
    o.read_only = true;
    // Nested under a prefix in an app's router: the page finds its assets, API and stream there.
    let (base, _server) = serve_at(&a, o, "/ops").await;
    let failed = boom::delay(&a).await.unwrap();
    let _ = failed.get_timeout(T).await;

    b.goto(&format!("{base}#/task/{}", failed.id())).await;
    b.wait_for("document.querySelector('main').dataset.ready === 'task' && document.getElementById('revoke')", T)
        .await;
    assert_eq!(
        b.eval("document.body.classList.contains('read-only')")
            .await,
        json!(true)
    );
    b.wait_for(
        "document.getElementById('live').classList.contains('on')",
        T,
    )
    .await;
    for view in ["task", "beat", "queues"] {
        if view != "task" {
            b.goto(&format!("{base}#/{view}")).await;
            b.wait_for(
                &format!("document.querySelector('main').dataset.ready === '{view}'"),
                T,
            )
            .await;
        }
        let buttons = b
            .eval("[...document.querySelectorAll('main button.mutating')].map(x => [x.disabled, x.offsetParent === null])")
            .await;
        let list = buttons.as_array().expect("a list");
        assert!(
            !list.is_empty(),
            "{view}: the mutating buttons exist, disabled"
        );
        assert!(
            list.iter().all(|x| x == &json!([true, true])),
            "{view}: every mutating button disabled and hidden: {buttons}"
        );
    }
    // The server refuses a change even when the page is bypassed.
    let refused = b
        .eval("api('/api/beat/hourly-add/pause', {}).then(() => 'done', e => e.message)")
        .await;
    assert_eq!(refused, json!("this server is read-only"));
    assert!(b.errors.is_empty(), "JavaScript errors: {:?}", b.errors);
    stop.warm();
    let _ = tokio::time::timeout(T, run).await;
}

/// Resident memory of this process, in MiB (Linux), for the measurement below.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_tasks_in_memory_still_load_quickly() {
    use celeriac::core::broadcast::Broadcasted;
    use celeriac::core::broadcast::event::{Event, EventKind};
    const N: usize = 100_000;
    let Some(mut b) = Browser::launch().await else {
        return;
    };
    let a = App::builder()
        .broker_url("memory://")
        .build()
        .await
        .unwrap();
    let (base, _server) = serve(&a, WebOptions::default()).await;
    let channels = a.broker().broadcast().expect("memory carries events");
    let before = rss_mib();
    let started = std::time::Instant::now();
    let now = celeriac::core::broadcast::event::now_unix();
    let mut clock = 0;
    for chunk in 0..N / 500 {
        let mut batch = Vec::with_capacity(1000);
        for i in chunk * 500..(chunk + 1) * 500 {
            clock += 2;
            let id = format!("bulk-{i:06}");
            let t = now - (N - i) as f64 * 0.001;
            batch.push(
                Event::new(EventKind::TaskReceived, "w1@bulk", clock - 1)
                    .with("uuid", id.clone())
                    .with("name", format!("tasks.kind{}", i % 7))
                    .with("args", format!("({i}, {})", i * 2))
                    .with("kwargs", "{}")
                    .with("timestamp", t)
                    .into_value(),
            );
            let done = if i % 50 == 0 {
                Event::new(EventKind::TaskFailed, "w1@bulk", clock)
                    .with("exception", format!("ValueError('bad {i}')"))
                    .with(
                        "traceback",
                        "Traceback (most recent call last):\nValueError",
                    )
            } else {
                Event::new(EventKind::TaskSucceeded, "w1@bulk", clock)
                    .with("result", format!("{}", i * 3))
                    .with("runtime", 0.002)
            };
            batch.push(
                done.with("uuid", id)
                    .with("timestamp", t + 0.0005)
                    .into_value(),
            );
        }
        let m = Broadcasted::new("task.multi", Default::default(), Value::Array(batch));
        channels.send_event(&m).await.unwrap();
        // Let the reader keep up (the in-memory channel keeps 1,024 messages).
        if chunk % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let stats_url = format!("{base}/api/stats");
    b.goto(&format!("{base}/")).await;
    b.wait_for(
        &format!(
            "fetch({}).then(r => r.json()).then(s => s.tasks_kept >= {N})",
            js(&stats_url)
        ),
        Duration::from_secs(120),
    )
    .await;
    let fed = started.elapsed();
    let grown = rss_mib() - before;

    let t0 = std::time::Instant::now();
    b.goto(&format!("{base}/#/tasks")).await;
    b.wait_for(
        "document.querySelector('main').dataset.ready === 'tasks' && document.querySelectorAll('#tasks tbody tr[data-id]').length === 100",
        T,
    )
    .await;
    let list = t0.elapsed();
    let t0 = std::time::Instant::now();
    b.goto(&format!("{base}/#/tasks?search=bulk-04200&state=FAILURE"))
        .await;
    b.wait_for(
        "document.querySelector('main').dataset.ready === 'tasks' && document.querySelector('#tasks tbody tr[data-id=\"bulk-042000\"]') && document.querySelectorAll('#tasks tbody tr[data-id]').length === 1",
        T,
    )
    .await;
    let search = t0.elapsed();
    let t0 = std::time::Instant::now();
    b.goto(&format!("{base}/#/")).await;
    b.wait_for(
        "document.querySelector('main').dataset.ready === 'overview' && document.querySelector('#card-succeeded b').textContent === '98000'",
        T,
    )
    .await;
    let overview = t0.elapsed();
    eprintln!(
        "measured with {N} tasks in memory: fed in {fed:?}, process memory +{grown:.0} MiB; \
         task list drawn in {list:?}, a search over all in {search:?}, the overview in {overview:?}"
    );
    // Generous bounds (the machine is shared): a page must not take seconds.
    assert!(list < Duration::from_secs(5), "the list took {list:?}");
    assert!(
        search < Duration::from_secs(5),
        "the search took {search:?}"
    );
    assert!(b.errors.is_empty(), "JavaScript errors: {:?}", b.errors);
}
