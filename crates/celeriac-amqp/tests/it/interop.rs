//! Remote control and events with Python Celery 5.7 (kombu 5.7, from the venv of
//! `celeriac_test::python`) on the same RabbitMQ: the entities both sides declare, a control
//! request each way with its reply, events each way.
//!
//! Skips with a notice when RabbitMQ or the venv is missing (fails under
//! `CELERIAC_REQUIRE_SERVICES=1`). The entity test runs in vhosts of its own, made and deleted
//! with `rabbitmqctl`, so both orders of declaration start from nothing.

use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_amqp::wire::{Connection, ConnectionParams};
use celeriac_core::broadcast::control::{Reply, ReplyTo, Request};
use celeriac_core::broadcast::event::{Event, EventKind, now_unix};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, REPLY_EXCHANGE};
use celeriac_core::protocol::new_id;
use celeriac_core::{Broker, Config};
use celeriac_test::python::{PythonWorker, require_python, run_python_client, stdout_json};
use celeriac_test::services::unique_queue;
use serde_json::{Map, Value, json};

use crate::util::{self, URL};

/// How long a message may take to arrive (a Python process starts in about a second).
const ARRIVES: Duration = Duration::from_secs(60);

fn ready() -> bool {
    util::rabbit_up() && require_python()
}

fn channels(broker: &AmqpBroker) -> &dyn Broadcast {
    broker
        .broadcast()
        .expect("the amqp broker has broadcast channels")
}

