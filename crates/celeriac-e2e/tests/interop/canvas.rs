//! Canvas across languages on Redis: a chain and chords built by Python Celery and run by our
//! worker, and ours run by a Python worker, with results read on both sides. Chords complete
//! through Celery's own Redis keys (`celery-taskset-meta-<gid>.j/.t/.s`) whichever side runs them.

use celeriac::canvas::{chord, group};
use celeriac::{ErrorKind, Signature};
use celeriac_examples::add;
use celeriac_test::python::PythonWorker;
use serde_json::{Value, json};

use crate::support::{OurWorker, T, python, setup};

/// Builds canvas with Celery's own API and prints the results and ids.
const PYTHON_CANVAS: &str = r#"
import json, os
from celery import chain, chord, group
import tasks

app = tasks.app
q = os.environ["QUEUE"]
T = 30
s = lambda name, *args: app.signature(name, args, queue=q)
out = {}

r = chain(s("tasks.add", 1, 1), s("tasks.add", 10), s("tasks.mul", 2)).apply_async()
out["chain"] = r.get(timeout=T)
out["chain_id"] = r.id

r = chord(group(s("tasks.add", i, i) for i in range(6)))(s("tasks.tsum"))
out["chord"] = r.get(timeout=T)
out["chord_id"] = r.id

# Celery turns a group followed by a task into a chord.
r = (group(s("tasks.add", i, 1) for i in range(3)) | s("tasks.tsum") | s("tasks.mul", 10)).apply_async()
out["group_then"] = r.get(timeout=T)

r = chord([s("tasks.add", 1, 1), s("tasks.fail", "header")])(s("tasks.tsum"))
try:
    r.get(timeout=T)
    out["chord_error"] = None
except Exception as e:
    out["chord_error"] = [type(e).__name__, str(e)]
out["failed_chord_id"] = r.id
print(json.dumps(out))
"#;

/// See: issue 7, "a chain and a chord built by Python Celery and run by our workers".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_canvas_runs_on_our_worker() {
    let Some(env) = setup(8, "py-canvas").await else {
        return;
    };
    let ours = OurWorker::start(&env.url, &[&env.queue]).await;
    let out = python(PYTHON_CANVAS, &env, &[]).await;
    let log = || format!("{out}\nour worker's log:\n{}", ours.log());
    assert_eq!(out["chain"], json!(24), "{}", log());
    assert_eq!(out["chord"], json!(30), "{}", log());
    assert_eq!(out["group_then"], json!(60), "{}", log());
    let err = out["chord_error"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", log()));
    // Celery's `get` on a chord's result raises the failed header member's error first (it
    // checks the parents); the body itself is stored as a ChordError, read below.
    assert_eq!(err, &[json!("ValueError"), json!("header")], "{}", log());
    // Our side reads the same results.
    let id = |k: &str| out[k].as_str().unwrap().to_owned();
    let chain: i64 = env.app.result(id("chain_id")).get_timeout(T).await.unwrap();
    assert_eq!(chain, 24);
    let sum: i64 = env.app.result(id("chord_id")).get_timeout(T).await.unwrap();
    assert_eq!(sum, 30);
    let e = env
        .app
        .result::<Value>(id("failed_chord_id"))
        .get_timeout(T)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TaskFailed);
    assert_eq!(e.remote().unwrap().exc_type, "ChordError", "{e:?}");
    // Three chords (the group followed by a task is one), each completed once.
    assert_eq!(
        ours.log().matches("chord complete; body sent").count(),
        3,
        "{}",
        log()
    );
}

/// Reads results by id with Celery's AsyncResult.
const PYTHON_READS: &str = r#"
import json, os
import tasks
from celery.result import AsyncResult

out = {}
for k in ("chain", "chord"):
    out[k] = AsyncResult(os.environ[k.upper()], app=tasks.app).get(timeout=30)
r = AsyncResult(os.environ["FAILED"], app=tasks.app)
try:
    r.get(timeout=30)
    out["failed"] = None
except Exception as e:
    out["failed"] = type(e).__name__
print(json.dumps(out))
"#;

/// See: issue 7, "... and the reverse, with results read on both sides".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_canvas_runs_on_a_python_worker() {
    let Some(env) = setup(15, "py-canvas-rev").await else {
        return;
    };
    let py = PythonWorker::start(&env.url, &env.url, &[&env.queue]).await;
    let app = &env.app;
    let q = env.queue.as_str();
    let step = |name: &str| Signature::<i64>::new(name).queue(q);
    let log = || format!("python worker's log:\n{}", py.log());

    let chain = celeriac::chain![
        add::s(1, 1).queue(q),
        step("tasks.add").arg(10),
        step("tasks.mul").arg(2)
    ]
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(chain.get_timeout(T).await.unwrap(), 24, "{}", log());

    let c = chord(
        group((0..6).map(|i| add::s(i, i).queue(q))),
        step("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 30, "{}", log());

    let failed = chord(
        group([
            add::s(1, 1).queue(q).untyped(),
            Signature::<Value>::new("tasks.fail").arg("header").queue(q),
        ]),
        step("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap();
    let e = failed.get_timeout(T).await.unwrap_err();
    assert_eq!(
        e.remote().unwrap().exc_type,
        "ChordError",
        "{e:?}\n{}",
        log()
    );

    let out = python(
        PYTHON_READS,
        &env,
        &[
            ("CHAIN", chain.id()),
            ("CHORD", c.body().id()),
            ("FAILED", failed.body().id()),
        ],
    )
    .await;
    assert_eq!(
        out,
        json!({"chain": 24, "chord": 30, "failed": "ChordError"}),
        "{}",
        log()
    );
}
