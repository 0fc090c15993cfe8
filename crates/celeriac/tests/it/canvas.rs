//! Canvas through the facade on the in-memory drivers, with a worker in the process.

use std::time::Duration;

use celeriac::canvas::{chain, chord, chunks, group, map, starmap};
use celeriac::{App, ErrorKind, GroupResult, Signature, TaskError, TaskState};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

#[celeriac::task(name = "tasks.add")]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[celeriac::task(name = "tasks.double")]
async fn double(x: i64) -> i64 {
    2 * x
}

#[celeriac::task(name = "tasks.tsum")]
fn tsum(numbers: Vec<i64>) -> i64 {
    numbers.iter().sum()
}

#[celeriac::task(name = "tasks.echo")]
async fn echo(value: Value) -> Value {
    value
}

#[celeriac::task(name = "tasks.boom")]
async fn boom() -> Result<i64, TaskError> {
    Err(TaskError::new("ValueError", "boom"))
}

fn partial(task: &str) -> Signature<i64> {
    Signature::new(task)
}

struct Running {
    app: App,
    stop: celeriac::worker::ShutdownHandle,
    join: tokio::task::JoinHandle<celeriac::Result<celeriac::worker::WorkerReport>>,
}

impl Running {
    async fn stop(self) {
        self.stop.warm();
        self.join.await.expect("join").expect("worker");
    }
}

