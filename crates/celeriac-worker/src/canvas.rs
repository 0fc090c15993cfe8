//! What a finished task sends on: callbacks, errbacks, the next chain step, a chord's body.
//!
//! For the delivery pipeline, after the outcome is stored. The wire behaviour follows Celery
//! (§3 of the wire notes): on success each `embed.callbacks` signature is sent with the result
//! prepended (unless immutable) and the last element of `embed.chain` is sent with the result
//! prepended and the rest of the chain (order kept); on failure each errback is sent with the
//! failed task's id prepended (Celery's message form, which works across languages), the chain
//! steps still to come that have a frozen `task_id` are stored as FAILURE with the same error
//! (so waiting on a chain's last result does not hang), and their errbacks run too. Every sent
//! message has `parent_id` = the finished task and `root_id` = its root. A signature with no
//! queue goes to its task's queue if this worker knows the task, else to the queue the
//! finished task came from. A callback, chain step or chord body that is a composite map
//! (§3.6: a `group`, a `chain`, a `chord`, as Python sends nested canvas) is planned into its
//! plain messages, a chord's header group saved first (see [`celeriac_core::canvas::plan`]).
//!
//! A chord header member counts its part after its result is stored; see
//! [`celeriac_core::canvas`] for the counter, the completeness check and the claim that fire
//! the body once. A failed (or revoked) member fails the body with
//! `ChordError("Dependency <id> raised <error>")` and runs the body's errbacks.
//!
//! A message of a dataflow run (header `celeriac_flow`, see [`celeriac_core::flow::FlowGraph`])
//! is routed after it finishes: a tally node's output is added to the run's totals, the output
//! goes to every subscribed node (each element of a stream node's list as its own message),
//! and the run's pending counter is moved so readers know when the run is over.
//!
//! Why the canvas is replayed for a redelivered task whose result is already stored: the
//! worker that stored it may have died before sending on (acks late). Replaying can send a
//! callback twice (at least once, as everywhere else); chain steps and chord bodies carry
//! frozen ids, and a worker does not run an id that already has a ready result.

use celeriac_core::canvas::{
    Call, ChordPart, ChordStatus, SendOptions, Sender, announce_chord, build_call, chord_claim_key,
    chord_counter_key, default_option, plan, with_parent_value,
};
use celeriac_core::flow::{
    FLOW_HEADER, FlowHeader, flow_failed_key, flow_key_slot_id, flow_keys_key, flow_pending_key,
    flow_slot_key, flow_tally, flow_total_key,
};
use std::sync::Arc;

use celeriac_core::meta::RemoteError;
use celeriac_core::{
    BoxFuture, ContentType, DynBackend, DynBroker, PublishOptions, Registry, Signature, TaskMeta,
    TaskState,
};
use serde_json::Value;

use crate::builtins::CHORD_UNLOCK;
use crate::pipeline::{Layer, Next, Outcome};
use crate::request::{CELERY_EXC, Request};

/// Sends what follows each outcome, once it is recorded.
#[derive(Debug)]
pub(crate) struct CanvasLayer {
    pub(crate) broker: DynBroker,
    pub(crate) backend: Option<DynBackend>,
    /// Where a signature with no queue of its own goes: its task's queue, if known here.
    pub(crate) registry: Arc<Registry>,
    /// How messages the worker builds are serialized.
    pub(crate) content_type: ContentType,
    /// Signs the messages the worker builds (serializer `auth`).
    pub(crate) signer: Option<Arc<dyn celeriac_core::security::BodySigner>>,
    /// Sent messages name this worker as their origin.
    pub(crate) hostname: String,
    /// The broker parks delayed messages itself.
    pub(crate) broker_delays: bool,
}

impl Layer for CanvasLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        // Most tasks carry no canvas: nothing to wait for on their way out.
        if !has_consequences(req) {
            return next.run(req);
        }
        Box::pin(async move {
            let outcome = next.run(req).await;
            if req.name() == CHORD_UNLOCK {
                chord_unlocked(self, req, &outcome).await;
                return outcome;
            }
            match &outcome {
                Outcome::Succeeded(value) => on_success(self, req, value).await,
                Outcome::Failed(err) | Outcome::DeadLettered { error: err, .. } => {
                    on_failure(self, req, err).await;
                }
                Outcome::Revoked { .. } => on_duplicate(self, req, false).await,
                Outcome::Skipped(_) => on_duplicate(self, req, req.redeliveries() > 0).await,
                _ => {}
            }
            outcome
        })
    }
}

