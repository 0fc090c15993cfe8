//! Celery's cache result backend (`cache+memcached://`) shared with Python: tasks travel
//! through Redis, results through a private memcached (Debian's `memcached`, started on a
//! free port; skipped with a notice when missing). Python's side is Celery 5.7, whose cache
//! backend runs on pymemcache (a `HashClient` over several servers).

use celeriac::{App, ErrorKind, TaskState};
use celeriac_examples::{add, echo, fail, mul, sleep, xsum};
use celeriac_test::memcached::Memcached;
use celeriac_test::python::PythonWorker;
use serde_json::json;

use crate::support::{OurWorker, PythonOnly, T, python, setup_python_only};

/// The test's Redis (tasks) and memcached (results) as a [`crate::support::Place`].
struct Mc {
    redis: PythonOnly,
    backend: String,
}

impl crate::support::Place for Mc {
    fn url(&self) -> &str {
        &self.redis.url
    }
    fn queue(&self) -> &str {
        &self.redis.queue
    }
    fn backend(&self) -> &str {
        &self.backend
    }
}

async fn client(broker: &str, backend: &str) -> App {
    App::builder()
        .broker_url(broker)
        .result_backend(backend)
        .task::<add>()
        .task::<mul>()
        .task::<xsum>()
        .task::<echo>()
        .task::<fail>()
        .task::<sleep>()
        .build()
        .await
        .unwrap_or_else(|e| panic!("open {backend}: {e:?}"))
}

/// Celery's client reads, through its cache backend, what our worker stored: a result, a
/// failure with its traceback, a group (saved and restored), and the raw value's Python type.
const PY_READS: &str = r#"
import json, os
import tasks
from celery import group
from celery.result import GroupResult
from pymemcache.client.base import Client

app = tasks.app
q = os.environ["QUEUE"]
T = 30
out = {"backend": type(app.backend).__name__, "client": type(app.backend.client).__name__}

r = app.send_task("tasks.add", (2, 3), queue=q)
out["add"] = r.get(timeout=T)
out["add_worker"] = r.worker
out["add_id"] = r.id

r = app.send_task("tasks.fail", ("boom: ünïcode",), queue=q)
try:
    r.get(timeout=T)
    out["fail"] = "no exception"
except Exception as e:
    out["fail"] = {"type": type(e).__name__, "args": list(e.args), "state": r.state,
                   "traceback": r.traceback}

g = group(app.signature("tasks.add", (i, i), queue=q) for i in range(16)).apply_async()
out["group"] = g.get(timeout=T)
g.save()
back = GroupResult.restore(g.id, app=app)
out["group_restored"] = [x.id for x in back.results] == [x.id for x in g.results]
out["group_id"] = g.id

# Where each result is: every key on exactly one server, both servers used.
servers = os.environ["MC_SERVERS"].split(";")
per_server = [Client(s) for s in servers]
keys = ["celery-task-meta-" + x.id for x in g.results] + ["celery-task-meta-" + out["add_id"]]
out["holders"] = [sum(c.get(k) is not None for c in per_server) for k in keys]
out["servers_used"] = sum(any(c.get(k) is not None for k in keys) for c in per_server)

# Celery's global_keyprefix on this backend, for ours to compare.
from celery import Celery
other = Celery("prefixed")
other.conf.result_backend = os.environ["CELERY_RESULT_BACKEND"]
other.conf.result_backend_transport_options = {"global_keyprefix": "app"}
out["prefixed"] = [other.backend.get_key_for_task("t"), other.backend.get_key_for_group("g"),
                   other.backend.get_key_for_chord("g")]

