//! Connections: URL parsing, opening, error mapping, channel callbacks and the confirming
//! publisher shared by the broker and the rpc backend.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use celeriac_core::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

use crate::options::AmqpOptions;

/// How long a publish waits for the broker's confirm before failing as transient.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a connection; a refused login or an unknown vhost is a non-transient config error.
pub(crate) async fn open(options: &AmqpOptions, name: &str) -> Result<Connection> {
    let mut args = OpenConnectionArguments::new(
        &options.host,
        options.port,
        &options.user,
        &options.password,
    );
    args.virtual_host(&options.vhost)
        .heartbeat(options.heartbeat)
        .connection_name(&format!("{} {name}", options.connection_name));
    let conn = Connection::open(&args.finish())
        .await
        .map_err(|e| map_open_error(e, &options.redacted))?;
    conn.register_callback(QuietConnection)
        .await
        .map_err(|e| broker_error("register connection callback", e).transient())?;
    Ok(conn)
}

fn map_open_error(e: amqprs::error::Error, redacted: &str) -> Error {
    let text = e.to_string();
    let refused = [
        "ACCESS_REFUSED",
        "NOT_ALLOWED",
        "access to vhost",
        "403",
        "530",
    ]
    .iter()
    .any(|m| text.contains(m));
    if refused {
        Error::new(
            ErrorKind::Config,
            format!("rabbitmq at {redacted} refused the login or the vhost (check user, password and vhost)"),
        )
        .with_source(Redacted(text))
    } else if text.contains("reset by peer") {
        // RabbitMQ drops the socket on a failed login unless the client announces
        // `authentication_failure_close`, which amqprs does not.
        Error::new(
            ErrorKind::Config,
            format!("rabbitmq at {redacted} closed the connection during login (wrong user or password?)"),
        )
        .with_source(Redacted(text))
    } else {
        Error::new(
            ErrorKind::Broker,
            format!("cannot connect to rabbitmq at {redacted}"),
        )
        .with_source(Redacted(text))
        .transient()
    }
}

/// A driver error turned into a text-only source (amqprs errors carry no secrets, but the text
/// is all we need).
#[derive(Debug)]
struct Redacted(String);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

/// Wraps an amqprs error: channel and network failures are transient.
pub(crate) fn broker_error(what: &str, e: amqprs::error::Error) -> Error {
    let text = e.to_string();
    let err = Error::new(ErrorKind::Broker, format!("rabbitmq: {what} failed"))
        .with_source(Redacted(text));
    match e {
        amqprs::error::Error::UriError(_) => err,
        _ => err.transient(),
    }
}

/// Whether an error text says the entity does not exist (a 404 on a passive declare).
pub(crate) fn is_not_found(e: &Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.to_string().contains("NOT_FOUND"))
}

/// Opens a channel on `conn` with the quiet callback (server cancels and closes are logged,
/// never fatal).
pub(crate) async fn channel(conn: &Connection) -> Result<Channel> {
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| broker_error("open channel", e))?;
    ch.register_callback(QuietChannel { confirms: None })
        .await
        .map_err(|e| broker_error("register channel callback", e))?;
    Ok(ch)
}

struct QuietConnection;

#[async_trait::async_trait]
impl ConnectionCallback for QuietConnection {
    async fn close(
        &mut self,
        _: &Connection,
        close: Close,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(reason = %close, "rabbitmq closed the connection");
        Ok(())
    }
    async fn blocked(&mut self, _: &Connection, reason: String) {
        tracing::warn!(%reason, "rabbitmq blocked the connection (resource alarm)");
    }
    async fn unblocked(&mut self, _: &Connection) {
        tracing::info!("rabbitmq unblocked the connection");
    }
    async fn secret_updated(&mut self, _: &Connection) {}
}

/// Publisher confirms waiting for the broker, by delivery tag.
#[derive(Default)]
pub(crate) struct Confirms {
    next: u64,
    pending: BTreeMap<u64, oneshot::Sender<bool>>,
}