/// Sends what follows a success: callbacks, the next chain step, the chord part.
async fn on_success(cx: &CanvasLayer, req: &Request, value: &Value) {
    // Boxed, and only when there is something to do: sending is a large future, and every
    // task's future would otherwise carry (and copy) its state.
    if has_consequences(req) {
        Box::pin(success_consequences(cx, req, value)).await;
    }
}

async fn success_consequences(cx: &CanvasLayer, req: &Request, value: &Value) {
    let embed = &req.body.embed;
    for cb in embed.callbacks.iter().flatten() {
        send(cx, req, with_parent_value(cb, value.clone()), None).await;
    }
    if let Some(mut chain) = embed.chain.clone() {
        if let Some(next) = chain.pop() {
            send(
                cx,
                req,
                with_parent_value(&next, value.clone()),
                Some(chain),
            )
            .await;
        }
    }
    chord_part(cx, req).await;
    flow_step(cx, req, Some(value)).await;
}

/// Sends what follows a failure: errbacks (the task's and the remaining chain steps'), FAILURE
/// on the remaining chain steps, the chord part.
async fn on_failure(cx: &CanvasLayer, req: &Request, err: &RemoteError) {
    if has_consequences(req) {
        Box::pin(failure_consequences(cx, req, err)).await;
    }
}

async fn failure_consequences(cx: &CanvasLayer, req: &Request, err: &RemoteError) {
    let embed = &req.body.embed;
    let rest = embed.chain.as_deref().unwrap_or_default();
    let mut errbacks: Vec<Signature> = embed.errbacks.clone().unwrap_or_default();
    for step in rest.iter().rev() {
        for eb in wire_sigs(step.options.get("link_error")) {
            if !errbacks.contains(&eb) {
                errbacks.push(eb);
            }
        }
        if let Some(Value::String(id)) = step.options.get("task_id") {
            let mut meta = TaskMeta::exception(id.clone(), TaskState::Failure, err);
            meta.name = Some(step.task.clone());
            meta.parent_id = Some(req.id().to_owned());
            meta.reply_to = reply_to(step, req);
            store(cx, &meta).await;
        }
    }
    let failed_id = Value::String(req.id().to_owned());
    for eb in &errbacks {
        send(cx, req, with_parent_value(eb, failed_id.clone()), None).await;
    }
    chord_part(cx, req).await;
    flow_step(cx, req, None).await;
}

/// For a delivery whose task already has a ready result: replays what the run that stored it
/// may not have sent (a chord part always; callbacks and the chain after a redelivered
/// success).
async fn on_duplicate(cx: &CanvasLayer, req: &Request, redelivered: bool) {
    let canvas = &req.body.embed;
    if canvas.chord.is_none() && !(redelivered && has_followers(req)) {
        return;
    }
    Box::pin(replay(cx, req, redelivered)).await;
}

async fn replay(cx: &CanvasLayer, req: &Request, redelivered: bool) {
    let Some(meta) = stored(cx, req.id()).await else {
        return;
    };
    if redelivered && meta.status == TaskState::Success {
        tracing::info!("redelivered task already succeeded; sending its callbacks again");
        on_success(cx, req, &meta.result).await;
    } else {
        chord_part(cx, req).await;
    }
}

/// Whether anything may follow this task's end: callbacks or errbacks, chain steps, a chord
/// part to count, a dataflow step.
fn has_consequences(req: &Request) -> bool {
    let e = &req.body.embed;
    e.errbacks.as_ref().is_some_and(|c| !c.is_empty())
        || e.chord.is_some()
        || has_followers(req)
        || req.name() == CHORD_UNLOCK
}

