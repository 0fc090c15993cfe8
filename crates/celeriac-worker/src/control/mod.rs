//! Remote control (Celery's pidbox): the worker answers `inspect` and obeys `control`
//! requests from `celery inspect/control`, Flower, `my-app inspect/control` and
//! [`App::control`](https://docs.rs/celeriac).
//!
//! The worker listens on its broker's control channel as its node name, acts on the requests
//! meant for it (by destination list, glob or regex pattern, or all), and replies
//! `{"<node>": <answer>}` under the request's ticket when a reply is wanted. Every command of
//! §10.4 of the wire notes that means something for a Rust worker is answered (see
//! `commands`); an unknown one answers `{"error": "KeyError('<name>')"}` as Python does.
//!
//! # Key design decisions
//!
//! - **A bad request costs a log line.** A request that is not a map, names no method, or
//!   has arguments of the wrong type is logged and answered with an error when it wants an
//!   answer; the listener, the consume loop and running tasks go on.
//! - **Revokes are kept in memory and in the result backend.** A `revoke` adds the ids to
//!   the worker's in-memory set (checked by the gate layer before every run, as Celery's
//!   workers do) and stores REVOKED for them (as Celery 5.5's `mark_as_revoked` does), so the
//!   revoke also holds on workers that were not listening and across restarts.
//! - **Mingle at start, without waiting for it.** The worker asks the other nodes for their
//!   revoked ids (`hello`) as Celery's `mingle` bootstep does, but consumes meanwhile rather
//!   than a second later: ids learned apply to every task that has not run yet, and the
//!   durable REVOKED records cover the rest.

mod commands;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celeriac_core::broadcast::control::{Reply, ReplyTo, Request, collect};
use celeriac_core::broadcast::{Broadcast, Clock, Signed};
use celeriac_core::{DynBackend, DynBroker, Registry};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::events::Events;
use crate::options::WorkerOptions;
use crate::pool::PoolHandle;
use crate::ratelimit::RateLimiter;
use crate::revoke::{Revoked, RunningIds};
use crate::shutdown::ShutdownHandle;
use crate::timelimit::TimeLimits;
use crate::tracker::Tracker;

/// A change to the queues the worker consumes, asked for by remote control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueueChange {
    Add(String),
    Cancel(String),
}

/// What remote control reads and changes: the worker as a node of the cluster.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) hostname: String,
    pub(crate) broker: DynBroker,
    pub(crate) backend: Option<DynBackend>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) options: WorkerOptions,
    pub(crate) clock: Arc<Clock>,
    pub(crate) started: Instant,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) revoked: Arc<Revoked>,
    pub(crate) running: Arc<RunningIds>,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) time_limits: Arc<TimeLimits>,
    pub(crate) pool: PoolHandle,
    pub(crate) shutdown: ShutdownHandle,
    pub(crate) events: Arc<Events>,
    /// The queues consumed now.
    pub(crate) queues: Mutex<Vec<String>>,
    pub(crate) queue_changes: mpsc::UnboundedSender<QueueChange>,
    pub(crate) autoscale: Arc<Mutex<Option<crate::autoscale::Bounds>>>,
}

impl Node {
    /// The broker's broadcast channels, if it has them, under the worker's signing policy:
    /// with serializer `auth`, requests are obeyed and mingle's answers read only when signed
    /// by a trusted key, and replies go out signed (see [`Signed`]).
    pub(crate) fn channels(&self) -> Option<Signed<'_>> {
        let b = self.broker.broadcast()?;
        Some(Signed::new(b, self.options.signer.clone()))
    }
}

/// How long a worker waits for the other nodes' answers to its start-up `hello`.
const MINGLE_WAIT: Duration = Duration::from_secs(1);

/// Listens for control requests until the listener fails for good or the worker stops
/// (the caller aborts it). Returns at once when the broker has no control channel.
pub(crate) async fn serve(node: Arc<Node>) {
    let Some(channels) = node.channels() else {
        tracing::info!(
            driver = node.broker.driver(),
            "the broker has no broadcast channels: no remote control"
        );
        return;
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut inbox = match channels.control_inbox(&node.hostname).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = backoff.as_secs_f64(), "cannot listen for remote control");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            match inbox.next().await {
                Ok(Some(m)) => {
                    let node = node.clone();
                    // Each request on its own task: a slow command does not hold up a ping.
                    tokio::spawn(async move { handle(&node, &m).await });
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "remote control listener failed; listening again");
                    break;
                }
            }
        }
    }
}

/// Acts on one control message and replies when asked.
async fn handle(node: &Node, m: &celeriac_core::broadcast::Broadcasted) {
    let received = match Request::from_message(m) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a malformed control request");
            return;
        }
    };
    if let Some(c) = received.clock {
        node.clock.adjust(c);
    }
    let req = received.request;
    if !req.is_for(&node.hostname) {
        return;
    }
    if received
        .expires
        .is_some_and(|e| e < celeriac_core::broadcast::event::now_unix())
    {
        tracing::debug!(method = %req.method, "ignoring an expired control request");
        return;
    }
    tracing::debug!(method = %req.method, "remote control request");
    let answer = commands::dispatch(node, &req).await;
    let (Some(answer), Some(ticket), Some(to)) = (answer, &req.ticket, &req.reply_to) else {
        return;
    };
    reply(node, ticket, to, answer).await;
}

async fn reply(node: &Node, ticket: &str, to: &ReplyTo, answer: Value) {
    let Some(channels) = node.channels() else {
        return;
    };
    let r = Reply {
        ticket: ticket.to_owned(),
        node: node.hostname.clone(),
        answer,
        clock: Some(node.clock.forward()),
    };
    if let Err(e) = channels.send_reply(&r.to_message(&to.routing_key)).await {
        tracing::warn!(error = %e, "cannot send a remote control reply");
    }
}

/// Celery's `mingle`: asks every other node for its revoked ids, and keeps them.
pub(crate) async fn mingle(node: &Node) {
    let Some(channels) = node.channels() else {
        return;
    };
    let mut args = Map::new();
    args.insert("from_node".into(), node.hostname.clone().into());
    args.insert("revoked".into(), json!(node.revoked.ids()));
    let hello = Request::new("hello", args);
    let replies = match collect(&channels, &node.clock, hello, MINGLE_WAIT, None).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "mingle: cannot ask the other nodes");
            return;
        }
    };
    let mut learned = 0;
    for r in &replies {
        if r.node == node.hostname {
            continue;
        }
        if let Some(c) = r.answer.get("clock").and_then(Value::as_u64) {
            node.clock.adjust(c);
        }
        for id in revoked_ids(r.answer.get("revoked")) {
            learned += usize::from(node.revoked.add(&id));
        }
    }
    let others = replies.iter().filter(|r| r.node != node.hostname).count();
    tracing::info!(
        nodes = others,
        revoked = learned,
        "mingle: synced with the other nodes"
    );
}

/// Revoked ids as `hello` carries them: a list (Celery 5.7) or a map of id → anything (≤5.6).
pub(crate) fn revoked_ids(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}
