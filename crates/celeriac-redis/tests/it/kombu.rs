//! kombu's keys and formats, read back with a plain connection, and entries written the way a
//! Python worker writes them.

use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions, Requeue};
use celeriac_redis::RedisOptions;
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::util::{self, broker_with, msg, next_within, raw};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_writes_kombus_envelope_to_the_priority_lists() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    broker.declare("celery").await.unwrap();
    let mut c = raw().await;

    let members: Vec<String> = c
        .smembers(format!("{p}_kombu.binding.celery"))
        .await
        .unwrap();
    assert_eq!(members, ["celery\x06\x16\x06\x16celery"]);

    let m = msg();
    broker
        .publish("celery", &m, PublishOptions::default().priority(Some(0)))
        .await
        .unwrap();
    let mut urgent = msg();
    urgent.properties.priority = Some(9);
    broker
        .publish("celery", &urgent, PublishOptions::default())
        .await
        .unwrap();
    broker
        .publish(
            "celery",
            &msg(),
            PublishOptions::default().priority(Some(5)),
        )
        .await
        .unwrap();

    // Our 0 is kombu's 9 (served last); our 9 is kombu's 0 (the bare list).
    let low: Vec<Vec<u8>> = c
        .lrange(format!("{p}celery\x06\x169"), 0, -1)
        .await
        .unwrap();
    let top: Vec<Vec<u8>> = c.lrange(format!("{p}celery"), 0, -1).await.unwrap();
    let mid: i64 = c.llen(format!("{p}celery\x06\x166")).await.unwrap();
    assert_eq!((low.len(), top.len(), mid), (1, 1, 1));

    let text = String::from_utf8(low[0].clone()).unwrap();
    assert!(text.starts_with(r#"{"body":""#), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["content-type"], "application/json");
    assert_eq!(v["content-encoding"], "utf-8");
    assert_eq!(v["headers"]["task"], "tests.add");
    assert_eq!(v["headers"]["id"], m.id());
    assert_eq!(v["properties"]["body_encoding"], "base64");
    assert_eq!(
        v["properties"]["delivery_info"],
        json!({"exchange": "", "routing_key": "celery"})
    );
    assert_eq!(v["properties"]["priority"], 9);
    assert_eq!(v["properties"]["correlation_id"], m.id());
    assert_eq!(v["properties"]["delivery_tag"].as_str().unwrap().len(), 36);
    let top: Value = serde_json::from_slice(&top[0]).unwrap();
    assert_eq!(top["properties"]["priority"], 0);
    assert_eq!(top["headers"]["id"], urgent.id());
}

/// A task sent without a priority goes where Python's tasks without one go: kombu's bare list
/// (priority 0, served first), written as Python writes it (`"priority": 0`, nothing of ours),
/// so on a queue shared with Python workers neither side's default tasks starve behind the
/// other's. An explicit priority maps to kombu's buckets as before. A mixed backlog comes out
/// list by list, FIFO inside each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_priority_tasks_land_where_pythons_do() {
    // See: issue 23 (F)
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "mixed";
    broker.declare(q).await.unwrap();
    let mut c = raw().await;
    // What a Python client's `send_task(name, queue=q)` pushes (kombu's `_put`: priority 0,
    // the bare list).
    let python = |id: &str| {
        json!({
            "body": "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "proj.tasks.add", "id": id, "shadow": null,
                "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0,
                "timelimit": [null, null], "root_id": id, "parent_id": null,
                "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen4242@build-01",
                "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null,
                "stamps": {}},
            "properties": {"correlation_id": id,
                "reply_to": "55d606cb-8f74-314c-aae5-41b36c5c970b", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": q}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": format!("tag-{id}")}
        })
        .to_string()
    };
    let mut label_of = std::collections::HashMap::new();
    // (label, pushed as Python pushes it, priority)
    let backlog: [(&str, bool, Option<u8>); 7] = [
        ("py-1", true, None),
        ("ours-unset-1", false, None),
        ("ours-0", false, Some(0)),
        ("ours-5", false, Some(5)),
        ("py-2", true, None),
        ("ours-9", false, Some(9)),
        ("ours-unset-2", false, None),
    ];
    for (label, from_python, priority) in backlog {
        if from_python {
            let _: () = c.lpush(format!("{p}{q}"), python(label)).await.unwrap();
            label_of.insert(label.to_owned(), label);
        } else {
            let mut m = msg();
            m.properties.priority = priority;
            broker
                .publish(q, &m, PublishOptions::default())
                .await
                .unwrap();
            label_of.insert(m.id().to_owned(), label);
        }
    }

    // Our unset ones sit in the bare list with Python's, looking like Python's.
    let bare: Vec<String> = c.lrange(format!("{p}{q}"), 0, -1).await.unwrap();
    assert_eq!(bare.len(), 5, "{bare:#?}");
    for text in &bare {
        let v: Value = serde_json::from_str(text).unwrap();
        let label = label_of[v["headers"]["id"].as_str().unwrap()];
        assert_eq!(v["properties"]["priority"], 0, "{label}");
        if label.starts_with("ours-unset") {
            assert!(
                v["properties"].get("celeriac_priority").is_none(),
                "{label}: {text}"
            );
        }
    }
    for (list, kombu, ours) in [("\x06\x166", 6, 5), ("\x06\x169", 9, 0)] {
        let held: Vec<String> = c.lrange(format!("{p}{q}{list}"), 0, -1).await.unwrap();
        assert_eq!(held.len(), 1, "{list:?}: {held:#?}");
        let v: Value = serde_json::from_str(&held[0]).unwrap();
        assert_eq!(v["properties"]["priority"], kombu);
        assert_eq!(v["properties"]["celeriac_priority"], ours);
    }

    let mut consumer = broker
        .consume(&[q.to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..backlog.len() {
        let d = next_within(&mut consumer, WAIT).await;
        let m = d.message.as_ref().expect("decodes");
        let label = label_of[m.id()];
        let want = backlog.iter().find(|b| b.0 == label).unwrap().2;
        assert_eq!(m.properties.priority, want, "{label} reads back as sent");
        order.push(label);
        d.ack().await.unwrap();
    }
    assert_eq!(
        order,
        [
            "py-1",
            "ours-unset-1",
            "py-2",
            "ours-9",
            "ours-unset-2",
            "ours-5",
            "ours-0"
        ],
        "kombu's order: the bare list (Python's defaults, ours unset, our 9) first, FIFO"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delivery_is_in_unacked_and_unacked_index_until_acked() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let m = msg();
    broker
        .publish("q", &m, PublishOptions::default())
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&["q".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut consumer, WAIT).await;
    let mut c = raw().await;

    let entries: Vec<(String, String)> = c.hgetall(format!("{p}unacked")).await.unwrap();
    assert_eq!(entries.len(), 1);
    let (tag, value) = &entries[0];
    let v: Value = serde_json::from_str(value).unwrap();
    assert_eq!(v[0]["properties"]["delivery_tag"], tag.as_str());
    assert_eq!(v[0]["headers"]["id"], m.id());
    assert_eq!((&v[1], &v[2]), (&json!(""), &json!("q")));
    let scores: Vec<(String, f64)> = c
        .zrange_withscores(format!("{p}unacked_index"), 0, -1)
        .await
        .unwrap();
    assert_eq!(scores.len(), 1);
    assert_eq!(&scores[0].0, tag);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - scores[0].1).abs() < 5.0,
        "kombu's index holds the delivery time: {}",
        scores[0].1
    );
    assert_eq!(
        scores[0].1.fract(),
        0.0,
        "a default lease is scored in whole seconds (an integer in the server's listpack)"
    );

    d.ack().await.unwrap();
    let left: i64 = c.hlen(format!("{p}unacked")).await.unwrap();
    let idx: i64 = c.zcard(format!("{p}unacked_index")).await.unwrap();
    assert_eq!((left, idx), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_left_by_a_dead_python_worker_comes_back() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(
        &p,
        RedisOptions::default().visibility_timeout(Duration::from_secs(60)),
    )
    .await;
    broker.declare("celery").await.unwrap();
    // What kombu's QoS.append writes: the envelope, exchange and routing key, and the time.
    let envelope = json!({
        "body": "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "proj.tasks.add", "id": "py-task-1", "retries": 0, "root_id": "py-task-1"},
        "properties": {"correlation_id": "py-task-1", "delivery_mode": 2,
            "delivery_info": {"exchange": "celery", "routing_key": "celery"}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": "dead-worker-tag"}
    });
    let entry = serde_json::to_string(&json!([envelope, "celery", "celery"])).unwrap();
    let mut c = raw().await;
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 3600.0;
    let _: () = c
        .hset(format!("{p}unacked"), "dead-worker-tag", &entry)
        .await
        .unwrap();
    let _: () = c
        .zadd(format!("{p}unacked_index"), "dead-worker-tag", an_hour_ago)
        .await
        .unwrap();

    let mut consumer = broker
        .consume(&["celery".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut consumer, WAIT).await;
    let m = d.message.as_ref().expect("decodes");
    assert_eq!(m.id(), "py-task-1");
    assert_eq!(
        m.properties.priority, None,
        "Python's default priority 0 is none of ours"
    );
    assert!(d.redelivered());
    assert!(
        !m.headers.extra.contains_key("redelivered"),
        "transport noise is dropped"
    );
    // While held again, the hash holds it under the same tag, now flagged.
    let value: String = c
        .hget(format!("{p}unacked"), "dead-worker-tag")
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&value).unwrap();
    assert_eq!(v[0]["headers"]["redelivered"], true);
    assert_eq!(v[0]["properties"]["delivery_info"]["redelivered"], true);
    d.ack().await.unwrap();
    let left: i64 = c.hlen(format!("{p}unacked")).await.unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_in_a_sorted_set() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let m = msg();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    broker
        .publish("q", &m, PublishOptions::default().not_before(Some(due)))
        .await
        .unwrap();
    let mut c = raw().await;
    let held: Vec<(String, f64)> = c
        .zrange_withscores(format!("{p}celeriac.delayed.q"), 0, -1)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].1 as i64, due.timestamp_millis());
    let ready: i64 = c.llen(format!("{p}q")).await.unwrap();
    assert_eq!(ready, 0);

    let mut consumer = broker
        .consume(&["q".to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut consumer, WAIT).await;
    assert!(chrono::Utc::now() >= due);
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    let left: i64 = c.zcard(format!("{p}celeriac.delayed.q")).await.unwrap();
    assert_eq!(left, 0);
    // reject(After) parks it there again, flagged as redelivered.
    d.reject(Requeue::After(Duration::from_secs(3600)))
        .await
        .unwrap();
    let held: Vec<String> = c
        .zrange(format!("{p}celeriac.delayed.q"), 0, -1)
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&held[0]).unwrap();
    assert_eq!(v["headers"]["redelivered"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_is_on_every_key() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(
        &p,
        RedisOptions::default().visibility_timeout(Duration::from_millis(200)),
    )
    .await;
    broker.declare("pq").await.unwrap();
    broker
        .publish("pq", &msg(), PublishOptions::default())
        .await
        .unwrap();
    broker
        .publish(
            "pq",
            &msg(),
            PublishOptions::default()
                .not_before(Some(chrono::Utc::now() + chrono::Duration::hours(1))),
        )
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&["pq".to_owned()], ConsumeOptions::new(2))
        .await
        .unwrap();
    let held = next_within(&mut consumer, WAIT).await;
    // Held past the visibility timeout: a sweep takes the mutex and restores it.
    let again = next_within(&mut consumer, WAIT).await;
    drop(held);
    again.ack().await.unwrap();
    let mut c = raw().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*pq*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        if k.starts_with("celeriac-redis-test:") {
            assert!(k.starts_with(&p), "{k} lacks the prefix {p}");
        } else {
            panic!("unprefixed key {k:?}");
        }
    }
    let names = broker.queues().await.unwrap();
    assert_eq!(names, ["pq"]);
}
