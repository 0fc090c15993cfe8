//! `celeriac-bench`: celeriac against Python Celery on the same broker, same machine, same run.
//!
//! For each broker present (embedded SQLite, Redis on 127.0.0.1:6379, RabbitMQ on
//! 127.0.0.1:5672, MariaDB/MySQL on 127.0.0.1:3306, and as `sqla` kombu's SQLAlchemy transport with Celery's database result
//! backend on the PostgreSQL at 127.0.0.1:5432, at bounded sizes) it measures enqueue
//! rates, end-to-end throughput with and without stored results, round-trip latency, worker
//! memory (idle, peak while draining, with many delayed tasks waiting) and scaling over worker
//! processes and queue sizes; then the same workloads with Python Celery's client and worker
//! from `target/py-venv` (see `scripts/python-env`). Every figure comes out as a pair and a
//! ratio; `scripts/bench` builds in release, runs this and writes `docs/BENCHMARKS.md`.
//!
//! Workers are separate processes (`celeriac-bench worker ...` runs the example task app's
//! command line; Celery runs `crates/celeriac-bench/python/bench_celery.py`), so their resident
//! memory is read from `/proc`. Every load loop is bounded in count and time.
//!
//! `celeriac-bench --micro` times the hot paths in-process instead: message encode/decode,
//! envelope encode/decode and the rate limiter's token bucket.

mod chart;
mod micro;
mod ours;
mod peers;
mod procs;
mod python;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use report::Report;

/// The queue our side uses (`--queue`, default `bench`); Celery's is this name with `_celery`
/// appended.
pub(crate) fn queue() -> &'static str {
    QUEUE_NAME.get().map_or("bench", String::as_str)
}

static QUEUE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[derive(Parser, Debug)]
#[command(about = "celeriac against Python Celery on the same broker")]
struct Args {
    /// Small sizes (seconds, not minutes).
    #[arg(long)]
    quick: bool,
    /// Overrides the task count of the throughput, enqueue and scaling runs.
    #[arg(long)]
    n: Option<usize>,
    /// Overrides the number of delayed tasks of the memory run.
    #[arg(long)]
    delayed: Option<usize>,
    /// Skips Python Celery.
    #[arg(long)]
    no_python: bool,
    /// Brokers to measure, comma separated (sqlite, redis, redis-native, amqp, postgres,
    /// postgres-async, mysql, sqla).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sqlite,redis,amqp,postgres,mysql,sqla"
    )]
    brokers: Vec<String>,
    /// `noop` (the default: every figure with the no-op task add(1, 2)) or `realistic` (only a
    /// closed loop of 100 callers on a worker of concurrency 100, tasks with 1 KiB of argument
    /// that await 5 ms of I/O: throughput and call latency) or `both`.
    #[arg(long, default_value = "noop", value_parser = ["noop", "realistic", "both"])]
    workload: String,
    /// Our queue's name (Celery's gets `_celery` appended): another name keeps this run apart
    /// from other benchmark runs on the same servers.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Rust peers to measure too, comma separated (rusty-celery, apalis): rusty-celery on Redis
    /// and RabbitMQ, apalis on Redis, from `bench/peers` (built by `scripts/bench --peers ...`).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Overrides the queue sizes of the scaling run, comma separated (e.g. 10000,1000000).
    #[arg(long, value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// Repetitions of each throughput run (the median is reported).
    #[arg(long)]
    runs: Option<usize>,
    /// Writes the table as Markdown to this file too.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Draws the results as SVG charts into this directory too (throughput.svg,
    /// latency.svg, ...).
    #[arg(long)]
    charts: Option<PathBuf>,
    /// With `--charts`: redraws the charts from this Markdown table (as `--markdown` wrote
    /// it, e.g. docs/BENCHMARKS.md) instead of measuring.
    #[arg(long, requires = "charts")]
    charts_from: Option<PathBuf>,
    /// Times the hot paths in-process instead.
    #[arg(long)]
    micro: bool,
    /// Only measures this many sequential round trips against one worker per broker (Python
    /// Celery is skipped): a quick probe while working on latency.
    #[arg(long)]
    latency_only: Option<usize>,
    /// Only measures the scaling over 1, 2 and 4 worker processes (throughput with results and
    /// CPU per task of each part) per broker; Python Celery and the peers are skipped.
    #[arg(long, conflicts_with = "latency_only")]
    scaling_only: bool,
    /// Our workers send task events (`worker -E`), to measure what events cost.
    #[arg(long)]
    task_events: bool,
    /// More flags for our workers' command line (repeatable), e.g. `--worker-arg
    /// --without-remote-control`.
    #[arg(long, allow_hyphen_values = true)]
    worker_arg: Vec<String>,
    /// Query parameters appended to our RabbitMQ broker URL (client and workers), e.g.
    /// `publish_confirms=pipelined`.
    #[arg(long)]
    amqp_query: Option<String>,
}

