//! Python Celery 5.7 (SQLAlchemy 2.0, psycopg2, PyMySQL) and celeriac on one database: their
//! `db+` client reads the results we store and we read theirs; their `sqla+` client's tasks
//! run on our worker and ours on theirs.

use celeriac_core::protocol::new_id;
use celeriac_core::{RemoteError, ResultBackend, TaskMeta, TaskState};
use celeriac_test::python::{require_python, run_python_client, stdout_json};
use serde_json::{Map, Value, json};

use crate::util::{Server, backend};

/// Reads, through Celery's AsyncResult and GroupResult, what the test stored.
const READ_OURS: &str = r#"
import json, os
import tasks
from celery.result import AsyncResult, GroupResult

app = tasks.app
ids = json.loads(os.environ["IDS"])
out = {}
r = AsyncResult(ids["ok"], app=app)
out["ok"] = {
    "state": r.state, "result": r.get(timeout=10), "name": r.name, "args": r.args,
    "kwargs": r.kwargs, "worker": r.worker, "retries": r.retries, "queue": r.queue,
    "children": [c.id for c in (r.children or [])], "date_done": r.date_done.isoformat(),
}
r = AsyncResult(ids["fail"], app=app)
try:
    r.get(timeout=10)
    out["fail"] = "no exception"
except Exception as e:
    out["fail"] = {"type": type(e).__name__, "args": list(e.args), "state": r.state,
                   "traceback": r.traceback}
r = AsyncResult(ids["progress"], app=app)
out["progress"] = {"state": r.state, "info": r.info, "ready": r.ready()}
g = GroupResult.restore(ids["group"], app=app)
out["group"] = {"ids": [x.id for x in g.results], "values": g.get(timeout=10)}
out["unknown"] = AsyncResult(ids["unknown"], app=app).state
print(json.dumps(out))
"#;

/// Stores results through Celery's database backend.
const WRITE_THEIRS: &str = r#"
import json, os
import tasks
from celery.result import AsyncResult, GroupResult

app = tasks.app
b = app.backend
ids = json.loads(os.environ["IDS"])
b.store_result(ids["ok"], {"sum": 5, "text": "ünï ✓"}, "SUCCESS")
try:
    raise KeyError("missing")
except KeyError as e:
    b.mark_as_failure(ids["fail"], e, traceback="Traceback (python)\nKeyError: 'missing'")
b.store_result(ids["progress"], {"done": 3}, "PROGRESS")
GroupResult(ids["group"], [AsyncResult(i, app=app) for i in ids["members"]], app=app).save()
print(json.dumps("ok"))
"#;

async fn python_reads_ours(server: Server) {
    if !require_python() {
        return;
    }
    let Some(b) = backend(server).await else {
        return;
    };
    let ids: Map<String, Value> = ["ok", "fail", "progress", "group", "unknown", "m1", "m2"]
        .iter()
        .map(|k| ((*k).to_owned(), json!(new_id())))
        .collect();
    let id = |k: &str| ids[k].as_str().unwrap().to_owned();

    let mut ok = TaskMeta::success(id("ok"), json!({"sum": 5, "text": "ünï ✓"}));
    ok.name = Some("tasks.add".into());
    ok.args = Some(vec![json!(2), json!(3)]);
    ok.kwargs = Some(Map::new());
    ok.worker = Some("celeriac@test".into());
    ok.retries = Some(0);
    ok.queue = Some("celery".into());
    ok.children = vec![json!([[id("m1"), null], null])];
    assert!(b.store(&ok).await.unwrap());
    let err = RemoteError::new("ValueError", "bad input")
        .with_module("builtins")
        .with_traceback("Traceback (celeriac)\nValueError: bad input");
    assert!(
        b.store(&TaskMeta::exception(id("fail"), TaskState::Failure, &err))
            .await
            .unwrap()
    );
    let progress = TaskMeta::new(
        id("progress"),
        TaskState::Custom("PROGRESS".into()),
        json!({"done": 3}),
    );
    assert!(b.store(&progress).await.unwrap());
    b.save_group(&id("group"), &[id("m1"), id("m2")])
        .await
        .unwrap();
    assert!(
        b.store(&TaskMeta::success(id("m1"), json!(1)))
            .await
            .unwrap()
    );
    assert!(
        b.store(&TaskMeta::success(id("m2"), json!("two")))
            .await
            .unwrap()
    );

    let ids_text = serde_json::to_string(&ids).unwrap();
    let url = server.db_url();
    let out = stdout_json(
        &run_python_client(
            READ_OURS,
            &[
                ("CELERY_BROKER_URL", "memory://"),
                ("CELERY_RESULT_BACKEND", &url),
                ("IDS", &ids_text),
            ],
        )
        .await,
    );
    let okv = &out["ok"];
    assert_eq!(okv["state"], "SUCCESS");
    assert_eq!(okv["result"], json!({"sum": 5, "text": "ünï ✓"}));
    assert_eq!(okv["name"], "tasks.add");
    assert_eq!(okv["args"], json!([2, 3]));
    assert_eq!(okv["kwargs"], json!({}));
    assert_eq!(okv["worker"], "celeriac@test");
    assert_eq!(okv["retries"], 0);
    assert_eq!(okv["queue"], "celery");
    assert_eq!(okv["children"], json!([id("m1")]));
    let fail = &out["fail"];
    assert_eq!(fail["type"], "ValueError", "{out}");
    assert_eq!(fail["args"], json!(["bad input"]));
    assert_eq!(fail["state"], "FAILURE");
    assert_eq!(
        fail["traceback"],
        "Traceback (celeriac)\nValueError: bad input"
    );
    assert_eq!(
        out["progress"],
        json!({"state": "PROGRESS", "info": {"done": 3}, "ready": false})
    );
    assert_eq!(
        out["group"],
        json!({"ids": [id("m1"), id("m2")], "values": [1, "two"]})
    );
    assert_eq!(out["unknown"], "PENDING");
}

