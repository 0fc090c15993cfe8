//! Remote control and events on the memory broker's broadcast channels: what Celery's
//! `inspect`, `control` and monitors see of a worker. (The same against real Python tools, on
//! Redis and RabbitMQ, is in the e2e crate's interop tests.)

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::broadcast::Clock;
use celeriac_core::broadcast::control::{Reply, Request, collect};
use celeriac_core::broadcast::event::{Event, EventKind};
use celeriac_core::broadcast::{Broadcast, Broadcasted, Signed};
use celeriac_core::security::Packed;
use celeriac_core::{Broker as _, RateLimit, TaskState};
use serde_json::{Map, Value, json};

use crate::support::*;

fn channels(h: &Harness) -> &dyn Broadcast {
    h.broker.inner.broadcast().expect("memory broadcast")
}

/// Sends `method` with `args` and collects replies for up to a second (one node).
async fn ask(h: &Harness, method: &str, args: Value) -> Vec<Reply> {
    let args: Map<String, Value> = serde_json::from_value(args).unwrap();
    let clock = Clock::new();
    collect(
        channels(h),
        &clock,
        Request::new(method, args),
        Duration::from_secs(2),
        Some(1),
    )
    .await
    .unwrap()
}

async fn answer(h: &Harness, method: &str, args: Value) -> Value {
    let replies = ask(h, method, args).await;
    assert_eq!(replies.len(), 1, "{method}: {replies:?}");
    assert_eq!(replies[0].node, "w1@test");
    replies[0].answer.clone()
}

/// How many requests `method` (`active`, `reserved`) lists.
async fn count(h: &Harness, method: &str) -> usize {
    answer(h, method, json!({}))
        .await
        .as_array()
        .map_or(0, Vec::len)
}

