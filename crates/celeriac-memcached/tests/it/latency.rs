//! How late a polled `wait` sees a result, and how many reads it costs the server. Prints
//! its numbers (`cargo test -p celeriac-memcached --test it latency -- --nocapture`); the
//! assertions only bound them loosely, for a shared 2-core machine.

use std::time::{Duration, Instant};

use celeriac_core::{Config, ResultBackend, TaskMeta};
use celeriac_memcached::MemcachedBackend;
use celeriac_test::memcached::Memcached;
use serde_json::json;

async fn get_hits(b: &MemcachedBackend) -> u64 {
    stat(b, "cmd_get").await as u64
}

/// One number of the server's `stats`, read through a raw connection (`cmd_get` counts every
/// key read, `rusage_user` is the server's CPU seconds in user mode).
async fn stat(b: &MemcachedBackend, name: &str) -> f64 {
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
    let prefix = format!("STAT {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
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

/// This process's CPU time (user + system), from `/proc/self/stat` (Linux), in seconds.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Many clients waiting at once share one poll: the server's load does not grow with each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waits_share_one_poll() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    const N: usize = 500;
    let (keys0, cpu0) = (stat(&b, "cmd_get").await, stat(&b, "rusage_user").await);
    let client0 = own_cpu();
    let from = Instant::now();
    let waiters: Vec<_> = (0..N)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let r = b
                    .wait(&format!("many-{i}"), Some(Duration::from_secs(3)))
                    .await;
                (r, Instant::now())
            })
        })
        .collect();
    // Half of them are answered after a second (long after their own polls gave way to the
    // shared one); the rest time out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in (0..N).step_by(2) {
        b.store(&TaskMeta::success(format!("many-{i}"), json!(i)))
            .await
            .unwrap();
    }
    let stored = Instant::now();
    let mut answered = 0;
    let mut last_seen = stored;
    for (i, w) in waiters.into_iter().enumerate() {
        let (r, at) = w.await.unwrap();
        match r {
            Ok(meta) => {
                assert_eq!(i % 2, 0);
                assert_eq!(meta.result, json!(i));
                answered += 1;
                last_seen = last_seen.max(at);
            }
            Err(e) => {
                assert_eq!(i % 2, 1, "{e}");
                assert_eq!(e.kind(), celeriac_core::ErrorKind::Timeout);
            }
        }
    }
    let secs = from.elapsed().as_secs_f64();
    let keys = stat(&b, "cmd_get").await - keys0;
    let cpu = stat(&b, "rusage_user").await - cpu0;
    let client_cpu = own_cpu() - client0;
    println!(
        "memcached: {N} waits for {secs:.1} s: {keys:.0} keys read ({:.0}/s, of which the \
         stores' own reads {N}), {:.0} ms of server CPU, {:.0} ms of this process's; the {answered} \
         stored seen within {:.0} ms",
        keys / secs,
        cpu * 1000.0,
        client_cpu * 1000.0,
        last_seen.duration_since(stored).as_secs_f64() * 1000.0
    );
    assert_eq!(answered, N / 2);
}
