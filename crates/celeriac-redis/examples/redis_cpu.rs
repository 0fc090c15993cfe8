//! Redis server CPU per task through this crate alone: publish, fetch, read the state, store a
//! result, ack, and wait for the result, as a worker and a client would, without the worker crate.
//!
//! `cargo run --release -p celeriac-redis --example redis_cpu -- [N] [URL]` (defaults: 20000
//! tasks, `redis://127.0.0.1:6379/9`). Prints the server's `used_cpu_user + used_cpu_sys`
//! delta per task and the `INFO commandstats` deltas per task. Both are server-wide: other
//! clients of the same server add to them, so run it on a quiet server or repeat it. Keys are
//! written under a fresh prefix and deleted at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::{Broker, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};
use tokio::sync::Semaphore;

const SENDERS: usize = 8;
const CONCURRENCY: usize = 64;
const PREFETCH: usize = 576;

/// `used_cpu_user + used_cpu_sys` in seconds, and `cmd -> (calls, usec)`.
async fn snapshot(
    c: &mut redis::aio::MultiplexedConnection,
) -> (f64, BTreeMap<String, (u64, u64)>) {
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(c).await.unwrap();
    let used: f64 = cpu
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    let mut cmds = BTreeMap::new();
    for l in stats.lines() {
        let Some((name, rest)) = l.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else {
            continue;
        };
        let field = |k: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        cmds.insert(name.to_owned(), (field("calls="), field("usec=")));
    }
    (used, cmds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/9".to_owned());
    let prefix = format!("celeriac-redis-cpu:{}:", std::process::id());
    let options = || RedisOptions::default().global_keyprefix(&prefix);
    let broker = RedisBroker::connect_with(&url, options()).await.unwrap();
    let backend = RedisBackend::connect_with(&url, options()).await.unwrap();
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let queue = "cpu".to_owned();
    broker.declare(&queue).await.unwrap();

    let (cpu0, cmds0) = snapshot(&mut raw).await;
    let clock = Instant::now();

    // The worker side: read the state, store a result, then ack, at most CONCURRENCY at once.
    let worker = {
        let (broker, backend, queue) = (broker.clone(), backend.clone(), queue.clone());
        tokio::spawn(async move {
            let mut consumer = broker
                .consume(&[queue], ConsumeOptions::new(PREFETCH))
                .await
                .unwrap();
            let slots = Arc::new(Semaphore::new(CONCURRENCY));
            for _ in 0..n {
                let d = consumer.next().await.unwrap().expect("open");
                let permit = slots.clone().acquire_owned().await.unwrap();
                let backend = backend.clone();
                tokio::spawn(async move {
                    let id = d.message.as_ref().unwrap().id().to_owned();
                    // A worker reads the stored state before it runs a task.
                    backend.get(&id).await.unwrap();
                    backend
                        .store(&TaskMeta::success(id, serde_json::json!(3)))
                        .await
                        .unwrap();
                    d.ack().await.unwrap();
                    drop(permit);
                });
            }
        })
    };

    // The client side: SENDERS senders, each publishes its share, then waits for each result.
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (broker, backend, queue) = (broker.clone(), backend.clone(), queue.clone());
        let count = n / SENDERS + usize::from(s < n % SENDERS);
        senders.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let m = celeriac_test::services::test_message("tasks.add");
                ids.push(m.id().to_owned());
                broker
                    .publish(&queue, &m, PublishOptions::default())
                    .await
                    .unwrap();
            }
            for id in ids {
                let meta = backend
                    .wait(&id, Some(Duration::from_secs(60)))
                    .await
                    .unwrap();
                assert_eq!(meta.result, serde_json::json!(3));
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    worker.await.unwrap();
    let elapsed = clock.elapsed().as_secs_f64();
    let (cpu1, cmds1) = snapshot(&mut raw).await;

    let per = 1e6 / n as f64;
    println!(
        "{n} tasks in {elapsed:.2} s ({:.0}/s); redis CPU {:.1} µs/task",
        n as f64 / elapsed,
        (cpu1 - cpu0) * per
    );
    println!(
        "{:<14} {:>10} {:>12} {:>12}",
        "command", "calls/task", "µs/task", "µs/call"
    );
    for (name, (calls, usec)) in &cmds1 {
        let (c0, u0) = cmds0.get(name).copied().unwrap_or((0, 0));
        let (dc, du) = (calls - c0, usec - u0);
        if dc == 0 {
            continue;
        }
        println!(
            "{name:<14} {:>10.3} {:>12.2} {:>12.2}",
            dc as f64 / n as f64,
            du as f64 * 1e6 / n as f64 / 1e6,
            du as f64 / dc as f64
        );
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut raw)
        .await
        .unwrap();
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
}