# What pymemcache hands Celery: the stored bytes.
raw = app.backend.client.get("celery-task-meta-" + out["add_id"])
out["raw_type"] = type(raw).__name__
out["raw"] = json.loads(raw)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_reads_our_results_from_memcached() {
    let Some(redis) = setup_python_only(7, "mc-py") else {
        return;
    };
    let (Some(a), Some(b)) = (Memcached::start(), Memcached::start()) else {
        return;
    };
    // Two servers, as Celery spells them: keys spread by pymemcache's rendezvous hashing.
    let env = Mc {
        redis,
        backend: format!("cache+memcached://{};{}/", a.addr(), b.addr()),
    };
    let w = OurWorker::start_on(&env.redis.url, &env.backend, &[&env.redis.queue], &[]).await;
    let servers = format!("{};{}", a.addr(), b.addr());
    let out = python(PY_READS, &env, &[("MC_SERVERS", &servers)]).await;
    let log = || format!("our worker's log:\n{}", w.log());
    assert_eq!(out["backend"], "CacheBackend", "{out}");
    assert_eq!(out["client"], "HashClient", "{out}");
    assert_eq!(out["add"], 5, "{out}\n{}", log());
    assert_eq!(out["add_worker"], w.node_name(), "{out}");
    let fail = &out["fail"];
    assert_eq!(fail["type"], "ValueError", "{out}");
    assert_eq!(fail["args"], json!(["boom: ünïcode"]), "{out}");
    assert_eq!(fail["state"], "FAILURE", "{out}");
    assert!(
        fail["traceback"].as_str().is_some_and(|t| !t.is_empty()),
        "a failure carries its traceback: {out}"
    );
    let evens: Vec<i64> = (0..16).map(|i| 2 * i).collect();
    assert_eq!(out["group"], json!(evens), "{out}");
    assert_eq!(out["group_restored"], true, "{out}");
    assert_eq!(
        out["holders"],
        json!(vec![1; 17]),
        "each result on one server: {out}"
    );
    assert_eq!(out["servers_used"], 2, "{out}");
    assert_eq!(
        out["raw_type"], "bytes",
        "pymemcache hands back the bytes: {out}"
    );
    assert_eq!(out["raw"]["status"], "SUCCESS", "{out}");
    assert_eq!(out["raw"]["task_id"], out["add_id"], "{out}");

    // Celery's global_keyprefix names keys as ours does.
    let prefixed = celeriac_memcached_keys(&a.url()).await;
    assert_eq!(out["prefixed"], json!(prefixed), "{out}");

    // And we read the group Python saved.
    let app = client(&env.redis.url, &env.backend).await;
    let gid = out["group_id"].as_str().unwrap();
    let back = celeriac::GroupResult::<i64>::restore(&app, gid)
        .await
        .unwrap()
        .expect("the group Python saved");
    assert_eq!(back.join(Some(T)).await.unwrap(), evens);
}

/// Python's worker stores; our client reads (a result, a failure with its traceback, a
/// group), and Python's client reads what our client saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_a_python_workers_results_from_memcached() {
    let Some(redis) = setup_python_only(7, "mc-rs") else {
        return;
    };
    let Some(server) = Memcached::start() else {
        return;
    };
    let backend = server.url();
    let py = PythonWorker::start(&redis.url, &backend, &[&redis.queue]).await;
    let app = client(&redis.url, &backend).await;
    let q = redis.queue.as_str();
    let log = || format!("python worker's log:\n{}", py.log());

    let sum = add::s(2, 3).queue(q).apply_async(&app).await.unwrap();
    assert_eq!(sum.get_timeout(T).await.unwrap(), 5, "{}", log());
    let meta = sum.meta().await.unwrap();
    assert_eq!(meta.worker.as_deref(), Some(py.node_name()), "{meta:?}");
    assert_eq!(meta.name.as_deref(), Some("tasks.add"), "{meta:?}");

    let failed = fail::s("boom".to_owned())
        .queue(q)
        .apply_async(&app)
        .await
        .unwrap();
    let err = failed.get_timeout(T).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed, "{err:?}\n{}", log());
    assert_eq!(err.remote().unwrap().exc_type, "ValueError", "{err:?}");
    assert_eq!(failed.state().await.unwrap(), TaskState::Failure);
    let tb = failed.traceback().await.unwrap().expect("a traceback");
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");

    let g = celeriac::group((0..4).map(|i| add::s(i, i).queue(q)))
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(
        g.join(Some(T)).await.unwrap(),
        vec![0, 2, 4, 6],
        "{}",
        log()
    );
    g.save().await.unwrap();

    let env = Mc {
        redis,
        backend: backend.clone(),
    };
    let out = python(
        r#"
import json, os
import tasks
from celery.result import GroupResult
g = GroupResult.restore(os.environ["GID"], app=tasks.app)
print(json.dumps(g.get(timeout=30)))
"#,
        &env,
        &[("GID", g.id())],
    )
    .await;
    assert_eq!(
        out,
        json!([0, 2, 4, 6]),
        "Python restores the group we saved"
    );
}

/// A chord built by Celery's client (which sets `chord-unlock-<gid>` to 0 and saves the group)
/// runs on our worker, which counts its parts with `incr` on that key as Celery's workers do.
const PY_CHORDS: &str = r#"
import json, os
from celery import chord, group
from celery.result import AsyncResult
import tasks

app = tasks.app
q = os.environ["QUEUE"]
T = 30
s = lambda name, *args: app.signature(name, args, queue=q)
out = {}
r = chord(group(s("tasks.add", i, i) for i in range(6)))(s("tasks.tsum"))
out["chord"] = r.get(timeout=T)
r = chord([s("tasks.add", 1, 1), s("tasks.fail", "header")])(s("tasks.tsum"))
# The body's own result (r.get would raise the failed header member's error first).
try:
    AsyncResult(r.id, app=app).get(timeout=T)
    out["chord_error"] = None
