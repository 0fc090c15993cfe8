//! One shared command connection per broker or backend, re-established on demand.
//!
//! Commands go over one multiplexed connection (the `redis` crate pipelines concurrent callers
//! onto it). When a command fails because the connection is gone (a Redis restart, `CLIENT
//! KILL`, a network cut), the connection is dropped, a `warn` line is logged with the URL
//! redacted, and the operation is retried with exponential backoff for
//! [`RedisOptions::retry_for`](crate::RedisOptions::retry_for); after that it fails with a
//! transient error. Consumers' fetches and pub/sub never share this connection: each
//! consumer and each backend's subscriber open their own.
//!
//! With a `sentinel://` URL every new connection first asks the Sentinels where the master
//! is now ([`crate::sentinel`]), so the same loops follow a failover.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Error, ErrorKind, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::options::{RedisOptions, Target, parse_url};
use crate::sentinel::Sentinel;

/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a command may wait for its reply before the connection is considered dead.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// The shared connection of a broker or backend.
pub(crate) struct Redis {
    /// The server's client; with Sentinel, the master's found last.
    client: std::sync::Mutex<redis::Client>,
    /// With a `sentinel://` URL: where to ask for the master before each new connection.
    sentinel: Option<Arc<Sentinel>>,
    /// With Sentinel: the master's address found last, to log a change.
    master: Arc<std::sync::Mutex<String>>,
    /// The shared connection, with the master switch count it was opened at.
    conn: Mutex<Option<(MultiplexedConnection, u64)>>,
    kind: ErrorKind,
    /// The URL with its password replaced, for logs and errors.
    pub(crate) url: String,
    /// The server, user and database, without secrets (`redis://user@host:port/db`): two
    /// clients with the same identity see the same keys.
    pub(crate) identity: String,
    retry_for: Duration,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Whether `e` means the connection is unusable (retrying on a new one may succeed).
///
/// `READONLY` counts: the server was demoted to a replica (a Sentinel failover while the
/// connection stayed up), and a new connection goes to the new master.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return false;
    }
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// Resolves when the Sentinels announce a new master; never without Sentinel (or once the
/// announcements end).
pub(crate) async fn master_switch(switches: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = switches {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Exponential backoff from 50 ms to 2 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        d
    }
}

/// The client of `target`: plain, or TLS with the CA and client certificate it names.
fn open_client(target: &Target, kind: ErrorKind) -> Result<redis::Client> {
    let invalid =
        |e| Error::new(kind, format!("invalid redis url {}", target.redacted)).with_source(e);
    #[cfg(feature = "tls")]
    if let Some(tls) = &target.tls {
        if tls.ca_certs.is_some() || tls.certfile.is_some() {
            let read = |what: &str, path: &str| {
                std::fs::read(path).map_err(|e| {
                    Error::new(
                        kind,
                        format!("cannot read {what} {path:?} for {}", target.redacted),
                    )
                    .with_source(e)
                })
            };
            let root_cert = match &tls.ca_certs {
                Some(p) => Some(read("ssl_ca_certs", p)?),
                None => None,
            };
            let client_tls = match (&tls.certfile, &tls.keyfile) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read("ssl_certfile", c)?,
                    client_key: read("ssl_keyfile", k)?,
                }),
                _ => None,
            };
            return redis::Client::build_with_tls(
                target.client_url.as_str(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(invalid);
        }
    }
    redis::Client::open(target.client_url.as_str()).map_err(invalid)
}

/// What opening a URL gives: the connection, the key prefix in force and the database number.
pub(crate) struct Opened {
    pub(crate) redis: Redis,
    pub(crate) prefix: String,
    pub(crate) db: i64,
    /// The native layout's queue globs: the URL's, else the options'.
    pub(crate) native_queues: Vec<String>,
}

