//! Fault injection: things break on purpose and nothing is lost.
//!
//! A worker SIGKILLed in the middle of thousands of acks-late tasks, a blocking task that spins
//! forever, a task that aborts its process, a flood of malformed messages. The figures printed
//! here (run with `--nocapture`) are the ones reported in docs/RELIABILITY.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use celeriac::Signature;
use celeriac::core::protocol::{Body, ContentType, Headers, Message, new_id};
use celeriac::core::{PublishOptions, TaskState};
use celeriac::worker::dead;
use celeriac_examples::{abort, add, spin, stamp};
use serde_json::{Map, Value, json};

use crate::support::{T, WorkerProcess, client, client_with, sqlite_url};

/// Where a SIGKILL run happens: a broker, the result backend, the queue, the lease.
struct Target {
    name: &'static str,
    broker: String,
    backend: String,
    queue: String,
    /// `celeriac.toml` for both workers (the short lease, the result backend).
    config: String,
    /// Files of this run (the journal, the config) start with this.
    files: String,
}

impl Target {
    fn sqlite() -> Self {
        let (url, db) = sqlite_url("reliability-sigkill");
        Target {
            name: "sqlite",
            // A short lease, so the deliveries the killed worker held come back within seconds.
            config: "visibility_timeout = 2.0\n".to_owned(),
            backend: url.clone(),
            broker: url,
            queue: "celery".to_owned(),
            files: db.display().to_string(),
        }
    }

    fn redis() -> Self {
        let (_, db) = sqlite_url("reliability-sigkill-redis");
        let url = "redis://127.0.0.1:6379/7".to_owned();
        Target {
            name: "redis",
            // kombu's visibility timeout: unacked deliveries of a dead worker are restored by
            // the next consumer once it has passed.
            config: "visibility_timeout = 2.0\n".to_owned(),
            backend: url.clone(),
            broker: url,
            queue: celeriac_test::services::unique_queue("sigkill"),
            files: db.display().to_string(),
        }
    }

    /// Redis with the queue in the native layout (Redis Streams), chosen by the URL.
    fn redis_native() -> Self {
        let (_, db) = sqlite_url("reliability-sigkill-redis-native");
        let queue = celeriac_test::services::unique_queue("sigkill-native");
        let url = format!("redis://127.0.0.1:6379/7?native_queues={queue}");
        Target {
            name: "redis (native layout)",
            // The consumers' lease: a dead worker's pending entries are claimed once it passed.
            config: "visibility_timeout = 2.0\n".to_owned(),
            backend: url.clone(),
            broker: url,
            queue,
            files: db.display().to_string(),
        }
    }

    /// MariaDB/MySQL: the `celeriac_it` database, a queue of this run's own.
    async fn mysql() -> Self {
        use celeriac::mysql::sqlx::{self, Connection as _};
        let (_, db) = sqlite_url("reliability-sigkill-mysql");
        let mut root = sqlx::mysql::MySqlConnection::connect("mysql://root@127.0.0.1:3306/")
            .await
            .expect("connect as root");
        sqlx::raw_sql("CREATE DATABASE IF NOT EXISTS celeriac_it")
            .execute(&mut root)
            .await
            .expect("create database");
        let url = "mysql://root@127.0.0.1:3306/celeriac_it?poll-interval-ms=50".to_owned();
        Target {
            name: "mysql",
            // A short lease: the rows the killed worker held are claimable again after it.
            config: "visibility_timeout = 2.0\n".to_owned(),
            backend: url.clone(),
            broker: url,
            queue: celeriac_test::services::unique_queue("sigkill"),
            files: db.display().to_string(),
        }
    }

