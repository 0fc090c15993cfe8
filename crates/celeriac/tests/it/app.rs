//! The app on the in-memory drivers: what goes on the wire, routing, results.

use std::time::Duration;

use celeriac::core::memory::MemoryBroker;
use celeriac::core::{Broker, ConsumeOptions};
use celeriac::{App, ErrorKind, TaskContext, TaskError, TaskState};
use serde_json::json;

#[celeriac::task(
    name = "tasks.add",
    queue = "math",
    priority = 3,
    time_limit = 30,
    soft_time_limit = 20.5
)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[celeriac::task(name = "tasks.who")]
fn who(ctx: &TaskContext, greeting: Option<String>) -> String {
    let tenant = ctx
        .headers()
        .extra
        .get("tenant")
        .and_then(|t| t.as_str())
        .unwrap_or("nobody")
        .to_owned();
    format!(
        "{} {tenant} from {}",
        greeting.unwrap_or_else(|| "hi".into()),
        ctx.queue()
    )
}

#[celeriac::task(name = "tasks.parse")]
fn parse(text: String) -> Result<i64, TaskError> {
    Ok(text.trim().parse::<i64>()?)
}

async fn app_with(broker: MemoryBroker) -> App {
    App::builder()
        .broker(std::sync::Arc::new(broker))
        .result_backend("memory://")
        .task::<add>()
        .task::<who>()
        .task::<parse>()
        .route("tasks.w*", "people")
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn messages_carry_celery_headers_and_task_options() {
    let broker = MemoryBroker::new();
    let app = app_with(broker.clone()).await;
    let r = add::s(2, 3)
        .countdown(Duration::from_secs(60))
        .expires_in(Duration::from_secs(120))
        .apply_async(&app)
        .await
        .unwrap();
    let stats = broker.stats("math").await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed),
        (0, 1),
        "a countdown is stored delayed in the broker, in the task's queue"
    );

    app.send_task("tasks.add", vec![json!(1), json!(1)], Default::default())
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&["math".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let m = d.message.as_ref().unwrap();
    assert_eq!(m.headers.task, "tasks.add");
    assert_eq!(m.headers.root_id.as_deref(), Some(m.headers.id.as_str()));
    assert_eq!(m.headers.timelimit.hard, Some(30.0));
    assert_eq!(m.headers.timelimit.soft, Some(20.5));
    assert_eq!(m.properties.priority, Some(3));
    assert_eq!(m.properties.correlation_id, m.headers.id);
    assert_eq!(m.headers.argsrepr.as_deref(), Some("[1,1]"));
    assert!(m.headers.origin.as_deref().unwrap().starts_with("gen"));
    let body = m.decode_body().unwrap();
    assert_eq!(body.args, vec![json!(1), json!(1)]);
    assert_ne!(r.id(), m.headers.id);
}

#[tokio::test]
async fn routes_and_default_queue() {
    let broker = MemoryBroker::new();
    let app = app_with(broker.clone()).await;
    who::delay(&app, None).await.unwrap();
    parse::delay(&app, "1".into()).await.unwrap();
    add::s(1, 1)
        .queue("elsewhere")
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(
        broker.stats("people").await.unwrap().ready,
        1,
        "route by glob"
    );
    assert_eq!(
        broker.stats("celery").await.unwrap().ready,
        1,
        "default queue"
    );
    assert_eq!(
        broker.stats("elsewhere").await.unwrap().ready,
        1,
        "explicit queue wins"
    );
    assert_eq!(
        app.queue_for("tasks.add", &<add as celeriac::__private::Task>::options()),
        "math"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_worker_runs_typed_tasks() {
    let broker = MemoryBroker::new();
    let app = app_with(broker).await;
    let mut options = app.worker_options();
    options.queues = vec!["celery".into(), "math".into(), "people".into()];
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let t = Duration::from_secs(10);
    assert_eq!(
        add::delay(&app, 40, 2)
            .await
            .unwrap()
            .get_timeout(t)
            .await
            .unwrap(),
        42
    );
    let greeting = who::s(Some("hello".into()))
        .header("tenant", "acme")
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(
        greeting.get_timeout(t).await.unwrap(),
        "hello acme from people"
    );
    let kw = app
        .send_task(
            "tasks.who",
            vec![],
            serde_json::from_value(json!({"greeting": "yo"})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        kw.get_timeout(t).await.unwrap(),
        json!("yo nobody from people")
    );

    let bad = parse::delay(&app, "x".into()).await.unwrap();
    let e = bad.get_timeout(t).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TaskFailed);
    assert_eq!(e.remote().unwrap().exc_type, "ParseIntError");
    assert_eq!(bad.state().await.unwrap(), TaskState::Failure);

    // A result read as the wrong type is a clear protocol error, not a panic.
    let wrong = app.result::<Vec<String>>(add::delay(&app, 1, 1).await.unwrap().id());
    assert_eq!(
        wrong.get_timeout(t).await.unwrap_err().kind(),
        ErrorKind::Protocol
    );

    // Waiting on an id nobody sent times out.
    let never = app.result::<i64>("no-such-id");
    assert_eq!(
        never
            .get_timeout(Duration::from_millis(50))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout
    );

    stop.warm();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn config_errors_are_clear() {
    let e = App::builder()
        .broker_url("nosuch://x")
        .build()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("known: memory, sqlite"), "{e}");
    let e = App::builder()
        .broker_url("sqlite:///nonexistent-dir/sub/x.db")
        .build()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("nonexistent-dir") || std::error::Error::source(&e).is_some(),
        "{e}"
    );
}

/// `serializer = "auth"` either loads its keys or fails the build, saying what is missing.
/// See: issue 26
#[tokio::test]
async fn serializer_auth_fails_the_build_without_its_feature_or_its_keys() {
    let mut config = celeriac::Config::default();
    config.serializer = celeriac::ContentType::Auth;
    let e = App::builder()
        .config(config.clone())
        .broker(std::sync::Arc::new(MemoryBroker::new()))
        .result_backend("memory://")
        .build()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let want = if cfg!(feature = "security") {
        "serializer \"auth\" needs security_key"
    } else {
        "needs celeriac's `security` feature"
    };
    assert!(e.to_string().contains(want), "{e}");
}

#[tokio::test]
async fn unencodable_arguments_fail_at_send() {
    let app = app_with(MemoryBroker::new()).await;
    let mut map = std::collections::HashMap::new();
    map.insert((1, 2), "tuple keys are not json");
    let e = celeriac::Signature::<()>::new("tasks.x")
        .arg(map)
        .apply_async(&app)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.to_string().contains("cannot encode argument 0"), "{e}");
}

