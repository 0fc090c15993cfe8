//! Example task definitions shared by the example binaries and the end-to-end tests.
//!
//! The `tasks.*` names match a Python Celery app's `tasks` module, so Python clients and
//! workers can call them (and the other way round). [`bin`] holds the bodies of the example
//! binaries `tasks` and `wordcount`, so the end-to-end tests (crate `celeriac-e2e`) can build
//! the same programs as binaries of their own.

pub mod bin;
pub mod progress;

use std::time::Duration;

use celeriac::{App, AppBuilder, TaskContext, TaskError};
use serde_json::Value;

/// `tasks.add(x, y)`.
#[celeriac::task(name = "tasks.add")]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// `tasks.mul(x, y)`.
#[celeriac::task(name = "tasks.mul")]
pub fn mul(x: i64, y: i64) -> i64 {
    x * y
}

/// `tasks.xsum(numbers)`: the sum of a list of numbers.
#[celeriac::task(name = "tasks.xsum")]
pub fn xsum(numbers: Vec<f64>) -> f64 {
    numbers.iter().sum()
}

/// `tasks.echo(value)`: returns its argument unchanged.
#[celeriac::task(name = "tasks.echo")]
pub async fn echo(value: Value) -> Value {
    value
}

/// `tasks.note(message)`: logs the message as a warning from inside the task (in whichever
/// process runs it) and returns it.
#[celeriac::task(name = "tasks.note")]
pub fn note(message: String) -> String {
    tracing::warn!(note = %message, "a task logged a note");
    message
}

/// `tasks.fail(message)`: always fails with that message.
#[celeriac::task(name = "tasks.fail")]
pub async fn fail(message: String) -> Result<(), TaskError> {
    Err(TaskError::new("ValueError", message))
}

/// `tasks.sleep(seconds)`: sleeps, or stops early when cancelled (soft time limit, shutdown),
/// failing with `SoftTimeLimitExceeded`. Returns the seconds slept.
#[celeriac::task(name = "tasks.sleep")]
pub async fn sleep(ctx: TaskContext, seconds: f64) -> Result<f64, TaskError> {
    let d = Duration::try_from_secs_f64(seconds)
        .map_err(|e| TaskError::new("ValueError", e.to_string()))?;
    tokio::select! {
        () = tokio::time::sleep(d) => Ok(seconds),
        () = ctx.cancellation().cancelled() => Err(TaskError::new("SoftTimeLimitExceeded", "cancelled before finishing")),
    }
}

/// `tasks.flaky(failures)`: asks for a retry until it has been retried `failures` times, then
/// returns the number of retries. Exercises retries with exponential backoff.
#[celeriac::task(
    name = "tasks.flaky",
    max_retries = 10,
    retry_backoff = 0.05,
    retry_backoff_max = 0.5
)]
pub async fn flaky(ctx: TaskContext, failures: u32) -> Result<u32, TaskError> {
    if ctx.retries() < failures {
        return Err(TaskError::new(
            "ConnectionError",
            format!("attempt {} failed", ctx.retries()),
        )
        .into_retry(None));
    }
    Ok(ctx.retries())
}

/// `tasks.limited()`: rate limited to 10 per second per worker; returns when it ran (unix
/// seconds).
#[celeriac::task(name = "tasks.limited", rate_limit = "10/s")]
pub async fn limited() -> f64 {
    now()
}

/// `tasks.partner()`: a call to a partner API that allows 20 a second in all, so limited for
/// the whole cluster (however many workers run it); returns when it started (unix seconds).
#[celeriac::task(
    name = "tasks.partner",
    rate_limit = "20/s",
    rate_limit_scope = "cluster"
)]
pub async fn partner() -> f64 {
    now()
}

/// `tasks.capped(path, seconds)`: at most two run at once across the cluster. Appends
/// `<start> <end>` (unix seconds) to the file `path` after sleeping `seconds`.
#[celeriac::task(name = "tasks.capped", max_concurrency = 2)]
pub async fn capped(path: String, seconds: f64) -> Result<(), TaskError> {
    use std::io::Write as _;
    let start = now();
    tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
    let line = format!("{start} {}\n", now());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    f.write_all(line.as_bytes())?;
    Ok(())
}

/// `tasks.sync_once(account, path)`: unique for a minute per account: while one is pending or
/// running, sending it again returns the pending call's id. Appends its task id to `path`.
#[celeriac::task(name = "tasks.sync_once", unique_for = 60)]
pub fn sync_once(ctx: TaskContext, account: i64, path: String) -> Result<i64, TaskError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    f.write_all(format!("{}\n", ctx.id()).as_bytes())?;
    Ok(account)
}

/// `tasks.sync_brief(account, seconds)`: unique for two seconds per account; sleeps
/// `seconds`, then returns the account. A short lock shows a crashed holder's lock freeing
/// itself.
#[celeriac::task(name = "tasks.sync_brief", unique_for = 2)]
pub async fn sync_brief(account: i64, seconds: f64) -> i64 {
    tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
    account
}