async fn next(inbox: &mut Box<dyn Inbox>, what: &str) -> Broadcasted {
    tokio::time::timeout(ARRIVES, inbox.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing arrived within {ARRIVES:?}"))
        .unwrap_or_else(|e| panic!("{what}: the inbox failed: {e:?}"))
        .unwrap_or_else(|| panic!("{what}: the inbox closed"))
}

/// Runs a Python snippet next to `tasks.py` with `CELERY_BROKER_URL` = `url` and `env`.
async fn python(script: &str, url: &str, env: &[(&str, &str)]) -> Value {
    let mut all = vec![("CELERY_BROKER_URL", url)];
    all.extend_from_slice(env);
    stdout_json(&run_python_client(script, &all).await)
}

/// The same, in the background.
fn python_spawn(
    script: &'static str,
    env: Vec<(&'static str, String)>,
) -> tokio::task::JoinHandle<Value> {
    tokio::spawn(async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        python(script, URL, &env).await
    })
}

// ===== (b) entities =====

/// A vhost of the test's own, deleted when dropped.
struct Vhost(String);

impl Vhost {
    async fn new() -> Vhost {
        let name = unique_queue("celeriac-bc");
        rabbitmqctl(&["add_vhost", &name]).await;
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]).await;
        Vhost(name)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }

    /// `rabbitmqctl list_<what> <columns>` in this vhost, as JSON rows.
    async fn list(&self, what: &str, columns: &[&str]) -> Vec<Value> {
        let mut args = vec![what, "-p", &self.0, "--formatter", "json"];
        args.extend_from_slice(columns);
        let out = rabbitmqctl(&args).await;
        match serde_json::from_str(&out) {
            Ok(Value::Array(rows)) => rows,
            other => panic!("rabbitmqctl {what}: {other:?} from {out}"),
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.0])
            .output();
    }
}

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("run rabbitmqctl (needed to make a vhost and list entities)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Declares, with kombu, every broadcast entity as Celery 5.7 declares it: the three
/// exchanges, and the queues of a worker's pidbox (node `NODE`), of a control client's
/// replies and of an `EventReceiver`. Holding them, prints their names, the reply routing key
/// and `rabbitmqctl`'s view of the vhost (`VHOST`). A conflicting declaration raises
/// PreconditionFailed.
const DECLARE_LIKE_CELERY: &str = r#"
import json, os, subprocess, tasks
from celery.events import EventReceiver
from celery.events.event import get_exchange

app = tasks.app

def ctl(*args):
    out = subprocess.run(["rabbitmqctl", "-q", *args[:1], "-p", os.environ["VHOST"],
                          "--formatter", "json", *args[1:]],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)

with app.connection_for_write() as conn:
    ch = conn.default_channel
    mailbox = app.control.mailbox
    mailbox.exchange(ch).declare()
    mailbox.reply_exchange(ch).declare()
    get_exchange(conn, name=app.conf.event_exchange)(ch).declare()
    node_q = mailbox.get_queue(os.environ["NODE"])(ch)
    node_q.declare()
    reply_q = mailbox.reply_queue(ch)
    reply_q.declare()
    event_q = EventReceiver(conn, app=app).queue(ch)
    event_q.declare()
    print(json.dumps({
        "names": {"control": node_q.name, "reply": reply_q.name, "event": event_q.name},
        "reply_key": mailbox.oid,
        "queues": ctl("list_queues", "name", "durable", "auto_delete", "exclusive", "arguments"),
        "bindings": ctl("list_bindings", "source_name", "destination_name", "routing_key"),
    }))
"#;

/// The exchange rows of the three broadcast exchanges, by name.
fn broadcast_exchanges(rows: &[Value]) -> Map<String, Value> {
    rows.iter()
        .filter_map(|r| {
            let name = r["name"].as_str()?;
            ["celery.pidbox", "reply.celery.pidbox", "celeryev"]
                .contains(&name)
                .then(|| (name.to_owned(), r.clone()))
        })
        .collect()
}

/// What one side declared for its control, reply and event queue: the queue row without its
/// name, and the (exchange, routing key) it is bound with.
fn queue_shapes(queues: &[Value], bindings: &[Value], names: &[(&str, String)]) -> Value {
    let mut out = Map::new();
    for (kind, name) in names {
        let mut row = queues
            .iter()
            .find(|q| q["name"] == json!(name))
            .unwrap_or_else(|| panic!("no {kind} queue {name} in {queues:?}"))
            .clone();
        row.as_object_mut().unwrap().remove("name");
        let bound: Vec<Value> = bindings
            .iter()
            .filter(|b| b["destination_name"] == json!(name) && b["source_name"] != json!(""))
            .map(|b| json!([b["source_name"], b["routing_key"]]))
            .collect();
        out.insert((*kind).to_owned(), json!({"queue": row, "bound": bound}));
    }
    Value::Object(out)
}

/// Python redeclaring our exchanges gets no PRECONDITION_FAILED, nor do we redeclaring
/// Python's, and the queues of both sides are the same in RabbitMQ's eyes (durable,
/// exclusive, auto-delete, `x-expires` and `x-message-ttl` with their AMQP types, bindings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_we_declare_the_same_broadcast_entities() {
    if !ready() {
        return;
    }
    let config = Config::default();
    let exchange_columns = [
        "name",
        "type",
        "durable",
        "auto_delete",
        "internal",
        "arguments",
    ];

    // 1. We declare first, in an empty vhost; Python redeclares everything after us.
    let vhost = Vhost::new().await;
    let broker = AmqpBroker::connect(&vhost.url(), &config).await.unwrap();
    let b = channels(&broker);
    let node = format!("{}@test", unique_queue("rs-node"));
    let _control = b.control_inbox(&node).await.unwrap();
    let (key, _replies) = b.reply_inbox().await.unwrap();
    let binding = format!("{}.#", unique_queue("bc"));
    let _events = b.event_inbox(&binding).await.unwrap();
    b.send_control(&Broadcasted::new("", Map::new(), json!({"method": "noop"})))
        .await
        .unwrap();
    b.send_reply(&Broadcasted::new(key.clone(), Map::new(), json!({})))
        .await
        .unwrap();
    b.send_event(&Broadcasted::new("worker.noop", Map::new(), json!({})))
        .await
        .unwrap();
    let ours_exchanges =
        broadcast_exchanges(&vhost.list("list_exchanges", &exchange_columns).await);
    let queues = vhost
        .list(
            "list_queues",
            &["name", "durable", "auto_delete", "exclusive", "arguments"],
        )
        .await;
    let bindings = vhost
        .list(
            "list_bindings",
            &["source_name", "destination_name", "routing_key"],
        )
        .await;
    let event_queue = bindings
        .iter()
        .find(|b| b["routing_key"] == json!(binding))
        .and_then(|b| b["destination_name"].as_str())
        .expect("our event queue is bound with its binding")
        .to_owned();
    let ours = queue_shapes(
        &queues,
        &bindings,
        &[
            ("control", format!("{node}.celery.pidbox")),
            ("reply", format!("{key}.reply.celery.pidbox")),
            ("event", event_queue.clone()),
        ],
    );
    assert!(event_queue.starts_with("celeryev."), "{event_queue}");

    let py_node = format!("{}@test", unique_queue("py-node"));
    let py = python(
        DECLARE_LIKE_CELERY,
        &vhost.url(),
        &[("NODE", &py_node), ("VHOST", &vhost.0)],
    )
    .await;
    let names = &py["names"];
    let py_key = py["reply_key"].as_str().unwrap();
    let theirs = queue_shapes(
        py["queues"].as_array().unwrap(),
        py["bindings"].as_array().unwrap(),
        &[
            ("control", names["control"].as_str().unwrap().to_owned()),
            ("reply", names["reply"].as_str().unwrap().to_owned()),
            ("event", names["event"].as_str().unwrap().to_owned()),
        ],
    );
    assert_eq!(names["control"], json!(format!("{py_node}.celery.pidbox")));
    assert_eq!(
        names["reply"],
        json!(format!("{py_key}.reply.celery.pidbox"))
    );
    // Same declarations; the routing keys differ only by each side's own key and binding.
    let normalize = |v: &Value, key: &str, binding: &str| {
        let text = v
            .to_string()
            .replace(&format!("\"{key}\""), "\"<key>\"")
            .replace(&format!("\"{binding}\""), "\"<binding>\"");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    assert_eq!(
        normalize(&ours, &key, &binding),
        normalize(&theirs, py_key, "#")
    );
    assert_eq!(
        ours["control"]["queue"],
        json!({"durable": false, "auto_delete": true, "exclusive": true,
               "arguments": [["x-expires", "signedint", 10000], ["x-message-ttl", "signedint", 300000]]})
    );
    assert_eq!(
        ours["event"]["queue"]["arguments"],
        json!([
            ["x-expires", "signedint", 60000],
            ["x-message-ttl", "signedint", 5000]
        ])
    );
    assert_eq!(theirs["event"]["bound"], json!([["celeryev", "#"]]));
    assert_eq!(
        ours_exchanges,
        broadcast_exchanges(&vhost.list("list_exchanges", &exchange_columns).await),
        "python's redeclaration changed nothing"
    );
    assert_eq!(
        ours_exchanges["celeryev"],
        json!({"name": "celeryev", "type": "topic", "durable": true, "auto_delete": false,
               "internal": false, "arguments": []})
    );
    broker.close().await.unwrap();

    // 2. Python declares first, in another empty vhost; we redeclare after it.
    let vhost2 = Vhost::new().await;
    python(
        DECLARE_LIKE_CELERY,
        &vhost2.url(),
        &[("NODE", &py_node), ("VHOST", &vhost2.0)],
    )
    .await;
    let pythons = broadcast_exchanges(&vhost2.list("list_exchanges", &exchange_columns).await);
    assert_eq!(
        pythons, ours_exchanges,
        "both sides make the same exchanges"
    );
    let broker = AmqpBroker::connect(&vhost2.url(), &config).await.unwrap();
    let b = channels(&broker);
    let _control = b.control_inbox(&node).await.unwrap();
    let (key, _replies) = b.reply_inbox().await.unwrap();
    let _events = b.event_inbox("#").await.unwrap();
    b.send_control(&Broadcasted::new("", Map::new(), json!({"method": "noop"})))
        .await
        .unwrap();
    b.send_reply(&Broadcasted::new(key, Map::new(), json!({})))
        .await
        .unwrap();
    b.send_event(&Broadcasted::new("worker.noop", Map::new(), json!({})))
        .await
        .unwrap();
    broker.close().await.unwrap();

    // The check is live: an exchange declared otherwise than Celery's is refused.
    let mut params = ConnectionParams::new("127.0.0.1", 5672);
    params.vhost.clone_from(&vhost2.0);
    let conn = Connection::open(&params).await.unwrap();
    for (name, kind, durable) in [
        ("celeryev", "topic", false),
        ("celeryev", "fanout", true),
        ("celery.pidbox", "fanout", true),
        ("reply.celery.pidbox", "direct", true),
    ] {
        let ch = conn.open_channel().await.unwrap();
        let e = ch
            .exchange_declare(name, kind, durable)
            .await
            .expect_err("a different declaration must conflict");
        assert_eq!(e.reply_code(), Some(406), "{name}: {e}");
    }
    let _ = conn.close().await;
}

// ===== (a) remote control =====

/// `app.control.broadcast(..., reply=True)` to node `NODE`; prints the replies collected.
const PYTHON_CONTROL_CLIENT: &str = r#"
import json, os, tasks
replies = tasks.app.control.broadcast(
    "celeriac_probe", arguments={"x": 1, "y": [2, None]},
    destination=[os.environ["NODE"]], reply=True, timeout=30)
print(json.dumps(replies))
"#;

/// A Python client's request reaches our node's control inbox, and the reply we send is what
/// Python collects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_control_request_reaches_us_and_python_collects_our_reply() {
    if !ready() {
        return;
    }
    let broker = util::broker("").await;
    let b = channels(&broker);
    let node = format!("{}@test", unique_queue("rs-control"));
    let mut inbox = b.control_inbox(&node).await.unwrap();
    let py = python_spawn(PYTHON_CONTROL_CLIENT, vec![("NODE", node.clone())]);

    let m = loop {
        let m = next(&mut inbox, "python's request").await;
        if m.body["method"] == json!("celeriac_probe") {
            break m;
        }
    };
    assert_eq!(m.routing_key, "");
    let got = Request::from_message(&m).unwrap();
    let r = &got.request;
    assert_eq!(
        Value::Object(r.arguments.clone()),
        json!({"x": 1, "y": [2, null]})
    );
    assert!(r.is_for(&node) && !r.is_for("other@test"));
    let reply_to = r.reply_to.clone().expect("reply=True asks for replies");
    assert_eq!(reply_to.exchange, REPLY_EXCHANGE);
    assert!(got.clock.is_some(), "{m:?}");
    let expires = got.expires.expect("python says when it stops waiting");
    assert!(expires > now_unix(), "{expires}");

    let reply = Reply {
        ticket: r.ticket.clone().expect("a ticket"),
        node: node.clone(),
        answer: json!({"ok": "pong", "n": 1}),
        clock: Some(42),
    };
    b.send_reply(&reply.to_message(&reply_to.routing_key))
        .await
        .unwrap();
    let collected = py.await.unwrap();
    assert_eq!(collected, json!([{node: {"ok": "pong", "n": 1}}]));
}