#[tokio::test]
async fn collect_tasks_finds_every_task_linked_into_the_binary() {
    let app = App::builder()
        .broker_url("memory://")
        .collect_tasks()
        .build()
        .await
        .unwrap();
    let names = app.registry().names();
    for name in ["tasks.add", "tasks.who", "tasks.parse"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

#[tokio::test]
async fn queues_served_by_celery_workers_get_the_eta_in_the_header_only() {
    let broker = MemoryBroker::new();
    let mut config = celeriac::Config::default();
    config.celery_worker_queues = vec!["py".into()];
    let app = App::builder()
        .config(config)
        .broker(std::sync::Arc::new(broker.clone()))
        .result_backend("memory://")
        .build()
        .await
        .unwrap();
    let sig = |q: &str| {
        celeriac::Signature::<i64>::new("tasks.add")
            .arg(1)
            .arg(2)
            .countdown(Duration::from_secs(600))
            .queue(q)
    };
    sig("py").apply_async(&app).await.unwrap();
    sig("ours").apply_async(&app).await.unwrap();
    let py = broker.stats("py").await.unwrap();
    assert_eq!(
        (py.ready, py.delayed),
        (1, 0),
        "published at once for Python workers"
    );
    let ours = broker.stats("ours").await.unwrap();
    assert_eq!(
        (ours.ready, ours.delayed),
        (0, 1),
        "held by the broker otherwise"
    );
    let mut consumer = broker
        .consume(&["py".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        d.message.as_ref().unwrap().headers.eta.is_some(),
        "the eta travels in the header"
    );
}

/// `App::control` and `App::events` on the memory broker: a worker answers, its events and
/// the client's `task-sent` (with `task_send_sent_event`) arrive as typed events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_events_from_the_app() {
    use celeriac::core::broadcast::event::EventKind;

    #[celeriac::task(name = "tasks.twice")]
    fn twice(x: i64) -> i64 {
        x * 2
    }

    let mut config = celeriac::Config::default();
    config.task_send_sent_event = true;
    let app = celeriac::App::builder()
        .config(config)
        .broker_url("memory://")
        .task::<twice>()
        .build()
        .await
        .unwrap();
    let mut events = app.events().await.unwrap();
    let mut options = app.worker_options();
    options.hostname = "w@app".into();
    options.task_events = true;
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pongs = app.control().inspect().ping().await.unwrap();
        if pongs.contains_key("w@app") {
            assert_eq!(pongs["w@app"], serde_json::json!({"ok": "pong"}));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no pong");
    }
    let limited = app
        .control()
        .destination(["w@app"])
        .rate_limit("tasks.twice", "5/s")
        .await
        .unwrap();
    assert_eq!(
        limited["w@app"],
        serde_json::json!({"ok": "new rate limit set successfully"})
    );
    let r = twice::delay(&app, 21).await.unwrap();
    assert_eq!(
        r.get_timeout(std::time::Duration::from_secs(10))
            .await
            .unwrap(),
        42
    );
    let mut kinds = Vec::new();
    while !kinds.contains(&EventKind::TaskSucceeded) {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("events in time")
            .unwrap()
            .unwrap();
        if e.uuid() == Some(r.id()) {
            if e.kind() == EventKind::TaskSent {
                assert_eq!(e.get("name").unwrap(), "tasks.twice");
                assert!(e.hostname().starts_with("gen"), "{}", e.hostname());
            }
            kinds.push(e.kind());
        }
    }
    assert_eq!(
        kinds,
        [
            EventKind::TaskSent,
            EventKind::TaskReceived,
            EventKind::TaskStarted,
            EventKind::TaskSucceeded
        ]
    );
    stop.warm();
    running.await.unwrap().unwrap();
}

#[celeriac::task(name = "tasks.sync_account", unique_for = 60)]
async fn sync_account(account: i64) -> i64 {
    account
}

/// A unique task: while one call is pending, equal sends return its id and queue nothing;
/// another argument is another call; once it ran, the next send queues again.
/// See: issue 28
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_task_is_queued_once_while_pending() {
    let broker = MemoryBroker::new();
    let app = App::builder()
        .broker(std::sync::Arc::new(broker.clone()))
        .result_backend("memory://")
        .task::<sync_account>()
        .build()
        .await
        .unwrap();
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let app = app.clone();
        sends.spawn(async move { sync_account::delay(&app, 42).await.unwrap().id().to_owned() });
    }
    let ids = sends.join_all().await;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(broker.stats("celery").await.unwrap().ready, 1);
    let other = sync_account::delay(&app, 43).await.unwrap();
    assert_ne!(other.id(), ids[0]);
    assert_eq!(broker.stats("celery").await.unwrap().ready, 2);

    let worker = app.worker(app.worker_options());
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let t = Duration::from_secs(10);
    assert_eq!(
        app.result::<i64>(ids[0].clone())
            .get_timeout(t)
            .await
            .unwrap(),
        42
    );
    let again = sync_account::delay(&app, 42).await.unwrap();
    assert_ne!(again.id(), ids[0], "released when it ended");
    assert_eq!(again.get_timeout(t).await.unwrap(), 42);
    stop.warm();
    running.await.unwrap().unwrap();
}

#[celeriac::task(name = "tasks.charge", unique_for = 60, unique_raise = true)]
async fn charge(order: i64) -> i64 {
    order
}

/// With `unique_raise`, a duplicate send is an error naming the pending call.
/// See: issue 28
#[tokio::test]
async fn a_unique_task_with_unique_raise_refuses_a_duplicate() {
    let broker = MemoryBroker::new();
    let app = App::builder()
        .broker(std::sync::Arc::new(broker.clone()))
        .result_backend("memory://")
        .task::<charge>()
        .build()
        .await
        .unwrap();
    let first = charge::delay(&app, 7).await.unwrap();
    let e = charge::delay(&app, 7).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Duplicate);
    assert!(e.to_string().contains(first.id()), "{e}");
    assert_eq!(broker.stats("celery").await.unwrap().ready, 1);
}

