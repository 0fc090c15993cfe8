//! Redis Sentinel (issue 23): `sentinel://` lists against private servers this test starts on
//! free loopback ports: a master, one replica and three Sentinels (quorum 2, master down after
//! 1 s, failover timeout 3 s), each with a password (the master's in the URL, the Sentinels'
//! in `sentinel_kwargs`).
//!
//! Needs `redis-server` (a Sentinel is `redis-server <conf> --sentinel`); skips with a notice
//! without it, unless `CELERIAC_REQUIRE_SERVICES=1`. Alone in its binary: it installs a global
//! log collector to check that no password reaches a log line.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use celeriac_core::{
    BeatStore, Broker, DynBackend, DynBroker, ErrorKind, Handler, PublishOptions, Registry,
    ResultBackend, TaskDef, TaskOptions, TaskState,
};
use celeriac_redis::{RedisBackend, RedisBeatStore, RedisBroker, RedisOptions};
use celeriac_test::services::{free_port, require_program, test_dir};
use celeriac_worker::{Worker, WorkerOptions};
use serde_json::json;
use tokio::time::Instant;

const MASTER_PW: &str = "master-pw-s3cret";
const SENTINEL_PW: &str = "sentinel-pw-s3cret";
const NAME: &str = "mymaster";

/// Everything logged by this test binary.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish(),
        )
        .expect("the only subscriber of this binary");
        logs
    })
}