/// `tasks.stamp(seconds)`: sleeps (blocking, on the thread pool) then returns when it finished
/// (unix seconds). Used to check that nothing is lost at shutdown.
#[celeriac::task(name = "tasks.stamp", acks_late = true)]
#[allow(clippy::disallowed_methods)] // a blocking task: it runs on the worker's thread pool
pub fn stamp(seconds: f64) -> f64 {
    std::thread::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0)));
    now()
}

/// `tasks.panic(message)`: panics, to show that a panicking task fails alone.
#[celeriac::task(name = "tasks.panic")]
pub fn panic(message: String) -> i64 {
    std::panic::panic_any(message)
}

/// `tasks.spin()`: loops forever in blocking code, deaf to cancellation. Only a hard time limit
/// under the processes pool (`-P processes`) stops it: its child process is killed. The limit
/// here is 1 s; a thread pool can only abandon it.
#[celeriac::task(name = "tasks.spin", time_limit = 1.0)]
pub fn spin() {
    loop {
        std::hint::spin_loop();
    }
}

/// `tasks.abort()`: aborts its process, as a crash in foreign code would. Under the processes
/// pool the task fails with `WorkerLostError` and the worker goes on; under the other pools it
/// takes the whole worker down.
#[celeriac::task(name = "tasks.abort")]
pub fn abort() {
    std::process::abort()
}

/// `tasks.journal(path)`: appends its task id and a newline to the file `path` (one write, so
/// lines from concurrent runs never mix), then returns. Acks late: the fault-injection tests
/// count how often each id ran.
#[celeriac::task(name = "tasks.journal", acks_late = true)]
pub fn journal(ctx: TaskContext, path: String) -> Result<(), TaskError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    f.write_all(format!("{}\n", ctx.id()).as_bytes())?;
    Ok(())
}

/// `tasks.tsum(numbers)`: the sum of a list of integers (a chord body).
#[celeriac::task(name = "tasks.tsum")]
pub fn tsum(numbers: Vec<i64>) -> i64 {
    numbers.iter().sum()
}

/// `tasks.hold(value, seconds)`: waits `seconds`, then returns `value`. Acks late: a chord
/// header member that a killed worker was running is redelivered and run again.
#[celeriac::task(name = "tasks.hold", acks_late = true)]
pub async fn hold(value: Value, seconds: f64) -> Value {
    tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
    value
}

/// `tasks.record(value, path)`: appends `value` as one JSON line to the file `path`, then
/// returns it. As a chord body it shows how often the body ran, and with what.
#[celeriac::task(name = "tasks.record", acks_late = true)]
pub fn record(value: Value, path: String) -> Result<Value, TaskError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    f.write_all(format!("{value}\n").as_bytes())?;
    Ok(value)
}

/// `tasks.words(text)`: the words of a text, lowercased, without surrounding punctuation (the
/// splitting node of the word-count dataflow).
#[celeriac::task(name = "tasks.words")]
pub fn words(text: String) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// `tasks.word(word)`: one word, as a tally key (the counting node of the word-count dataflow:
/// the worker adds one to the word's running total).
#[celeriac::task(name = "tasks.word")]
pub fn word(w: String) -> String {
    w
}

/// `tasks.initial(word)`: a word's first letter (a second subscriber of the splitting node,
/// counting words by initial).
#[celeriac::task(name = "tasks.initial")]
pub fn initial(word: String) -> String {
    word.chars().next().map(String::from).unwrap_or_default()
}

/// The word-count dataflow: node `split` ([`words()`], a stream) emits each word of a document
/// to node `count` ([`word()`], a tally: running totals by word) and to node `initials`
/// ([`initial()`], a tally: running totals by first letter). Start a run with
/// `word_count_graph().start(&app, "split", document)`.
pub fn word_count_graph() -> celeriac::Result<celeriac::flow::Graph> {
    use celeriac::Signature;
    use celeriac::flow::{Graph, Node};
    Graph::builder()
        .node(
            "split",
            Node::new(Signature::<Vec<String>>::new("tasks.words")).stream(),
        )
        .node(
            "count",
            Node::new(Signature::<String>::new("tasks.word")).tally(),
        )
        .node(
            "initials",
            Node::new(Signature::<String>::new("tasks.initial")).tally(),
        )
        .subscribe("count", "split")
        .subscribe("initials", "split")
        .build()
}

/// An app builder with every example task registered, configured from `celeriac.toml` and the
/// environment.
///
/// Registration is explicit: `collect_tasks()` only sees `#[task]`s in object files the linker
/// keeps, and a binary that names nothing from this crate would keep none of them.
pub fn app() -> AppBuilder {
    App::builder()
        .load_config()
        .task::<add>()
        .task::<mul>()
        .task::<xsum>()
        .task::<echo>()
        .task::<fail>()
        .task::<note>()
        .task::<sleep>()
        .task::<flaky>()
        .task::<limited>()
        .task::<partner>()
        .task::<capped>()
        .task::<sync_once>()
        .task::<sync_brief>()
        .task::<stamp>()
        .task::<panic>()
        .task::<spin>()
        .task::<abort>()
        .task::<journal>()
        .task::<tsum>()
        .task::<hold>()
        .task::<record>()
        .task::<words>()
        .task::<word>()
        .task::<initial>()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
