//! The axum progress-bar example in a real headless Chromium: the button starts a group of
//! tasks, the page polls the group by `fetch`, and the bar reaches 100 % while a worker runs
//! them in this process on the embedded SQLite broker. Skipped with a notice when no Chromium
//! can be run, unless `CELERIAC_REQUIRE_SERVICES=1`.

#[path = "../../crates/celeriac-web/tests/cdp/mod.rs"]
mod cdp;

use std::time::Duration;

use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_button_starts_a_group_and_the_bar_reaches_100_percent() {
    let Some(mut b) = cdp::Browser::launch().await else {
        return;
    };
    let db = celeriac_test::services::temp_sqlite_path("progress-example");
    let app = celeriac_examples::app()
        .broker_url(format!("sqlite://{}", db.display()))
        .build()
        .await
        .expect("app");
    let mut o = app.worker_options();
    o.concurrency = 4;
    let worker = app.worker(o);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = celeriac_examples::progress::router(app.clone());
    tokio::spawn(async move {
        let _ = axum_serve(listener, router).await;
    });

    b.goto(&format!("{base}/")).await;
    assert_eq!(
        b.eval("document.getElementById('percent').textContent")
            .await,
        json!("0 %")
    );
    // Record every percentage the page shows, to see the bar move rather than jump.
    b.eval(
        "window.seen = []; new MutationObserver(() => window.seen.push(document.getElementById('percent').textContent))
           .observe(document.getElementById('percent'), {childList: true, characterData: true, subtree: true})",
    )
    .await;
    b.eval("document.getElementById('n').value = '12'").await;
    b.click("#start").await;
    b.wait_for(
        "document.body.dataset.done === 'yes' && document.getElementById('bar').value === 100",
        T,
    )
    .await;
    assert_eq!(
        b.eval("document.getElementById('percent').textContent")
            .await,
        json!("100 %")
    );
    assert_eq!(
        b.eval("document.getElementById('detail').textContent")
            .await,
        json!("12 of 12 done")
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#tasks a.SUCCESS').length")
            .await,
        json!(12)
    );
    let seen = b.eval("[...new Set(window.seen)]").await;
    let steps = seen.as_array().map_or(0, Vec::len);
    assert!(steps >= 3, "the bar moved in steps, not at once: {seen}");

    // The group really ran: its results, in order, from the backend.
    let group = b.eval("document.body.dataset.group").await;
    let group = group.as_str().expect("the group id");
    let g = celeriac::canvas::GroupResult::<f64>::restore(&app, group)
        .await
        .unwrap()
        .expect("the group is saved");
    let slept = g.join(Some(T)).await.unwrap();
    assert_eq!(slept.len(), 12);
    assert!((slept[1] - 0.4).abs() < 1e-9, "{slept:?}");

    // A task's square links to Celery's status view, which answers SUCCESS.
    let status = b
        .eval("fetch(document.querySelector('#tasks a').getAttribute('href')).then(r => r.json())")
        .await;
    assert_eq!(status["task"]["status"], json!("SUCCESS"), "{status}");

    // Bad input is a JSON 400, not a panic.
    let bad = b
        .eval("fetch('/start', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{\"n\": 0}'}).then(r => r.status)")
        .await;
    assert_eq!(bad, json!(400));
    assert!(b.errors.is_empty(), "JavaScript errors: {:?}", b.errors);
    stop.warm();
    let _ = tokio::time::timeout(T, running).await;
}

async fn axum_serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
) -> std::io::Result<()> {
    axum::serve(listener, router).await
}
