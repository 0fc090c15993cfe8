//! Held-back acks (`basic.ack multiple`) and pipelined publisher confirms: a multiple ack
//! never covers a rejected or unsettled delivery, and a refused publish is still reported to
//! its caller when many are in flight on one channel.

use std::time::Duration;

use celeriac_amqp::wire::{
    Channel, Connection, Delivery, FieldTable, FieldValue, Properties, QueueDeclare,
};
use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_test::services::{test_message, unique_queue};

use crate::util::{self, raw};

async fn ready(ch: &Channel, queue: &str) -> u32 {
    let mut passive = QueueDeclare::default();
    passive.passive = true;
    ch.queue_declare(queue, &passive)
        .await
        .expect("passive declare")
        .1
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a delivery within 30 s")
        .expect("the consumer is open")
}

/// A fresh queue named after `prefix` holding the bodies "0" to "n - 1", and the channel that
/// filled it (kept open for passive declares).
async fn seeded(prefix: &str, n: usize) -> (String, Connection, Channel) {
    let q = unique_queue(prefix);
    let (admin_conn, admin) = raw().await;
    admin
        .queue_declare(&q, &QueueDeclare::default())
        .await
        .unwrap();
    for i in 0..n {
        admin
            .publish("", &q, &Properties::default(), i.to_string().as_bytes())
            .await
            .unwrap();
    }
    (q, admin_conn, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiple_ack_never_covers_a_rejected_or_unsettled_delivery() {
    if !util::rabbit_up() {
        return;
    }
    let (q, _admin_conn, admin) = seeded("celeriac-test-acks", 8).await;

    let (conn, ch) = raw().await;
    // Held for an hour unless flushed: only this test's flushes send them.
    ch.batch_acks(Duration::from_secs(3600), 1000);
    let (_, mut rx) = ch.basic_consume(&q, false).await.unwrap();
    let mut d = Vec::new();
    for _ in 0..8 {
        d.push(next(&mut rx).await);
    }
    let bodies: Vec<_> = d.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        (0..8)
            .map(|i: i32| i.to_string().into_bytes())
            .collect::<Vec<_>>()
    );
    // 0, 1 acked; 2 rejected (dropped); 3 requeued; 4 left unsettled; 5, 6 acked; 7 unsettled.
    ch.ack_batched(d[0].delivery_tag).unwrap();
    ch.ack_batched(d[1].delivery_tag).unwrap();
    ch.ack_batched(d[5].delivery_tag).unwrap();
    ch.basic_reject(d[2].delivery_tag, false).await.unwrap();
    ch.basic_reject(d[3].delivery_tag, true).await.unwrap();
    ch.ack_batched(d[6].delivery_tag).unwrap();
    ch.flush_acks();
    // A multiple ack covering 2 or 3 would make RabbitMQ close the channel (406 unknown
    // delivery tag) on their reject, or ack 4: a synchronous call shows the channel alive.
    let requeued = next(&mut rx).await;
    assert_eq!(requeued.body, b"3");
    assert!(requeued.redelivered);
    ch.basic_qos(100, false)
        .await
        .expect("the channel survived");
    ch.basic_reject(requeued.delivery_tag, false).await.unwrap();
    ch.basic_qos(100, false)
        .await
        .expect("the channel survived");
    assert!(ch.is_open());

    // Closing the consumer's connection returns exactly the unsettled deliveries, 4 and 7.
    conn.close().await.unwrap();
    let mut back = Vec::new();
    for _ in 0..200 {
        if ready(&admin, &q).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(m) = admin.basic_get(&q, true).await.unwrap() {
        back.push(String::from_utf8(m.body).unwrap());
    }
    back.sort();
    assert_eq!(back, ["4", "7"]);
    admin.queue_delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_acks_go_out_on_their_own_after_the_delay() {
    if !util::rabbit_up() {
        return;
    }
    let (q, _admin_conn, admin) = seeded("celeriac-test-acks-timer", 20).await;
    let (conn, ch) = raw().await;
    ch.batch_acks(Duration::from_millis(5), 1000);
    let (_, mut rx) = ch.basic_consume(&q, false).await.unwrap();
    for _ in 0..20 {
        let m = next(&mut rx).await;
        ch.ack_batched(m.delivery_tag).unwrap();
    }
    // No flush: the flusher sends them. Once the connection is killed (not closed by us, so
    // no flush on close), nothing may come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ch.basic_qos(10, false).await.expect("the channel is alive");
    drop(ch);
    drop(conn);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ready(&admin, &q).await, 0, "an ack was never sent");
    }
    admin.queue_delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_with_acks_held_loses_nothing() {
    if !util::rabbit_up() {
        return;
    }
    // A process killed while it holds acks never sent them: RabbitMQ still counts those
    // deliveries unacked and requeues them with the connection. Dropping the connection
    // without closing it stands for the kill (no flush, the socket just goes).
    let (q, _admin_conn, admin) = seeded("celeriac-test-acks-killed", 10).await;
    let (conn, ch) = raw().await;
    ch.batch_acks(Duration::from_secs(3600), 1000);
    let (_, mut rx) = ch.basic_consume(&q, false).await.unwrap();
    for _ in 0..10 {
        let m = next(&mut rx).await;
        ch.ack_batched(m.delivery_tag).unwrap();
    }
    drop(rx);
    drop(ch);
    drop(conn);
    let mut back = 0;
    for _ in 0..200 {
        back = ready(&admin, &q).await;
        if back == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(back, 10, "every delivery whose ack was held comes back");
    admin.queue_delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_reported_to_their_callers_among_many_in_flight() {
    if !util::rabbit_up() {
        return;
    }
    // Wire level: a confirming channel, 200 publishes in flight to a queue that holds one.
    let q = unique_queue("celeriac-test-reject-publish");
    let (_c, ch) = raw().await;
    let mut args = FieldTable::new();
    args.insert("x-max-length".to_owned(), FieldValue::I32(1));
    args.insert("x-overflow".to_owned(), FieldValue::str("reject-publish"));
    let mut qa = QueueDeclare::default();
    qa.arguments = args;
    ch.queue_declare(&q, &qa).await.unwrap();
    ch.confirm_select().await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..200 {
        let rx = ch
            .publish("", &q, &Properties::default(), i.to_string().as_bytes())
            .await
            .unwrap()
            .expect("a confirming channel");
        confirms.push(rx);
    }
    let mut outcome = Vec::new();
    for rx in confirms {
        outcome.push(rx.await.expect("a confirm"));
    }
    assert!(outcome[0], "the first fits");
    assert_eq!(outcome.iter().filter(|ok| **ok).count(), 1, "{outcome:?}");
    ch.queue_delete(&q).await.unwrap();

    // Broker level: concurrent publishes through one broker handle (one channel) to a queue
    // a policy limits to one message: exactly one succeeds, every other caller is told.
    let q = unique_queue("celeriac-test-reject-policy");
    let policy = q.clone();
    let set = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "set_policy",
            "--apply-to",
            "queues",
            &policy,
            &format!("^{q}$"),
            r#"{"max-length":1,"overflow":"reject-publish"}"#,
        ])
        .status()
        .await
        .expect("run rabbitmqctl (needed to set a policy)");
    assert!(set.success());
    let broker = util::broker("").await;
    broker.declare(&q).await.unwrap();
    // The policy reaches the new queue shortly after its declaration: wait until a second
    // message is refused.
    let mut applied = false;
    for _ in 0..100 {
        broker.purge(&q).await.unwrap();
        broker
            .publish(&q, &test_message("t.a"), PublishOptions::default())
            .await
            .unwrap();
        if broker
            .publish(&q, &test_message("t.a"), PublishOptions::default())
            .await
            .is_err()
        {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied, "the max-length policy never applied");
    broker.purge(&q).await.unwrap();
    let messages: Vec<_> = (0..100).map(|_| test_message("t.a")).collect();
    let results = futures_join(&broker, &q, &messages).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(e.is_transient());
    }
    // Nothing beyond the one stored: a consumer sees exactly one.
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(10))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    d.ack().await.unwrap();
    drop(c);
    let _ = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "clear_policy", &policy])
        .status()
        .await;
    let (_c, ch) = raw().await;
    let _ = ch.queue_delete(&q).await;
    broker.close().await.unwrap();
}

