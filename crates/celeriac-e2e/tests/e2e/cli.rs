//! The command line a user's binary gets from `celeriac::cli::run`.

use std::process::{Command, Output};

use crate::support::{WorkerProcess, sqlite_url};

fn tasks(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .args(["--broker", url])
        .args(args)
        .output()
        .expect("run tasks binary")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_result_status_and_purge() {
    let (url, _) = sqlite_url("cli");
    // Without a worker: call prints an id; status shows it waiting; purge removes it.
    let o = tasks(&url, &["call", "tasks.add", "--args", "[1, 2]"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 36, "call prints the task id: {out}");
    let o = tasks(&url, &["status"]);
    let (out, err) = text(&o);
    // No node answers: Celery's EX_UNAVAILABLE, and the queue table all the same.
    assert_eq!(o.status.code(), Some(69), "{out}{err}");
    assert!(err.contains("No nodes replied"), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("celery ") && l.split_whitespace().nth(1) == Some("1")),
        "{out}"
    );
    let o = tasks(&url, &["result", &id]);
    assert!(text(&o).0.contains("PENDING"), "{:?}", text(&o));
    // Not at a terminal, purge asks for -f instead of deleting.
    let o = tasks(&url, &["purge"]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).1.contains("pass -f to confirm"), "{:?}", text(&o));
    let o = tasks(&url, &["purge", "-f"]);
    assert!(
        text(&o).0.contains("purged 1 message(s) from celery"),
        "{:?}",
        text(&o)
    );

    // With a worker: --wait prints the result; several calls show progress; failures exit 2.
    let _w = WorkerProcess::start(&url, &["-c", "4"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = tasks(&url, &["status"]);
        let (out, err) = text(&o);
        if o.status.success() {
            assert!(
                out.contains(": OK") && out.contains("1 node online."),
                "{out}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}{err}");
    }
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.add",
            "--args",
            "[2, 3]",
            "--wait",
            "--timeout",
            "20",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("SUCCESS") && out.trim_end().ends_with('5'),
        "{out}"
    );
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.mul",
            "--kwargs",
            r#"{"x": 6, "y": 7}"#,
            "--repeat",
            "20",
            "--wait",
            "--timeout",
            "20",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("20 task(s) done, 0 failed"), "{out}");
    assert!(err.contains("20/20"), "progress on stderr: {err}");
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.fail",
            "--args",
            r#"["nope"]"#,
            "--wait",
            "--timeout",
            "20",
        ],
    );
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("FAILURE") && out.contains("ValueError: nope"),
        "{out}"
    );
    let failed_id = out.split_whitespace().next().unwrap().to_owned();
    let o = tasks(&url, &["result", &failed_id]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).0.contains("Traceback"), "{:?}", text(&o));
}

#[test]
fn bad_input_gets_clear_errors_and_exit_codes() {
    let (url, _) = sqlite_url("cli-bad");
    let o = tasks(&url, &["call", "tasks.add", "--args", "{not json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("--args must be a JSON array"),
        "{:?}",
        text(&o)
    );

    let o = tasks("bogus://x", &["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("unknown broker scheme \"bogus\""),
        "{:?}",
        text(&o)
    );

    let o = tasks(&url, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(64), "usage errors exit 64");

    let o = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .env("CELERIAC_CONFIG", "/nonexistent/celeriac.toml")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .1
            .contains("cannot read config file /nonexistent/celeriac.toml"),
        "{:?}",
        text(&o)
    );

    let dir = celeriac_test::services::temp_sqlite_path("cli-bad-config");
    let cfg = dir.with_extension("toml");
    std::fs::write(&cfg, "[worker]\nconcurrency = \"many\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .env("CELERIAC_CONFIG", &cfg)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(
        err.contains("invalid config file") && err.contains("concurrency"),
        "{err}"
    );

    let o = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .args(["--broker", "redis://:hunter2@127.0.0.1:1/0", "status"])
        .output()
        .unwrap();
    assert!(
        !text(&o).1.contains("hunter2"),
        "secrets never reach output: {:?}",
        text(&o)
    );
}

