//! The broadcast channels (Celery's pidbox and events) on the wire: the channels, binding
//! members and lists kombu uses, read back with a plain connection; malformed messages; and
//! the round trips with Python Celery and kombu themselves.

use std::time::Duration;

use celeriac_core::Broker;
use celeriac_core::broadcast::control::{Reply, ReplyTo, Request};
use celeriac_core::broadcast::event::{Event, EventKind, now_unix};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, envelope};
use celeriac_core::protocol::new_id;
use celeriac_redis::{RedisBroker, RedisOptions};
use celeriac_test::python::{require_python, run_python_client, stdout_json};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{Map, Value, json};

use crate::util::{self, broker_with, raw};

const WAIT: Duration = Duration::from_secs(10);

/// How long a Python snippet may take to start and do its part.
const PYTHON: Duration = Duration::from_secs(60);

fn channels(b: &RedisBroker) -> &dyn Broadcast {
    b.broadcast()
        .expect("the redis broker has broadcast channels")
}

async fn next_in(inbox: &mut Box<dyn Inbox>, within: Duration, what: &str) -> Broadcasted {
    match tokio::time::timeout(within, inbox.next()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("{what}: the inbox closed"),
        Ok(Err(e)) => panic!("{what}: the inbox failed: {e:?}"),
        Err(_) => panic!("{what}: nothing within {within:?}"),
    }
}