/// Our `ping` to a Python worker is answered on our reply queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_answers_our_ping_on_our_reply_queue() {
    if !ready() {
        return;
    }
    let queue = unique_queue("bc-pyworker");
    let worker = PythonWorker::start(URL, "rpc://guest:guest@127.0.0.1:5672//", &[&queue]).await;
    let broker = util::broker("").await;
    let b = channels(&broker);
    let (key, mut replies) = b.reply_inbox().await.unwrap();
    let ticket = new_id();
    let mut request = Request::new("ping", Map::new());
    request.destination = Some(vec![worker.node_name().to_owned()]);
    request.ticket = Some(ticket.clone());
    request.reply_to = Some(ReplyTo::new(key));
    let deadline = tokio::time::Instant::now() + ARRIVES;
    let reply = 'asking: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pong; worker log:\n{}",
            worker.log()
        );
        b.send_control(&request.to_message(1, Some(now_unix() + 5.0)))
            .await
            .unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(m) = tokio::time::timeout_at(until, replies.next()).await {
            let m = m.unwrap().expect("open");
            let reply = Reply::from_message(&m).unwrap();
            if reply.ticket == ticket {
                break 'asking reply;
            }
        }
    };
    assert_eq!(reply.node, worker.node_name());
    assert_eq!(reply.answer, json!({"ok": "pong"}));
    assert!(reply.clock.is_some());
}

