//! Celery's own client (`send_task`, `AsyncResult`) calling tasks on our worker process.

use serde_json::{Value, json};

use celeriac_test::python::PythonWorker;

use crate::support::{OurWorker, python, setup, setup_python_only};

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
    "null": None,
    "list_of_mixed": [1, "two", 3.0, None, [], {}],
}
pending = {k: app.send_task("tasks.echo", (v,), queue=q) for k, v in values.items()}
echo = {}
for k, r in pending.items():
    got = r.get(timeout=T)
    echo[k] = {"same": json.dumps(got) == json.dumps(values[k]), "sent": json.dumps(values[k]), "got": json.dumps(got)}
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

r = app.send_task("tasks.sleep", (0.2,), queue=q, expires=10)
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
    check_calls(&out, worker.node_name(), &worker.log());
}

/// Echoes each entry of the JSON map in `VALUES` (parsed by Python, so exactly) through
/// `tasks.echo`; says per entry whether Python's `json.dumps` of the result is unchanged.
const ECHO_EXACT: &str = r#"
import json, os, tasks
q = os.environ["QUEUE"]
out = {}
for k, v in json.loads(os.environ["VALUES"]).items():
    r = tasks.app.send_task("tasks.echo", (v,), queue=q)
    try:
        got = r.get(timeout=30)
        out[k] = {"same": json.dumps(got) == json.dumps(v), "sent": json.dumps(v), "got": json.dumps(got)}
    except Exception as e:
        out[k] = {"same": False, "sent": json.dumps(v), "error": "%s: %s" % (type(e).__name__, e)}
print(json.dumps(out))
"#;

/// Shortest reprs whose last digit a float parser that is not correctly rounded gets wrong
/// (serde_json without its `float_roundtrip` feature misreads about 1 in 10 ordinary floats).
const FLOATS: &str = r#"{"floats": [985.6906946328695, 212.91890726713459, 479.60756426982596]}"#;

/// Integers beyond 64 bits: they must come back exact, or fail clearly; never rounded.
const BIG_INTS: &str = r#"{"2**70": 1180591620717411303424, "-2**70": -1180591620717411303424}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_floats_survive_our_worker() {
    let Some(env) = setup(9, "py-floats").await else {
        return;
    };
    let worker = OurWorker::start(&env.url, &[&env.queue]).await;
    let out = python(ECHO_EXACT, &env, &[("VALUES", FLOATS)]).await;
    check_exact(&out, &worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_big_ints_survive_our_worker_or_fail_clearly() {
    let Some(env) = setup(9, "py-big-ints").await else {
        return;
    };
    let worker = OurWorker::start(&env.url, &[&env.queue]).await;
    let out = python(ECHO_EXACT, &env, &[("VALUES", BIG_INTS)]).await;
    check_exact(&out, &worker.log());
}

/// Every echoed value came back unchanged, or (for integers wider than 64 bits, which celeriac
/// refuses rather than rounds) failed with an error that says why.
fn check_exact(out: &Value, log: &str) {
    let wrong: Vec<(&String, &Value)> = out
        .as_object()
        .expect("a map")
        .iter()
        .filter(|(k, v)| {
            v["same"] != true
                && !(k.contains("**")
                    && v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("does not fit in 64 bits")))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "values came back changed: {wrong:#?}\nthe worker's log:\n{log}"
    );
}

/// The same calls and checks against Celery's own worker: the expectations above are Celery's
/// behaviour, not ours. This also exercises the Python harness when our driver is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_calls_pass_against_celerys_own_worker() {
    let Some(env) = setup_python_only(14, "py-reference") else {
        return;
    };
    let worker = PythonWorker::start(&env.url, &env.url, &[&env.queue]).await;
    let out = python(CALLS, &env, &[]).await;
    check_calls(&out, worker.node_name(), &worker.log());
    for values in [FLOATS, BIG_INTS] {
        let out = python(ECHO_EXACT, &env, &[("VALUES", values)]).await;
        check_exact(&out, &worker.log());
    }
}

fn check_calls(out: &Value, node: &str, log: &str) {
    let ctx = || format!("python saw: {out:#}\nthe worker's log:\n{log}");
    assert_eq!(out["add"], 5, "{}", ctx());
    assert_eq!(out["add_state"], "SUCCESS", "{}", ctx());
    assert_eq!(out["add_successful"], true, "{}", ctx());
    assert_eq!(out["add_worker"], node, "{}", ctx());
    assert_eq!(out["add_kwargs"], 42, "{}", ctx());
    assert_eq!(out["mul"], 42, "{}", ctx());
    assert_eq!(out["xsum"], 7.0, "{}", ctx());

    let echo = out["echo"].as_object().expect("echo map");
    let wrong: Vec<(&String, &Value)> = echo.iter().filter(|(_, v)| v["same"] != true).collect();
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