fn headers(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A raw subscription to exact channel names (no pattern), on database-independent pub/sub.
async fn raw_subscriber(channels: &[String]) -> redis::aio::PubSub {
    let mut ps = redis::Client::open(util::URL)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    ps.subscribe(channels).await.unwrap();
    ps
}

async fn raw_message(ps: &mut redis::aio::PubSub) -> (String, Value) {
    let msg = tokio::time::timeout(WAIT, ps.on_message().next())
        .await
        .expect("a message on the raw subscription")
        .expect("the raw subscription is open");
    let env = serde_json::from_slice(msg.get_payload_bytes()).expect("an envelope in JSON");
    (msg.get_channel_name().to_owned(), env)
}

/// The body of an envelope, decoded.
fn body_of(env: &Value) -> Value {
    assert_eq!(env["properties"]["body_encoding"], "base64");
    envelope::decode(&serde_json::to_vec(env).unwrap())
        .unwrap()
        .1
        .body
}

/// Waits until `check` holds for the set at `key` (removals run in the background).
async fn until_members(
    c: &mut redis::aio::MultiplexedConnection,
    key: &str,
    check: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let members: Vec<String> = c.smembers(key).await.unwrap();
        if check(&members) {
            return members;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key}: {members:?} never did"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On a database other than 0 and under a prefix: the channels requests and events go out
/// on, the binding members and deadlines every inbox writes, the reply list and its expiry,
/// and the clean-up when inboxes are dropped. Read with a plain connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_bindings_and_lists_are_kombus() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let url = "redis://127.0.0.1:6379/3";
    let broker = RedisBroker::connect_with(url, RedisOptions::default().global_keyprefix(&p))
        .await
        .unwrap();
    let b = channels(&broker);
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // A listening node: its member and the exchange's deadline, an hour ahead.
    let node = format!("w1-{}@test", new_id());
    let mut inbox = b.control_inbox(&node).await.unwrap();
    let pidbox = format!("{p}_kombu.binding.celery.pidbox");
    let member = format!("\x06\x16\x06\x16{node}.celery.pidbox");
    let members: Vec<String> = c.smembers(&pidbox).await.unwrap();
    assert_eq!(members, [member]);
    let deadlines = format!("{p}_kombu.binding_deadlines");
    let score: f64 = c.zscore(&deadlines, "celery.pidbox").await.unwrap();
    let ahead = score / 1000.0 - now_unix();
    assert!((3590.0..3610.0).contains(&ahead), "{ahead}");
    // Not a permanent binding: kombu 5.7 keeps the pidbox queue's as an expiring one's.
    let permanent: i64 = c
        .exists(format!("{p}_kombu.binding_permanent.celery.pidbox"))
        .await
        .unwrap();
    assert_eq!(permanent, 0);

    // Requests go out on `<prefix>/3.celery.pidbox`.
    let request_channel = format!("{p}/3.celery.pidbox");
    let event_channel = format!("{p}/3.celeryev/task.multi");
    let mut ps = raw_subscriber(&[request_channel.clone(), event_channel.clone()]).await;
    let request = Request::new("ping", Map::new()).to_message(4, Some(now_unix() + 5.0));
    b.send_control(&request).await.unwrap();
    let (channel, env) = raw_message(&mut ps).await;
    assert_eq!(channel, request_channel);
    assert_eq!(env["content-type"], "application/json");
    assert_eq!(env["content-encoding"], "utf-8");
    assert_eq!(
        env["properties"]["delivery_info"],
        json!({"exchange": "celery.pidbox", "routing_key": ""})
    );
    assert_eq!(env["properties"]["delivery_mode"], 1);
    assert_eq!(env["headers"]["clock"], 4);
    assert_eq!(body_of(&env)["method"], "ping");
    assert_eq!(next_in(&mut inbox, WAIT, "the node").await, request);

    // Events go out on `<prefix>/3.celeryev/<routing key>`.
    let mut events = b.event_inbox("#").await.unwrap();
    let event_members: Vec<String> = c
        .smembers(format!("{p}_kombu.binding.celeryev"))
        .await
        .unwrap();
    assert_eq!(event_members.len(), 1);
    let (rk, queue) = event_members[0].split_once("\x06\x16\x06\x16").unwrap();
    assert_eq!(rk, "#");
    assert!(
        queue.starts_with("celeryev.") && queue.len() == 9 + 36,
        "{queue}"
    );
    let batch = Broadcasted::new(
        "task.multi",
        headers(&[("hostname", json!("w1@test"))]),
        json!([Event::new(EventKind::TaskStarted, "w1@test", 1)
            .with("uuid", "u1")
            .to_value()]),
    );
    b.send_event(&batch).await.unwrap();
    let (channel, env) = raw_message(&mut ps).await;
    assert_eq!(channel, event_channel);
    assert_eq!(
        env["properties"]["delivery_info"],
        json!({"exchange": "celeryev", "routing_key": "task.multi"})
    );
    assert_eq!(env["headers"]["hostname"], "w1@test");
    assert_eq!(body_of(&env)[0]["uuid"], "u1");
    assert_eq!(
        next_in(&mut events, WAIT, "the event listener").await,
        batch
    );

    // A reply queue: `<key>\x06\x16\x06\x16<key>.reply.celery.pidbox`, a list of that name.
    let (key, mut replies) = b.reply_inbox().await.unwrap();
    let reply_table = format!("{p}_kombu.binding.reply.celery.pidbox");
    let members: Vec<String> = c.smembers(&reply_table).await.unwrap();
    assert_eq!(
        members,
        [format!("{key}\x06\x16\x06\x16{key}.reply.celery.pidbox")]
    );
    let list = format!("{p}{key}.reply.celery.pidbox");
    let reply = |n: u64| {
        Reply {
            ticket: "t".into(),
            node: format!("n{n}@test"),
            answer: json!({"ok": "pong"}),
            clock: Some(n),
        }
        .to_message(&key)
    };
    b.send_reply(&reply(1)).await.unwrap();
    b.send_reply(&reply(2)).await.unwrap();
    let stored: Vec<String> = c.lrange(&list, 0, -1).await.unwrap();
    assert_eq!(stored.len(), 2, "LPUSHed to the bare list");
    let env: Value = serde_json::from_str(&stored[0]).unwrap();
    assert_eq!(
        env["properties"]["delivery_info"],
        json!({"exchange": "reply.celery.pidbox", "routing_key": key})
    );
    assert_eq!(env["headers"]["ticket"], "t");
    // First in, first out; each wait renews the list's expiry (Celery's 10 s).
    assert_eq!(next_in(&mut replies, WAIT, "reply 1").await, reply(1));
    let ttl: i64 = c.pttl(&list).await.unwrap();
    assert!((1..=10_000).contains(&ttl), "{ttl}");
    assert_eq!(next_in(&mut replies, WAIT, "reply 2").await, reply(2));
    // A reply for a key nobody is bound under goes nowhere.
    let mut stray = reply(3);
    stray.routing_key = "nobody".into();
    b.send_reply(&stray).await.unwrap();
    let stray_list: i64 = c
        .exists(format!("{p}nobody.reply.celery.pidbox"))
        .await
        .unwrap();
    assert_eq!(stray_list, 0);

    // Dropped inboxes take their members and lists with them.
    b.send_reply(&reply(4)).await.unwrap();
    drop((inbox, events, replies));
    until_members(&mut c, &pidbox, <[String]>::is_empty).await;
    until_members(&mut c, &reply_table, <[String]>::is_empty).await;
    until_members(
        &mut c,
        &format!("{p}_kombu.binding.celeryev"),
        <[String]>::is_empty,
    )
    .await;
    let left: i64 = c.exists(&list).await.unwrap();
    assert_eq!(left, 0);

    let _: () = c.del(&deadlines).await.unwrap();
}

/// Malformed messages on the pidbox and event channels and in a reply list are skipped; the
/// good one after them arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_skipped() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let b = channels(&broker);
    let mut c = raw().await;
    let mut control = b.control_inbox("w1@test").await.unwrap();
    let mut events = b.event_inbox("#").await.unwrap();
    let (key, mut replies) = b.reply_inbox().await.unwrap();

    let junk: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"[1, 2]".to_vec(),
        br#"{"no": "body"}"#.to_vec(),
        br#"{"body": "gARdlC4=", "content-type": "application/x-python-serialize", "properties": {"body_encoding": "base64"}}"#.to_vec(),
        br#"{"body": "%%%", "content-type": "application/json", "properties": {"body_encoding": "base64"}}"#.to_vec(),
        br#"{"body": "bm90IGpzb24=", "content-type": "application/json", "properties": {"body_encoding": "base64"}}"#.to_vec(),
        Vec::new(),
    ];
    for j in &junk {
        let _: () = c.publish(format!("{p}/0.celery.pidbox"), j).await.unwrap();
        let _: () = c
            .publish(format!("{p}/0.celeryev/worker.heartbeat"), j)
            .await
            .unwrap();
        let _: () = c
            .lpush(format!("{p}{key}.reply.celery.pidbox"), j)
            .await
            .unwrap();
    }
    let request = Request::new("ping", Map::new()).to_message(1, None);
    b.send_control(&request).await.unwrap();
    let beat = Broadcasted::new(
        "worker.heartbeat",
        headers(&[("hostname", json!("w1@test"))]),
        Event::new(EventKind::WorkerHeartbeat, "w1@test", 2).to_value(),
    );
    b.send_event(&beat).await.unwrap();
    let reply = Reply {
        ticket: "t".into(),
        node: "w1@test".into(),
        answer: json!({"ok": "pong"}),
        clock: None,
    }
    .to_message(&key);
    b.send_reply(&reply).await.unwrap();

    assert_eq!(next_in(&mut control, WAIT, "control").await, request);
    assert_eq!(next_in(&mut events, WAIT, "events").await, beat);
    assert_eq!(next_in(&mut replies, WAIT, "replies").await, reply);
}