impl Redis {
    /// Parses `url` and connects; a `global_keyprefix` in the URL wins over the options'.
    /// Errors are of `kind`.
    pub(crate) async fn open(url: &str, options: &RedisOptions, kind: ErrorKind) -> Result<Opened> {
        let target = parse_url(url, kind)?;
        let prefix = target
            .keyprefix
            .clone()
            .unwrap_or_else(|| options.get_global_keyprefix().to_owned());
        let sentinel = match &target.sentinel {
            None => None,
            Some(s) => {
                let Some(name) = options.get_master_name() else {
                    return Err(Error::new(
                        kind,
                        format!(
                            "{} needs the name of the master the Sentinels monitor: set \
                             master_name in [broker_transport_options] (for a result backend \
                             with a URL of its own, in [result_backend_transport_options])",
                            target.redacted
                        ),
                    ));
                };
                Some(Arc::new(Sentinel::new(s.clone(), name, options)))
            }
        };
        let redis = Redis::connect(&target, sentinel, kind, options.get_retry_for()).await?;
        Ok(Opened {
            redis,
            prefix,
            db: target.db,
            native_queues: target
                .native_queues
                .clone()
                .unwrap_or_else(|| options.get_native_queues().to_vec()),
        })
    }

    /// Opens the client and checks that the server answers (and accepts the credentials).
    pub(crate) async fn connect(
        target: &Target,
        sentinel: Option<Arc<Sentinel>>,
        kind: ErrorKind,
        retry_for: Duration,
    ) -> Result<Self> {
        let (client, master) = match &sentinel {
            None => (open_client(target, kind)?, String::new()),
            Some(s) => s.master().await.map_err(|e| {
                let detail = e.detail().unwrap_or_default();
                let err = Error::new(
                    kind,
                    format!("cannot connect to redis ({}): {detail}", target.redacted),
                )
                .with_source(e.clone());
                if is_connection_error(&e) {
                    err.transient()
                } else {
                    err
                }
            })?,
        };
        let info = client.get_connection_info();
        let identity = match &sentinel {
            // The same keys whichever server is the master now.
            Some(s) => format!(
                "sentinel://{}@{}/{}",
                info.redis_settings().username().unwrap_or_default(),
                s.master_name(),
                info.redis_settings().db()
            ),
            None => format!(
                "redis://{}@{}/{}",
                info.redis_settings().username().unwrap_or_default(),
                info.addr(),
                info.redis_settings().db()
            ),
        };
        if let Some(s) = &sentinel {
            Sentinel::watch(s);
            tracing::info!(
                url = %target.redacted,
                master_name = s.master_name(),
                master = %master,
                "redis sentinel: the master is at {master}"
            );
        }
        let redis = Redis {
            client: std::sync::Mutex::new(client),
            sentinel,
            master: Arc::new(std::sync::Mutex::new(master)),
            conn: Mutex::new(None),
            kind,
            url: target.redacted.clone(),
            identity,
            retry_for,
        };
        let failed = |e: RedisError| {
            if target.tls.is_some() && e.to_string().to_lowercase().contains("certificate") {
                // Not transient: retrying will not make the certificate acceptable.
                Error::new(
                    kind,
                    format!(
                        "cannot connect to redis ({}): the server's TLS certificate was not \
                         accepted (check ssl_ca_certs, or ssl_cert_reqs=none to skip the check)",
                        target.redacted
                    ),
                )
                .with_source(e)
            } else {
                redis.error("connect to redis", e)
            }
        };
        let mut c = redis.connection().await.map_err(failed)?;
        redis::cmd("PING")
            .query_async::<()>(&mut c)
            .await
            .map_err(failed)?;
        Ok(redis)
    }

