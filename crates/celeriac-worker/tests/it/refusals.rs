//! Tests for messages that cannot run: undecodable, unknown names, wrong arguments, panics.

use celeriac_core::{TaskError, TaskState};
use celeriac_worker::Pool;
use serde_json::json;

use crate::support::*;

fn ok() -> celeriac_core::TaskDef {
    blocking("tasks.ok", |_, _| Ok(json!("ok")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_deliveries_are_dropped_and_the_worker_goes_on() {
    let h = start(vec![ok()], options(|_| {}));
    // The test broker turns task `poison` into bytes that do not decode.
    h.call("poison", vec![]).await;
    let ok = h.call("tasks.ok", vec![]).await;
    assert_eq!(h.result(&ok).await.result, json!("ok"));
    h.until("poison gone", || async { h.stats().await.total() == 0 })
        .await;
    let report = h.stop().await;
    assert_eq!((report.rejected, report.succeeded), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_decode_fails_the_task_and_is_dropped() {
    let h = start(vec![ok()], options(|_| {}));
    let mut pickle = message("tasks.ok", vec![]);
    pickle.content_type = "application/x-python-serialize".into();
    let mut garbage = message("tasks.ok", vec![]);
    garbage.body = b"[1, 2".to_vec();
    for m in [pickle, garbage] {
        let id = h.send(m).await;
        let meta = h.result(&id).await;
        assert_eq!(meta.status, TaskState::Failure);
        let e = meta.error().unwrap();
        assert_eq!(e.exc_type, "DecodeError");
        assert_eq!(meta.name.as_deref(), Some("tasks.ok"));
    }
    h.until("dropped", || async { h.stats().await.total() == 0 })
        .await;
    assert_eq!(h.stop().await.rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_fail_with_not_registered_as_celery_does() {
    let h = start(vec![ok()], options(|_| {}));
    let id = h.call("tasks.missing", vec![json!(1)]).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result,
        json!({"exc_type": "NotRegistered", "exc_message": ["tasks.missing"], "exc_module": "celery.exceptions"})
    );
    h.until("dropped", || async { h.stats().await.total() == 0 })
        .await;
    assert_eq!(h.stop().await.rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_arguments_fail_with_type_error() {
    let h = start(
        vec![blocking("tasks.one", |_, mut a| {
            let x: i64 = a.take(0, "x")?;
            a.finish(&["x"])?;
            Ok(json!(x))
        })],
        options(|_| {}),
    );
    let id = h.call("tasks.one", vec![json!("not a number")]).await;
    let e = h.result(&id).await.error().unwrap();
    assert_eq!(e.exc_type, "TypeError");
    let id = h.call("tasks.one", vec![json!(1), json!(2)]).await;
    let e = h.result(&id).await.error().unwrap();
    assert_eq!(e.message(), "takes 1 positional arguments but 2 were given");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_fail_the_task_and_the_worker_survives() {
    for pool in [Pool::Async, Pool::Threads] {
        let h = start(
            vec![
                ok(),
                blocking("tasks.boom", |_, _| panic!("blocking boom")),
                async_task("tasks.aboom", |_, _| async {
                    if true {
                        panic!("async boom");
                    }
                    Err::<serde_json::Value, _>(TaskError::fail("unreachable"))
                }),
            ],
            options(|o| o.pool = pool),
        );
        for (name, msg) in [
            ("tasks.boom", "blocking boom"),
            ("tasks.aboom", "async boom"),
        ] {
            let id = h.call(name, vec![]).await;
            let meta = h.result(&id).await;
            assert_eq!(meta.status, TaskState::Failure);
            let e = meta.error().unwrap();
            assert_eq!(
                (e.exc_type.as_str(), e.message()),
                ("Panic", msg.to_owned())
            );
        }
        let id = h.call("tasks.ok", vec![]).await;
        assert_eq!(h.result(&id).await.status, TaskState::Success);
        let report = h.stop().await;
        assert_eq!((report.failed, report.succeeded), (2, 1), "{pool}");
    }
}

/// A worker told to run signed messages only, with nothing to verify them, does not start.
/// See: issue 26
#[tokio::test]
async fn serializer_auth_without_a_signer_does_not_start() {
    let mut o = celeriac_worker::WorkerOptions::default();
    o.content_type = celeriac_core::ContentType::Auth;
    let w = celeriac_worker::Worker::new(
        std::sync::Arc::new(celeriac_core::memory::MemoryBroker::new()),
        None,
        Default::default(),
        o,
    );
    let e = w.run().await.unwrap_err();
    assert_eq!(e.kind(), celeriac_core::ErrorKind::Config);
    assert!(e.to_string().contains("needs a signer"), "{e}");
}
