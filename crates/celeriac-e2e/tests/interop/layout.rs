//! The raw layout on Redis, each side read by the other: these pin the format, not just the
//! round trip (a round trip can hide two mirrored mistakes).

use std::time::Duration;

use celeriac::core::ConsumeOptions;
use celeriac::core::broker::Consumer;
use celeriac_examples::add;
use serde_json::{Value, json};

use crate::support::{T, keys, python, raw_list, setup};

/// kombu's priority separator: priority 3..5 lands in `<queue>\x06\x163`.
const SEP: &str = "\u{6}\u{16}";

async fn next(consumer: &mut Box<dyn Consumer>) -> celeriac::core::Delivery {
    tokio::time::timeout(T, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("consume")
        .expect("broker open")
}

fn decode_body(envelope: &Value) -> Value {
    use base64::Engine as _;
    assert_eq!(
        envelope["properties"]["body_encoding"], "base64",
        "{envelope}"
    );
    let b64 = envelope["body"].as_str().expect("body text");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 body");
    serde_json::from_slice(&bytes).expect("json body")
}

/// ISO-8601 as Python's `datetime.isoformat()` writes it in UTC.
fn is_python_iso(s: &str) -> bool {
    let (main, offset) = s.split_at(s.len().saturating_sub(6));
    offset == "+00:00"
        && chrono::NaiveDateTime::parse_from_str(main, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        && main.len() >= 19
        && (main.len() == 19 || main.len() == 26)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_celery_published_is_read_by_our_broker() {
    let Some(env) = setup(12, "layout-py").await else {
        return;
    };
    let q = env.queue.as_str();
    let sent = python(
        r#"
import json, os, tasks
q = os.environ["QUEUE"]
a = tasks.app.send_task("tasks.add", (2, 3), kwargs={}, queue=q, expires=60,
                        time_limit=30, soft_time_limit=20, headers={"custom": "x"})
b = tasks.app.send_task("tasks.mul", (6, 7), queue=q, priority=5)
print(json.dumps([a.id, b.id]))
"#,
        &env,
        &[],
    )
    .await;
    let (id_a, id_b) = (sent[0].as_str().unwrap(), sent[1].as_str().unwrap());

    // What Celery wrote, so the tests notice if Celery's own format moves.
    let raw = raw_list(&env, q).await;
    assert_eq!(raw.len(), 1, "{raw:#?}");
    let env_a = &raw[0];
    assert_eq!(
        keys(env_a),
        [
            "body",
            "content-encoding",
            "content-type",
            "headers",
            "properties"
        ]
    );
    assert_eq!(
        keys(&env_a["properties"]),
        [
            "body_encoding",
            "correlation_id",
            "delivery_info",
            "delivery_mode",
            "delivery_tag",
            "expiration",
            "priority",
            "reply_to"
        ]
    );
    assert_eq!(
        env_a["properties"]["delivery_info"],
        json!({"exchange": "", "routing_key": q})
    );
    assert_eq!(
        decode_body(env_a),
        json!([[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );
    let tag_a = env_a["properties"]["delivery_tag"]
        .as_str()
        .unwrap()
        .to_owned();
    let high = raw_list(&env, &format!("{q}{SEP}3")).await;
    assert_eq!(
        high.len(),
        1,
        "priority 5 goes to the \\x06\\x163 list: {high:#?}"
    );
    let tag_b = high[0]["properties"]["delivery_tag"]
        .as_str()
        .unwrap()
        .to_owned();

    // Our broker reads both, with every header.
    let queues = [q.to_owned()];
    let mut consumer = env
        .app
        .broker()
        .consume(&queues, ConsumeOptions::new(2))
        .await
        .unwrap();
    let mut got = vec![next(&mut consumer).await, next(&mut consumer).await];
    got.sort_by_key(|d| d.message.as_ref().map(|m| m.task().to_owned()).ok());
    let a = got[0].message.as_ref().expect("decodes");
    let b = got[1].message.as_ref().expect("decodes");
    assert_eq!((a.id(), a.task()), (id_a, "tasks.add"));
    assert_eq!((b.id(), b.task()), (id_b, "tasks.mul"));
    assert_eq!(got[0].queue, q);
    let body = a.decode_body().unwrap();
    assert_eq!(body.args, vec![json!(2), json!(3)]);
    assert!(body.kwargs.is_empty());
    let h = &a.headers;
    assert_eq!(h.timelimit.hard, Some(30.0));
    assert_eq!(h.timelimit.soft, Some(20.0));
    assert!(h.expires.is_some() && h.eta.is_none(), "{h:?}");
    assert_eq!(h.root_id.as_deref(), Some(id_a));
    assert_eq!(h.parent_id, None);
    assert_eq!(h.retries, 0);
    assert_eq!(h.argsrepr.as_deref(), Some("(2, 3)"));
    assert!(
        h.origin.as_deref().is_some_and(|o| o.starts_with("gen")),
        "{h:?}"
    );
    assert_eq!(h.extra.get("custom"), Some(&json!("x")), "{h:?}");
    assert_eq!(a.properties.correlation_id, id_a);
    assert!(a.properties.reply_to.is_some());
    // kombu's Redis priority runs lower-first, ours higher-first (as on AMQP): Celery's
    // default 0 is no priority of ours (it goes back to the first-served list), and its 5,
    // served after it, our 8.
    assert_eq!(
        (a.properties.priority, b.properties.priority),
        (None, Some(8)),
        "celery's 0 and 5 as ours"
    );

    // While held, each delivery sits in kombu's unacked hash and index, where a Python
    // worker's visibility sweep would find it; an ack removes it.
    let tags = format!("{tag_a},{tag_b}");
    let held = python(UNACKED, &env, &[("TAGS", &tags)]).await;
    let both = json!([{"hash": true, "index": true}, {"hash": true, "index": true}]);
    assert_eq!(held["tags"], both, "kombu's unacked layout while held");
    for d in got {
        d.ack().await.unwrap();
    }
    let after = python(UNACKED, &env, &[("TAGS", &tags)]).await;
    let none = json!([{"hash": false, "index": false}, {"hash": false, "index": false}]);
    assert_eq!(
        after["tags"], none,
        "acked deliveries leave kombu's unacked keys"
    );
    assert_eq!(after["lists"], 0);
}

/// Whether each delivery tag in `TAGS` is in kombu's `unacked` hash and `unacked_index`, and
/// how many messages `QUEUE`'s four lists hold.
const UNACKED: &str = r#"
import json, os, redis
r = redis.Redis.from_url(os.environ["URL"])
q = os.environ["QUEUE"]
print(json.dumps({
    "tags": [{"hash": r.hexists("unacked", t), "index": r.zscore("unacked_index", t) is not None}
             for t in os.environ["TAGS"].split(",")],
    "lists": sum(r.llen(k) for k in [q] + [q + "\x06\x16" + s for s in "369"]),
}))
"#;

/// Python reads our message through kombu and parses it with the worker's own `Request`.
const PARSE_WITH_CELERY: &str = r#"
import json, os, tasks
from celery.worker.request import Request
app = tasks.app
with app.connection_for_read() as conn:
    sq = conn.SimpleQueue(os.environ["QUEUE"], no_ack=True)
    m = sq.get(timeout=10)
    req = Request(m, app=app, task=app.tasks[m.headers["task"]])
    print(json.dumps({
        "content_type": m.content_type,
        "body": m.decode(),
        "id": req.id, "name": req.name, "args": list(req.args), "kwargs": req.kwargs,
        "eta": req.eta and req.eta.isoformat(), "expires": req.expires and req.expires.isoformat(),
        "time_limits": list(req.time_limits),
        "root_id": req.root_id, "parent_id": req.parent_id, "custom": m.headers.get("custom"),
        "correlation_id": m.properties.get("correlation_id"),
        "routing_key": m.delivery_info.get("routing_key"),
    }))
    sq.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_we_published_matches_celerys_layout() {
    let Some(env) = setup(13, "layout-rs").await else {
        return;
    };
    let q = env.queue.as_str();
    let py_q = format!("{q}-py");
    let ours = add::s(2, 3)
        .queue(q)
        .expires_in(Duration::from_secs(60))
        .time_limit(Duration::from_secs(30))
        .soft_time_limit(Duration::from_secs(20))
        .header("custom", "x")
        .apply_async(&env.app)
        .await
        .unwrap();
    python(
        r#"
import json, os, tasks
tasks.app.send_task("tasks.add", (2, 3), queue=os.environ["PYQ"], expires=60,
                    time_limit=30, soft_time_limit=20, headers={"custom": "x"})
print("null")
"#,
        &env,
        &[("PYQ", &py_q)],
    )
    .await;
    let py_raw = raw_list(&env, &py_q).await;
    // kombu files a message in the list of its `priority` property's bucket, and files it
    // there again when it restores an unacked copy: our message must sit where its property
    // says. (Which bucket our default priority takes is the driver's choice.)
    let mut found = Vec::new();
    for step in [0_u64, 3, 6, 9] {
        let key = if step == 0 {
            q.to_owned()
        } else {
            format!("{q}{SEP}{step}")
        };
        for m in raw_list(&env, &key).await {
            found.push((step, m));
        }
    }
    assert_eq!(found.len(), 1, "{found:#?}");
    let (step, o) = (found[0].0, &found[0].1);
    let kombu_priority = o["properties"]["priority"].as_u64().expect("a priority");
    let bucket = [0, 3, 6, 9]
        .into_iter()
        .filter(|s| *s <= kombu_priority.min(9))
        .max()
        .unwrap_or(0);
    assert_eq!(
        step, bucket,
        "priority {kombu_priority} in the wrong list: {o}"
    );
    let p = &py_raw[0];
    let side_by_side = format!("ours:   {o}\npython: {p}");

    assert_eq!(keys(o), keys(p), "{side_by_side}");
    assert_eq!(keys(&o["headers"]), keys(&p["headers"]), "{side_by_side}");
    // Two properties may be left out: `reply_to` (only the rpc:// backend reads it) and
    // `expiration` (the message TTL for AMQP; kombu's Redis transport ignores it). Ours may
    // add `celeriac_*` ones, which kombu carries along and Celery ignores.
    let optional = ["expiration", "reply_to"];
    let props_of = |v: &Value| -> Vec<String> {
        keys(&v["properties"])
            .into_iter()
            .filter(|k| !optional.contains(&k.as_str()) && !k.starts_with("celeriac_"))
            .collect()
    };
    assert_eq!(props_of(o), props_of(p), "{side_by_side}");
    assert_eq!(o["content-type"], "application/json");
    assert_eq!(o["content-encoding"], "utf-8");
    assert_eq!(decode_body(o), decode_body(p), "{side_by_side}");
    let props = &o["properties"];
    assert_eq!(
        props["delivery_info"],
        json!({"exchange": "", "routing_key": q})
    );
    assert_eq!(props["correlation_id"], ours.id());
    assert_eq!(props["delivery_mode"], 2);
    let tag = props["delivery_tag"].as_str().expect("a delivery tag");
    assert!(uuid_like(tag), "{side_by_side}");
    let h = &o["headers"];
    assert_eq!(h["id"], ours.id());
    assert_eq!(h["root_id"], ours.id());
    assert_eq!(h["task"], "tasks.add");
    assert_eq!(h["eta"], Value::Null);
    assert_eq!(h["custom"], "x");
    let expires = h["expires"].as_str().expect("expires");
    assert!(is_python_iso(expires), "{expires} is not isoformat()");
    assert!(is_python_iso(p["headers"]["expires"].as_str().unwrap()));
    let tl: Vec<f64> = serde_json::from_value(h["timelimit"].clone()).expect("two numbers");
    assert_eq!(tl, [30.0, 20.0], "timelimit is [hard, soft]");

    // Celery's worker-side parsing takes our message as its own.
    let parsed = python(PARSE_WITH_CELERY, &env, &[]).await;
    assert_eq!(parsed["content_type"], "application/json");
    assert_eq!(parsed["id"], ours.id());
    assert_eq!(parsed["name"], "tasks.add");
    assert_eq!(parsed["args"], json!([2, 3]));
    assert_eq!(parsed["kwargs"], json!({}));
    assert_eq!(parsed["eta"], Value::Null);
    assert!(
        parsed["expires"].as_str().is_some_and(is_python_iso),
        "{parsed}"
    );
    let tl: Vec<f64> = serde_json::from_value(parsed["time_limits"].clone()).expect("numbers");
    assert_eq!(tl, [30.0, 20.0], "{parsed}");
    assert_eq!(parsed["root_id"], ours.id());
    assert_eq!(parsed["parent_id"], Value::Null);
    assert_eq!(parsed["custom"], "x");
    assert_eq!(parsed["correlation_id"], ours.id());
    assert_eq!(parsed["routing_key"], q);
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}
