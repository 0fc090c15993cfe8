//! The broadcast channels on RabbitMQ: Celery's pidbox (remote control) and `celeryev`
//! (events), declared and published as kombu 5.7 and Celery 5.7 do (celery-wire.md §8.1, §10,
//! §11), so `celery inspect`, `celery control`, `celery events` and Flower see our nodes and
//! we see theirs.
//!
//! # Entities (Celery's defaults)
//!
//! | entity | declaration |
//! |---|---|
//! | exchange `celery.pidbox` | `fanout`, not durable, not auto-delete (kombu's `Mailbox(type="fanout")`) |
//! | node queue `<node>.celery.pidbox` | not durable, exclusive, auto-delete, `{"x-expires": 10000, "x-message-ttl": 300000}` (`control_queue_expires` 10 s, `control_queue_ttl` 300 s); bound with key `""` |
//! | exchange `reply.celery.pidbox` | `direct`, not durable, not auto-delete |
//! | reply queue `<key>.reply.celery.pidbox` | as the node queue, same arguments; bound with key `<key>` |
//! | exchange `celeryev` | `topic`, durable, not auto-delete (kombu's `Exchange` defaults) |
//! | event queue `celeryev.<uuid>` | not durable, exclusive, auto-delete, `{"x-message-ttl": 5000, "x-expires": 60000}` (`event_queue_ttl` 5 s, `event_queue_expires` 60 s); bound with the inbox's binding (`#` in Celery's `EventReceiver`) |
//!
//! Arguments are integers sent as `I` (signed 32-bit), as py-amqp sends them, so a Python
//! node declaring the same entities gets no PRECONDITION_FAILED. Every exchange is declared
//! before the first publish to it, as kombu does (`declare=[exchange]`).
//!
//! Messages carry `content_type` `application/json`, `content_encoding` `utf-8`,
//! `delivery_mode` 1 (transient), `priority` 0, the message's headers as the field table and
//! its routing key. Consumers are no-ack, as kombu's pidbox and event consumers are. A
//! delivery that is not JSON (another content type, a body that does not parse, properties
//! that cannot be decoded) is logged at `warn` and skipped; the inbox goes on.
//!
//! # Connections and channels
//!
//! Sending uses one connection per broker for every broadcast (named `broadcast`), apart from
//! the task publisher, with one confirming channel: a send returns once RabbitMQ has taken the
//! message (routed, or dropped because nobody listens). Exchanges are declared once per
//! connection, each on a throwaway channel, so a refused declaration closes only that channel.
//! A lost connection is reopened by the next send.
//!
//! Each inbox has its own connection and channel, run by a task. Exclusive queues belong to
//! the connection that declared them, so a node's control queue lives exactly as long as its
//! inbox: dropping the inbox, or the process dying, deletes it at once, and the node name is
//! free again (a second node with the same name is refused with 405 RESOURCE_LOCKED, which
//! [`control_inbox`](Broadcast::control_inbox) reports as a config error). When the connection
//! is lost the task reconnects with backoff and declares the same queue and binding again;
//! what was broadcast meanwhile is lost, as in Celery (delivery is at most once). Consumers
//! being no-ack, RabbitMQ pushes messages as fast as they come: an inbox holds up to 1024 for
//! a reader that falls behind and drops the rest (counted in a `warn` log), so a reader that
//! stops reading costs bounded memory.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use celeriac_core::broadcast::{
    Broadcast, Broadcasted, CONTROL_EXCHANGE, EVENT_EXCHANGE, Inbox, REPLY_EXCHANGE,
};
use celeriac_core::broker::BoxFuture;
use celeriac_core::protocol::new_id;
use celeriac_core::{Error, ErrorKind, Result};
use serde_json::{Map, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conn::{self, Publisher, Servers, broker_error, confirmed};
use crate::fields::{from_table, to_table};
use crate::wire::{Channel, Connection, Delivery, Properties, QueueDeclare, WireError};

/// `x-message-ttl` of node and reply queues (Celery's `control_queue_ttl`, 300 s).
const CONTROL_QUEUE_TTL_MS: i64 = 300_000;
/// `x-expires` of node and reply queues (Celery's `control_queue_expires`, 10 s).
const CONTROL_QUEUE_EXPIRES_MS: i64 = 10_000;
/// `x-message-ttl` of event queues (Celery's `event_queue_ttl`, 5 s).
const EVENT_QUEUE_TTL_MS: i64 = 5_000;
/// `x-expires` of event queues (Celery's `event_queue_expires`, 60 s).
const EVENT_QUEUE_EXPIRES_MS: i64 = 60_000;
/// The prefix of event queue names (Celery's `event_queue_prefix`).
const EVENT_QUEUE_PREFIX: &str = "celeryev";
/// How many times a send reconnects before it fails.
const ATTEMPTS: u32 = 8;
/// How many received messages an inbox holds for a reader that does not keep up; beyond, new
/// ones are dropped (and counted in a `warn` log), as a lagging listener misses messages in
/// Celery. Consumers are no-ack, so RabbitMQ never holds them back for us.
const INBOX_CAPACITY: usize = 1024;

/// An exchange, as kombu declares it (never auto-delete, no arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exchange {
    name: &'static str,
    kind: &'static str,
    durable: bool,
}

