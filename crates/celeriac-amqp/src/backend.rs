//! [`RpcBackend`]: Celery's `rpc://` result backend — results travel as messages to the
//! caller's own reply queue.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, ReplyQueue, ResultBackend, timeout_error};
use celeriac_core::broker::BoxFuture;
use celeriac_core::protocol::new_id;
use celeriac_core::{Config, Error, ErrorKind, Result, TaskMeta};
use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};

use crate::conn::{self, Publisher, Servers, broker_error, confirmed};
use crate::fields::to_table;
use crate::options::AmqpOptions;
use crate::wire::{Channel, Properties, QueueDeclare};

/// Celery's `rpc://` backend on RabbitMQ.
///
/// - **Client side**: declares its reply queue `<oid>` (a UUID; auto-delete, `x-expires` =
///   `result_expires`), consumes it, and keeps the latest state of every task id it receives.
///   [`get`](ResultBackend::get) and [`wait`](ResultBackend::wait) read that buffer.
/// - **Worker side**: [`store`](ResultBackend::store) publishes the meta to the default
///   exchange with the task message's `reply_to` (which the worker copies into
///   [`TaskMeta::reply_to`]) as routing key and the task id as
///   `correlation_id`, transient, as Celery does — one message per state change. A store
///   returns once RabbitMQ confirmed the message, so the worker acks a task only after its
///   result is held; it holds no lock while it waits, so the results of all the tasks in
///   flight are pipelined on the one publisher channel (up to 1,024 unconfirmed) and their
///   frames share writes.
///
/// Only the process that sent a task can read its result; `get` for another id is `None`
/// (PENDING). Groups, chords and counters are unsupported, as in Celery.
#[derive(Clone)]
pub struct RpcBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// The settings and the servers, with the one connections go to now.
    servers: Arc<Servers>,
    oid: String,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    results: Mutex<HashMap<String, TaskMeta>>,
    changed: watch::Sender<u64>,
    closed: watch::Sender<bool>,
}

impl fmt::Debug for RpcBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcBackend")
            .field("url", &self.inner.servers.options().redacted)
            .field("reply_queue", &self.inner.oid)
            .finish_non_exhaustive()
    }
}

impl RpcBackend {
    /// Connects to the RabbitMQ at `url`, declares the reply queue and starts consuming it.
    ///
    /// A bare `rpc://` connects to the broker's servers when the configured broker is
    /// RabbitMQ (its failover list included), as Celery's rpc backend shares the broker's
    /// connection; otherwise guest on localhost. `rpc://user:pass@host//`, `amqp://...` URLs
    /// and `;`-separated lists as for [`AmqpBroker`](crate::AmqpBroker) name their servers.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        let options = AmqpOptions::from_url(Self::server_url(url, config), config)?;
        let servers = Servers::new(options);
        let publisher = Publisher::open(&servers, "rpc").await?;
        let inner = Arc::new(Inner {
            servers,
            oid: new_id(),
            publisher: tokio::sync::Mutex::new(Some(publisher)),
            results: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            closed: watch::channel(false).0,
        });
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        tokio::spawn(run_reply_consumer(inner.clone(), ready_tx));
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(Error::backend("rpc reply consumer ended before it started")),
        }
        Ok(RpcBackend { inner })
    }

    /// Where a backend URL connects: a bare `rpc://` means the broker's servers (failover
    /// list included) when the broker is RabbitMQ, as Celery's rpc backend uses the broker's
    /// connection; an `rpc://` URL with a host names its own server.
    fn server_url<'a>(url: &'a str, config: &'a Config) -> &'a str {
        let bare = url
            .strip_prefix("rpc://")
            .is_some_and(|rest| rest.trim_matches('/').is_empty());
        let broker = config.broker_url();
        let on_rabbitmq =
            celeriac_core::url::scheme(broker).is_some_and(|s| crate::BROKER_SCHEMES.contains(&s));
        if bare && on_rabbitmq { broker } else { url }
    }

    /// The reply queue this backend consumes (Celery's `thread_oid`).
    pub fn reply_queue(&self) -> &str {
        &self.inner.oid
    }

    fn unsupported(what: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("the rpc result backend cannot {what} (as in Celery); use redis or sqlite"),
        )
    }
}

fn reply_queue_args(options: &AmqpOptions) -> QueueDeclare {
    let mut args = Map::new();
    if let Some(e) = options.reply_expires {
        args.insert("x-expires".to_owned(), json!(e.as_millis() as u64));
    }
    QueueDeclare {
        auto_delete: true,
        arguments: to_table(&args),
        ..QueueDeclare::default()
    }
}

async fn declare_reply_queue(ch: &Channel, inner: &Inner) -> Result<()> {
    ch.queue_declare(&inner.oid, &reply_queue_args(inner.servers.options()))
        .await
        .map_err(|e| broker_error("declare reply queue", e))?;
    Ok(())
}