fn has_followers(req: &Request) -> bool {
    let e = &req.body.embed;
    e.callbacks.as_ref().is_some_and(|c| !c.is_empty())
        || e.chain.as_ref().is_some_and(|c| !c.is_empty())
        || req.message.headers.extra.contains_key(FLOW_HEADER)
}

/// Finishes one message of a dataflow run: adds a tally node's output to the run's totals,
/// routes the output to the subscribed nodes, and counts the message done (`output` is `None`
/// for a failure, which counts it failed and routes nothing).
///
/// The run's pending counter goes up by the messages routed before they are sent and down by
/// one after, so it reaches zero only when every message of the run has finished.
async fn flow_step(cx: &CanvasLayer, req: &Request, output: Option<&Value>) {
    let flow = match FlowHeader::from_headers(&req.message.headers.extra) {
        None => return,
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot route a dataflow message");
            return;
        }
    };
    let Some(backend) = cx.backend.as_ref() else {
        tracing::error!(run = %flow.run, "a dataflow run needs a result backend; its output is dropped");
        return;
    };
    let run = flow.run.as_str();
    let node = flow.node.as_str();
    let step = async {
        let Some(output) = output else {
            backend.incr(&flow_failed_key(run), 1).await?;
            return Ok(());
        };
        if flow.graph.nodes.get(node).is_some_and(|n| n.tally) {
            for (key, by) in flow_tally(node, output)? {
                let total = backend.incr(&flow_total_key(run, node, &key), by).await?;
                if total == by {
                    // The first increment of this key: list it for readers.
                    let slot = backend.incr(&flow_keys_key(run, node), 1).await?;
                    let meta = TaskMeta::success(
                        flow_key_slot_id(run, node, slot),
                        Value::String(key.clone()),
                    );
                    backend.store(&meta).await?;
                }
            }
        }
        let mut next = Vec::new();
        for (sub, item) in flow.graph.targets(node, output)? {
            let mut sig = flow.graph.message_for(run, &sub, item)?;
            let rate = flow.graph.nodes.get(&sub).and_then(|n| n.rate);
            if let (Some(rate), Some(t0)) = (rate.filter(|r| *r > 0.0), flow.graph.started) {
                // The n-th message to a rated node is due (n - 1) / rate after the run began.
                let n = backend.incr(&flow_slot_key(run, &sub), 1).await?;
                let due = t0 + (n - 1) as f64 / rate;
                let due = chrono::DateTime::from_timestamp_micros((due * 1e6) as i64);
                if let Some(due) = due.filter(|d| *d > chrono::Utc::now()) {
                    sig.options.insert(
                        "eta".into(),
                        Value::String(celeriac_core::time::format(due)),
                    );
                }
            }
            next.push(sig);
        }
        if !next.is_empty() {
            let n = i64::try_from(next.len()).unwrap_or(i64::MAX);
            backend.incr(&flow_pending_key(run), n).await?;
        }
        for sig in next {
            send(cx, req, sig, None).await;
        }
        Ok::<_, celeriac_core::Error>(())
    };
    if let Err(e) = step.await {
        tracing::error!(run = %run, node = %node, error = %e, "cannot finish a dataflow step");
        if let Err(e) = backend.incr(&flow_failed_key(run), 1).await {
            tracing::error!(run = %run, error = %e, "cannot count a failed dataflow step");
        }
    }
    if let Err(e) = backend.incr(&flow_pending_key(run), -1).await {
        tracing::error!(run = %run, error = %e, "cannot count a finished dataflow step");
    }
}

