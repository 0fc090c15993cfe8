use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celeriac::{App, ErrorKind};
use celeriac_examples::{add, echo, fail, mul, sleep, xsum};
use celeriac_test::python::{require_python, run_python_client, skip_notice, stdout_json};
use celeriac_test::services::{require_service, test_dir, unique_queue};
use serde_json::Value;

/// The local Redis every interop test uses.
pub(crate) const REDIS: &str = "127.0.0.1:6379";

/// How long any single result may take.
pub(crate) const T: Duration = Duration::from_secs(30);

/// One test's corner of Redis: a database of its own, a fresh queue, and a client app.
pub(crate) struct Interop {
    /// `redis://127.0.0.1:6379/<db>`, the broker and the result backend.
    pub(crate) url: String,
    /// A queue no other test uses.
    pub(crate) queue: String,
    /// Our client on `url`, knowing the example tasks.
    pub(crate) app: App,
}

/// A database and a queue, without our client: for tests of the Python side alone.
pub(crate) struct PythonOnly {
    /// `redis://127.0.0.1:6379/<db>`.
    pub(crate) url: String,
    /// A queue no other test uses.
    pub(crate) queue: String,
}

/// Where a test's Python snippets point: its Redis database and its queue.
pub(crate) trait Place {
    fn url(&self) -> &str;
    fn queue(&self) -> &str;
    /// The result backend, when it is not the broker.
    fn backend(&self) -> &str {
        self.url()
    }
}

/// A RabbitMQ broker with a result backend of its own, and a queue.
pub(crate) struct Amqp {
    pub(crate) url: String,
    pub(crate) backend: String,
    pub(crate) queue: String,
}

impl Place for Amqp {
    fn url(&self) -> &str {
        &self.url
    }
    fn queue(&self) -> &str {
        &self.queue
    }
    fn backend(&self) -> &str {
        &self.backend
    }
}

impl Place for Interop {
    fn url(&self) -> &str {
        &self.url
    }
    fn queue(&self) -> &str {
        &self.queue
    }
}

impl Place for PythonOnly {
    fn url(&self) -> &str {
        &self.url
    }
    fn queue(&self) -> &str {
        &self.queue
    }
}

/// Checks Redis and the Python venv; `None` (after a `SKIPPED:` notice) when one is missing.
///
/// `db` must be unique to the calling test.
pub(crate) fn setup_python_only(db: u8, queue_prefix: &str) -> Option<PythonOnly> {
    if !require_service("redis", REDIS) || !require_python() {
        return None;
    }
    Some(PythonOnly {
        url: format!("redis://{REDIS}/{db}"),
        queue: unique_queue(queue_prefix),
    })
}

/// Checks Redis, the Python venv and our `redis://` driver, in that order; `None` (after a
/// `SKIPPED:` notice) when one is missing.
///
/// `db` must be unique to the calling test.
pub(crate) async fn setup(db: u8, queue_prefix: &str) -> Option<Interop> {
    let PythonOnly { url, queue } = setup_python_only(db, queue_prefix)?;
    let app = match client(&url).await {
        Ok(app) => app,
        Err(e)
            if e.kind() == ErrorKind::Config && e.to_string().contains("unknown broker scheme") =>
        {
            let test = std::thread::current()
                .name()
                .map_or_else(|| "a test".to_owned(), str::to_owned);
            skip_notice(&format!(
                "{test} needs celeriac's redis:// driver (crates/celeriac-redis, cargo feature \
                 `redis`), which is not registered yet: {e}"
            ));
            return None;
        }
        Err(e) => panic!("cannot open {url}: {e:?}"),
    };
    Some(Interop { url, queue, app })
}

async fn client(url: &str) -> celeriac::Result<App> {
    App::builder()
        .broker_url(url)
        .result_backend(url)
        .task::<add>()
        .task::<mul>()
        .task::<xsum>()
        .task::<echo>()
        .task::<fail>()
        .task::<sleep>()
        .build()
        .await
}

/// Our example worker (`tasks worker`) as a separate process, killed when dropped.
pub(crate) struct OurWorker {
    child: Option<Child>,
    log: PathBuf,
    node: String,
}