/// An event inbox gets only what its binding matches, also where the `PSUBSCRIBE` glob is
/// looser than the topic pattern (`task.*` must not take `task.a.b`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_bindings_are_topic_patterns() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let b = channels(&broker);
    let mut tasks = b.event_inbox("task.*").await.unwrap();
    let ev = |rk: &str| Broadcasted::new(rk, Map::new(), json!({"type": rk.replace('.', "-")}));
    for rk in ["task.a.b", "worker.heartbeat", "task.succeeded"] {
        b.send_event(&ev(rk)).await.unwrap();
    }
    assert_eq!(
        next_in(&mut tasks, WAIT, "task.*").await,
        ev("task.succeeded")
    );
}

/// A redis-server of our own on a free port (the shared one must not be restarted), killed
/// when dropped (also when the test panics).
struct PrivateServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateServer {
    /// Starts one on `port` (a free one when `None`), without persistence; `None` (after a
    /// notice, or a panic under `CELERIAC_REQUIRE_SERVICES=1`) without `redis-server`.
    async fn start(port: Option<u16>) -> Option<PrivateServer> {
        use std::process::{Command, Stdio};
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                celeriac_test::python::skip_or_fail("the redis-server command");
                return None;
            }
        };
        let server = PrivateServer { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while redis::Client::open(server.url().as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private redis-server did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/2", self.port)
    }
}

