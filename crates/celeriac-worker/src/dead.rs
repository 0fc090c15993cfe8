//! Dead letters: messages the worker will not run, set aside with the reason instead of dropped
//! or retried forever.
//!
//! For the worker, which moves a message here, and for operators (the CLI's dead-letter
//! commands, an admin page, a script), who [`list`], [`inspect`], [`requeue`] and [`purge`]
//! them. Everything goes through the [`Broker`] trait, so it works on every driver.
//!
//! A message is dead-lettered when:
//!
//! - it was delivered more than `max_redeliveries` times before (a poison message: its worker
//!   crashed, its child process died, or its lease ran out, again and again). Its task id gets
//!   FAILURE `DeliveryLimitExceeded`, so callers waiting on it do not wait forever;
//! - it cannot run: its envelope or body does not decode, or its task is not registered (the
//!   FAILURE `DecodeError` or `NotRegistered` is stored as before).
//!
//! # A key design decision: one dead-letter queue per queue, named `<queue>.dead`
//!
//! As RabbitMQ users name their dead-letter queues. Apps and teams sharing a broker keep their
//! dead letters apart, purging one queue's dead letters touches no other, and the way back is
//! implied. The message is the original one (same id, headers, body) plus headers saying why
//! ([`REASON_HEADER`]), from which queue ([`QUEUE_HEADER`]), when ([`AT_HEADER`]), by which
//! worker ([`WORKER_HEADER`]) and after how many deliveries ([`DELIVERIES_HEADER`]). A
//! message with a bad standard header (an unparsable `eta`, a string `timelimit`) is kept as
//! sent too: the header's value travels in [`Headers::invalid`]. Only a message whose envelope
//! did not decode at all (no readable task id and name) cannot be kept as it was (the broker
//! contract hands the worker an error, not the bytes): its dead letter is a placeholder of
//! task [`UNDECODABLE_TASK`] with a fresh id and the decoding error as the reason.
//!
//! Listing has no peek in the broker contract: [`list`] leases the dead letters and hands
//! them straight back, so it only sees messages no one else holds at that moment.

use std::time::Duration;

use celeriac_core::{
    Body, Broker, ConsumeOptions, ContentType, Delivery, DeliveryHandle, Headers, Message,
    PublishOptions, Requeue, Result, ResultBackend, TaskState,
};
use serde_json::{Map, Value};

use crate::request::Settle;

/// The suffix of dead-letter queues: `celery` → `celery.dead`.
pub const SUFFIX: &str = ".dead";
/// Header: why the message was dead-lettered.
pub const REASON_HEADER: &str = "x-celeriac-dead-reason";
/// Header: the queue the message came from.
pub const QUEUE_HEADER: &str = "x-celeriac-dead-queue";
/// Header: when it was dead-lettered (RFC 3339, UTC).
pub const AT_HEADER: &str = "x-celeriac-dead-at";
/// Header: the worker that dead-lettered it.
pub const WORKER_HEADER: &str = "x-celeriac-dead-worker";
/// Header: how many times it had been delivered.
pub const DELIVERIES_HEADER: &str = "x-celeriac-dead-deliveries";
/// The task name of a placeholder for a message whose envelope did not decode.
pub const UNDECODABLE_TASK: &str = "celeriac.undecodable";

const HEADERS: [&str; 5] = [
    REASON_HEADER,
    QUEUE_HEADER,
    AT_HEADER,
    WORKER_HEADER,
    DELIVERIES_HEADER,
];

/// How long [`list`] and friends hold the dead letters they look at.
const LEASE: Duration = Duration::from_secs(60);
/// How long to wait for one more dead letter the queue said it had.
const FETCH_WAIT: Duration = Duration::from_secs(2);

/// The dead-letter queue of `queue`; a dead-letter queue is its own.
///
/// ```
/// assert_eq!(celeriac_worker::dead::dead_queue("celery"), "celery.dead");
/// assert_eq!(celeriac_worker::dead::dead_queue("celery.dead"), "celery.dead");
/// ```
pub fn dead_queue(queue: &str) -> String {
    if queue.ends_with(SUFFIX) {
        queue.to_owned()
    } else {
        format!("{queue}{SUFFIX}")
    }
}

/// One dead letter, as [`list`] shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The dead-letter queue holding it.
    pub dead_queue: String,
    /// The queue it came from (and goes back to on [`requeue`]).
    pub queue: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When (RFC 3339), if recorded.
    pub dead_at: Option<String>,
    /// Which worker moved it, if recorded.
    pub worker: Option<String>,
    /// How many times it had been delivered, if recorded.
    pub deliveries: Option<u64>,
    /// The message, dead-letter headers included.
    pub message: Message,
}