#[celeriac::task(name = "tasks.refresh")]
async fn refresh(account: i64) -> i64 {
    account
}

/// `[task_annotations]` in the configuration changes a task's options where the app and its
/// workers read them: a task without `unique_for` of its own becomes unique.
/// See: issue 28
#[tokio::test]
async fn task_annotations_from_the_config_apply_to_the_apps_tasks() {
    let text = "[task_annotations.\"tasks.*\"]\nunique_for = 60\nrate_limit = \"5/s\"\n\
                rate_limit_scope = \"cluster\"\n";
    let config =
        celeriac::Config::from_sources(Some((std::path::Path::new("t.toml"), text)), |_| None)
            .unwrap();
    let broker = MemoryBroker::new();
    let app = App::builder()
        .config(config)
        .broker(std::sync::Arc::new(broker.clone()))
        .result_backend("memory://")
        .task::<refresh>()
        .build()
        .await
        .unwrap();
    let o = &app.registry().get("tasks.refresh").unwrap().options;
    assert_eq!(o.rate_limit, Some("5/s".parse().unwrap()));
    assert_eq!(o.rate_limit_scope, celeriac::core::RateLimitScope::Cluster);
    let first = refresh::delay(&app, 1).await.unwrap();
    let second = refresh::delay(&app, 1).await.unwrap();
    assert_eq!(first.id(), second.id());
    assert_eq!(broker.stats("celery").await.unwrap().ready, 1);
}

/// A unique task cannot be prepared for a send inside a transaction of the caller's: its lock
/// would not roll back with it. The error says what to do instead.
/// See: issue 28
#[tokio::test]
async fn a_unique_task_is_not_prepared_for_a_transactional_send() {
    let app = App::builder()
        .broker_url("memory://")
        .task::<sync_account>()
        .build()
        .await
        .unwrap();
    let e = app.prepare_send(&sync_account::s(1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("apply_async"), "{e}");
    assert!(app.prepare_send(&refresh::s(1)).is_ok());
}
