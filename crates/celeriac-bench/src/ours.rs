//! celeriac's side: our client in this process, our workers as `celeriac-bench worker`
//! processes.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use celeriac::{App, Signature};
use serde_json::Value;

use crate::procs::{CpuMeter, CpuSplit, Proc, Sampler, server_of, tree_rss_kb};
use crate::report::{Better, Contender, Report, median, percentiles};
use crate::{Sizes, Workloads, queue};

const SENDERS: usize = 8;
const BATCH: usize = 1_000;
/// The longest any single phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// One broker under test.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) url: String,
    pub(crate) backend: String,
}

impl Target {
    pub(crate) fn new(name: &'static str, url: String) -> Target {
        Target {
            name,
            backend: url.clone(),
            url,
        }
    }

    async fn app(&self) -> anyhow::Result<App> {
        Ok(App::builder()
            .broker_url(&self.url)
            .result_backend(&self.backend)
            .build()
            .await?)
    }

    fn worker(&self, index: usize) -> anyhow::Result<Proc> {
        self.worker_c(index, 64)
    }

    fn worker_c(&self, index: usize, concurrency: usize) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["worker", "-b", &self.url, "--result-backend", &self.backend])
            .args([
                "-Q",
                queue(),
                "-c",
                &concurrency.to_string(),
                "--prefetch-buffer",
                "512",
                "-l",
                "warn",
            ])
            .args(["-n", &format!("{}{index}@localhost", queue())]);
        cmd.args(WORKER_ARGS.get().into_iter().flatten());
        Proc::spawn(cmd)
    }
}

/// More flags for every worker the benchmark starts (`--task-events`, `--worker-arg`).
static WORKER_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Sets the extra worker flags (once, at start).
pub(crate) fn set_worker_args(args: Vec<String>) {
    let _ = WORKER_ARGS.set(args);
}

