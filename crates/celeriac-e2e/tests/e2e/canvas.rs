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

// ===== dataflow (issue 7, the Emit use case) =====

/// A document whose word counts are known: word `wN` appears N times (N = 1..=12), in an
/// interleaved order, with punctuation and capitals the splitting node removes.
fn document() -> (String, std::collections::BTreeMap<String, i64>) {
    let mut words = Vec::new();
    let mut want = std::collections::BTreeMap::new();
    for round in 1..=12 {
        for n in round..=12 {
            words.push(if n % 3 == 0 {
                format!("W{n},")
            } else {
                format!("w{n}")
            });
        }
    }
    for n in 1..=12_i64 {
        want.insert(format!("w{n}"), n);
    }
    (words.join(" "), want)
}

/// See: issue 7, "word-count example": a stream node emits each word to two tally nodes,
/// run by two worker processes; the totals are exact and readable while the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_word_count_flow_counts_exactly_across_worker_processes() {
    let (url, _db) = sqlite_url("flow-wordcount");
    let app = client(&url).await;
    let _w1 = WorkerProcess::start(&url, &["-c", "2"]);
    let _w2 = WorkerProcess::start(&url, &["-c", "2"]);
    let (text, want) = document();
    let total: i64 = want.values().sum();

    let graph = celeriac_examples::word_count_graph().unwrap();
    let run = graph.start(&app, "split", &text).await.unwrap();
    run.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(run.totals("count").await.unwrap(), want);
    // The second subscriber got every word too: all words start with "w".
    let initials = run.totals("initials").await.unwrap();
    assert_eq!(
        initials.into_iter().collect::<Vec<_>>(),
        [("w".to_owned(), total)]
    );
    assert_eq!(
        (run.pending().await.unwrap(), run.failed().await.unwrap()),
        (0, 0)
    );

    // The example binary: progress lines while it runs, then the totals, most frequent first.
    let doc = format!("{}.doc.txt", _db.display());
    std::fs::write(&doc, &text).unwrap();
    let args = [
        "--broker".to_owned(),
        url.clone(),
        "--timeout".into(),
        "60".into(),
        doc,
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_e2e-wordcount"))
            .args(args)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("pending=")), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| *l == format!("pending=0 words=12 counted={total}")),
        "{stdout}"
    );
    let start = lines
        .iter()
        .position(|l| *l == "w12 12")
        .expect("totals printed");
    let expected: Vec<String> = (1..=12).rev().map(|n| format!("w{n} {n}")).collect();
    assert_eq!(lines[start..start + 12], expected);
    assert!(lines[start + 12].ends_with(" done"), "{stdout}");
}

/// See: issue 7, "a cycle in a dataflow graph is refused when the graph is built".
#[test]
fn a_flow_graph_with_a_cycle_is_refused() {
    use celeriac::flow::{Graph, Node};
    let node = |t: &str| Node::new(partial::<Value>(t));
    let e = Graph::builder()
        .node("a", node("tasks.echo"))
        .node("b", node("tasks.echo"))
        .node("c", node("tasks.echo"))
        .subscribe("b", "a")
        .subscribe("c", "b")
        .subscribe("b", "c")
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert_eq!(e.to_string(), "dataflow graph has a cycle: b -> c -> b");
    let e = Graph::builder()
        .node("a", node("tasks.echo"))
        .subscribe("a", "nowhere")
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("\"nowhere\""), "{e}");
    let e = Graph::builder()
        .node("a", node("tasks.echo"))
        .node("a", node("tasks.add"))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("two nodes named \"a\""), "{e}");
}

