//! `celeriac-bench-peers`: the Rust peers of celeriac's benchmark, rusty-celery (crate `celery`)
//! and apalis (with `apalis-redis`), as client and worker processes that `celeriac-bench`
//! drives the way it drives Python Celery.
//!
//! This is a separate Cargo project, outside celeriac's workspace, so that neither peer (nor
//! their dependency trees) is ever built by `cargo test --workspace`; `scripts/bench` builds it
//! in release only when peers are measured.
//!
//! ```text
//! celeriac-bench-peers <peer> worker  <url> <queue> <concurrency>
//! celeriac-bench-peers <peer> enqueue <url> <queue> <n> <senders>
//! celeriac-bench-peers <peer> e2e     <url> <queue> <n> <senders> <results 0|1> <workload>
//! celeriac-bench-peers <peer> latency <url> <queue> <n> <workload> <max seconds>
//! celeriac-bench-peers <peer> closed  <url> <queue> <n> <callers> <workload>
//! celeriac-bench-peers <peer> purge   <url> <queue>
//! ```
//!
//! `<peer>` is `rusty-celery` or `apalis`; `<workload>` is `noop` (`add(1, 2)`) or `realistic`
//! (1 KiB of argument, 5 ms of awaited sleep). Client commands print one JSON object.
//!
//! Knowing when a task is done: rusty-celery has no result backend, and apalis's
//! `wait_for` polls every 100 ms, so every worker here counts the tasks it has finished and
//! sends the count as a UDP datagram to `BENCH_NOTIFY` (an address on loopback) after each task,
//! and every 50 ms when idle. A client binds that address, takes the largest count seen (a lost
//! datagram costs nothing) and waits for it to grow by the number of tasks it sent. The
//! datagram costs the worker one `sendto` per task (a few µs).

use std::net::{SocketAddr, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Tasks finished by this worker process.
static DONE: AtomicU64 = AtomicU64::new(0);
/// Where the count goes.
static NOTIFY: OnceLock<Option<(UdpSocket, SocketAddr)>> = OnceLock::new();

/// The bytes of the realistic workload's argument.
const PAD: usize = 1024;
/// How often an idle apalis worker looks for tasks.
const POLL_MS: u64 = 10;
/// apalis's worker heartbeat (default 30 s), which also wakes a worker whose poll stalled.
const HEARTBEAT_MS: u64 = 200;
/// The realistic workload's awaited I/O.
const SLEEP_MS: u64 = 5;

/// Marks one task finished and tells the client: the count so far, then the task's `x` (the
/// realistic workload's callers number their tasks with it).
fn finished(x: i64) {
    let n = DONE.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(Some((sock, addr))) = NOTIFY.get() {
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&n.to_le_bytes());
        msg[8..].copy_from_slice(&x.to_le_bytes());
        let _ = sock.send_to(&msg, addr);
    }
}

/// The notification socket of a worker, and a thread repeating the count every 50 ms.
fn start_notifier() -> Result<()> {
    let target = match std::env::var("BENCH_NOTIFY") {
        Ok(a) => Some((UdpSocket::bind("127.0.0.1:0")?, a.parse::<SocketAddr>()?)),
        Err(_) => None,
    };
    let has = target.is_some();
    let _ = NOTIFY.set(target);
    if has {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                if let Some(Some((sock, addr))) = NOTIFY.get() {
                    let n = DONE.load(Ordering::Relaxed);
                    let _ = sock.send_to(&n.to_le_bytes(), addr);
                }
            }
        });
    }
    Ok(())
}

/// A client's view of the worker's count.
struct Counter {
    sock: tokio::net::UdpSocket,
    seen: u64,
}

