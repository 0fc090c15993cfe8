//! The Python Celery side of interop tests: a pinned venv, a Python worker process, and short
//! Python client snippets.
//!
//! Interop is only tested for real against Celery itself. This module runs the Celery app in
//! `examples/python/tasks.py` (the twin of the Rust example app: `tasks.add`, `tasks.mul`,
//! `tasks.xsum`, `tasks.echo`, `tasks.fail`, `tasks.sleep`) from a venv under `target/py-venv`
//! holding the exact versions of `examples/python/requirements.txt`.
//!
//! - [`require_python`] makes the venv on first use (by running `scripts/python-env`, which
//!   returns at once when the venv is up to date) and follows the policy of
//!   [`require_service`](crate::services::require_service): when it cannot be made (no
//!   `python3`, PyPI unreachable) the test prints a `SKIPPED:` notice and returns, unless
//!   `CELERIAC_REQUIRE_SERVICES=1`, which makes it fail.
//! - [`PythonWorker`] is a `celery -A tasks worker` process (thread or solo pool) on given
//!   queues; it is ready when [`PythonWorker::start`] returns and killed when dropped.
//! - [`run_python_client`] runs a Python snippet next to `tasks.py` (so `import tasks` gives the
//!   configured Celery app); the snippet prints JSON, and [`stdout_json`] reads it back.
//!
//! ```no_run
//! use celeriac_test::python::{PythonWorker, require_python, run_python_client, stdout_json};
//!
//! # async fn example() {
//! if !require_python() {
//!     return; // skipped, with a notice on stderr
//! }
//! let url = "redis://127.0.0.1:6379/3";
//! let _worker = PythonWorker::start(url, url, &["q1"]).await;
//! let out = run_python_client(
//!     "import json, tasks\n\
//!      r = tasks.app.send_task('tasks.add', (2, 3), queue='q1')\n\
//!      print(json.dumps(r.get(timeout=20)))",
//!     &[("CELERY_BROKER_URL", url)],
//! )
//! .await;
//! assert_eq!(stdout_json(&out), 5);
//! # }
//! ```
//!
//! The Celery configuration comes from the environment of the child process:
//! `CELERY_BROKER_URL` and `CELERY_RESULT_BACKEND` (default: the broker URL).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::services::{REQUIRE_SERVICES_VAR, services_required, test_dir};

/// How long a Python worker may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a Python client snippet may run before it is killed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The workspace root (the folder holding `scripts/` and `examples/`).
pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is crates/celeriac-test; the workspace root is two levels up.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .components()
        .collect()
}

/// `examples/python`: the Celery app (`tasks.py`) and its `requirements.txt`.
pub fn python_dir() -> PathBuf {
    workspace_root().join("examples/python")
}

/// The venv, or why there is none; made once per test process.
fn venv() -> &'static Result<PathBuf, String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(make_venv)
}

fn make_venv() -> Result<PathBuf, String> {
    let script = workspace_root().join("scripts/python-env");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            last.unwrap_or("no output")
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(path))
}

/// Makes sure the Python Celery venv exists, creating it on first use.
///
/// Returns `true` when it does. Otherwise, when `CELERIAC_REQUIRE_SERVICES=1`, panics with the
/// reason; else prints `SKIPPED: <test> needs Python Celery ...` to stderr and returns `false`,
/// and the caller returns early.
///
/// The first call in a process may take a while (about ten seconds to make the venv from
/// PyPI); it blocks the calling thread, like
/// [`require_service`](crate::services::require_service)'s connection check. Call it from the
/// test's own thread, whose name the notice reports.
pub fn require_python() -> bool {
    match venv() {
        Ok(_) => true,
        Err(why) => {
            skip_or_fail(&format!(
                "Python Celery (examples/python, scripts/python-env): {why}"
            ));
            false
        }
    }
}

/// Prints a `SKIPPED:` notice naming the current test and `needs`, or panics when
/// `CELERIAC_REQUIRE_SERVICES=1`.
///
/// For prerequisites other than a reachable server (for which see
/// [`require_service`](crate::services::require_service)).
pub fn skip_or_fail(needs: &str) {
    let test = std::thread::current()
        .name()
        .map_or_else(|| "a test".to_owned(), str::to_owned);
    if services_required() {
        panic!("{test} needs {needs} ({REQUIRE_SERVICES_VAR}=1 forbids skipping)");
    }
    skip_notice(&format!(
        "{test} needs {needs} (set {REQUIRE_SERVICES_VAR}=1 to fail instead)"
    ));
}

/// Prints `SKIPPED: <text>` straight to stderr, where the test harness does not capture it.
pub fn skip_notice(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {text}");
}

fn venv_path() -> &'static Path {
    match venv() {
        Ok(p) => p,
        Err(why) => panic!("no Python Celery venv (call require_python first): {why}"),
    }
}

/// The venv's Python interpreter. Panics when there is no venv; see [`require_python`].
pub fn python() -> PathBuf {
    venv_path().join("bin/python")
}

/// The venv's `celery` command. Panics when there is no venv; see [`require_python`].
pub fn celery() -> PathBuf {
    venv_path().join("bin/celery")
}

