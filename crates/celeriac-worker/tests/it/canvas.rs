//! Tests for canvas in the worker: callbacks, errbacks, chains and chords carried in `embed`.

use celeriac_core::canvas::{Sender, build_message};
use celeriac_core::{
    ContentType, Message, ResultBackend, Signature, TaskError, TaskOptions, TaskState,
};
use serde_json::{Value, json};

use crate::support::*;

fn tasks() -> Vec<celeriac_core::TaskDef> {
    vec![
        blocking("tasks.add", |_, mut a| {
            let x: i64 = a.take(0, "x")?;
            let y: i64 = a.take(1, "y")?;
            Ok(json!(x + y))
        }),
        blocking("tasks.tsum", |_, mut a| {
            let v: Vec<i64> = a.take(0, "numbers")?;
            Ok(json!(v.iter().sum::<i64>()))
        }),
        blocking("tasks.echo", |_, mut a| {
            let v: Value = a.take(0, "v")?;
            Ok(v)
        }),
        blocking("tasks.fail", |_, _| {
            Err(TaskError::new("ValueError", "boom"))
        }),
    ]
}

fn sig(task: &str, args: Vec<Value>, id: Option<&str>) -> Signature {
    let mut s = Signature::new(task, args);
    if let Some(id) = id {
        s.options.insert("task_id".into(), json!(id));
    }
    s
}