/// See: issue 7, "a signature naming an unknown task fails ... at send time".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_naming_an_unknown_task_sends_nothing() {
    use celeriac::flow::{Graph, Node};
    let (url, _db) = sqlite_url("flow-unknown");
    let app = client(&url).await;
    let graph = Graph::builder()
        .node(
            "split",
            Node::new(partial::<Vec<String>>("tasks.words")).stream(),
        )
        .node("count", Node::new(partial::<String>("tasks.cuont")).tally())
        .subscribe("count", "split")
        .build()
        .unwrap();
    let e = graph.start(&app, "split", "a b").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownTask);
    assert!(e.to_string().contains("\"tasks.cuont\""), "{e}");
    assert_eq!(app.broker().stats("celery").await.unwrap().ready, 0);
    // Marked external (defined only by the workers), the same graph is sent.
    let graph = Graph::builder()
        .node(
            "split",
            Node::new(partial::<Vec<String>>("tasks.words")).stream(),
        )
        .node(
            "count",
            Node::new(partial::<String>("tasks.cuont"))
                .tally()
                .external(),
        )
        .subscribe("count", "split")
        .build()
        .unwrap();
    graph.start(&app, "split", "a b").await.unwrap();
    assert_eq!(app.broker().stats("celery").await.unwrap().ready, 1);
    // Starting at a node the graph does not have is refused too.
    let e = graph.start(&app, "nope", "a").await.unwrap_err();
    assert!(e.to_string().contains("\"nope\""), "{e}");
}

// ===== nested composites, and the canvas on network brokers =====

/// Nested canvas, each checked by its result: a chord as a chain step, a group followed by
/// steps (a chord, as in Celery), a chain inside a group.
async fn nested_composites(app: &celeriac::App) {
    // add(1, 1) | chord([add(10), add(20)], tsum) | mul(2): 2 -> [12, 22] -> 34 -> 68.
    let step = chord(
        group([
            partial::<i64>("tasks.add").arg(10),
            partial::<i64>("tasks.add").arg(20),
        ]),
        partial::<i64>("tasks.tsum"),
    )
    .into_signature();
    let r = celeriac::chain![add::s(1, 1), step, partial::<i64>("tasks.mul").arg(2)]
        .apply_async(app)
        .await
        .unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 68);

    // group(add(1, 1), add(2, 2), add(3, 3)) | tsum | mul(10): [2, 4, 6] -> 12 -> 120.
    let first = group((1..=3).map(|i| add::s(i, i))).into_signature();
    let r = celeriac::chain![
        first,
        partial::<i64>("tasks.tsum"),
        partial::<i64>("tasks.mul").arg(10)
    ]
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 120);

    // group(add(1, 2) | mul(10), add(3, 4) | mul(10), add(5, 5)): [30, 70, 10].
    let g = group([
        celeriac::chain![add::s(1, 2), partial::<i64>("tasks.mul").arg(10)].into_signature(),
        celeriac::chain![add::s(3, 4), partial::<i64>("tasks.mul").arg(10)].into_signature(),
        add::s(5, 5),
    ])
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), vec![30, 70, 10]);

    // A chord whose body is a chain: tsum([1, 2, 3]) | mul(3) = 18.
    let c = chord(
        group((1..=3).map(|i| add::s(i, 0))),
        celeriac::chain![
            partial::<i64>("tasks.tsum"),
            partial::<i64>("tasks.mul").arg(3)
        ]
        .into_signature(),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 18);

    // Refused before anything is sent: a chain inside a chord header; a chain ending in a
    // bare group.
    let e = chord(
        group([celeriac::chain![add::s(1, 1)].into_signature()]),
        partial::<i64>("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap_err();
    assert!(e.to_string().contains("inside a chord header"), "{e}");
    let e = celeriac::chain![
        add::s(1, 1),
        group([partial::<i64>("tasks.add").arg(1)]).into_signature()
    ]
    .apply_async(app)
    .await
    .unwrap_err();
    assert!(e.to_string().contains("GroupResult"), "{e}");
}

/// See: issue 7, "nested composites".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_composites_run_with_results() {
    let (url, _db) = sqlite_url("canvas-nested");
    let app = client(&url).await;
    let _w = WorkerProcess::start(&url, &["-c", "4"]);
    nested_composites(&app).await;
}