impl OurWorker {
    /// Starts `tasks --broker <url> --result-backend <url> worker -Q <queues> -c 4` and waits
    /// until it consumes.
    pub(crate) async fn start(url: &str, queues: &[&str]) -> OurWorker {
        Self::start_with(url, queues, &[]).await
    }

    /// [`OurWorker::start`] with more `worker` flags (`-E`, `-P processes`, ...).
    pub(crate) async fn start_with(url: &str, queues: &[&str], extra: &[&str]) -> OurWorker {
        Self::start_on(url, url, queues, extra).await
    }

    /// [`OurWorker::start_with`] on a broker and a result backend of their own.
    pub(crate) async fn start_on(
        url: &str,
        backend: &str,
        queues: &[&str],
        extra: &[&str],
    ) -> OurWorker {
        Self::start_env(url, backend, queues, extra, &[]).await
    }

    /// [`OurWorker::start_on`] with extra environment variables (`CELERIAC_*` settings).
    pub(crate) async fn start_env(
        url: &str,
        backend: &str,
        queues: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> OurWorker {
        let id = &celeriac::core::protocol::new_id()[28..];
        let node = format!("rsw-{id}@{}", celeriac::core::hostname());
        let log = test_dir().join(format!("interop-worker-{id}.log"));
        let stderr = std::fs::File::create(&log).expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
            .args([
                "--broker",
                url,
                "--result-backend",
                backend,
                "--loglevel",
                "info",
            ])
            .args(["worker", "-c", "4", "-n", &node, "-Q", &queues.join(",")])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn our worker");
        let mut w = OurWorker {
            child: Some(child),
            log,
            node,
        };
        w.wait_for_log("worker started", T).await;
        w
    }

    /// The node name results record (`worker` in the meta).
    pub(crate) fn node_name(&self) -> &str {
        &self.node
    }

    /// Stops the worker with SIGTERM (a warm shutdown) and waits up to `timeout` for it to
    /// exit; its exit status, or `None` when it did not.
    pub(crate) async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        self.wait_exit(timeout).await
    }

    /// Waits up to `timeout` for the worker to exit by itself (`control shutdown`).
    pub(crate) async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The worker's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "our worker exited ({status}) before its log showed {needle:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "our worker's log never showed {needle:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OurWorker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a Python snippet with `URL` and `QUEUE` set (and `CELERY_BROKER_URL` /
/// `CELERY_RESULT_BACKEND` = `URL`), and returns the JSON it printed last.
pub(crate) async fn python(script: &str, env: &impl Place, extra: &[(&str, &str)]) -> Value {
    let mut vars = vec![
        ("URL", env.url()),
        ("QUEUE", env.queue()),
        ("CELERY_BROKER_URL", env.url()),
        ("CELERY_RESULT_BACKEND", env.backend()),
    ];
    vars.extend_from_slice(extra);
    stdout_json(&run_python_client(script, &vars).await)
}

/// Every entry of the Redis list `key`, oldest first, each parsed as JSON (raw kombu envelopes).
pub(crate) async fn raw_list(env: &impl Place, key: &str) -> Vec<Value> {
    let v = python(
        r#"
import json, os, redis
r = redis.Redis.from_url(os.environ["URL"])
print(json.dumps([json.loads(x) for x in reversed(r.lrange(os.environ["KEY"], 0, -1))]))
"#,
        env,
        &[("KEY", key)],
    )
    .await;
    serde_json::from_value(v).expect("a list")
}

/// The raw string at `key` parsed as JSON (a result document), or null when missing.
pub(crate) async fn raw_get(env: &impl Place, key: &str) -> Value {
    python(
        r#"
import json, os, redis
r = redis.Redis.from_url(os.environ["URL"])
v = r.get(os.environ["KEY"])
print(json.dumps(None if v is None else json.loads(v)))
"#,
        env,
        &[("KEY", key)],
    )
    .await
}

/// The sorted keys of a JSON object, for readable layout comparisons.
pub(crate) fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}
