//! Connections: opening, error mapping, and the confirming publisher shared by the broker and
//! the rpc backend, on the crate's own client ([`crate::wire`]).

use std::fmt;
use std::time::Duration;

use celeriac_core::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

use crate::options::AmqpOptions;
use crate::wire::{Channel, Connection, ConnectionParams, Properties, WireError};

/// How long a publish waits for the broker's confirm before failing as transient.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The client's connection parameters for `options`.
pub(crate) fn params(options: &AmqpOptions, name: &str) -> ConnectionParams {
    let mut p = ConnectionParams::new(&options.host, options.port);
    p.user.clone_from(&options.user);
    p.password.clone_from(&options.password);
    p.vhost.clone_from(&options.vhost);
    p.heartbeat = options.heartbeat;
    p.name = format!("{} {name}", options.connection_name);
    p.tls.clone_from(&options.tls);
    p
}

/// Opens a connection; a refused login, an unknown vhost or an untrusted TLS certificate is a
/// non-transient config error.
pub(crate) async fn open(options: &AmqpOptions, name: &str) -> Result<Connection> {
    Connection::open(&params(options, name))
        .await
        .map_err(|e| map_open_error(e, &options.redacted))
}

fn map_open_error(e: WireError, redacted: &str) -> Error {
    match &e {
        WireError::ConnectionClosed(r) if matches!(r.code, 403 | 530) => Error::new(
            ErrorKind::Config,
            format!(
                "rabbitmq at {redacted} refused the login or the vhost (check user, password and vhost)"
            ),
        )
        .with_source(e),
        WireError::Io(text) if text.contains("during login") => Error::new(
            ErrorKind::Config,
            format!(
                "rabbitmq at {redacted} closed the connection during login (wrong user or password?)"
            ),
        )
        .with_source(e),
        WireError::Tls(_) => Error::new(
            ErrorKind::Config,
            format!(
                "tls handshake with rabbitmq at {redacted} failed (certificate not trusted or wrong host name? see cacert/ssl_ca_certs)"
            ),
        )
        .with_source(e),
        _ => Error::new(
            ErrorKind::Broker,
            format!("cannot connect to rabbitmq at {redacted}"),
        )
        .with_source(e)
        .transient(),
    }
}

/// Wraps a client error: channel and network failures are transient.
pub(crate) fn broker_error(what: &str, e: WireError) -> Error {
    let transient = !matches!(e, WireError::Protocol(_));
    let err = Error::new(ErrorKind::Broker, format!("rabbitmq: {what} failed")).with_source(e);
    if transient { err.transient() } else { err }
}

/// Whether an error says the entity does not exist (a 404 on a passive declare).
pub(crate) fn is_not_found(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<WireError>())
        .is_some_and(|w| w.reply_code() == Some(404))
}

/// Opens a channel on `conn`.
pub(crate) async fn channel(conn: &Connection) -> Result<Channel> {
    conn.open_channel()
        .await
        .map_err(|e| broker_error("open channel", e))
}

/// One connection and one channel in confirm mode; publishing returns once RabbitMQ confirmed.
pub(crate) struct Publisher {
    conn: Connection,
    channel: Channel,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Opens a connection with a confirming channel.
    pub(crate) async fn open(options: &AmqpOptions, name: &str) -> Result<Self> {
        let conn = open(options, name).await?;
        let channel = channel(&conn).await?;
        channel
            .confirm_select()
            .await
            .map_err(|e| broker_error("confirm.select", e))?;
        Ok(Publisher { conn, channel })
    }

    /// Whether the connection and channel are still usable.
    pub(crate) fn is_open(&self) -> bool {
        self.conn.is_open() && self.channel.is_open()
    }

    /// The connection (for admin channels).
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one message and returns the confirm to wait for.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<oneshot::Receiver<bool>> {
        self.channel
            .publish(exchange, routing_key, properties, body)
            .await
            .map_err(|e| broker_error("basic.publish", e))?
            .ok_or_else(|| Error::broker("rabbitmq: the publisher channel is not confirming"))
    }

    /// Closes the connection.
    pub(crate) async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// Reopens a [`Publisher`] after its connection was lost, retrying with backoff up to
/// `attempts` times. Every failure is retried, a refused login included: the handle's first
/// connection succeeded, so a refusal now is a server restarting (or a password changed under
/// us).
pub(crate) async fn reopen_publisher(
    options: &AmqpOptions,
    name: &str,
    attempts: u32,
) -> Result<Publisher> {
    let mut attempt = 0;
    loop {
        match Publisher::open(options, name).await {
            Ok(p) => {
                if attempt > 0 {
                    tracing::info!(url = %options.redacted, name, "reconnected to rabbitmq");
                }
                return Ok(p);
            }
            Err(e) if attempt + 1 >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(url = %options.redacted, name, error = %e, attempt, "rabbitmq unreachable; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
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
