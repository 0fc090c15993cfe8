//! Turning a delivered message into a [`Request`] the worker can run, or a [`Refusal`].
//!
//! For the delivery pipeline. The order follows Celery (§2.1 of the wire notes): the task name
//! is looked up *before* the body is decoded, so an unknown task is reported as
//! `NotRegistered` even when its body is in a format we do not read. Every refused message is
//! moved to the dead-letter queue (see `dead`), not requeued: a message that cannot be run now
//! will not become runnable by being delivered again, and requeueing it would make it a poison
//! pill; from the dead-letter queue it can be inspected, and requeued once the task exists.
//!
//! A [`Request`] also carries what the layers share about its delivery: whether it was acked
//! early, the lease keeper, the task's cancellation, the pool child running it, its runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use celeriac_core::meta::RemoteError;
use celeriac_core::security::BodySigner;
use celeriac_core::{
    Body, Cancellation, DeliveryHandle, Error, Headers, Message, Registry, Requeue, TaskDef,
};
use serde_json::{Map, Value};

use crate::lease::{self, LeaseKeeper};
use crate::pool::ChildPid;
use crate::turns::Arrival;

/// The module Celery's own exceptions live in.
pub(crate) const CELERY_EXC: &str = "celery.exceptions";

/// One decoded task message on its way through the worker's layers.
///
/// Layers read it (`&Request`): the task's id, name, definition, headers and arguments, the
/// queue it came from, how often it was delivered before, its cancellation signal and, once
/// it ran, how long it took. See [`Layer`](crate::Layer).
#[derive(Debug)]
pub struct Request {
    /// Shared with the task's context ([`TaskContext::for_message`]), not copied for it.
    ///
    /// [`TaskContext::for_message`]: celeriac_core::TaskContext::for_message
    pub(crate) message: Arc<Message>,
    pub(crate) body: Body,
    pub(crate) def: Arc<TaskDef>,
    pub(crate) queue: String,
    pub(crate) delivery: Settlement,
    pub(crate) cancel: Cancellation,
    /// The pool child running the body, under the processes pool.
    pub(crate) child: ChildPid,
    received: Instant,
    /// Its arrival number in this worker (see [`Request::seq`]).
    seq: u64,
    /// Its place among the held-back deliveries of its name, when it arrived limited.
    arrival: Option<Arrival>,
    /// When the body started (Unix seconds).
    started: OnceLock<f64>,
    runtime: OnceLock<Duration>,
}

/// A message that decoded: its task definition and arguments.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) message: Message,
    pub(crate) body: Body,
    pub(crate) def: Arc<TaskDef>,
}

