//! Canvas over SQLite with worker processes: chains, links, groups, chords (one across a
//! worker killed mid-chord), chunks.

use std::time::Duration;

use celeriac::canvas::{chain, chord, chunks, group, map};
use celeriac::{ErrorKind, Signature, TaskState};
use celeriac_examples::{add, fail, hold, tsum};
use serde_json::{Value, json};

use crate::support::{T, WorkerProcess, client, sqlite_url};

fn partial<O>(task: &str) -> Signature<O> {
    Signature::new(task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_pass_results_and_links_run() {
    let (url, _db) = sqlite_url("canvas-chain");
    let app = client(&url).await;
    let _w = WorkerProcess::start(&url, &["-c", "4"]);

    // add(1, 1) | add(10) | mul(2)
    let r = celeriac::chain![
        add::s(1, 1),
        partial::<i64>("tasks.add").arg(10),
        partial::<i64>("tasks.mul").arg(2)
    ]
    .apply_async(&app)
    .await
    .unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 24);
    let meta = r.meta().await.unwrap();
    assert!(meta.parent_id.is_some(), "{meta:?}");

    let cb = partial::<Value>("tasks.echo").task_id(celeriac::core::protocol::new_id());
    let eb = partial::<Value>("tasks.echo").task_id(celeriac::core::protocol::new_id());
    let ok = add::s(20, 22).link(&cb).apply_async(&app).await.unwrap();
    let bad = fail::s("no".into())
        .link_error(&eb)
        .apply_async(&app)
        .await
        .unwrap();
    let got: Value = app
        .result(cb.options().task_id.clone().unwrap())
        .get_timeout(T)
        .await
        .unwrap();
    assert_eq!(got, json!(42));
    let got: Value = app
        .result(eb.options().task_id.clone().unwrap())
        .get_timeout(T)
        .await
        .unwrap();
    assert_eq!(got, json!(bad.id()));
    assert_eq!(ok.get_timeout(T).await.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chain_fails_the_rest_and_runs_errbacks() {
    let (url, _db) = sqlite_url("canvas-chain-fail");
    let app = client(&url).await;
    let _w = WorkerProcess::start(&url, &["-c", "2"]);
    let eb = partial::<Value>("tasks.echo").task_id(celeriac::core::protocol::new_id());
    let last = chain([
        add::s(1, 1).untyped(),
        fail::s("broken".into()).immutable().untyped(),
        partial::<Value>("tasks.add").arg(1),
    ])
    .link_error(&eb)
    .apply_async(&app)
    .await
    .unwrap();
    let e = last.get_timeout(T).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TaskFailed);
    assert_eq!(e.remote().unwrap().summary(), "ValueError: broken");
    let failed: Value = app
        .result(eb.options().task_id.clone().unwrap())
        .get_timeout(T)
        .await
        .unwrap();
    assert!(failed.is_string(), "{failed}");
    // An unknown task in a chain fails at run time with NotRegistered.
    let last = chain([add::s(1, 1).untyped(), partial::<Value>("tasks.missing")])
        .apply_async(&app)
        .await
        .unwrap();
    let e = last.get_timeout(T).await.unwrap_err();
    assert_eq!(e.remote().unwrap().exc_type, "NotRegistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_chords_complete_in_order() {
    let (url, _db) = sqlite_url("canvas-chord");
    let app = client(&url).await;
    let _w = WorkerProcess::start(&url, &["-c", "4"]);

    let g = group((0..10).map(|i| add::s(i, 1)))
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), (1..=10).collect::<Vec<_>>());
    g.save().await.unwrap();
    let back = celeriac::GroupResult::<i64>::restore(&app, g.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.completed_count().await.unwrap(), 10);

    let c = chord(
        group((1..=20).map(|i| add::s(i, 0))),
        partial::<i64>("tasks.tsum"),
    )
    .apply_async(&app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 210);

    let c = chord(
        group([add::s(1, 1).untyped(), fail::s("header".into()).untyped()]),
        tsum::s(vec![]),
    )
    .apply_async(&app)
    .await
    .unwrap();
    let e = c.get_timeout(T).await.unwrap_err();
    let remote = e.remote().unwrap();
    assert_eq!(remote.exc_type, "ChordError");
    assert!(
        remote.message().ends_with("raised ValueError: header"),
        "{remote}"
    );
    assert_eq!(c.body().state().await.unwrap(), TaskState::Failure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_and_chunks_report_progress() {
    let (url, _db) = sqlite_url("canvas-chunks");
    let app = client(&url).await;
    let _w = WorkerProcess::start(&url, &["-c", "2"]);
    let g = map(&partial::<i64>("tasks.add").arg(5), 0..6)
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), vec![5, 6, 7, 8, 9, 10]);
    let g = chunks(
        &partial::<i64>("tasks.mul"),
        (1..=7).map(|i| vec![json!(i), json!(i)]),
        3,
    )
    .apply_async(&app)
    .await
    .unwrap();
    assert_eq!(
        g.join(Some(T)).await.unwrap(),
        vec![vec![1, 4, 9], vec![16, 25, 36], vec![49]]
    );
    let p = g.progress().await.unwrap();
    assert_eq!((p.succeeded, p.total), (3, 3));
}

/// See: issue 7, "chord across a worker crash".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_survives_a_worker_killed_mid_chord() {
    const N: i64 = 12;
    let (url, db) = sqlite_url("canvas-chord-crash");
    let journal = format!("{}.journal", db.display());
    let config = format!("{}.toml", db.display());
    // A short lease, so what the killed worker held comes back within seconds.
    std::fs::write(&config, "visibility_timeout = 2.0\n").unwrap();
    let app = client(&url).await;
    let mut doomed = WorkerProcess::start_with_config(&url, &config, &["-c", "4"]);
    let _survivor = WorkerProcess::start_with_config(&url, &config, &["-c", "4"]);

    let header = group((0..N).map(|i| hold::s(json!(i), 1.0)));
    let body = partial::<Value>("tasks.record").arg(&journal);
    let c = chord(header, body).apply_async(&app).await.unwrap();
    doomed.wait_for_log("tasks.hold", T).await;
    doomed.signal("KILL");
    doomed.wait(T).await;

    let got = c.get_timeout(Duration::from_secs(60)).await.unwrap();
    assert_eq!(got, json!((0..N).collect::<Vec<_>>()));
    // Every part is ready; give a redelivered duplicate a lease period to fire a second body.
    assert!(c.header().ready().await.unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "the body ran {} times: {lines:?}",
        lines.len()
    );
}
