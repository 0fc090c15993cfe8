//! The web server over real HTTP: every endpoint, its errors, and its guards, with a worker
//! running in the process on the in-memory drivers (SQLite for one test).

use std::time::{Duration, Instant};

use celeriac::web::{Auth, Web, WebOptions};
use celeriac::{App, Signature, TaskError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

#[celeriac::task(name = "tasks.add")]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[celeriac::task(name = "tasks.boom")]
async fn boom() -> Result<i64, TaskError> {
    Err(TaskError::new("ValueError", "boom"))
}

/// An app, a worker with task events on, and the web server on a loopback port.
struct Site {
    app: App,
    addr: std::net::SocketAddr,
    web: Web,
    stop: celeriac::worker::ShutdownHandle,
    _server: tokio::task::JoinHandle<()>,
}

async fn site_with(url: &str, options: WebOptions) -> Site {
    let app = App::builder()
        .broker_url(url)
        .task::<add>()
        .task::<boom>()
        .build()
        .await
        .expect("app");
    let mut o = app.worker_options();
    o.concurrency = 2;
    o.task_events = true;
    o.hostname = "w1@test".into();
    o.heartbeat_interval = Duration::from_millis(500);
    let worker = app.worker(o);
    let stop = worker.shutdown_handle();
    tokio::spawn(worker.run());
    let store = celeriac::default_drivers()
        .open_beat_store(app.config().broker_url(), app.config())
        .await
        .expect("beat store");
    let beat = celeriac::beat::Control::new(store, Vec::new());
    let mut spec = celeriac::beat::EntrySpec::new("tasks.add");
    spec.every = Some(3600.0);
    spec.args = vec![json!(1), json!(2)];
    beat.add("hourly", &spec).await.expect("add a beat entry");
    let web = app.web().beat(beat).options(options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = web.clone();
    let server = tokio::spawn(async move {
        let _ = serving.serve(listener).await;
    });
    Site {
        app,
        addr,
        web,
        stop,
        _server: server,
    }
}

async fn site() -> Site {
    site_with("memory://", WebOptions::default()).await
}

/// A response: status, headers (lowercase names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
    {
        unchunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

async fn get(site: &Site, path: &str) -> Reply {
    http(site.addr, "GET", path, &[], "").await
}

async fn post(site: &Site, path: &str, body: Value) -> Reply {
    http(site.addr, "POST", path, &[JSON], &body.to_string()).await
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_view_answers_as_celerys_did() {
    let s = site().await;
    let r = get(&s, "/celery/no-such-id/status/").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["task"],
        json!({"id": "no-such-id", "status": "PENDING", "result": null, "date_done": null, "children": [], "retries": 0})
    );

    let ok = add::delay(&s.app, 2, 3).await.unwrap();
    ok.get_timeout(T).await.unwrap();
    let r = get(&s, &format!("/celery/{}/status/", ok.id())).await;
    let task = &r.json()["task"];
    assert_eq!(
        (task["status"].clone(), task["result"].clone()),
        (json!("SUCCESS"), json!(5))
    );
    assert!(task["date_done"].is_string());
    // Without the trailing slash too.
    assert_eq!(
        get(&s, &format!("/celery/{}/status", ok.id())).await.status,
        200
    );

    let failed = boom::delay(&s.app).await.unwrap();
    let _ = failed.get_timeout(T).await;
    let task = get(&s, &format!("/celery/{}/status/", failed.id()))
        .await
        .json()["task"]
        .clone();
    assert_eq!(task["status"], json!("FAILURE"));
    assert_eq!(task["result"], json!("ValueError('boom')"));
    assert_eq!(task["exc"], json!("builtins.ValueError"));
    assert!(
        task["traceback"].as_str().is_some_and(|t| !t.is_empty()),
        "{task}"
    );
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_sent_read_listed_and_revoked() {
    let s = site().await;
    let r = post(&s, "/api/tasks/tasks.add", json!({"args": [20, 22]})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["task_id"].as_str().unwrap().to_owned();
    assert_eq!(s.app.result::<i64>(&id).get_timeout(T).await.unwrap(), 42);

    // Events reach the list (the worker sends them with task_events on).
    wait_for("the task in the list", async || {
        let list = get(&s, "/api/tasks?state=SUCCESS").await.json();
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == json!(id))
    })
    .await;
    let one = get(&s, &format!("/api/tasks/{id}")).await.json();
    assert_eq!(one["state"], json!("SUCCESS"));
    assert_eq!(one["result"], json!("42"));
    assert_eq!(one["name"], json!("tasks.add"));
    assert_eq!(one["worker"], json!("w1@test"));
    let by_name = get(&s, "/api/tasks?name=tasks.add&search=20").await.json();
    assert_eq!(by_name["tasks"].as_array().unwrap().len(), 1, "{by_name}");
    assert_eq!(get(&s, "/api/tasks/never-seen").await.status, 404);

    // A delayed task, revoked before it runs.
    let r = post(
        &s,
        "/api/tasks/tasks.add",
        json!({"args": [1, 1], "options": {"countdown": 60}}),
    )
    .await;
    let later = r.json()["task_id"].as_str().unwrap().to_owned();
    let r = post(&s, &format!("/api/tasks/{later}/revoke"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["stored"], json!(true));
    let status = get(&s, &format!("/celery/{later}/status/")).await.json();
    assert_eq!(status["task"]["status"], json!("REVOKED"));

    // An unknown name is sent anyway (a Python worker may know it) and fails there.
    let r = post(&s, "/api/tasks/tasks.nope", json!({})).await;
    let nope = r.json()["task_id"].as_str().unwrap().to_owned();
    let meta = s
        .app
        .result::<Value>(&nope)
        .wait_meta(Some(T))
        .await
        .unwrap();
    assert!(
        meta.result.to_string().contains("NotRegistered"),
        "{:?}",
        meta.result
    );
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_json_400_and_never_a_panic() {
    let s = site().await;
    for (path, body, want) in [
        ("/api/tasks/tasks.add", "{not json", "not valid JSON"),
        ("/api/tasks/tasks.add", "[1, 2]", "must be a JSON object"),
        (
            "/api/tasks/tasks.add",
            r#"{"args": 5}"#,
            "args must be a JSON array",
        ),
        (
            "/api/tasks/tasks.add",
            r#"{"kwargs": []}"#,
            "kwargs must be a JSON object",
        ),
        ("/api/tasks/tasks.add", r#"{"arg": []}"#, "unknown field"),
        (
            "/api/tasks/tasks.add",
            r#"{"options": {"countdown": "soon"}}"#,
            "countdown",
        ),
        (
            "/api/tasks/tasks.add",
            r#"{"options": {"countdown": 1e300}}"#,
            "countdown",
        ),
        (
            "/api/tasks/some-id/revoke",
            r#"{"terminate": "yes"}"#,
            "terminate",
        ),
        (
            "/api/tasks/some-id/revoke",
            r#"{"signal": "SIGNOPE"}"#,
            "SIGNOPE",
        ),
        ("/api/control/drop_tables", "{}", "unknown control command"),
        (
            "/api/control/rate_limit",
            r#"{"destination": "w1"}"#,
            "destination",
        ),
        ("/api/dead/celery/requeue", r#"{"ids": [1]}"#, "ids"),
        ("/api/beat/nope/explode", "{}", "no beat entry"),
    ] {
        let r = http(s.addr, "POST", path, &[JSON], body).await;
        assert!(
            matches!(r.status, 400 | 404),
            "{path} {body}: {} {}",
            r.status,
            r.body
        );
        let e = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(e.contains(want), "{path} {body}: {e}");
    }
    let r = get(&s, "/api/tasks?limit=many").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());
    let r = get(&s, "/api/nothing-here").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("no such endpoint"))
    );
    assert_eq!(get(&s, "/api/groups/no-such-group").await.status, 404);
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_show_their_progress() {
    let s = site().await;
    let g = celeriac::canvas::group((0..4).map(|i| add::s(i, 1)))
        .apply_async(&s.app)
        .await
        .unwrap();
    g.join(Some(T)).await.unwrap();
    let r = get(&s, &format!("/api/groups/{}", g.id())).await.json();
    assert_eq!(
        (
            r["total"].clone(),
            r["completed"].clone(),
            r["failed"].clone()
        ),
        (json!(4), json!(4), json!(0))
    );
    assert_eq!(r["progress"], json!(1.0));
    assert_eq!(r["ready"], json!(true));
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_queues_control_and_the_stream() {
    let s = site().await;
    wait_for("the worker online", async || {
        get(&s, "/api/workers").await.json()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["hostname"] == json!("w1@test") && w["online"] == json!(true))
    })
    .await;
    let refreshed = get(&s, "/api/workers?refresh=1").await.json();
    let w = &refreshed["workers"][0];
    assert!(w["registered"].to_string().contains("tasks.add"), "{w}");
    assert!(w["active_queues"].to_string().contains("celery"), "{w}");

    let r = post(
        &s,
        "/api/control/rate_limit",
        json!({"arguments": {"task_name": "tasks.add", "rate_limit": "100/s"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["replies"]["w1@test"]
            .to_string()
            .contains("new rate limit"),
        "{}",
        r.body
    );
    let r = post(&s, "/api/control/ping", json!({"destination": ["w1@test"]})).await;
    assert_eq!(r.json()["replies"]["w1@test"], json!({"ok": "pong"}));

    // Queues: a delayed message counts, and a purge empties the ready ones.
    s.app.broker().declare("idle").await.unwrap();
    Signature::<i64>::new("tasks.add")
        .args_json(vec![json!(1), json!(1)])
        .queue("idle")
        .apply_async(&s.app)
        .await
        .unwrap();
    let q = get(&s, "/api/queues").await.json();
    let idle = q["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == json!("idle"))
        .cloned()
        .unwrap();
    assert_eq!(idle["ready"], json!(1));
    let r = post(&s, "/api/queues/idle/purge", json!({})).await;
    assert_eq!(r.json()["purged"], json!(1));

    // The stream sends ticks.
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(format!("GET /api/stream HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes())
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    while !seen.contains("event: tick") {
        assert!(Instant::now() < deadline, "no tick: {seen}");
        let n = tokio::time::timeout(T, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("\"workers\""), "{seen}");
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_and_purged() {
    let s = site().await;
    let mut m = celeriac::core::protocol::Message::new(
        celeriac::core::protocol::Headers::new("tasks.add", celeriac::core::protocol::new_id()),
        &celeriac::core::protocol::Body::new(vec![json!(1), json!(2)], Default::default()),
        celeriac::core::ContentType::Json,
    )
    .unwrap();
    m.content_type = "application/x-python-serialize".into();
    s.app.broker().declare("celery").await.unwrap();
    s.app
        .broker()
        .publish("celery", &m, Default::default())
        .await
        .unwrap();
    wait_for("a dead letter", async || {
        get(&s, "/api/dead").await.json()["queues"]
            .to_string()
            .contains("\"count\":1")
    })
    .await;
    let list = get(&s, "/api/dead/celery").await.json();
    let letter = &list["letters"][0];
    assert_eq!(letter["id"], json!(m.id()));
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .starts_with("DecodeError"),
        "{letter}"
    );
    assert_eq!(
        get(&s, "/api/queues").await.json()["queues"][0]["dead"],
        json!(1)
    );
    let r = post(&s, "/api/dead/celery/requeue", json!({"ids": [m.id()]})).await;
    assert_eq!(r.json()["requeued"], json!(1), "{}", r.body);
    // It fails again (pickle is refused) and comes back; then it is purged.
    wait_for("back in the dead letters", async || {
        get(&s, "/api/dead").await.json()["queues"]
            .to_string()
            .contains("\"count\":1")
    })
    .await;
    let r = post(&s, "/api/dead/celery.dead/purge", json!({})).await;
    assert_eq!(r.json()["purged"], json!(1), "{}", r.body);
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_entries_are_listed_paused_and_triggered() {
    let s = site().await;
    let entry = async || get(&s, "/api/beat").await.json()["entries"][0].clone();
    let e = entry().await;
    assert_eq!(
        (e["name"].clone(), e["task"].clone(), e["paused"].clone()),
        (json!("hourly"), json!("tasks.add"), json!(false))
    );
    assert!(e["schedule"].as_str().unwrap().contains("3600"), "{e}");
    assert_eq!(
        post(&s, "/api/beat/hourly/pause", json!({})).await.status,
        200
    );
    assert_eq!(entry().await["paused"], json!(true));
    assert_eq!(
        post(&s, "/api/beat/hourly/resume", json!({})).await.status,
        200
    );
    assert_eq!(entry().await["paused"], json!(false));
    let r = post(&s, "/api/beat/hourly/trigger", json!({})).await;
    assert_eq!(r.json(), json!({"name": "hourly", "done": "trigger"}));
    let r = post(&s, "/api/beat/hourly/explode", json!({})).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        post(&s, "/api/beat/nightly/pause", json!({})).await.status,
        404
    );
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_tasks() {
    let s = site().await;
    for i in 0..3 {
        add::delay(&s.app, i, 1)
            .await
            .unwrap()
            .get_timeout(T)
            .await
            .unwrap();
    }
    let _ = boom::delay(&s.app).await.unwrap().get_timeout(T).await;
    let sample = |text: &str, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("prometheus text");
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    };
    wait_for("the events counted", async || {
        let text = get(&s, "/metrics").await.body;
        sample(
            &text,
            "celeriac_tasks_total",
            &[("name", "tasks.add"), ("state", "SUCCESS")],
        ) == Some(3.0)
            && sample(
                &text,
                "celeriac_tasks_total",
                &[("name", "tasks.boom"), ("state", "FAILURE")],
            ) == Some(1.0)
            && sample(&text, "celeriac_workers_up", &[]) == Some(1.0)
    })
    .await;
    let r = get(&s, "/metrics").await;
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.body;
    assert_eq!(sample(&text, "celeriac_workers_up", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "celeriac_worker_up", &[("hostname", "w1@test")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "celeriac_task_runtime_seconds",
            &[("name", "tasks.add")]
        ),
        Some(3.0),
        "{text}"
    );
    assert!(sample(&text, "celeriac_events_total", &[]).unwrap() >= 8.0);
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_read_only_and_cross_site_requests_are_refused() {
    let mut o = WebOptions::default();
    o.auth = Some(Auth::basic("ops:pw").unwrap());
    let s = site_with("memory://", o).await;
    let r = get(&s, "/api/stats").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"celeriac\"")
    );
    assert_eq!(get(&s, "/healthz").await.json()["ok"], json!(true));
    let good = ("Authorization", "Basic b3BzOnB3"); // ops:pw
    assert_eq!(
        http(s.addr, "GET", "/api/stats", &[good], "").await.status,
        200
    );
    assert_eq!(
        http(
            s.addr,
            "GET",
            "/api/stats",
            &[("Authorization", "Basic b3BzOnB4")],
            ""
        )
        .await
        .status,
        401
    );
    assert_eq!(http(s.addr, "GET", "/metrics", &[], "").await.status, 401);
    // A form post from another site: refused.
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let r = http(
        s.addr,
        "POST",
        "/api/tasks/tasks.add",
        &[good, form],
        "args=1",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(
        s.addr,
        "POST",
        "/api/tasks/tasks.add",
        &[good, JSON, ("Origin", "http://evil.example")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(
        s.addr,
        "POST",
        "/api/tasks/tasks.add",
        &[good, JSON],
        r#"{"args": [1, 2]}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.stop.warm();

    let mut o = WebOptions::default();
    o.read_only = true;
    let s = site_with("memory://", o).await;
    let r = post(&s, "/api/tasks/tasks.add", json!({"args": [1, 2]})).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, json!("this server is read-only"))
    );
    assert_eq!(get(&s, "/api/queues").await.status, 200);
    assert!(get(&s, "/").await.body.contains("celeriac"));
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_its_assets_are_served_from_the_binary() {
    let s = site().await;
    let page = get(&s, "/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.body.contains("\"/assets/app.js\""));
    let js = get(&s, "/assets/app.js").await;
    assert!(
        js.header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.body.contains("EventSource"));
    let info = get(&s, "/api/info").await.json();
    assert_eq!(
        (
            info["read_only"].clone(),
            info["broker"].clone(),
            info["events"].clone()
        ),
        (json!(false), json!("memory"), json!(true)),
        "{info}"
    );
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no outside asset"
    );
    assert_eq!(
        get(&s, "/healthz").await.json(),
        json!({"ok": true, "broker": "ok", "backend": "ok"})
    );
    drop(s.web);
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_sqlite_default_serves_the_same_api() {
    let path = celeriac_test::services::temp_sqlite_path("web-sqlite");
    let s = site_with(
        &format!("sqlite://{}", path.display()),
        WebOptions::default(),
    )
    .await;
    let r = post(&s, "/api/tasks/tasks.add", json!({"args": [2, 2]})).await;
    let id = r.json()["task_id"].as_str().unwrap().to_owned();
    assert_eq!(s.app.result::<i64>(&id).get_timeout(T).await.unwrap(), 4);
    wait_for(
        "the worker and the task seen through sqlite's events",
        async || {
            let w = get(&s, "/api/workers").await.json();
            let t = get(&s, &format!("/api/tasks/{id}")).await.json();
            w["workers"].to_string().contains("w1@test") && t["events"]["state"] == json!("SUCCESS")
        },
    )
    .await;
    s.stop.warm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_nested_under_a_prefix() {
    let app = App::builder()
        .broker_url("memory://")
        .task::<add>()
        .build()
        .await
        .expect("app");
    let web = app.web();
    let _running = web.start();
    let router = axum::Router::new().nest("/ops", web.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    // The page at the prefix asks for its assets under it (the script finds the API there).
    let page = http(addr, "GET", "/ops", &[], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("\"/ops/assets/app.js\""),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("\"/ops/assets/style.css\""),
        "{}",
        page.body
    );
    for path in [
        "/ops/assets/app.js",
        "/ops/assets/style.css",
        "/ops/api/info",
    ] {
        assert_eq!(http(addr, "GET", path, &[], "").await.status, 200, "{path}");
    }
}
