//! Redis Sentinel: finding the current master of a `sentinel://` list.
//!
//! As Redis documents for Sentinel clients: the Sentinels are asked in the listed order
//! (`SENTINEL get-master-addr-by-name <master_name>`), starting from the one that answered
//! last, one that cannot be reached is skipped,
//! and the address a Sentinel gives is trusted only once the server there says `ROLE` master
//! (during a failover a Sentinel may still name a server that is gone or was demoted). Every
//! new connection (the shared one after a loss, a consumer's, a subscription) asks again, so a
//! connection lost with the old master reconnects to the new one through the usual
//! reconnect-and-backoff loops of [`crate::conn`]; a `READONLY` reply (the server was demoted
//! while the connection stayed up) counts as a lost connection there.
//!
//! A failover in which the old master stays up (`SENTINEL FAILOVER`, a partition that heals)
//! leaves connections open to it until the Sentinels demote it, seconds later: writes sent
//! there meanwhile would be lost when it resyncs from the new master. So a watcher subscribes
//! to the Sentinels' `+switch-master` announcements and counts the switches of our master
//! ([`Sentinel::switches`]); every long-lived connection (the shared one, consumers' fetch
//! connections, the result subscriber) is dropped and reopened when the count moves.
//!
//! The URL's credentials are the master's; the Sentinels' own come from `sentinel_kwargs`.
//! Nothing here logs a password: addresses and the master's name only.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo, RedisResult};
use tokio::sync::watch;

use crate::conn::Backoff;

use crate::options::{RedisOptions, SentinelTarget};

/// How long a Sentinel or a candidate master may take to accept a connection or answer: short,
/// since the next Sentinel may answer at once.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The Sentinels of a URL and the master to ask them for.
pub(crate) struct Sentinel {
    target: SentinelTarget,
    master_name: String,
    username: Option<String>,
    password: Option<String>,
    /// How many times the Sentinels announced that our master moved.
    switches: watch::Sender<u64>,
    /// Whether the `+switch-master` watcher runs.
    watching: AtomicBool,
    /// The Sentinel that answered last: asked first (the others keep their order after it).
    first: AtomicUsize,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("sentinels", &self.target.sentinels)
            .field("master_name", &self.master_name)
            .finish_non_exhaustive()
    }
}

/// Why one Sentinel gave no usable master.
enum Miss {
    /// It answered that it monitors no master of that name.
    Unknown,
    /// It could not be reached, or answered with an error.
    Unreachable(String),
    /// It named a server that is not (or no longer) the master, or cannot be reached.
    Failed(String),
}

fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT))
}

impl Sentinel {
    pub(crate) fn new(target: SentinelTarget, master_name: &str, options: &RedisOptions) -> Self {
        let (username, password) = options.sentinel_auth();
        Sentinel {
            target,
            master_name: master_name.to_owned(),
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
            switches: watch::Sender::new(0),
            watching: AtomicBool::new(false),
            first: AtomicUsize::new(0),
        }
    }

    /// The number of master switches announced so far, and a receiver told of the next ones.
    pub(crate) fn switches(&self) -> watch::Receiver<u64> {
        self.switches.subscribe()
    }

    /// The number of master switches announced so far.
    pub(crate) fn switch_count(&self) -> u64 {
        *self.switches.borrow()
    }

    /// Starts the `+switch-master` watcher, once; it ends when the last handle on `this` is
    /// dropped. Must be called within a tokio runtime.
    pub(crate) fn watch(this: &Arc<Sentinel>) {
        if this.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(watch_switches(Arc::downgrade(this)));
    }

    /// The client of one Sentinel, with the Sentinels' credentials.
    fn sentinel_client(&self, host: &str, port: u16) -> RedisResult<redis::Client> {
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        let info = (host.to_owned(), port)
            .into_connection_info()?
            .set_redis_settings(settings);
        redis::Client::open(info)
    }

    /// The master's name, for messages.
    pub(crate) fn master_name(&self) -> &str {
        &self.master_name
    }

