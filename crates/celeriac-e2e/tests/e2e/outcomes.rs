//! What a client sees for each kind of outcome, from a worker in another process.

use celeriac::{ErrorKind, TaskState};
use celeriac_examples::{add, echo, fail, panic, xsum};
use serde_json::json;

use crate::support::{T, WorkerProcess, client, sqlite_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_back_typed() {
    let (url, _) = sqlite_url("results");
    let _w = WorkerProcess::start(&url, &["-c", "4"]);
    let app = client(&url).await;
    let sum = add::delay(&app, 2, 3).await.unwrap();
    let total = xsum::delay(&app, vec![1.5, 2.5, 3.0]).await.unwrap();
    let value = json!({"text": "héllo ✓", "nested": [1, {"a": null}], "big": 9007199254740993_i64, "f": 0.1});
    let echoed = echo::delay(&app, value.clone()).await.unwrap();
    assert_eq!(sum.get_timeout(T).await.unwrap(), 5);
    assert_eq!(total.get_timeout(T).await.unwrap(), 7.0);
    assert_eq!(echoed.get_timeout(T).await.unwrap(), value);
    assert_eq!(sum.state().await.unwrap(), TaskState::Success);
    assert!(sum.successful().await.unwrap());
    // A handle rebuilt from the bare id reads the same result.
    let again = app.result::<i64>(sum.id());
    assert_eq!(again.get_timeout(T).await.unwrap(), 5);
    // Forget removes it: the id reads as pending again.
    again.forget().await.unwrap();
    assert_eq!(again.state().await.unwrap(), TaskState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_carry_type_message_and_traceback() {
    let (url, _) = sqlite_url("failures");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let r = fail::delay(&app, "boom at line 3".to_owned())
        .await
        .unwrap();
    let err = r.get_timeout(T).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    let remote = err.remote().expect("remote error");
    assert_eq!(remote.exc_type, "ValueError");
    assert_eq!(remote.message(), "boom at line 3");
    assert_eq!(r.state().await.unwrap(), TaskState::Failure);
    assert!(r.failed().await.unwrap());
    assert_eq!(r.result().await.unwrap()["exc_type"], "ValueError");
    let tb = r.traceback().await.unwrap().expect("a traceback");
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");
    assert!(tb.contains(&format!("task tasks.fail[{}]", r.id())), "{tb}");
    assert!(tb.ends_with("ValueError: boom at line 3"), "{tb}");
    assert_eq!(remote.traceback.as_deref(), Some(tb.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_fails_alone_and_the_worker_goes_on() {
    let (url, _) = sqlite_url("panic");
    let _w = WorkerProcess::start(&url, &["-c", "2"]);
    let app = client(&url).await;
    let p = panic::delay(&app, "kaboom".to_owned()).await.unwrap();
    let err = p.get_timeout(T).await.unwrap_err();
    let remote = err.remote().expect("remote error");
    assert_eq!(remote.exc_type, "Panic");
    assert!(remote.message().contains("kaboom"), "{remote:?}");
    assert_eq!(
        add::delay(&app, 1, 1)
            .await
            .unwrap()
            .get_timeout(T)
            .await
            .unwrap(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tasks_and_bad_arguments_fail_clearly_and_lose_nothing_else() {
    let (url, _) = sqlite_url("bad-input");
    let _w = WorkerProcess::start(&url, &[]);
    let app = client(&url).await;
    let unknown = app
        .send_task("tasks.does_not_exist", vec![json!(1)], Default::default())
        .await
        .unwrap();
    let bad_args = app
        .send_task(
            "tasks.add",
            vec![json!("two"), json!(2)],
            Default::default(),
        )
        .await
        .unwrap();
    let too_many = app
        .send_task(
            "tasks.add",
            vec![json!(1), json!(2), json!(3)],
            Default::default(),
        )
        .await
        .unwrap();
    let good = add::delay(&app, 20, 22).await.unwrap();

    let e = unknown.get_timeout(T).await.unwrap_err();
    let remote = e.remote().unwrap();
    assert_eq!(
        (remote.exc_type.as_str(), remote.exc_module.as_str()),
        ("NotRegistered", "celery.exceptions")
    );
    assert_eq!(remote.message(), "tasks.does_not_exist");

    let e = bad_args.get_timeout(T).await.unwrap_err();
    assert_eq!(e.remote().unwrap().exc_type, "TypeError");
    assert!(
        e.remote().unwrap().message().contains("argument 'x'"),
        "{e:?}"
    );
    let e = too_many.get_timeout(T).await.unwrap_err();
    assert!(
        e.remote().unwrap().message().contains("3 were given"),
        "{e:?}"
    );

    assert_eq!(good.get_timeout(T).await.unwrap(), 42);
}
