//! Measurements for docs/mysql.md, run by hand (`--ignored --nocapture`) on a private server,
//! so no other client's queries are counted: what an idle consumer costs, and the latency
//! polling adds when a message comes from another process.

use std::time::{Duration, Instant};

use celeriac_core::{Broker, Config, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta};
use celeriac_mysql::{MysqlBackend, MysqlBroker, MysqlOptions};
use sqlx::Row as _;

use crate::restart::PrivateServer;

/// CPU time (user + system) of process `pid`, from /proc.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn questions(b: &MysqlBroker) -> u64 {
    let r = sqlx::query("SHOW GLOBAL STATUS LIKE 'Questions'")
        .fetch_one(b.pool())
        .await
        .unwrap();
    r.try_get::<String, _>(1).unwrap().parse().unwrap()
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand: cargo test -p celeriac-mysql --test it measure -- --ignored --nocapture"]
async fn idle_cost_and_polling_latency() {
    let Some(server) = PrivateServer::start().await else {
        return;
    };
    {
        use sqlx::Connection as _;
        let mut c = sqlx::mysql::MySqlConnection::connect(&server.url())
            .await
            .unwrap();
        sqlx::raw_sql("CREATE DATABASE m")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let url = server.url().replace("/mysql", "/m");
    for poll_ms in [100u64, 20] {
        let url = format!("{url}?poll-interval-ms={poll_ms}");
        let options = MysqlOptions::from_url(&url, &Config::default()).unwrap();
        let consumer_side = MysqlBroker::open(options.clone()).await.unwrap();
        let producer_side = MysqlBroker::open(options.clone()).await.unwrap();
        let backend = MysqlBackend::open(options.clone()).await.unwrap();
        let waiter = MysqlBackend::open(options).await.unwrap();
        let q = format!("idle{poll_ms}");
        let mut c = consumer_side
            .consume(std::slice::from_ref(&q), ConsumeOptions::new(8))
            .await
            .unwrap();

        // Idle: one consumer, nothing to do, 10 s.
        let idle = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(11), c.next()).await;
            c
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (q0, s0, p0) = (
            questions(&producer_side).await,
            cpu(server.pid()),
            cpu(std::process::id()),
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (q1, s1, p1) = (
            questions(&producer_side).await,
            cpu(server.pid()),
            cpu(std::process::id()),
        );
        let mut c = idle.await.unwrap();
        println!(
            "poll {poll_ms} ms, one idle consumer for 10 s: {:.1} statements/s on the server \
             (one of them ours, per read of the counter), server CPU {:.2} %, client CPU {:.2} %",
            (q1 - q0 - 1) as f64 / 10.0,
            (s1 - s0).as_secs_f64() * 10.0,
            (p1 - p0).as_secs_f64() * 10.0,
        );

        // Latency: a message published by another broker handle (no in-process wake-up)
        // after the consumer has idled, and a result stored by another backend handle.
        // The consumer runs on its own, as a worker's does, reporting when each message came.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let consuming = tokio::spawn(async move {
            while let Ok(Some(d)) = c.next().await {
                let _ = tx.send(Instant::now());
                d.ack().await.unwrap();
            }
        });
        let mut deliver = Vec::new();
        let mut result = Vec::new();
        for i in 0..30u64 {
            tokio::time::sleep(Duration::from_millis(300 + (i * 37) % 200)).await;
            let m = celeriac_test::services::test_message("tests.latency");
            let t0 = Instant::now();
            producer_side
                .publish(&q, &m, PublishOptions::default())
                .await
                .unwrap();
            let got = rx.recv().await.unwrap();
            deliver.push(got - t0);

            let id = celeriac_core::protocol::new_id();
            let store = {
                let backend = backend.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300 + (i * 37) % 200)).await;
                    let t0 = Instant::now();
                    backend
                        .store(&TaskMeta::success(&id, 1.into()))
                        .await
                        .unwrap();
                    t0
                })
            };
            waiter
                .wait(&id, Some(Duration::from_secs(5)))
                .await
                .unwrap();
            let done = Instant::now();
            result.push(done - store.await.unwrap());
        }
        println!(
            "poll {poll_ms} ms, publish to delivery across handles after idling: median {:.1} ms, \
             p90 {:.1} ms, max {:.1} ms",
            percentile(&mut deliver, 0.5).as_secs_f64() * 1e3,
            percentile(&mut deliver, 0.9).as_secs_f64() * 1e3,
            percentile(&mut deliver, 1.0).as_secs_f64() * 1e3,
        );
        println!(
            "poll {poll_ms} ms, store to wait() returning across handles: median {:.1} ms, \
             p90 {:.1} ms, max {:.1} ms",
            percentile(&mut result, 0.5).as_secs_f64() * 1e3,
            percentile(&mut result, 0.9).as_secs_f64() * 1e3,
            percentile(&mut result, 1.0).as_secs_f64() * 1e3,
        );
        consumer_side.close().await.unwrap();
        consuming.await.unwrap();
    }
}