fn build(s: &Signature, chain: Option<Vec<Signature>>) -> Message {
    build_message(
        s,
        &TaskOptions::default(),
        chain,
        &Sender::new(ContentType::Json, None),
    )
    .expect("message")
    .message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_passes_each_result_on() {
    let h = start(tasks(), options(|_| {}));
    // add(1, 1) | add(10) | add(100): the rest of the chain is reversed.
    let rest = vec![
        sig("tasks.add", vec![json!(100)], Some("c-3")),
        sig("tasks.add", vec![json!(10)], Some("c-2")),
    ];
    let first = h
        .send(build(
            &sig("tasks.add", vec![json!(1), json!(1)], None),
            Some(rest),
        ))
        .await;
    let last = h.result("c-3").await;
    assert_eq!(last.result, json!(112));
    assert_eq!(last.parent_id.as_deref(), Some("c-2"));
    let middle = h.result("c-2").await;
    assert_eq!(middle.result, json!(12));
    assert_eq!(middle.parent_id.as_deref(), Some(first.as_str()));
    h.stop().await;
}

/// Results of what a task sends go where its own result goes (rpc://): each step the worker
/// sends carries the first message's `reply_to`, and each record names it, without any
/// per-process memory in the driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_steps_and_their_records_carry_the_clients_reply_queue() {
    let h = start(tasks(), options(|_| {}));
    let rest = vec![
        sig("tasks.add", vec![json!(100)], Some("q-3")),
        sig("tasks.fail", vec![], Some("q-2")),
    ];
    let mut first = build(
        &sig("tasks.add", vec![json!(1), json!(1)], None),
        Some(rest),
    );
    first.properties.reply_to = Some("client-queue".into());
    let first = h.send(first).await;
    let failed = h.result("q-2").await;
    assert_eq!(failed.status, TaskState::Failure);
    let unrun = h.result("q-3").await;
    assert_eq!(unrun.status, TaskState::Failure, "failed with its chain");
    for m in [h.result(&first).await, failed, unrun] {
        assert_eq!(m.reply_to.as_deref(), Some("client-queue"), "{}", m.task_id);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chain_fails_the_rest_and_runs_errbacks() {
    let h = start(tasks(), options(|_| {}));
    let mut errback = sig("tasks.echo", vec![], Some("eb-1"));
    errback.options.insert("queue".into(), json!(QUEUE));
    let mut failing = sig("tasks.fail", vec![], None);
    failing.options.insert(
        "link_error".into(),
        json!([serde_json::to_value(&errback).unwrap()]),
    );
    let rest = vec![
        sig("tasks.add", vec![json!(1)], Some("r-2")),
        sig("tasks.add", vec![json!(1)], Some("r-1")),
    ];
    let first = h.send(build(&failing, Some(rest))).await;
    for id in ["r-1", "r-2"] {
        let m = h.result(id).await;
        assert_eq!(m.status, TaskState::Failure, "{id}");
        assert_eq!(m.error().unwrap().summary(), "ValueError: boom");
    }
    // The errback got the failed task's id.
    assert_eq!(h.result("eb-1").await.result, json!(first));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_get_the_result_unless_immutable() {
    let h = start(tasks(), options(|_| {}));
    let mut imm = sig("tasks.echo", vec![json!("fixed")], Some("cb-2"));
    imm.immutable = true;
    let mut s = sig("tasks.add", vec![json!(2), json!(3)], Some("p"));
    s.options.insert(
        "link".into(),
        json!([
            serde_json::to_value(sig("tasks.echo", vec![], Some("cb-1"))).unwrap(),
            serde_json::to_value(&imm).unwrap()
        ]),
    );
    h.send(build(&s, None)).await;
    let cb = h.result("cb-1").await;
    assert_eq!(cb.result, json!(5));
    assert_eq!(cb.parent_id.as_deref(), Some("p"));
    assert_eq!(h.result("cb-2").await.result, json!("fixed"));
    h.stop().await;
}

fn chord_messages(gid: &str, header: &[(&str, Signature)], body: &Signature) -> Vec<Message> {
    let mut body = body.clone();
    body.options.insert("group_id".into(), json!(gid));
    header
        .iter()
        .enumerate()
        .map(|(i, (id, s))| {
            let mut s = s.clone();
            s.options.insert("task_id".into(), json!(id));
            s.options.insert("group_id".into(), json!(gid));
            s.options.insert("group_index".into(), json!(i));
            s.options
                .insert("chord".into(), serde_json::to_value(&body).unwrap());
            build(&s, None)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_body_gets_ordered_results_once() {
    let h = start(tasks(), options(|o| o.concurrency = 4));
    let header: Vec<(String, Signature)> = (0..6)
        .map(|i| {
            (
                format!("h-{i}"),
                sig("tasks.add", vec![json!(i), json!(0)], None),
            )
        })
        .collect();
    let header_refs: Vec<(&str, Signature)> = header
        .iter()
        .map(|(i, s)| (i.as_str(), s.clone()))
        .collect();
    let ids: Vec<String> = header.iter().map(|(i, _)| i.clone()).collect();
    h.backend.save_group("g-1", &ids).await.unwrap();
    let body = sig("tasks.echo", vec![], Some("body-1"));
    for m in chord_messages("g-1", &header_refs, &body) {
        h.send(m).await;
    }
    let b = h.result("body-1").await;
    assert_eq!(b.result, json!([0, 1, 2, 3, 4, 5]));
    assert_eq!(b.group_id.as_deref(), Some("g-1"));
    // A redelivered header part (same message again) neither fires the body again nor fails.
    for m in chord_messages("g-1", &header_refs[..1], &body) {
        h.send(m).await;
    }
    let report = h.stop().await;
    assert_eq!(report.succeeded, 7, "six parts and one body: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_with_a_failed_member_fails_its_body() {
    let h = start(tasks(), options(|_| {}));
    let mut body = sig("tasks.tsum", vec![], Some("body-2"));
    let errback = sig("tasks.echo", vec![], Some("eb-2"));
    body.options.insert(
        "link_error".into(),
        json!([serde_json::to_value(&errback).unwrap()]),
    );
    let header = [
        ("f-0", sig("tasks.add", vec![json!(1), json!(1)], None)),
        ("f-1", sig("tasks.fail", vec![], None)),
    ];
    h.backend
        .save_group("g-2", &["f-0".to_owned(), "f-1".to_owned()])
        .await
        .unwrap();
    for m in chord_messages("g-2", &header, &body) {
        h.send(m).await;
    }
    let b = h.result("body-2").await;
    assert_eq!(b.status, TaskState::Failure);
    let e = b.error().unwrap();
    assert_eq!(e.exc_type, "ChordError");
    assert_eq!(e.message(), "Dependency f-1 raised ValueError: boom");
    assert_eq!(h.result("eb-2").await.result, json!("body-2"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_callback_fails_with_not_registered() {
    let h = start(tasks(), options(|_| {}));
    let mut s = sig("tasks.add", vec![json!(2), json!(3)], None);
    s.options.insert(
        "link".into(),
        serde_json::to_value(sig("tasks.nope", vec![], Some("cb-x"))).unwrap(),
    );
    h.send(build(&s, None)).await;
    let m = h.result("cb-x").await;
    assert_eq!(m.status, TaskState::Failure);
    assert_eq!(m.error().unwrap().exc_type, "NotRegistered");
    h.stop().await;
}

/// A worker that stored a header result and died before counting it: the redelivered message
/// finds the result ready, is not run again, and still counts, so the body fires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_stored_but_not_counted_still_completes_the_chord() {
    let h = start(tasks(), options(|_| {}));
    let header = [
        ("s-0", sig("tasks.add", vec![json!(1), json!(1)], None)),
        ("s-1", sig("tasks.add", vec![json!(2), json!(2)], None)),
    ];
    h.backend
        .save_group("g-3", &["s-0".to_owned(), "s-1".to_owned()])
        .await
        .unwrap();
    h.backend
        .store(&celeriac_core::TaskMeta::success("s-0", json!(2)))
        .await
        .unwrap();
    let body = sig("tasks.echo", vec![], Some("body-3"));
    for m in chord_messages("g-3", &header, &body) {
        h.send(m).await;
    }
    assert_eq!(h.result("body-3").await.result, json!([2, 4]));
    let report = h.stop().await;
    assert_eq!(report.succeeded, 2, "one part and the body: {report:?}");
}

/// Python sends nested canvas as composite maps (§3.6): a group as a callback or as the last
/// chain step runs each member with the parent's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_chain_maps_as_callbacks_expand() {
    let h = start(tasks(), options(|_| {}));
    let group: Signature = serde_json::from_value(json!({
        "task": "celery.group", "subtask_type": "group", "args": [], "kwargs": {"tasks": [
            {"task": "tasks.add", "args": [1], "options": {"task_id": "m-0"}},
            {"task": "tasks.add", "args": [2], "options": {"task_id": "m-1"}}
        ]}, "options": {"task_id": "mg"}, "immutable": false
    }))
    .unwrap();
    let chain: Signature = serde_json::from_value(json!({
        "task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [
            {"task": "tasks.add", "args": [10], "options": {"task_id": "n-0"}},
            {"task": "tasks.add", "args": [100], "options": {"task_id": "n-1"}}
        ]}
    }))
    .unwrap();
    let mut s = sig("tasks.add", vec![json!(2), json!(3)], None);
    s.options
        .insert("link".into(), serde_json::to_value(&chain).unwrap());
    h.send(build(&s, Some(vec![group]))).await;
    assert_eq!(h.result("m-0").await.result, json!(6));
    let m1 = h.result("m-1").await;
    assert_eq!(m1.result, json!(7));
    assert_eq!(m1.group_id.as_deref(), Some("mg"));
    assert_eq!(h.result("n-1").await.result, json!(115));
    h.stop().await;
}

/// `celery.chord_unlock` as a Celery client sends it on a result backend without a chord
/// protocol (Celery's `db+` tables): the header tasks carry the chord but no group is saved;
/// the unlock task retries until every member is ready, then sends the body once with the
/// results in header order.
fn chord_unlock(gid: &str, body: &Signature, members: &[&str]) -> Message {
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("interval".into(), json!(0.05));
    kwargs.insert("max_retries".into(), Value::Null);
    let tuples: Vec<Value> = members.iter().map(|id| json!([[id, null], null])).collect();
    kwargs.insert("result".into(), json!(tuples));
    kwargs.insert("_chord_unlock_exchange_type".into(), json!("direct"));
    Message::new(
        celeriac_core::Headers::new("celery.chord_unlock", celeriac_core::protocol::new_id()),
        &celeriac_core::Body::new(
            vec![json!(gid), serde_json::to_value(body).unwrap()],
            kwargs,
        ),
        ContentType::Json,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_chord_unlock_joins_a_chord_without_a_saved_group() {
    let h = start(tasks(), options(|_| {}));
    let body = sig("tasks.tsum", vec![], Some("u-body"));
    let header = [
        ("u-0", sig("tasks.add", vec![json!(1), json!(1)], None)),
        ("u-1", sig("tasks.add", vec![json!(2), json!(2)], None)),
    ];
    // The unlock first: it must wait for the header, retrying.
    h.send(chord_unlock("g-u", &body, &["u-0", "u-1"])).await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert!(
        h.stored("u-body").await.is_none(),
        "the body waits for the header"
    );
    for m in chord_messages("g-u", &header, &body) {
        h.send(m).await;
    }
    assert_eq!(h.result("u-body").await.result, json!(6));
    // Sent once: a second unlock of the same group (a redelivery) does nothing.
    h.send(chord_unlock("g-u", &body, &["u-0", "u-1"])).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let report = h.stop().await;
    // Two header tasks, the body, two unlocks (the first after its retries): a second body
    // message would have been skipped (its id has a result).
    assert_eq!(report.skipped, 0, "{report:?}");
    assert_eq!(report.succeeded, 5, "{report:?}");
    assert!(report.retried >= 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_chord_unlock_fails_the_body_when_a_member_failed() {
    let h = start(tasks(), options(|_| {}));
    let body = sig("tasks.tsum", vec![], Some("uf-body"));
    let header = [
        ("uf-0", sig("tasks.add", vec![json!(1), json!(1)], None)),
        ("uf-1", sig("tasks.fail", vec![], None)),
    ];
    for m in chord_messages("g-uf", &header, &body) {
        h.send(m).await;
    }
    h.send(chord_unlock("g-uf", &body, &["uf-0", "uf-1"])).await;
    let b = h.result("uf-body").await;
    assert_eq!(b.status, TaskState::Failure);
    let e = b.error().unwrap();
    assert_eq!(e.exc_type, "ChordError");
    assert_eq!(e.message(), "Dependency uf-1 raised ValueError: boom");
    h.stop().await;
}