fn assert_no_secret_logged() {
    let text = logs().text();
    for pw in [MASTER_PW, SENTINEL_PW] {
        assert!(!text.contains(pw), "a password reached the logs:\n{text}");
    }
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A master, a replica and three Sentinels on free loopback ports.
struct Cluster {
    master_port: u16,
    replica_port: u16,
    sentinel_ports: Vec<u16>,
    master: Option<Server>,
    _replica: Server,
    _sentinels: Vec<Server>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.master.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_server(args: &[&str]) -> Server {
    Server(
        Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    )
}

async fn raw(port: u16, password: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/0"))?
        .get_multiplexed_async_connection()
        .await
}

async fn wait_for(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Starts the servers and waits until every Sentinel knows the replica and the two other
    /// Sentinels (a failover needs them). `None` (after a notice) without `redis-server`.
    async fn start(tag: &str) -> Option<Cluster> {
        if !require_program("redis-server") {
            return None;
        }
        let dir = test_dir().join(format!("sentinel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (master_port, replica_port) = (free_port(), free_port());
        let common = |port: u16| {
            vec![
                "--port".to_owned(),
                port.to_string(),
                "--bind".to_owned(),
                "127.0.0.1".to_owned(),
                "--save".to_owned(),
                String::new(),
                "--appendonly".to_owned(),
                "no".to_owned(),
                "--requirepass".to_owned(),
                MASTER_PW.to_owned(),
                "--masterauth".to_owned(),
                MASTER_PW.to_owned(),
                "--dir".to_owned(),
                dir.display().to_string(),
                "--dbfilename".to_owned(),
                format!("{port}.rdb"),
            ]
        };
        let args = common(master_port);
        let master = redis_server(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut args = common(replica_port);
        args.extend(["--replicaof".to_owned(), "127.0.0.1".to_owned()]);
        args.push(master_port.to_string());
        let replica = redis_server(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut sentinel_ports = Vec::new();
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nrequirepass {SENTINEL_PW}\n\
                     sentinel sentinel-pass {SENTINEL_PW}\n\
                     sentinel monitor {NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel auth-pass {NAME} {MASTER_PW}\n\
                     sentinel down-after-milliseconds {NAME} 1000\n\
                     sentinel failover-timeout {NAME} 3000\n",
                    dir = dir.display()
                ),
            )
            .unwrap();
            sentinels.push(redis_server(&[conf.to_str().unwrap(), "--sentinel"]));
            sentinel_ports.push(port);
        }
        let cluster = Cluster {
            master_port,
            replica_port,
            sentinel_ports,
            master: Some(master),
            _replica: replica,
            _sentinels: sentinels,
            dir,
        };
        wait_for("the replica in sync", Duration::from_secs(30), async || {
            let Ok(mut c) = raw(replica_port, MASTER_PW).await else {
                return false;
            };
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await;
        for &port in &cluster.sentinel_ports {
            wait_for(
                "each sentinel knows the replica and the other sentinels",
                Duration::from_secs(30),
                async || {
                    let Ok(mut c) = raw(port, SENTINEL_PW).await else {
                        return false;
                    };
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(NAME)
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("sentinels")
                        .arg(NAME)
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    replicas.len() == 1 && others.len() == 2
                },
            )
            .await;
        }
        Some(cluster)
    }

    /// The `sentinel://` list, the master's password in the first URL; `dead` first, if given
    /// (a port nothing listens on, which the client must skip).
    fn url(&self, dead: Option<u16>, db: u32) -> String {
        let mut parts: Vec<String> = dead
            .into_iter()
            .chain(self.sentinel_ports.iter().copied())
            .map(|p| format!("sentinel://127.0.0.1:{p}"))
            .collect();
        parts[0] = parts[0].replace("sentinel://", &format!("sentinel://:{MASTER_PW}@"));
        parts[0].push_str(&format!("/{db}"));
        parts.join(";")
    }

    /// The master's port as the first Sentinel tells it.
    async fn master_by_sentinel(&self) -> Option<u16> {
        let mut c = raw(self.sentinel_ports[0], SENTINEL_PW).await.ok()?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(NAME)
            .query_async(&mut c)
            .await
            .ok()?;
        addr?.1.parse().ok()
    }
}

fn options() -> RedisOptions {
    RedisOptions::default()
        .master_name(NAME)
        .sentinel_credentials(None, Some(SENTINEL_PW))
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    free_port()
}

/// A wrong `master_name` fails at once with an error that names it and says where to set it,
/// not retried (it is not transient); a missing one says which option is missing; a dead
/// Sentinel listed first is skipped; a wrong Sentinel password is reported. No password is
/// shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_name_is_a_clear_error_and_dead_sentinels_are_skipped() {
    logs();
    let Some(cluster) = Cluster::start("names").await else {
        return;
    };
    let url = cluster.url(Some(dead_port()), 0);

    let started = Instant::now();
    let e = RedisBroker::connect_with(&url, options().master_name("no-such-master"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(!e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("no Sentinel knows a master named \"no-such-master\"")
            && text.contains("master_name"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not retried");
    // A dead Sentinel among them: still not a clear "unknown" (it might know), but transient
    // and naming what happened at each.
    assert!(
        !text.contains(MASTER_PW) && !text.contains(SENTINEL_PW),
        "{text}"
    );

    let e = RedisBackend::connect_with(&url, RedisOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("master_name") && e.contains("result_backend_transport_options"),
        "{e}"
    );
    assert!(!e.contains(MASTER_PW), "{e}");

    let e = RedisBroker::connect_with(&url, options().sentinel_credentials(None, Some("wrong")))
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", cluster.sentinel_ports[0])),
        "names the sentinels: {text}"
    );
    assert!(!text.contains(MASTER_PW), "{text}");

    // The right name, with a dead Sentinel first: connects through the next one, to the
    // master.
    let broker = RedisBroker::connect_with(&url, options().global_keyprefix("names:"))
        .await
        .expect("connect through the live sentinels");
    broker.declare("q").await.unwrap();
    let m = celeriac_test::services::test_message("tests.x");
    broker
        .publish("q", &m, PublishOptions::default())
        .await
        .unwrap();
    let mut c = raw(cluster.master_port, MASTER_PW).await.unwrap();
    let n: usize = redis::cmd("LLEN")
        .arg("names:q")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "the message is on the master");
    // The beat store opens through the Sentinels too.
    let store = RedisBeatStore::connect_with(&url, options().global_keyprefix("names:"))
        .await
        .expect("a beat store through the sentinels");
    store
        .put_entry("tick", &json!({"task": "tests.x"}))
        .await
        .unwrap();
    assert!(store.load().await.unwrap().contains_key("tick"));
    assert_no_secret_logged();
}

/// A record of one task run by the worker.
type Runs = Arc<Mutex<Vec<(String, Instant)>>>;

fn echo_registry(runs: Runs) -> Registry {
    let mut registry = Registry::new();
    let mut options = TaskOptions::default();
    options.acks_late = true;
    registry.insert(TaskDef {
        name: "tests.echo".into(),
        params: &[],
        options,
        handler: Handler::Async(Arc::new(move |ctx, _| {
            let runs = runs.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let id = ctx.id().to_owned();
                runs.lock().unwrap().push((id.clone(), Instant::now()));
                Ok(json!(id))
            })
        })),
    });
    registry
}

/// One publish by the client: the message id, when it began and ended, and what it returned.
struct Sent {
    id: String,
    began: Instant,
    ended: Instant,
    result: Result<(), String>,
}

/// The master is SIGKILLed while a worker consumes from the `sentinel://` URL and a client
/// keeps sending (acks-late tasks). Sentinel promotes the replica; the worker's consumer, the
/// client's publishes, the worker's result stores and a result waiter started before the kill
/// all follow it. Every task whose publish succeeded runs and its result is readable through
/// the Sentinel result backend, except (counted, reported, and allowed only there) a publish
/// the old master acknowledged in the last second before it died, which asynchronous
/// replication may not have passed on. Duplicates are counted and reported; the failover
/// time and the pause (kill → first task sent during the outage completed) are measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_nothing_acknowledged_is_lost() {
    logs();
    let Some(mut cluster) = Cluster::start("failover").await else {
        return;
    };
    let url = cluster.url(Some(dead_port()), 1);
    let options = options()
        .global_keyprefix("failover:")
        .visibility_timeout(Duration::from_secs(10))
        .retry_for(Duration::from_secs(60));
    let broker = RedisBroker::connect_with(&url, options.clone())
        .await
        .unwrap();
    let backend = RedisBackend::connect_with(&url, options.clone())
        .await
        .unwrap();
    let worker_broker = RedisBroker::connect_with(&url, options.clone())
        .await
        .unwrap();
    let worker_backend = RedisBackend::connect_with(&url, options.clone())
        .await
        .unwrap();
    let queue = "failover".to_owned();
    broker.declare(&queue).await.unwrap();

    let runs: Runs = Arc::default();
    let mut wo = WorkerOptions::default();
    wo.queues = vec![queue.clone()];
    wo.hostname = "sentinel@test".into();
    wo.concurrency = 4;
    wo.prefetch_buffer = 4;
    wo.visibility_timeout = Duration::from_secs(10);
    let worker = Worker::new(
        Arc::new(worker_broker) as DynBroker,
        Some(Arc::new(worker_backend) as DynBackend),
        Arc::new(echo_registry(runs.clone())),
        wo,
    );
    let shutdown = worker.shutdown_handle();
    let working = tokio::spawn(worker.run());

    // The client sends N tasks, one every 5 ms, whatever happens to the master.
    const N: usize = 800;
    let messages: Vec<_> = (0..N)
        .map(|_| celeriac_test::services::test_message("tests.echo"))
        .collect();
    let last_id = messages[N - 1].id().to_owned();
    let producing = {
        let (broker, queue) = (broker.clone(), queue.clone());
        tokio::spawn(async move {
            let mut sent = Vec::with_capacity(N);
            for m in messages {
                let began = Instant::now();
                let result = broker
                    .publish(&queue, &m, PublishOptions::default())
                    .await
                    .map_err(|e| format!("{e:#}"));
                sent.push(Sent {
                    id: m.id().to_owned(),
                    began,
                    ended: Instant::now(),
                    result,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    // A result waiter that starts before the kill, for the last task (sent after it).
    let waiting = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.wait(&last_id, Some(Duration::from_secs(120))).await })
    };

    wait_for("150 tasks run", Duration::from_secs(60), async || {
        runs.lock().unwrap().len() >= 150
    })
    .await;
    cluster.master.take(); // SIGKILL
    let killed = Instant::now();
    wait_for(
        "the sentinels promote the replica",
        Duration::from_secs(30),
        async || cluster.master_by_sentinel().await == Some(cluster.replica_port),
    )
    .await;
    let failover = killed.elapsed();

    let sent = tokio::time::timeout(Duration::from_secs(180), producing)
        .await
        .expect("the client sent everything")
        .unwrap();
    let failed: Vec<&Sent> = sent.iter().filter(|s| s.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "publishes failed (retry_for is 60 s): {:?}",
        failed.iter().map(|s| &s.result).collect::<Vec<_>>()
    );
    let waited = waiting
        .await
        .unwrap()
        .expect("the waiter follows the new master");
    assert_eq!(waited.status, TaskState::Success);

    // Every result, read through the Sentinel backend (lost acks are restored after the 10 s
    // visibility timeout, so allow for that).
    let mut missing: HashSet<String> = sent.iter().map(|s| s.id.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && Instant::now() < deadline {
        let ids: Vec<String> = missing.iter().cloned().collect();
        let metas = backend.get_many(&ids).await.unwrap();
        for (id, meta) in ids.iter().zip(metas) {
            if let Some(meta) = meta {
                if meta.status == TaskState::Success {
                    assert_eq!(meta.result, json!(id), "the result of {id}");
                    missing.remove(id);
                }
            }
        }
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let runs = runs.lock().unwrap().clone();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &runs {
        *count.entry(id.as_str()).or_default() += 1;
    }
    let duplicates: usize = count.values().map(|n| n - 1).sum();
    // Lost: acknowledged by the old master, never seen by the new one. Only a publish that
    // ended in the last second before the kill may be (asynchronous replication).
    let window = Duration::from_secs(1);
    for id in &missing {
        let s = sent.iter().find(|s| &s.id == id).unwrap();
        let in_window = s.ended <= killed && killed.duration_since(s.ended) <= window
            || s.began <= killed && s.ended >= killed;
        assert!(
            in_window,
            "task {id} was lost although its publish ended {:?} before the kill (ran {} times)",
            killed.saturating_duration_since(s.ended),
            count.get(id.as_str()).copied().unwrap_or(0)
        );
    }
    for s in &sent {
        if !missing.contains(&s.id) {
            assert!(
                count.contains_key(s.id.as_str()),
                "{} has a result but never ran",
                s.id
            );
        }
    }
    // The pause: from the kill to the first completed run of a task sent after it.
    let after: HashSet<&str> = sent
        .iter()
        .filter(|s| s.began > killed)
        .map(|s| s.id.as_str())
        .collect();
    let first_after = runs
        .iter()
        .filter(|(id, _)| after.contains(id.as_str()))
        .map(|(_, at)| at.duration_since(killed))
        .min()
        .expect("tasks sent after the kill ran");
    println!(
        "sentinel failover: {N} tasks sent, {} runs, {} lost (in the replication window), \
         {duplicates} duplicate runs; sentinels promoted the replica {} ms after the kill; \
         first task sent after the kill ran {} ms after it",
        runs.len(),
        missing.len(),
        failover.as_millis(),
        first_after.as_millis()
    );

    shutdown.warm();
    let _ = tokio::time::timeout(Duration::from_secs(30), working).await;
    let text = logs().text();
    assert!(
        text.contains("redis sentinel: the master moved from"),
        "the move is logged:\n{text}"
    );
    assert_no_secret_logged();
}

/// A Python Celery client on the same `sentinel://` list (kombu's Sentinel transport and
/// Celery's Sentinel result backend, `master_name` and `sentinel_kwargs` in its transport
/// options) sends a task that a celeriac worker on that list runs, and reads its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_on_the_same_sentinels_reaches_our_worker() {
    logs();
    if !celeriac_test::python::require_python() {
        return;
    }
    let Some(cluster) = Cluster::start("python").await else {
        return;
    };
    let url = cluster.url(None, 0);
    let broker = RedisBroker::connect_with(&url, options()).await.unwrap();
    let backend = RedisBackend::connect_with(&url, options()).await.unwrap();
    let queue = "py-sentinel".to_owned();
    broker.declare(&queue).await.unwrap();
    let runs: Runs = Arc::default();
    let mut wo = WorkerOptions::default();
    wo.queues = vec![queue.clone()];
    wo.hostname = "sentinel-py@test".into();
    wo.concurrency = 2;
    let worker = Worker::new(
        Arc::new(broker) as DynBroker,
        Some(Arc::new(backend) as DynBackend),
        Arc::new(echo_registry(runs.clone())),
        wo,
    );
    let shutdown = worker.shutdown_handle();
    let working = tokio::spawn(worker.run());

    let out = celeriac_test::python::run_python_client(
        "import json, os, tasks\n\
         opts = {'master_name': 'mymaster',\n\
                 'sentinel_kwargs': {'password': os.environ['SENTINEL_PW']}}\n\
         tasks.app.conf.broker_transport_options = opts\n\
         tasks.app.conf.result_backend_transport_options = opts\n\
         r = tasks.app.send_task('tests.echo', queue=os.environ['QUEUE'])\n\
         print(json.dumps({'id': r.id, 'result': r.get(timeout=30)}))",
        &[
            ("CELERY_BROKER_URL", &url),
            ("SENTINEL_PW", SENTINEL_PW),
            ("QUEUE", &queue),
        ],
    )
    .await;
    let got = celeriac_test::python::stdout_json(&out);
    assert_eq!(got["result"], got["id"], "{got}");
    assert_eq!(runs.lock().unwrap().len(), 1);
    shutdown.warm();
    let _ = tokio::time::timeout(Duration::from_secs(30), working).await;
    assert_no_secret_logged();
}

/// A manual failover (`SENTINEL FAILOVER`): the old master stays up, demoted to a replica, so
/// a client that went back to it would read and write the wrong server (or get `READONLY`).
/// Publishes, the worker's consumer and its result stores all move to the new master: the
/// results of tasks sent after the failover are on the new master, the old one says `ROLE`
/// slave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_moves_everything_to_the_new_master() {
    logs();
    let Some(cluster) = Cluster::start("manual").await else {
        return;
    };
    let url = cluster.url(None, 0);
    let options = options()
        .global_keyprefix("manual:")
        .retry_for(Duration::from_secs(60));
    let broker = RedisBroker::connect_with(&url, options.clone())
        .await
        .unwrap();
    let backend = RedisBackend::connect_with(&url, options.clone())
        .await
        .unwrap();
    let queue = "manual".to_owned();
    broker.declare(&queue).await.unwrap();
    let runs: Runs = Arc::default();
    let mut wo = WorkerOptions::default();
    wo.queues = vec![queue.clone()];
    wo.hostname = "sentinel-manual@test".into();
    wo.concurrency = 2;
    let worker = Worker::new(
        Arc::new(
            RedisBroker::connect_with(&url, options.clone())
                .await
                .unwrap(),
        ) as DynBroker,
        Some(Arc::new(RedisBackend::connect_with(&url, options).await.unwrap()) as DynBackend),
        Arc::new(echo_registry(runs.clone())),
        wo,
    );
    let shutdown = worker.shutdown_handle();
    let working = tokio::spawn(worker.run());

    let send_and_wait = async |n: usize| -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let m = celeriac_test::services::test_message("tests.echo");
            broker
                .publish(&queue, &m, PublishOptions::default())
                .await
                .unwrap();
            ids.push(m.id().to_owned());
        }
        for id in &ids {
            let meta = backend
                .wait(id, Some(Duration::from_secs(60)))
                .await
                .unwrap_or_else(|e| panic!("the result of {id}: {e:#}"));
            assert_eq!(meta.result, json!(id));
        }
        ids
    };
    send_and_wait(20).await;

    let mut s = raw(cluster.sentinel_ports[0], SENTINEL_PW).await.unwrap();
    let () = redis::cmd("SENTINEL")
        .arg("failover")
        .arg(NAME)
        .query_async(&mut s)
        .await
        .unwrap();
    wait_for(
        "the sentinels name the replica",
        Duration::from_secs(30),
        async || cluster.master_by_sentinel().await == Some(cluster.replica_port),
    )
    .await;
    // The old master still takes writes until the Sentinels demote it: what this client
    // sends before the Sentinels' announcement reaches it would be lost (docs/redis.md).
    let announced = format!("to=127.0.0.1:{}", cluster.replica_port);
    wait_for(
        "the Sentinels' +switch-master reaches the client",
        Duration::from_secs(30),
        async || {
            let text = logs().text();
            text.lines()
                .any(|l| l.contains("announced a new master") && l.contains(&announced))
        },
    )
    .await;
    let after = send_and_wait(20).await;

    let mut new_master = raw(cluster.replica_port, MASTER_PW).await.unwrap();
    for id in &after {
        let n: usize = redis::cmd("EXISTS")
            .arg(format!("manual:celery-task-meta-{id}"))
            .query_async(&mut new_master)
            .await
            .unwrap();
        assert_eq!(n, 1, "the result of {id} is on the new master");
    }
    wait_for(
        "the old master demoted",
        Duration::from_secs(30),
        async || {
            let Ok(mut old) = raw(cluster.master_port, MASTER_PW).await else {
                return false;
            };
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut old)
                .await
                .unwrap_or_default();
            matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"slave")
        },
    )
    .await;
    assert_eq!(runs.lock().unwrap().len(), 40);
    shutdown.warm();
    let _ = tokio::time::timeout(Duration::from_secs(30), working).await;
    assert_no_secret_logged();
}
