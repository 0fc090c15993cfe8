//! One queue served by a Python worker and ours at once: nothing lost, nothing run twice.

use std::collections::HashMap;

use celeriac_examples::add;
use celeriac_test::python::PythonWorker;

use crate::support::{OurWorker, T, keys, python, raw_get, setup};

/// Tasks sent from each side (200 in all).
const PER_SIDE: i64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_queue_runs_every_task_exactly_once() {
    let Some(env) = setup(11, "mixed").await else {
        return;
    };
    let q = env.queue.as_str();
    let py = PythonWorker::start(&env.url, &env.url, &[q]).await;
    let ours = OurWorker::start(&env.url, &[q]).await;
    let logs = || {
        format!(
            "python worker's log:\n{}\nour worker's log:\n{}",
            py.log(),
            ours.log()
        )
    };

    // Half the tasks from our client, half from Celery's; expected result by id.
    let mut expected: HashMap<String, i64> = HashMap::new();
    for i in 0..PER_SIDE {
        let r = add::s(i, 1000)
            .queue(q)
            .apply_async(&env.app)
            .await
            .unwrap();
        expected.insert(r.id().to_owned(), i + 1000);
    }
    let sent = python(
        &format!(
            r#"
import json, os, tasks
ids = [tasks.app.send_task("tasks.add", (i, 2000), queue=os.environ["QUEUE"]).id for i in range({PER_SIDE})]
print(json.dumps(ids))
"#
        ),
        &env,
        &[],
    )
    .await;
    for (i, id) in (0..).zip(sent.as_array().expect("ids")) {
        expected.insert(id.as_str().expect("id").to_owned(), i + 2000);
    }
    assert_eq!(expected.len(), 200, "ids are unique");

    let mut by_worker: HashMap<String, Vec<String>> = HashMap::new();
    for (id, want) in &expected {
        let r = env.app.result::<i64>(id.clone());
        let got = r
            .get_timeout(T)
            .await
            .unwrap_or_else(|e| panic!("task {id}: {e:?}\n{}", logs()));
        assert_eq!(got, *want, "task {id}");
        let worker = r.meta().await.unwrap().worker.unwrap_or_default();
        by_worker.entry(worker).or_default().push(id.clone());
    }
    let mut names: Vec<&String> = by_worker.keys().collect();
    names.sort();
    let mut both = vec![py.node_name(), ours.node_name()];
    both.sort_unstable();
    assert_eq!(
        names, both,
        "each task's result names the worker that ran it; both must have served"
    );

    // Exactly once: each id shows up once, in total, among the success lines of both logs,
    // and in the log of the worker its result names.
    let py_log = py.log();
    let our_log = ours.log();
    for (worker, ids) in &by_worker {
        for id in ids {
            let in_py = py_log
                .matches(&format!("Task tasks.add[{id}] succeeded"))
                .count();
            let in_ours = our_log
                .lines()
                .filter(|l| l.contains("task succeeded") && l.contains(id.as_str()))
                .count();
            let (mine, other) = if worker == py.node_name() {
                (in_py, in_ours)
            } else {
                (in_ours, in_py)
            };
            assert_eq!(
                (mine, other),
                (1, 0),
                "task {id} (result from {worker}) ran {in_py} times on Python, {in_ours} on ours"
            );
        }
    }

    // The result documents both workers wrote have the same fields.
    let py_doc = raw_get(
        &env,
        &format!("celery-task-meta-{}", by_worker[py.node_name()][0]),
    )
    .await;
    let our_doc = raw_get(
        &env,
        &format!("celery-task-meta-{}", by_worker[ours.node_name()][0]),
    )
    .await;
    assert_eq!(
        keys(&our_doc),
        keys(&py_doc),
        "result documents differ:\nours:   {our_doc}\npython: {py_doc}"
    );
}