fn tasks(gate: &Opening) -> Vec<celeriac_core::TaskDef> {
    let g = gate.clone();
    vec![
        blocking("tasks.add", |_, mut a| {
            let x: i64 = a.take(0, "x")?;
            let y: i64 = a.take(1, "y")?;
            Ok(json!(x + y))
        }),
        with_options(
            async_task("tasks.wait", move |ctx, _| {
                let g = g.clone();
                async move {
                    tokio::select! {
                        () = g.wait() => Ok(json!("opened")),
                        () = ctx.cancellation().cancelled() => Ok(json!("cancelled")),
                    }
                }
            }),
            |o| o.rate_limit = Some("100/s".parse::<RateLimit>().unwrap()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_answers_in_celerys_shapes() {
    let gate = Opening::new();
    let h = start(tasks(&gate), options(|o| o.concurrency = 1));
    h.until("the worker listens", || async {
        !ask(&h, "ping", json!({})).await.is_empty()
    })
    .await;
    assert_eq!(answer(&h, "ping", json!({})).await, json!({"ok": "pong"}));

    let running = h.call("tasks.wait", vec![]).await;
    h.until("one active", || async { count(&h, "active").await == 1 })
        .await;
    let waiting = h.call("tasks.add", vec![json!(1), json!(2)]).await;
    h.until("one reserved", || async {
        count(&h, "reserved").await == 1
    })
    .await;
    let active = answer(&h, "active", json!({"safe": true})).await;
    assert_eq!(active[0]["id"], json!(running));
    assert_eq!(active[0]["name"], "tasks.wait");
    assert_eq!(active[0]["args"], "[]", "safe: a repr string");
    assert_eq!(active[0]["hostname"], "w1@test");
    assert!(active[0]["time_start"].is_f64());
    assert_eq!(active[0]["delivery_info"]["routing_key"], QUEUE);
    let reserved = answer(&h, "reserved", json!({})).await;
    assert_eq!(reserved[0]["id"], json!(waiting));
    assert_eq!(reserved[0]["args"], json!([1, 2]));
    assert_eq!(reserved[0]["time_start"], Value::Null);
    let q = answer(&h, "query_task", json!({"ids": [running, waiting, "nope"]})).await;
    assert_eq!(q[&running][0], "active");
    assert_eq!(q[&waiting][0], "reserved");
    assert!(q.get("nope").is_none());

    let stats = answer(&h, "stats", json!({})).await;
    for key in [
        "total",
        "pid",
        "clock",
        "uptime",
        "pool",
        "broker",
        "prefetch_count",
        "rusage",
    ] {
        assert!(stats.get(key).is_some(), "stats lacks {key}: {stats}");
    }
    assert!(
        stats["clock"].is_string(),
        "Celery sends the clock as a string"
    );
    assert_eq!(stats["total"]["tasks.wait"], 1);
    assert_eq!(stats["pool"]["max-concurrency"], 1);

    assert_eq!(
        answer(&h, "registered", json!({})).await,
        json!(["tasks.add", "tasks.wait [rate_limit=100/s]"])
    );
    let queues = answer(&h, "active_queues", json!({})).await;
    assert_eq!(queues[0]["name"], QUEUE);
    assert_eq!(queues[0]["exchange"]["type"], "direct");
    let conf = answer(&h, "conf", json!({})).await;
    assert_eq!(conf["worker_concurrency"], 1);
    assert!(
        answer(&h, "clock", json!({})).await["clock"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        answer(&h, "report", json!({})).await["ok"]
            .as_str()
            .unwrap()
            .contains("celeriac")
    );
    assert_eq!(
        answer(&h, "no_such_command", json!({})).await,
        json!({"error": "KeyError('no_such_command')"})
    );
    gate.open();
    assert_eq!(h.result(&waiting).await.result, json!(3));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_changes_the_running_worker() {
    let gate = Opening::new();
    let h = start(tasks(&gate), options(|o| o.concurrency = 1));
    h.until("the worker listens", || async {
        !ask(&h, "ping", json!({})).await.is_empty()
    })
    .await;

    // rate_limit: known task, unknown task, bad string, disable.
    let set = answer(
        &h,
        "rate_limit",
        json!({"task_name": "tasks.add", "rate_limit": "2/s"}),
    );
    assert_eq!(set.await, json!({"ok": "new rate limit set successfully"}));
    assert_eq!(
        answer(&h, "registered", json!({})).await[0],
        "tasks.add [rate_limit=2/s]"
    );
    let unknown = answer(
        &h,
        "rate_limit",
        json!({"task_name": "x", "rate_limit": "1/s"}),
    );
    assert_eq!(unknown.await, json!({"error": "unknown task"}));
    let bad = answer(
        &h,
        "rate_limit",
        json!({"task_name": "tasks.add", "rate_limit": "fast"}),
    );
    assert!(
        bad.await["error"]
            .as_str()
            .unwrap()
            .starts_with("Invalid rate limit string")
    );
    let off = answer(
        &h,
        "rate_limit",
        json!({"task_name": "tasks.wait", "rate_limit": ""}),
    );
    assert_eq!(off.await, json!({"ok": "rate limit disabled successfully"}));
    assert_eq!(answer(&h, "registered", json!({})).await[1], "tasks.wait");

    // The rate limit really spaces the runs: 3 tasks at 2/s take at least a second.
    let t0 = std::time::Instant::now();
    let ids = [
        h.call("tasks.add", vec![json!(1), json!(1)]).await,
        h.call("tasks.add", vec![json!(2), json!(2)]).await,
        h.call("tasks.add", vec![json!(3), json!(3)]).await,
    ];
    for id in &ids {
        assert_eq!(h.result(id).await.status, TaskState::Success);
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );

    // revoke: a queued task is not run; terminate stops a running one.
    let running = h.call("tasks.wait", vec![]).await;
    h.until("it runs", || async {
        answer(&h, "active", json!({}))
            .await
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    let queued = h.call("tasks.add", vec![json!(5), json!(5)]).await;
    let r = answer(&h, "revoke", json!({"task_id": queued})).await;
    assert_eq!(
        r,
        json!({"ok": format!("tasks {{'{queued}'}} flagged as revoked")})
    );
    assert_eq!(answer(&h, "revoked", json!({})).await, json!([queued]));
    let t = answer(
        &h,
        "revoke",
        json!({"task_id": [running], "terminate": true, "signal": "SIGKILL"}),
    );
    assert_eq!(t.await, json!({"ok": format!("terminate: {running}")}));
    let m = h.result(&running).await;
    assert_eq!(m.status, TaskState::Revoked);
    assert_eq!(m.error().unwrap().message(), "terminated");
    let m = h.result(&queued).await;
    assert_eq!(m.status, TaskState::Revoked, "never ran");

    // time_limit, pool size, events, queues.
    let tl = answer(
        &h,
        "time_limit",
        json!({"task_name": "tasks.wait", "hard": 0.3, "soft": null}),
    );
    assert_eq!(tl.await, json!({"ok": "time limits set successfully"}));
    let limited = h.call("tasks.wait", vec![]).await;
    let m = h.result(&limited).await;
    assert_eq!(m.status, TaskState::Failure);
    assert_eq!(m.error().unwrap().exc_type, "TimeLimitExceeded");
    assert_eq!(
        answer(&h, "pool_grow", json!({"n": 2})).await,
        json!({"ok": "pool will grow"})
    );
    assert_eq!(h.pool.size(), 3);
    assert_eq!(
        answer(&h, "pool_shrink", json!({})).await,
        json!({"ok": "pool will shrink"})
    );
    assert_eq!(h.pool.size(), 2);
    assert_eq!(
        answer(&h, "autoscale", json!({"max": 4, "min": 1})).await,
        json!({"error": "ValueError('Autoscale not enabled')"})
    );
    assert_eq!(
        answer(&h, "enable_events", json!({})).await,
        json!({"ok": "task events enabled"})
    );
    assert_eq!(
        answer(&h, "enable_events", json!({})).await,
        json!({"ok": "task events already enabled"})
    );
    assert_eq!(
        answer(&h, "disable_events", json!({})).await,
        json!({"ok": "task events disabled"})
    );

    h.broker.declare("extra").await.unwrap();
    assert_eq!(
        answer(&h, "add_consumer", json!({"queue": "extra"})).await,
        json!({"ok": "add consumer extra"})
    );
    h.until("consuming extra", || async {
        answer(&h, "active_queues", json!({}))
            .await
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let m = message("tasks.add", vec![json!(20), json!(22)]);
    let extra = m.id().to_owned();
    h.broker
        .publish("extra", &m, celeriac_core::PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(h.result(&extra).await.result, json!(42));
    assert_eq!(
        answer(&h, "cancel_consumer", json!({"queue": "extra"})).await,
        json!({"ok": "no longer consuming from extra"})
    );

    // shutdown: no reply, the worker stops.
    assert!(ask(&h, "shutdown", json!({})).await.is_empty());
    let report = h.join().await;
    assert!(report.succeeded >= 4, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_obeys_only_the_commands_it_allows() {
    let gate = Opening::new();
    let allow =
        celeriac_core::broadcast::control::ControlAllow::from_names(["inspect", "revoke"]).unwrap();
    let h = start(
        tasks(&gate),
        options(|o| {
            o.concurrency = 1;
            o.control_allow = allow.clone();
        }),
    );
    h.until("the worker listens", || async {
        !ask(&h, "ping", json!({})).await.is_empty()
    })
    .await;
    assert_eq!(answer(&h, "ping", json!({})).await, json!({"ok": "pong"}));
    assert!(answer(&h, "dump_active", json!({})).await.is_array());
    // Refused: an error reply, and nothing changed.
    let refused = answer(
        &h,
        "rate_limit",
        json!({"task_name": "tasks.add", "rate_limit": "2/s"}),
    )
    .await;
    assert_eq!(
        refused,
        json!({"error": "rate_limit is not allowed on this worker (control_allow)"})
    );
    assert_eq!(answer(&h, "registered", json!({})).await[0], "tasks.add");
    // `shutdown` answers when refused (an obeyed one sends no reply), and the worker stays.
    let refused = answer(&h, "shutdown", json!({})).await;
    assert!(
        refused["error"].as_str().unwrap().contains("not allowed"),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(answer(&h, "ping", json!({})).await, json!({"ok": "pong"}));
    // Allowed by name.
    let revoked = answer(&h, "revoke", json!({"task_id": "some-id"})).await;
    assert!(revoked["ok"].as_str().is_some(), "{revoked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_control_messages_are_dropped_and_the_worker_goes_on() {
    let gate = Opening::new();
    gate.open();
    let h = start(tasks(&gate), options(|_| {}));
    h.until("the worker listens", || async {
        !ask(&h, "ping", json!({})).await.is_empty()
    })
    .await;
    let big = "x".repeat(1 << 20);
    for body in [
        json!("not a request"),
        json!({"arguments": {}}),
        json!({"method": 5}),
        json!({"method": "rate_limit", "arguments": {"task_name": 5, "rate_limit": [1]}}),
        json!({"method": "revoke", "arguments": {"task_id": {"a": 1}}}),
        json!({"method": "ping", "destination": "w1@test"}),
        json!({"method": big}),
    ] {
        channels(&h)
            .send_control(&Broadcasted::new("", Map::new(), body))
            .await
            .unwrap();
    }
    assert_eq!(answer(&h, "ping", json!({})).await, json!({"ok": "pong"}));
    let id = h.call("tasks.add", vec![json!(1), json!(2)]).await;
    assert_eq!(h.result(&id).await.result, json!(3));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_monitors_about_the_worker_and_its_tasks() {
    let gate = Opening::new();
    gate.open();
    let broker = TestBroker::new();
    let b = broker.inner.broadcast().unwrap();
    let mut inbox = b.event_inbox("#").await.unwrap();
    let h = start_on(
        broker,
        tasks(&gate),
        options(|o| {
            o.task_events = true;
            o.heartbeat_interval = Duration::from_millis(200);
        }),
    );
    let id = h.call("tasks.add", vec![json!(2), json!(3)]).await;
    h.result(&id).await;
    let mut seen: Vec<Event> = Vec::new();
    let wanted = [
        EventKind::WorkerOnline,
        EventKind::WorkerHeartbeat,
        EventKind::TaskReceived,
        EventKind::TaskStarted,
        EventKind::TaskSucceeded,
    ];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !wanted.iter().all(|k| seen.iter().any(|e| e.kind() == *k)) {
        let m = tokio::time::timeout_at(deadline, inbox.next())
            .await
            .expect("events in time")
            .unwrap()
            .unwrap();
        assert_eq!(m.headers["hostname"], "w1@test");
        seen.extend(Event::from_message(&m).into_iter().map(Result::unwrap));
    }
    let done = seen
        .iter()
        .find(|e| e.kind() == EventKind::TaskSucceeded)
        .unwrap();
    assert_eq!(done.uuid(), Some(id.as_str()));
    assert_eq!(done.get("result").unwrap(), "5");
    assert!(done.get("runtime").unwrap().is_f64());
    let beat = seen
        .iter()
        .find(|e| e.kind() == EventKind::WorkerHeartbeat)
        .unwrap();
    assert_eq!(beat.get("freq").unwrap(), 0.2);
    assert_eq!(beat.get("sw_ident").unwrap(), "celeriac");
    assert_eq!(beat.get("loadavg").unwrap().as_array().unwrap().len(), 3);
    h.stop().await;
    loop {
        let m = tokio::time::timeout(DEADLINE, inbox.next())
            .await
            .expect("worker-offline in time")
            .unwrap()
            .unwrap();
        if Event::from_message(&m)
            .into_iter()
            .any(|e| e.is_ok_and(|e| e.kind() == EventKind::WorkerOffline))
        {
            break;
        }
    }
}

/// A signer whose "signature" is its name and whose packing is Celery's: enough to drive the
/// worker's policy (RSA-PSS signing is tested in celeriac-core, and against Celery's own
/// `setup_security()` in celeriac-e2e).
#[derive(Debug)]
struct Named(&'static str);

impl celeriac_core::security::BodySigner for Named {
    fn sign_body(&self, ct: &str, ce: &str, body: &[u8]) -> celeriac_core::Result<Vec<u8>> {
        Ok(celeriac_core::security::pack(&Packed {
            signer: self.0.into(),
            signature: self.0.as_bytes().to_vec(),
            content_type: ct.into(),
            content_encoding: ce.into(),
            body: body.to_vec(),
        }))
    }
    fn verify_body(&self, signed: &[u8]) -> celeriac_core::Result<Packed> {
        let p = celeriac_core::security::unpack(signed)?;
        if p.signature != self.0.as_bytes() {
            return Err(celeriac_core::Error::new(
                celeriac_core::ErrorKind::Security,
                format!("signed by {:?}, not trusted", p.signer),
            ));
        }
        Ok(p)
    }
}

/// `ask`, with requests signed by `signer` and only replies it verifies read.
async fn ask_signed(h: &Harness, signer: &'static str, method: &str) -> Vec<Reply> {
    let channels = Signed::new(channels(h), Some(Arc::new(Named(signer))));
    collect(
        &channels,
        &Clock::new(),
        Request::new(method, Map::new()),
        Duration::from_secs(2),
        Some(1),
    )
    .await
    .unwrap()
}

/// Under `auth` only requests signed by a trusted key are obeyed, replies go out signed, and
/// `control_allow` still limits what signed requests may do.
/// See: issue 26
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_auth_only_signed_control_is_obeyed_and_replies_are_signed() {
    let gate = Opening::new();
    gate.open();
    let h = start(
        tasks(&gate),
        options(|o| {
            o.content_type = celeriac_core::ContentType::Auth;
            o.signer = Some(Arc::new(Named("ops")));
            o.control_allow =
                celeriac_core::broadcast::control::ControlAllow::from_names(["inspect"]).unwrap();
        }),
    );
    h.until("the worker answers a signed ping", || async {
        !ask_signed(&h, "ops", "ping").await.is_empty()
    })
    .await;
    let pong = ask_signed(&h, "ops", "ping").await;
    assert_eq!(pong[0].answer, json!({"ok": "pong"}));

    // Unsigned, or signed by a key the worker does not trust: no answer at all.
    assert!(ask(&h, "ping", json!({})).await.is_empty());
    assert!(ask_signed(&h, "mallory", "ping").await.is_empty());

    // The reply on the wire is signed: a reader without the key sees application/data text.
    let b = channels(&h);
    let (key, mut raw) = b.reply_inbox().await.unwrap();
    let signer = Named("ops");
    let request = Request {
        reply_to: Some(celeriac_core::broadcast::control::ReplyTo {
            exchange: celeriac_core::broadcast::REPLY_EXCHANGE.into(),
            routing_key: key,
        }),
        ticket: Some("t-1".into()),
        ..Request::new("ping", Map::new())
    };
    Signed::new(b, Some(Arc::new(signer)))
        .send_control(&request.to_message(1, None))
        .await
        .unwrap();
    let reply = tokio::time::timeout(DEADLINE, raw.next())
        .await
        .expect("a reply in time")
        .unwrap()
        .unwrap();
    assert!(reply.signed, "{reply:?}");
    let text = reply.body.as_str().unwrap();
    let packed = celeriac_core::security::unpack(text.as_bytes()).unwrap();
    assert_eq!(packed.signer, "ops");
    let inner: Value = serde_json::from_slice(&packed.body).unwrap();
    assert_eq!(inner["w1@test"], json!({"ok": "pong"}));

    // control_allow still applies to signed requests.
    let refused = ask_signed(&h, "ops", "shutdown").await;
    assert!(
        refused[0].answer["error"]
            .as_str()
            .unwrap()
            .contains("not allowed"),
        "{refused:?}"
    );
}
