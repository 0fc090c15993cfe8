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