/// `Mailbox._get_exchange`: fanout (Celery's `Control` asks for it), `durable=False`.
const CONTROL: Exchange = Exchange {
    name: CONTROL_EXCHANGE,
    kind: "fanout",
    durable: false,
};
/// `Mailbox._get_reply_exchange` and `_publish_reply`: direct, `durable=False`.
const REPLY: Exchange = Exchange {
    name: REPLY_EXCHANGE,
    kind: "direct",
    durable: false,
};
/// `celery.events.event.event_exchange`: topic, kombu's defaults (durable).
const EVENTS: Exchange = Exchange {
    name: EVENT_EXCHANGE,
    kind: "topic",
    durable: true,
};

/// The declaration of a node, reply or event queue: not durable, exclusive, auto-delete, with
/// `x-expires` and `x-message-ttl` in ms.
fn transient_queue(ttl_ms: i64, expires_ms: i64) -> QueueDeclare {
    let mut args = Map::new();
    args.insert("x-expires".to_owned(), json!(expires_ms));
    args.insert("x-message-ttl".to_owned(), json!(ttl_ms));
    QueueDeclare {
        exclusive: true,
        auto_delete: true,
        arguments: to_table(&args),
        ..QueueDeclare::default()
    }
}

/// What one inbox declares, binds and consumes.
#[derive(Debug, Clone)]
struct Listen {
    /// `control`, `reply` or `event`, for logs and the connection name.
    what: &'static str,
    exchange: Exchange,
    queue: String,
    binding: String,
    declare: QueueDeclare,
}

impl Listen {
    fn control(node: &str) -> Self {
        Listen {
            what: "control",
            exchange: CONTROL,
            queue: format!("{node}.{CONTROL_EXCHANGE}"),
            binding: String::new(),
            declare: transient_queue(CONTROL_QUEUE_TTL_MS, CONTROL_QUEUE_EXPIRES_MS),
        }
    }

    fn reply(key: &str) -> Self {
        Listen {
            what: "reply",
            exchange: REPLY,
            queue: format!("{key}.{REPLY_EXCHANGE}"),
            binding: key.to_owned(),
            declare: transient_queue(CONTROL_QUEUE_TTL_MS, CONTROL_QUEUE_EXPIRES_MS),
        }
    }

    fn event(binding: &str) -> Self {
        Listen {
            what: "event",
            exchange: EVENTS,
            queue: format!("{EVENT_QUEUE_PREFIX}.{}", new_id()),
            binding: binding.to_owned(),
            declare: transient_queue(EVENT_QUEUE_TTL_MS, EVENT_QUEUE_EXPIRES_MS),
        }
    }
}