// ===== (c) events =====

/// An `EventReceiver` (routing key `#`, as `celery events` uses) capturing until it has a
/// `task-received`, a `task-succeeded` and a `worker-heartbeat` from node `NODE`; prints them
/// by type, as Celery hands them to handlers.
const PYTHON_EVENT_RECEIVER: &str = r#"
import json, os, tasks
from celery.events import EventReceiver

node = os.environ["NODE"]
got = {}
with tasks.app.connection_for_write() as conn:
    recv = EventReceiver(conn, app=tasks.app)
    def on_event(event):
        if event.get("hostname") == node:
            got.setdefault(event["type"], event)
            if {"task-received", "task-succeeded", "worker-heartbeat"} <= set(got):
                recv.should_stop = True
    recv.handlers["*"] = on_event
    recv.capture(limit=None, timeout=60, wakeup=False)
print(json.dumps(got))
"#;

/// Our batch of task events (`task.multi`) and our heartbeat reach Python's `EventReceiver`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_events_reach_pythons_event_receiver() {
    if !ready() {
        return;
    }
    let broker = util::broker("").await;
    let b = channels(&broker);
    let node = format!("{}@test", unique_queue("rs-events"));
    let task = new_id();
    let mut headers = Map::new();
    headers.insert("hostname".to_owned(), json!(node));
    let mut py = python_spawn(PYTHON_EVENT_RECEIVER, vec![("NODE", node.clone())]);
    // Python's queue exists only once it runs: send until it has what it waits for.
    let mut clock = 0;
    let got = loop {
        clock += 3;
        let batch = json!([
            Event::new(EventKind::TaskReceived, &node, clock - 2)
                .with("uuid", task.as_str())
                .with("name", "tasks.add")
                .with("args", "(2, 3)")
                .with("kwargs", "{}")
                .to_value(),
            Event::new(EventKind::TaskSucceeded, &node, clock - 1)
                .with("uuid", task.as_str())
                .with("result", "5")
                .with("runtime", 0.01)
                .to_value(),
        ]);
        b.send_event(&Broadcasted::new("task.multi", headers.clone(), batch))
            .await
            .unwrap();
        let beat = Event::new(EventKind::WorkerHeartbeat, &node, clock)
            .with("freq", 2.0)
            .with("active", 0)
            .with("processed", 1)
            .with("loadavg", json!([0.1, 0.2, 0.3]))
            .with("sw_ident", "celeriac");
        b.send_event(&Broadcasted::new(
            EventKind::WorkerHeartbeat.routing_key(),
            headers.clone(),
            beat.to_value(),
        ))
        .await
        .unwrap();
        tokio::select! {
            r = &mut py => break r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    };
    let received = &got["task-received"];
    assert_eq!(received["uuid"], json!(task));
    assert_eq!(received["name"], json!("tasks.add"));
    assert_eq!(got["task-succeeded"]["result"], json!("5"));
    assert_eq!(got["task-succeeded"]["uuid"], json!(task));
    let beat = &got["worker-heartbeat"];
    assert_eq!(beat["freq"], json!(2.0));
    assert_eq!(beat["hostname"], json!(node));
    // Celery read our utcoffset and timestamp: it adds when it received the event.
    assert!(beat["local_received"].is_number(), "{beat}");
    let skew = (beat["timestamp"].as_f64().unwrap() - now_unix()).abs();
    assert!(skew < 60.0, "timestamp off by {skew} s: {beat}");
}

