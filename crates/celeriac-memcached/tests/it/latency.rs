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