    /// The client of the server to open a new connection to: with Sentinel, the master's as
    /// the Sentinels name it now (an I/O error when none can tell, so that callers retry).
    pub(crate) async fn fresh_client(&self) -> redis::RedisResult<redis::Client> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(self.current_client());
        };
        let (client, addr) = sentinel.master().await?;
        {
            let mut last = self.master.lock().unwrap_or_else(|p| p.into_inner());
            if *last != addr {
                tracing::warn!(
                    url = %self.url,
                    master_name = sentinel.master_name(),
                    from = %*last,
                    to = %addr,
                    "redis sentinel: the master moved from {last} to {addr}"
                );
                *last = addr;
            }
        }
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = client.clone();
        Ok(client)
    }

    /// With Sentinel, how many times the Sentinels announced a new master; a connection opened
    /// at another count may be on the old master and must be reopened. Always 0 otherwise.
    pub(crate) fn switch_count(&self) -> u64 {
        self.sentinel.as_ref().map_or(0, |s| s.switch_count())
    }

    /// With Sentinel, a receiver told of each master switch the Sentinels announce.
    pub(crate) fn switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.sentinel.as_ref().map(|s| s.switches())
    }

    fn current_client(&self) -> redis::Client {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new pub/sub connection (to the master, with Sentinel).
    pub(crate) async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        self.fresh_client().await?.get_async_pubsub().await
    }

    /// Another handle on the same server whose shared connection is its own: for traffic
    /// (events) that must not queue in front of the commands of this one.
    pub(crate) fn sibling(&self) -> Redis {
        Redis {
            client: std::sync::Mutex::new(self.current_client()),
            sentinel: self.sentinel.clone(),
            master: self.master.clone(),
            conn: Mutex::new(None),
            kind: self.kind,
            url: self.url.clone(),
            identity: self.identity.clone(),
            retry_for: self.retry_for,
        }
    }

    /// A new connection of its own (for a consumer), whose replies may take `response_timeout`.
    pub(crate) async fn dedicated(
        &self,
        response_timeout: Duration,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        self.fresh_client()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Like [`Redis::dedicated`], but speaking RESP3, with the server's pushes (key
    /// invalidations, among others) handed to `pushes`. Servers before 6.0 refuse it.
    pub(crate) async fn dedicated_resp3(
        &self,
        response_timeout: Duration,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let info = self.fresh_client().await?.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_push_sender(pushes);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut guard = self.conn.lock().await;
        let switches = self.switch_count();
        if let Some((c, at)) = &*guard {
            if *at == switches {
                return Ok(c.clone());
            }
        }
        let c = self.dedicated(COMMAND_TIMEOUT).await?;
        *guard = Some((c.clone(), switches));
        Ok(c)
    }

    async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `f` on the shared connection, reconnecting and retrying while the connection is
    /// lost, for up to `retry_for`.
    ///
    /// Only for idempotent operations (or ones where a repeat is harmless under at-least-once,
    /// like publishing): a command whose reply was lost may have run.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let mut switches = self.switches();
        loop {
            if let Some(rx) = &mut switches {
                rx.borrow_and_update();
            }
            let r = match self.connection().await {
                Ok(c) => f(c).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) && started.elapsed() < self.retry_for => {
                    self.reset().await;
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        url = %self.url,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "redis connection lost while trying to {what}; reconnecting"
                    );
                    // A new master announced meanwhile: try it at once.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = master_switch(&mut switches) => {}
                    }
                }
                Err(e) => {
                    if is_connection_error(&e) {
                        self.reset().await;
                    }
                    return Err(self.error(what, e));
                }
            }
        }
    }

    /// Runs `f` once (for operations that must not run twice, like `INCR`); a lost connection
    /// is dropped so that the next call reconnects.
    pub(crate) async fn run_once<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let r = match self.connection().await {
            Ok(c) => f(c).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_connection_error(&e) {
                    self.reset().await;
                }
                Err(self.error(what, e))
            }
        }
    }

    /// `e` as a celeriac error: "cannot <what> (<url>)", transient when the connection failed.
    pub(crate) fn error(&self, what: &str, e: RedisError) -> Error {
        let transient = is_connection_error(&e);
        let err = Error::new(self.kind, format!("cannot {what} ({})", self.url)).with_source(e);
        if transient { err.transient() } else { err }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readonly_counts_as_a_lost_connection() {
        // A master demoted by a Sentinel failover answers writes with READONLY: reconnecting
        // (and asking the Sentinels again) is the cure.
        let readonly = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ));
        assert!(is_connection_error(&readonly));
        let other = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
        ));
        assert!(!is_connection_error(&other));
        let unknown_master = RedisError::from((
            redis::ErrorKind::MasterNameNotFoundBySentinel,
            "unknown master",
            "no Sentinel knows a master named \"x\"".to_owned(),
        ));
        assert!(
            !is_connection_error(&unknown_master),
            "a wrong name is not retried"
        );
        let no_sentinel = RedisError::from((redis::ErrorKind::Io, "sentinel", "none".to_owned()));
        assert!(
            is_connection_error(&no_sentinel),
            "no Sentinel answering is retried"
        );
    }
}