/// A Python `EventDispatcher`'s `worker-heartbeat` (sent as a Celery worker sends it) reaches
/// our `event_inbox("#")`.
const PYTHON_EVENT_DISPATCHER: &str = r#"
import json, os, tasks
with tasks.app.connection_for_write() as conn:
    d = tasks.app.events.Dispatcher(conn, hostname=os.environ["NODE"], enabled=True)
    d.send("worker-heartbeat", freq=2.0, active=0, processed=7,
           loadavg=[0.0, 0.0, 0.0], sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
    d.close()
print(json.dumps("sent"))
"#;

/// Python's heartbeat reaches our `#` inbox with Celery's routing key, header and fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_heartbeat_reaches_our_event_inbox() {
    if !ready() {
        return;
    }
    let broker = util::broker("").await;
    let b = channels(&broker);
    let mut inbox = b.event_inbox("#").await.unwrap();
    let node = format!("{}@test", unique_queue("py-events"));
    assert_eq!(
        python(PYTHON_EVENT_DISPATCHER, URL, &[("NODE", &node)]).await,
        json!("sent")
    );
    let m = loop {
        let m = next(&mut inbox, "python's heartbeat").await;
        if m.headers.get("hostname") == Some(&json!(node)) {
            break m;
        }
    };
    assert_eq!(m.routing_key, "worker.heartbeat");
    let events = Event::from_message(&m);
    assert_eq!(events.len(), 1);
    let e = events.into_iter().next().unwrap().unwrap();
    assert_eq!(e.kind(), EventKind::WorkerHeartbeat);
    assert_eq!(e.hostname(), node);
    assert!(e.clock().is_some(), "{e:?}");
    assert_eq!(e.get("processed"), Some(&json!(7)));
    assert!(e.get("utcoffset").is_some_and(Value::is_number), "{e:?}");
    assert!((e.timestamp() - now_unix()).abs() < 60.0, "{e:?}");
}
