//! Trace propagation (feature `otel`): a task sent inside a client span runs in a worker span
//! of the same trace, its parent the client span. Exported to OpenTelemetry's in-memory
//! exporter; the worker runs in-process on a SQLite file.

use std::time::Duration;

use celeriac::App;
use celeriac_examples::{add, echo};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing::Instrument as _;
use tracing_subscriber::prelude::*;

use crate::support::{T, sqlite_url};

/// A subscriber exporting every span to `exporter`, set for this thread only (the test runs
/// on a current-thread runtime, so the worker's spans are seen too).
fn traced(
    exporter: &InMemorySpanExporter,
) -> (SdkTracerProvider, tracing::subscriber::DefaultGuard) {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("celeriac-e2e");
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
    (provider, tracing::subscriber::set_default(subscriber))
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[tokio::test(flavor = "current_thread")]
async fn the_worker_span_continues_the_client_trace() {
    let exporter = InMemorySpanExporter::default();
    let (provider, _guard) = traced(&exporter);
    let (url, _) = sqlite_url("otel");
    let app = App::builder()
        .broker_url(&url)
        .collect_tasks()
        .build()
        .await
        .expect("app");
    let worker = app.worker(app.worker_options());
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    let client = tracing::info_span!("checkout");
    let sent = echo::delay(&app, json!({"order": 7}))
        .instrument(client.clone())
        .await
        .unwrap();
    assert_eq!(sent.get_timeout(T).await.unwrap(), json!({"order": 7}));
    // A chain: the worker sends the second step from inside the first one's span.
    let chained = celeriac::chain![
        add::s(2, 3),
        celeriac::Signature::<i64>::new("tasks.mul").arg(10)
    ]
    .apply_async(&app)
    .instrument(tracing::info_span!("chained"))
    .await
    .unwrap();
    assert_eq!(chained.get_timeout(T).await.unwrap(), 50);
    // Sent outside any span: a trace of its own, no parent.
    let untraced = echo::delay(&app, json!(1)).await.unwrap();
    assert_eq!(untraced.get_timeout(T).await.unwrap(), json!(1));
    drop(client);
    stop.warm();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let client = spans
        .iter()
        .find(|s| s.name == "checkout")
        .unwrap_or_else(|| panic!("no client span in {spans:#?}"));
    let task_span = |id: &str| {
        spans
            .iter()
            .find(|s| s.name == "task" && attribute(s, "task_id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no task span for {id} in {spans:#?}"))
    };
    let task = task_span(sent.id());
    assert_eq!(
        task.span_context.trace_id(),
        client.span_context.trace_id(),
        "same trace"
    );
    assert_eq!(task.parent_span_id, client.span_context.span_id());
    assert!(task.parent_span_is_remote, "the parent came over the queue");
    assert_eq!(attribute(task, "task_name").as_deref(), Some("tasks.echo"));
    // The chain: its first step is the client span's child, its second the first step's.
    let chain_client = spans.iter().find(|s| s.name == "chained").unwrap();
    let second = task_span(chained.id());
    let first = spans
        .iter()
        .find(|s| s.name == "task" && s.span_context.span_id() == second.parent_span_id)
        .unwrap_or_else(|| panic!("the second step's parent is no task span: {spans:#?}"));
    assert_eq!(attribute(first, "task_name").as_deref(), Some("tasks.add"));
    assert_eq!(first.parent_span_id, chain_client.span_context.span_id());
    assert_eq!(
        second.span_context.trace_id(),
        chain_client.span_context.trace_id()
    );
    let other = task_span(untraced.id());
    assert_ne!(
        other.span_context.trace_id(),
        client.span_context.trace_id()
    );
    assert_eq!(other.parent_span_id, SpanId::INVALID);
}

/// A worker process whose `main` adds an OpenTelemetry layer with `cli::run_with_layer`, at
/// `-l warning`: the log is quiet, the task span is exported all the same, in the client's
/// trace.
#[tokio::test(flavor = "current_thread")]
async fn run_with_layer_exports_the_task_span_of_a_worker_process() {
    let exporter = InMemorySpanExporter::default();
    let (provider, _guard) = traced(&exporter);
    let (url, path) = sqlite_url("otel-process");
    let spans_file = path.with_extension("spans.jsonl");
    let stderr_file = path.with_extension("stderr.log");
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-traced"))
        .env_remove("RUST_LOG")
        .env("E2E_SPANS_FILE", &spans_file)
        .args(["--broker", &url, "-l", "warning", "worker", "-c", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .expect("spawn e2e-traced");
    let app = App::builder()
        .broker_url(&url)
        .collect_tasks()
        .build()
        .await
        .expect("app");
    let client = tracing::info_span!("from-another-process");
    let sent = echo::delay(&app, json!("hi"))
        .instrument(client.clone())
        .await
        .unwrap();
    assert_eq!(sent.get_timeout(T).await.unwrap(), json!("hi"));
    drop(client);
    provider.force_flush().unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not stop");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("task received"), "-l warning: {stderr}");

    let client = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "from-another-process")
        .expect("client span");
    let text = std::fs::read_to_string(&spans_file).expect("spans file");
    let task: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|s| s["name"] == "task" && s["attributes"]["task_id"] == sent.id())
        .unwrap_or_else(|| panic!("no task span for {} in:\n{text}", sent.id()));
    assert_eq!(
        task["trace_id"],
        client.span_context.trace_id().to_string(),
        "{task}"
    );
    assert_eq!(
        task["parent_span_id"],
        client.span_context.span_id().to_string(),
        "{task}"
    );
    assert_eq!(task["attributes"]["task_name"], "tasks.echo");
}