/// Which workloads a run measures (`--workload`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workloads {
    /// Every figure with the no-op task.
    pub(crate) noop: bool,
    /// The closed loop of tasks with 1 KiB of argument and 5 ms of awaited I/O.
    pub(crate) realistic: bool,
}

/// The sizes of one run.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub(crate) n: usize,
    pub(crate) latency: usize,
    pub(crate) delayed: usize,
    pub(crate) scale: Vec<usize>,
    pub(crate) runs: usize,
    pub(crate) py_n: usize,
    pub(crate) py_latency: usize,
    pub(crate) py_delayed: usize,
}

impl Sizes {
    /// Smaller sizes for kombu's SQL transport and Celery's database backend (`sqla`), which
    /// poll a table: bounded so that a full run stays minutes, not hours.
    fn bounded_for_sql(&self) -> Sizes {
        let n = self.n.min(5_000);
        Sizes {
            n,
            latency: self.latency.min(200),
            delayed: self.delayed.min(5_000),
            scale: vec![n],
            runs: 1,
            py_n: self.py_n.min(1_000),
            py_latency: self.py_latency.min(50),
            py_delayed: self.py_delayed.min(1_000),
        }
    }

    fn from_args(a: &Args) -> Sizes {
        let mut s = if a.quick {
            Sizes {
                n: 2_000,
                latency: 200,
                delayed: 10_000,
                scale: vec![1_000, 10_000],
                runs: 1,
                py_n: 500,
                py_latency: 100,
                py_delayed: 1_000,
            }
        } else {
            Sizes {
                n: 100_000,
                latency: 2_000,
                delayed: 1_000_000,
                scale: vec![10_000, 100_000, 1_000_000],
                runs: 3,
                py_n: 5_000,
                py_latency: 500,
                py_delayed: 20_000,
            }
        };
        if let Some(n) = a.n {
            s.n = n;
            s.latency = s.latency.min(n);
            s.scale = if n >= 10_000 {
                vec![n / 10, n]
            } else {
                vec![n]
            };
            s.py_n = s.py_n.min(n);
            s.py_latency = s.py_latency.min(n);
            s.delayed = s.delayed.min(n * 5);
            s.py_delayed = s.py_delayed.min(n);
        }
        if let Some(sizes) = &a.scale {
            s.scale.clone_from(sizes);
        }
        if let Some(d) = a.delayed {
            s.delayed = d;
        }
        if let Some(r) = a.runs {
            s.runs = r.max(1);
        }
        s
    }
}

