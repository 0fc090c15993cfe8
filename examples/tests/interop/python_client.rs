//! Celery's own client (`send_task`, `AsyncResult`) calling tasks on our worker process.

use serde_json::{Value, json};

use crate::support::{OurWorker, python, setup};

/// Sends every kind of call from Python and prints what Celery's AsyncResult reads back.
const CALLS: &str = r#"
import json, os, time
import tasks
from celery.result import AsyncResult

app = tasks.app
q = os.environ["QUEUE"]
T = 30
out = {}

r = app.send_task("tasks.add", (2, 3), queue=q)
out["add"] = r.get(timeout=T)
out["add_state"] = r.state
out["add_successful"] = r.successful()
out["add_worker"] = r.worker

r = app.send_task("tasks.add", kwargs={"x": 40, "y": 2}, queue=q)
out["add_kwargs"] = r.get(timeout=T)

r = app.send_task("tasks.mul", (6, 7), queue=q)
out["mul"] = r.get(timeout=T)

r = app.send_task("tasks.xsum", ([1.5, 2.5, 3],), queue=q)
out["xsum"] = r.get(timeout=T)

# Echo: Python's json.dumps of what came back must equal that of what was sent, so an int
# that came back as a float (or a lost digit) shows.
values = {
    "ascii": "hello",
    "unicode": "héllo ✓ 日本語 🎉",
    "escapes": "quote \" backslash \\ newline \n tab \t nul \u0000",
    "empty": "",
    "nested": {"a": [1, {"b": None, "c": [True, False]}], "d": {}},
    "i64_max": 2**63 - 1,
    "i64_min": -(2**63),
    "u64_max": 2**64 - 1,
    "beyond_f64": 2**53 + 1,
    "floats": [0.1, -2.5, 1e300, 3.141592653589793, 1e-7],
    # Shortest reprs whose last digit a parser that is not correctly rounded gets wrong.
    "floats_last_digit": [985.6906946328695, 212.91890726713459, 479.60756426982596],
    "null": None,
    "list_of_mixed": [1, "two", 3.0, None, [], {}],
    # Beyond 64 bits: must come back exact, or fail clearly; never as a rounded float.
    "beyond_u64": 2**70,
}
pending = {k: app.send_task("tasks.echo", (v,), queue=q) for k, v in values.items()}
echo = {}
for k, r in pending.items():
    try:
        got = r.get(timeout=T)
        echo[k] = {"same": json.dumps(got) == json.dumps(values[k]), "sent": json.dumps(values[k]), "got": json.dumps(got)}
    except Exception as e:
        echo[k] = {"same": False, "sent": json.dumps(values[k]), "error": "%s: %s" % (type(e).__name__, e)}
out["echo"] = echo

r = app.send_task("tasks.fail", ("boom: ünïcode",), queue=q)
try:
    r.get(timeout=T)
    out["fail"] = "no exception"
except Exception as e:
    out["fail"] = {
        "type": type(e).__name__,
        "module": type(e).__module__,
        "is_value_error": isinstance(e, ValueError),
        "args": list(e.args),
        "state": r.state,
        "failed": r.failed(),
        "traceback": r.traceback,
    }
# propagate=False hands back the exception instead of raising it.
got = AsyncResult(r.id, app=app).get(timeout=T, propagate=False)
out["fail_no_propagate"] = type(got).__name__

t0 = time.time()
r = app.send_task("tasks.add", (1, 1), queue=q, countdown=2)
out["countdown_state_at_once"] = r.state
out["countdown"] = r.get(timeout=T)
out["countdown_elapsed"] = time.time() - t0

r = app.send_task("tasks.sleep", (0.2,), queue=q, expires=1)
out["sleep_with_expires"] = r.get(timeout=T)

print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_our_worker() {
    let Some(env) = setup(9, "py-client").await else {
        return;
    };
    let worker = OurWorker::start(&env.url, &[&env.queue]).await;
    let out = python(CALLS, &env, &[]).await;
    let ctx = || format!("python saw: {out:#}\nour worker's log:\n{}", worker.log());

    assert_eq!(out["add"], 5, "{}", ctx());
    assert_eq!(out["add_state"], "SUCCESS", "{}", ctx());
    assert_eq!(out["add_successful"], true, "{}", ctx());
    assert_eq!(out["add_worker"], worker.node_name(), "{}", ctx());
    assert_eq!(out["add_kwargs"], 42, "{}", ctx());
    assert_eq!(out["mul"], 42, "{}", ctx());
    assert_eq!(out["xsum"], 7.0, "{}", ctx());

    let echo = out["echo"].as_object().expect("echo map");
    let wrong: Vec<(&String, &Value)> = echo
        .iter()
        .filter(|(k, v)| v["same"] != true && !(*k == "beyond_u64" && v["error"].is_string()))
        .collect();
    assert!(
        wrong.is_empty(),
        "echo changed values: {wrong:#?}\n{}",
        ctx()
    );

    let f = &out["fail"];
    assert_eq!(f["type"], "ValueError", "{}", ctx());
    assert_eq!(f["args"], json!(["boom: ünïcode"]), "{}", ctx());
    assert_eq!(f["state"], "FAILURE", "{}", ctx());
    assert_eq!(f["failed"], true, "{}", ctx());
    let tb = f["traceback"].as_str().unwrap_or_default();
    assert!(tb.contains("ValueError: boom: ünïcode"), "{}", ctx());
    assert_eq!(out["fail_no_propagate"], "ValueError", "{}", ctx());

    assert_eq!(out["countdown_state_at_once"], "PENDING", "{}", ctx());
    assert_eq!(out["countdown"], 2, "{}", ctx());
    let elapsed = out["countdown_elapsed"].as_f64().expect("elapsed");
    assert!(
        elapsed >= 1.9,
        "ran {elapsed}s after a 2s countdown\n{}",
        ctx()
    );
    assert_eq!(out["sleep_with_expires"], 0.2, "{}", ctx());
}