impl Counter {
    /// Binds `BENCH_NOTIFY` and waits for the worker's first report.
    async fn open() -> Result<Counter> {
        let addr = std::env::var("BENCH_NOTIFY").map_err(|_| "BENCH_NOTIFY is not set")?;
        let sock = tokio::net::UdpSocket::bind(addr.as_str()).await?;
        let mut c = Counter { sock, seen: 0 };
        c.seen = c.next(Duration::from_secs(10)).await?;
        // Reports already queued in the socket: take the latest.
        c.drain();
        Ok(c)
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 16];
        while let Ok((len, _)) = self.sock.try_recv_from(&mut buf) {
            self.take(&buf[..len]);
        }
    }

    fn take(&mut self, msg: &[u8]) {
        if let Some(n) = msg.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            self.seen = self.seen.max(u64::from_le_bytes(n));
        }
    }

    async fn next(&mut self, timeout: Duration) -> Result<u64> {
        let mut buf = [0u8; 16];
        let (len, _) = tokio::time::timeout(timeout, self.sock.recv_from(&mut buf))
            .await
            .map_err(|_| "no report from the worker")??;
        self.take(&buf[..len]);
        Ok(self.seen)
    }

    /// Waits until the count reaches `target`.
    async fn until(&mut self, target: u64, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        while self.seen < target {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("worker finished {} of {target} in time", self.seen).into());
            }
            self.next(left).await?;
            self.drain();
        }
        Ok(())
    }
}

/// The shape of one task's arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    /// `add(1, 2)`.
    Noop,
    /// `add(1, 2)` with 1 KiB of padding, awaiting 5 ms.
    Realistic,
}

impl Workload {
    fn parse(s: &str) -> Result<Workload> {
        match s {
            "noop" => Ok(Workload::Noop),
            "realistic" => Ok(Workload::Realistic),
            other => Err(format!("unknown workload {other} (noop, realistic)").into()),
        }
    }
}

// ===== rusty-celery =====

// rusty-celery's `#[task]` expands to an `impl` inside a `const` block.
#[allow(non_local_definitions)]
mod rc {
    use celery::prelude::*;

    /// The no-op task.
    #[celery::task(name = "add")]
    pub(crate) fn add(x: i64, y: i64) -> TaskResult<i64> {
        super::finished(x);
        Ok(x + y)
    }

    /// The realistic task: a padded argument and 5 ms of awaited I/O.
    #[celery::task(name = "add_io")]
    pub(crate) async fn add_io(x: i64, y: i64, pad: String) -> TaskResult<i64> {
        tokio::time::sleep(std::time::Duration::from_millis(super::SLEEP_MS)).await;
        super::finished(x);
        Ok(x + y + i64::from(pad.is_empty()))
    }
}

async fn rc_app(url: &str, queue: &str, prefetch: u16) -> Result<std::sync::Arc<celery::Celery>> {
    let app = celery::CeleryBuilder::new("bench", url)
        .default_queue(queue)
        .prefetch_count(prefetch)
        .broker_connection_timeout(10)
        .build()
        .await?;
    app.register_task::<rc::add>().await?;
    app.register_task::<rc::add_io>().await?;
    Ok(std::sync::Arc::new(app))
}

async fn rc_send(app: &celery::Celery, w: Workload, pad: &str) -> Result<()> {
    rc_send_x(app, w, pad, 1).await
}

async fn rc_send_x(app: &celery::Celery, w: Workload, pad: &str, x: i64) -> Result<()> {
    match w {
        Workload::Noop => app.send_task(rc::add::new(x, 2)).await?,
        Workload::Realistic => app.send_task(rc::add_io::new(x, 2, pad.to_owned())).await?,
    };
    Ok(())
}

// ===== apalis =====

/// apalis's job: one argument type per storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    x: i64,
    y: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pad: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    sleep_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Job {
    fn of(w: Workload, pad: &str) -> Job {
        Job::numbered(w, pad, 1)
    }

    fn numbered(w: Workload, pad: &str, x: i64) -> Job {
        match w {
            Workload::Noop => Job {
                x,
                y: 2,
                pad: String::new(),
                sleep_ms: 0,
            },
            Workload::Realistic => Job {
                x,
                y: 2,
                pad: pad.to_owned(),
                sleep_ms: SLEEP_MS,
            },
        }
    }
}

