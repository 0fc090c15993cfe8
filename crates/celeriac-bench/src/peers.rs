//! The Rust peers' side: rusty-celery (crate `celery`) and apalis (`apalis-redis`), run by
//! `bench/peers` as client and worker processes, the way `python.rs` runs Celery.
//!
//! `bench/peers` is a Cargo project of its own, outside the workspace (CI never builds the
//! peers); `scripts/bench --peers ...` builds it in release. When its binary is missing, or a
//! peer cannot do something, the report says so in a note and the run goes on.
//!
//! A peer's worker reports the count of tasks it has finished over UDP on loopback (see
//! `bench/peers/src/main.rs`): rusty-celery has no result backend, so that count is how its
//! client knows a drain is over and a round trip is complete; apalis's latency is measured the
//! same way (its own `wait_for` polls every 100 ms), while its throughput with results reads
//! every result through apalis's `check_status`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::ours::{
    REALISTIC_CONCURRENCY, cpu_rows, latency_rows, realistic_n, realistic_rows_from,
};
use crate::procs::{CpuMeter, Proc, Sampler, server_of, tree_rss_kb};
use crate::report::{Better, Contender, Report, median};
use crate::{Sizes, Workloads};

const SENDERS: usize = 8;
/// In-flight tasks of a peer's worker in the no-op runs (ours runs `-c 64`).
const CONCURRENCY: usize = 64;
/// The longest a peer's sequential latency run may take: rusty-celery's Redis consumer sleeps
/// a second whenever the queue is empty, so each of its round trips may take that long.
const LATENCY_SECS: u64 = 30;

/// A Rust peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    RustyCelery,
    Apalis,
}

impl Peer {
    /// Parses a `--peers` entry.
    pub(crate) fn parse(s: &str) -> anyhow::Result<Peer> {
        match s {
            "rusty-celery" => Ok(Peer::RustyCelery),
            "apalis" => Ok(Peer::Apalis),
            other => bail!("unknown peer {other} (known: rusty-celery, apalis)"),
        }
    }

    /// The name on the peers binary's command line and in the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::RustyCelery => "rusty-celery",
            Peer::Apalis => "apalis",
        }
    }

    fn contender(self) -> Contender {
        match self {
            Peer::RustyCelery => Contender::RustyCelery,
            Peer::Apalis => Contender::Apalis,
        }
    }

    /// The peer's own queue (its message format differs from ours).
    fn queue(self) -> &'static str {
        match self {
            Peer::RustyCelery => "bench_rusty_celery",
            Peer::Apalis => "bench_apalis",
        }
    }

    /// The crate whose version the report names.
    fn krate(self) -> &'static str {
        match self {
            Peer::RustyCelery => "celery",
            Peer::Apalis => "apalis",
        }
    }
}

/// The built peers binary.
#[derive(Debug)]
pub(crate) struct Peers {
    bin: PathBuf,
    lock: String,
}