/// Consumes the reply queue until the backend closes, reconnecting with backoff.
async fn run_reply_consumer(inner: Arc<Inner>, ready: mpsc::Sender<Result<()>>) {
    let mut attempt = 0u32;
    let mut ready = Some(ready);
    loop {
        if *inner.closed.borrow() {
            return;
        }
        let r = reply_session(&inner, &mut ready, &mut attempt).await;
        if let Err(e) = r {
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err(e)).await;
                return;
            }
            tracing::warn!(url = %inner.servers.options().redacted, error = %e, "rpc reply consumer failed; reconnecting");
        }
        let mut closed = inner.closed.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(conn::backoff(attempt)) => {}
            _ = conn::closed_signal(&mut closed) => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

async fn reply_session(
    inner: &Arc<Inner>,
    ready: &mut Option<mpsc::Sender<Result<()>>>,
    attempt: &mut u32,
) -> Result<()> {
    let (connection, _) = conn::open(&inner.servers, "rpc consumer").await?;
    let result = async {
        let ch = conn::channel(&connection).await?;
        declare_reply_queue(&ch, inner).await?;
        let (_, mut rx) = ch
            .basic_consume(&inner.oid, true)
            .await
            .map_err(|e| broker_error("basic.consume", e))?;
        if let Some(tx) = ready.take() {
            let _ = tx.send(Ok(())).await;
        }
        *attempt = 0;
        let mut closed = inner.closed.subscribe();
        let lost = connection.closed();
        tokio::pin!(lost);
        loop {
            tokio::select! {
                _ = conn::closed_signal(&mut closed) => return Ok(()),
                _ = &mut lost => return Err(Error::backend("rpc reply connection lost").transient()),
                m = rx.recv() => {
                    let Some(m) = m else {
                        return Err(Error::backend("rpc reply consumer was cancelled").transient());
                    };
                    inner.receive(&m.properties, &m.body);
                }
            }
        }
    }
    .await;
    let _ = connection.close().await;
    result
}

impl Inner {
    fn receive(&self, properties: &Properties, body: &[u8]) {
        let meta: TaskMeta = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "rpc reply is not a json task meta; dropped");
                return;
            }
        };
        let id = properties
            .correlation_id
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| meta.task_id.clone());
        let mut results = self.results.lock().expect("results lock");
        let keep = results
            .get(&id)
            .is_none_or(|old| old.status.may_be_replaced_by(&meta.status));
        if keep {
            results.insert(id, meta);
            drop(results);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

impl ReplyQueue for RpcBackend {
    fn reply_to(&self) -> &str {
        &self.inner.oid
    }
}

impl ResultBackend for RpcBackend {
    fn driver(&self) -> &'static str {
        "rpc"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if *self.inner.closed.borrow() {
                return Err(Error::closed("rpc backend"));
            }
            let Some(reply_to) = meta.reply_to.as_deref() else {
                tracing::debug!(task_id = %meta.task_id, "the task's message named no reply_to; rpc result not sent");
                return Ok(false);
            };
            let body = serde_json::to_vec(meta)?;
            let p = Properties {
                content_type: Some("application/json".to_owned()),
                content_encoding: Some("utf-8".to_owned()),
                correlation_id: Some(meta.task_id.clone()),
                delivery_mode: Some(1),
                ..Properties::default()
            };
            let rx = {
                let mut guard = self.inner.publisher.lock().await;
                if !guard.as_ref().is_some_and(Publisher::is_open) {
                    *guard = Some(Publisher::open(&self.inner.servers, "rpc").await?);
                }
                let publisher = guard.as_ref().expect("publisher just opened");
                match publisher.send("", reply_to, &p, &body).await {
                    Ok(rx) => rx,
                    Err(e) => {
                        *guard = None;
                        return Err(e);
                    }
                }
            };
            confirmed(rx, reply_to).await?;
            Ok(true)
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            Ok(self
                .inner
                .results
                .lock()
                .expect("results lock")
                .get(task_id)
                .cloned())
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let mut changed = self.inner.changed.subscribe();
            loop {
                if let Some(m) = self
                    .inner
                    .results
                    .lock()
                    .expect("results lock")
                    .get(task_id)
                    .filter(|m| m.status.is_ready())
                {
                    return Ok(m.clone());
                }
                if *self.inner.closed.borrow() {
                    return Err(Error::closed("rpc backend"));
                }
                let next = changed.changed();
                match deadline {
                    Some(d) => match tokio::time::timeout_at(d, next).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(Error::closed("rpc backend")),
                        Err(_) => return Err(timeout_error(task_id, timeout)),
                    },
                    None => {
                        if next.await.is_err() {
                            return Err(Error::closed("rpc backend"));
                        }
                    }
                }
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.inner
                .results
                .lock()
                .expect("results lock")
                .remove(task_id);
            Ok(())
        })
    }

    fn save_group<'a>(&'a self, _: &'a str, _: &'a [String]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Err(Self::unsupported("save groups")) })
    }

    fn restore_group<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move { Err(Self::unsupported("restore groups")) })
    }

    fn incr<'a>(&'a self, _: &'a str, _: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move { Err(Self::unsupported("count chord parts")) })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        BackendCapabilities::none().reply_queue(self)
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.send_replace(true);
            self.inner.changed.send_modify(|n| *n += 1);
            if let Some(p) = self.inner.publisher.lock().await.take() {
                p.close().await;
            }
            Ok(())
        })
    }
}
