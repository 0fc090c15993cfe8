//! Start-up checks and the command line.

use std::time::Duration;

use celeriac_beat::{Beat, BeatConfig, BeatOptions, Entry, MemoryStore, every};

use crate::support::{Recorder, log};

#[tokio::test]
async fn invalid_entries_fail_at_start_up_with_the_field_and_the_reason() {
    let b = Beat::new(
        MemoryStore::new(),
        Recorder::new("a", &log(), None),
        BeatOptions::default(),
    )
    .entry(Entry::new("zero", "tasks.x", every(Duration::ZERO)));
    let e = b.run(async {}).await.unwrap_err().to_string();
    assert!(e.contains("\"zero\"") && e.contains("interval"), "{e}");

    let config = BeatConfig::from_toml_str(
        "[beat.schedule.nightly]\ntask = \"tasks.n\"\ncrontab = { hour = \"24\" }",
    )
    .unwrap();
    let e = config.entries().unwrap_err().to_string();
    assert!(
        e.contains("nightly") && e.contains("hour") && e.contains("out of range 0-23"),
        "{e}"
    );

    let b = Beat::new(
        MemoryStore::new(),
        Recorder::new("a", &log(), None),
        BeatOptions::default(),
    )
    .entry(Entry::new("dup", "tasks.x", every(Duration::from_secs(1))))
    .entry(Entry::new("dup", "tasks.y", every(Duration::from_secs(1))));
    assert!(
        b.validate()
            .unwrap_err()
            .to_string()
            .contains("declared twice")
    );
}

#[tokio::test]
async fn an_unknown_task_is_a_warning_not_a_crash() {
    #[celeriac::task(name = "tasks.known")]
    async fn known() {}
    let app = celeriac::App::builder()
        .broker_url("memory://")
        .task::<known>()
        .build()
        .await
        .unwrap();
    use celeriac_beat::Dispatch;
    assert_eq!(app.knows_task("tasks.unknown"), Some(false));
    let b = Beat::new(MemoryStore::new(), app, BeatOptions::default()).entry(Entry::new(
        "e",
        "tasks.unknown",
        every(Duration::from_secs(1)),
    ));
    b.validate().unwrap();
}