/// A command the venv installed (e.g. `supervisord`, `flower`). Panics when there is no venv;
/// see [`require_python`].
pub fn venv_command(name: &str) -> PathBuf {
    venv_path().join("bin").join(name)
}

fn short_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// The execution pool of a [`PythonWorker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PythonPool {
    /// `-P solo`: one task at a time, in the main process.
    Solo,
    /// `-P threads -c <n>`: a thread pool.
    Threads(usize),
}

/// A Python Celery worker process running `examples/python/tasks.py`, killed when dropped.
///
/// Its log (stdout and stderr, at `INFO`) goes to a file under `target/celeriac-test/`; failed
/// assertions should print [`PythonWorker::log`].
#[derive(Debug)]
pub struct PythonWorker {
    child: Option<Child>,
    log: PathBuf,
    node: String,
}

impl PythonWorker {
    /// Starts `celery -A tasks worker -P threads -c 4 -Q <queues>` on the broker and result
    /// backend given, and waits until it is ready to consume.
    ///
    /// Panics when the worker cannot start (its log is in the message) or when there is no venv
    /// ([`require_python`] first).
    pub async fn start(broker_url: &str, backend_url: &str, queues: &[&str]) -> PythonWorker {
        Self::start_with(broker_url, backend_url, queues, PythonPool::Threads(4), &[]).await
    }

    /// Like [`PythonWorker::start`], with a chosen pool and extra command line arguments.
    pub async fn start_with(
        broker_url: &str,
        backend_url: &str,
        queues: &[&str],
        pool: PythonPool,
        extra: &[&str],
    ) -> PythonWorker {
        Self::start_with_env(broker_url, backend_url, queues, pool, extra, &[]).await
    }

    /// Like [`PythonWorker::start_with`], with extra environment variables for the worker
    /// (e.g. `CELERY_SECURITY_KEY`, read by `tasks.py`).
    pub async fn start_with_env(
        broker_url: &str,
        backend_url: &str,
        queues: &[&str],
        pool: PythonPool,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> PythonWorker {
        let id = short_id();
        let node = format!("pyw{id}@{}", celeriac_core::hostname());
        let log = test_dir().join(format!("python-worker-{id}.log"));
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let file2 = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let mut cmd = Command::new(celery());
        cmd.current_dir(python_dir())
            .args(["-A", "tasks", "worker", "--loglevel", "INFO", "-n", &node])
            // No gossip, mingle or heartbeats: the tests do not need them, and mingle alone
            // costs a second at start-up.
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]);
        match pool {
            PythonPool::Solo => cmd.args(["-P", "solo"]),
            PythonPool::Threads(n) => cmd.args(["-P", "threads", "-c", &n.to_string()]),
        };
        if !queues.is_empty() {
            cmd.args(["-Q", &queues.join(",")]);
        }
        let child = cmd
            .args(extra)
            .env("CELERY_BROKER_URL", broker_url)
            .env("CELERY_RESULT_BACKEND", backend_url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", celery().display()));
        let mut worker = PythonWorker {
            child: Some(child),
            log,
            node,
        };
        worker
            .wait_for_log(&format!("{} ready.", worker.node), READY_TIMEOUT)
            .await;
        worker
    }

    /// The worker's node name (`pyw<id>@<host>`), as results with `result_extended` record it.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The worker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log after `timeout` or when the
    /// worker exits first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if let Some(status) = self.try_wait() {
                panic!(
                    "python worker exited ({status}) before its log showed {needle:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "python worker log never showed {needle:?} in {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// Asks for a warm shutdown (SIGTERM: finish running tasks, requeue prefetched ones) and
    /// waits for the exit, at most `timeout`; then kills it.
    pub async fn stop(mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = self.pid()?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Thread and solo pools run in the one process, so this leaves nothing behind.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `script` with the venv's Python in `examples/python` (so `import tasks` works) and
/// returns its output. `env` adds variables, e.g. `CELERY_BROKER_URL`.
///
/// The snippet is killed after two minutes; give its `get()` calls a `timeout` anyway. Panics
/// when there is no venv ([`require_python`] first). Its stdout and stderr go through files
/// under `target/celeriac-test/`, so a chatty snippet cannot block on a full pipe, and the
/// runtime thread is never blocked.
pub async fn run_python_client(script: &str, env: &[(&str, &str)]) -> Output {
    let id = short_id();
    let out_path = test_dir().join(format!("python-client-{id}.stdout"));
    let err_path = test_dir().join(format!("python-client-{id}.stderr"));
    let create = |p: &Path| {
        std::fs::File::create(p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()))
    };
    let mut child = Command::new(python())
        .current_dir(python_dir())
        .args(["-c", script])
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(create(&out_path))
        .stderr(create(&err_path))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", python().display()));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("python client: try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "python client ran longer than {CLIENT_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let output = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    output
}

/// The JSON document on the last non-empty line of a snippet's stdout.
///
/// Panics, showing stdout and stderr, when the snippet failed or printed no JSON.
pub fn stdout_json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed ({}); stdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("python client printed nothing; stderr:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("python client's last line is not JSON ({e}): {last}\nstderr:\n{stderr}")
    })
}
