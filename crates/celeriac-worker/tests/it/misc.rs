//! Tests for tracing (one span per execution with its fields) and auto traits.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::json;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use crate::support::*;

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<celeriac_worker::Worker>();
    assert_send_sync::<celeriac_worker::ShutdownHandle>();
    assert_send_sync::<celeriac_worker::WorkerOptions>();
    assert_send_sync::<celeriac_worker::WorkerReport>();
    assert_send_sync::<celeriac_worker::Pool>();
    fn assert_send<T: Send>(_: &T) {}
    let w = celeriac_worker::Worker::new(
        std::sync::Arc::new(celeriac_core::memory::MemoryBroker::new()),
        None,
        Default::default(),
        Default::default(),
    );
    assert_send(&w.run());
}

type Fields = HashMap<String, String>;
type Sink = Arc<Mutex<Vec<(Fields, Fields)>>>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Captures the events of the calling thread (with the fields of the span they happened in)
/// until the guard drops.
///
/// A minimal subscriber, installed once as the global default: a scoped one
/// (`set_default`) races with other tests over tracing's per-callsite interest cache.
fn capture() -> (Sink, impl Drop) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(Capture::default())
            .expect("no other global subscriber in this test binary");
    });
    let sink = Sink::default();
    SINK.with(|s| *s.borrow_mut() = Some(sink.clone()));
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            SINK.with(|s| s.borrow_mut().take());
        }
    }
    (sink, Stop)
}

#[derive(Default)]
struct Capture {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, Fields>>,
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fields = Fields::new();
        fields.insert("span".into(), span.metadata().name().to_owned());
        span.record(&mut Collect(&mut fields));
        self.spans.lock().unwrap().insert(id, fields);
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(f) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Collect(f));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let Some(sink) = SINK.with(|s| s.borrow().clone()) else {
            return;
        };
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        let span = STACK
            .with(|s| s.borrow().last().copied())
            .and_then(|id| self.spans.lock().unwrap().get(&id).cloned())
            .unwrap_or_default();
        sink.lock().unwrap().push((fields, span));
    }
    fn enter(&self, span: &Id) {
        STACK.with(|s| s.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, span: &Id) {
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(i) = s.iter().rposition(|x| *x == span.into_u64()) {
                s.remove(i);
            }
        });
    }
}

#[tokio::test]
async fn each_execution_logs_in_a_span_with_task_id_name_and_queue() {
    // A current-thread runtime: the worker's events happen on this thread.
    let (sink, _capturing) = capture();
    let h = start(
        vec![
            async_task("tasks.ok", |_, _| async { Ok(json!(1)) }),
            async_task("tasks.bad", |_, _| async {
                Err(celeriac_core::TaskError::fail("nope"))
            }),
        ],
        options(|_| {}),
    );
    let ok = h.call("tasks.ok", vec![]).await;
    let bad = h.call("tasks.bad", vec![]).await;
    h.result(&ok).await;
    h.result(&bad).await;
    h.stop().await;

    let events = sink.lock().unwrap().clone();
    let find = |message: &str, id: &str| {
        events
            .iter()
            .find(|(e, s)| {
                e.get("message").is_some_and(|m| m == message)
                    && s.get("task_id").is_some_and(|t| t == id)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {message:?} event for {id} in {events:#?}"))
    };
    let (event, span) = find("task succeeded", &ok);
    assert_eq!(span["span"], "task");
    assert_eq!(span["task_name"], "tasks.ok");
    assert_eq!(span["queue"], QUEUE);
    assert!(event.contains_key("runtime"), "{event:?}");
    find("task received", &ok);
    let (event, span) = find("task failed", &bad);
    assert_eq!(span["task_name"], "tasks.bad");
    assert!(event["error"].contains("nope"), "{event:?}");
}
