//! Connections: opening, error mapping, and the confirming publisher shared by the broker and
//! the rpc backend, on the crate's own client ([`crate::wire`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::config::FailoverStrategy;
use celeriac_core::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

use crate::options::{AmqpHost, AmqpOptions};
use crate::wire::{Channel, Connection, ConnectionParams, Properties, WireError};

/// How long a publish waits for the broker's confirm before failing as transient.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers of one handle and the one its connections go to now.
///
/// Every connection of a broker (publisher, consumers, broadcast sends and inboxes) shares
/// one: the first to lose its server moves the handle on, so the others, and connections
/// opened later, go straight to the next server instead of trying the lost one first.
pub(crate) struct Servers {
    options: AmqpOptions,
    cursor: Mutex<Cursor>,
}

/// A position in an order of the hosts.
struct Cursor {
    /// Indexes into the hosts; a random permutation under `shuffle`.
    order: Vec<usize>,
    /// Where in `order` the next connection goes.
    pos: usize,
}

impl fmt::Debug for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Servers")
            .field("url", &self.options.redacted)
            .field("current", &self.url(self.current()))
            .finish_non_exhaustive()
    }
}

impl Servers {
    /// The servers of `options`, starting at the first listed (`round-robin`) or a random one
    /// (`shuffle`).
    pub(crate) fn new(options: AmqpOptions) -> Arc<Self> {
        let mut order: Vec<usize> = (0..options.hosts.len()).collect();
        if options.failover == FailoverStrategy::Shuffle {
            fastrand::shuffle(&mut order);
        }
        Arc::new(Servers {
            options,
            cursor: Mutex::new(Cursor { order, pos: 0 }),
        })
    }

    /// The settings, shared by every server.
    pub(crate) fn options(&self) -> &AmqpOptions {
        &self.options
    }

    /// The redacted URL of host `i`.
    pub(crate) fn url(&self, i: usize) -> &str {
        &self.options.hosts[i].redacted
    }

    /// The host the next connection goes to.
    fn current(&self) -> usize {
        let c = self.cursor.lock().expect("failover cursor lock");
        c.order[c.pos]
    }

    /// Moves past host `i` when it is the current one (another connection may have moved on
    /// already). At the end of the order, round-robin starts over; shuffle draws a new
    /// order, which does not start with `i` again when there is another host.
    pub(crate) fn failed(&self, i: usize) {
        let mut c = self.cursor.lock().expect("failover cursor lock");
        if c.order[c.pos] != i {
            return;
        }
        c.pos += 1;
        if c.pos == c.order.len() {
            c.pos = 0;
            if self.options.failover == FailoverStrategy::Shuffle && c.order.len() > 1 {
                fastrand::shuffle(&mut c.order);
                if c.order[0] == i {
                    let last = c.order.len() - 1;
                    c.order.swap(0, last);
                }
            }
        }
    }

    /// Marks host `i` failed once `conn` is closed by the server or the network (not by us).
    fn watch(self: &Arc<Self>, conn: &Connection, i: usize) {
        if self.options.hosts.len() < 2 {
            return;
        }
        let closed = conn.on_close();
        let servers = Arc::downgrade(self);
        tokio::spawn(async move {
            let why = closed.await;
            if let (false, Some(servers)) =
                (matches!(why, WireError::ClosedByClient), servers.upgrade())
            {
                tracing::debug!(url = %servers.url(i), error = %why, "lost the connection to this rabbitmq url; the next connection goes to the next");
                servers.failed(i);
            }
        });
    }
}

/// The client's connection parameters for `host`.
pub(crate) fn params(options: &AmqpOptions, host: &AmqpHost, name: &str) -> ConnectionParams {
    let mut p = ConnectionParams::new(&host.host, host.port);
    p.user.clone_from(&host.user);
    p.password.clone_from(&host.password);
    p.vhost.clone_from(&host.vhost);
    p.heartbeat = options.heartbeat;
    p.name = format!("{} {name}", options.connection_name);
    p.tls.clone_from(&host.tls);
    p
}