/// Chain, group, chord, map and chunks, the nested composites and a dataflow run, on one app.
async fn canvas_suite(app: &celeriac::App) {
    let r = celeriac::chain![
        add::s(1, 1),
        partial::<i64>("tasks.add").arg(10),
        partial::<i64>("tasks.mul").arg(2)
    ]
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 24);
    let g = group((0..6).map(|i| add::s(i, 1)))
        .apply_async(app)
        .await
        .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), (1..=6).collect::<Vec<_>>());
    let c = chord(
        group((1..=10).map(|i| add::s(i, 0))),
        partial::<i64>("tasks.tsum"),
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(c.get_timeout(T).await.unwrap(), 55);
    let g = map(&partial::<i64>("tasks.add").arg(5), 0..4)
        .apply_async(app)
        .await
        .unwrap();
    assert_eq!(g.join(Some(T)).await.unwrap(), vec![5, 6, 7, 8]);
    let g = chunks(
        &partial::<i64>("tasks.mul"),
        (1..=5).map(|i| vec![json!(i), json!(2)]),
        2,
    )
    .apply_async(app)
    .await
    .unwrap();
    assert_eq!(
        g.join(Some(T)).await.unwrap(),
        vec![vec![2, 4], vec![6, 8], vec![10]]
    );
    nested_composites(app).await;
    // The word-count dataflow: its graph travels in the messages, whatever the broker.
    let (text, want) = document();
    let run = celeriac_examples::word_count_graph()
        .unwrap()
        .start(app, "split", &text)
        .await
        .unwrap();
    run.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(run.totals("count").await.unwrap(), want);
}

/// Runs [`canvas_suite`] against a worker process on `broker` with results in `backend`, on a
/// queue of its own.
async fn on_network(broker: &str, backend: &str) {
    let queue = celeriac_test::services::unique_queue("canvas");
    let mut config = celeriac::Config::default();
    config.default_queue = queue.clone();
    let app = celeriac::App::builder()
        .config(config)
        .broker_url(broker)
        .result_backend(backend)
        .collect_tasks()
        .build()
        .await
        .expect("client app");
    let _w = WorkerProcess::start(
        broker,
        &["-Q", &queue, "-c", "4", "--result-backend", backend],
    );
    canvas_suite(&app).await;
    app.close().await.unwrap();
}

const REDIS: &str = "127.0.0.1:6379";

/// See: issue 7, "canvas on every network broker".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canvas_runs_on_redis() {
    if !celeriac_test::services::require_service("redis", REDIS) {
        return;
    }
    let url = format!("redis://{REDIS}/5");
    on_network(&url, &url).await;
}

/// See: issue 7, "canvas on every network broker" (rpc:// has no groups or chords, so the
/// results live in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canvas_runs_on_rabbitmq_with_redis_results() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672")
        || !celeriac_test::services::require_service("redis", REDIS)
    {
        return;
    }
    on_network(
        "amqp://guest:guest@127.0.0.1:5672//",
        &format!("redis://{REDIS}/5"),
    )
    .await;
}

/// Runs the example binary `tasks` with `args` on `url`; returns (exit code, stdout, stderr).
async fn tasks_cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--broker".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_e2e-tasks"))
            .args(all)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// See: issue 7, "the CLI shows a progress bar when it waits on a group or chord".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_on_a_group_with_a_progress_bar() {
    let (url, _db) = sqlite_url("canvas-cli-progress");
    let app = client(&url).await;
    // Sent before any worker runs, so the wait below sees the members finish one by one.
    let g = group((0..6).map(|i| hold::s(json!(i), 0.2)))
        .apply_async(&app)
        .await
        .unwrap();
    let (code, out, _) = tasks_cli(&url, &["result", g.id()]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.ends_with(&format!(
            "group {}: 0 succeeded, 0 failed, 6 pending, of 6\n",
            g.id()
        )),
        "{out}"
    );

    let _w = WorkerProcess::start(&url, &["-c", "2"]);
    let (code, out, err) = tasks_cli(&url, &["result", g.id(), "--wait", "--timeout", "60"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    // Not a terminal: plain lines, the count only going up, ending complete.
    let counts: Vec<usize> = err
        .lines()
        .filter_map(|l| l.strip_prefix("progress: ")?.split_once("] "))
        .map(|(_, count)| count.split('/').next().unwrap().parse().unwrap())
        .collect();
    assert!(!counts.is_empty(), "{err}");
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{err}");
    assert_eq!(counts.last(), Some(&6), "{err}");
    assert!(!err.contains('\r'), "{err:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    for (line, r) in lines.iter().zip(g.results()) {
        assert_eq!(*line, format!("{} SUCCESS", r.id()));
    }
    assert_eq!(
        lines[6],
        format!("group {}: 6 succeeded, 0 failed, 0 pending, of 6", g.id())
    );

    // A chord's header is a group too; a failed member makes the exit code 2.
    let c = chord(
        group([add::s(1, 1).untyped(), fail::s("header".into()).untyped()]),
        tsum::s(vec![]),
    )
    .apply_async(&app)
    .await
    .unwrap();
    let (code, out, err) = tasks_cli(
        &url,
        &["result", c.header().id(), "--wait", "--timeout", "60"],
    )
    .await;
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("progress: [####################] 2/2 (1 failed)"),
        "{err}"
    );
    assert!(
        out.contains(" 1 succeeded, 1 failed, 0 pending, of 2"),
        "{out}"
    );
}

