//! W3C trace context across languages (feature `otel`): a Python client's `traceparent`
//! header is continued by our worker's task span, and ours is written where Python's
//! OpenTelemetry Celery instrumentation reads it (a top-level message header).

use std::time::Duration;

use celeriac_examples::echo;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use tracing::Instrument as _;
use tracing_subscriber::prelude::*;

use crate::support::{python, raw_list, setup};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// Sends `tasks.echo` with `traceparent` and `tracestate` set by hand, as a Python app
/// forwarding a trace would, and prints the task id once the result is back.
const SEND_TRACED: &str = r#"
import json, os, tasks
r = tasks.echo.apply_async(
    ("traced",),
    queue=os.environ["QUEUE"],
    headers={"traceparent": os.environ["TRACEPARENT"], "tracestate": "vendor=abc"},
)
print(json.dumps({"id": r.id, "result": r.get(timeout=30)}))
"#;

// The worker runs in this test's thread, where the exporting subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn a_python_traceparent_is_continued_and_ours_is_a_top_level_header() {
    let Some(env) = setup(9, "py-trace").await else {
        return;
    };
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("interop")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut options = env.app.worker_options();
    options.queues = vec![env.queue.clone()];
    let worker = env.app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let out = python(SEND_TRACED, &env, &[("TRACEPARENT", &traceparent)]).await;
    assert_eq!(out["result"], "traced", "{out}");
    let id = out["id"].as_str().expect("task id").to_owned();
    stop.warm();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();

    // Ours: sent inside a span to a queue nobody consumes, then read raw from Redis.
    let raw_queue = format!("{}-raw", env.queue);
    let span = tracing::info_span!("rust-client");
    let sent = echo::s(json!("x"))
        .queue(raw_queue.clone())
        .apply_async(&env.app)
        .instrument(span.clone())
        .await
        .unwrap();
    drop(span);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let task = spans
        .iter()
        .find(|s| {
            s.name == "task"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "task_id" && kv.value.as_str() == id)
        })
        .unwrap_or_else(|| panic!("no task span for {id} in {spans:#?}"));
    assert_eq!(
        task.span_context.trace_id(),
        TraceId::from_hex(TRACE_ID).unwrap()
    );
    assert_eq!(task.parent_span_id, SpanId::from_hex(PARENT_ID).unwrap());
    assert!(task.parent_span_is_remote);
    assert_eq!(task.span_context.trace_state().get("vendor"), Some("abc"));

    let client = spans
        .iter()
        .find(|s| s.name == "rust-client")
        .expect("client span");
    let raw = raw_list(&env, &raw_queue).await;
    assert_eq!(raw.len(), 1, "{raw:#?}");
    let headers = &raw[0]["headers"];
    assert_eq!(headers["id"], sent.id());
    assert_eq!(
        headers["traceparent"],
        format!(
            "00-{}-{}-01",
            client.span_context.trace_id(),
            client.span_context.span_id()
        ),
        "{headers:#}"
    );
}