impl Request {
    /// A request for a decoded message, settled through `handle`; it arrived `seq`-th, with
    /// a place among its name's held-back deliveries when it arrived limited.
    pub(crate) fn new(
        decoded: Decoded,
        handle: Arc<DeliveryHandle>,
        seq: u64,
        arrival: Option<Arrival>,
    ) -> Self {
        Request {
            queue: handle.queue.clone(),
            message: Arc::new(decoded.message),
            body: decoded.body,
            def: decoded.def,
            delivery: Settlement::new(handle),
            cancel: Cancellation::new(),
            child: ChildPid::default(),
            received: Instant::now(),
            seq,
            arrival,
            started: OnceLock::new(),
            runtime: OnceLock::new(),
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        self.message.id()
    }

    /// The task name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The registered task: its options (retries, limits, acks_late, ...) and handler.
    pub fn task(&self) -> &TaskDef {
        &self.def
    }

    /// The message's headers (Celery protocol v2: eta, expires, retries, parent and root ids,
    /// group, extra headers).
    pub fn headers(&self) -> &Headers {
        &self.message.headers
    }

    /// The whole message, as delivered.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The positional arguments.
    pub fn args(&self) -> &[Value] {
        &self.body.args
    }

    /// The keyword arguments.
    pub fn kwargs(&self) -> &Map<String, Value> {
        &self.body.kwargs
    }

    /// The decoded body, canvas data (`embed`) included.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The queue the message came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// How many times the message was delivered before this time.
    pub fn redeliveries(&self) -> u32 {
        self.delivery.handle.redeliveries
    }

    /// When the worker received the delivery.
    pub fn received_at(&self) -> Instant {
        self.received
    }

    /// Its arrival number: deliveries are numbered in the order this worker received them
    /// from the broker (before each one's decoding and layers run concurrently).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Gives up its place among the held-back deliveries of its name: it will not wait for
    /// a rate limit (see [`Turns`](crate::turns)).
    pub(crate) fn leave_turns(&self) {
        if let Some(a) = &self.arrival {
            a.leave();
        }
    }

    /// When the body started (Unix seconds), once it has.
    pub fn started_at(&self) -> Option<f64> {
        self.started.get().copied()
    }

    /// How long the body ran, once it has run.
    pub fn runtime(&self) -> Option<Duration> {
        self.runtime.get().copied()
    }

    /// The task's cancellation signal: a layer may fire it to ask the body to stop.
    pub fn cancellation(&self) -> &Cancellation {
        &self.cancel
    }

    /// Whether the message is acknowledged only after the task ends (`acks_late`).
    pub fn acks_late(&self) -> bool {
        self.def.options.acks_late
    }

    /// Whether the delivery was already acknowledged (the early ack of a task that is not
    /// `acks_late`).
    pub fn is_acked(&self) -> bool {
        self.delivery.acked.load(Ordering::Acquire)
    }

    /// No result is stored except failures: the header or the task option says so.
    pub(crate) fn ignore_result(&self) -> bool {
        self.message.headers.ignore_result || self.def.options.ignore_result
    }

    pub(crate) fn mark_started(&self) {
        let _ = self
            .started
            .set(celeriac_core::broadcast::event::now_unix());
    }

    pub(crate) fn set_runtime(&self, runtime: Duration) {
        let _ = self.runtime.set(runtime);
    }
}

/// The delivery of a [`Request`]: how to settle it, whether it was, and its lease keeper.
#[derive(Debug)]
pub(crate) struct Settlement {
    pub(crate) handle: Arc<DeliveryHandle>,
    acked: AtomicBool,
    keeper: Mutex<Option<LeaseKeeper>>,
}

impl Settlement {
    fn new(handle: Arc<DeliveryHandle>) -> Self {
        Settlement {
            handle,
            acked: AtomicBool::new(false),
            keeper: Mutex::new(None),
        }
    }

    fn keeper(&self) -> std::sync::MutexGuard<'_, Option<LeaseKeeper>> {
        self.keeper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Extends the lease every third of `lease` until the delivery is settled (when
    /// `enabled`: the broker can extend leases).
    pub(crate) fn keep_lease(&self, lease: Duration, enabled: bool) {
        *self.keeper() = Some(lease::keep(self.handle.clone(), lease, enabled));
    }

    /// Stops extending the lease.
    pub(crate) fn release_lease(&self) {
        drop(self.keeper().take());
    }

    /// Acknowledges now, before the task ends (not `acks_late`).
    pub(crate) async fn ack_early(&self) {
        self.release_lease();
        self.acked.store(true, Ordering::Release);
        self.settle(Settle::Ack).await;
    }

    /// Settles the delivery (logs a failure: the message comes back when its lease ends).
    pub(crate) async fn settle(&self, how: Settle) {
        self.release_lease();
        how.apply(&self.handle).await;
    }
}

/// How to settle a delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settle {
    Ack,
    Reject(Requeue),
}

impl Settle {
    /// Settles `handle` this way; a failure is logged (the message comes back when its lease
    /// ends).
    pub(crate) async fn apply(self, handle: &DeliveryHandle) {
        let r = match self {
            Settle::Ack => handle.ack().await,
            Settle::Reject(requeue) => handle.reject(requeue).await,
        };
        if let Err(e) = r {
            tracing::error!(error = %e, action = ?self, "cannot settle the delivery");
        }
    }
}

/// Why a message is not run. The message is rejected without requeue.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The task id, when the headers could be read.
    pub(crate) task_id: Option<String>,
    /// The task name, when the headers could be read.
    pub(crate) task_name: Option<String>,
    /// What to store as FAILURE for the id.
    pub(crate) error: RemoteError,
    /// The message, when its envelope could be read (it goes to the dead-letter queue).
    pub(crate) message: Option<Message>,
}