impl Peers {
    /// Finds `bench/peers/target/release/celeriac-bench-peers` (or `$CELERIAC_BENCH_PEERS`).
    pub(crate) fn find() -> anyhow::Result<Peers> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/peers");
        let bin = std::env::var_os("CELERIAC_BENCH_PEERS")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join("target/release/celeriac-bench-peers"));
        if !bin.is_file() {
            bail!(
                "{} is not built (`scripts/bench --peers ...` builds it; or `cargo build --release --manifest-path bench/peers/Cargo.toml`)",
                bin.display()
            );
        }
        let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap_or_default();
        Ok(Peers { bin, lock })
    }

    /// The version of `peer` in bench/peers/Cargo.lock.
    pub(crate) fn version(&self, peer: Peer) -> String {
        let mut lines = self.lock.lines();
        let want = format!("name = \"{}\"", peer.krate());
        while let Some(l) = lines.next() {
            if l == want {
                if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = ")) {
                    return format!("{} {}", peer.krate(), v.trim_matches('"'));
                }
            }
        }
        format!("{} (version unknown)", peer.krate())
    }

    fn worker(
        &self,
        peer: Peer,
        url: &str,
        notify: &str,
        concurrency: usize,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.bin);
        cmd.env("BENCH_NOTIFY", notify)
            .args([peer.name(), "worker", url, peer.queue()])
            .arg(concurrency.to_string());
        Proc::spawn(cmd)
    }

    /// Runs a client command; returns its JSON answer.
    async fn client(
        &self,
        peer: Peer,
        cmd: &str,
        url: &str,
        notify: &str,
        args: &[String],
    ) -> anyhow::Result<Value> {
        let mut c = tokio::process::Command::new(&self.bin);
        c.env("BENCH_NOTIFY", notify)
            .args([peer.name(), cmd, url, peer.queue()])
            .args(args)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(600), c.output())
            .await
            .with_context(|| format!("{} {cmd} timed out", peer.name()))??;
        if !out.status.success() {
            bail!(
                "{} {cmd} {args:?} failed: {}",
                peer.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Empties the peer's queue: on Redis its keys only (the benchmark database may hold
    /// other runs' queues: no FLUSHDB here), on RabbitMQ the queue.
    async fn flush(&self, peer: Peer, url: &str) -> anyhow::Result<()> {
        if url.starts_with("redis") {
            let db = url.rsplit('/').next().unwrap_or("0");
            let q = peer.queue();
            // apalis: `<queue>:...`; rusty-celery: the list `<queue>`, its process map and
            // delivery tags.
            let mut keys = Vec::new();
            for pattern in [format!("{q}*"), format!("_celery.{q}_*")] {
                let out = Command::new("redis-cli")
                    .args(["-n", db, "--scan", "--pattern", &pattern])
                    .output()
                    .context("running redis-cli")?;
                anyhow::ensure!(out.status.success(), "redis-cli --scan failed");
                keys.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(str::to_owned),
                );
            }
            for chunk in keys.chunks(500) {
                let st = Command::new("redis-cli")
                    .args(["-n", db, "del"])
                    .args(chunk)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("running redis-cli")?;
                anyhow::ensure!(st.success(), "redis-cli del failed");
            }
        } else {
            self.client(peer, "purge", url, "127.0.0.1:9", &[]).await?;
        }
        Ok(())
    }

    /// The workloads `w` of `peer` on broker `b` at `url`; a failure becomes a note.
    pub(crate) async fn run(
        &self,
        peer: Peer,
        b: &str,
        url: &str,
        s: &Sizes,
        r: &mut Report,
        w: Workloads,
    ) {
        if w.noop {
            if let Err(e) = self.run_all(peer, b, url, s, r).await {
                r.note(&format!("{} on {b}: stopped: {e:#}.", peer.name()));
            }
            let _ = self.flush(peer, url).await;
        }
        if w.realistic {
            if let Err(e) = self.realistic(peer, b, url, s, r).await {
                r.note(&format!(
                    "{}, realistic workload on {b}: stopped: {e:#}.",
                    peer.name()
                ));
            }
            let _ = self.flush(peer, url).await;
        }
    }

    /// The closed loop of `ours::realistic`: 100 callers, each waiting for the worker's
    /// report of its own task before sending the next, on a worker of concurrency 100.
    async fn realistic(
        &self,
        peer: Peer,
        b: &str,
        url: &str,
        s: &Sizes,
        r: &mut Report,
    ) -> anyhow::Result<()> {
        let notify = free_udp_addr()?;
        self.flush(peer, url).await?;
        let mut worker = self.worker(peer, url, &notify, REALISTIC_CONCURRENCY)?;
        self.latency(peer, url, &notify, 2, "noop", 60).await?;
        anyhow::ensure!(worker.alive(), "the worker exited at start");
        let n = realistic_n(s);
        let v = self
            .client(
                peer,
                "closed",
                url,
                &notify,
                &[
                    n.to_string(),
                    REALISTIC_CONCURRENCY.to_string(),
                    "realistic".to_owned(),
                ],
            )
            .await?;
        realistic_rows_from(r, b, peer.contender(), &v);
        drop(worker);
        Ok(())
    }

    async fn run_all(
        &self,
        peer: Peer,
        b: &str,
        url: &str,
        s: &Sizes,
        r: &mut Report,
    ) -> anyhow::Result<()> {
        let who = peer.contender();
        r.note(&match peer {
            Peer::RustyCelery if b == "redis" => format!(
                "rusty-celery on redis: no result backend (rows with results: n/a); its Redis \
                 consumer RPOPs and sleeps 1 s whenever the queue is empty, hence its latency; \
                 worker prefetch {CONCURRENCY}."
            ),
            Peer::RustyCelery => format!(
                "rusty-celery on {b}: no result backend (rows with results: n/a); it publishes \
                 without publisher confirms (fire and forget; ours waits for the broker's \
                 confirm of each publish); worker prefetch {CONCURRENCY}."
            ),
            Peer::Apalis => format!(
                "apalis on {b}: worker `.concurrency({CONCURRENCY})`, fetch batch = concurrency \
                 (default 10), polling every 10 ms when idle, heartbeat 200 ms (default 30 s). \
                 apalis-redis 1.0.0 files every push in its scheduled set, so its pub/sub \
                 wake-up never fires, and with the default heartbeat an idle worker's poll \
                 stalled for up to the 30 s heartbeat (seen: a 29.4 s round trip, 10 tasks/s \
                 drains); the short heartbeat bounds those stalls. It stores every result (its \
                 default), in the ignore_result row too; with results, each sender reads its \
                 tasks' results through `check_status` (1 ms between misses). Its latency is \
                 send → the worker's report, without a result read."
            ),
        });
        let notify = free_udp_addr()?;
        self.flush(peer, url).await?;
        let n = s.n;
        let v = self
            .client(
                peer,
                "enqueue",
                url,
                &notify,
                &[n.to_string(), SENDERS.to_string()],
            )
            .await?;
        let rate = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        r.record(
            who,
            b,
            "enqueue, sequential",
            "tasks/s",
            Better::Higher,
            rate("sequential"),
        );
        r.record(
            who,
            b,
            &format!("enqueue, {SENDERS} concurrent senders"),
            "tasks/s",
            Better::Higher,
            rate("concurrent"),
        );
        self.flush(peer, url).await?;

        let mut worker = self.worker(peer, url, &notify, CONCURRENCY)?;
        let pid = worker.pid();
        // Two round trips: the worker is up and consuming.
        self.latency(peer, url, &notify, 2, "noop", 60).await?;
        anyhow::ensure!(worker.alive(), "the worker exited at start");
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.record(
            who,
            b,
            "worker RSS idle",
            "MiB",
            Better::Lower,
            tree_rss_kb(pid) as f64 / 1024.0,
        );
        let mut peak = 0.0_f64;
        for results in [false, true] {
            if results && peer == Peer::RustyCelery {
                continue;
            }
            let mut rates = Vec::new();
            let mut cpu = Vec::new();
            for _ in 0..s.runs {
                let sampler = Sampler::start(vec![pid]);
                let meter = CpuMeter::start(vec![pid], server_of(b));
                rates.push(self.e2e(peer, url, &notify, n, results, "noop").await?);
                cpu.push(meter.finish());
                peak = peak.max(sampler.finish().await);
            }
            let (which, what) = if results {
                ("results", "results stored and read")
            } else {
                ("ignore_result", "ignore_result (until drained)")
            };
            cpu_rows(r, b, which, &cpu, n, who);
            r.record(
                who,
                b,
                &format!("throughput, 1 worker, {what}"),
                "tasks/s",
                Better::Higher,
                median(rates),
            );
        }
        r.record(
            who,
            b,
            "worker RSS peak while draining",
            "MiB",
            Better::Lower,
            peak,
        );
        let samples = self
            .latency(peer, url, &notify, s.latency, "noop", LATENCY_SECS)
            .await?;
        let got = samples.len();
        latency_rows(r, b, "sequential", samples, who);
        if got < s.latency {
            r.note(&format!(
                "{} on {b}: {got} sequential round trips in the {LATENCY_SECS} s allowed (of {}).",
                peer.name(),
                s.latency
            ));
        }
        drop(worker);
        Ok(())
    }

    async fn e2e(
        &self,
        peer: Peer,
        url: &str,
        notify: &str,
        n: usize,
        results: bool,
        workload: &str,
    ) -> anyhow::Result<f64> {
        let v = self
            .client(
                peer,
                "e2e",
                url,
                notify,
                &[
                    n.to_string(),
                    SENDERS.to_string(),
                    u8::from(results).to_string(),
                    workload.to_owned(),
                ],
            )
            .await?;
        v["rate"].as_f64().context("no rate")
    }

    async fn latency(
        &self,
        peer: Peer,
        url: &str,
        notify: &str,
        n: usize,
        workload: &str,
        max_secs: u64,
    ) -> anyhow::Result<Vec<f64>> {
        let v = self
            .client(
                peer,
                "latency",
                url,
                notify,
                &[n.to_string(), workload.to_owned(), max_secs.to_string()],
            )
            .await?;
        Ok(v["samples_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default())
    }
}

/// A free UDP address on loopback for a worker's reports.
fn free_udp_addr() -> anyhow::Result<String> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(sock.local_addr()?.to_string())
}