/// Counts one chord header part and fires the body when every part is ready.
async fn chord_part(cx: &CanvasLayer, req: &Request) {
    let (Some(body), Some(gid)) = (&req.body.embed.chord, &req.message.headers.group) else {
        return;
    };
    let Some(backend) = cx.backend.as_ref() else {
        tracing::error!(group_id = %gid, "a chord needs a result backend; its body will never run");
        return;
    };
    let fired = async {
        // The backend's own chord protocol first (Celery's Redis keys), if it has one.
        if let Some(meta) = backend.get(req.id()).await?.filter(|m| m.status.is_ready()) {
            let part = ChordPart::new(gid, &meta, req.message.headers.group_index);
            let status = match backend.capabilities().chords {
                Some(chords) => chords.chord_part_return(part).await?,
                None => ChordStatus::NotNative,
            };
            match status {
                ChordStatus::NotNative => {}
                ChordStatus::Complete(parts) => {
                    if backend.incr(&chord_claim_key(gid), 1).await? != 1 {
                        return Ok(false);
                    }
                    fire(cx, req, body, gid, parts).await;
                    return Ok(true);
                }
                _ => return Ok(false),
            }
        }
        let count = backend.incr(&chord_counter_key(gid), 1).await?;
        let Some(ids) = backend.restore_group(gid).await? else {
            // A Celery client on a result backend without a chord protocol (its `db+` tables)
            // saves no group: it sends `celery.chord_unlock`, which joins the chord.
            tracing::info!(group_id = %gid, "the chord's header group is not saved here: the body waits for celery.chord_unlock");
            return Ok(false);
        };
        if count < i64::try_from(ids.len()).unwrap_or(i64::MAX) {
            return Ok(false);
        }
        let mut parts = Vec::with_capacity(ids.len());
        for id in &ids {
            match backend.get(id).await? {
                Some(m) if m.status.is_ready() => parts.push(m),
                _ => return Ok(false),
            }
        }
        if backend.incr(&chord_claim_key(gid), 1).await? != 1 {
            return Ok(false);
        }
        fire(cx, req, body, gid, parts).await;
        Ok::<_, celeriac_core::Error>(true)
    };
    match fired.await {
        Ok(true) => tracing::info!(group_id = %gid, body = %body.task, "chord complete; body sent"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(group_id = %gid, error = %e, "cannot count the chord part");
        }
    }
}