async fn apalis_job(job: Job) -> Result<i64, apalis::prelude::BoxDynError> {
    if job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    finished(job.x);
    Ok(job.x + job.y)
}

async fn apalis_storage(url: &str, queue: &str) -> Result<apalis_redis::RedisStorage<Job>> {
    let conn = apalis_redis::connect(url).await?;
    let config = apalis_redis::Config::default().queue(queue);
    Ok(apalis_redis::RedisStorage::new(conn).with_config(config))
}

// ===== commands =====

fn arg(args: &[String], i: usize, what: &str) -> Result<String> {
    args.get(i)
        .cloned()
        .ok_or_else(|| format!("missing argument {i}: {what}").into())
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    arg(args, i, what)?
        .parse()
        .map_err(|_| format!("argument {i} ({what}) is not a number").into())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<()> {
    let peer = arg(args, 0, "peer")?;
    let cmd = arg(args, 1, "command")?;
    let url = arg(args, 2, "url")?;
    let queue = arg(args, 3, "queue")?;
    match (peer.as_str(), cmd.as_str()) {
        (_, "worker") => {
            start_notifier()?;
            let concurrency: usize = num(args, 4, "concurrency")?;
            match peer.as_str() {
                "rusty-celery" => {
                    let app = rc_app(&url, &queue, u16::try_from(concurrency)?).await?;
                    app.consume_from(&[queue.as_str()]).await?;
                }
                "apalis" => {
                    use apalis::prelude::*;
                    // apalis-redis 1.0.0 stores every push in its scheduled set (run_at is
                    // never 0), so the pub/sub wake-up of its factory never fires, and an idle
                    // worker would fetch only at its heartbeat (30 s): poll every 10 ms, and
                    // fetch batches as large as the concurrency (default 10).
                    let conn = apalis_redis::connect(url.as_str()).await?;
                    let config = apalis_redis::Config::default()
                        .queue(&queue)
                        .batch_size(concurrency)
                        .heartbeat_interval(Duration::from_millis(HEARTBEAT_MS));
                    let storage = apalis_redis::RedisStorage::<Job>::new(conn)
                        .with_config(config)
                        .poll_with_interval(Duration::from_millis(POLL_MS));
                    let worker = WorkerBuilder::new(format!("bench-{}", std::process::id()))
                        .backend(storage)
                        .concurrency(concurrency)
                        .build(apalis_job);
                    worker.run().await?;
                }
                other => return Err(format!("unknown peer {other}").into()),
            }
        }
        (_, "enqueue") => {
            let n: usize = num(args, 4, "n")?;
            let senders: usize = num(args, 5, "senders")?;
            let (seq, conc) = enqueue(&peer, &url, &queue, n, senders).await?;
            println!("{}", json!({"sequential": seq, "concurrent": conc}));
        }
        (_, "e2e") => {
            let n: usize = num(args, 4, "n")?;
            let senders: usize = num(args, 5, "senders")?;
            let results = arg(args, 6, "results")? == "1";
            let w = Workload::parse(&arg(args, 7, "workload")?)?;
            let rate = e2e(&peer, &url, &queue, n, senders, results, w).await?;
            println!("{}", json!({ "rate": rate }));
        }
        (_, "latency") => {
            let n: usize = num(args, 4, "n")?;
            let w = Workload::parse(&arg(args, 5, "workload")?)?;
            let max: u64 = num(args, 6, "max seconds")?;
            let samples = latency(&peer, &url, &queue, n, w, Duration::from_secs(max)).await?;
            println!("{}", json!({ "samples_ms": samples }));
        }
        (_, "closed") => {
            let n: usize = num(args, 4, "n")?;
            let callers: usize = num(args, 5, "callers")?;
            let w = Workload::parse(&arg(args, 6, "workload")?)?;
            let (rate, samples) = closed(&peer, &url, &queue, n, callers, w).await?;
            println!("{}", json!({ "rate": rate, "samples_ms": samples }));
        }
        ("rusty-celery", "purge") if url.starts_with("amqp") => {
            let conn =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            let declare = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(&queue, declare, Default::default())
                .await?;
            ch.queue_purge(&queue, Default::default()).await?;
            conn.close(200, "bye").await?;
            println!("{}", json!({}));
        }
        (_, "purge") => {
            return Err("purge: only rusty-celery on amqp:// (redis: flush the database)".into());
        }
        (p, c) => return Err(format!("unknown peer or command: {p} {c}").into()),
    }
    Ok(())
}

/// Sequential and concurrent enqueue rates (no worker running).
async fn enqueue(
    peer: &str,
    url: &str,
    queue: &str,
    n: usize,
    senders: usize,
) -> Result<(f64, f64)> {
    let per = n / senders;
    match peer {
        "rusty-celery" => {
            let app = rc_app(url, queue, 1).await?;
            let clock = Instant::now();
            for _ in 0..n {
                rc_send(&app, Workload::Noop, "").await?;
            }
            let seq = n as f64 / clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..senders {
                let app = app.clone();
                set.spawn(async move {
                    for _ in 0..per {
                        rc_send(&app, Workload::Noop, "").await?;
                    }
                    Ok::<_, BoxError>(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            let conc = (per * senders) as f64 / clock.elapsed().as_secs_f64();
            app.close().await?;
            Ok((seq, conc))
        }
        "apalis" => {
            use apalis::prelude::TaskSink as _;
            let mut storage = apalis_storage(url, queue).await?;
            let clock = Instant::now();
            for _ in 0..n {
                storage.push(Job::of(Workload::Noop, "")).await?;
            }
            let seq = n as f64 / clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..senders {
                let mut storage = storage.clone();
                set.spawn(async move {
                    for _ in 0..per {
                        storage.push(Job::of(Workload::Noop, "")).await?;
                    }
                    Ok::<_, BoxError>(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            Ok((seq, (per * senders) as f64 / clock.elapsed().as_secs_f64()))
        }
        other => Err(format!("unknown peer {other}").into()),
    }
}

/// Sends `n` tasks from `senders` concurrent senders and waits until the worker has finished
/// them all (apalis with `results`: each sender then reads its tasks' results through
/// apalis's `check_status`). Returns tasks per second.
async fn e2e(
    peer: &str,
    url: &str,
    queue: &str,
    n: usize,
    senders: usize,
    results: bool,
    w: Workload,
) -> Result<f64> {
    let mut counter = Counter::open().await?;
    let start = counter.seen;
    let pad = "x".repeat(PAD);
    let clock = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    match peer {
        "rusty-celery" => {
            if results {
                return Err("rusty-celery has no result backend".into());
            }
            let app = rc_app(url, queue, 1).await?;
            for s in 0..senders {
                let app = app.clone();
                let pad = pad.clone();
                let count = n / senders + usize::from(s < n % senders);
                set.spawn(async move {
                    for _ in 0..count {
                        rc_send(&app, w, &pad).await?;
                    }
                    Ok::<_, BoxError>(())
                });
            }
        }
        "apalis" => {
            use apalis::prelude::*;
            let storage = apalis_storage(url, queue).await?;
            let pid = std::process::id();
            for s in 0..senders {
                let mut storage = storage.clone();
                let pad = pad.clone();
                let count = n / senders + usize::from(s < n % senders);
                set.spawn(async move {
                    let mut ids = Vec::with_capacity(count);
                    for i in 0..count {
                        let id = TaskId::from_string(format!("bench-{pid}-{s}-{i}"));
                        let task = TaskBuilder::new(Job::of(w, &pad))
                            .task_id(id.clone())
                            .build();
                        storage.push_task(task).await?;
                        if results {
                            ids.push(id);
                        }
                    }
                    for id in ids {
                        loop {
                            let done = WaitForCompletion::<serde_json::Value>::check_status(
                                &mut storage,
                                [id.clone()],
                            )
                            .await?;
                            if let Some(r) = done.first() {
                                match r.result() {
                                    Ok(v) if v == &json!(3) => break,
                                    other => {
                                        return Err(format!("wrong result {other:?}").into());
                                    }
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Ok::<_, BoxError>(())
                });
            }
        }
        other => return Err(format!("unknown peer {other}").into()),
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    counter
        .until(start + n as u64, Duration::from_secs(600))
        .await?;
    Ok(n as f64 / clock.elapsed().as_secs_f64())
}

/// One task at a time: send, then wait for the worker's report; milliseconds each. Stops
/// after `max` in total (rusty-celery's Redis consumer sleeps a second whenever the queue is
/// empty, so each of its round trips may take that long).
async fn latency(
    peer: &str,
    url: &str,
    queue: &str,
    n: usize,
    w: Workload,
    max: Duration,
) -> Result<Vec<f64>> {
    let mut counter = Counter::open().await?;
    let pad = "x".repeat(PAD);
    let end = Instant::now() + max;
    let mut samples = Vec::with_capacity(n);
    let rc = if peer == "rusty-celery" {
        Some(rc_app(url, queue, 1).await?)
    } else {
        None
    };
    let mut storage = if peer == "apalis" {
        Some(apalis_storage(url, queue).await?)
    } else {
        None
    };
    for _ in 0..n {
        if Instant::now() > end {
            break;
        }
        counter.drain();
        let target = counter.seen + 1;
        let t = Instant::now();
        if let Some(app) = &rc {
            rc_send(app, w, &pad).await?;
        } else if let Some(storage) = &mut storage {
            use apalis::prelude::TaskSink as _;
            storage.push(Job::of(w, &pad)).await?;
        } else {
            return Err(format!("unknown peer {peer}").into());
        }
        counter.until(target, Duration::from_secs(30)).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(samples)
}

/// A closed loop: `callers` concurrent callers, each sending one task and waiting for the
/// worker's report of that very task (by its `x`) before sending the next, `n` tasks in all.
/// Returns tasks per second and each call's milliseconds.
async fn closed(
    peer: &str,
    url: &str,
    queue: &str,
    n: usize,
    callers: usize,
    w: Workload,
) -> Result<(f64, Vec<f64>)> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::sync::oneshot;

    type Waiting = Arc<Mutex<HashMap<i64, oneshot::Sender<()>>>>;
    let counter = Counter::open().await?;
    let waiting: Waiting = Arc::default();
    let listener = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while let Ok((len, _)) = counter.sock.recv_from(&mut buf).await {
                let Some(x) = buf
                    .get(8..len)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(i64::from_le_bytes)
                else {
                    continue;
                };
                let tx = waiting.lock().ok().and_then(|mut m| m.remove(&x));
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
        })
    };
    let rc = if peer == "rusty-celery" {
        Some(rc_app(url, queue, 1).await?)
    } else {
        None
    };
    let storage = if peer == "apalis" {
        Some(apalis_storage(url, queue).await?)
    } else {
        None
    };
    let next = Arc::new(AtomicU64::new(0));
    // Numbers above any no-op task's x (1), unique per run.
    let base = i64::from(std::process::id()) << 24;
    let pad = Arc::new("x".repeat(PAD));
    let clock = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (rc, mut storage) = (rc.clone(), storage.clone());
        let (next, waiting, pad) = (next.clone(), waiting.clone(), pad.clone());
        set.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return Ok::<_, BoxError>(samples);
                }
                let x = base + i as i64;
                let (tx, rx) = oneshot::channel();
                waiting.lock().map_err(|_| "poisoned")?.insert(x, tx);
                let t = Instant::now();
                if let Some(app) = &rc {
                    rc_send_x(app, w, &pad, x).await?;
                } else if let Some(storage) = &mut storage {
                    use apalis::prelude::TaskSink as _;
                    storage.push(Job::numbered(w, &pad, x)).await?;
                }
                tokio::time::timeout(Duration::from_secs(60), rx)
                    .await
                    .map_err(|_| format!("task {i} not reported in 60 s"))??;
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let rate = n as f64 / clock.elapsed().as_secs_f64();
    listener.abort();
    Ok((rate, all))
}