impl Confirms {
    fn settle(&mut self, tag: u64, multiple: bool, ok: bool) {
        if multiple {
            let rest = self.pending.split_off(&(tag + 1));
            for (_, tx) in std::mem::replace(&mut self.pending, rest) {
                let _ = tx.send(ok);
            }
        } else if let Some(tx) = self.pending.remove(&tag) {
            let _ = tx.send(ok);
        }
    }
}

struct QuietChannel {
    confirms: Option<Arc<Mutex<Confirms>>>,
}

#[async_trait::async_trait]
impl ChannelCallback for QuietChannel {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::debug!(reason = %close, "rabbitmq closed a channel");
        if let Some(c) = &self.confirms {
            // Dropping the senders fails every waiting publish.
            c.lock().expect("confirms lock").pending.clear();
        }
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &Channel,
        cancel: Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(
            consumer_tag = %cancel.consumer_tag(),
            "rabbitmq cancelled a consumer (queue deleted?); it will be re-established"
        );
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        if let Some(c) = &self.confirms {
            c.lock()
                .expect("confirms lock")
                .settle(ack.delivery_tag(), ack.mutiple(), true);
        }
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        if let Some(c) = &self.confirms {
            c.lock()
                .expect("confirms lock")
                .settle(nack.delivery_tag(), nack.multiple(), false);
        }
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// One connection and one channel in confirm mode; publishing returns once RabbitMQ confirmed.
pub(crate) struct Publisher {
    conn: Connection,
    channel: Channel,
    confirms: Arc<Mutex<Confirms>>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.channel_id())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Opens a connection with a confirming channel.
    pub(crate) async fn open(options: &AmqpOptions, name: &str) -> Result<Self> {
        let conn = open(options, name).await?;
        let channel = conn
            .open_channel(None)
            .await
            .map_err(|e| broker_error("open channel", e))?;
        let confirms = Arc::new(Mutex::new(Confirms::default()));
        channel
            .register_callback(QuietChannel {
                confirms: Some(confirms.clone()),
            })
            .await
            .map_err(|e| broker_error("register channel callback", e))?;
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .map_err(|e| broker_error("confirm.select", e))?;
        let watch = conn.clone();
        let on_failure = confirms.clone();
        tokio::spawn(async move {
            watch.listen_network_io_failure().await;
            on_failure.lock().expect("confirms lock").pending.clear();
        });
        Ok(Publisher {
            conn,
            channel,
            confirms,
        })
    }

    /// Whether the connection and channel are still usable.
    pub(crate) fn is_open(&self) -> bool {
        self.conn.is_open() && self.channel.is_open()
    }

    /// The connection (for admin channels).
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one message and returns the confirm to wait for. Call under the publisher lock so
    /// tags are assigned in the order the broker sees the messages.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Result<oneshot::Receiver<bool>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut c = self.confirms.lock().expect("confirms lock");
            c.next += 1;
            let tag = c.next;
            c.pending.insert(tag, tx);
        }
        self.channel
            .basic_publish(
                properties,
                body,
                BasicPublishArguments::new(exchange, routing_key),
            )
            .await
            .map_err(|e| broker_error("basic.publish", e))?;
        Ok(rx)
    }

    /// Closes the connection.
    pub(crate) async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// Waits for the confirm of one publish.
pub(crate) async fn confirmed(rx: oneshot::Receiver<bool>, queue: &str) -> Result<()> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, rx).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(Error::broker(format!(
            "rabbitmq refused (nacked) a message for {queue}"
        ))
        .transient()),
        Ok(Err(_)) => Err(Error::broker(format!(
            "the connection was lost before rabbitmq confirmed a message for {queue}"
        ))
        .transient()),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("rabbitmq did not confirm a message for {queue} within {CONFIRM_TIMEOUT:?}"),
        )
        .transient()),
    }
}

/// Exponential backoff from 100 ms to 5 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}

/// Resolves once the watched flag is true (or its sender is gone).
pub(crate) async fn closed_signal(rx: &mut tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
