//! The log flags: `-l` in Celery's words, `--logfile` and `--log-format json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use celeriac_examples::{add, fail};
use serde_json::Value;

use crate::support::{T, client, sqlite_url};

fn tasks(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"));
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(["--broker", url])
        .args(args)
        .output()
        .expect("run tasks binary")
}

/// A worker of the example app started with `args` before `worker`, its standard error in a
/// file of its own.
struct Worker {
    child: Child,
    stderr: PathBuf,
}

impl Worker {
    fn start(url: &str, args: &[&str]) -> Self {
        let stderr = PathBuf::from(format!(
            "{}.stderr-{}.log",
            url.trim_start_matches("sqlite://"),
            std::process::id()
        ));
        let file = std::fs::File::create(&stderr).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
            .env_remove("RUST_LOG")
            .args(["--broker", url])
            .args(args)
            .args(["worker", "-c", "2"])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn worker");
        Worker { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn stop(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                assert!(
                    s.success(),
                    "worker exited with {s}; stderr:\n{}",
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not stop; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one `tasks.add` through the worker, which shows it is consuming.
async fn one_task(url: &str) -> String {
    let app = client(url).await;
    let r = add::delay(&app, 20, 22).await.unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 42);
    r.id().to_owned()
}

// See: issue 25, "`-l warning`, `-l WARNING`, `-l critical` and typos like `-l bogus` are
// accepted and then log nothing at all".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue25_loglevel_warning_in_capitals_logs_warnings_only() {
    let (url, _) = sqlite_url("log-warning");
    let mut w = Worker::start(&url, &["-l", "WARNING"]);
    one_task(&url).await;
    let app = client(&url).await;
    let failed = fail::delay(&app, "on purpose".to_owned()).await.unwrap();
    assert!(failed.get_timeout(T).await.is_err());
    w.stop().await;
    let log = w.stderr();
    // An error inside a task names it, though its span is at info.
    let line = log
        .lines()
        .find(|l| l.contains("task failed"))
        .unwrap_or_else(|| panic!("the failure is logged at -l WARNING:\n{log}"));
    assert!(
        line.contains("ERROR") && line.contains(failed.id()) && line.contains("tasks.fail"),
        "{line}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("signal received: warm shutdown")),
        "a warning is logged at -l WARNING:\n{log}"
    );
    assert!(
        !log.contains("task received") && !log.contains("worker started"),
        "info lines are not logged at -l WARNING:\n{log}"
    );
}

#[test]
fn issue25_loglevel_bogus_is_a_usage_error_naming_the_words() {
    let (url, _) = sqlite_url("log-bogus");
    let o = tasks(&url, &["-l", "bogus", "tasks"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(err.contains("bogus"), "{err}");
    assert!(
        err.contains("debug, info, warning, error, critical or fatal"),
        "{err}"
    );
    // Celery's other words and tracing directives are accepted.
    for level in ["critical", "Fatal", "debug", "info,celeriac_worker=debug"] {
        let o = tasks(&url, &["-l", level, "tasks"], &[]);
        assert!(
            o.status.success(),
            "-l {level}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = tasks(&url, &["-l", "celeriac=loud", "tasks"], &[]);
    assert_eq!(o.status.code(), Some(64));
}

#[test]
fn rust_log_is_read_when_loglevel_is_absent() {
    let (url, _) = sqlite_url("log-rust-log");
    let o = tasks(&url, &["tasks"], &[("RUST_LOG", "celeriac=loud")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("RUST_LOG") && err.contains("using info"),
        "{err}"
    );
    let o = tasks(&url, &["tasks"], &[("RUST_LOG", "warn,celeriac=debug")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("RUST_LOG"), "{err}");
}

#[test]
fn a_logfile_that_cannot_be_opened_is_a_clear_error() {
    let (url, path) = sqlite_url("log-badfile");
    let bad = path.with_extension("missing-dir").join("worker.log");
    let o = tasks(&url, &["--logfile", bad.to_str().unwrap(), "tasks"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot open the log file {}", bad.display()))
            && err.contains("No such file"),
        "{err}"
    );
}

fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("log file");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("an earlier line"),
        "appended, not truncated"
    );
    lines
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{text}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfile_appends_json_lines_with_task_span_fields() {
    let (url, path) = sqlite_url("log-json");
    let logfile = path.with_extension("json.log");
    std::fs::write(&logfile, "an earlier line\n").unwrap();
    let mut w = Worker::start(
        &url,
        &[
            "-l",
            "info",
            "--logfile",
            logfile.to_str().unwrap(),
            "--log-format",
            "json",
        ],
    );
    let id = one_task(&url).await;
    w.stop().await;
    let stderr = w.stderr();
    assert!(
        !stderr.contains("task received"),
        "the log goes to the file, not standard error:\n{stderr}"
    );
    let lines = json_lines(&logfile);
    for l in &lines {
        for key in ["timestamp", "level", "target", "message", "fields", "span"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
        let ts = l["timestamp"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "timestamp {ts}"
        );
    }
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message && l["span"]["task_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no {message:?} line for {id}: {lines:#?}"))
    };
    let received = find("task received");
    assert_eq!(received["level"], "INFO");
    assert_eq!(received["span"]["task_name"], "tasks.add");
    assert_eq!(received["spans"][0], "task");
    assert_eq!(received["fields"]["retries"], 0);
    let succeeded = find("task succeeded");
    assert!(succeeded["fields"]["runtime"].is_string(), "{succeeded}");
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN"
                && l["message"].as_str().unwrap().contains("warm shutdown")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_children_log_where_and_how_the_worker_does() {
    let (url, path) = sqlite_url("log-child");
    let logfile = path.with_extension("child.json.log");
    let stderr = path.with_extension("child.stderr.log");
    std::fs::write(&logfile, "an earlier line\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .env_remove("RUST_LOG")
        .args(["--broker", &url, "-l", "WARNING", "--logfile"])
        .arg(&logfile)
        .args([
            "--log-format",
            "json",
            "worker",
            "-P",
            "processes",
            "-c",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn worker");
    let mut w = Worker { child, stderr };
    let app = client(&url).await;
    // `tasks.note` is blocking, so a pool child runs it and logs its warning there.
    let r = celeriac_examples::note::delay(&app, "from-a-pool-child".to_owned())
        .await
        .unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), "from-a-pool-child");
    w.stop().await;
    let lines = json_lines(&logfile);
    let note = lines
        .iter()
        .find(|l| l["fields"]["note"] == "from-a-pool-child")
        .unwrap_or_else(|| {
            panic!(
                "the child's warning is not in the log file: {lines:#?}\nstderr:\n{}",
                w.stderr()
            )
        });
    assert_eq!(note["level"], "WARN");
    assert!(!w.stderr().contains("from-a-pool-child"), "{}", w.stderr());
}
