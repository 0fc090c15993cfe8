//! The example `tasks` command with an OpenTelemetry layer added through
//! [`celeriac::cli::run_with_layer`], as a user wires an exporter. Its spans go to an in-memory
//! exporter and, when the command ends, to the file named by `E2E_SPANS_FILE`, one JSON
//! object a line (name, trace id, span id, parent span id, attributes).

use std::io::Write as _;
use std::process::ExitCode;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

fn main() -> ExitCode {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("e2e-traced"));
    let code = celeriac::cli::run_with_layer(celeriac_examples::app(), layer);
    let _ = provider.force_flush();
    if let Some(path) = std::env::var_os("E2E_SPANS_FILE") {
        let mut out = String::new();
        for s in exporter.get_finished_spans().unwrap_or_default() {
            let attributes: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|kv| (kv.key.to_string(), kv.value.as_str().into_owned().into()))
                .collect();
            let line = serde_json::json!({
                "name": s.name,
                "trace_id": s.span_context.trace_id().to_string(),
                "span_id": s.span_context.span_id().to_string(),
                "parent_span_id": s.parent_span_id.to_string(),
                "attributes": attributes,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(out.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot write the spans to {}: {e}", path.to_string_lossy());
            return ExitCode::FAILURE;
        }
    }
    code
}
