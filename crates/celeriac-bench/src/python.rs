//! Python Celery's side: its client (`python/bench_celery.py`) and its workers, from the venv
//! that `scripts/python-env` makes.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::ours::{
    REALISTIC_CONCURRENCY, cpu_rows, latency_rows, realistic_n, realistic_rows_from,
};
use crate::procs::{CpuMeter, Proc, Sampler, server_of, tree_rss_kb};
use crate::report::{Better, Contender, Report, median};
use crate::{Sizes, Workloads};

/// Celery's queue: its own, so that its declaration (durable, no arguments) never clashes with
/// ours on RabbitMQ.
fn celery_queue() -> String {
    format!("{}_celery", crate::queue())
}

const SENDERS: usize = 8;

/// A worker configuration of Celery's.
#[derive(Debug, Clone, Copy)]
struct Pool {
    name: &'static str,
    concurrency: usize,
    prefetch: usize,
}

const POOLS: [Pool; 2] = [
    Pool {
        name: "prefork",
        concurrency: 2,
        prefetch: 64,
    },
    Pool {
        name: "threads",
        concurrency: 8,
        prefetch: 32,
    },
];

/// A broker for Celery: where messages go and where results go.
#[derive(Debug, Clone)]
pub(crate) struct Urls {
    /// The broker URL as kombu spells it.
    pub(crate) broker: String,
    /// The result backend URL.
    pub(crate) backend: String,
}

/// The venv and the versions in it.
#[derive(Debug)]
pub(crate) struct Python {
    venv: PathBuf,
    dir: PathBuf,
    pub(crate) celery: String,
    pub(crate) kombu: String,
    pub(crate) python: String,
}