/// Whether a TCP server listens at `addr`.
pub(crate) async fn reachable(addr: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// The realistic workload's task (`--workload realistic`): an argument of [`PAD`] bytes and
/// [`IO_MS`] of awaited I/O (a timer standing in for a database or HTTP call).
#[celeriac::task(name = "bench.add_io")]
pub(crate) async fn add_io(x: i64, y: i64, pad: String) -> i64 {
    tokio::time::sleep(Duration::from_millis(IO_MS)).await;
    x + y + i64::from(pad.is_empty())
}

/// The realistic workload's argument size.
pub(crate) const PAD: usize = 1024;
/// The realistic workload's awaited I/O, in milliseconds.
pub(crate) const IO_MS: u64 = 5;
/// In-flight tasks of the realistic workload: callers on the client side, concurrency on the
/// worker's.
pub(crate) const REALISTIC_CONCURRENCY: usize = 100;

/// The realistic workload's task count for the Rust contenders.
pub(crate) fn realistic_n(s: &Sizes) -> usize {
    s.n.min(5_000)
}

/// A closed loop of [`REALISTIC_CONCURRENCY`] callers, each sending `bench.add_io` and reading
/// its result before sending the next, `n` calls in all, against one worker of concurrency
/// [`REALISTIC_CONCURRENCY`]: throughput and each call's latency.
pub(crate) async fn realistic(t: &Target, s: &Sizes, r: &mut Report) -> anyhow::Result<()> {
    let b = t.name;
    let app = t.app().await.with_context(|| format!("opening {b}"))?;
    purge(&app).await?;
    let worker = t.worker_c(0, REALISTIC_CONCURRENCY)?;
    for _ in 0..2 {
        add()
            .apply_async(&app)
            .await?
            .get_timeout(Duration::from_secs(30))
            .await
            .context("worker did not answer")?;
    }
    let n = realistic_n(s);
    let pad = "x".repeat(PAD);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clock = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..REALISTIC_CONCURRENCY {
        let (app, next, pad) = (app.clone(), next.clone(), pad.clone());
        set.spawn(async move {
            let mut samples = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let t = Instant::now();
                let v = Signature::<Value>::new("bench.add_io")
                    .arg(1)
                    .arg(2)
                    .arg(pad.as_str())
                    .queue(queue())
                    .apply_async(&app)
                    .await?
                    .get_timeout(Duration::from_secs(60))
                    .await?;
                anyhow::ensure!(v == 3, "wrong result {v}");
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut samples = Vec::with_capacity(n);
    while let Some(x) = set.join_next().await {
        samples.extend(x??);
    }
    let rate = n as f64 / clock.elapsed().as_secs_f64();
    realistic_rows(r, b, Contender::Ours, rate, samples);
    drop(worker);
    purge(&app).await?;
    app.close().await?;
    Ok(())
}

/// The realistic workload's rows: throughput and the calls' p50 and p99.
pub(crate) fn realistic_rows(
    r: &mut Report,
    broker: &str,
    who: Contender,
    rate: f64,
    samples: Vec<f64>,
) {
    r.record(
        who,
        broker,
        REALISTIC_THROUGHPUT,
        "tasks/s",
        Better::Higher,
        rate,
    );
    let p = percentiles(samples);
    r.record(
        who,
        broker,
        "realistic: call p50",
        "ms",
        Better::Lower,
        p[0],
    );
    r.record(
        who,
        broker,
        "realistic: call p99",
        "ms",
        Better::Lower,
        p[2],
    );
}

/// The realistic workload's throughput row.
/// [`realistic_rows`] from a client program's JSON report (`rate`, `samples_ms`).
pub(crate) fn realistic_rows_from(r: &mut Report, broker: &str, who: Contender, v: &Value) {
    let samples = v["samples_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    realistic_rows(
        r,
        broker,
        who,
        v["rate"].as_f64().unwrap_or(f64::NAN),
        samples,
    );
}

pub(crate) const REALISTIC_THROUGHPUT: &str =
    "realistic: 1 KiB args, 5 ms awaited I/O, 100 callers, throughput";

fn add() -> Signature<Value> {
    Signature::<Value>::new("tasks.add")
        .arg(1)
        .arg(2)
        .queue(queue())
}

async fn purge(app: &App) -> anyhow::Result<()> {
    app.broker().declare(queue()).await?;
    app.broker().purge(queue()).await?;
    Ok(())
}

/// Starts `count` workers and waits until each round trip works.
async fn start_workers(t: &Target, app: &App, count: usize) -> anyhow::Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for i in 0..count {
        procs.push(t.worker(i)?);
    }
    for _ in 0..count * 2 {
        add()
            .apply_async(app)
            .await?
            .get_timeout(Duration::from_secs(30))
            .await
            .context("worker did not answer")?;
    }
    for p in &mut procs {
        if !p.alive() {
            bail!("a worker exited at start");
        }
    }
    Ok(procs)
}

/// Sends `n` tasks in batches of `BATCH` through `App::send_many` (the public batch API: one
/// `Broker::publish_batch` per batch).
async fn send_batches(
    app: &App,
    n: usize,
    eta: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        let sig = match eta {
            Some(at) => add().ignore_result(true).eta(at),
            None => add().ignore_result(true),
        };
        let batch = vec![sig; k];
        let ids = app.send_many(&batch).await?;
        anyhow::ensure!(
            ids.len() == k,
            "send_many returned {} ids for {k}",
            ids.len()
        );
        left -= k;
    }
    Ok(())
}

/// Sends `n` tasks from `SENDERS` concurrent senders; with results, each sender then reads
/// its tasks' results. Returns when all is done.
async fn send_and_collect(app: &App, n: usize, ignore: bool) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let app = app.clone();
        let count = n / SENDERS + usize::from(s < n % SENDERS);
        set.spawn(async move {
            let mut results = Vec::with_capacity(if ignore { 0 } else { count });
            for _ in 0..count {
                let r = add().ignore_result(ignore).apply_async(&app).await?;
                if !ignore {
                    results.push(r);
                }
            }
            for r in results {
                let v = r.get_timeout(PHASE_TIMEOUT).await?;
                anyhow::ensure!(v == 3, "wrong result {v}");
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    if ignore {
        wait_drained(app).await?;
    }
    Ok(())
}

async fn wait_drained(app: &App) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let s = app.broker().stats(queue()).await?;
        if s.ready + s.unacked == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("queue not drained in time: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Round trips `delay` then `get`, in milliseconds.
async fn round_trips(app: &App, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        add()
            .apply_async(app)
            .await?
            .get_timeout(Duration::from_secs(30))
            .await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(samples)
}

/// Sends ignore_result tasks at `rate` per second until stopped (or for at most 10 minutes).
fn background_load(
    app: &App,
    rate: f64,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let app = app.clone();
    let per_tick = (rate / 1000.0).max(1.0) as usize;
    let task = tokio::spawn(async move {
        let end = Instant::now() + PHASE_TIMEOUT;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while Instant::now() < end {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tick.tick() => {}
            }
            for _ in 0..per_tick {
                let _ = add().ignore_result(true).apply_async(&app).await;
            }
        }
    });
    (stop, task)
}

/// CPU time per task of a throughput run, split by process (client, worker, broker server),
/// in microseconds: where the time goes, and how close the machine is to saturation.
pub(crate) fn cpu_rows(
    r: &mut Report,
    broker: &str,
    what: &str,
    runs: &[CpuSplit],
    n_per_run: usize,
    who: Contender,
) {
    let tasks = (n_per_run * runs.len()).max(1) as f64;
    let per = |f: &dyn Fn(&CpuSplit) -> f64| runs.iter().map(f).sum::<f64>() * 1e6 / tasks;
    // Our client runs in this process; the others' clients are child processes.
    let client = if who == Contender::Ours {
        per(&|c| c.client)
    } else {
        per(&|c| c.child_client)
    };
    let mut rows = vec![("client", client), ("worker", per(&|c| c.workers))];
    if runs.iter().all(|c| c.server.is_some()) {
        rows.push(("broker server", per(&|c| c.server.unwrap_or(0.0))));
    }
    for (part, v) in rows {
        let metric = format!("CPU per task, {what}: {part}");
        r.record(who, broker, &metric, "µs", Better::Lower, v);
    }
}

pub(crate) fn latency_rows(
    r: &mut Report,
    broker: &str,
    what: &str,
    samples: Vec<f64>,
    who: Contender,
) {
    let p = percentiles(samples);
    for (name, v) in ["p50", "p90", "p99", "max"].iter().zip(p) {
        let metric = format!("latency {what} {name}");
        r.record(who, broker, &metric, "ms", Better::Lower, v);
    }
}

/// Throughput with results over 1, 2 and 4 worker processes, with the CPU time per task of
/// the client, the workers together and the broker server at each count: whether more
/// processes cost more per task, and where.
async fn scaling(t: &Target, app: &App, s: &Sizes, r: &mut Report) -> anyhow::Result<()> {
    let b = t.name;
    let n = s.n;
    for count in [1, 2, 4] {
        purge(app).await?;
        let workers = start_workers(t, app, count).await?;
        let pids: Vec<u32> = workers.iter().map(Proc::pid).collect();
        let mut rates = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..s.runs {
            let meter = CpuMeter::start(pids.clone(), server_of(b));
            let clock = Instant::now();
            send_and_collect(app, n, false).await?;
            rates.push(n as f64 / clock.elapsed().as_secs_f64());
            cpu.push(meter.finish());
        }
        let what = format!("{count} worker process(es)");
        r.ours(
            b,
            &format!("throughput, {what}, results"),
            "tasks/s",
            Better::Higher,
            median(rates),
        );
        cpu_rows(r, b, &what, &cpu, n, Contender::Ours);
        drop(workers);
    }
    Ok(())
}

/// A focused measurement instead of the whole run: `--latency-only n` or `--scaling-only`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Probe {
    /// This many sequential round trips against one fresh worker.
    Latency(usize),
    /// The scaling over worker processes (see [`scaling`]).
    Scaling,
}

/// Runs `probe` against one broker.
pub(crate) async fn probe(
    t: &Target,
    probe: Probe,
    s: &Sizes,
    r: &mut Report,
) -> anyhow::Result<()> {
    let app = t
        .app()
        .await
        .with_context(|| format!("opening {}", t.name))?;
    purge(&app).await?;
    match probe {
        Probe::Latency(n) => {
            let _workers = start_workers(t, &app, 1).await?;
            latency_rows(
                r,
                t.name,
                "sequential",
                round_trips(&app, n).await?,
                Contender::Ours,
            );
        }
        Probe::Scaling => scaling(t, &app, s, r).await?,
    }
    purge(&app).await?;
    app.close().await?;
    Ok(())
}

/// The workloads `w` against one broker.
pub(crate) async fn run_workloads(
    t: &Target,
    s: &Sizes,
    r: &mut Report,
    w: Workloads,
) -> anyhow::Result<()> {
    if w.noop {
        run_all(t, s, r).await?;
    }
    if w.realistic {
        realistic(t, s, r).await?;
    }
    Ok(())
}

/// Every workload against one broker.
pub(crate) async fn run_all(t: &Target, s: &Sizes, r: &mut Report) -> anyhow::Result<()> {
    let b = t.name;
    let app = t.app().await.with_context(|| format!("opening {b}"))?;
    purge(&app).await?;

    // Enqueue rates, no worker running.
    let n = s.n;
    let clock = Instant::now();
    for _ in 0..n {
        add().ignore_result(true).apply_async(&app).await?;
    }
    r.ours(
        b,
        "enqueue, sequential",
        "tasks/s",
        Better::Higher,
        n as f64 / clock.elapsed().as_secs_f64(),
    );
    purge(&app).await?;
    let clock = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..SENDERS {
        let app = app.clone();
        set.spawn(async move {
            for _ in 0..n / SENDERS {
                add().ignore_result(true).apply_async(&app).await?;
            }
            Ok::<_, celeriac::Error>(())
        });
    }
    while let Some(x) = set.join_next().await {
        x??;
    }
    r.ours(
        b,
        &format!("enqueue, {SENDERS} concurrent senders"),
        "tasks/s",
        Better::Higher,
        (n / SENDERS * SENDERS) as f64 / clock.elapsed().as_secs_f64(),
    );
    purge(&app).await?;
    let clock = Instant::now();
    send_batches(&app, n, None).await?;
    r.ours(
        b,
        &format!("enqueue, batches of {BATCH}"),
        "tasks/s",
        Better::Higher,
        n as f64 / clock.elapsed().as_secs_f64(),
    );
    purge(&app).await?;

    // One worker: idle memory, throughput, peak memory, latency.
    let workers = start_workers(t, &app, 1).await?;
    let pid = workers[0].pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.ours(
        b,
        "worker RSS idle",
        "MiB",
        Better::Lower,
        tree_rss_kb(pid) as f64 / 1024.0,
    );
    for ignore in [false, true] {
        let mut rates = Vec::new();
        let mut peak = 0.0_f64;
        let mut cpu = Vec::new();
        for _ in 0..s.runs {
            let sampler = Sampler::start(vec![pid]);
            let meter = CpuMeter::start(vec![pid], server_of(b));
            let clock = Instant::now();
            send_and_collect(&app, n, ignore).await?;
            rates.push(n as f64 / clock.elapsed().as_secs_f64());
            cpu.push(meter.finish());
            peak = peak.max(sampler.finish().await);
        }
        let what = if ignore {
            "ignore_result (until drained)"
        } else {
            "results stored and read"
        };
        cpu_rows(
            r,
            b,
            if ignore { "ignore_result" } else { "results" },
            &cpu,
            n,
            Contender::Ours,
        );
        r.ours(
            b,
            &format!("throughput, 1 worker, {what}"),
            "tasks/s",
            Better::Higher,
            median(rates),
        );
        if !ignore {
            r.ours(
                b,
                "worker RSS peak while draining",
                "MiB",
                Better::Lower,
                peak,
            );
        }
    }
    let throughput = {
        let clock = Instant::now();
        send_and_collect(&app, n.min(20_000), true).await?;
        n.min(20_000) as f64 / clock.elapsed().as_secs_f64()
    };
    latency_rows(
        r,
        b,
        "sequential",
        round_trips(&app, s.latency).await?,
        Contender::Ours,
    );
    let (stop, load) = background_load(&app, throughput / 2.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = round_trips(&app, s.latency).await;
    let _ = stop.send(true);
    let _ = load.await;
    latency_rows(
        r,
        b,
        "under load (½ of max rate)",
        samples?,
        Contender::Ours,
    );
    wait_drained(&app).await?;

    // Delayed tasks wait in the broker, not in the worker.
    let before = tree_rss_kb(pid) as f64 / 1024.0;
    // RabbitMQ parks each delayed message through a per-delay queue; its publish is slow
    // enough that a million would take most of an hour here.
    let delayed = if b == "amqp" {
        s.delayed.min(20_000)
    } else {
        s.delayed
    };
    let clock = Instant::now();
    send_batches(
        &app,
        delayed,
        Some(chrono::Utc::now() + chrono::Duration::hours(1)),
    )
    .await?;
    let sent = clock.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sampler = Sampler::start(vec![pid]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = sampler.finish().await;
    let stats = app.broker().stats(queue()).await?;
    r.ours(
        b,
        "worker RSS with many delayed tasks waiting (count in notes)",
        "MiB",
        Better::Lower,
        with,
    );
    r.note(&format!(
        "{b}: {} delayed tasks sent in {sent:.1} s; broker holds {} delayed; worker RSS {before:.1} → {with:.1} MiB.",
        delayed, stats.delayed
    ));
    purge(&app).await?;
    drop(workers);

    scaling(t, &app, s, r).await?;

    // Scaling over queue size: enqueue in batches, then drain with one worker.
    for &size in &s.scale {
        purge(&app).await?;
        let clock = Instant::now();
        send_batches(&app, size, None).await?;
        let enq = clock.elapsed().as_secs_f64();
        // No start-up round trip here: it would queue behind the tasks; the clock includes the
        // worker's start (a few milliseconds).
        let clock = Instant::now();
        let workers = t.worker(0)?;
        wait_drained(&app).await?;
        let drain = clock.elapsed().as_secs_f64();
        drop(workers);
        r.ours(
            b,
            &format!("{size} tasks: enqueue (batches) time"),
            "s",
            Better::Lower,
            enq,
        );
        r.ours(
            b,
            &format!("{size} tasks: drain time, 1 worker"),
            "s",
            Better::Lower,
            drain,
        );
    }
    purge(&app).await?;
    app.close().await?;
    Ok(())
}
