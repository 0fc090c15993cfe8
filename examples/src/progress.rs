//! An axum web app whose page starts a group of tasks on a button press and shows a progress
//! bar, polling the group's progress by `fetch` until every task is done: the Ajax pattern of
//! Celery's old Django status view, done with axum.
//!
//! The app's own routes are `/` (the page) and `POST /start` (sends the group); the routes of
//! [`Web::api_router`](celeriac::web::Web::api_router) are merged in, so the page polls
//! `GET /api/groups/<id>` and links each task to Celery's status view
//! `GET /celery/<id>/status/`.
//!
//! ```text
//! progress [--broker URL] [--bind 127.0.0.1:8000] [--no-worker]
//! ```
//!
//! It runs a worker in the same process unless `--no-worker` is given (then run `tasks
//! worker` on the same broker). The default broker is the embedded SQLite one
//! (`sqlite://progress.db`).

use std::process::ExitCode;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use celeriac::App;
use serde_json::{Value, json};

/// Most tasks one press may start.
pub const MAX_TASKS: u64 = 100;

/// The app's router: the page, `POST /start`, and celeriac's status view and API.
pub fn router(app: App) -> Router {
    let web = app.web();
    Router::new()
        .route("/", get(page))
        .route("/start", post(start))
        .with_state(app)
        .merge(web.api_router())
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// Sends a group of `n` `tasks.sleep` calls (0.2 to 1.2 s each); answers the group id.
///
/// Body: `{"n": 10}` (1 to [`MAX_TASKS`]; default 10). Like celeriac's own API, it wants the
/// JSON content type, which a cross-site form cannot send.
async fn start(State(app): State<App>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json",
        );
    }
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
        }
    };
    let n = match body.get("n") {
        None | Some(Value::Null) => 10,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TASKS).contains(&n) => n,
            _ => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("n must be a whole number from 1 to {MAX_TASKS}"),
                );
            }
        },
    };
    let members = (0..n).map(|i| crate::sleep::s(0.2 + (i % 6) as f64 * 0.2));
    match celeriac::canvas::group(members).apply_async(&app).await {
        Ok(g) => (
            StatusCode::ACCEPTED,
            Json(json!({"group_id": g.id(), "total": n})),
        )
            .into_response(),
        Err(e) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot send the group: {e:#}"),
        ),
    }
}

/// The `progress` example binary: see the [module docs](self).
pub fn progress_main() -> ExitCode {
    let mut broker = None;
    let mut bind = "127.0.0.1:8000".to_owned();
    let mut worker = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--broker" => broker = args.next(),
            "--bind" => match args.next() {
                Some(b) => bind = b,
                None => return usage(),
            },
            "--no-worker" => worker = false,
            _ => return usage(),
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("progress: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut builder = crate::app();
        builder = builder.broker_url(broker.as_deref().unwrap_or("sqlite://progress.db"));
        let app = match builder.build().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("progress: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if worker {
            let mut o = app.worker_options();
            o.concurrency = 4;
            o.heartbeat_interval = Duration::from_secs(2);
            tokio::spawn(app.worker(o).run());
        }
        let listener = match tokio::net::TcpListener::bind(&bind).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("progress: cannot listen on {bind}: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!("progress: open http://{bind}/ and press the button");
        match axum::serve(listener, router(app)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("progress: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn usage() -> ExitCode {
    eprintln!("usage: progress [--broker URL] [--bind 127.0.0.1:8000] [--no-worker]");
    ExitCode::from(2)
}

/// The page: a button, a progress bar, one square per task. Plain HTML and JavaScript.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>celeriac progress bar</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 44em; margin: 3em auto; color: #1d2327; }
  progress { width: 100%; height: 1.6em; }
  #tasks { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 1em; }
  #tasks a { width: 1.4em; height: 1.4em; background: #ddd; display: block; }
  #tasks a.SUCCESS { background: #4caf50; } #tasks a.FAILURE, #tasks a.REVOKED { background: #e53935; }
  #tasks a.STARTED { background: #90caf9; }
  .error { color: #c62828; }
</style>
</head>
<body>
<h1>Crunching numbers</h1>
<p>Starts a group of tasks on the worker and follows it with <code>fetch</code> every 300 ms.</p>
<p><label>Tasks <input id="n" type="number" min="1" max="100" value="10"></label>
   <button id="start">Start</button></p>
<progress id="bar" max="100" value="0"></progress>
<p><span id="percent">0 %</span> <span id="detail"></span></p>
<div id="tasks"></div>
<p id="error" class="error"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function json(r) {
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function follow(groupId) {
  for (;;) {
    const g = await json(await fetch(`/api/groups/${encodeURIComponent(groupId)}`));
    const percent = Math.floor(g.progress * 100);
    $("bar").value = percent;
    $("percent").textContent = `${percent} %`;
    $("detail").textContent = `${g.completed} of ${g.total} done${g.failed ? `, ${g.failed} failed` : ""}`;
    $("tasks").innerHTML = g.tasks.map((t) =>
      `<a class="${t.state}" title="${t.state}" href="/celery/${encodeURIComponent(t.id)}/status/"></a>`).join("");
    if (g.ready) return g;
    await new Promise((done) => setTimeout(done, 300));
  }
}

$("start").onclick = async () => {
  $("start").disabled = true;
  $("error").textContent = "";
  try {
    const r = await fetch("/start", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Requested-With": "fetch" },
      body: JSON.stringify({ n: Number($("n").value) }),
    });
    const { group_id } = await json(r);
    document.body.dataset.group = group_id;
    await follow(group_id);
    document.body.dataset.done = "yes";
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("start").disabled = false;
  }
};
</script>
</body>
</html>
"##;