/// After `celery.chord_unlock` (a Celery client's chord on a result backend without a chord
/// protocol, see [`crate::builtins`]): once it found every header member ready, sends the
/// callback with their results, or fails it when a member failed; when it gave up
/// (`max_retries`), fails the callback with the reason. Claimed once per group, so a
/// redelivered unlock does not send the callback twice.
async fn chord_unlocked(cx: &CanvasLayer, req: &Request, outcome: &Outcome) {
    let gid = req
        .args()
        .first()
        .or_else(|| req.kwargs().get("group_id"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(callback) = req
        .args()
        .get(1)
        .or_else(|| req.kwargs().get("callback"))
        .and_then(|v| serde_json::from_value::<Signature>(v.clone()).ok())
    else {
        tracing::error!(group_id = %gid, "celery.chord_unlock without a callback signature");
        return;
    };
    let Some(backend) = cx.backend.as_ref() else {
        return; // the task failed for it
    };
    let parts = match outcome {
        Outcome::Succeeded(Value::Array(ids)) => {
            let mut parts = Vec::with_capacity(ids.len());
            for id in ids.iter().filter_map(Value::as_str) {
                match backend.get(id).await {
                    Ok(Some(m)) => parts.push(m),
                    _ => {
                        tracing::error!(group_id = %gid, member = %id, "a chord member's result vanished; the callback is not sent");
                        return;
                    }
                }
            }
            Ok(parts)
        }
        Outcome::Failed(err) => Err(err.clone()),
        _ => return, // retried, or handed back: a later run decides
    };
    match backend.incr(&chord_claim_key(gid), 1).await {
        Ok(1) => {}
        Ok(_) => return, // sent already
        Err(e) => {
            tracing::error!(group_id = %gid, error = %e, "cannot claim the chord; its callback is not sent");
            return;
        }
    }
    match parts {
        Ok(parts) => {
            fire(cx, req, &callback, gid, parts).await;
            tracing::info!(group_id = %gid, body = %callback.task, "chord unlocked; callback sent");
        }
        Err(err) => {
            let err = RemoteError::new("ChordError", err.summary()).with_module(CELERY_EXC);
            fail_body(cx, req, &callback, gid, &err, None).await;
        }
    }
}

async fn fire(cx: &CanvasLayer, req: &Request, body: &Signature, gid: &str, parts: Vec<TaskMeta>) {
    if let Some(failed) = parts.iter().find(|m| m.status != TaskState::Success) {
        let cause = failed
            .error()
            .map_or_else(|| failed.status.to_string(), |e| e.summary());
        let err = RemoteError::new(
            "ChordError",
            format!("Dependency {} raised {cause}", failed.task_id),
        )
        .with_module(CELERY_EXC);
        fail_body(cx, req, body, gid, &err, Some(&failed.task_id)).await;
        return;
    }
    let results = Value::Array(parts.into_iter().map(|m| m.result).collect());
    let mut sig = with_parent_value(body, results);
    default_option(&mut sig, "group_id", gid);
    send(cx, req, sig, None).await;
}

/// Stores `err` as the chord body's FAILURE and runs the body's errbacks (with the body's id,
/// else `failed`, the member that failed).
async fn fail_body(
    cx: &CanvasLayer,
    req: &Request,
    body: &Signature,
    gid: &str,
    err: &RemoteError,
    failed: Option<&str>,
) {
    tracing::warn!(group_id = %gid, error = %err, "a chord member failed; the body fails");
    let body_id = final_id(body);
    let body_id = body_id.as_deref();
    if let Some(id) = body_id {
        let mut meta = TaskMeta::exception(id, TaskState::Failure, err);
        meta.name = Some(body.task.clone());
        meta.group_id = Some(gid.to_owned());
        meta.parent_id = Some(req.id().to_owned());
        meta.reply_to = reply_to(body, req);
        store(cx, &meta).await;
    }
    let Some(failed_id) = body_id.or(failed) else {
        return;
    };
    let failed_id = Value::String(failed_id.to_owned());
    for eb in wire_sigs(body.options.get("link_error")) {
        send(cx, req, with_parent_value(&eb, failed_id.clone()), None).await;
    }
}

/// Publishes `sig` (a plain signature, or a group or chain map) as a child of `parent`; a
/// signature that cannot be sent fails its frozen id.
async fn send(cx: &CanvasLayer, parent: &Request, sig: Signature, chain: Option<Vec<Signature>>) {
    if sig.subtask_type.is_none() {
        send_one(cx, parent, sig, chain).await;
        return;
    }
    let p = match plan(&sig, chain) {
        Ok(p) => p,
        Err(e) => {
            fail_unsent(cx, parent, &sig, &e).await;
            return;
        }
    };
    let mut unlocks = Vec::new();
    for (gid, ids, body) in &p.groups {
        let saved = match cx.backend.as_ref() {
            Some(b) => match b.save_group(gid, ids).await {
                Ok(()) => announce_chord(&**b, gid, ids, body)
                    .await
                    .map(|unlock| unlocks.extend(unlock.map(|u| (u, body.task.as_str())))),
                Err(e) => Err(e),
            },
            None => Err(celeriac_core::Error::config(
                "a chord needs a result backend to save its header",
            )),
        };
        if let Err(e) = saved {
            fail_unsent(cx, parent, &sig, &e).await;
            return;
        }
    }
    for step in p.steps {
        send_one(cx, parent, step.sig, step.chain).await;
    }
    for (mut unlock, body_task) in unlocks {
        // Where the body goes (its task's queue, else this task's), as Celery routes it.
        if !unlock.options.contains_key("queue") {
            let queue = cx
                .registry
                .get(body_task)
                .and_then(|d| d.options.queue.clone())
                .unwrap_or_else(|| parent.queue.clone());
            unlock.options.insert("queue".into(), Value::String(queue));
        }
        send_one(cx, parent, unlock, None).await;
    }
}

async fn send_one(
    cx: &CanvasLayer,
    parent: &Request,
    sig: Signature,
    chain: Option<Vec<Signature>>,
) {
    let mut options = match SendOptions::from_wire(&sig.options) {
        Ok(o) => o,
        Err(e) => {
            fail_unsent(cx, parent, &sig, &e).await;
            return;
        }
    };
    options
        .parent_id
        .get_or_insert_with(|| parent.id().to_owned());
    let headers = &parent.message.headers;
    options.root_id.get_or_insert_with(|| {
        headers
            .root_id
            .clone()
            .unwrap_or_else(|| parent.id().to_owned())
    });
    // Results of what the task sends go where the task's own result goes (rpc://).
    if options.reply_to.is_none() {
        options.reply_to = parent.message.properties.reply_to.clone();
    }
    let task_options = cx
        .registry
        .get(&sig.task)
        .map(|d| d.options.clone())
        .unwrap_or_default();
    // Under `auth` the body inside the signature is JSON, as Celery's.
    let content_type = match cx.content_type {
        ContentType::Auth => ContentType::Json,
        other => other,
    };
    let sender = Sender::new(content_type, Some(&cx.hostname)).signed_by(cx.signer.as_deref());
    let sent = async {
        let call = Call::new(&sig.task, &sig.args, &sig.kwargs, &options);
        let out = build_call(call, &task_options, chain, &sender)?;
        let queue = out.queue.clone().unwrap_or_else(|| parent.queue.clone());
        cx.broker.declare(&queue).await?;
        let options = PublishOptions::default()
            .priority(out.priority)
            .not_before(out.eta.filter(|_| cx.broker_delays));
        cx.broker.publish(&queue, &out.message, options).await?;
        tracing::debug!(child_id = %out.message.id(), child = %sig.task, queue = %queue, "canvas task sent");
        Ok::<_, celeriac_core::Error>(())
    };
    if let Err(e) = sent.await {
        fail_unsent(cx, parent, &sig, &e).await;
    }
}

/// Logs a signature that could not be sent and stores FAILURE under its frozen id, if any.
async fn fail_unsent(
    cx: &CanvasLayer,
    parent: &Request,
    sig: &Signature,
    e: &celeriac_core::Error,
) {
    tracing::error!(child = %sig.task, error = %e, "cannot send the canvas task");
    if let Some(id) = final_id(sig) {
        let err = RemoteError::new("CanvasError", format!("cannot send {}: {e}", sig.task))
            .with_module(celeriac_core::meta::RUST_EXC_MODULE);
        let mut meta = TaskMeta::exception(id, TaskState::Failure, &err);
        meta.name = Some(sig.task.clone());
        meta.reply_to = reply_to(sig, parent);
        store(cx, &meta).await;
    }
}

/// The reply queue of a record stored for `sig` on behalf of `parent`: the signature's own (a
/// client stamps its queue on every step it freezes), else the parent's.
fn reply_to(sig: &Signature, parent: &Request) -> Option<String> {
    sig.options
        .get("reply_to")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| parent.message.properties.reply_to.clone())
}

/// The frozen id whose result a signature ends in: its own `task_id`, or a chain map's last
/// task's, or a chord map's body's.
fn final_id(sig: &Signature) -> Option<String> {
    let inner = |key: &str| {
        sig.kwargs
            .get(key)
            .and_then(|v| serde_json::from_value::<Signature>(v.clone()).ok())
    };
    match sig.subtask_type.as_deref() {
        None => sig
            .options
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        Some("chain") => sig
            .kwargs
            .get("tasks")
            .and_then(|t| serde_json::from_value::<Vec<Signature>>(t.clone()).ok())
            .and_then(|t| t.last().and_then(final_id)),
        Some("chord") => inner("body").as_ref().and_then(final_id),
        Some(_) => None,
    }
}

/// Signatures under a `link`/`link_error` option: one map or a list of them.
fn wire_sigs(v: Option<&Value>) -> Vec<Signature> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| serde_json::from_value(s.clone()).ok())
            .collect(),
        Some(s @ Value::Object(_)) => serde_json::from_value(s.clone()).into_iter().collect(),
        _ => Vec::new(),
    }
}

async fn stored(cx: &CanvasLayer, id: &str) -> Option<TaskMeta> {
    let backend = cx.backend.as_ref()?;
    backend.get(id).await.ok().flatten()
}

async fn store(cx: &CanvasLayer, meta: &TaskMeta) {
    if let Some(backend) = cx.backend.as_ref() {
        if let Err(e) = backend.store(meta).await {
            tracing::error!(error = %e, task_id = %meta.task_id, "cannot store a canvas state");
        }
    }
}