#[tokio::test]
async fn app_sends_protocol_two_with_the_beat_header() {
    let app = celeriac::App::builder()
        .broker_url("memory://")
        .build()
        .await
        .unwrap();
    let log = log();
    let mut o = BeatOptions::default();
    o.lease = Duration::from_millis(300);
    o.poll_interval = Duration::from_millis(20);
    let b = Beat::new(MemoryStore::new(), Recorder::new("a", &log, Some(&app)), o).entry(
        Entry::new("e", "tasks.e", every(Duration::from_millis(100)))
            .args(vec![serde_json::json!(7)])
            .queue("periodic")
            .priority(5)
            .expires(Duration::from_secs(60)),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(b.run(async {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    h.await.unwrap().unwrap();
    let sent = log.lock().unwrap()[0].clone();
    let mut consumer = app
        .broker()
        .consume(
            &["periodic".to_owned()],
            celeriac_core::ConsumeOptions::new(1),
        )
        .await
        .unwrap();
    let d = consumer.next().await.unwrap().unwrap();
    let m = d.message.as_ref().unwrap();
    assert_eq!(m.headers.id, sent.task_id);
    assert_eq!(m.headers.task, "tasks.e");
    assert_eq!(
        m.headers.extra.get("celery_beat_task"),
        Some(&serde_json::Value::Bool(true))
    );
    assert!(m.headers.expires.is_some());
    assert_eq!(m.properties.priority, Some(5));
}

/// The command line, as a user's binary runs it.
fn cli(args: &[&str]) -> u8 {
    let mut argv = vec!["app", "-l", "error"];
    argv.extend_from_slice(args);
    let code = celeriac::cli::run_from(celeriac::App::builder(), argv);
    // ExitCode has no accessor; compare through its Debug form.
    if format!("{code:?}") == format!("{:?}", std::process::ExitCode::SUCCESS) {
        0
    } else {
        1
    }
}

#[test]
fn cli_changes_entries_in_the_store() {
    let path = celeriac_test::services::temp_sqlite_path("beat-cli");
    let url = format!("sqlite://{}", path.display());
    let b = ["-b", url.as_str()];
    let with = |rest: &[&str]| {
        let mut v = b.to_vec();
        v.extend_from_slice(rest);
        cli(&v)
    };
    assert_eq!(
        with(&[
            "beat",
            "add",
            "ping",
            "--task",
            "tasks.ping",
            "--every",
            "5",
            "--queue",
            "q"
        ]),
        0
    );
    assert_eq!(
        with(&[
            "beat",
            "add",
            "bad",
            "--task",
            "t",
            "--crontab",
            "61 * * * *"
        ]),
        1
    );
    assert_eq!(with(&["beat", "add", "none", "--task", "t"]), 1);
    assert_eq!(with(&["beat", "pause", "ping"]), 0);
    assert_eq!(with(&["beat", "trigger", "ping"]), 0);
    assert_eq!(with(&["beat", "pause", "nope"]), 1);
    assert_eq!(with(&["beat", "list"]), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        crate::store::open(&url)
            .await
            .unwrap()
            .load()
            .await
            .unwrap()
    });
    assert_eq!(rows.len(), 1, "{rows:?}");
    let ping = &rows["ping"];
    assert!(ping.paused);
    assert_eq!(ping.triggers, 1);
    assert_eq!(ping.spec.as_ref().unwrap()["queue"], "q");
    assert_eq!(with(&["beat", "remove", "ping"]), 0);
    assert_eq!(with(&["beat", "remove", "ping"]), 1);
}

/// Like [`cli`], for an app built on `config`.
fn cli_with(config: celeriac_core::Config, args: &[&str]) -> u8 {
    let mut argv = vec!["app", "-l", "error"];
    argv.extend_from_slice(args);
    let code = celeriac::cli::run_from(celeriac::App::builder().config(config), argv);
    u8::from(format!("{code:?}") != format!("{:?}", std::process::ExitCode::SUCCESS))
}

#[test]
fn cli_reads_the_beat_table_from_the_apps_config() {
    let path = celeriac_test::services::temp_sqlite_path("beat-cli-config");
    let url = format!("sqlite://{}", path.display());
    let text =
        "[beat]\nlease = 5\n[beat.schedule.nightly]\ntask = \"tasks.n\"\ncrontab = \"0 3 * * *\"\n";
    let config = || {
        celeriac_core::Config::from_sources(
            Some((std::path::Path::new("celeriac.toml"), text)),
            |_| None,
        )
        .unwrap()
    };
    // The entry declared in the config exists for the command line: it can be paused,
    // not removed (it is changed in the config).
    assert_eq!(
        cli_with(config(), &["-b", &url, "beat", "pause", "nightly"]),
        0
    );
    assert_eq!(
        cli_with(config(), &["-b", &url, "beat", "remove", "nightly"]),
        1
    );
    // Without the config, nothing declares it.
    assert_eq!(cli(&["-b", &url, "beat", "resume", "nightly"]), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        crate::store::open(&url)
            .await
            .unwrap()
            .load()
            .await
            .unwrap()
    });
    assert!(rows["nightly"].paused, "{rows:?}");
    // A bad [beat] table in the config is a start-up error.
    let bad = celeriac_core::Config::from_sources(
        Some((
            std::path::Path::new("celeriac.toml"),
            "[beat.schedule.x]\ntask = \"t\"\ncrontab = \"* 25 * * *\"\n",
        )),
        |_| None,
    )
    .unwrap();
    assert_eq!(cli_with(bad, &["-b", &url, "beat", "list"]), 1);
}