/// A refused declaration: 406 (declared elsewhere with other settings) and 405 (an exclusive
/// queue held by another connection) are config errors; the rest is transient.
fn declare_error(what: &str, name: &str, e: WireError) -> Error {
    match e.reply_code() {
        Some(406) => Error::new(
            ErrorKind::Config,
            format!(
                "rabbitmq refused to declare {what} {name} as celery declares it: it exists with other settings"
            ),
        )
        .with_source(e),
        Some(405) => Error::new(
            ErrorKind::Config,
            format!(
                "the queue {name} is held by another connection (is another node with this name running?)"
            ),
        )
        .with_source(e),
        _ => broker_error(&format!("declare {what} {name}"), e),
    }
}

async fn declare_exchange(ch: &Channel, x: Exchange) -> Result<()> {
    ch.exchange_declare(x.name, x.kind, x.durable)
        .await
        .map_err(|e| declare_error("exchange", x.name, e))
}

/// The AMQP properties and body of a broadcast message.
fn encode(m: &Broadcasted) -> Result<(Properties, Vec<u8>)> {
    let (content_type, body) = m.wire_body();
    let mut p = properties(&m.headers);
    p.content_type = Some(content_type.to_owned());
    Ok((p, body))
}

/// The properties of a broadcast message with `headers`.
fn properties(headers: &serde_json::Map<String, serde_json::Value>) -> Properties {
    Properties {
        content_type: Some("application/json".to_owned()),
        content_encoding: Some("utf-8".to_owned()),
        headers: Some(to_table(headers)),
        delivery_mode: Some(1),
        priority: Some(0),
        ..Properties::default()
    }
}

/// Reads a delivery of a broadcast queue; the error says why it is skipped.
fn decode(d: Delivery) -> Result<Broadcasted> {
    if let Some(why) = d.malformed {
        return Err(Error::protocol(format!(
            "its amqp properties cannot be decoded: {why}"
        )));
    }
    let Some(content_type) = d.properties.content_type.as_deref() else {
        return Err(Error::protocol("its content type is missing"));
    };
    let (body, signed) = Broadcasted::read_body(
        Some(content_type),
        d.properties.content_encoding.as_deref(),
        &d.body,
    )?;
    let headers = d
        .properties
        .headers
        .as_ref()
        .map(from_table)
        .unwrap_or_default();
    let mut m = Broadcasted::new(d.routing_key, headers, body);
    m.signed = signed;
    Ok(m)
}

/// The sending connection and the exchanges declared on it.
struct Sender {
    publisher: Publisher,
    declared: HashSet<&'static str>,
}

/// An [`AmqpBroker`](crate::AmqpBroker)'s broadcast channels. See the [module docs](self).
pub(crate) struct AmqpBroadcast {
    /// The broker's servers (shared with its other connections).
    servers: Arc<Servers>,
    sender: tokio::sync::Mutex<Option<Sender>>,
    /// The broker's closed flag.
    closed: watch::Receiver<bool>,
}

impl fmt::Debug for AmqpBroadcast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroadcast")
            .field("url", &self.servers.options().redacted)
            .finish_non_exhaustive()
    }
}

impl AmqpBroadcast {
    /// The channels of a broker on `servers`, which stop when `closed` turns true. Connects
    /// on first use.
    pub(crate) fn new(servers: Arc<Servers>, closed: watch::Receiver<bool>) -> Self {
        AmqpBroadcast {
            servers,
            sender: tokio::sync::Mutex::new(None),
            closed,
        }
    }

    fn check_open(&self) -> Result<()> {
        if *self.closed.borrow() {
            return Err(Error::closed("amqp broker"));
        }
        Ok(())
    }

    /// Closes the sending connection (the broker's `close`; inboxes stop on the flag).
    pub(crate) async fn close(&self) {
        if let Some(s) = self.sender.lock().await.take() {
            s.publisher.close().await;
        }
    }