/// Publishes every message at once (concurrently, one task each) and returns each result.
async fn futures_join(
    broker: &celeriac_amqp::AmqpBroker,
    queue: &str,
    messages: &[celeriac_core::Message],
) -> Vec<celeriac_core::Result<()>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, m) in messages.iter().enumerate() {
        let b = broker.clone();
        let q = queue.to_owned();
        let m = m.clone();
        set.spawn(async move { (i, b.publish(&q, &m, PublishOptions::default()).await) });
    }
    let mut out: Vec<_> = (0..messages.len()).map(|_| Ok(())).collect();
    while let Some(r) = set.join_next().await {
        let (i, r) = r.expect("publish task");
        out[i] = r;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_report_refusals_later_and_survive_a_killed_connection() {
    if !util::rabbit_up() {
        return;
    }
    // A refusal: the queue holds one message (policy), publishes return before their confirm,
    // and a later publish or the flush names the refused task ids.
    let q = unique_queue("celeriac-test-pipelined-refused");
    let set = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "set_policy",
            "--apply-to",
            "queues",
            &q,
            &format!("^{q}$"),
            r#"{"max-length":1,"overflow":"reject-publish"}"#,
        ])
        .status()
        .await
        .expect("run rabbitmqctl (needed to set a policy)");
    assert!(set.success());
    let waiting = util::broker("").await;
    waiting.declare(&q).await.unwrap();
    let mut applied = false;
    for _ in 0..100 {
        waiting.purge(&q).await.unwrap();
        let m = test_message("t.a");
        waiting
            .publish(&q, &m, PublishOptions::default())
            .await
            .unwrap();
        if waiting
            .publish(&q, &test_message("t.a"), PublishOptions::default())
            .await
            .is_err()
        {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied, "the max-length policy never applied");
    waiting.purge(&q).await.unwrap();

    let pipelined = util::broker("publish_confirms=pipelined").await;
    let first = test_message("t.a");
    pipelined
        .publish(&q, &first, PublishOptions::default())
        .await
        .expect("returns before its confirm");
    let mut sent = Vec::new();
    let mut reported = None;
    for _ in 0..2000 {
        let m = test_message("t.a");
        match pipelined.publish(&q, &m, PublishOptions::default()).await {
            Ok(()) => sent.push(m.id().to_owned()),
            Err(e) => {
                reported = Some(e);
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    let e = match reported {
        Some(e) => e,
        None => pipelined.flush().await.expect_err("refusals reported"),
    };
    let text = e.to_string();
    assert!(text.contains("refused"), "{text}");
    assert!(
        sent.iter().any(|id| text.contains(id.as_str())),
        "names a refused task id: {text}"
    );
    assert!(
        !text.contains(first.id()),
        "the first one was stored: {text}"
    );
    // Whatever is left is confirmed or reported by the flush; then nothing is pending.
    let _ = pipelined.flush().await;
    pipelined.flush().await.expect("nothing left to report");
    let _ = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "clear_policy", &q])
        .status()
        .await;
    let (_c, ch) = raw().await;
    let _ = ch.queue_delete(&q).await;
    pipelined.close().await.unwrap();
    waiting.close().await.unwrap();

    // A killed publisher connection: every publish that returned Ok ends up in the queue
    // (sent again on the next connection when its confirm died with the old one).
    let q = unique_queue("celeriac-test-pipelined-kill");
    let marker = unique_queue("pipelined-kill");
    let broker = util::broker(&format!(
        "publish_confirms=pipelined&connection_name={marker}"
    ))
    .await;
    broker.declare(&q).await.unwrap();
    let mut ok = std::collections::BTreeSet::new();
    for i in 0..600 {
        if i == 300 {
            assert!(util::kill_connections(&marker).await >= 1);
        }
        let m = test_message("t.a");
        // A publish that fails was not kept: the caller sends it again, as a caller would.
        for _ in 0..50 {
            if broker
                .publish(&q, &m, PublishOptions::default())
                .await
                .is_ok()
            {
                ok.insert(m.id().to_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(ok.len(), 600);
    broker.flush().await.expect("every message confirmed");
    let (_c, ch) = raw().await;
    let mut stored = std::collections::BTreeSet::new();
    while let Some(m) = ch.basic_get(&q, true).await.unwrap() {
        stored.insert(m.properties.correlation_id.unwrap_or_default());
    }
    let missing: Vec<_> = ok.difference(&stored).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let _ = ch.queue_delete(&q).await;
    broker.close().await.unwrap();
}