/// Sends with `send` until `inbox` hears it (pub/sub is at most once: what goes out before a
/// subscription is lost); returns what it heard.
async fn send_until_heard<F, Fut>(inbox: &mut Box<dyn Inbox>, what: &str, send: F) -> Broadcasted
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = celeriac_core::Result<()>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        send().await.unwrap_or_else(|e| panic!("{what}: send: {e}"));
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await {
            return r
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .unwrap_or_else(|| panic!("{what}: closed"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never heard"
        );
    }
}

/// Every inbox outlives a restart of the server (which forgets the bindings too): control
/// and event inboxes subscribe again, the reply inbox reconnects and binds its queue again.
/// Closing the broker ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_survive_a_server_restart() {
    let Some(server) = PrivateServer::start(None).await else {
        return;
    };
    let broker = RedisBroker::connect_with(
        &server.url(),
        RedisOptions::default().global_keyprefix("p:"),
    )
    .await
    .unwrap();
    let b = channels(&broker);
    let mut control = b.control_inbox("w1@test").await.unwrap();
    let mut events = b.event_inbox("worker.#").await.unwrap();
    let (key, mut replies) = b.reply_inbox().await.unwrap();

    let port = server.port;
    drop(server);
    let server = PrivateServer::start(Some(port)).await.unwrap();

    let request = Request::new("ping", Map::new()).to_message(1, None);
    let got = send_until_heard(&mut control, "control", || b.send_control(&request)).await;
    assert_eq!(got, request);
    let beat = Broadcasted::new(
        "worker.heartbeat",
        Map::new(),
        json!({"type": "worker-heartbeat"}),
    );
    let got = send_until_heard(&mut events, "events", || b.send_event(&beat)).await;
    assert_eq!(got, beat);
    let reply = Broadcasted::new(key.clone(), Map::new(), json!({"w1@test": "pong"}));
    let got = send_until_heard(&mut replies, "replies", || b.send_reply(&reply)).await;
    assert_eq!(got.body, reply.body);

    broker.close().await.unwrap();
    for (inbox, what) in [
        (&mut control, "control"),
        (&mut events, "events"),
        (&mut replies, "replies"),
    ] {
        let r = tokio::time::timeout(WAIT, inbox.next()).await;
        assert!(matches!(r, Ok(Ok(None))), "{what}: {r:?}");
    }
    assert!(b.control_inbox("w2@test").await.is_err());
    drop(server);
}

fn python_env(p: &str) -> [(&'static str, &str); 2] {
    [("CELERY_BROKER_URL", util::URL), ("PFX", p)]
}

/// Runs a Python snippet in the background, with the broker URL and key prefix `p`.
fn spawn_python(script: String, p: &str) -> tokio::task::JoinHandle<std::process::Output> {
    let p = p.to_owned();
    tokio::spawn(async move { run_python_client(&script, &python_env(&p)).await })
}

/// The first lines of every Python snippet: the app of `examples/python/tasks.py` with this
/// test's key prefix.
const PY_PRELUDE: &str = r#"import json, os, socket, time
import tasks
app = tasks.app
app.conf.broker_transport_options = {'global_keyprefix': os.environ['PFX']}
"#;

/// Python's `app.control.broadcast(..., reply=True)` reaches our node, which replies; Python
/// collects the reply. Also: the reply queue kombu binds is `<oid>.reply.celery.pidbox` under
/// member `<oid>\x06\x16\x06\x16<oid>.reply.celery.pidbox`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_control_requests_reach_us_and_our_replies_reach_python() {
    if !util::redis_up() || !require_python() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let b = channels(&broker);
    let mut inbox = b.control_inbox("rust1@test").await.unwrap();
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"replies = app.control.broadcast('rate_limit',
    arguments={'task_name': 'tasks.add', 'rate_limit': '10/m'},
    destination=['rust1@test'], reply=True, timeout=30)
