//! The standalone `celeriac` binary against a pure Python Celery cluster: Celery 5.7 workers
//! from the test venv (`examples/python/tasks.py`), and no celeriac worker anywhere.
//!
//! Each Redis test starts a private `redis-server` on a free port (no shared database, no
//! pub/sub cross-talk with other tests); the RabbitMQ test uses the shared broker at
//! 127.0.0.1:5672 with queue and node names of its own, and a private Redis for results. A test
//! skips with a `SKIPPED:` notice when `redis-server`, RabbitMQ or the venv is missing, and fails
//! instead under `CELERIAC_REQUIRE_SERVICES=1`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use celeriac_test::python::{celery, python_dir, require_python};
use celeriac_test::services::{
    free_port, require_program, require_service, test_dir, unique_queue,
};
use serde_json::{Value, json};

/// How long anything asynchronous may take before the test fails.
const T: Duration = Duration::from_secs(30);

/// The shared RabbitMQ.
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// The binary under test.
fn celeriac() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_celeriac"));
    // No celeriac.toml or CELERIAC_* of the caller's may change what is tested.
    c.current_dir(test_dir())
        .env_remove("CELERIAC_BROKER_URL")
        .env_remove("CELERIAC_RESULT_BACKEND")
        .env_remove("CELERIAC_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Runs `celeriac -b <broker> [--result-backend <backend>] <args>` to the end.
fn run(broker: &str, backend: Option<&str>, args: &[&str]) -> Output {
    let mut c = celeriac();
    c.args(["-b", broker]);
    if let Some(b) = backend {
        c.args(["--result-backend", b]);
    }
    c.args(args).output().expect("run celeriac")
}

/// Like [`run`], and the command must succeed; gives its stdout.
fn run_ok(broker: &str, backend: Option<&str>, args: &[&str]) -> String {
    let o = run(broker, backend, args);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "celeriac {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// A child process killed when dropped (also when the test panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server of our own on a free port, without persistence.
struct PrivateRedis {
    _child: Killed,
    port: u16,
}

impl PrivateRedis {
    /// `None` (after a notice, or a panic under `CELERIAC_REQUIRE_SERVICES=1`) without
    /// `redis-server`.
    async fn start() -> Option<PrivateRedis> {
        if !require_program("redis-server") {
            return None;
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = PrivateRedis {
            _child: Killed(child),
            port,
        };
        let deadline = Instant::now() + T;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// A plain Python Celery worker (`celery -A tasks worker -E`, heartbeats on, as a Flower user
/// runs it), killed when dropped.
struct PyWorker {
    _child: Killed,
    node: String,
    log: PathBuf,
}

impl PyWorker {
    /// Starts it on `queue` with one pool thread (one task at a time, so a second task waits
    /// while the first sleeps; unlike `solo`, the main thread still answers remote control
    /// meanwhile) and waits until it is ready.
    async fn start(broker: &str, backend: &str, queue: &str) -> PyWorker {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("sapy{id}@standalone");
        let log = test_dir().join(format!("standalone-pyworker-{id}.log"));
        let file = std::fs::File::create(&log).expect("create the worker log");
        let child = Command::new(celery())
            .current_dir(python_dir())
            .args(["-A", "tasks", "worker", "-l", "INFO", "-n", &node])
            .args([
                "-P",
                "threads",
                "-c",
                "1",
                "-E",
                "-Q",
                queue,
                "--without-gossip",
            ])
            .args(["--without-mingle"])
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", backend)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("share the worker log"))
            .stderr(file)
            .spawn()
            .expect("spawn the Python worker");
        let w = PyWorker {
            _child: Killed(child),
            node,
            log,
        };
        w.wait_log(&format!("{} ready.", w.node)).await;
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the Python worker's log never showed {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Redis and the venv, or `None` after a notice.
async fn redis_cluster(prefix: &str) -> Option<(PrivateRedis, String)> {
    if !require_python() {
        return None;
    }
    let redis = PrivateRedis::start().await?;
    Some((redis, unique_queue(prefix)))
}

/// One HTTP/1.1 request to the dashboard; the status and the body as JSON (`Null` when not
/// JSON).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the dashboard");
    s.set_read_timeout(Some(T)).expect("read timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (
        status,
        serde_json::from_str(&payload).unwrap_or(Value::Null),
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `check` until it gives a value, for at most [`T`].
async fn wait_for<V>(what: &str, mut check: impl FnMut() -> Option<V>) -> V {
    let deadline = Instant::now() + T;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The id `call` prints (no `--wait`).
fn sent_id(stdout: &str) -> String {
    let id = stdout.trim().to_owned();
    assert_eq!(id.len(), 36, "call printed {stdout:?}");
    id
}

#[test]
fn commands_that_need_task_code_are_refused_with_a_hint() {
    for sub in ["worker", "beat", "tasks"] {
        let o = celeriac().arg(sub).output().expect("run celeriac");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{sub}: {err}");
        assert!(err.contains("needs task code"), "{sub}: {err}");
        assert!(err.contains("hint:"), "{sub}: {err}");
    }
    let help = celeriac().arg("--help").output().expect("run celeriac");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for shown in [
        "dashboard",
        "inspect",
        "control",
        "events",
        "call",
        "result",
        "queues",
        "purge",
    ] {
        assert!(help.contains(shown), "--help lacks {shown}:\n{help}");
    }
    for hidden in ["  worker", "  beat", "  tasks"] {
        assert!(!help.contains(hidden), "--help shows {hidden}:\n{help}");
    }
    assert!(help.contains("Usage: celeriac"), "{help}");
    // No broker named: a usage error, and no celeriac.db made as a side effect.
    let _ = std::fs::remove_file(test_dir().join("celeriac.db"));
    let o = celeriac()
        .args(["inspect", "ping"])
        .output()
        .expect("run celeriac");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("needs the cluster's broker") && err.contains("-b URL"),
        "{err}"
    );
    assert!(!test_dir().join("celeriac.db").exists());
    // Bad input is a clear error, not a panic.
    let o = celeriac()
        .args(["-b", "redis://127.0.0.1:1/0", "inspect", "ping"])
        .output()
        .expect("run celeriac");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect to redis"), "{err}");
    let o = celeriac()
        .args(["-b", "memory://", "call", "tasks.add"])
        .args(["--args", "{not json"])
        .output()
        .expect("run celeriac");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--args must be a JSON array"), "{err}");
    let o = celeriac()
        .args(["-b", "nosuch://x", "inspect", "ping"])
        .output()
        .expect("run celeriac");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_lists_the_python_worker_and_what_it_runs() {
    let Some((redis, q)) = redis_cluster("sa-inspect").await else {
        return;
    };
    let url = redis.url();
    let w = PyWorker::start(&url, &url, &q).await;
    let node = w.node.as_str();

    let ping: Value =
        serde_json::from_str(&run_ok(&url, None, &["inspect", "ping", "-j"])).expect("ping --json");
    assert_eq!(ping[node], json!({"ok": "pong"}), "{ping}");
    let text = run_ok(&url, None, &["inspect", "ping"]);
    assert!(text.contains(&format!("->  {node}: OK")), "{text}");

    let reg: Value = serde_json::from_str(&run_ok(&url, None, &["inspect", "registered", "-j"]))
        .expect("registered --json");
    let names = reg[node].as_array().expect("a list of task names");
    for t in ["tasks.add", "tasks.sleep", "tasks.fail"] {
        assert!(names.contains(&json!(t)), "{reg}");
    }

    let stats: Value = serde_json::from_str(&run_ok(&url, None, &["inspect", "stats", "-j"]))
        .expect("stats --json");
    assert_eq!(stats[node]["pid"], json!(w._child.0.id()), "{stats}");
    assert!(stats[node]["pool"].is_object(), "{stats}");
    assert_eq!(stats[node]["broker"]["transport"], "redis", "{stats}");

    // A task the worker is running shows in `inspect active`.
    let id = sent_id(&run_ok(
        &url,
        None,
        &["call", "tasks.sleep", "--args", "[3]", "-Q", &q],
    ));
    let active = wait_for("the sleeping task in inspect active", || {
        let v: Value =
            serde_json::from_str(&run_ok(&url, None, &["inspect", "active", "-j"])).ok()?;
        let found = v[node]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["id"] == json!(id)));
        found.then_some(v)
    })
    .await;
    let task = active[node]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == json!(id))
        .unwrap();
    assert_eq!(task["name"], "tasks.sleep", "{active}");
    assert_eq!(task["hostname"], json!(node), "{active}");

    let queues = run_ok(&url, None, &["inspect", "active_queues", "-j"]);
    let queues: Value = serde_json::from_str(&queues).expect("active_queues --json");
    assert_eq!(queues[node][0]["name"], json!(q), "{queues}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_runs_a_python_task_and_result_reads_it() {
    let Some((redis, q)) = redis_cluster("sa-call").await else {
        return;
    };
    let url = redis.url();
    let _w = PyWorker::start(&url, &url, &q).await;

    let out = run_ok(
        &url,
        None,
        &["call", "tasks.add", "--args", "[2, 3]", "-Q", &q, "--wait"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
    assert_eq!(out.lines().nth(1), Some("5"), "{out}");

    let id = sent_id(&run_ok(
        &url,
        None,
        &[
            "call",
            "tasks.echo",
            "--kwargs",
            r#"{"value": {"a": [1, "b"]}}"#,
            "-Q",
            &q,
        ],
    ));
    let out = run_ok(&url, None, &["result", &id, "--wait", "--timeout", "30"]);
    assert_eq!(out.lines().next(), Some(format!("{id} SUCCESS").as_str()));
    let value: Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(value, json!({"a": [1, "b"]}));

    // A Python exception comes back with its traceback, and exit code 2.
    let o = run(
        &url,
        None,
        &[
            "call",
            "tasks.fail",
            "--args",
            r#"["boom"]"#,
            "-Q",
            &q,
            "--wait",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("FAILURE"), "{out}");
    assert!(out.contains("ValueError: boom"), "{out}");
    assert!(out.contains("Traceback"), "{out}");

    // Nothing ran on the default queue, which no worker consumes, and `queues` says so.
    let sent = sent_id(&run_ok(
        &url,
        None,
        &["call", "tasks.add", "--args", "[1, 1]"],
    ));
    let o = run(&url, None, &["result", &sent]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("PENDING"));
    let table = run_ok(&url, None, &["queues"]);
    let celery_row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("celery"))
        .unwrap_or_else(|| panic!("no celery row:\n{table}"));
    assert_eq!(
        celery_row.split_whitespace().nth(1),
        Some("1"),
        "one ready message on celery:\n{table}"
    );
    let out = run_ok(&url, None, &["purge", "-f", "-Q", "celery"]);
    assert!(out.contains("purged 1 message(s) from celery"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_show_the_python_workers_task_events() {
    let Some((redis, q)) = redis_cluster("sa-events").await else {
        return;
    };
    let url = redis.url();
    let w = PyWorker::start(&url, &url, &q).await;
    let out_path = test_dir().join(format!("standalone-events-{}.txt", std::process::id()));
    let mut dump = celeriac();
    dump.args(["-b", &url, "events", "--dump", "--duration", "20"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null());
    let _dump = Killed(dump.spawn().expect("spawn celeriac events"));
    // Pub/sub and event queues keep nothing for a consumer that is not there yet: send until
    // the dump has seen a task of ours from start to end.
    let deadline = Instant::now() + T;
    let (id, text) = loop {
        let id = sent_id(&run_ok(
            &url,
            None,
            &["call", "tasks.add", "--args", "[20, 22]", "-Q", &q],
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("task-succeeded") && l.contains(&id))
        {
            break (id, text);
        }
        assert!(Instant::now() < deadline, "no task events dumped:\n{text}");
    };
    let line = |kind: &str| {
        text.lines()
            .find(|l| l.contains(kind) && l.contains(&id))
            .unwrap_or_else(|| panic!("no {kind} of {id}:\n{text}"))
            .to_owned()
    };
    assert!(line("task-received").starts_with(&w.node), "{text}");
    assert!(line("task-received").contains("name=tasks.add"), "{text}");
    assert!(line("task-received").contains("args=[20,22]"), "{text}");
    assert!(line("task-started").starts_with(&w.node), "{text}");
    assert!(line("task-succeeded").contains("result=42"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&w.node) && l.contains("worker-heartbeat")),
        "no heartbeat from the Python worker:\n{text}"
    );
}

/// A Python worker on `idle` only, with a task waiting on `q`, which it does not consume yet:
/// a task that is truly queued (in the broker, not prefetched by the worker).
async fn worker_and_queued_task(
    broker: &str,
    backend: Option<&str>,
    q: &str,
) -> (PyWorker, String) {
    let idle = format!("{q}-idle");
    let w = PyWorker::start(broker, backend.unwrap_or(broker), &idle).await;
    let queued = sent_id(&run_ok(
        broker,
        backend,
        &["call", "tasks.add", "--args", "[1, 2]", "-Q", q],
    ));
    (w, queued)
}

/// Tells `w` to consume `q` too (`control add_consumer`), then checks that it discarded
/// `queued`, which was revoked before, and ran a task sent after it.
async fn consume_and_check_discarded(
    broker: &str,
    backend: Option<&str>,
    w: &PyWorker,
    q: &str,
    queued: &str,
) {
    let out = run_ok(
        broker,
        backend,
        &["control", "add_consumer", "-j", "-d", &w.node, "-t", "5", q],
    );
    assert!(out.contains(&w.node), "{out}");
    let state = wait_for("the queued task REVOKED", || {
        let o = run(broker, backend, &["result", queued]);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.contains("REVOKED").then_some(s)
    })
    .await;
    assert!(state.starts_with(queued), "{state}");
    // The queue is served now, and the revoked task never ran.
    let out = run_ok(
        broker,
        backend,
        &["call", "tasks.add", "--args", "[5, 5]", "-Q", q, "--wait"],
    );
    assert_eq!(out.lines().nth(1), Some("10"), "{out}");
    let o = run(broker, backend, &["result", queued]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("REVOKED"));
    let log = w.log();
    assert!(
        log.contains(&format!("Discarding revoked task: tasks.add[{queued}]")),
        "{log}"
    );
    assert!(
        !log.contains(&format!("tasks.add[{queued}] succeeded")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_revoke_stops_a_queued_task_on_the_python_worker() {
    let Some((redis, q)) = redis_cluster("sa-revoke").await else {
        return;
    };
    let url = redis.url();
    let (w, queued) = worker_and_queued_task(&url, None, &q).await;
    let table = run_ok(&url, None, &["queues"]);
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(q.as_str()))
        .unwrap_or_else(|| panic!("no row for {q}:\n{table}"));
    assert_eq!(row.split_whitespace().nth(1), Some("1"), "{table}");
    // Flags before the ids: `control`'s id list takes hyphenated values (see the report).
    let out = run_ok(&url, None, &["control", "revoke", "-j", &queued]);
    let replies: Value = serde_json::from_str(&out).expect("revoke --json");
    assert!(
        replies[&w.node]["ok"]
            .as_str()
            .is_some_and(|s| s.contains(&queued)),
        "{replies}"
    );
    // `control revoke` only tells the workers (it stores nothing): Celery 5.7's worker
    // stores REVOKED when told, and discards the task when it reaches it.
    let revoked = run_ok(&url, None, &["inspect", "revoked", "-j"]);
    assert!(revoked.contains(&queued), "{revoked}");
    consume_and_check_discarded(&url, None, &w, &q, &queued).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_api_shows_and_steers_the_python_cluster() {
    let Some((redis, q)) = redis_cluster("sa-dash").await else {
        return;
    };
    let url = redis.url();
    let w = PyWorker::start(&url, &url, &q).await;
    let node = w.node.clone();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut dash = celeriac();
    dash.args(["-b", &url, "dashboard", "--bind", &bind])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _dash = Killed(dash.spawn().expect("spawn the dashboard"));
    wait_for("the dashboard answering", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;

    let workers = wait_for("the Python worker in /api/workers", || {
        let (code, v) = http(port, "GET", "/api/workers", None);
        (code == 200
            && v["workers"]
                .as_array()?
                .iter()
                .any(|w| w["hostname"] == json!(node) && w["online"] == json!(true)))
        .then_some(v)
    })
    .await;
    let me = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hostname"] == json!(node))
        .unwrap();
    assert_eq!(me["sw_ident"], "py-celery", "{workers}");

    // Tasks run by the Python worker, seen through its events.
    let ok = sent_id(&run_ok(
        &url,
        None,
        &["call", "tasks.add", "--args", "[2, 3]", "-Q", &q],
    ));
    let bad = sent_id(&run_ok(
        &url,
        None,
        &["call", "tasks.fail", "--args", r#"["boom"]"#, "-Q", &q],
    ));
    let tasks = wait_for("both tasks in /api/tasks", || {
        let (_, v) = http(port, "GET", "/api/tasks", None);
        let list = v["tasks"].as_array()?;
        let done = |id: &str, state: &str| {
            list.iter()
                .any(|t| t["id"] == json!(id) && t["state"] == json!(state))
        };
        (done(&ok, "SUCCESS") && done(&bad, "FAILURE")).then_some(v)
    })
    .await;
    let find = |id: &str| {
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(id))
            .unwrap()
            .clone()
    };
    assert_eq!(find(&ok)["name"], "tasks.add");
    assert_eq!(find(&ok)["result"], "5");
    assert_eq!(find(&ok)["worker"], json!(node));
    assert_eq!(find(&bad)["exception"], "ValueError('boom')");
    let (code, one) = http(port, "GET", &format!("/api/tasks/{ok}"), None);
    assert_eq!(code, 200, "{one}");

    // The queue, with its length.
    let (code, queues) = http(port, "GET", "/api/queues", None);
    assert_eq!(code, 200, "{queues}");
    assert!(
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == json!(q) && x["ready"] == json!(0)),
        "{queues}"
    );

    // Send by name through the API; revoke it while it waits in a queue no worker consumes
    // yet, then have the worker consume that queue: the worker discards it.
    let later = format!("{q}-later");
    let (code, sent) = http(
        port,
        "POST",
        "/api/tasks/tasks.add",
        Some(&json!({"args": [1, 2], "options": {"queue": later}})),
    );
    assert!(code == 200 || code == 202, "{code} {sent}");
    assert_eq!(sent["queue"], json!(later), "{sent}");
    let queued = sent["task_id"].as_str().expect("the sent id").to_owned();
    let (code, r) = http(
        port,
        "POST",
        &format!("/api/tasks/{queued}/revoke"),
        Some(&json!({})),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["broadcast"], true, "{r}");
    let (code, r) = http(
        port,
        "POST",
        "/api/control/add_consumer",
        Some(&json!({"arguments": {"queue": later}, "destination": [node]})),
    );
    assert_eq!(code, 200, "{r}");
    wait_for("the revoked task discarded by the Python worker", || {
        w.log()
            .contains(&format!("Discarding revoked task: tasks.add[{queued}]"))
            .then_some(())
    })
    .await;
    // Its own task-revoked event reaches the dashboard.
    wait_for("REVOKED in /api/tasks", || {
        let (_, v) = http(port, "GET", &format!("/api/tasks/{queued}"), None);
        v.to_string().contains("REVOKED").then_some(())
    })
    .await;
    let out = run_ok(
        &url,
        None,
        &[
            "call",
            "tasks.add",
            "--args",
            "[5, 5]",
            "-Q",
            &later,
            "--wait",
        ],
    );
    assert_eq!(out.lines().nth(1), Some("10"), "{out}");
    assert!(!w.log().contains(&format!("tasks.add[{queued}] succeeded")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cluster_on_rabbitmq_is_seen_and_steered_too() {
    if !require_python() || !require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let Some(redis) = PrivateRedis::start().await else {
        return;
    };
    let backend = redis.url();
    let q = unique_queue("sa-amqp");
    let (w, queued) = worker_and_queued_task(AMQP, Some(&backend), &q).await;
    let node = w.node.as_str();
    // Other tests' workers may share this broker: ask ours by name.
    let ping = run_ok(
        AMQP,
        Some(&backend),
        &["inspect", "ping", "-d", node, "-j", "-t", "3"],
    );
    let ping: Value = serde_json::from_str(&ping).expect("ping --json");
    assert_eq!(ping[node], json!({"ok": "pong"}), "{ping}");
    let idle = format!("{q}-idle");
    let out = run_ok(
        AMQP,
        Some(&backend),
        &[
            "call",
            "tasks.mul",
            "--args",
            "[6, 7]",
            "-Q",
            &idle,
            "--wait",
        ],
    );
    assert_eq!(out.lines().nth(1), Some("42"), "{out}");
    let out = run_ok(
        AMQP,
        Some(&backend),
        &["control", "revoke", "-d", node, "-j", &queued],
    );
    assert!(out.contains(&queued), "{out}");
    consume_and_check_discarded(AMQP, Some(&backend), &w, &q, &queued).await;

    // The dashboard lists the queues the Python worker consumes, which RabbitMQ cannot list
    // to it (no management API): it learns them from the workers' `active_queues`.
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut dash = celeriac();
    dash.args([
        "-b",
        AMQP,
        "--result-backend",
        &backend,
        "dashboard",
        "--bind",
        &bind,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _dash = Killed(dash.spawn().expect("spawn the dashboard"));
    wait_for("the dashboard answering", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    wait_for("the Python worker's queues in /api/queues", || {
        let (code, v) = http(port, "GET", "/api/queues", None);
        let names: Vec<&str> = v["queues"]
            .as_array()?
            .iter()
            .filter_map(|q| q["name"].as_str())
            .collect();
        (code == 200 && names.contains(&idle.as_str()) && names.contains(&q.as_str())).then_some(())
    })
    .await;
}
