//! Several OS processes on one file, including one killed while holding leases, and remote
//! control and events between processes.
//!
//! The test binary re-executes itself to run [`helper`] in a child process, its role given by
//! environment variables; the child prints one line per message it handles.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use celeriac_core::broadcast::control::{Reply, Request, collect};
use celeriac_core::broadcast::{Broadcasted, Clock};
use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_sqlite::{SqliteBroker, SqliteOptions};
use serde_json::{Map, json};

use crate::util::{db, msg, next_within};

const ROLE: &str = "CELERIAC_SQLITE_IT_ROLE";
const DB: &str = "CELERIAC_SQLITE_IT_DB";
const COUNT: &str = "CELERIAC_SQLITE_IT_COUNT";
const QUEUE: &str = "mp";

#[expect(
    clippy::disallowed_methods,
    reason = "a test process's role, not configuration"
)]
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn spawn(role: &str, path: &Path, count: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "multiprocess::helper",
            "--nocapture",
            "--include-ignored",
        ])
        .args(["--test-threads", "1"])
        .env(ROLE, role)
        .env(DB, path)
        .env(COUNT, count.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The ids a child printed after `tag`, once it has exited successfully.
fn ids(child: Child, tag: &str) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "helper failed: {:?}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(tag))
        .map(str::to_owned)
        .collect()
}

/// The child side: publishes, consumes or holds messages, as `CELERIAC_SQLITE_IT_ROLE` says.
#[tokio::test]
#[ignore = "run by the multi-process tests in a child process"]
async fn helper() {
    let (Some(role), Some(path), Some(count)) = (env(ROLE), env(DB), env(COUNT)) else {
        return;
    };
    let count: usize = count.parse().unwrap();
    // libtest has printed "test multiprocess::helper ... " without a newline.
    println!();
    let broker = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let queues = [QUEUE.to_owned()];
    match role.as_str() {
        "publish" => {
            // Half in batches of ten, half one by one.
            for i in 0..count / 10 {
                if i % 2 == 0 {
                    let batch: Vec<_> = (0..10)
                        .map(|_| (msg(), PublishOptions::default()))
                        .collect();
                    broker.publish_batch(QUEUE, &batch).await.unwrap();
                    for (m, _) in &batch {
                        println!("SENT {}", m.id());
                    }
                } else {
                    for _ in 0..10 {
                        let m = msg();
                        broker
                            .publish(QUEUE, &m, PublishOptions::default())
                            .await
                            .unwrap();
                        println!("SENT {}", m.id());
                    }
                }
            }
        }
        "consume" => {
            let mut c = broker
                .consume(&queues, ConsumeOptions::new(8))
                .await
                .unwrap();
            // Until the parent says every message was acked.
            let stop = stop_file(Path::new(&path));
            loop {
                match tokio::time::timeout(Duration::from_millis(100), c.next()).await {
                    Ok(d) => {
                        let d = d.unwrap().unwrap();
                        let id = d.message.as_ref().unwrap().id().to_owned();
                        println!("GOT {id} {}", d.redeliveries);
                        d.ack().await.unwrap();
                    }
                    Err(_) if stop.exists() => break,
                    Err(_) => {}
                }
            }
        }
        "hold" => {
            let opts = ConsumeOptions::new(count).lease(Duration::from_secs(1));
            let mut c = broker.consume(&queues, opts).await.unwrap();
            let mut held = Vec::new();
            for _ in 0..count {
                let d = next_within(&mut c, Duration::from_secs(10)).await;
                println!("HELD {}", d.message.as_ref().unwrap().id());
                held.push(d);
            }
            println!("READY");
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        "control" => serve_control(&broker).await,
        other => panic!("unknown role {other}"),
    }
}

/// A node answering remote control: replies `pong` to a ping and sends a heartbeat event
/// for it, exits on `shutdown`.
async fn serve_control(broker: &SqliteBroker) {
    let ch = broker.broadcast().unwrap();
    let node = format!("child-{}@test", std::process::id());
    let mut inbox = ch.control_inbox(&node).await.unwrap();
    let clock = Clock::new();
    println!("READY {node}");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), inbox.next())
            .await
            .expect("a request within a minute")
            .unwrap()
            .expect("the inbox stays open");
        let request = Request::from_message(&m).unwrap().request;
        if !request.is_for(&node) {
            continue;
        }
        match request.method.as_str() {
            "shutdown" => return,
            "ping" => {
                let mut headers = Map::new();
                headers.insert("hostname".into(), json!(node));
                let beat =
                    json!({"type": "worker-heartbeat", "hostname": node, "ticket": request.ticket});
                ch.send_event(&Broadcasted::new("worker.heartbeat", headers, beat))
                    .await
                    .unwrap();
                if let (Some(ticket), Some(to)) = (request.ticket, request.reply_to) {
                    let reply = Reply {
                        ticket,
                        node: node.clone(),
                        answer: json!({"ok": "pong"}),
                        clock: Some(clock.forward()),
                    };
                    ch.send_reply(&reply.to_message(&to.routing_key))
                        .await
                        .unwrap();
                }
            }
            other => panic!("unexpected request {other}"),
        }
    }
}