print(json.dumps(replies))
"#
    );
    let python = spawn_python(script, &p);

    let m = next_in(&mut inbox, PYTHON, "python's request").await;
    let got = Request::from_message(&m).expect("a control request");
    let r = &got.request;
    assert_eq!(r.method, "rate_limit");
    assert_eq!(
        Value::Object(r.arguments.clone()),
        json!({"task_name": "tasks.add", "rate_limit": "10/m"})
    );
    assert_eq!(
        r.destination.as_deref(),
        Some(&["rust1@test".to_owned()][..])
    );
    assert!(r.is_for("rust1@test") && !r.is_for("other@test"));
    let ticket = r.ticket.clone().expect("a ticket");
    let reply_to: ReplyTo = r.reply_to.clone().expect("reply_to");
    assert_eq!(reply_to.exchange, "reply.celery.pidbox");
    assert!(got.clock.is_some_and(|c| c > 0));
    assert!(got.expires.is_some_and(|e| e > now_unix()));

    let mut c = raw().await;
    let members: Vec<String> = c
        .smembers(format!("{p}_kombu.binding.reply.celery.pidbox"))
        .await
        .unwrap();
    let oid = &reply_to.routing_key;
    assert_eq!(
        members,
        [format!("{oid}\x06\x16\x06\x16{oid}.reply.celery.pidbox")],
        "kombu's reply binding"
    );

    let reply = Reply {
        ticket,
        node: "rust1@test".into(),
        answer: json!({"ok": "new rate limit set successfully"}),
        clock: Some(got.clock.unwrap() + 1),
    };
    b.send_reply(&reply.to_message(oid)).await.unwrap();
    let out = tokio::time::timeout(PYTHON, python).await.unwrap().unwrap();
    assert_eq!(
        stdout_json(&out),
        json!([{"rust1@test": {"ok": "new rate limit set successfully"}}])
    );
}

/// Our control request reaches a node of kombu's own `Mailbox` (bound to the `celery.pidbox`
/// fanout exchange), which answers it on our reply queue. The Python side also lists the
/// pidbox binding table: kombu's member for its node and ours for a celeriac node look alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_control_requests_reach_a_kombu_node_and_its_replies_reach_us() {
    if !util::redis_up() || !require_python() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let b = channels(&broker);
    let _ours = b.control_inbox("rust2@test").await.unwrap();
    let (key, mut replies) = b.reply_inbox().await.unwrap();
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"import redis
got = []
with app.connection_for_write() as conn:
    mailbox = app.control.mailbox(conn)
    node = mailbox.Node('py1@test', channel=conn.default_channel,
                        handlers={'ping': lambda state, **kw: {'ok': 'pong'}})
    def on_message(body, message):
        got.append({'body': body, 'headers': message.headers,
                    'delivery_info': message.delivery_info,
                    'content_type': message.content_type})
        node.handle_message(body, message)
    node.listen(callback=on_message)
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        try:
            conn.drain_events(timeout=1)
        except socket.timeout:
            pass
    r = redis.Redis.from_url(os.environ['CELERY_BROKER_URL'])
    pfx = os.environ['PFX']
    members = sorted(m.decode() for m in r.smembers(pfx + '_kombu.binding.celery.pidbox'))
    deadline = r.zscore(pfx + '_kombu.binding_deadlines', 'celery.pidbox')
print(json.dumps({'got': got[0] if got else None, 'members': members,
                  'deadline': deadline}, default=str))