/// Decodes `message` against `registry`, unsigned; see [`decode_checked`].
#[cfg(test)]
pub(crate) fn decode(
    message: Result<Message, Error>,
    registry: &Registry,
    max_size: Option<usize>,
) -> Result<Decoded, Box<Refusal>> {
    decode_checked(message, registry, max_size, None)
}

/// Decodes `message` against `registry`; a body larger than `max_size` bytes is refused
/// before it is decoded. With a `signer` (serializer `auth`) only a message whose signature
/// it verifies is decoded, and every other one refused as a `SecurityError`, before its task
/// name is looked up; the [`Decoded`] keeps the message as signed (a retry re-sends it so).
pub(crate) fn decode_checked(
    message: Result<Message, Error>,
    registry: &Registry,
    max_size: Option<usize>,
    signer: Option<&dyn BodySigner>,
) -> Result<Decoded, Box<Refusal>> {
    let message = message.map_err(|e| {
        Box::new(Refusal {
            task_id: None,
            task_name: None,
            error: RemoteError::new("DecodeError", error_chain(&e)).with_module("kombu.exceptions"),
            message: None,
        })
    })?;
    let refuse = |error: RemoteError, message: Message| {
        Err(Box::new(Refusal {
            task_id: Some(message.id().to_owned()),
            task_name: Some(message.task().to_owned()),
            error,
            message: Some(message),
        }))
    };
    if let Err(e) = message.headers.check() {
        let error =
            RemoteError::new("DecodeError", error_chain(&e)).with_module("kombu.exceptions");
        return refuse(error, message);
    }
    if let Err(e) = message.check_size(max_size) {
        let error =
            RemoteError::new("LimitExceeded", e.to_string()).with_module("kombu.exceptions");
        return refuse(error, message);
    }
    let verified = match signer {
        Some(signer) => match signer.verify(&message) {
            Ok(inner) => Some(inner),
            Err(e) => {
                let error =
                    RemoteError::new("SecurityError", error_chain(&e)).with_module(CELERY_EXC);
                return refuse(error, message);
            }
        },
        None => None,
    };
    let Some(def) = registry.get(message.task()) else {
        let error = RemoteError::new("NotRegistered", message.task()).with_module(CELERY_EXC);
        return refuse(error, message);
    };
    let body = match verified.as_ref().unwrap_or(&message).decode_body() {
        Ok(b) => b,
        // A signed message reaching a worker that cannot verify it.
        Err(e) if e.kind() == celeriac_core::ErrorKind::Security => {
            let error = RemoteError::new("SecurityError", error_chain(&e)).with_module(CELERY_EXC);
            return refuse(error, message);
        }
        Err(e) => {
            let error =
                RemoteError::new("DecodeError", error_chain(&e)).with_module("kombu.exceptions");
            return refuse(error, message);
        }
    };
    Ok(Decoded {
        def: def.clone(),
        body,
        message,
    })
}

