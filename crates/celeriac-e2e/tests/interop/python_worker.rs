//! Our client (typed signatures, `send_task`, `AsyncResult`) calling tasks on a Python worker.

use celeriac::{ErrorKind, TaskState};
use celeriac_examples::{add, echo, fail, mul, xsum};
use celeriac_test::python::PythonWorker;
use serde_json::json;

use crate::support::{T, setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_calls_a_python_worker() {
    let Some(env) = setup(10, "py-worker").await else {
        return;
    };
    let py = PythonWorker::start(&env.url, &env.url, &[&env.queue]).await;
    let app = &env.app;
    let q = env.queue.as_str();
    let log = || format!("python worker's log:\n{}", py.log());

    let sum = add::s(2, 3).queue(q).apply_async(app).await.unwrap();
    let product = mul::s(6, 7).queue(q).apply_async(app).await.unwrap();
    let total = xsum::s(vec![1.5, 2.5, 3.0])
        .queue(q)
        .apply_async(app)
        .await
        .unwrap();
    let value = json!({
        "text": "héllo ✓ 日本語 🎉", "escapes": "\"\\\n\t\u{0}",
        "nested": [1, {"a": null, "b": [true, false]}, {}],
        "i64_max": i64::MAX, "i64_min": i64::MIN, "u64_max": u64::MAX,
        "beyond_f64": 9_007_199_254_740_993_i64,
        "floats": [0.1, -2.5, 1e300, std::f64::consts::PI],
        "null": null,
    });
    let echoed = echo::s(value.clone())
        .queue(q)
        .apply_async(app)
        .await
        .unwrap();

    // A countdown to a queue only Python serves, with no configuration saying so: it goes
    // out at once with its eta header, as Celery's client sends it, and runs when due.
    // See: issue 23 (G)
    let sent = std::time::Instant::now();
    let later = add::s(20, 22)
        .queue(q)
        .countdown(std::time::Duration::from_secs(2))
        .apply_async(app)
        .await
        .unwrap();

    assert_eq!(sum.get_timeout(T).await.unwrap(), 5, "{}", log());
    assert_eq!(product.get_timeout(T).await.unwrap(), 42, "{}", log());
    assert_eq!(later.get_timeout(T).await.unwrap(), 42, "{}", log());
    assert!(
        sent.elapsed() >= std::time::Duration::from_millis(1900),
        "ran before its countdown: {:?}",
        sent.elapsed()
    );
    assert_eq!(total.get_timeout(T).await.unwrap(), 7.0, "{}", log());
    assert_eq!(echoed.get_timeout(T).await.unwrap(), value, "{}", log());
    assert_eq!(sum.state().await.unwrap(), TaskState::Success);
    let meta = sum.meta().await.unwrap();
    assert_eq!(meta.worker.as_deref(), Some(py.node_name()), "{meta:?}");
    assert_eq!(meta.name.as_deref(), Some("tasks.add"), "{meta:?}");
    assert_eq!(meta.queue.as_deref(), Some(q), "{meta:?}");
    assert!(meta.date_done.is_some(), "{meta:?}");

    // By name, with keyword arguments.
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("x".to_owned(), json!(40));
    kwargs.insert("y".to_owned(), json!(2));
    let by_name = celeriac::Signature::<serde_json::Value>::new("tasks.add")
        .kwargs_json(kwargs)
        .queue(q)
        .apply_async(app)
        .await
        .unwrap();
    assert_eq!(by_name.get_timeout(T).await.unwrap(), 42, "{}", log());

    // A Python exception comes back as an error carrying its type, module and message.
    let failed = fail::s("boom: ünïcode".to_owned())
        .queue(q)
        .apply_async(app)
        .await
        .unwrap();
    let err = failed.get_timeout(T).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed, "{err:?}\n{}", log());
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.exc_type, "ValueError", "{remote:?}");
    assert_eq!(remote.exc_module, "builtins", "{remote:?}");
    assert_eq!(remote.message(), "boom: ünïcode", "{remote:?}");
    assert_eq!(failed.state().await.unwrap(), TaskState::Failure);
    assert!(failed.failed().await.unwrap());
    let tb = failed.traceback().await.unwrap().expect("a traceback");
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");
    assert!(tb.contains("ValueError: boom: ünïcode"), "{tb}");
}

/// Python writes floats back in their shortest form; reading these needs a correctly rounded
/// parser (serde_json's `float_roundtrip` feature): without it, about 1 in 10 ordinary floats
/// comes back one unit in the last place off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floats_from_a_python_worker_survive_our_client() {
    let Some(env) = setup(10, "py-floats").await else {
        return;
    };
    let py = PythonWorker::start(&env.url, &env.url, &[&env.queue]).await;
    let floats = json!([
        985.690_694_632_869_5,
        212.918_907_267_134_59,
        479.607_564_269_825_96
    ]);
    let echoed = echo::s(floats.clone())
        .queue(&env.queue)
        .apply_async(&env.app)
        .await
        .unwrap();
    let got = echoed.get_timeout(T).await.unwrap();
    assert_eq!(got, floats, "python worker's log:\n{}", py.log());
}