/// Opens a connection to the current server, going on through the list once when it cannot
/// be reached; returns the connection and the index of its host.
///
/// A refused login, an unknown vhost or an untrusted TLS certificate is a non-transient config
/// error, returned at once (the cursor has moved past that server, so a caller that retries
/// tries the next). When every server fails, the error names them all.
pub(crate) async fn open(servers: &Arc<Servers>, name: &str) -> Result<(Connection, usize)> {
    let hosts = &servers.options.hosts;
    let mut last = None;
    for tried in 0..hosts.len() {
        let i = servers.current();
        let host = &hosts[i];
        tracing::debug!(url = %host.redacted, name, "connecting to rabbitmq");
        match Connection::open(&params(&servers.options, host, name)).await {
            Ok(conn) => {
                servers.watch(&conn, i);
                if tried > 0 {
                    tracing::info!(url = %host.redacted, name, "connected to rabbitmq at the next url of the list");
                }
                return Ok((conn, i));
            }
            Err(e) => {
                let e = map_open_error(e, &host.redacted);
                servers.failed(i);
                if hosts.len() == 1 || e.kind() == ErrorKind::Config {
                    return Err(e);
                }
                tracing::warn!(url = %host.redacted, next = %servers.url(servers.current()), name, error = %e, "rabbitmq unreachable; trying the next url");
                last = Some(e);
            }
        }
    }
    let mut e = Error::new(
        ErrorKind::Broker,
        format!(
            "cannot connect to rabbitmq at any of its {} urls ({})",
            hosts.len(),
            servers.options.redacted
        ),
    );
    if let Some(last) = last {
        e = e.with_source(last);
    }
    Err(e.transient())
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
    /// The index of its server.
    host: usize,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Opens a connection (see [`open`]) with a confirming channel.
    pub(crate) async fn open(servers: &Arc<Servers>, name: &str) -> Result<Self> {
        let (conn, host) = open(servers, name).await?;
        let channel = channel(&conn).await?;
        channel
            .confirm_select()
            .await
            .map_err(|e| broker_error("confirm.select", e))?;
        Ok(Publisher {
            conn,
            channel,
            host,
        })
    }

    /// The index of its server.
    pub(crate) fn host(&self) -> usize {
        self.host
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
///
/// Each attempt goes through the list of servers once, starting at the current one; the
/// backoff is between rounds.
pub(crate) async fn reopen_publisher(
    servers: &Arc<Servers>,
    name: &str,
    attempts: u32,
) -> Result<Publisher> {
    let mut attempt = 0;
    loop {
        match Publisher::open(servers, name).await {
            Ok(p) => {
                if attempt > 0 {
                    tracing::info!(url = %servers.url(p.host()), name, "reconnected to rabbitmq");
                }
                return Ok(p);
            }
            Err(e) if attempt + 1 >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(url = %servers.options.redacted, name, error = %e, attempt, "rabbitmq unreachable; retrying");
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

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::Config;

    fn servers(strategy: &str, n: usize) -> Arc<Servers> {
        let url = (1..=n)
            .map(|i| format!("amqp://h{i}//"))
            .collect::<Vec<_>>()
            .join(";");
        let config = Config::from_sources(
            Some((
                std::path::Path::new("celeriac.toml"),
                &format!("broker_failover_strategy = \"{strategy}\""),
            )),
            |_| None,
        )
        .unwrap();
        Servers::new(AmqpOptions::from_url(&url, &config).unwrap())
    }

    /// The hosts tried when each current one fails in turn, `n` times.
    fn walk(s: &Servers, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let i = s.current();
                s.failed(i);
                i
            })
            .collect()
    }

    #[test]
    fn round_robin_moves_on_from_the_host_that_failed_and_wraps() {
        let s = servers("round-robin", 3);
        assert_eq!(walk(&s, 7), [0, 1, 2, 0, 1, 2, 0]);
        // A failure reported for a host the handle already left changes nothing: two
        // connections losing the same server move the handle on once.
        let s = servers("round-robin", 3);
        s.failed(0);
        s.failed(0);
        assert_eq!(s.current(), 1);
        let s = servers("round-robin", 1);
        s.failed(0);
        assert_eq!(s.current(), 0);
    }

    #[test]
    fn shuffle_visits_every_host_once_per_round_in_changing_orders() {
        let mut orders = std::collections::BTreeSet::new();
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let s = servers("shuffle", 4);
            firsts.insert(s.current());
            let tried = walk(&s, 12);
            for round in tried.chunks(4) {
                let mut sorted = round.to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, [0, 1, 2, 3], "{tried:?}");
                orders.insert(round.to_vec());
            }
            // A new round never starts with the host that just failed.
            assert_ne!(tried[3], tried[4], "{tried:?}");
            assert_ne!(tried[7], tried[8], "{tried:?}");
        }
        assert!(orders.len() > 5, "{orders:?}");
        assert!(firsts.len() > 1, "shuffle starts anywhere: {firsts:?}");
    }
}