fn main() -> ExitCode {
    // `celeriac-bench worker ...` is the worker process the benchmark starts.
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return celeriac::cli::run(celeriac_examples::app().task::<ours::add_io>());
    }
    let args = Args::parse();
    if args.micro {
        micro::run();
        return ExitCode::SUCCESS;
    }
    if let (Some(from), Some(dir)) = (&args.charts_from, &args.charts) {
        let drawn = std::fs::read_to_string(from)
            .map_err(anyhow::Error::from)
            .and_then(|md| write_charts(dir, &report::charts_from_markdown(&md)));
        return match drawn {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut extra = args.worker_arg.clone();
    if args.task_events {
        extra.push("-E".to_owned());
    }
    ours::set_worker_args(extra);
    let _ = QUEUE_NAME.set(args.queue.clone());
    let sizes = Sizes::from_args(&args);
    let wl = Workloads {
        noop: args.workload != "realistic",
        realistic: args.workload != "noop",
    };
    eprintln!("sizes: {sizes:?}");
    let mut report = Report::new(sizes.clone());
    let probe = match (args.latency_only, args.scaling_only) {
        (Some(n), _) => Some(ours::Probe::Latency(n)),
        (None, true) => Some(ours::Probe::Scaling),
        (None, false) => None,
    };
    let python = if args.no_python || probe.is_some() {
        let why = if args.no_python {
            "--no-python"
        } else {
            "a probe (--latency-only, --scaling-only)"
        };
        report.note(&format!("Python Celery skipped ({why})."));
        None
    } else {
        match python::Python::find() {
            Ok(p) => Some(p),
            Err(e) => {
                report.note(&format!("Python Celery skipped: {e:#}."));
                None
            }
        }
    };
    if let Some(p) = &python {
        report.note(&format!(
            "Celery {} (kombu {}), {}.",
            p.celery, p.kombu, p.python
        ));
    }
    let peer_list = args
        .peers
        .iter()
        .map(|p| peers::Peer::parse(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let peers = if peer_list.is_empty() || probe.is_some() {
        None
    } else {
        match peers::Peers::find() {
            Ok(p) => {
                let versions: Vec<String> = peer_list.iter().map(|&x| p.version(x)).collect();
                report.note(&format!(
                    "Rust peers: {} (bench/peers, release), each with its own queue on the same \
                     broker, {}-task client runs from a separate process; no-op task add(1, 2). \
                     A peer's worker tells its client how many tasks it has finished over UDP on \
                     loopback (one datagram per task): that is how a drain's end and a round \
                     trip's end are seen where the peer has no result backend.",
                    versions.join(", "),
                    sizes.n
                ));
                Some(p)
            }
            Err(e) => {
                report.note(&format!("Rust peers skipped: {e:#}."));
                None
            }
        }
    };
    for broker in &args.brokers {
        match broker.as_str() {
            "sqlite" => {
                let dir =
                    std::env::temp_dir().join(format!("celeriac-bench-{}", std::process::id()));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}/bench.db", dir.display());
                let target = ours::Target::new("sqlite", url);
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                ours::run_workloads(&target, &sizes, &mut report, wl).await?;
                report.note(
                    "SQLite, Python side: n/a. Celery has no embedded broker like ours; kombu's \
                     `sqla+sqlite` transport polls the table once per second and never \
                     redelivers, so it is not a comparable durable queue (its PostgreSQL twin \
                     is measured as `sqla`).",
                );
                let _ = std::fs::remove_dir_all(&dir);
            }
            "redis" => {
                let url = "redis://127.0.0.1:6379/6".to_owned();
                if !ours::reachable("127.0.0.1:6379").await {
                    report.note("Redis: skipped, nothing listens on 127.0.0.1:6379.");
                    continue;
                }
                let target = ours::Target::new("redis", url.clone());
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                ours::run_workloads(&target, &sizes, &mut report, wl).await?;
                if let Some(p) = &python {
                    let urls = python::Urls {
                        broker: url.clone(),
                        backend: url,
                    };
                    p.run_workloads("redis", &urls, &sizes, &mut report, wl)
                        .await?;
                }
                if let Some(p) = &peers {
                    for &peer in &peer_list {
                        let url = "redis://127.0.0.1:6379/6";
                        p.run(peer, "redis", url, &sizes, &mut report, wl).await;
                    }
                }
            }
            "redis-native" => {
                // The native layout (Redis Streams) for the benchmark's queue: ours only, since
                // Python Celery cannot read it. Database 7, beside `redis` on 6.
                let url = format!("redis://127.0.0.1:6379/7?native_queues={}", queue());
                if !ours::reachable("127.0.0.1:6379").await {
                    report
                        .note("Redis (native layout): skipped, nothing listens on 127.0.0.1:6379.");
                    continue;
                }
                let target = ours::Target::new("redis-native", url);
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                ours::run_all(&target, &sizes, &mut report).await?;
            }
            "amqp" => {
                if !ours::reachable("127.0.0.1:5672").await {
                    report.note("RabbitMQ: skipped, nothing listens on 127.0.0.1:5672.");
                    continue;
                }
                let url = match &args.amqp_query {
                    Some(q) => format!("amqp://guest:guest@127.0.0.1:5672/%2F?{q}"),
                    None => "amqp://guest:guest@127.0.0.1:5672/%2F".to_owned(),
                };
                let mut target = ours::Target::new("amqp", url);
                target.backend = "rpc://guest:guest@127.0.0.1:5672/%2F".to_owned();
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                ours::run_workloads(&target, &sizes, &mut report, wl).await?;
                report.note(
                    "RabbitMQ: results through the rpc:// backend (replies to the sender) on both \
                     sides, the pairing Celery's docs suggest for RabbitMQ. Celery's \
                     ignore_result drain waits for the queue's ready count to reach 0 (a passive \
                     declare does not count delivered unacked messages: at most a prefetch window).",
                );
                if let Some(p) = &python {
                    let urls = python::Urls {
                        broker: "amqp://guest:guest@127.0.0.1:5672//".to_owned(),
                        backend: "rpc://".to_owned(),
                    };
                    p.run_workloads("amqp", &urls, &sizes, &mut report, wl)
                        .await?;
                }
                if let Some(p) = &peers {
                    for &peer in &peer_list {
                        if peer == peers::Peer::Apalis {
                            report.note(
                                "apalis on RabbitMQ: not measured (its Redis backend only here).",
                            );
                            continue;
                        }
                        let url = "amqp://guest:guest@127.0.0.1:5672/%2F";
                        p.run(peer, "amqp", url, &sizes, &mut report, wl).await;
                    }
                }
            }
            "postgres" | "postgres-async" => {
                if !ours::reachable("127.0.0.1:5432").await {
                    report.note("PostgreSQL: skipped, nothing listens on 127.0.0.1:5432.");
                    continue;
                }
                // A schema of the benchmark's own on the shared server (user postgres, database
                // test, trust auth), emptied before each phase by the purge. `postgres-async`
                // publishes with `synchronous_commit = off` too (libpq's `options`), trading
                // the last moments of publishes on a server crash for no WAL flush per commit.
                let mut url =
                    "postgres://postgres@127.0.0.1:5432/test?schema=celeriac_bench".to_owned();
                let name = if broker == "postgres" {
                    "postgres"
                } else {
                    url.push_str("&options=-c%20synchronous_commit%3Doff");
                    "postgres-async"
                };
                let target = ours::Target::new(name, url);
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                ours::run_workloads(&target, &sizes, &mut report, wl).await?;
                report.note(&format!(
                    "{name}: the native driver (celeriac-postgres: SKIP LOCKED fetches, \
                     LISTEN/NOTIFY, results in the same database), server on this machine \
                     (its CPU: the postmaster's process tree and the backends it reaped). Python \
                     side: n/a \
                     here (Celery's `sqla+`/`db+` pairs belong to celeriac-sqla).",
                ));
            }
            "mysql" => {
                if !ours::reachable("127.0.0.1:3306").await {
                    report.note("MariaDB/MySQL: skipped, nothing listens on 127.0.0.1:3306.");
                    continue;
                }
                // A database of its own (root, no password: the test machine's server).
                {
                    use celeriac::mysql::sqlx::{self, Connection as _};
                    let mut root =
                        sqlx::mysql::MySqlConnection::connect("mysql://root@127.0.0.1:3306/")
                            .await?;
                    sqlx::raw_sql("CREATE DATABASE IF NOT EXISTS celeriac_bench")
                        .execute(&mut root)
                        .await?;
                }
                let target = ours::Target::new(
                    "mysql",
                    "mysql://root@127.0.0.1:3306/celeriac_bench".to_owned(),
                );
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                ours::run_workloads(&target, &sizes, &mut report, wl).await?;
                report.note(
                    "MariaDB/MySQL: broker and results in one database (celeriac_bench), default \
                     settings (idle polling up to every 100 ms). Python side: n/a here; Celery's \
                     own SQL layouts (db+mysql, sqla+mysql) belong to the celeriac-sqla crate.",
                );
            }
            "sqla" => {
                if !ours::reachable("127.0.0.1:5432").await {
                    report.note("sqla: skipped, no PostgreSQL listens on 127.0.0.1:5432.");
                    continue;
                }
                // kombu's tables and Celery's result tables in PostgreSQL's `test` database.
                let location = "postgres@127.0.0.1:5432/test";
                let mut target = ours::Target::new("sqla", format!("sqla+postgresql://{location}"));
                target.backend = format!("db+postgresql://{location}");
                if let Some(p) = probe {
                    ours::probe(&target, p, &sizes, &mut report).await?;
                    continue;
                }
                let bounded = sizes.bounded_for_sql();
                ours::run_workloads(&target, &bounded, &mut report, wl).await?;
                report.note(&format!(
                    "sqla: kombu's SQLAlchemy transport (`sqla+postgresql://`) and Celery's \
                     database result backend (`db+postgresql://`) on the local PostgreSQL, both \
                     sides; bounded sizes (ours N = {}, Celery N = {}, {} delayed, one run). \
                     Celery polls each queue once a second and its result reads every 0.5 s.",
                    bounded.n, bounded.py_n, bounded.delayed
                ));
                if let Some(p) = &python {
                    let urls = python::Urls {
                        broker: format!("sqla+postgresql://{location}"),
                        backend: format!("db+postgresql://{location}"),
                    };
                    p.run_workloads("sqla", &urls, &bounded, &mut report, wl)
                        .await?;
                }
            }
            other => {
                anyhow::bail!(
                    "unknown broker {other} (known: sqlite, redis, redis-native, amqp, postgres, postgres-async, mysql, sqla)"
                )
            }
        }
    }
    let table = report.text();
    println!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.markdown())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(dir) = &args.charts {
        write_charts(dir, &report::charts(&report))?;
    }
    Ok(())
}

/// Writes each chart to `dir/<stem>.svg`.
fn write_charts(dir: &std::path::Path, charts: &[(&str, chart::Chart)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (stem, chart) in charts {
        let path = dir.join(format!("{stem}.svg"));
        std::fs::write(&path, chart.svg())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