/// Tells consumer children to exit once they are idle.
fn stop_file(db: &Path) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".stop");
    p.into()
}

struct StopOnDrop(std::path::PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_deliver_every_message_exactly_once() {
    let path = db("multiprocess");
    let _ = std::fs::remove_file(stop_file(&path));
    // Children stop even if this test fails half-way.
    let _stop = StopOnDrop(stop_file(&path));
    let broker = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let consumers: Vec<Child> = (0..3).map(|_| spawn("consume", &path, 0)).collect();
    let publishers: Vec<Child> = (0..2).map(|_| spawn("publish", &path, 300)).collect();
    let mut sent: Vec<String> = tokio::task::spawn_blocking(move || {
        publishers
            .into_iter()
            .flat_map(|p| ids(p, "SENT "))
            .collect()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while broker.stats(QUEUE).await.unwrap().total() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "messages left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(stop_file(&path), b"").unwrap();
    let got: Vec<String> = tokio::task::spawn_blocking(move || {
        consumers.into_iter().flat_map(|c| ids(c, "GOT ")).collect()
    })
    .await
    .unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &got {
        let (id, redeliveries) = line.split_once(' ').unwrap();
        assert_eq!(redeliveries, "0");
        *counts.entry(id).or_default() += 1;
    }
    sent.sort();
    assert_eq!(sent.len(), 600);
    let dupes: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "delivered more than once: {dupes:?}");
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_leases_go_to_another_process() {
    let path = db("sigkill");
    let broker = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let mut published = Vec::new();
    for _ in 0..10 {
        let m = msg();
        broker
            .publish(QUEUE, &m, PublishOptions::default())
            .await
            .unwrap();
        published.push(m.id().to_owned());
    }
    let mut child = spawn("hold", &path, 10);
    let stdout = child.stdout.take().unwrap();
    let held = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "READY" {
                return held;
            }
            if let Some(id) = line.strip_prefix("HELD ") {
                held.push(id.to_owned());
            }
        }
        panic!("the holder exited before holding every message");
    });
    let mut held = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(broker.stats(QUEUE).await.unwrap().unacked, 10);
    child.kill().unwrap(); // SIGKILL: no chance to give anything back
    child.wait().unwrap();
    let mut c = broker
        .consume(&[QUEUE.to_owned()], ConsumeOptions::new(20))
        .await
        .unwrap();
    let mut again = Vec::new();
    for _ in 0..10 {
        let d = next_within(&mut c, Duration::from_secs(10)).await;
        assert_eq!(d.redeliveries, 1);
        again.push(d.message.as_ref().unwrap().id().to_owned());
        d.ack().await.unwrap();
    }
    held.sort();
    again.sort();
    published.sort();
    assert_eq!(held, published);
    assert_eq!(again, published);
    assert_eq!(broker.stats(QUEUE).await.unwrap().total(), 0);
}

/// A process inspects another through the file: requests reach the child's control inbox,
/// its replies come back to this process's reply queue and its events to an event inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_control_and_events_cross_processes() {
    let path = db("mp_broadcast");
    let broker = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let ch = broker.broadcast().unwrap();
    let mut events = ch.event_inbox("worker.#").await.unwrap();
    let mut child = spawn("control", &path, 0);
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in &mut lines {
            if let Some(node) = line.unwrap().strip_prefix("READY ") {
                return (node.to_owned(), lines);
            }
        }
        panic!("the control child exited before listening");
    });
    let (node, rest) = tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .unwrap()
        .unwrap();
    let clock = Clock::new();
    for _ in 0..20 {
        let replies = collect(
            ch,
            &clock,
            Request::new("ping", Map::new()),
            Duration::from_secs(10),
            Some(1),
        )
        .await
        .unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].node, node);
        assert_eq!(replies[0].answer, json!({"ok": "pong"}));
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.routing_key, "worker.heartbeat");
        assert_eq!(event.body["hostname"], json!(node));
        assert_eq!(event.body["ticket"], json!(replies[0].ticket));
    }
    assert!(clock.value() > 20, "the replies' clocks moved ours");
    // A request for another node: the child stays silent.
    let mut elsewhere = Request::new("ping", Map::new());
    elsewhere.destination = Some(vec!["nobody@test".to_owned()]);
    let replies = collect(ch, &clock, elsewhere, Duration::from_millis(300), None)
        .await
        .unwrap();
    assert!(replies.is_empty(), "{replies:?}");
    ch.send_control(&Request::new("shutdown", Map::new()).to_message(clock.forward(), None))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        // Read to the end: the child writes its test report there.
        rest.for_each(drop);
        child.wait().unwrap()
    });
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