async fn we_read_theirs(server: Server) {
    if !require_python() {
        return;
    }
    let Some(b) = backend(server).await else {
        return;
    };
    let members = [new_id(), new_id(), new_id()];
    let ids = json!({
        "ok": new_id(), "fail": new_id(), "progress": new_id(), "group": new_id(),
        "members": members,
    });
    let ids_text = ids.to_string();
    let url = server.db_url();
    let out = stdout_json(
        &run_python_client(
            WRITE_THEIRS,
            &[
                ("CELERY_BROKER_URL", "memory://"),
                ("CELERY_RESULT_BACKEND", &url),
                ("IDS", &ids_text),
            ],
        )
        .await,
    );
    assert_eq!(out, "ok");
    let id = |k: &str| ids[k].as_str().unwrap().to_owned();

    let ok = b.get(&id("ok")).await.unwrap().expect("their SUCCESS row");
    assert_eq!(ok.status, TaskState::Success);
    assert_eq!(ok.result, json!({"sum": 5, "text": "ünï ✓"}));
    assert!(ok.date_done.is_some());
    let waited = b
        .wait(&id("ok"), Some(std::time::Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(waited, ok);

    let fail = b
        .get(&id("fail"))
        .await
        .unwrap()
        .expect("their FAILURE row");
    assert_eq!(fail.status, TaskState::Failure);
    let e = fail.error().expect("an exception");
    assert_eq!(e.exc_type, "KeyError");
    assert_eq!(e.exc_module, "builtins");
    assert_eq!(e.exc_args, vec![json!("missing")]);
    assert_eq!(
        e.traceback.as_deref(),
        Some("Traceback (python)\nKeyError: 'missing'")
    );

    let progress = b
        .get(&id("progress"))
        .await
        .unwrap()
        .expect("their PROGRESS row");
    assert_eq!(progress.status, TaskState::Custom("PROGRESS".into()));
    assert_eq!(progress.result, json!({"done": 3}));

    assert_eq!(
        b.restore_group(&id("group")).await.unwrap(),
        Some(members.to_vec()),
        "the members of their saved group, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_our_results_on_postgres() {
    python_reads_ours(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_python_results_on_postgres() {
    we_read_theirs(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_our_results_on_mariadb() {
    python_reads_ours(Server::Maria).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_python_results_on_mariadb() {
    we_read_theirs(Server::Maria).await;
}

// ===== sqla+: tasks through kombu's tables =====

pub(crate) mod tasks {
    use celeriac::TaskError;

    /// `tasks.add(x, y)`, as in examples/python/tasks.py.
    #[celeriac::task(name = "tasks.add")]
    pub(crate) fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    /// `tasks.echo(value)`.
    #[celeriac::task(name = "tasks.echo")]
    pub(crate) fn echo(value: serde_json::Value) -> serde_json::Value {
        value
    }

    /// `tasks.sleep(seconds)`: sleeps, returns the seconds.
    #[celeriac::task(name = "tasks.sleep")]
    pub(crate) async fn sleep(seconds: f64) -> f64 {
        tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
        seconds
    }

    /// `tasks.tsum(numbers)`: the sum of a chord's results.
    #[celeriac::task(name = "tasks.tsum")]
    pub(crate) fn tsum(numbers: Vec<i64>) -> i64 {
        numbers.iter().sum()
    }

    /// `tasks.fail(message)`: fails with a ValueError.
    #[celeriac::task(name = "tasks.fail")]
    pub(crate) async fn fail(message: String) -> Result<(), TaskError> {
        Err(TaskError::new("ValueError", message))
    }
}

/// Sends through kombu's SQLAlchemy transport; reads through Celery's database backend.
const PYTHON_SENDS: &str = r#"
import json, os
import tasks
from celery import chord, group

app = tasks.app
q = os.environ["QUEUE"]
out = {}
r = app.send_task("tasks.add", (2, 3), queue=q)
out["add"] = r.get(timeout=30)
out["worker"] = r.worker
r = app.send_task("tasks.echo", ({"text": "ünï ✓", "n": [1, None]},), queue=q)
out["echo"] = r.get(timeout=30)
r = app.send_task("tasks.fail", ("boom",), queue=q)
try:
    r.get(timeout=30)
    out["fail"] = "no exception"
except Exception as e:
    out["fail"] = {"type": type(e).__name__, "args": list(e.args), "state": r.state}
g = group(app.signature("tasks.add", (i, i), queue=q) for i in range(5)).apply_async()
g.save()
out["group"] = g.get(timeout=30)
# On the database backend Celery joins a chord with celery.chord_unlock, retried each second.
c = chord(app.signature("tasks.add", (i, i), queue=q) for i in range(4))(
    app.signature("tasks.tsum", queue=q))
out["chord"] = c.get(timeout=60)
print(json.dumps(out))
"#;

pub(crate) async fn our_app(server: Server) -> celeriac::App {
    celeriac::App::builder()
        .broker_url(server.sqla_url())
        .result_backend(server.db_url())
        .task::<tasks::add>()
        .task::<tasks::echo>()
        .task::<tasks::fail>()
        .task::<tasks::tsum>()
        .task::<tasks::sleep>()
        .build()
        .await
        .expect("an app on sqla+ and db+")
}

async fn python_client_our_worker(server: Server) {
    if !require_python() || !server.ready().await {
        return;
    }
    let app = our_app(server).await;
    let queue = celeriac_test::services::unique_queue("sqla-py-client");
    let mut options = app.worker_options();
    options.queues = vec![queue.clone()];
    options.hostname = "celeriac-sqla@test".into();
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let out = stdout_json(
        &run_python_client(
            PYTHON_SENDS,
            &[
                ("CELERY_BROKER_URL", &server.sqla_url()),
                ("CELERY_RESULT_BACKEND", &server.db_url()),
                ("QUEUE", &queue),
            ],
        )
        .await,
    );
    stop.warm();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), running).await;
    assert_eq!(out["add"], 5, "{out}");
    assert_eq!(out["worker"], "celeriac-sqla@test");
    assert_eq!(out["echo"], json!({"text": "ünï ✓", "n": [1, null]}));
    assert_eq!(
        out["fail"],
        json!({"type": "ValueError", "args": ["boom"], "state": "FAILURE"})
    );
    assert_eq!(out["group"], json!([0, 2, 4, 6, 8]));
    assert_eq!(
        out["chord"],
        json!(12),
        "a Celery chord joined by celery.chord_unlock"
    );
}

async fn our_client_python_worker(server: Server) {
    if !require_python() || !server.ready().await {
        return;
    }
    let app = our_app(server).await;
    let queue = celeriac_test::services::unique_queue("sqla-py-worker");
    let py =
        celeriac_test::python::PythonWorker::start(&server.sqla_url(), &server.db_url(), &[&queue])
            .await;
    let t = std::time::Duration::from_secs(30);
    let sum = tasks::add::s(20, 22)
        .queue(&queue)
        .apply_async(&app)
        .await
        .expect("send tasks.add");
    assert_eq!(sum.get_timeout(t).await.expect("tasks.add on python"), 42);
    let meta = app.backend().get(sum.id()).await.unwrap().expect("a row");
    assert_eq!(
        meta.worker.as_deref(),
        Some(py.node_name()),
        "python ran it"
    );
    let echoed = tasks::echo::s(json!({"k": ["ü", 1.5]}))
        .queue(&queue)
        .apply_async(&app)
        .await
        .expect("send tasks.echo");
    assert_eq!(
        echoed.get_timeout(t).await.unwrap(),
        json!({"k": ["ü", 1.5]})
    );
    let failed = tasks::fail::s("from rust".into())
        .queue(&queue)
        .apply_async(&app)
        .await
        .expect("send tasks.fail");
    let err = failed.get_timeout(t).await.expect_err("tasks.fail fails");
    let remote = err.remote().expect("the task's exception");
    assert_eq!(remote.exc_type, "ValueError");
    assert_eq!(remote.exc_args, vec![json!("from rust")]);
    // A chord: the Python worker counts no parts on these tables; the celery.chord_unlock
    // our client sends with it (as Celery's does) joins it there.
    let c = celeriac::canvas::chord(
        celeriac::canvas::group((0..4).map(|i| tasks::add::s(i, i).queue(&queue))),
        celeriac::Signature::<i64>::new("tasks.tsum").queue(&queue),
    )
    .apply_async(&app)
    .await
    .expect("send the chord");
    assert_eq!(
        c.get_timeout(t).await.expect("the chord body on python"),
        12,
        "python worker's log:\n{}",
        py.log()
    );
    drop(py);
}

/// A chord's `celery.chord_unlock` goes where its body goes, as Celery routes it: a body
/// naming no queue is routed by its task name, so the unlock is in the routed queue (one
/// second delayed), not the default one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chords_unlock_is_routed_like_its_body() {
    let server = Server::Postgres;
    if !server.ready().await {
        return;
    }
    let queue = celeriac_test::services::unique_queue("sqla-unlock-header");
    let sums = celeriac_test::services::unique_queue("sqla-unlock-sums");
    let app = celeriac::App::builder()
        .broker_url(server.sqla_url())
        .result_backend(server.db_url())
        .task::<tasks::add>()
        .task::<tasks::tsum>()
        .route("tasks.tsum", sums.clone())
        .build()
        .await
        .expect("an app on sqla+ and db+");
    celeriac::canvas::chord(
        celeriac::canvas::group((0..3).map(|i| tasks::add::s(i, i).queue(&queue))),
        celeriac::Signature::<i64>::new("tasks.tsum"),
    )
    .apply_async(&app)
    .await
    .expect("send the chord");
    assert_eq!(app.broker().stats(&queue).await.unwrap().total(), 3);
    let queues = [sums.clone()];
    let mut c = app
        .broker()
        .consume(&queues, celeriac_core::ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(std::time::Duration::from_secs(10), c.next())
        .await
        .expect("the unlock reaches the body's routed queue")
        .unwrap()
        .expect("a delivery");
    let m = d.message.as_ref().unwrap();
    assert_eq!(m.task(), "celery.chord_unlock");
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_tasks_on_our_worker_via_postgres() {
    python_client_our_worker(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_runs_tasks_on_a_python_worker_via_postgres() {
    our_client_python_worker(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_tasks_on_our_worker_via_mariadb() {
    python_client_our_worker(Server::Maria).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_runs_tasks_on_a_python_worker_via_mariadb() {
    our_client_python_worker(Server::Maria).await;
}

// ===== tables Celery made, under the names of `database_table_names` =====

/// Celery creates its tables (named by `database_table_names`, in the schema of
/// `database_table_schemas` on PostgreSQL) and stores a result; then reads the one we stored
/// in them.
///
/// On PostgreSQL the schema is needed: Celery names the `date_done` index after its default
/// table name whatever the table is called, and PostgreSQL index names are per schema, so
/// Celery cannot create a second, renamed table beside `celery_taskmeta` in one schema.
const CELERY_TABLES: &str = r#"
import json, os, sys
import tasks
from celery.result import AsyncResult

app = tasks.app
app.conf.database_table_names = {"task": os.environ["TASK_TABLE"], "group": os.environ["GROUP_TABLE"]}
if os.environ.get("SCHEMA"):
    app.conf.database_table_schemas = {"task": os.environ["SCHEMA"], "group": os.environ["SCHEMA"]}
step = os.environ["STEP"]
if step == "write":
    app.backend.store_result(os.environ["ID"], [1, "two"], "SUCCESS")
    print(json.dumps("ok"))
else:
    r = AsyncResult(os.environ["ID"], app=app)
    print(json.dumps({"state": r.state, "result": r.get(timeout=10), "date_done": str(r.date_done)}))
"#;

async fn celery_made_tables(server: Server) {
    if !require_python() || !server.ready().await {
        return;
    }
    let suffix = &new_id().replace('-', "")[..12];
    let task = format!("py_taskmeta_{suffix}");
    let group = format!("py_tasksetmeta_{suffix}");
    let theirs = new_id();
    let url = server.db_url();
    let schema = (server == Server::Postgres).then(|| format!("py_{suffix}"));
    if let Some(s) = &schema {
        crate::rows::exec(server, format!("CREATE SCHEMA {s}")).await;
    }
    let env = |step: &'static str, id: String| {
        vec![
            ("CELERY_BROKER_URL", "memory://".to_owned()),
            ("CELERY_RESULT_BACKEND", url.clone()),
            ("TASK_TABLE", task.clone()),
            ("GROUP_TABLE", group.clone()),
            ("STEP", step.to_owned()),
            ("ID", id),
            ("SCHEMA", schema.clone().unwrap_or_default()),
        ]
    };
    let run = |vars: Vec<(&'static str, String)>| async move {
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        stdout_json(&run_python_client(CELERY_TABLES, &pairs).await)
    };
    assert_eq!(run(env("write", theirs.clone())).await, "ok");

    let mut ours_url = format!("{url}?task_table={task}&group_table={group}");
    if let Some(s) = &schema {
        ours_url.push_str(&format!("&task_schema={s}&group_schema={s}"));
    }
    let b = celeriac_sqla::SqlaBackend::connect(&ours_url, &crate::util::config())
        .await
        .expect("open on Celery's tables");
    let got = b.get(&theirs).await.unwrap().expect("their row");
    assert_eq!(got.result, json!([1, "two"]));
    let ours = new_id();
    let mut meta = TaskMeta::success(&ours, json!({"ok": true}));
    meta.worker = Some("celeriac@test".into());
    assert!(b.store(&meta).await.unwrap());
    let out = run(env("read", ours.clone())).await;
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(out["result"], json!({"ok": true}));
    b.close().await.unwrap();
    match &schema {
        Some(s) => crate::rows::exec(server, format!("DROP SCHEMA {s} CASCADE")).await,
        None => {
            for t in [&task, &group] {
                crate::rows::exec(server, format!("DROP TABLE {t}")).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_made_tables_with_custom_names_on_postgres() {
    celery_made_tables(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_made_tables_with_custom_names_on_mariadb() {
    celery_made_tables(Server::Maria).await;
}

// ===== one queue, a Python worker and ours =====

async fn mixed_workers_share_a_queue(server: Server) {
    if !require_python() || !server.ready().await {
        return;
    }
    let app = our_app(server).await;
    let queue = celeriac_test::services::unique_queue("sqla-mixed");
    let py =
        celeriac_test::python::PythonWorker::start(&server.sqla_url(), &server.db_url(), &[&queue])
            .await;
    // One task at a time, nothing prefetched beyond it: the Python worker gets its share.
    let mut options = app.worker_options();
    options.queues = vec![queue.clone()];
    options.hostname = "celeriac-mixed@test".into();
    options.concurrency = 1;
    options.prefetch_buffer = 0;
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let mut results = Vec::new();
    for _ in 0..16 {
        results.push(
            tasks::sleep::s(0.4)
                .queue(&queue)
                .apply_async(&app)
                .await
                .expect("send"),
        );
    }
    let t = std::time::Duration::from_secs(60);
    let mut by_worker = std::collections::HashMap::<String, usize>::new();
    for r in &results {
        assert_eq!(r.get_timeout(t).await.expect("a result"), 0.4);
        let meta = app.backend().get(r.id()).await.unwrap().expect("a row");
        *by_worker
            .entry(meta.worker.unwrap_or_default())
            .or_default() += 1;
    }
    stop.warm();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), running).await;
    let python = py.node_name().to_owned();
    drop(py);
    assert_eq!(by_worker.values().sum::<usize>(), 16, "{by_worker:?}");
    assert!(
        by_worker.get("celeriac-mixed@test").copied().unwrap_or(0) > 0
            && by_worker.get(&python).copied().unwrap_or(0) > 0,
        "both workers take tasks from the shared queue: {by_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_our_workers_share_a_queue_on_postgres() {
    mixed_workers_share_a_queue(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_our_workers_share_a_queue_on_mariadb() {
    mixed_workers_share_a_queue(Server::Maria).await;
}
