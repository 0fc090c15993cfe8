//! Python Celery and celeriac sharing a RabbitMQ (127.0.0.1:5672, guest/guest): a Python
//! client calling our worker and our client calling a Python worker, each with the `rpc://`
//! result backend and with a Redis result backend.
//!
//! Skips with a `SKIPPED:` notice when RabbitMQ (or, for the Redis variants, Redis) is down or
//! the venv cannot be made.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celeriac::{App, ErrorKind, Signature};
use celeriac_examples::{add, echo, fail, stamp};
use celeriac_test::python::{PythonWorker, require_python, run_python_client, stdout_json};
use celeriac_test::services::{require_service, test_dir, unique_queue};
use serde_json::json;

use crate::support::{REDIS, T};

const RABBIT: &str = "127.0.0.1:5672";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// The broker and backend URLs of a test, or `None` (after a notice) when a service is down.
fn urls(backend: &str, redis_db: u8) -> Option<(String, String)> {
    if !require_service("rabbitmq", RABBIT) || !require_python() {
        return None;
    }
    match backend {
        "rpc" => Some((
            AMQP.to_owned(),
            "rpc://guest:guest@127.0.0.1:5672//".to_owned(),
        )),
        _ => {
            if !require_service("redis", REDIS) {
                return None;
            }
            Some((AMQP.to_owned(), format!("redis://{REDIS}/{redis_db}")))
        }
    }
}