    /// Publishes `m` to `exchange` (declared first, once per sending connection) and waits
    /// for RabbitMQ's confirm.
    async fn publish(&self, exchange: Exchange, m: &Broadcasted) -> Result<()> {
        let (properties, body) = encode(m)?;
        self.publish_encoded(exchange, &m.routing_key, &properties, &body)
            .await
    }

    /// Publishes an encoded message to `exchange` under `routing_key` (the exchange declared
    /// first, once per sending connection) and waits for RabbitMQ's confirm.
    async fn publish_encoded(
        &self,
        exchange: Exchange,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<()> {
        self.check_open()?;
        let rx = {
            let mut guard = self.sender.lock().await;
            self.check_open()?;
            if !guard.as_ref().is_some_and(|s| s.publisher.is_open()) {
                let publisher =
                    conn::reopen_publisher(&self.servers, "broadcast", ATTEMPTS).await?;
                *guard = Some(Sender {
                    publisher,
                    declared: HashSet::new(),
                });
            }
            let s = guard.as_mut().expect("sender just opened");
            if !s.declared.contains(exchange.name) {
                let ch = conn::channel(s.publisher.connection()).await?;
                let r = declare_exchange(&ch, exchange).await;
                let _ = ch.close().await;
                r?;
                s.declared.insert(exchange.name);
            }
            match s
                .publisher
                .send(exchange.name, routing_key, properties, body)
                .await
            {
                Ok(rx) => rx,
                Err(e) => {
                    *guard = None;
                    return Err(e);
                }
            }
        };
        confirmed(rx, exchange.name).await
    }

    /// Starts the task of an inbox and returns once its queue is declared, bound and consumed.
    async fn open_inbox(&self, listen: Listen) -> Result<AmqpInbox> {
        self.check_open()?;
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let queue = listen.queue.clone();
        tokio::spawn(run_inbox(
            self.servers.clone(),
            self.closed.clone(),
            listen,
            tx,
            ready_tx,
        ));
        match ready_rx.await {
            Ok(Ok(())) => Ok(AmqpInbox { queue, rx }),
            Ok(Err(e)) => Err(e),
            // The task ended without a word: the broker closed meanwhile.
            Err(_) => Err(Error::closed("amqp broker")),
        }
    }
}

impl Broadcast for AmqpBroadcast {
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self.open_inbox(Listen::control(node)).await?;
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.publish(CONTROL, message))
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            let key = new_id();
            let inbox = self.open_inbox(Listen::reply(&key)).await?;
            Ok((key, Box::new(inbox) as Box<dyn Inbox>))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.publish(REPLY, message))
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.publish(EVENTS, message))
    }

    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a serde_json::Map<String, serde_json::Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let properties = properties(headers);
            self.publish_encoded(EVENTS, routing_key, &properties, body.as_bytes())
                .await
        })
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self.open_inbox(Listen::event(binding)).await?;
            Ok(Box::new(inbox) as Box<dyn Inbox>)
        })
    }
}

/// The messages of one broadcast queue, from its task; dropping it stops the task, which
/// closes the connection (and RabbitMQ deletes the exclusive queue).
struct AmqpInbox {
    queue: String,
    rx: mpsc::Receiver<Broadcasted>,
}

impl fmt::Debug for AmqpInbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpInbox")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Inbox for AmqpInbox {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move { Ok(self.rx.recv().await) })
    }
}