    fn postgres() -> Self {
        let (_, db) = sqlite_url("reliability-sigkill-postgres");
        // A schema of this run's own on the shared server: its tables start empty.
        let schema = format!("t_sigkill_{}", &new_id().replace('-', "")[20..]);
        let url = format!("postgres://postgres@127.0.0.1:5432/test?schema={schema}");
        Target {
            name: "postgres",
            // The lease: deliveries held by the dead worker come back when it runs out.
            config: "visibility_timeout = 2.0\n".to_owned(),
            backend: url.clone(),
            broker: url,
            queue: "celery".to_owned(),
            files: db.display().to_string(),
        }
    }

    fn amqp() -> Self {
        let (backend, db) = sqlite_url("reliability-sigkill-amqp");
        Target {
            name: "amqp",
            // RabbitMQ requeues a dead consumer's unacked deliveries when its connection
            // drops; results go to SQLite (the rpc backend cannot be read by id).
            config: format!("visibility_timeout = 2.0\nresult_backend = {backend:?}\n"),
            backend,
            broker: "amqp://guest:guest@127.0.0.1:5672//".to_owned(),
            queue: celeriac_test::services::unique_queue("sigkill"),
            files: db.display().to_string(),
        }
    }
}

/// Thousands of acks-late tasks; worker A (`-c 8 --prefetch-buffer 8`) is SIGKILLed after a
/// third ran, worker B starts: every task SUCCESS, every id in the journal, duplicates no
/// more than what A could hold. Prints the figures for docs/RELIABILITY.md.
async fn sigkill_mid_run(t: Target) {
    const N: usize = 2000;
    const CONCURRENCY: usize = 8;
    const PREFETCH_BUFFER: usize = 8;
    let journal = format!("{}.journal", t.files);
    let config = format!("{}.toml", t.files);
    std::fs::write(&config, &t.config).expect("write config");
    let app = client_with(&t.broker, &t.backend).await;

    let t0 = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let app = app.clone();
        let journal = journal.clone();
        let queue = t.queue.clone();
        sends.spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..N / 8 {
                let r = Signature::<Value>::new("tasks.journal")
                    .args_json(vec![json!(journal)])
                    .queue(queue.clone())
                    .apply_async(&app)
                    .await
                    .expect("send");
                ids.push(r.id().to_owned());
            }
            ids
        });
    }
    let mut ids = Vec::with_capacity(N);
    while let Some(part) = sends.join_next().await {
        ids.extend(part.expect("sender"));
    }
    assert_eq!(ids.len(), N);
    let published = t0.elapsed();

    let args = [
        "-c",
        &CONCURRENCY.to_string(),
        "--prefetch-buffer",
        &PREFETCH_BUFFER.to_string(),
        "-Q",
        &t.queue,
    ];
    let mut a = WorkerProcess::start_with_config(&t.broker, &config, &args);
    let runs = || {
        let mut runs: HashMap<String, usize> = HashMap::new();
        for line in std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
        {
            *runs.entry(line.to_owned()).or_default() += 1;
        }
        runs
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while runs().len() < N / 3 {
        assert!(
            Instant::now() < deadline,
            "worker A is too slow:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.signal("KILL");
    let killed = Instant::now();
    a.wait(T).await;
    let ran_before_kill = runs().len();

    let mut b = WorkerProcess::start_with_config(&t.broker, &config, &args);
    // Recovered: every task has run (its id is in the journal).
    let deadline = Instant::now() + Duration::from_secs(120);
    while runs().len() < N {
        assert!(
            Instant::now() < deadline,
            "{}: only {} of {N} tasks ran:\n{}",
            t.name,
            runs().len(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = killed.elapsed();

    let mut lost = Vec::new();
    for id in &ids {
        // The last results may still be on their way to the backend.
        let meta = app
            .result::<Value>(id)
            .wait_meta(Some(T))
            .await
            .map(|m| m.status);
        if !matches!(meta, Ok(TaskState::Success)) {
            lost.push((id.clone(), meta));
        }
    }
    // Everything settled: nothing left in the queue.
    let deadline = Instant::now() + T;
    loop {
        let s = app.broker().stats(&t.queue).await.expect("stats");
        if s.total() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "queue not drained: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.signal("TERM");
    b.wait(T).await;

    let runs = runs();
    let never_ran = ids.iter().filter(|id| !runs.contains_key(*id)).count();
    let duplicates: usize = runs.values().map(|n| n - 1).sum();
    let in_flight = CONCURRENCY + PREFETCH_BUFFER;
    println!(
        "sigkill on {}: tasks {N}, ran before the kill {ran_before_kill}, lost {}, never ran \
         {never_ran}, duplicates {duplicates} (bound: {in_flight} in flight), recovery {:.2}s \
         after SIGKILL (every task run), publish {:.2}s",
        t.name,
        lost.len(),
        recovered.as_secs_f64(),
        published.as_secs_f64(),
    );
    assert!(lost.is_empty(), "{}: lost tasks: {lost:?}", t.name);
    assert_eq!(never_ran, 0);
    assert_eq!(runs.len(), N, "the journal names only our tasks");
    assert!(
        duplicates <= in_flight,
        "{}: {duplicates} duplicates, more than the {in_flight} deliveries worker A could hold",
        t.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task() {
    sigkill_mid_run(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task_on_redis() {
    if !celeriac_test::services::require_service("redis", "127.0.0.1:6379") {
        return;
    }
    sigkill_mid_run(Target::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task_on_redis_native() {
    if !celeriac_test::services::require_service("redis", "127.0.0.1:6379") {
        return;
    }
    sigkill_mid_run(Target::redis_native()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task_on_mysql() {
    if !celeriac_test::services::require_service("mariadb", "127.0.0.1:3306") {
        return;
    }
    sigkill_mid_run(Target::mysql().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task_on_postgres() {
    if !celeriac_test::services::require_service("postgres", "127.0.0.1:5432") {
        return;
    }
    sigkill_mid_run(Target::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_no_acks_late_task_on_rabbitmq() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    sigkill_mid_run(Target::amqp()).await;
}

/// Messages whose id and name are readable but one standard header is not: each is refused
/// by id (FAILURE `DecodeError` naming the header, so a waiting client is answered) and its
/// dead letter is the message as sent. Values Python accepts run.
async fn bad_headers(t: Target) {
    let config = format!("{}.toml", t.files);
    std::fs::write(&config, &t.config).expect("write config");
    let app = client_with(&t.broker, &t.backend).await;
    let broker = app.broker().clone();
    broker.declare(&t.queue).await.unwrap();
    let send = |header: &str, value: Value| {
        let mut m = Message::new(
            Headers::new("tasks.add", new_id()),
            &Body::new(vec![json!(20), json!(22)], Map::new()),
            ContentType::Json,
        )
        .unwrap();
        m.headers.extra.insert("tenant".into(), json!("acme"));
        // Written on the wire exactly as given, whatever the field's type.
        m.headers.invalid.insert(header.into(), value);
        let broker = broker.clone();
        let queue = t.queue.clone();
        async move {
            broker
                .publish(&queue, &m, PublishOptions::default())
                .await
                .unwrap();
            m
        }
    };
    let now = chrono::Utc::now().timestamp();
    let mut refused = Vec::new();
    for (header, value) in [
        ("eta", json!("tomorrow at noon")),
        ("expires", json!({"in": 5})),
        ("timelimit", json!("30")),
        ("group_index", json!(-1)),
        ("retries", json!("1")),
    ] {
        refused.push((header, value.clone(), send(header, value).await));
    }
    let mut run = Vec::new();
    for (header, value) in [
        ("retries", json!(-1)),
        ("retries", json!(1u64 << 40)),
        ("eta", json!(now + 1)),
        ("expires", json!(now + 3600)),
    ] {
        run.push((header, send(header, value).await));
    }
    let _w = WorkerProcess::start_with_config(&t.broker, &config, &["-Q", &t.queue]);
    for (header, m) in &run {
        let got = app.result::<i64>(m.id()).get_timeout(T).await;
        assert_eq!(
            got.ok(),
            Some(42),
            "{}: {header} is read as Python reads it",
            t.name
        );
    }
    for (header, _, m) in &refused {
        let meta = app
            .result::<Value>(m.id())
            .wait_meta(Some(T))
            .await
            .unwrap_or_else(|e| panic!("{}: no result for a bad {header}: {e}", t.name));
        assert_eq!(meta.status, TaskState::Failure, "{header}");
        let why = meta.result.to_string();
        assert!(
            why.contains("DecodeError") && why.contains(&format!("`{header}`")),
            "{}: {header}: {why}",
            t.name
        );
    }
    let deadline = Instant::now() + T;
    let letters = loop {
        let letters = dead::list(&*broker, &t.queue, 100).await.unwrap();
        if letters.len() >= refused.len() {
            break letters;
        }
        assert!(
            Instant::now() < deadline,
            "{}: dead letters {letters:?}",
            t.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), refused.len(), "{}", t.name);
    for (header, value, sent) in &refused {
        let d = letters
            .iter()
            .find(|d| d.id() == sent.id())
            .unwrap_or_else(|| panic!("{}: no dead letter for the bad {header}", t.name));
        assert!(d.reason.starts_with("DecodeError"), "{}", d.reason);
        assert_eq!(d.task(), "tasks.add");
        assert_eq!(
            d.message.headers.invalid.get(*header),
            Some(value),
            "{header}"
        );
        assert_eq!(d.message.headers.extra["tenant"], json!("acme"));
        assert_eq!(d.message.body, sent.body, "{header}: the body is kept");
    }
    // RabbitMQ requeues what `list` looked at when the listing consumer's connection closes,
    // a moment after `list` returns: a purge at once may find some still in flight.
    let mut purged = 0;
    let deadline = Instant::now() + T;
    while purged < refused.len() as u64 && Instant::now() < deadline {
        purged += dead::purge(&*broker, &t.queue).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(purged, refused.len() as u64, "{}", t.name);
}

// See: issue 23 (A)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r23a_a_bad_header_fails_its_task_by_id_and_is_dead_lettered_as_sent() {
    bad_headers(Target::sqlite()).await;
}

// See: issue 23 (A)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r23a_a_bad_header_fails_its_task_by_id_and_is_dead_lettered_as_sent_on_redis() {
    if !celeriac_test::services::require_service("redis", "127.0.0.1:6379") {
        return;
    }
    bad_headers(Target::redis()).await;
}

// See: issue 23 (A)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r23a_a_bad_header_fails_its_task_by_id_and_is_dead_lettered_as_sent_on_rabbitmq() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    bad_headers(Target::amqp()).await;
}

/// Bodies over `max_message_size`: the client refuses to send one; one sent anyway (by a
/// client without the limit) fails by id with `LimitExceeded` and is dead-lettered whole,
/// its arguments never decoded, while the task beside it runs.
// See: issue 23 (limits)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_by_the_client_and_dead_lettered() {
    const LIMIT: usize = 100_000;
    let (url, db) = sqlite_url("reliability-oversize");
    let config_file = format!("{}.toml", db.display());
    std::fs::write(&config_file, format!("max_message_size = {LIMIT}\n")).unwrap();
    let mut config = celeriac::Config::default();
    config.broker_url = Some(url.clone());
    config.max_message_size = Some(LIMIT);
    let app = celeriac::App::builder()
        .config(config)
        .collect_tasks()
        .build()
        .await
        .unwrap();
    let big = json!("x".repeat(LIMIT));
    let e = Signature::<i64>::new("tasks.add")
        .args_json(vec![big.clone(), json!(1)])
        .apply_async(&app)
        .await
        .expect_err("the client refuses an oversize body")
        .to_string();
    assert!(e.contains("max_message_size (100000 bytes)"), "{e}");
    assert_eq!(app.broker().stats("celery").await.unwrap().total(), 0);

    let oversize = Message::new(
        Headers::new("tasks.add", new_id()),
        &Body::new(vec![big, json!(1)], Map::new()),
        ContentType::Json,
    )
    .unwrap();
    let broker = app.broker().clone();
    broker.declare("celery").await.unwrap();
    broker
        .publish("celery", &oversize, PublishOptions::default())
        .await
        .unwrap();
    let small = add::delay(&app, 2, 3).await.unwrap();
    let _w = WorkerProcess::start_with_config(&url, &config_file, &[]);
    assert_eq!(small.get_timeout(T).await.unwrap(), 5);
    let meta = app
        .result::<Value>(oversize.id())
        .wait_meta(Some(T))
        .await
        .unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    let why = meta.result.to_string();
    assert!(
        why.contains("LimitExceeded") && why.contains("max_message_size"),
        "{why}"
    );
    let deadline = Instant::now() + T;
    let letters = loop {
        let letters = dead::list(&*broker, "celery", 10).await.unwrap();
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id(), oversize.id());
    assert!(
        letters[0].reason.starts_with("LimitExceeded"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].message.body, oversize.body);
}

/// A worker started before its broker keeps trying (Celery's
/// `broker_connection_retry_on_startup`), one log line with the cause per attempt, and runs
/// tasks once the broker is up. The broker is a private `redis-server` on a free port.
// See: issue 23 (start-up)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_broker_waits_for_it() {
    if !celeriac_test::services::require_program("redis-server") {
        return;
    }
    let port = celeriac_test::services::free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let w = WorkerProcess::start(&url, &["-c", "1"]);
    w.wait_for_log("trying again in 2.00 s (1/100)", T).await;
    let mut redis = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    w.wait_for_log("connected to the broker", Duration::from_secs(20))
        .await;
    let app = client(&url).await;
    let r = add::delay(&app, 2, 3).await.unwrap();
    let got = r.get_timeout(T).await;
    let _ = redis.kill();
    let _ = redis.wait();
    assert_eq!(got.unwrap(), 5, "{}", w.log());
    let log = w.log();
    let attempts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot reach the broker"))
        .collect();
    assert!(!attempts.is_empty());
    for line in &attempts {
        assert_eq!(
            line.matches("Connection refused").count(),
            1,
            "the cause once per attempt: {line}"
        );
    }
}

/// A blocking task abandoned at its hard limit on a thread (the default pool cannot kill a
/// thread) must not keep the process alive after the worker stopped.
// See: issue 23 (E)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r23e_an_abandoned_spinning_thread_does_not_keep_the_process_alive() {
    let (url, _) = sqlite_url("reliability-abandoned");
    for pool in ["async", "threads"] {
        let mut w = WorkerProcess::start(&url, &["-P", pool, "-c", "2"]);
        let app = client(&url).await;
        let r = spin::delay(&app).await.unwrap();
        let meta = r.wait_meta(Some(T)).await.unwrap();
        assert_eq!(meta.status, TaskState::Failure, "{pool}");
        w.wait_for_log("hard time limit exceeded", T).await;
        let stopped = Instant::now();
        w.signal("TERM");
        let status = w.wait(Duration::from_secs(10)).await;
        assert!(status.success(), "{pool}: {status:?}\n{}", w.log());
        println!(
            "{pool}: exited {:.2}s after SIGTERM with a thread still spinning",
            stopped.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processes_pool_kills_a_spinning_task_at_its_hard_limit_and_survives_an_abort() {
    let (url, _) = sqlite_url("reliability-processes");
    let mut w = WorkerProcess::start(&url, &["-P", "processes", "-c", "2"]);
    let app = client(&url).await;

    // tasks.spin loops forever in blocking code; its hard limit is 1 s.
    let started = Instant::now();
    let r = spin::delay(&app).await.unwrap();
    let meta = r.wait_meta(Some(T)).await.unwrap();
    let killed_after = started.elapsed();
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result,
        json!({"exc_type": "TimeLimitExceeded", "exc_message": [1.0], "exc_module": "billiard.exceptions"})
    );
    w.wait_for_log("killing the pool child", T).await;
    let pid = child_pid(&w.log(), "killing the pool child").expect("pid in the log");
    let deadline = Instant::now() + T;
    while alive(pid) {
        assert!(Instant::now() < deadline, "child {pid} still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // tasks.abort kills its child; the worker reports it and goes on.
    let r = abort::delay(&app).await.unwrap();
    let meta = r.wait_meta(Some(T)).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    let e = meta.error().unwrap();
    assert_eq!(e.exc_type, "WorkerLostError");
    assert!(e.message().contains("SIGABRT"), "{e:?}");

    let sum = add::delay(&app, 2, 3).await.unwrap();
    assert_eq!(sum.get_timeout(T).await.unwrap(), 5);
    println!(
        "processes: spin killed {:.2}s after it was sent (hard limit 1 s); abort -> WorkerLostError",
        killed_after.as_secs_f64()
    );
    w.signal("TERM");
    let status = w.wait(T).await;
    assert!(status.success(), "{status:?}\n{}", w.log());
}

fn child_pid(log: &str, line: &str) -> Option<u32> {
    let l = log.lines().find(|l| l.contains(line))?;
    let at = l.find("pid=")? + 4;
    l[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Running (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_messages_ends_in_the_dead_letter_queue() {
    const BAD: usize = 300;
    const GOOD: usize = 300;
    let (url, _) = sqlite_url("reliability-malformed");
    let app = client(&url).await;
    let broker = app.broker().clone();
    broker.declare("celery").await.unwrap();
    let mut good = Vec::new();
    for i in 0..BAD.max(GOOD) {
        if i < BAD {
            let mut m = Message::new(
                Headers::new("tasks.add", new_id()),
                &Body::new(vec![json!(1), json!(2)], Map::new()),
                ContentType::Json,
            )
            .unwrap();
            match i % 3 {
                0 => m.headers.task = "tasks.nope".into(),
                1 => m.content_type = "application/x-python-serialize".into(),
                _ => m.body = b"[1, 2".to_vec(),
            }
            broker
                .publish("celery", &m, PublishOptions::default())
                .await
                .unwrap();
        }
        if i < GOOD {
            good.push(add::delay(&app, 1, i as i64).await.unwrap());
        }
    }
    let started = Instant::now();
    let _w = WorkerProcess::start(&url, &["-c", "4"]);
    for (i, r) in good.iter().enumerate() {
        assert_eq!(r.get_timeout(T).await.unwrap(), 1 + i as i64);
    }
    let deadline = Instant::now() + T;
    loop {
        let s = broker.stats("celery.dead").await.unwrap();
        if s.ready as usize == BAD {
            break;
        }
        assert!(Instant::now() < deadline, "dead letters: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    // A dead letter is published before its original is acked: wait for the last acks.
    let deadline = Instant::now() + T;
    loop {
        let s = broker.stats("celery").await.unwrap();
        if s.total() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "celery not emptied: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let letters = dead::list(&*broker, "celery", BAD).await.unwrap();
    assert_eq!(letters.len(), BAD);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for d in &letters {
        let kind = d.reason.split(':').next().unwrap_or_default().to_owned();
        *reasons.entry(kind).or_default() += 1;
    }
    assert_eq!(reasons.get("NotRegistered"), Some(&(BAD / 3)));
    assert_eq!(reasons.get("DecodeError"), Some(&(BAD - BAD / 3)));
    println!(
        "malformed: {BAD} bad + {GOOD} good in {:.2}s; dead letters {}, good results {GOOD}",
        elapsed.as_secs_f64(),
        letters.len()
    );
    assert_eq!(dead::purge(&*broker, "celery").await.unwrap(), BAD as u64);
}

fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
        .args(["--broker", url])
        .args(args)
        .output()
        .expect("run tasks binary");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_command_lists_inspects_requeues_and_purges() {
    let (url, _) = sqlite_url("reliability-dead-cli");
    let app = client(&url).await;
    let a = app
        .send_task("tasks.later", vec![json!(1)], Map::new())
        .await
        .unwrap();
    let b = app
        .send_task("tasks.later", vec![json!(2)], Map::new())
        .await
        .unwrap();
    let mut w = WorkerProcess::start(&url, &["-c", "2"]);
    let deadline = Instant::now() + T;
    while app.broker().stats("celery.dead").await.unwrap().ready < 2 {
        assert!(Instant::now() < deadline, "{}", w.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.signal("TERM");
    w.wait(T).await;

    let (ok, out, err) = cli(&url, &["dead"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("celery.dead ") && l.ends_with(" 2")),
        "{out}"
    );
    assert!(
        out.contains(a.id()) && out.contains("NotRegistered: tasks.later"),
        "{out}"
    );
    let (ok, out, err) = cli(&url, &["dead", "inspect", a.id()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("reason    NotRegistered: tasks.later"),
        "{out}"
    );
    assert!(out.contains("queue     celery\n"), "{out}");
    let (ok, _, err) = cli(&url, &["dead", "inspect", "nope"]);
    assert!(
        !ok && err.contains("no dead letter nope in celery.dead"),
        "{err}"
    );
    let (ok, _, err) = cli(&url, &["dead", "requeue"]);
    assert!(!ok && err.contains("--all"), "{err}");
    let (ok, out, err) = cli(&url, &["dead", "-Q", "celery", "requeue", a.id()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "requeued 1 message(s) from celery.dead");
    assert_eq!(app.broker().stats("celery").await.unwrap().ready, 1);
    assert_eq!(
        app.result::<Value>(a.id()).meta().await.unwrap().status,
        TaskState::Pending,
        "the stored FAILURE is forgotten"
    );
    let (ok, out, err) = cli(&url, &["dead", "purge"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "purged 1 dead letter(s) from celery.dead");
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigttin_and_sigttou_grow_and_shrink_the_processes_pool() {
    let (url, db) = sqlite_url("reliability-resize");
    let config = format!("{}.toml", db.display());
    std::fs::write(&config, "track_started = true\n").unwrap();
    let app = client(&url).await;
    let mut w = WorkerProcess::start_with_config(&url, &config, &["-P", "processes", "-c", "2"]);
    w.wait_for_log("worker started", T).await;
    children(&w, 2).await;

    w.signal("TTIN");
    children(&w, 3).await;
    // Three tasks run at once.
    let mut long = Vec::new();
    for _ in 0..3 {
        long.push(stamp::delay(&app, 3.0).await.unwrap());
    }
    let deadline = Instant::now() + T;
    loop {
        let mut started = 0;
        for r in &long {
            if r.state().await.unwrap() == TaskState::Started {
                started += 1;
            }
        }
        if started == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never three at once:\n{}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One signal at a time: two of a kind sent together may arrive as one (Unix merges a
    // pending signal with the next of its kind).
    for n in 1..=2 {
        w.signal("TTOU");
        let deadline = Instant::now() + T;
        while w.log().matches("SIGTTOU: pool shrunk by one").count() < n {
            assert!(Instant::now() < deadline, "no shrink {n}:\n{}", w.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for r in &long {
        r.get_timeout(T).await.unwrap();
    }
    children(&w, 1).await;
    // One at a time now: the second of two 1.5 s tasks ends 1.5 s after the first.
    let a = stamp::delay(&app, 1.5).await.unwrap();
    let b = stamp::delay(&app, 1.5).await.unwrap();
    let (ta, tb) = (
        a.get_timeout(T).await.unwrap(),
        b.get_timeout(T).await.unwrap(),
    );
    assert!(
        (ta - tb).abs() >= 1.4,
        "ran together: {ta} {tb}\n{}",
        w.log()
    );
    let log = w.log();
    assert!(log.contains("SIGTTIN: pool grown by one"), "{log}");
    assert!(log.contains("SIGTTOU: pool shrunk by one"), "{log}");
    w.signal("TERM");
    assert!(w.wait(T).await.success());
}

/// Waits until the worker has `n` live children.
async fn children(w: &WorkerProcess, n: usize) {
    let deadline = Instant::now() + T;
    while w.children() != n {
        assert!(
            Instant::now() < deadline,
            "never {n} children (now {}):\n{}",
            w.children(),
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_with_terminate_stops_a_running_task_in_a_pool_child() {
    use celeriac::RevokeOptions;
    let (url, db) = sqlite_url("reliability-terminate");
    let config = format!("{}.toml", db.display());
    std::fs::write(&config, "track_started = true\n").unwrap();
    let app = client(&url).await;
    let mut w = WorkerProcess::start_with_config(&url, &config, &["-P", "processes", "-c", "1"]);
    // A blocking task far longer than the test.
    let long = stamp::delay(&app, 60.0).await.unwrap();
    let deadline = Instant::now() + T;
    while long.state().await.unwrap() != TaskState::Started {
        assert!(Instant::now() < deadline, "never started:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Instant::now();
    long.revoke_with(RevokeOptions::terminate().signal(celeriac::Signal::Term))
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let e = long.error().await.unwrap();
        if e.as_ref().is_some_and(|e| e.message() == "terminated") {
            break;
        }
        assert!(Instant::now() < deadline, "never terminated:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = sent.elapsed();
    assert_eq!(long.state().await.unwrap(), TaskState::Revoked);
    let e = long.get_timeout(T).await.unwrap_err();
    assert_eq!(e.kind(), celeriac::ErrorKind::TaskFailed);
    // The worker carries on, and nothing is left in the queue (the message was acked).
    let r = add::delay(&app, 2, 3).await.unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 5);
    let s = app.broker().stats("celery").await.unwrap();
    assert_eq!(s.total(), 0, "{s:?}");
    let log = w.log();
    assert!(log.contains("revoked with terminate"), "{log}");
    println!(
        "terminate: REVOKED {:.2}s after revoke_with (poll 0.3 s)",
        stopped.as_secs_f64()
    );
    w.signal("TERM");
    assert!(w.wait(T).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_id_expires_with_its_result() {
    let (url, db) = sqlite_url("reliability-revoke-expiry");
    let config = format!("{}.toml", db.display());
    std::fs::write(&config, "result_expires = 4\n").unwrap();
    let mut c = celeriac::core::Config::default();
    c.result_expires = Some(Duration::from_secs(4));
    let app = celeriac::App::builder()
        .config(c)
        .broker_url(&url)
        .collect_tasks()
        .build()
        .await
        .unwrap();
    let mut w = WorkerProcess::start_with_config(&url, &config, &["-c", "1"]);
    w.wait_for_log("worker started", T).await;
    let id = new_id();
    let r = celeriac::AsyncResult::<Value>::from_id(&app, &id);
    r.revoke().await.unwrap();
    // While the revoke lasts, a message with that id is not run (a run would store SUCCESS).
    add::s(1, 1)
        .task_id(id.clone())
        .apply_async(&app)
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    while app.broker().stats("celery").await.unwrap().total() > 0 {
        assert!(Instant::now() < deadline, "never consumed:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked, "{}", w.log());
    // Once result_expires has passed, the id is unknown again and a new message runs.
    let deadline = Instant::now() + T;
    while r.state().await.unwrap() != TaskState::Pending {
        assert!(Instant::now() < deadline, "the revoke never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = add::s(2, 2).task_id(id).apply_async(&app).await.unwrap();
    assert_eq!(again.get_timeout(T).await.unwrap(), 4);
    w.signal("TERM");
    assert!(w.wait(T).await.success());
}