/// Our example worker process on `broker` and `backend`, killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    async fn start(broker: &str, backend: &str, queue: &str) -> Worker {
        let id = &celeriac::core::protocol::new_id()[28..];
        let node = format!("rsw-{id}@{}", celeriac::core::hostname());
        let log = test_dir().join(format!("interop-amqp-worker-{id}.log"));
        let stderr = std::fs::File::create(&log).expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
            .args(["--broker", broker, "--result-backend", backend])
            .args([
                "--loglevel",
                "info",
                "worker",
                "-c",
                "4",
                "-n",
                &node,
                "-Q",
                queue,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn our worker");
        let w = Worker { child, log };
        let deadline = Instant::now() + T;
        while !w.log().contains("worker started") {
            assert!(
                Instant::now() < deadline,
                "our worker did not start; log:\n{}",
                w.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Worker {
    /// SIGKILL: no shutdown, no ack, no goodbye to RabbitMQ.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CALLS: &str = r#"
import json, os, time
import tasks
app = tasks.app
q = os.environ["QUEUE"]
out = {}
r = app.send_task("tasks.add", (2, 3), queue=q)
out["add"] = r.get(timeout=30)
out["add_state"] = r.state
r = app.send_task("tasks.echo", ({"a": [1, None, "é"], "b": 2.5},), queue=q)
out["echo"] = r.get(timeout=30)
r = app.send_task("tasks.fail", ("boom",), queue=q)
try:
    r.get(timeout=30)
    out["fail"] = "no exception"
except Exception as e:
    out["fail"] = {"type": type(e).__name__, "args": list(e.args), "state": r.state}
t0 = time.time()
r = app.send_task("tasks.add", (1, 1), queue=q, countdown=2)
out["countdown"] = r.get(timeout=30)
out["countdown_elapsed"] = time.time() - t0
print(json.dumps(out))
"#;

async fn python_client_calls_our_worker(backend: &str, redis_db: u8) {
    let Some((broker, backend_url)) = urls(backend, redis_db) else {
        return;
    };
    let queue = unique_queue(&format!("amqp-py-client-{backend}"));
    let worker = Worker::start(&broker, &backend_url, &queue).await;
    let py_broker = broker.replacen("amqp://", "pyamqp://", 1);
    let py_backend = if backend == "rpc" {
        "rpc://".to_owned()
    } else {
        backend_url.clone()
    };
    let out = stdout_json(
        &run_python_client(
            CALLS,
            &[
                ("QUEUE", queue.as_str()),
                ("CELERY_BROKER_URL", py_broker.as_str()),
                ("CELERY_RESULT_BACKEND", py_backend.as_str()),
            ],
        )
        .await,
    );
    let ctx = || format!("python saw: {out:#}\nour worker's log:\n{}", worker.log());
    assert_eq!(out["add"], 5, "{}", ctx());
    assert_eq!(out["add_state"], "SUCCESS", "{}", ctx());
    assert_eq!(
        out["echo"],
        json!({"a": [1, null, "é"], "b": 2.5}),
        "{}",
        ctx()
    );
    assert_eq!(out["fail"]["type"], "ValueError", "{}", ctx());
    assert_eq!(out["fail"]["args"], json!(["boom"]), "{}", ctx());
    assert_eq!(out["fail"]["state"], "FAILURE", "{}", ctx());
    assert_eq!(out["countdown"], 2, "{}", ctx());
    assert!(
        out["countdown_elapsed"].as_f64().unwrap_or(0.0) >= 1.9,
        "{}",
        ctx()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_our_worker_over_amqp_with_rpc_results() {
    python_client_calls_our_worker("rpc", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_our_worker_over_amqp_with_redis_results() {
    python_client_calls_our_worker("redis", 15).await;
}

async fn our_client_calls_a_python_worker(backend: &str, redis_db: u8) {
    let Some((broker, backend_url)) = urls(backend, redis_db) else {
        return;
    };
    let queue = unique_queue(&format!("amqp-py-worker-{backend}"));
    let py_backend = if backend == "rpc" {
        "rpc://".to_owned()
    } else {
        backend_url.clone()
    };
    let py = PythonWorker::start(
        &broker.replacen("amqp://", "pyamqp://", 1),
        &py_backend,
        &[&queue],
    )
    .await;
    let app = match App::builder()
        .broker_url(&broker)
        .result_backend(&backend_url)
        .task::<add>()
        .task::<echo>()
        .task::<fail>()
        .build()
        .await
    {
        Ok(app) => app,
        Err(e) => panic!("cannot open {broker} with {backend_url}: {e:?}"),
    };
    let log = || format!("python worker's log:\n{}", py.log());
    let sum = add::s(2, 3).queue(&queue).apply_async(&app).await.unwrap();
    let value = json!({"nested": [1, {"a": null}], "text": "héllo"});
    let echoed = echo::s(value.clone())
        .queue(&queue)
        .apply_async(&app)
        .await
        .unwrap();
    let failed = fail::s("boom".to_owned())
        .queue(&queue)
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(sum.get_timeout(T).await.unwrap(), 5, "{}", log());
    assert_eq!(echoed.get_timeout(T).await.unwrap(), value, "{}", log());
    let err = failed.get_timeout(T).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed, "{err:?}\n{}", log());
    assert_eq!(err.remote().expect("remote").exc_type, "ValueError");
    // A chain: the Python worker sends the second step itself, and with rpc:// its result must
    // still come back to this client's reply queue (Celery freezes chain steps with it).
    let chained = celeriac::chain![
        add::s(2, 3).queue(&queue),
        Signature::<i64>::new("tasks.add").arg(10).queue(&queue)
    ]
    .apply_async(&app)
    .await
    .unwrap();
    assert_eq!(chained.get_timeout(T).await.unwrap(), 15, "{}", log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_calls_a_python_worker_over_amqp_with_rpc_results() {
    our_client_calls_a_python_worker("rpc", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_calls_a_python_worker_over_amqp_with_redis_results() {
    our_client_calls_a_python_worker("redis", 15).await;
}

/// An acks-late task whose worker is SIGKILLed mid-run is not lost: RabbitMQ requeues the
/// unacked delivery when the connection dies, and the next worker runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acks_late_task_survives_a_sigkilled_worker() {
    if !require_service("rabbitmq", RABBIT) {
        return;
    }
    let backend = "rpc://guest:guest@127.0.0.1:5672//";
    let queue = unique_queue("amqp-sigkill");
    let app = App::builder()
        .broker_url(AMQP)
        .result_backend(backend)
        .task::<stamp>()
        .build()
        .await
        .expect("client app");
    let first = Worker::start(AMQP, backend, &queue).await;
    let r = stamp::s(2.0).queue(&queue).apply_async(&app).await.unwrap();
    let deadline = Instant::now() + T;
    while !first.log().contains(r.id()) {
        assert!(
            Instant::now() < deadline,
            "the first worker never received {}; log:\n{}",
            r.id(),
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    let second = Worker::start(AMQP, backend, &queue).await;
    let done = r.get_timeout(T).await;
    assert!(
        done.is_ok(),
        "{done:?}; the second worker's log:\n{}",
        second.log()
    );
}