    /// A client of the current master (checked with `ROLE`) and its address.
    ///
    /// Fails with an I/O error (a lost connection to the callers: retried) when no Sentinel
    /// could be reached or none named a server that is the master now, and with
    /// [`redis::ErrorKind::MasterNameNotFoundBySentinel`] (not retried) when the Sentinels
    /// that answered all said they know no master of that name.
    pub(crate) async fn master(&self) -> RedisResult<(redis::Client, String)> {
        let mut unknown = Vec::new();
        let mut unreachable = Vec::new();
        let mut failed = Vec::new();
        let all = &self.target.sentinels;
        let first = self.first.load(Ordering::Relaxed) % all.len();
        for i in (first..all.len()).chain(0..first) {
            let (host, port) = &all[i];
            let at = format!("{}", Addr(host, *port));
            match self.ask(host, *port).await {
                Ok(found) => {
                    // Ask this one first next time, as Redis advises Sentinel clients.
                    self.first.store(i, Ordering::Relaxed);
                    return Ok(found);
                }
                Err(Miss::Unknown) => unknown.push(at),
                Err(Miss::Unreachable(why)) => unreachable.push(format!("{at}: {why}")),
                Err(Miss::Failed(why)) => failed.push(format!("{at}: {why}")),
            }
        }
        if !unknown.is_empty() && failed.is_empty() {
            let mut detail = format!(
                "no Sentinel knows a master named {:?} (asked {}",
                self.master_name,
                unknown.join(", ")
            );
            if !unreachable.is_empty() {
                detail.push_str(&format!("; no answer from {}", unreachable.join("; ")));
            }
            detail.push_str("); check master_name in the transport options");
            return Err(redis::RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "unknown master",
                detail,
            )));
        }
        failed.extend(unreachable);
        let mut detail = format!(
            "no master {:?} found: {}",
            self.master_name,
            failed.join("; ")
        );
        if !unknown.is_empty() {
            detail.push_str(&format!("; unknown to {}", unknown.join(", ")));
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "sentinel",
            detail,
        )))
    }

    /// Asks one Sentinel and checks the server it names.
    async fn ask(&self, host: &str, port: u16) -> Result<(redis::Client, String), Miss> {
        let failed = |e: redis::RedisError| Miss::Unreachable(e.to_string());
        let mut c = self
            .sentinel_client(host, port)
            .map_err(failed)?
            .get_multiplexed_async_connection_with_config(&config())
            .await
            .map_err(failed)?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut c)
            .await
            .map_err(failed)?;
        let (mhost, mport) = addr.ok_or(Miss::Unknown)?;
        let mport: u16 = mport
            .parse()
            .map_err(|_| Miss::Failed(format!("it gave the port {mport:?}")))?;
        let master = format!("{}", Addr(&mhost, mport));
        let client = redis::Client::open(self.target.master_url(&mhost, mport))
            .map_err(|e| Miss::Failed(format!("it named {master}: {e}")))?;
        let role = async {
            let mut m = client
                .get_multiplexed_async_connection_with_config(&config())
                .await?;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut m).await?;
            RedisResult::Ok(role)
        }
        .await
        .map_err(|e| Miss::Failed(format!("it named {master}: {e}")))?;
        let is_master = match role.first() {
            Some(redis::Value::BulkString(b)) => b == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        };
        if !is_master {
            return Err(Miss::Failed(format!(
                "it named {master}, which is not a master (a failover is under way)"
            )));
        }
        Ok((client, master))
    }
}

/// `host:port`, with brackets around an IPv6 address.
struct Addr<'a>(&'a str, u16);

impl std::fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.contains(':') {
            write!(f, "[{}]:{}", self.0, self.1)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

/// How often the watcher checks, while subscribed, whether its [`Sentinel`] is still used.
const WATCH_TICK: Duration = Duration::from_secs(5);

/// Subscribes to `+switch-master` on one Sentinel after the other (the next one when a
/// subscription is lost) and counts the announcements about our master. Logs the move.
async fn watch_switches(sentinel: Weak<Sentinel>) {
    let mut backoff = Backoff::new();
    let mut next = 0usize;
    loop {
        let (client, at) = {
            let Some(s) = sentinel.upgrade() else { return };
            let (host, port) = &s.target.sentinels[next % s.target.sentinels.len()];
            next += 1;
            (
                s.sentinel_client(host, *port),
                format!("{}", Addr(host, *port)),
            )
        };
        let subscribed = async {
            let mut pubsub = client?.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            RedisResult::Ok(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(ASK_TIMEOUT, subscribed).await {
            Ok(Ok(p)) => p,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_owned(),
                };
                tracing::debug!(sentinel = %at, error = %why, "cannot watch a redis sentinel for master switches");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff = Backoff::new();
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                () = tokio::time::sleep(WATCH_TICK) => {
                    if sentinel.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            // "<name> <old ip> <old port> <new ip> <new port>"
            let parts: Vec<&str> = text.split(' ').collect();
            let Some(s) = sentinel.upgrade() else { return };
            if parts.len() == 5 && parts[0] == s.master_name {
                tracing::warn!(
                    sentinel = %at,
                    master_name = %s.master_name,
                    from = %format!("{}:{}", parts[1], parts[2]),
                    to = %format!("{}:{}", parts[3], parts[4]),
                    "redis sentinel announced a new master; reconnecting"
                );
                s.switches.send_modify(|n| *n += 1);
            }
        }
    }
}
