//! W3C trace context in task message headers, so a trace crosses the queue (feature `otel`).
//!
//! A task sent inside a span that has an OpenTelemetry context (a `tracing` span seen by a
//! `tracing-opentelemetry` layer) carries that span's context in two headers, `traceparent`
//! and `tracestate` ([W3C Trace Context](https://www.w3.org/TR/trace-context/)); the worker
//! makes its task span a child of it.
//!
//! # Where the headers go
//!
//! Both are top-level protocol v2 headers, beside `task` and `id`, because that is where
//! OpenTelemetry's Celery instrumentation for Python writes them (it injects into the headers
//! of Celery's `before_task_publish` signal) and reads them back (from the task request, which
//! holds every message header). So a Python client traced that way starts traces our worker
//! continues, and a Python worker traced that way continues ours. To [`Headers`] they are
//! ordinary extra headers: kept and forwarded unchanged, like any header it does not know.
//!
//! # A key design decision
//!
//! The format is fixed to W3C Trace Context rather than read from OpenTelemetry's global
//! propagator, which is a no-op until an application sets one: a trace then crosses the queue
//! with no set-up beyond the exporter, in the format Python's instrumentation uses by default.
//! [`Headers`] implements OpenTelemetry's `Injector` and `Extractor`, for applications that
//! want another propagator on top.

use std::str::FromStr as _;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use serde_json::Value;

use crate::Headers;

/// The W3C header naming the trace and the parent span: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C header carrying vendor-specific trace data (`key=value` pairs).
pub const TRACESTATE: &str = "tracestate";

/// `traceparent` for `sc`, or `None` when it names no valid span.
pub fn traceparent(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Reads a `traceparent` (and an optional `tracestate`) as a remote span context. Returns
/// `None` for anything W3C says to ignore: a wrong length, non-hex digits, version `ff`, an
/// all-zero trace or span id, or extra fields in a version 00 header.
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = traceparent.trim().split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") {
        return None;
    }
    // A later version may add fields; version 00 has exactly four.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    ))
}

impl Headers {
    /// Writes `cx`'s span as `traceparent` (and `tracestate` when not empty). Does nothing and
    /// returns false when `cx` has no valid span.
    pub fn set_trace_context(&mut self, cx: &Context) -> bool {
        let span = cx.span();
        let sc = span.span_context();
        let Some(parent) = traceparent(sc) else {
            return false;
        };
        self.extra.insert(TRACEPARENT.to_owned(), parent.into());
        let state = sc.trace_state().header();
        if state.is_empty() {
            self.extra.remove(TRACESTATE);
        } else {
            self.extra.insert(TRACESTATE.to_owned(), state.into());
        }
        true
    }

    /// The remote context the message's `traceparent` and `tracestate` name, or `None` when
    /// it has none that can be read.
    pub fn trace_context(&self) -> Option<Context> {
        let parent = self.extra.get(TRACEPARENT)?.as_str()?;
        let state = self.extra.get(TRACESTATE).and_then(Value::as_str);
        let sc = parse_traceparent(parent, state)?;
        Some(Context::new().with_remote_span_context(sc))
    }

    /// Writes the current `tracing` span's OpenTelemetry context, unless the headers name a
    /// parent already (one given with the send options wins). Does nothing outside a span
    /// that OpenTelemetry records.
    pub fn inject_current_trace(&mut self) {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        if self.extra.contains_key(TRACEPARENT) {
            return;
        }
        let span = tracing::Span::current();
        if span.is_disabled() {
            return;
        }
        self.set_trace_context(&span.context());
    }
}

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.extra.insert(key.to_owned(), value.into());
    }
}

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.extra.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparent_round_trips_through_headers_and_json() {
        let sc = parse_traceparent(PARENT, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))
            .expect("valid");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(traceparent(&sc).as_deref(), Some(PARENT));
        let mut h = Headers::new("tasks.add", "id-1");
        assert!(h.set_trace_context(&Context::new().with_remote_span_context(sc.clone())));
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json[TRACEPARENT], PARENT);
        assert_eq!(json[TRACESTATE], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
        let back: Headers = serde_json::from_value(json).unwrap();
        let cx = back.trace_context().expect("context");
        assert_eq!(cx.span().span_context(), &sc);
    }

    #[test]
    fn bad_traceparents_are_ignored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",
                None
            )
            .is_some()
        );
        // A header that is not a string is no context (and no error).
        let mut h = Headers::new("t", "i");
        h.extra
            .insert(TRACEPARENT.to_owned(), serde_json::json!(42));
        assert!(h.trace_context().is_none());
    }

    /// Untrusted headers: mutations of a valid pair never panic, and whatever is read back
    /// writes out as a valid version 00 header naming the same ids.
    #[test]
    fn mutated_traceparents_never_panic() {
        let alphabet = b"0123456789abcdefABCDEF-xz+ \xc3\xa9,=";
        let mut rng = fastrand::Rng::with_seed(25);
        for _ in 0..20_000 {
            let mut p = PARENT.as_bytes().to_vec();
            let mut state = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_vec();
            for _ in 0..rng.usize(1..4) {
                let target = if rng.bool() { &mut p } else { &mut state };
                let at = rng.usize(..=target.len());
                match rng.u8(..3) {
                    0 if at < target.len() => target[at] = alphabet[rng.usize(..alphabet.len())],
                    1 if at < target.len() => drop(target.remove(at)),
                    _ => target.insert(at, alphabet[rng.usize(..alphabet.len())]),
                }
            }
            let p = String::from_utf8_lossy(&p);
            let state = String::from_utf8_lossy(&state);
            if let Some(sc) = parse_traceparent(&p, Some(&state)) {
                let again = traceparent(&sc).expect("a parsed context is valid");
                let back = parse_traceparent(&again, None).expect("reads back");
                assert_eq!(back.trace_id(), sc.trace_id(), "{p:?}");
                assert_eq!(back.span_id(), sc.span_id(), "{p:?}");
            }
        }
    }

    #[test]
    fn no_valid_span_writes_nothing() {
        let mut h = Headers::new("t", "i");
        assert!(!h.set_trace_context(&Context::new()));
        h.inject_current_trace();
        assert!(h.extra.is_empty());
    }
}
