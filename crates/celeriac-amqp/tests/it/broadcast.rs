//! The broadcast channels (pidbox and celeryev) against a real RabbitMQ: malformed messages,
//! killed connections, a node name used twice. What Python sees of them is in `interop.rs`.

use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_amqp::wire::{Channel, Properties};
use celeriac_core::broadcast::{Broadcast, Broadcasted, CONTROL_EXCHANGE, EVENT_EXCHANGE, Inbox};
use celeriac_core::protocol::new_id;
use celeriac_core::{Broker, ErrorKind};
use celeriac_test::services::unique_queue;
use serde_json::{Map, Value, json};

use crate::util::{self, raw};

/// How long a message may take to arrive.
const ARRIVES: Duration = Duration::from_secs(20);

fn channels(broker: &AmqpBroker) -> &dyn Broadcast {
    broker
        .broadcast()
        .expect("the amqp broker has broadcast channels")
}

fn headers(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

async fn next(inbox: &mut Box<dyn Inbox>, what: &str) -> Broadcasted {
    tokio::time::timeout(ARRIVES, inbox.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing arrived within {ARRIVES:?}"))
        .unwrap_or_else(|e| panic!("{what}: the inbox failed: {e:?}"))
        .unwrap_or_else(|| panic!("{what}: the inbox closed"))
}

/// Publishes, confirmed, what is not a JSON broadcast: another content type, a body that is
/// not JSON, and (where the server routes it) a headers table that cannot be decoded.
async fn publish_garbage(ch: &Channel, exchange: &str, routing_key: &str) {
    ch.confirm_select().await.unwrap();
    let mut pickle = Properties::default();
    pickle.content_type = Some("application/x-python-serialize".to_owned());
    let mut json = Properties::default();
    json.content_type = Some("application/json".to_owned());
    json.content_encoding = Some("utf-8".to_owned());
    for (p, body) in [
        (&pickle, &b"\x80\x04\x95."[..]),
        (&json, &b"{not json"[..]),
        (&Properties::default(), &b"{}"[..]),
    ] {
        let confirm = ch.publish(exchange, routing_key, p, body).await.unwrap();
        assert!(confirm.expect("confirming").await.unwrap());
    }
    // content_type application/json and a headers table with the unknown tag `Z`.
    let body = b"{}";
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&((1u16 << 15) | (1 << 13)).to_be_bytes());
    header.push(16);
    header.extend_from_slice(b"application/json");
    header.extend_from_slice(&3u32.to_be_bytes());
    header.extend_from_slice(&[1, b'n', b'Z']);
    let confirm = ch
        .publish_raw(exchange, routing_key, &header, body)
        .await
        .unwrap();
    // RabbitMQ 3.13+ refuses such a message by closing the publishing connection (541).
    let _ = confirm.expect("confirming").await;
}

/// Malformed messages on `celery.pidbox` and `celeryev` are skipped (logged), and the good
/// message behind them arrives on the same inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_broadcasts_are_skipped_and_the_next_one_arrives() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let b = channels(&broker);
    let node = format!("{}@test", unique_queue("malformed-node"));
    let mut control = b.control_inbox(&node).await.unwrap();
    let mut events = b.event_inbox("#").await.unwrap();

    let (conn, ch) = raw().await;
    publish_garbage(&ch, CONTROL_EXCHANGE, "").await;
    let _ = conn.close().await;
    let (conn, ch) = raw().await;
    publish_garbage(&ch, EVENT_EXCHANGE, "worker.heartbeat").await;
    let _ = conn.close().await;

    let ticket = new_id();
    let request = Broadcasted::new(
        "",
        headers(&[("clock", json!(1)), ("expires", json!(0.0))]),
        json!({"method": "ping", "arguments": {}, "ticket": ticket}),
    );
    b.send_control(&request).await.unwrap();
    let run = new_id();
    let beat = Broadcasted::new(
        "worker.heartbeat",
        headers(&[("hostname", json!(node))]),
        json!({"type": "worker-heartbeat", "hostname": node, "timestamp": 1.0, "run": run}),
    );
    b.send_event(&beat).await.unwrap();

    // Other tests broadcast on the same exchanges: the first of *ours* must be the good one,
    // and nothing malformed may come up.
    loop {
        let m = next(&mut control, "control inbox").await;
        assert!(m.body.is_object(), "{m:?}");
        if m.body["ticket"] == json!(ticket) {
            assert_eq!(m, request);
            break;
        }
    }
    loop {
        let m = next(&mut events, "event inbox").await;
        assert!(m.body.is_object() || m.body.is_array(), "{m:?}");
        if m.body["run"] == json!(run) {
            assert_eq!(m, beat);
            break;
        }
    }
}

