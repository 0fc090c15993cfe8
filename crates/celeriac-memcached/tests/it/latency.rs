//! How late a polled `wait` sees a result, and how many reads it costs the server. Prints
//! its numbers (`cargo test -p celeriac-memcached --test it latency -- --nocapture`); the
//! assertions only bound them loosely, for a shared 2-core machine.

use std::time::{Duration, Instant};

use celeriac_core::{Config, ResultBackend, TaskMeta};
use celeriac_memcached::MemcachedBackend;
use celeriac_test::memcached::Memcached;
use serde_json::json;

async fn get_hits(b: &MemcachedBackend) -> u64 {
    // `stats` through a raw connection: cmd_get counts every key read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = b.client().servers()[0].clone();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"stats\r\n").await.unwrap();
    let mut out = Vec::new();
    while !out.ends_with(b"END\r\n") {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(out).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("STAT cmd_get "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_wait_latency_and_cost() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    let mut late = Vec::new();
    for (i, after) in [5u64, 20, 80, 300, 1000].into_iter().enumerate() {
        let id = format!("lat-{i}");
        let waiter = {
            let (b, id) = (b.clone(), id.clone());
            tokio::spawn(async move {
                b.wait(&id, Some(Duration::from_secs(10))).await.unwrap();
                Instant::now()
            })
        };
        let gets_before = get_hits(&b).await;
        tokio::time::sleep(Duration::from_millis(after)).await;
        let stored = Instant::now();
        b.store(&TaskMeta::success(&id, json!(i))).await.unwrap();
        let seen = waiter.await.unwrap();
        let lag = seen.saturating_duration_since(stored);
        let gets = get_hits(&b).await - gets_before;
        println!(
            "memcached wait: result stored after {after} ms, seen {:.1} ms later, {gets} reads",
            lag.as_secs_f64() * 1000.0
        );
        late.push(lag);
    }
    // The poll interval is capped at 50 ms: no result is seen much later than that.
    assert!(
        late.iter().all(|l| *l < Duration::from_millis(250)),
        "{late:?}"
    );
}

/// Stores and reads from one client, 64 at a time: what the pipelined connection carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_get_throughput() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    const N: usize = 4000;
    const AT_ONCE: usize = 64;
    let ids: Vec<String> = (0..N).map(|i| format!("thr-{i}")).collect();
    let from = Instant::now();
    for chunk in ids.chunks(AT_ONCE) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|id| {
                let (b, id) = (b.clone(), id.clone());
                tokio::spawn(async move { b.store(&TaskMeta::success(id, json!(1))).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
    }
    let stores = from.elapsed();
    let from = Instant::now();
    for chunk in ids.chunks(AT_ONCE) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|id| {
                let (b, id) = (b.clone(), id.clone());
                tokio::spawn(async move { b.get(&id).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap().is_some());
        }
    }
    let gets = from.elapsed();
    let from = Instant::now();
    for chunk in ids.chunks(256) {
        assert_eq!(b.get_many(chunk).await.unwrap().len(), chunk.len());
    }
    let many = from.elapsed();
    let rate = |d: Duration| N as f64 / d.as_secs_f64();
    println!(
        "memcached backend, one client, {AT_ONCE} at a time: {:.0} stores/s (gets + cas/add), \
         {:.0} gets/s, {:.0} results/s by get_many of 256",
        rate(stores),
        rate(gets),
        rate(many)
    );
}
