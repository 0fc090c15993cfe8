//! The shared Redis server stops mid-run and comes back (issue 5's fault suite, Redis part).
//!
//! Alone in its own test binary (cargo runs test binaries one at a time) because it stops the
//! server every other test uses. The server keeps nothing on disk (`--save "" --appendonly
//! no`), so whatever was in Redis when it stopped is gone with it: that loss is the server's,
//! and the test does not pretend otherwise. What celeriac promises, and the test checks:
//! a publish during the outage retries and succeeds, or fails with an error, never hangs or
//! silently drops; consumers and result waiters reconnect by themselves; every message
//! published after the server is back is delivered, exactly once.

use std::collections::HashSet;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta, TaskState};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

const ADDR: &str = "127.0.0.1:6379";
const URL: &str = "redis://127.0.0.1:6379/0";

fn up() -> bool {
    TcpStream::connect_timeout(&ADDR.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

/// Starts the shared server exactly as the machine runs it.
fn start_server() {
    let status = Command::new("redis-server")
        .args(["--daemonize", "yes", "--bind", "127.0.0.1", "-::1"])
        .args(["--port", "6379", "--save", "", "--appendonly", "no"])
        .status()
        .expect("run redis-server");
    assert!(status.success(), "redis-server exited with {status}");
}

/// Makes sure the shared server is up again when the test ends, whichever way it ends.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if !up() {
            start_server();
        }
    }
}

async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_nothing_published_after_it() {
    if !celeriac_test::services::require_service("redis", ADDR) {
        return;
    }
    let _guard = RestartGuard;
    let prefix = format!("celeriac-restart-test:{}:", std::process::id());
    let options = RedisOptions::default()
        .global_keyprefix(&prefix)
        .retry_for(Duration::from_secs(30));
    let broker = RedisBroker::connect_with(URL, options.clone())
        .await
        .unwrap();
    let backend = RedisBackend::connect_with(URL, options.clone())
        .await
        .unwrap();
    let writer = RedisBackend::connect_with(URL, options).await.unwrap();
    let queue = "restart".to_owned();
    broker.declare(&queue).await.unwrap();

    // The consumer: acks late, after "processing", and reports each id.
    let (got_tx, mut got) = mpsc::unbounded_channel::<String>();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), ConsumeOptions::new(16))
        .await
        .unwrap();
    let consuming = tokio::spawn(async move {
        while let Ok(Some(d)) = consumer.next().await {
            let id = d.message.as_ref().unwrap().id().to_owned();
            tokio::task::yield_now().await;
            if d.ack().await.is_ok() {
                let _ = got_tx.send(id);
            }
        }
    });

    // The producer: publishes one message every 2 ms and records, for each, whether the server
    // was known to be back up when the publish began, and what the publish returned.
    let back_up = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let after_ids = Arc::new(Mutex::new(HashSet::new()));
    let producing = {
        let (broker, queue, back_up, stop, after_ids) = (
            broker.clone(),
            queue.clone(),
            back_up.clone(),
            stop.clone(),
            after_ids.clone(),
        );
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let m = celeriac_test::services::test_message("tests.add");
                let after = back_up.load(Ordering::Acquire);
                if after {
                    after_ids.lock().unwrap().insert(m.id().to_owned());
                }
                let r = broker.publish(&queue, &m, PublishOptions::default()).await;
                sent.push((m.id().to_owned(), after, r.map_err(|e| e.to_string())));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        })
    };

    // A result waiter that starts before the outage.
    let waiting = {
        let backend = backend.clone();
        tokio::spawn(async move {
            backend
                .wait("restart-task", Some(Duration::from_secs(60)))
                .await
        })
    };

    // Run a while, then stop the server.
    let mut received: HashSet<String> = HashSet::new();
    while received.len() < 200 {
        let id = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await
            .expect("deliveries before the restart")
            .unwrap();
        received.insert(id);
    }
    let out = Command::new("redis-cli")
        .args(["-p", "6379", "shutdown", "nosave"])
        .output()
        .expect("run redis-cli");
    // redis-cli reports the closed connection of a successful shutdown as an error; only the
    // port going away tells.
    wait_until("the server stops", Duration::from_secs(30), || !up()).await;
    drop(out);
    tokio::time::sleep(Duration::from_millis(500)).await;
    start_server();
    wait_until("the server listens again", Duration::from_secs(30), up).await;
    let restarted = Instant::now();
    back_up.store(true, Ordering::Release);

    // Publishes that began after the restart: every one must arrive. Collect until the
    // producer has sent 300 of them and all of those have been received.
    let mut resumed: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent = loop {
        let id = tokio::time::timeout_at(deadline, got.recv())
            .await
            .expect("deliveries after the restart")
            .unwrap();
        if resumed.is_none() && after_ids.lock().unwrap().contains(&id) {
            resumed = Some(restarted.elapsed());
        }
        received.insert(id);
        if received.len() >= 800 {
            stop.store(true, Ordering::Release);
            break producing.await.unwrap();
        }
    };
    let after: Vec<&(String, bool, Result<(), String>)> =
        sent.iter().filter(|(_, after, _)| *after).collect();
    assert!(
        after.len() >= 100,
        "only {} publishes after the restart",
        after.len()
    );
    // Every publish returned; those that failed said why (none are expected with a 30 s
    // retry window, but an error is an honest outcome, a silent loss is not).
    let failed: Vec<_> = sent.iter().filter(|(_, _, r)| r.is_err()).collect();
    for (_, _, r) in &failed {
        let e = r.as_ref().unwrap_err();
        assert!(e.contains("cannot publish to redis"), "{e}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, _, r) in &after {
        assert!(r.is_ok(), "a publish after the restart failed: {r:?}");
        while !received.contains(id) {
            let more = tokio::time::timeout_at(deadline, got.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("message {id}, published after the restart, was never delivered")
                })
                .unwrap();
            received.insert(more);
        }
    }

    // The waiter reconnected and sees a result stored after the restart.
    assert!(
        writer
            .store(&TaskMeta::success("restart-task", json!(42)))
            .await
            .unwrap()
    );
    let meta = waiting
        .await
        .unwrap()
        .expect("the waiter survives the restart");
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, json!(42));

    let lost_in_server = sent
        .iter()
        .filter(|(id, after, r)| !after && r.is_ok() && !received.contains(id))
        .count();
    let resumed = resumed.expect("a delivery after the restart");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr().lock(),
        format!(
            "redis restart: the first message published after the restart was delivered \
             {resumed:?} after the server listened again; \
             {} published, {} failed, {lost_in_server} lost with the server's memory \
             (published before the stop, not yet consumed)\n",
            sent.len(),
            failed.len()
        )
        .as_bytes(),
    );
    broker.close().await.unwrap();
    consuming.abort();
}
