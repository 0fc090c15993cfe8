//! Celery's own tools against our worker: `celery inspect`, `celery control`, `celery status`,
//! `celery events --dump`, `AsyncResult.revoke()` and Flower 2.2, on Redis; and our
//! `inspect` against Python workers in a mixed cluster.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use celeriac_test::python::{PythonWorker, celery, python_dir};
use serde_json::{Value, json};

use crate::support::{Interop, OurWorker, T, python, setup};

/// Runs `celery -b <url> <args>` and returns its output (bounded to a minute).
async fn celery_cli(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(celery())
        .current_dir(python_dir())
        .args(["-b", url])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn celery");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("celery output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("celery {args:?} ran over a minute");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `celery inspect <cmd> --json -d <node>`: the node's answer.
async fn inspect(env: &Interop, node: &str, cmd: &[&str]) -> Value {
    remote(env, "inspect", node, cmd).await
}

/// `celery control <cmd> --json -d <node>`: the node's answer.
async fn control(env: &Interop, node: &str, cmd: &[&str]) -> Value {
    remote(env, "control", node, cmd).await
}

/// `celery <kind> <cmd> --json -d <node>`: the node's answer (inspect prints a map of node to
/// answer, control a list of such maps).
async fn remote(env: &Interop, kind: &str, node: &str, cmd: &[&str]) -> Value {
    let mut args = vec![kind];
    args.extend_from_slice(cmd);
    args.extend_from_slice(&["--json", "-t", "5", "-d", node]);
    let o = celery_cli(&env.url, &args, &[]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "celery {args:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("celery {args:?} printed no JSON ({e}): {out}"));
    let maps = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    maps.into_iter()
        .find_map(|r| r.get(node).cloned())
        .unwrap_or_else(|| panic!("no answer from {node}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_inspect_and_control_see_and_steer_our_worker() {
    let Some(env) = setup(4, "control").await else {
        return;
    };
    let q = env.queue.as_str();
    let mut ours = OurWorker::start_with(&env.url, &[q], &["-P", "processes", "-E"]).await;
    let node = ours.node_name().to_owned();

    assert_eq!(inspect(&env, &node, &["ping"]).await, json!({"ok": "pong"}));
    let stats = inspect(&env, &node, &["stats"]).await;
    for key in [
        "total",
        "pid",
        "clock",
        "uptime",
        "pool",
        "broker",
        "prefetch_count",
    ] {
        assert!(stats.get(key).is_some(), "stats lacks {key}: {stats}");
    }
    assert_eq!(stats["broker"]["transport"], "redis");
    assert!(stats["broker"].get("password").is_none());
    let registered = inspect(&env, &node, &["registered"]).await;
    let names: Vec<&str> = registered
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(names.contains(&"tasks.add"), "{registered}");
    assert!(
        names.contains(&"tasks.limited [rate_limit=10/s]"),
        "{registered}"
    );
    let queues = inspect(&env, &node, &["active_queues"]).await;
    assert_eq!(queues[0]["name"], json!(q));
    assert!(inspect(&env, &node, &["conf"]).await.is_object());
    assert_eq!(inspect(&env, &node, &["scheduled"]).await, json!([]));
    assert_eq!(inspect(&env, &node, &["reserved"]).await, json!([]));

    // A running task shows in `active` and `query_task`; Python's revoke(terminate=True) stops
    // it in its pool child.
    let running = python(
        r#"
import json, os, tasks
r = tasks.app.send_task("tasks.stamp", (30,), queue=os.environ["QUEUE"])
print(json.dumps(r.id))
"#,
        &env,
        &[],
    )
    .await;
    let running = running.as_str().unwrap().to_owned();
    let deadline = Instant::now() + T;
    loop {
        let active = inspect(&env, &node, &["active"]).await;
        if active
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["id"] == json!(running)))
        {
            assert!(active[0]["worker_pid"].is_u64(), "{active}");
            break;
        }
        assert!(Instant::now() < deadline, "never active: {active}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let q_task = inspect(&env, &node, &["query_task", &running]).await;
    assert_eq!(q_task[&running][0], "active", "{q_task}");
    let revoked = python(
        r#"
import json, os, time, tasks
r = tasks.app.AsyncResult(os.environ["ID"])
t0 = time.time()
r.revoke(terminate=True)
try:
    r.get(timeout=20)
except Exception as e:
    print(json.dumps({"state": r.state, "error": repr(e), "took": time.time() - t0}))
"#,
        &env,
        &[("ID", &running)],
    )
    .await;
    assert_eq!(revoked["state"], "REVOKED", "{revoked}");
    assert_eq!(revoked["error"], "TaskRevokedError('terminated')");
    assert!(revoked["took"].as_f64().unwrap() < 10.0, "{revoked}");
    assert!(
        inspect(&env, &node, &["revoked"])
            .await
            .as_array()
            .unwrap()
            .contains(&json!(running))
    );

    // A queued task revoked from Python never runs.
    let queued = python(
        r#"
import json, os, tasks
a = tasks.app.send_task("tasks.stamp", (3,), queue=os.environ["QUEUE"], countdown=2)
a.revoke()
try:
    a.get(timeout=20)
except Exception as e:
    print(json.dumps({"state": a.state, "error": repr(e)}))
"#,
        &env,
        &[],
    )
    .await;
    assert_eq!(queued["state"], "REVOKED", "{queued}");

    // rate_limit changes the spacing of our runs: 4 tasks at 2/s take 1.5 s at least.
    assert_eq!(
        control(&env, &node, &["rate_limit", "tasks.add", "2/s"]).await,
        json!({"ok": "new rate limit set successfully"})
    );
    let spacing = python(
        r#"
import json, os, time, tasks
t0 = time.time()
rs = [tasks.app.send_task("tasks.add", (i, i), queue=os.environ["QUEUE"]) for i in range(4)]
print(json.dumps({"results": [r.get(timeout=30) for r in rs], "took": time.time() - t0}))
"#,
        &env,
        &[],
    )
    .await;
    assert_eq!(spacing["results"], json!([0, 2, 4, 6]));
    assert!(
        spacing["took"].as_f64().unwrap() >= 1.4,
        "2/s: 4 tasks took {}",
        spacing["took"]
    );
    assert_eq!(
        control(&env, &node, &["rate_limit", "tasks.add", "0"]).await,
        json!({"ok": "new rate limit set successfully"})
    );

    // pool_grow adds a slot and a child (-P processes).
    let stats = inspect(&env, &node, &["stats"]).await;
    let before = stats["pool"]["max-concurrency"].as_u64().unwrap();
    assert_eq!(
        control(&env, &node, &["pool_grow", "1"]).await,
        json!({"ok": "pool will grow"})
    );
    let deadline = Instant::now() + T;
    loop {
        let after = inspect(&env, &node, &["stats"]).await;
        assert_eq!(after["pool"]["max-concurrency"], json!(before + 1));
        // A child per slot (the one replaced after the terminate included).
        let children = after["pool"]["processes"].as_array().unwrap().len() as u64;
        if children == before + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no new child: {after}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `celery events --dump` shows our task and worker events.
    let dump = std::thread::spawn({
        let url = env.url.clone();
        move || {
            let mut c = Command::new("timeout")
                .args(["6"])
                .arg(celery())
                .args(["-b", &url, "events", "--dump"])
                .current_dir(python_dir())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("celery events");
            let out = c.stdout.take().unwrap();
            let text = std::io::read_to_string(out).unwrap_or_default();
            let _ = c.wait();
            text
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = python(
        r#"
import json, os, tasks
print(json.dumps(tasks.app.send_task("tasks.add", (40, 2), queue=os.environ["QUEUE"]).get(timeout=20)))
"#,
        &env,
        &[],
    )
    .await;
    assert_eq!(done, json!(42));
    let text = dump.join().unwrap();
    assert!(text.contains(&format!("{node} [")), "{text}");
    assert!(text.contains("task succeeded: tasks.add"), "{text}");
    assert!(text.contains("heartbeat"), "{text}");

    // `celery control shutdown` stops our worker cleanly. Like a Python worker, ours exits
    // without replying, so Celery's CLI reports that no node replied.
    let o = celery_cli(&env.url, &["control", "shutdown", "-d", &node], &[]).await;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No nodes replied"),
        "{o:?}"
    );
    let status = ours.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        ours.log()
    );
}

/// A process killed when dropped (Flower must not outlive a failed test).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Flower on `broker`, listening on `port`.
fn flower(broker: &str, port: u16) -> Killed {
    Killed(
        Command::new(celery())
            .current_dir(python_dir())
            .args(["-b", broker, "flower", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .env("FLOWER_UNAUTHENTICATED_API", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flower"),
    )
}

/// GETs Flower's API on `port`; `None` until it answers JSON.
fn get(port: u16, path: &str) -> Option<Value> {
    let o = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

/// Polls `check` until it gives a value.
async fn wait_for(what: &str, mut check: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + T;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "flower never showed {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_lists_our_worker_and_its_tasks_and_sees_it_go() {
    let Some(env) = setup(5, "flower").await else {
        return;
    };
    let q = env.queue.as_str();
    let mut ours = OurWorker::start_with(&env.url, &[q], &["-E"]).await;
    let node = ours.node_name().to_owned();
    let port = 5600 + u16::from(std::process::id() as u8 % 200);
    let _flower = flower(&env.url, port);
    // Flower listens to events from when it has connected: wait for it to see the worker.
    let workers = wait_for("our worker with stats", || {
        get(port, "/api/workers?refresh=1")
            .filter(|w| w[&node]["stats"]["pool"].is_object() && w[&node]["registered"].is_array())
    })
    .await;
    wait_for("our worker's heartbeats", || {
        get(port, "/api/workers?status=1").filter(|s| s[&node] == json!(true))
    })
    .await;
    let ids = python(
        r#"
import json, os, tasks
ok = tasks.app.send_task("tasks.add", (2, 3), queue=os.environ["QUEUE"])
bad = tasks.app.send_task("tasks.fail", ("boom",), queue=os.environ["QUEUE"])
ok.get(timeout=20)
try:
    bad.get(timeout=20)
except Exception:
    pass
print(json.dumps([ok.id, bad.id]))
"#,
        &env,
        &[],
    )
    .await;
    let (ok, bad) = (ids[0].as_str().unwrap(), ids[1].as_str().unwrap());
    assert!(
        workers[&node]["registered"]
            .as_array()
            .unwrap()
            .contains(&json!("tasks.add"))
    );
    assert!(workers[&node]["active_queues"][0]["name"] == json!(q));
    let tasks = wait_for("both tasks", || {
        get(port, "/api/tasks").filter(|t| t.get(ok).is_some() && t.get(bad).is_some())
    })
    .await;
    assert_eq!(tasks[ok]["state"], "SUCCESS");
    assert_eq!(tasks[ok]["args"], "[2, 3]");
    assert_eq!(tasks[ok]["result"], "5");
    assert!(tasks[ok]["runtime"].is_f64(), "{}", tasks[ok]);
    assert_eq!(tasks[ok]["worker"], json!(node));
    assert_eq!(tasks[bad]["state"], "FAILURE");
    assert_eq!(tasks[bad]["exception"], "ValueError('boom')");

    let status =
        |online: bool| get(port, "/api/workers?status=1").filter(|s| s[&node] == json!(online));
    wait_for("our worker online", || status(true)).await;
    let stopped = Instant::now();
    assert!(ours.terminate(Duration::from_secs(15)).await.is_some());
    wait_for("our worker offline", || status(false)).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "offline after {:?}",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_cluster_is_one_cluster_to_both_sides_tools() {
    let Some(env) = setup(4, "mixedctl").await else {
        return;
    };
    let q = env.queue.as_str();
    let py = PythonWorker::start(&env.url, &env.url, &[q]).await;
    let ours = OurWorker::start(&env.url, &[q]).await;
    let nodes = [py.node_name().to_owned(), ours.node_name().to_owned()];

    // Our inspect lists the Python worker, Python's lists ours.
    let pongs = env
        .app
        .control()
        .destination(nodes.clone())
        .timeout(Duration::from_secs(5))
        .inspect()
        .ping()
        .await
        .unwrap();
    for n in &nodes {
        assert_eq!(pongs.get(n), Some(&json!({"ok": "pong"})), "{pongs:?}");
    }
    let registered = env
        .app
        .control()
        .destination([py.node_name()])
        .inspect()
        .registered()
        .await
        .unwrap();
    assert!(
        registered[py.node_name()]
            .as_array()
            .unwrap()
            .contains(&json!("tasks.add")),
        "{registered:?}"
    );
    let dest = nodes.join(",");
    let o = celery_cli(
        &env.url,
        &["inspect", "ping", "--json", "-t", "5", "-d", &dest],
        &[],
    )
    .await;
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    for n in &nodes {
        assert_eq!(v[n], json!({"ok": "pong"}), "{v}");
    }
}

/// The same tools on RabbitMQ: `celery inspect`, `celery events --dump` and Flower see our
/// worker through the exchanges kombu declares there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_tools_see_our_worker_on_rabbitmq() {
    const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672")
        || !celeriac_test::python::require_python()
    {
        return;
    }
    let q = celeriac_test::services::unique_queue("ctl-amqp");
    let backend = "rpc://guest:guest@127.0.0.1:5672//";
    let mut ours = OurWorker::start_on(AMQP, backend, &[&q], &["-E"]).await;
    let node = ours.node_name().to_owned();
    let ask = |cmd: &'static str| {
        let node = node.clone();
        async move {
            let o = celery_cli(
                AMQP,
                &["inspect", cmd, "--json", "-t", "5", "-d", &node],
                &[],
            )
            .await;
            let v: Value = serde_json::from_slice(&o.stdout)
                .unwrap_or_else(|e| panic!("inspect {cmd}: {e}: {o:?}"));
            v[&node].clone()
        }
    };
    assert_eq!(ask("ping").await, json!({"ok": "pong"}));
    assert_eq!(ask("stats").await["broker"]["transport"], "amqp");
    assert!(
        ask("registered")
            .await
            .as_array()
            .unwrap()
            .contains(&json!("tasks.add"))
    );
    assert_eq!(ask("active_queues").await[0]["name"], json!(q));

    let port = 5800 + u16::from(std::process::id() as u8 % 150);
    let _flower = flower(AMQP, port);
    let workers = wait_for("our worker with stats", || {
        get(port, "/api/workers?refresh=1")
            .filter(|w| w[&node]["stats"]["pool"].is_object() && w[&node]["registered"].is_array())
    })
    .await;
    assert_eq!(workers[&node]["stats"]["broker"]["transport"], "amqp");
    wait_for("our worker online", || {
        get(port, "/api/workers?status=1").filter(|s| s[&node] == json!(true))
    })
    .await;
    let id = python(
        r#"
import json, os, tasks
r = tasks.app.send_task("tasks.add", (20, 22), queue=os.environ["QUEUE"])
print(json.dumps([r.id, r.get(timeout=20)]))
"#,
        &crate::support::Amqp {
            url: AMQP.into(),
            backend: backend.into(),
            queue: q.clone(),
        },
        &[],
    )
    .await;
    assert_eq!(id[1], json!(42));
    let id = id[0].as_str().unwrap().to_owned();
    let tasks = wait_for("the task", || {
        get(port, "/api/tasks").filter(|t| t[&id]["state"] == json!("SUCCESS"))
    })
    .await;
    assert_eq!(tasks[&id]["worker"], json!(node));
    assert!(ours.terminate(Duration::from_secs(15)).await.is_some());
    wait_for("our worker offline", || {
        get(port, "/api/workers?status=1").filter(|s| s[&node] == json!(false))
    })
    .await;
}