"#
    );
    let python = spawn_python(script, &p);

    let mut request = Request::new("ping", Map::new());
    request.destination = Some(vec!["py1@test".into()]);
    request.ticket = Some(new_id());
    request.reply_to = Some(ReplyTo::new(&key));
    let message = request.to_message(5, Some(now_unix() + 30.0));
    // At most once: the node subscribes some time after Python starts, so send until it
    // answers.
    let started = tokio::time::Instant::now();
    let answer = loop {
        b.send_control(&message).await.unwrap();
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await {
            break r.unwrap().expect("the reply inbox is open");
        }
        assert!(started.elapsed() < PYTHON, "no reply from the kombu node");
        if python.is_finished() {
            let out = python.await.unwrap();
            panic!(
                "the python node ended: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let reply = Reply::from_message(&answer).expect("a control reply");
    assert_eq!(reply.ticket, request.ticket.clone().unwrap());
    assert_eq!(reply.node, "py1@test");
    assert_eq!(reply.answer, json!({"ok": "pong"}));
    assert!(reply.clock.is_some());
    assert_eq!(answer.routing_key, key);

    let out = tokio::time::timeout(PYTHON, python).await.unwrap().unwrap();
    let v = stdout_json(&out);
    let got = &v["got"];
    assert_eq!(got["body"], message.body);
    assert_eq!(got["headers"]["clock"], 5);
    assert_eq!(got["delivery_info"]["exchange"], "celery.pidbox");
    assert_eq!(got["delivery_info"]["routing_key"], "");
    assert_eq!(got["content_type"], "application/json");
    assert_eq!(
        v["members"],
        json!([
            "\u{6}\u{16}\u{6}\u{16}py1@test.celery.pidbox",
            "\u{6}\u{16}\u{6}\u{16}rust2@test.celery.pidbox"
        ])
    );
    assert!(v["deadline"].as_f64().unwrap() / 1000.0 > now_unix() + 3000.0);
}

/// Our `task.multi` batch and `worker.heartbeat` reach Python's `EventReceiver`, which first
/// wakes workers with a `heartbeat` control request that reaches us; Python's
/// `EventDispatcher` reaches our `event_inbox("#")`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_both_ways_with_python() {
    if !util::redis_up() || !require_python() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let b = channels(&broker);
    let mut control = b.control_inbox("rust3@test").await.unwrap();
    let run = new_id();
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"got = []
def on_event(event):
    got.append(event)
    if {e['type'] for e in got} >= {'task-succeeded', 'worker-heartbeat'}:
        receiver.should_stop = True
with app.connection_for_read() as conn:
    receiver = app.events.Receiver(conn, handlers={'*': on_event})
    try:
        receiver.capture(timeout=60, wakeup=True)
    except socket.timeout:
        pass
print(json.dumps(got))
"#
    );
    let python = spawn_python(script, &p);

    // The receiver's wake-up call.
    let m = next_in(&mut control, PYTHON, "the receiver's wake-up").await;
    assert_eq!(
        Request::from_message(&m).unwrap().request.method,
        "heartbeat"
    );

    let succeeded = Event::new(EventKind::TaskSucceeded, "rust3@test", 7)
        .with("uuid", run.as_str())
        .with("result", "5")
        .with("runtime", 0.01);
    let batch = Broadcasted::new(
        "task.multi",
        headers(&[("hostname", json!("rust3@test"))]),
        json!([succeeded.to_value()]),
    );
    let heartbeat = Event::new(EventKind::WorkerHeartbeat, "rust3@test", 8)
        .with("freq", 2.0)
        .with("active", 0)
        .with("processed", 3)
        .with("loadavg", json!([0.1, 0.2, 0.3]));
    let beat = Broadcasted::new(
        "worker.heartbeat",
        headers(&[("hostname", json!("rust3@test"))]),
        heartbeat.to_value(),
    );
    // At most once, and the receiver subscribes after its wake-up call: send until it has both.
    let started = tokio::time::Instant::now();
    while !python.is_finished() {
        b.send_event(&batch).await.unwrap();
        b.send_event(&beat).await.unwrap();
        assert!(started.elapsed() < PYTHON, "python never got both events");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let got = stdout_json(&python.await.unwrap());
    let of = |t: &str| {
        got.as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == t)
            .unwrap_or_else(|| panic!("no {t} in {got}"))
            .clone()
    };
    let s = of("task-succeeded");
    assert_eq!(
        (&s["uuid"], &s["hostname"], &s["result"], &s["clock"]),
        (&json!(run), &json!("rust3@test"), &json!("5"), &json!(7))
    );
    assert!(s["local_received"].is_number());
    let h = of("worker-heartbeat");
    assert_eq!(
        (&h["hostname"], &h["freq"], &h["processed"]),
        (&json!("rust3@test"), &json!(2.0), &json!(3))
    );

    // And the other way: a Python EventDispatcher's heartbeat.
    let mut events = b.event_inbox("#").await.unwrap();
    let mut task_events = b.event_inbox("task.#").await.unwrap();
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"with app.connection_for_write() as conn:
    d = app.events.Dispatcher(conn, hostname='py2@test', enabled=True)
    d.send('worker-heartbeat', freq=2.0, active=1, processed=9)
    d.close()
print(json.dumps('sent'))
"#
    );
    let out = run_python_client(&script, &python_env(&p)).await;
    assert_eq!(stdout_json(&out), "sent");
    let m = next_in(&mut events, WAIT, "python's heartbeat").await;
    assert_eq!(m.routing_key, "worker.heartbeat");
    assert_eq!(m.headers["hostname"], "py2@test");
    let e = Event::from_message(&m).pop().unwrap().unwrap();
    assert_eq!(
        (e.kind(), e.hostname(), e.get("processed")),
        (EventKind::WorkerHeartbeat, "py2@test", Some(&json!(9)))
    );
    assert!(e.clock().is_some());
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), task_events.next()).await {
        panic!("task.# got a worker event: {r:?}");
    }
}