async fn running() -> Running {
    let app = App::builder()
        .broker_url("memory://")
        .result_backend("memory://")
        .task::<add>()
        .task::<double>()
        .task::<tsum>()
        .task::<echo>()
        .task::<boom>()
        .build()
        .await
        .expect("app");
    let mut o = app.worker_options();
    o.concurrency = 4;
    let worker = app.worker(o);
    let stop = worker.shutdown_handle();
    let join = tokio::spawn(worker.run());
    Running { app, stop, join }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_chain_passes_results_and_links_run() {
    let r = running().await;
    let app = &r.app;
    let out = celeriac::chain![
        add::s(1, 2),
        partial("tasks.double"),
        partial("tasks.double")
    ]
    .apply_async(app)
    .await
    .unwrap();
    let v: i64 = out.get_timeout(T).await.unwrap();
    assert_eq!(v, 12);

    let cb = Signature::<Value>::new("tasks.echo").task_id("cb-1");
    let fixed = echo::s(json!("fixed")).immutable().task_id("cb-2");
    add::s(20, 22)
        .link(&cb)
        .link(&fixed)
        .apply_async(app)
        .await
        .unwrap();
    let got: Value = app.result("cb-1").get_timeout(T).await.unwrap();
    assert_eq!(got, json!(42));
    let got: Value = app.result("cb-2").get_timeout(T).await.unwrap();
    assert_eq!(got, json!("fixed"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chain_stops_and_runs_its_errback_once() {
    let r = running().await;
    let app = &r.app;
    let eb = Signature::<Value>::new("tasks.echo").task_id("eb-1");
    let last = chain([
        add::s(1, 1).untyped(),
        boom::s().immutable().untyped(),
        partial("tasks.double").untyped(),
    ])
    .link_error(&eb)
    .apply_async(app)
    .await
    .unwrap();
    let err = last.get_timeout(T).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    assert_eq!(err.remote().unwrap().summary(), "ValueError: boom");
    let failed_id: Value = app.result("eb-1").get_timeout(T).await.unwrap();
    assert!(failed_id.is_string());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_join_in_order_and_save_restore() {
    let r = running().await;
    let app = &r.app;
    let g = group((0..8).map(|i| add::s(i, 100)))
        .apply_async(app)
        .await
        .unwrap();
    let got = g.join(Some(T)).await.unwrap();
    assert_eq!(got, (100..108).collect::<Vec<_>>());
    let p = g.progress().await.unwrap();
    assert_eq!((p.succeeded, p.failed, p.total), (8, 0, 8));
    assert_eq!(g.completed_count().await.unwrap(), 8);
    assert!(g.ready().await.unwrap());
    g.save().await.unwrap();
    let back = GroupResult::<i64>::restore(app, g.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.join(Some(T)).await.unwrap(), got);
    assert!(
        GroupResult::<i64>::restore(app, "nope")
            .await
            .unwrap()
            .is_none()
    );

    // A failed member fails join; states show which.
    let g = group([echo::s(json!(1)).untyped(), boom::s().untyped()])
        .apply_async(app)
        .await
        .unwrap();
    assert!(g.join(Some(T)).await.is_err());
    assert_eq!(
        g.states().await.unwrap(),
        vec![TaskState::Success, TaskState::Failure]
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_group_revokes_every_member() {
    let app = App::builder()
        .broker_url("memory://")
        .task::<add>()
        .build()
        .await
        .unwrap();
    let g = group((0..3).map(|i| add::s(i, i)))
        .apply_async(&app)
        .await
        .unwrap();
    g.revoke().await.unwrap();
    assert_eq!(g.states().await.unwrap(), vec![TaskState::Revoked; 3]);
    let e = g.join(Some(Duration::from_millis(50))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TaskFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_body_gets_the_ordered_results() {
    let r = running().await;
    let app = &r.app;
    let c = chord(
        group((1..=10).map(|i| add::s(i, 0))),
        Signature::<i64>::new("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 55);
    assert_eq!(c.header().join(Some(T)).await.unwrap().len(), 10);

    let echo_body = chord(
        group((0..5).map(double::s)),
        Signature::<Value>::new("tasks.echo"),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(
        echo_body.get_timeout(T).await.unwrap(),
        json!([0, 2, 4, 6, 8])
    );

    let empty = chord(
        group(Vec::<Signature<i64>>::new()),
        Signature::<i64>::new("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(empty.get_timeout(T).await.unwrap(), 0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_with_a_failed_member_fails_the_body() {
    let r = running().await;
    let app = &r.app;
    let eb = Signature::<Value>::new("tasks.echo").task_id("chord-eb");
    let body = Signature::<i64>::new("tasks.tsum").link_error(&eb);
    let c = chord(group([add::s(1, 1).untyped(), boom::s().untyped()]), body)
        .apply_async(app)
        .await
        .unwrap();
    let e = c.get_timeout(T).await.unwrap_err();
    let remote = e.remote().unwrap();
    assert_eq!(remote.exc_type, "ChordError");
    let failed = c.header().results()[1].id().to_owned();
    assert_eq!(
        remote.message(),
        format!("Dependency {failed} raised ValueError: boom")
    );
    let got: Value = app.result("chord-eb").get_timeout(T).await.unwrap();
    assert_eq!(got, json!(c.body().id()));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_starmap_and_chunks_fan_out_with_progress() {
    let r = running().await;
    let app = &r.app;
    let g = map(&partial("tasks.double"), [1, 2, 3])
        .apply_async(app)
        .await
        .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), vec![2, 4, 6]);

    let g = starmap(
        &partial("tasks.add"),
        (0..4).map(|i| vec![json!(i), json!(i)]),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), vec![0, 2, 4, 6]);

    let g = chunks(
        &partial("tasks.add"),
        (0..10).map(|i| vec![json!(i), json!(1)]),
        3,
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(g.len(), 4);
    let got = g.join(Some(T)).await.unwrap();
    assert_eq!(
        got,
        vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
    );
    assert_eq!(g.progress().await.unwrap().done(), 4);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_task_in_a_chain_fails_with_not_registered() {
    let r = running().await;
    let app = &r.app;
    let last = chain([
        add::s(1, 1).untyped(),
        Signature::<Value>::new("tasks.missing"),
    ])
    .apply_async(app)
    .await
    .unwrap();
    let e = last.get_timeout(T).await.unwrap_err();
    assert_eq!(e.remote().unwrap().exc_type, "NotRegistered");
    assert_eq!(e.remote().unwrap().message(), "tasks.missing");
    r.stop().await;
}

#[test]
fn canvas_handles_are_send_and_sync() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<celeriac::Chain<i64>>();
    is_send_sync::<celeriac::Group<i64>>();
    is_send_sync::<celeriac::Chord<i64>>();
    is_send_sync::<GroupResult<i64>>();
    is_send_sync::<celeriac::ChordResult<i64>>();
}