/// See: issue 7, "bad input": a stream node that returns no list and a tally node whose output
/// is not keys each count as a failed message of the run, route nothing, and the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_outputs_fail_their_message_and_the_run_ends() {
    use celeriac::flow::{Graph, Node};
    let (url, _db) = sqlite_url("flow-bad-output");
    let app = client(&url).await;
    let w = WorkerProcess::start(&url, &["-c", "2"]);
    let echo = || Node::new(partial::<Value>("tasks.echo"));

    let graph = Graph::builder()
        .node("src", echo().stream())
        .node("sink", echo().tally())
        .subscribe("sink", "src")
        .build()
        .unwrap();
    let run = graph.start(&app, "src", 5).await.unwrap();
    run.wait(T).await.unwrap();
    assert_eq!(
        (run.failed().await.unwrap(), run.pending().await.unwrap()),
        (1, 0)
    );
    assert!(run.totals("sink").await.unwrap().is_empty());

    let graph = Graph::builder()
        .node("src", echo())
        .node("sink", echo().tally())
        .subscribe("sink", "src")
        .build()
        .unwrap();
    let run = graph.start(&app, "src", json!([1, 2])).await.unwrap();
    run.wait(T).await.unwrap();
    assert_eq!(
        (run.failed().await.unwrap(), run.pending().await.unwrap()),
        (1, 0)
    );
    assert!(run.totals("sink").await.unwrap().is_empty());
    let log = w.log();
    assert!(
        log.contains("is a stream and must return a list, not 5"),
        "{log}"
    );
    assert!(
        log.contains("tally node \"sink\" must return a key"),
        "{log}"
    );
}

/// See: issue 7, "per-node task options (rate limit, queue)": a node limited to 20 messages a
/// second takes at least (n - 1) / 20 s for n words, whichever worker runs them, and counts
/// them all; a rate that is not a positive number is refused when the graph is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_node_spaces_its_messages_over_the_run() {
    use celeriac::flow::{Graph, Node};
    let (url, _db) = sqlite_url("flow-rate");
    let app = client(&url).await;
    let _w1 = WorkerProcess::start(&url, &["-c", "4"]);
    let _w2 = WorkerProcess::start(&url, &["-c", "4"]);
    let queue = celeriac_test::services::unique_queue("flow-rate");
    let _w3 = WorkerProcess::start(&url, &["-c", "2", "-Q", &queue]);
    let graph = Graph::builder()
        .node(
            "split",
            Node::new(partial::<Vec<String>>("tasks.words")).stream(),
        )
        .node(
            "count",
            Node::new(partial::<String>("tasks.word"))
                .tally()
                .rate_limit(20.0)
                .queue(&queue),
        )
        .subscribe("count", "split")
        .build()
        .unwrap();
    let words: Vec<String> = (0..30).map(|i| format!("w{}", i % 3)).collect();
    let started = std::time::Instant::now();
    let run = graph.start(&app, "split", words.join(" ")).await.unwrap();
    run.wait(Duration::from_secs(60)).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "30 messages at 20/s took {took:?}"
    );
    let totals = run.totals("count").await.unwrap();
    assert_eq!(totals.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
    assert_eq!(run.failed().await.unwrap(), 0);

    let e = Graph::builder()
        .node(
            "a",
            Node::new(partial::<Value>("tasks.echo")).rate_limit(0.0),
        )
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("positive number per second"), "{e}");
}