except Exception as e:
    out["chord_error"] = type(e).__name__
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chords_complete_on_our_worker_through_memcached() {
    let Some(redis) = setup_python_only(7, "mc-chord-py") else {
        return;
    };
    let Some(server) = Memcached::start() else {
        return;
    };
    let env = Mc {
        redis,
        backend: server.url(),
    };
    let w = OurWorker::start_on(&env.redis.url, &env.backend, &[&env.redis.queue], &[]).await;
    let out = python(PY_CHORDS, &env, &[]).await;
    assert_eq!(
        out,
        json!({"chord": 30, "chord_error": "ChordError"}),
        "our worker's log:\n{}",
        w.log()
    );
}

/// Ours on a Python worker: our client sets the counter and saves the group as Celery's does,
/// and Celery's worker completes the chord.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chords_complete_on_a_python_worker_through_memcached() {
    let Some(redis) = setup_python_only(7, "mc-chord-rs") else {
        return;
    };
    let Some(server) = Memcached::start() else {
        return;
    };
    let backend = server.url();
    let py = PythonWorker::start(&redis.url, &backend, &[&redis.queue]).await;
    let app = client(&redis.url, &backend).await;
    let q = redis.queue.as_str();
    let log = || format!("python worker's log:\n{}", py.log());
    let c = celeriac::chord(
        celeriac::group((0..6).map(|i| add::s(i, i).queue(q))),
        celeriac::Signature::<i64>::new("tasks.tsum").queue(q),
    )
    .apply_async(&app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 30, "{}", log());
    let failed = celeriac::chord(
        celeriac::group([
            add::s(1, 1).queue(q).untyped(),
            celeriac::Signature::<serde_json::Value>::new("tasks.fail")
                .arg("header")
                .queue(q),
        ]),
        celeriac::Signature::<i64>::new("tasks.tsum").queue(q),
    )
    .apply_async(&app)
    .await
    .unwrap();
    let e = failed.get_timeout(T).await.unwrap_err();
    assert_eq!(
        e.remote().unwrap().exc_type,
        "ChordError",
        "{e:?}\n{}",
        log()
    );
}

/// memcached killed and restarted under our worker (tasks through Redis; no Python): results
/// stored before are gone and a wait for one says so; tasks that finished while it was down
/// store their results once it is back (the worker retries a final state until it is stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_worker_rides_out_a_memcached_restart() {
    if !celeriac_test::services::require_service("redis", crate::support::REDIS) {
        return;
    }
    let Some(mut server) = Memcached::start() else {
        return;
    };
    let url = format!("redis://{}/7", crate::support::REDIS);
    let q = celeriac_test::services::unique_queue("mc-restart");
    let w = OurWorker::start_on(&url, &server.url(), &[&q], &[]).await;
    let app = client(&url, &server.url()).await;
    let log = || format!("our worker's log:\n{}", w.log());

    let mut before = Vec::new();
    for i in 0..10 {
        before.push(add::s(i, 1).queue(&q).apply_async(&app).await.unwrap());
    }
    for (i, r) in before.iter().enumerate() {
        assert_eq!(r.get_timeout(T).await.unwrap(), i as i64 + 1, "{}", log());
    }
    // Some tasks run across the kill, more are sent while memcached is down.
    let mut during = Vec::new();
    for _ in 0..4 {
        during.push(sleep::s(0.5).queue(&q).apply_async(&app).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    server.kill();
    let mut sent_down = Vec::new();
    for i in 0..10 {
        sent_down.push(add::s(i, 100).queue(&q).apply_async(&app).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    server.restart();

    for r in &during {
        assert_eq!(r.get_timeout(T).await.unwrap(), 0.5, "{}", log());
    }
    for (i, r) in sent_down.iter().enumerate() {
        assert_eq!(r.get_timeout(T).await.unwrap(), i as i64 + 100, "{}", log());
    }
    assert!(
        w.log().contains("cannot store the task's state; retrying"),
        "the worker retried while memcached was down:\n{}",
        log()
    );
    // What memcached held before the kill is lost, and the wait says why.
    assert_eq!(before[0].state().await.unwrap(), TaskState::Pending);
    let e = before[0]
        .get_timeout(std::time::Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
    assert!(e.to_string().contains("restarted"), "{e}");
}

/// Our task, group and chord keys of `t`/`g` under the prefix `app`.
async fn celeriac_memcached_keys(url: &str) -> [String; 3] {
    let b = celeriac_memcached::MemcachedBackend::connect(
        &format!("{url}?global_keyprefix=app"),
        &celeriac::Config::default(),
    )
    .await
    .unwrap();
    [b.task_key("t"), b.group_key("g"), b.chord_key("g")]
}