/// Celery's conventions for an operator (issue 25): node-name expansion, trimmed and excluded
/// queues, a banner naming broker, backend, pool, queues and tasks, refused out-of-range
/// values, `call --eta`, a pid file, `tasks` opening nothing, worker-wide time limits, and a
/// `call --wait` that cannot hang unseen.
// See: issue 25
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_conventions_from_celery() {
    let (url, db) = sqlite_url("cli-operator");
    let host = celeriac::core::hostname();
    let pidfile = db.with_extension("pid");
    let w = WorkerProcess::start(
        &url,
        &[
            "-n",
            "ux1@%h",
            "-Q",
            "a, b ,c",
            "-X",
            "c",
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--time-limit",
            "1",
        ],
    );
    w.wait_for_log("worker started", crate::support::T).await;
    let log = w.log();
    assert!(log.contains(&format!("ux1@{host} (celeriac ")), "{log}");
    assert!(log.contains("  queues:      a, b\n"), "{log}");
    assert!(log.contains(&format!("  broker:      {url}")), "{log}");
    assert!(log.contains("    . tasks.add\n"), "{log}");
    // The pid file names the worker, and a second worker on it is refused.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, w.pid());
    let o = tasks(&url, &["worker", "--pidfile", pidfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains(&format!("held by process {pid}")),
        "{:?}",
        text(&o)
    );
    // The worker-wide hard limit stops a task that sets none (tasks.sleep has none).
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.sleep",
            "--args",
            "[30]",
            "-Q",
            "a",
            "--wait",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).0.contains("TimeLimitExceeded"), "{:?}", text(&o));
    // --eta: due in the past runs now.
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.add",
            "--args",
            "[1, 1]",
            "-Q",
            "b",
            "--eta",
            "2020-01-01T00:00:00Z",
            "--wait",
            "--timeout",
            "20",
        ],
    );
    assert!(
        o.status.success() && text(&o).0.contains('2'),
        "{:?}",
        text(&o)
    );
    let mut w = w;
    w.signal("TERM");
    w.wait(crate::support::T).await;
    let deadline = std::time::Instant::now() + crate::support::T;
    while pidfile.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pid file stays after the worker stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    for (args, needle) in [
        (
            &["call", "tasks.add", "--priority", "42"][..],
            "42 is not in 0..=9",
        ),
        (
            &["call", "tasks.add", "--eta", "tomorrow"],
            "--eta must be an ISO-8601 time",
        ),
        (&["worker", "-Q", "a", "-X", "a"], "leaves no queue"),
    ] {
        let o = tasks(&url, args);
        assert!(!o.status.success(), "{args:?}");
        assert!(text(&o).1.contains(needle), "{args:?}: {:?}", text(&o));
    }

    // No worker on the queue: --wait gives up with a hint instead of hanging.
    let o = tasks(
        &url,
        &[
            "call",
            "tasks.add",
            "--args",
            "[1, 1]",
            "-Q",
            "nobody",
            "--wait",
            "--timeout",
            "0.5",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("hint: no result came back in time"),
        "{:?}",
        text(&o)
    );
    let help = text(&tasks(&url, &["call", "--help"])).0;
    assert!(help.contains("[default: 300]"), "{help}");

    // `tasks` opens nothing: no SQLite file appears in a directory with none.
    let dir = db.with_extension("empty");
    std::fs::create_dir_all(&dir).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .current_dir(&dir)
        .arg("tasks")
        .output()
        .unwrap();
    assert!(o.status.success() && text(&o).0.contains("tasks.add"));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "tasks made a file"
    );
}

#[test]
fn output_cut_short_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // `my-app tasks | head -0`: the reader is gone before the first line is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .arg("tasks")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        o.status.signal(),
        Some(13),
        "ends by SIGPIPE: {:?}",
        o.status
    );
}

#[test]
fn queues_counts_waiting_messages_on_rabbitmq() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let url = "amqp://guest:guest@127.0.0.1:5672//";
    let queue = format!("cli-queues-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
            .env("CELERIAC_QUEUES", &queue)
            .args(["--broker", url])
            .args(args)
            .output()
            .unwrap()
    };
    for _ in 0..3 {
        let o = run(&["call", "tasks.add", "--args", "[1, 2]", "-Q", &queue]);
        assert!(o.status.success(), "{:?}", text(&o));
    }
    // No result backend named: a RabbitMQ broker answers by rpc://, so the app opens.
    let o = run(&["queues"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue.as_str()))
        .unwrap_or_else(|| panic!("no row for {queue}:\n{out}"));
    assert_eq!(row.split_whitespace().nth(1), Some("3"), "{out}");
    let o = run(&["purge", "-f", "-Q", &queue]);
    assert!(text(&o).0.contains("purged 3"), "{:?}", text(&o));
}