impl DeadLetter {
    fn new(dead_queue: &str, message: Message) -> Self {
        let extra = &message.headers.extra;
        let text = |k: &str| extra.get(k).and_then(Value::as_str).map(str::to_owned);
        DeadLetter {
            dead_queue: dead_queue.to_owned(),
            queue: text(QUEUE_HEADER).unwrap_or_else(|| {
                dead_queue
                    .strip_suffix(SUFFIX)
                    .unwrap_or(dead_queue)
                    .to_owned()
            }),
            reason: text(REASON_HEADER).unwrap_or_default(),
            dead_at: text(AT_HEADER),
            worker: text(WORKER_HEADER),
            deliveries: extra.get(DELIVERIES_HEADER).and_then(Value::as_u64),
            message,
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        self.message.id()
    }

    /// The task name.
    pub fn task(&self) -> &str {
        self.message.task()
    }
}

/// Adds the dead-letter headers to `message`.
pub(crate) fn mark(
    message: &mut Message,
    queue: &str,
    reason: &str,
    worker: &str,
    deliveries: u32,
) {
    let extra = &mut message.headers.extra;
    extra.insert(REASON_HEADER.to_owned(), reason.into());
    extra.insert(QUEUE_HEADER.to_owned(), queue.into());
    extra.insert(
        AT_HEADER.to_owned(),
        chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into(),
    );
    extra.insert(WORKER_HEADER.to_owned(), worker.into());
    extra.insert(DELIVERIES_HEADER.to_owned(), deliveries.into());
}

/// Moves a delivery's message (or a placeholder, when it did not decode) to its queue's
/// dead-letter queue, then acks the delivery; if the move fails, requeues it for 30 s later.
/// Returns whether it moved.
pub(crate) async fn move_delivery(
    broker: &dyn Broker,
    handle: &DeliveryHandle,
    message: Option<Message>,
    reason: &str,
    worker: &str,
) -> bool {
    let dead = dead_queue(&handle.queue);
    let mut m = message.unwrap_or_else(placeholder);
    mark(
        &mut m,
        &handle.queue,
        reason,
        worker,
        handle.redeliveries.saturating_add(1),
    );
    let moved = async {
        broker.declare(&dead).await?;
        broker.publish(&dead, &m, PublishOptions::default()).await
    };
    match moved.await {
        Ok(()) => {
            tracing::warn!(dead_queue = %dead, reason, "message moved to the dead-letter queue");
            Settle::Ack.apply(handle).await;
            true
        }
        Err(e) => {
            tracing::error!(error = %e, dead_queue = %dead, "cannot dead-letter the message; requeueing it in 30 s");
            Settle::Reject(Requeue::After(Duration::from_secs(30)))
                .apply(handle)
                .await;
            false
        }
    }
}

/// A stand-in for a message whose envelope did not decode.
pub(crate) fn placeholder() -> Message {
    let headers = Headers::new(UNDECODABLE_TASK, celeriac_core::protocol::new_id());
    Message::new(
        headers,
        &Body::new(Vec::new(), Map::new()),
        ContentType::Json,
    )
    .expect("an empty json body encodes")
}

/// The dead-letter queues the broker knows (queues named `*.dead`).
pub async fn dead_queues(broker: &dyn Broker) -> Result<Vec<String>> {
    let mut qs: Vec<String> = broker
        .queues()
        .await?
        .into_iter()
        .filter(|q| q.ends_with(SUFFIX))
        .collect();
    qs.sort();
    Ok(qs)
}

/// Up to `limit` dead letters of `queue` (a queue or its dead-letter queue), oldest first,
/// left where they are.
pub async fn list(broker: &dyn Broker, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let dead = dead_queue(queue);
    let held = take(broker, &dead, limit).await?;
    let letters = held
        .iter()
        .filter_map(|d| d.message.as_ref().ok())
        .map(|m| DeadLetter::new(&dead, m.clone()))
        .collect();
    give_back(held).await;
    Ok(letters)
}

/// The dead letter of task `task_id` in `queue`'s dead-letter queue, if there is one.
pub async fn inspect(
    broker: &dyn Broker,
    queue: &str,
    task_id: &str,
) -> Result<Option<DeadLetter>> {
    Ok(list(broker, queue, usize::MAX)
        .await?
        .into_iter()
        .find(|d| d.id() == task_id))
}

/// Sends dead letters of `queue` back to the queue they came from, without the dead-letter
/// headers and with a fresh delivery count: those whose task id is in `ids`, or all when `ids`
/// is `None`. Returns how many went back.
///
/// With a `backend`, the stored FAILURE of each requeued task (`DeliveryLimitExceeded`,
/// `NotRegistered`, ...) is forgotten first: a worker does not run a task id that already has
/// a ready result. Placeholders of undecodable messages are never requeued.
pub async fn requeue(
    broker: &dyn Broker,
    backend: Option<&dyn ResultBackend>,
    queue: &str,
    ids: Option<&[String]>,
) -> Result<u64> {
    let dead = dead_queue(queue);
    let held = take(broker, &dead, usize::MAX).await?;
    let mut moved = 0;
    let mut rest = Vec::new();
    let mut held = held.into_iter();
    while let Some(d) = held.next() {
        let letter = match &d.message {
            Ok(m) if m.task() != UNDECODABLE_TASK => DeadLetter::new(&dead, m.clone()),
            _ => {
                rest.push(d);
                continue;
            }
        };
        if ids.is_some_and(|ids| !ids.iter().any(|i| i == letter.id())) {
            rest.push(d);
            continue;
        }
        let r = send_back(broker, backend, &letter).await;
        if let Err(e) = r {
            rest.push(d);
            rest.extend(held);
            give_back(rest).await;
            return Err(e);
        }
        if let Err(e) = d.ack().await {
            // Sent back but still here too: it will run once, and show up here once more.
            tracing::warn!(error = %e, task_id = letter.id(), "cannot remove a requeued dead letter");
        }
        moved += 1;
    }
    give_back(rest).await;
    Ok(moved)
}

async fn send_back(
    broker: &dyn Broker,
    backend: Option<&dyn ResultBackend>,
    letter: &DeadLetter,
) -> Result<()> {
    if let Some(b) = backend {
        if b.get(letter.id())
            .await?
            .is_some_and(|m| m.status == TaskState::Failure)
        {
            b.forget(letter.id()).await?;
        }
    }
    let mut m = letter.message.clone();
    for h in HEADERS {
        m.headers.extra.remove(h);
    }
    broker.declare(&letter.queue).await?;
    let options = PublishOptions::default().priority(m.properties.priority);
    broker.publish(&letter.queue, &m, options).await
}

/// Deletes every dead letter of `queue`; returns how many.
pub async fn purge(broker: &dyn Broker, queue: &str) -> Result<u64> {
    broker.purge(&dead_queue(queue)).await
}

/// Leases up to `limit` of the ready messages of `dead`.
async fn take(broker: &dyn Broker, dead: &str, limit: usize) -> Result<Vec<Delivery>> {
    let ready = usize::try_from(broker.stats(dead).await?.ready).unwrap_or(usize::MAX);
    let want = ready.min(limit);
    if want == 0 {
        return Ok(Vec::new());
    }
    let queues = [dead.to_owned()];
    let mut consumer = broker
        .consume(&queues, ConsumeOptions::new(want).lease(LEASE))
        .await?;
    let mut held = Vec::with_capacity(want);
    while held.len() < want {
        match tokio::time::timeout(FETCH_WAIT, consumer.next()).await {
            Ok(Ok(Some(d))) => held.push(d),
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => {
                give_back(held).await;
                return Err(e);
            }
        }
    }
    Ok(held)
}

async fn give_back(held: Vec<Delivery>) {
    for d in held {
        if let Err(e) = d.reject(Requeue::Now).await {
            tracing::warn!(error = %e, "cannot hand a dead letter back; it returns when its lease ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_read_back_as_a_dead_letter() {
        let mut m = placeholder();
        assert_eq!(m.task(), UNDECODABLE_TASK);
        mark(&mut m, "celery", "DecodeError: bad", "w@h", 3);
        let d = DeadLetter::new("celery.dead", m);
        assert_eq!(d.queue, "celery");
        assert_eq!(d.reason, "DecodeError: bad");
        assert_eq!(d.worker.as_deref(), Some("w@h"));
        assert_eq!(d.deliveries, Some(3));
        assert!(d.dead_at.is_some_and(|t| t.ends_with('Z')));
        // Without headers (dead-lettered by hand), the queue comes from the name.
        let bare = DeadLetter::new("jobs.dead", placeholder());
        assert_eq!((bare.queue.as_str(), bare.reason.as_str()), ("jobs", ""));
    }
}
