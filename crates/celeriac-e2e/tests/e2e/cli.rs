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
    let (out, _) = text(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("celery ") && l.split_whitespace().nth(1) == Some("1")),
        "{out}"
    );
    let o = tasks(&url, &["result", &id]);
    assert!(text(&o).0.contains("PENDING"), "{:?}", text(&o));
    let o = tasks(&url, &["purge"]);
    assert!(
        text(&o).0.contains("purged 1 message(s) from celery"),
        "{:?}",
        text(&o)
    );

    // With a worker: --wait prints the result; several calls show progress; failures exit 2.
    let _w = WorkerProcess::start(&url, &["-c", "4"]);
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
