//! The broadcast cases: what every broker's [`Broadcast`]
//! channels must do (remote control and events).
//!
//! Each `case_*` function takes a broker from the driver's setup function; a broker without
//! broadcast channels fails every case (a driver that has none does not run this suite).
//! Listeners opened before a message is sent must receive it: an inbox is ready when the call
//! that opens it returns.

use celeriac_core::DynBroker;
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox};
use celeriac_core::protocol::new_id;
use serde_json::{Map, Value, json};
use tokio::time::timeout;

use super::{EVENTUALLY, QUIET};

fn channels(broker: &DynBroker) -> &dyn Broadcast {
    broker
        .broadcast()
        .unwrap_or_else(|| panic!("broker {} has no broadcast channels", broker.driver()))
}

async fn next(inbox: &mut Box<dyn Inbox>, what: &str) -> Broadcasted {
    match timeout(EVENTUALLY, inbox.next()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("{what}: the inbox closed"),
        Ok(Err(e)) => panic!("{what}: the inbox failed: {e:?}"),
        Err(_) => panic!("{what}: nothing arrived within {EVENTUALLY:?}"),
    }
}

async fn quiet(inbox: &mut Box<dyn Inbox>, what: &str) {
    if let Ok(r) = timeout(QUIET, inbox.next()).await {
        panic!("{what}: expected nothing, got {r:?}");
    }
}

fn headers(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A control request reaches every node listening when it is sent, routing key, headers and
/// body intact.
pub async fn case_control_reaches_every_listening_node(broker: DynBroker) {
    let b = channels(&broker);
    let node = |n: &str| format!("conformance-{n}-{}@test", new_id());
    let mut a = b.control_inbox(&node("a")).await.expect("inbox a");
    let mut c = b.control_inbox(&node("c")).await.expect("inbox c");
    let ticket = new_id();
    let m = Broadcasted::new(
        "",
        headers(&[("clock", json!(3)), ("expires", json!(0.0))]),
        json!({"method": "ping", "arguments": {}, "ticket": ticket}),
    );
    b.send_control(&m).await.expect("send control");
    for (inbox, who) in [(&mut a, "node a"), (&mut c, "node c")] {
        // Other cases may broadcast on the same store: skip their requests.
        loop {
            let got = next(inbox, who).await;
            if got.body["ticket"] == json!(ticket) {
                assert_eq!(got, m, "{who}");
                break;
            }
        }
    }
}

/// A reply reaches the reply queue it is addressed to, and no other.
pub async fn case_replies_reach_their_queue_only(broker: DynBroker) {
    let b = channels(&broker);
    let (key, mut mine) = b.reply_inbox().await.expect("reply inbox");
    let (other_key, mut other) = b.reply_inbox().await.expect("second reply inbox");
    assert_ne!(key, other_key, "two reply queues share a routing key");
    let reply = Broadcasted::new(
        key.clone(),
        headers(&[("ticket", json!("t-1")), ("clock", json!(9))]),
        json!({"w1@host": {"ok": "pong"}}),
    );
    b.send_reply(&reply).await.expect("send reply");
    let got = next(&mut mine, "the addressed reply queue").await;
    assert_eq!(got.body, reply.body);
    assert_eq!(got.headers, reply.headers);
    quiet(&mut other, "another reply queue").await;
}

/// Events reach the listeners whose binding matches their routing key; a batch arrives as
/// the list it was sent as.
pub async fn case_events_follow_their_binding(broker: DynBroker) {
    let b = channels(&broker);
    let mut all = b.event_inbox("#").await.expect("event inbox #");
    let mut workers = b
        .event_inbox("worker.#")
        .await
        .expect("event inbox worker.#");
    let run = new_id();
    let batch = Broadcasted::new(
        "task.multi",
        headers(&[("hostname", json!("w1@test"))]),
        json!([{"type": "task-started", "uuid": run, "hostname": "w1@test", "timestamp": 1.0}]),
    );
    let beat = Broadcasted::new(
        "worker.heartbeat",
        headers(&[("hostname", json!("w1@test"))]),
        json!({"type": "worker-heartbeat", "run": run, "hostname": "w1@test", "timestamp": 2.0}),
    );
    b.send_event(&batch).await.expect("send batch");
    b.send_event(&beat).await.expect("send heartbeat");
    let ours = |m: &Broadcasted| {
        m.body["run"] == json!(run) || m.body.get(0).is_some_and(|e| e["uuid"] == json!(run))
    };
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = next(&mut all, "binding #").await;
        if ours(&m) {
            seen.push(m);
        }
    }
    assert_eq!(seen, [batch, beat.clone()], "in order, intact");
    loop {
        let m = next(&mut workers, "binding worker.#").await;
        assert!(
            m.routing_key.starts_with("worker."),
            "worker.# got {}",
            m.routing_key
        );
        if ours(&m) {
            assert_eq!(m, beat);
            break;
        }
    }
}