/// `message: cause: cause`, since a refusal is read in a log line or a stored result.
fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use celeriac_core::security::Packed;
    use celeriac_core::{Acker, BoxFuture, ContentType, ErrorKind, Handler, Headers, TaskOptions};
    use serde_json::{Map, Value, json};

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.insert(TaskDef {
            name: "tasks.add".into(),
            params: &["x", "y"],
            options: TaskOptions::default(),
            handler: Handler::Blocking(Arc::new(|_, _| Ok(Value::Null))),
        });
        r
    }

    fn message(task: &str) -> Message {
        let body = Body::new(vec![json!(1), json!(2)], Map::new());
        Message::new(Headers::new(task, "id-1"), &body, ContentType::Json).unwrap()
    }

    /// Records how its delivery was settled.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Settled(Arc<Mutex<Vec<String>>>);

    impl Settled {
        pub(crate) fn get(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Acker for Settled {
        fn ack(&self) -> BoxFuture<'_, celeriac_core::Result<()>> {
            self.0.lock().unwrap().push("ack".into());
            Box::pin(async { Ok(()) })
        }
        fn reject(&self, requeue: Requeue) -> BoxFuture<'_, celeriac_core::Result<()>> {
            self.0.lock().unwrap().push(format!("reject {requeue:?}"));
            Box::pin(async { Ok(()) })
        }
        fn extend_lease(&self, _: Duration) -> BoxFuture<'_, celeriac_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A request for `tasks.add(1, 2)` with id `id` from queue `celery`, and what settles it.
    pub(crate) fn request(id: &str) -> (Request, Settled) {
        request_with(id, 0, |_, _| {})
    }

    /// [`request`], delivered `redeliveries` times before, with its message and the task's
    /// options changed by `f`.
    pub(crate) fn request_with(
        id: &str,
        redeliveries: u32,
        f: impl FnOnce(&mut Message, &mut TaskOptions),
    ) -> (Request, Settled) {
        let mut m = message("tasks.add");
        m.headers.id = id.to_owned();
        let mut decoded = decode(Ok(m), &registry(), None).unwrap();
        let mut def = TaskDef::clone(&decoded.def);
        f(&mut decoded.message, &mut def.options);
        decoded.def = Arc::new(def);
        let settled = Settled::default();
        let delivery = celeriac_core::Delivery::new(
            Err(Error::protocol("taken")),
            "celery",
            redeliveries,
            Box::new(settled.clone()),
        );
        let (_, handle) = delivery.into_parts();
        (Request::new(decoded, Arc::new(handle), 0, None), settled)
    }

    #[test]
    fn a_registered_task_decodes() {
        let (r, _) = request("id-1");
        assert_eq!(r.name(), "tasks.add");
        assert_eq!(r.id(), "id-1");
        assert_eq!(r.args(), [json!(1), json!(2)]);
        assert_eq!(r.queue(), "celery");
        assert_eq!(r.redeliveries(), 0);
        assert!(!r.is_acked() && !r.acks_late() && r.runtime().is_none());
    }

    #[tokio::test]
    async fn an_early_ack_is_seen_by_every_layer() {
        let (r, settled) = request("id-1");
        r.delivery.ack_early().await;
        assert!(r.is_acked());
        assert_eq!(settled.get(), ["ack"]);
    }

    #[test]
    fn unknown_names_are_not_registered_before_the_body_is_read() {
        let mut m = message("tasks.nope");
        m.body = b"not json".to_vec();
        let refusal = decode(Ok(m), &registry(), None).unwrap_err();
        assert_eq!(refusal.task_id.as_deref(), Some("id-1"));
        assert_eq!(
            refusal.error.to_exception_map(),
            json!({"exc_type": "NotRegistered", "exc_message": ["tasks.nope"], "exc_module": "celery.exceptions"})
        );
    }

    /// A signer whose "signature" is the body reversed: enough to drive the worker's policy
    /// (real RSA-PSS signing is tested in celeriac-core and against Celery in celeriac-e2e).
    #[derive(Debug)]
    struct Reverse;

    impl BodySigner for Reverse {
        fn sign_body(&self, ct: &str, ce: &str, body: &[u8]) -> celeriac_core::Result<Vec<u8>> {
            let mut reversed = body.to_vec();
            reversed.reverse();
            Ok(celeriac_core::security::pack(&Packed {
                signer: "reverse".into(),
                signature: Vec::new(),
                content_type: ct.into(),
                content_encoding: ce.into(),
                body: reversed,
            }))
        }
        fn verify_body(&self, signed: &[u8]) -> celeriac_core::Result<Packed> {
            let mut p = celeriac_core::security::unpack(signed)?;
            if p.signer != "reverse" {
                return Err(Error::new(ErrorKind::Security, "unknown signer"));
            }
            p.body.reverse();
            Ok(p)
        }
    }

    /// See: issue 26
    #[test]
    fn with_a_signer_only_verified_messages_decode_and_the_rest_are_security_errors() {
        let signer: &dyn BodySigner = &Reverse;
        let mut signed = message("tasks.add");
        signer.sign(&mut signed).unwrap();
        let d = decode_checked(Ok(signed.clone()), &registry(), None, Some(signer)).unwrap();
        assert_eq!(d.body.args, [json!(1), json!(2)]);
        // The message kept is the signed one: a retry re-sends it signed.
        assert_eq!(d.message, signed);

        // Unsigned, even for an unknown task: refused before the name is looked up.
        for task in ["tasks.add", "tasks.nope"] {
            let r = decode_checked(Ok(message(task)), &registry(), None, Some(signer)).unwrap_err();
            assert_eq!(r.error.exc_type, "SecurityError");
            assert_eq!(r.error.exc_module, CELERY_EXC);
            assert!(r.error.message().contains("unsigned"), "{:?}", r.error);
            assert_eq!(r.message.unwrap(), message(task));
        }

        // A signed message at a worker with no signer: refused, not misread.
        let r = decode(Ok(signed.clone()), &registry(), None).unwrap_err();
        assert_eq!(r.error.exc_type, "SecurityError");
        assert!(
            r.error.message().contains("security is not configured"),
            "{:?}",
            r.error
        );
        assert_eq!(r.message.unwrap(), signed);
    }

    #[test]
    fn bad_bodies_and_bad_bytes_are_decode_errors() {
        let mut m = message("tasks.add");
        m.content_type = "application/x-python-serialize".into();
        let refusal = decode(Ok(m), &registry(), None).unwrap_err();
        assert_eq!(refusal.error.exc_type, "DecodeError");
        assert!(
            refusal.error.message().contains("pickle"),
            "{:?}",
            refusal.error
        );

        let refusal =
            decode(Err(Error::protocol("invalid envelope")), &registry(), None).unwrap_err();
        assert_eq!(refusal.task_id, None);
        assert_eq!(refusal.error.message(), "invalid envelope");
    }

    #[test]
    fn a_bad_header_refuses_the_task_by_id_naming_the_header() {
        let mut m = message("tasks.add");
        m.headers.invalid.insert("eta".into(), json!("tomorrow"));
        let refusal = decode(Ok(m), &registry(), None).unwrap_err();
        assert_eq!(refusal.task_id.as_deref(), Some("id-1"));
        assert_eq!(refusal.task_name.as_deref(), Some("tasks.add"));
        assert_eq!(refusal.error.exc_type, "DecodeError");
        let why = refusal.error.message();
        assert!(why.contains(r#"`eta` = "tomorrow""#), "{why}");
        let kept = refusal.message.expect("the message, for the dead letters");
        assert_eq!(kept.headers.invalid["eta"], json!("tomorrow"));
    }

    #[test]
    fn a_body_over_the_size_limit_is_refused_before_it_is_decoded() {
        let mut m = message("tasks.add");
        m.body = vec![b'x'; 101];
        let refusal = decode(Ok(m.clone()), &registry(), Some(100)).unwrap_err();
        assert_eq!(refusal.task_id.as_deref(), Some("id-1"));
        assert_eq!(refusal.error.exc_type, "LimitExceeded");
        let why = refusal.error.message();
        assert!(
            why.contains("101 bytes") && why.contains("max_message_size (100"),
            "{why}"
        );
        // At the limit it is decoded (and this body is not JSON).
        let refusal = decode(Ok(m), &registry(), Some(101)).unwrap_err();
        assert_eq!(refusal.error.exc_type, "DecodeError");
    }
}