impl Python {
    /// Finds (or makes, through `scripts/python-env`) the venv.
    pub(crate) fn find() -> anyhow::Result<Python> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("scripts/python-env"))
            .output()
            .context("running scripts/python-env")?;
        if !out.status.success() {
            bail!(
                "scripts/python-env failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let venv = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let v = Command::new(venv.join("bin/python"))
            .args([
                "-c",
                "import celery, kombu, sys; print(celery.__version__, kombu.__version__, sys.version.split()[0])",
            ])
            .output()?;
        let text = String::from_utf8(v.stdout)?;
        let mut parts = text.split_whitespace().map(str::to_owned);
        Ok(Python {
            venv,
            dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python"),
            celery: parts.next().unwrap_or_default(),
            kombu: parts.next().unwrap_or_default(),
            python: format!("Python {}", parts.next().unwrap_or_default()),
        })
    }

    fn env(&self, cmd: &mut Command, url: &Urls) {
        cmd.current_dir(&self.dir)
            .env("BENCH_BROKER_URL", &url.broker)
            .env("BENCH_BACKEND_URL", &url.backend)
            .env("BENCH_QUEUE", celery_queue());
    }

    fn worker(&self, url: &Urls, pool: Pool, index: usize) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(self.venv.join("bin/celery"));
        self.env(&mut cmd, url);
        cmd.args(["-A", "bench_celery", "worker", "-P", pool.name])
            .args(["-c", &pool.concurrency.to_string()])
            .args(["--prefetch-multiplier", &pool.prefetch.to_string()])
            .args([
                "-O",
                "fair",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args([
                "-Q",
                &celery_queue(),
                "-l",
                "warning",
                "-n",
                &format!("py{index}@localhost"),
            ]);
        Proc::spawn(cmd)
    }

    /// Runs the client driver; returns its JSON answer.
    async fn client(&self, url: &Urls, args: &[String]) -> anyhow::Result<Value> {
        let mut cmd = tokio::process::Command::new(self.venv.join("bin/python"));
        cmd.current_dir(&self.dir)
            .env("BENCH_BROKER_URL", &url.broker)
            .env("BENCH_BACKEND_URL", &url.backend)
            .env("BENCH_QUEUE", celery_queue())
            .arg("bench_celery.py")
            .args(args)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
            .await
            .context("python client timed out")??;
        if !out.status.success() {
            bail!(
                "python client {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    async fn start(&self, url: &Urls, pool: Pool, count: usize) -> anyhow::Result<Vec<Proc>> {
        let mut procs = Vec::new();
        for i in 0..count {
            procs.push(self.worker(url, pool, i)?);
        }
        for _ in 0..count * 2 {
            self.client(url, &["ping".into(), "60".into()]).await?;
        }
        Ok(procs)
    }

    async fn e2e(&self, url: &Urls, n: usize, ignore: bool) -> anyhow::Result<f64> {
        let v = self
            .client(
                url,
                &[
                    "e2e".into(),
                    n.to_string(),
                    u8::from(ignore).to_string(),
                    "600".into(),
                ],
            )
            .await?;
        v["rate"].as_f64().context("no rate")
    }

    /// Empties Celery's queue: on Redis the whole benchmark database (results and unacked
    /// bookkeeping too), on RabbitMQ the queue (rpc:// results live in the client's reply queue,
    /// which goes with the client).
    async fn flush(&self, url: &Urls) -> anyhow::Result<()> {
        if url.broker.starts_with("redis") {
            let st = Command::new("redis-cli")
                .args(["-n", &redis_db(&url.broker), "flushdb"])
                .stdout(std::process::Stdio::null())
                .status()
                .context("running redis-cli")?;
            anyhow::ensure!(st.success(), "redis-cli flushdb failed");
        } else {
            self.client(url, &["purge".into()]).await?;
        }
        Ok(())
    }

    /// Messages in Celery's queue not yet delivered to a worker.
    async fn ready(&self, url: &Urls) -> anyhow::Result<u64> {
        let v = self.client(url, &["ready".into()]).await?;
        v["ready"].as_u64().context("no count")
    }

    /// The workloads `w`, Celery's way, on broker `b` at `url`. The realistic one runs on
    /// Celery's threads pool (`-c 100`); a failure there becomes a note.
    pub(crate) async fn run_workloads(
        &self,
        b: &str,
        url: &Urls,
        s: &Sizes,
        r: &mut Report,
        w: Workloads,
    ) -> anyhow::Result<()> {
        if w.noop {
            self.run_all(b, url, s, r).await?;
        }
        if w.realistic {
            if let Err(e) = self.realistic(b, url, s, r).await {
                r.note(&format!(
                    "Celery, realistic workload on {b}: failed: {e:#}."
                ));
            }
            self.flush(url).await?;
        }
        Ok(())
    }

    async fn realistic(
        &self,
        b: &str,
        url: &Urls,
        s: &Sizes,
        r: &mut Report,
    ) -> anyhow::Result<()> {
        self.flush(url).await?;
        let pool = Pool {
            name: "threads",
            concurrency: REALISTIC_CONCURRENCY,
            prefetch: 4,
        };
        let _workers = self.start(url, pool, 1).await?;
        let n = s.py_n.max(1_000).min(realistic_n(s));
        let v = self
            .client(
                url,
                &[
                    "closed".into(),
                    n.to_string(),
                    REALISTIC_CONCURRENCY.to_string(),
                    "120".into(),
                ],
            )
            .await?;
        realistic_rows_from(r, b, Contender::Celery, &v);
        r.note(&format!(
            "Celery, realistic workload on {b}: threads pool -c {REALISTIC_CONCURRENCY} \
             (prefetch ×4), {n} calls from {REALISTIC_CONCURRENCY} client threads."
        ));
        Ok(())
    }

    /// Every workload, Celery's way, on broker `b` at `url`.
    async fn run_all(&self, b: &str, url: &Urls, s: &Sizes, r: &mut Report) -> anyhow::Result<()> {
        self.flush(url).await?;
        let n = s.py_n;
        let v = self
            .client(url, &["enqueue".into(), n.to_string(), SENDERS.to_string()])
            .await?;
        r.celery(
            b,
            "enqueue, sequential",
            "tasks/s",
            Better::Higher,
            v["sequential"].as_f64().unwrap_or(f64::NAN),
        );
        r.celery(
            b,
            &format!("enqueue, {SENDERS} concurrent senders"),
            "tasks/s",
            Better::Higher,
            v["concurrent"].as_f64().unwrap_or(f64::NAN),
        );
        r.celery(
            b,
            "enqueue, batches of 1000",
            "tasks/s",
            Better::Higher,
            v["batch"].as_f64().unwrap_or(f64::NAN),
        );
        self.flush(url).await?;

        let mut best_pool = POOLS[0];
        let mut best_rate = 0.0;
        for pool in POOLS {
            let workers = self.start(url, pool, 1).await?;
            let pid = workers[0].pid();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let idle = tree_rss_kb(pid) as f64 / 1024.0;
            for ignore in [false, true] {
                let mut rates = Vec::new();
                let mut peak = 0.0_f64;
                for _ in 0..s.runs {
                    let sampler = Sampler::start(vec![pid]);
                    rates.push(self.e2e(url, n, ignore).await?);
                    peak = peak.max(sampler.finish().await);
                }
                let rate = median(rates);
                r.note(&format!(
                    "Celery {} -c {} prefetch ×{}: {rate:.0} tasks/s ({}), idle RSS {idle:.1} MiB, peak {peak:.1} MiB.",
                    pool.name, pool.concurrency, pool.prefetch,
                    if ignore { "ignore_result" } else { "results" }
                ));
                if !ignore && rate > best_rate {
                    best_rate = rate;
                    best_pool = pool;
                }
            }
            drop(workers);
            self.flush(url).await?;
        }
        r.note(&format!(
            "Celery's figures below use its best pool here: {} -c {}.",
            best_pool.name, best_pool.concurrency
        ));

        let workers = self.start(url, best_pool, 1).await?;
        let pid = workers[0].pid();
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.celery(
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
                rates.push(self.e2e(url, n, ignore).await?);
                cpu.push(meter.finish());
                peak = peak.max(sampler.finish().await);
            }
            let which = if ignore { "ignore_result" } else { "results" };
            cpu_rows(r, b, which, &cpu, n, Contender::Celery);
            let what = if ignore {
                "ignore_result (until drained)"
            } else {
                "results stored and read"
            };
            r.celery(
                b,
                &format!("throughput, 1 worker, {what}"),
                "tasks/s",
                Better::Higher,
                median(rates.clone()),
            );
            if !ignore {
                r.celery(
                    b,
                    "worker RSS peak while draining",
                    "MiB",
                    Better::Lower,
                    peak,
                );
            }
        }
        let rate = self.e2e(url, n.min(2_000), true).await?;
        let lat = |v: Value| -> Vec<f64> {
            v["samples_ms"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let seq = self
            .client(
                url,
                &[
                    "latency".into(),
                    s.py_latency.to_string(),
                    "0".into(),
                    "600".into(),
                ],
            )
            .await?;
        latency_rows(r, b, "sequential", lat(seq), Contender::Celery);
        let loaded = self
            .client(
                url,
                &[
                    "latency".into(),
                    s.py_latency.to_string(),
                    format!("{}", rate / 2.0),
                    "600".into(),
                ],
            )
            .await?;
        latency_rows(
            r,
            b,
            "under load (½ of max rate)",
            lat(loaded),
            Contender::Celery,
        );

        // Celery keeps ETA tasks in the worker's memory.
        let before = tree_rss_kb(pid) as f64 / 1024.0;
        let clock = Instant::now();
        self.client(url, &["delayed".into(), s.py_delayed.to_string()])
            .await?;
        let sent = clock.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.ready(url).await? > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let with = tree_rss_kb(pid) as f64 / 1024.0;
        r.celery(
            b,
            "worker RSS with many delayed tasks waiting (count in notes)",
            "MiB",
            Better::Lower,
            with,
        );
        r.note(&format!(
            "Celery: {} delayed (countdown 1 h) tasks sent in {sent:.1} s; the worker pulls them all into memory: RSS {before:.1} → {with:.1} MiB.",
            s.py_delayed
        ));
        drop(workers);
        self.flush(url).await?;

        for count in [1, 2, 4] {
            let workers = self.start(url, best_pool, count).await?;
            let mut rates = Vec::new();
            for _ in 0..s.runs {
                rates.push(self.e2e(url, n, false).await?);
            }
            r.celery(
                b,
                &format!("throughput, {count} worker process(es), results"),
                "tasks/s",
                Better::Higher,
                median(rates),
            );
            drop(workers);
            self.flush(url).await?;
        }
        r.note(&format!(
            "Celery ran {n} tasks per throughput run (ours: {}): at its rate the full N would take minutes per run; rates, not totals, are compared.",
            s.n
        ));
        Ok(())
    }
}

fn redis_db(url: &str) -> String {
    url.rsplit('/').next().unwrap_or("0").to_owned()
}