/// Runs one inbox until the broker closes or the inbox is dropped, reconnecting with backoff
/// whenever the connection or channel is lost. The first session's outcome goes to `ready`.
async fn run_inbox(
    servers: Arc<Servers>,
    mut closed: watch::Receiver<bool>,
    listen: Listen,
    tx: mpsc::Sender<Broadcasted>,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut attempt = 0u32;
    loop {
        match session(&servers, &closed, &listen, &tx, &mut ready, &mut attempt).await {
            Ok(()) => return,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                tracing::warn!(url = %servers.options().redacted, inbox = listen.what, queue = %listen.queue, error = %e, attempt, "rabbitmq broadcast inbox lost its connection; reconnecting");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(conn::backoff(attempt)) => {}
            _ = conn::closed_signal(&mut closed) => return,
            _ = tx.closed() => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

/// One connection's life of an inbox: `Ok` when it should stop, `Err` when it should
/// reconnect (or, before it was ever ready, fail).
async fn session(
    servers: &Arc<Servers>,
    closed: &watch::Receiver<bool>,
    listen: &Listen,
    tx: &mpsc::Sender<Broadcasted>,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
    attempt: &mut u32,
) -> Result<()> {
    if *closed.borrow() || tx.is_closed() {
        return Ok(());
    }
    let (connection, host) = conn::open(servers, &format!("{} inbox", listen.what)).await?;
    let r = listen_on(
        servers.url(host),
        &connection,
        closed,
        listen,
        tx,
        ready,
        attempt,
    )
    .await;
    let _ = connection.close().await;
    r
}

async fn listen_on(
    url: &str,
    connection: &Connection,
    closed: &watch::Receiver<bool>,
    listen: &Listen,
    tx: &mpsc::Sender<Broadcasted>,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
    attempt: &mut u32,
) -> Result<()> {
    let ch = conn::channel(connection).await?;
    declare_exchange(&ch, listen.exchange).await?;
    ch.queue_declare(&listen.queue, &listen.declare)
        .await
        .map_err(|e| declare_error("queue", &listen.queue, e))?;
    ch.queue_bind(&listen.queue, listen.exchange.name, &listen.binding)
        .await
        .map_err(|e| broker_error("queue.bind", e))?;
    let (_, mut deliveries) = ch
        .basic_consume(&listen.queue, true)
        .await
        .map_err(|e| broker_error("basic.consume", e))?;
    match ready.take() {
        Some(r) => {
            if r.send(Ok(())).is_err() {
                // The caller gave up waiting.
                return Ok(());
            }
        }
        None => {
            tracing::info!(url = %url, inbox = listen.what, queue = %listen.queue, "rabbitmq broadcast inbox resumed");
        }
    }
    *attempt = 0;
    let mut closed = closed.clone();
    let lost = connection.closed();
    tokio::pin!(lost);
    let mut missed = 0u64;
    loop {
        tokio::select! {
            _ = conn::closed_signal(&mut closed) => return Ok(()),
            _ = tx.closed() => return Ok(()),
            why = &mut lost => return Err(broker_error("broadcast inbox connection", why)),
            d = deliveries.recv() => {
                let Some(d) = d else {
                    return Err(Error::broker(format!(
                        "rabbitmq ended the consumer of {} (channel closed or queue deleted)",
                        listen.queue
                    ))
                    .transient());
                };
                let (exchange, routing_key) = (d.exchange.clone(), d.routing_key.clone());
                match decode(d) {
                    Ok(m) => match tx.try_send(m) {
                        Ok(()) if missed > 0 => {
                            tracing::warn!(queue = %listen.queue, missed, "a broadcast inbox fell behind; messages were dropped");
                            missed = 0;
                        }
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => missed += 1,
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    },
                    Err(e) => {
                        tracing::warn!(queue = %listen.queue, %exchange, %routing_key, error = %e, "skipped a broadcast message that is not json");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FieldValue;

    fn delivery(properties: Properties, body: &[u8]) -> Delivery {
        Delivery {
            delivery_tag: 1,
            redelivered: false,
            exchange: EVENT_EXCHANGE.to_owned(),
            routing_key: "worker.heartbeat".to_owned(),
            properties,
            malformed: None,
            body: body.to_vec(),
        }
    }

    #[test]
    fn entities_are_named_and_declared_as_kombu_does() {
        let c = Listen::control("w1@host");
        assert_eq!(
            (c.queue.as_str(), c.binding.as_str(), c.exchange),
            ("w1@host.celery.pidbox", "", CONTROL)
        );
        let r = Listen::reply("k");
        assert_eq!(
            (r.queue.as_str(), r.binding.as_str(), r.exchange),
            ("k.reply.celery.pidbox", "k", REPLY)
        );
        let e = Listen::event("#");
        assert!(e.queue.starts_with("celeryev."), "{}", e.queue);
        assert_eq!((e.binding.as_str(), e.exchange), ("#", EVENTS));
        assert_ne!(e.queue, Listen::event("#").queue, "one queue per receiver");

        for (l, ttl, expires) in [
            (&c, 300_000, 10_000),
            (&r, 300_000, 10_000),
            (&e, 5_000, 60_000),
        ] {
            let d = &l.declare;
            assert!(
                !d.durable && d.exclusive && d.auto_delete && !d.passive,
                "{}",
                l.what
            );
            assert_eq!(d.arguments.len(), 2);
            assert_eq!(d.arguments["x-message-ttl"], FieldValue::I32(ttl));
            assert_eq!(d.arguments["x-expires"], FieldValue::I32(expires));
        }
        assert_eq!((CONTROL.kind, CONTROL.durable), ("fanout", false));
        assert_eq!((REPLY.kind, REPLY.durable), ("direct", false));
        assert_eq!((EVENTS.kind, EVENTS.durable), ("topic", true));
    }

    #[test]
    fn messages_go_out_as_kombu_sends_them_and_come_back() {
        let mut headers = Map::new();
        headers.insert("clock".to_owned(), json!(7));
        headers.insert("expires".to_owned(), json!(1.5e9));
        let m = Broadcasted::new("", headers, json!({"method": "ping", "arguments": {}}));
        let (p, body) = encode(&m).unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!((p.delivery_mode, p.priority), (Some(1), Some(0)));
        let h = p.headers.as_ref().unwrap();
        assert_eq!(h["clock"], FieldValue::I32(7));
        assert_eq!(h["expires"], FieldValue::F64(1.5e9));
        let mut d = delivery(p, &body);
        d.routing_key = String::new();
        assert_eq!(decode(d).unwrap(), m);

        // A signed body (serializer auth) travels as its text, marked application/data.
        let signed = Broadcasted {
            body: json!("c2lnbmVk"),
            signed: true,
            ..m
        };
        let (p, body) = encode(&signed).unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/data"));
        assert_eq!(body, b"c2lnbmVk");
        let mut d = delivery(p, &body);
        d.routing_key = String::new();
        assert_eq!(decode(d).unwrap(), signed);
    }

    #[test]
    fn what_is_not_json_is_refused_with_a_reason() {
        let json_props = || Properties {
            content_type: Some("application/json".to_owned()),
            ..Properties::default()
        };
        let ok = decode(delivery(json_props(), br#"{"type": "worker-heartbeat"}"#)).unwrap();
        assert_eq!(ok.routing_key, "worker.heartbeat");
        assert!(ok.headers.is_empty());

        let reason = |p: Properties, body: &[u8], malformed: Option<&str>| {
            let mut d = delivery(p, body);
            d.malformed = malformed.map(str::to_owned);
            decode(d).unwrap_err().to_string()
        };
        let pickle = Properties {
            content_type: Some("application/x-python-serialize".to_owned()),
            ..Properties::default()
        };
        assert!(reason(pickle, b"\x80\x04.", None).contains("x-python-serialize"));
        assert!(reason(Properties::default(), b"{}", None).contains("missing"));
        assert!(reason(json_props(), b"not json", None).contains("not JSON"));
        let mut latin1 = json_props();
        latin1.content_encoding = Some("latin-1".to_owned());
        assert!(reason(latin1, b"{}", None).contains("latin-1"));
        assert!(
            reason(json_props(), b"{}", Some("unknown field type tag"))
                .contains("unknown field type tag")
        );
    }
}