/// Inboxes whose connections are closed server side reconnect, declare their queues again and
/// go on receiving; sends reconnect too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_reconnect_after_their_connections_are_killed() {
    if !util::rabbit_up() {
        return;
    }
    let marker = unique_queue("bc-killme");
    let broker = util::broker(&format!("connection_name={marker}")).await;
    let b = channels(&broker);
    let node = format!("{marker}@test");
    let mut control = b.control_inbox(&node).await.unwrap();
    let mut events = b.event_inbox("worker.#").await.unwrap();
    let (key, mut replies) = b.reply_inbox().await.unwrap();
    // The sending connection exists before the kill, so it is killed too.
    b.send_event(&Broadcasted::new("worker.warmup", Map::new(), json!({})))
        .await
        .unwrap();

    let killed = util::kill_connections(&marker).await;
    assert!(
        killed >= 5,
        "killed {killed} connections (publisher, sender and three inboxes)"
    );

    // Until the inboxes are back, what is sent is lost (at most once): send until it arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (inbox, what) in [
        (&mut control, "control"),
        (&mut events, "event"),
        (&mut replies, "reply"),
    ] {
        let run = new_id();
        let m = match what {
            "control" => Broadcasted::new("", Map::new(), json!({"method": "ping", "run": run})),
            "event" => Broadcasted::new("worker.heartbeat", Map::new(), json!({"run": run})),
            _ => Broadcasted::new(
                key.clone(),
                headers(&[("ticket", json!("t"))]),
                json!({"run": run}),
            ),
        };
        'resend: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {what} inbox did not come back"
            );
            let sent = match what {
                "control" => b.send_control(&m).await,
                "event" => b.send_event(&m).await,
                _ => b.send_reply(&m).await,
            };
            if let Err(e) = sent {
                assert!(e.is_transient(), "{e:?}");
            }
            let until = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(got) = tokio::time::timeout_at(until, inbox.next()).await {
                let got = got
                    .unwrap()
                    .expect("inboxes end only when the broker closes");
                if got.body["run"] == json!(run) {
                    assert_eq!(got, m);
                    break 'resend;
                }
            }
        }
    }
    broker.close().await.unwrap();
    let end = tokio::time::timeout(ARRIVES, control.next())
        .await
        .expect("closing the broker ends its inboxes");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// A node's control queue is exclusive: a second node with the same name is refused, as
/// kombu refuses it (405 RESOURCE_LOCKED), until the first inbox is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_in_use_is_refused_until_it_is_free() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let other = util::broker("").await;
    let node = format!("{}@test", unique_queue("twice"));
    let first = channels(&broker).control_inbox(&node).await.unwrap();
    let e = channels(&other)
        .control_inbox(&node)
        .await
        .expect_err("the node name is taken");
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
    assert!(e.to_string().contains(&node), "{e}");
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match channels(&other).control_inbox(&node).await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the name stayed taken: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An inbox whose reader falls behind drops what does not fit (a lagging listener misses
/// messages, as in Celery) instead of growing without bound, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_misses_messages_and_goes_on() {
    if !util::rabbit_up() {
        return;
    }
    let broker = util::broker("").await;
    let b = channels(&broker);
    let topic = unique_queue("lag");
    let mut inbox = b.event_inbox(&format!("{topic}.#")).await.unwrap();
    let sent = 1500;
    for i in 0..sent {
        b.send_event(&Broadcasted::new(
            format!("{topic}.n"),
            Map::new(),
            json!({ "i": i }),
        ))
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = 0;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), inbox.next()).await {
        assert!(m.unwrap().is_some());
        got += 1;
    }
    assert!((1..sent).contains(&got), "kept {got} of {sent}");
    let last = Broadcasted::new(format!("{topic}.last"), Map::new(), json!({"last": true}));
    b.send_event(&last).await.unwrap();
    assert_eq!(next(&mut inbox, "after the lag").await, last);
}
