//! Redis Sentinel: finding the current master of a `sentinel://` list.
//!
//! As Redis documents for Sentinel clients: the Sentinels are asked in the listed order
//! (`SENTINEL get-master-addr-by-name <master_name>`), one that cannot be reached is skipped,
//! and the address a Sentinel gives is trusted only once the server there says `ROLE` master
//! (during a failover a Sentinel may still name a server that is gone or was demoted). Every
//! new connection (the shared one after a loss, a consumer's, a subscription) asks again, so a
//! connection lost with the old master reconnects to the new one through the usual
//! reconnect-and-backoff loops of [`crate::conn`]; a `READONLY` reply (the server was demoted
//! while the connection stayed up) counts as a lost connection there.
//!
//! The URL's credentials are the master's; the Sentinels' own come from `sentinel_kwargs`.
//! Nothing here logs a password: addresses and the master's name only.

use std::time::Duration;

use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo, RedisResult};

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
        }
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
        for (host, port) in &self.target.sentinels {
            let at = format!("{}", Addr(host, *port));
            match self.ask(host, *port).await {
                Ok(found) => return Ok(found),
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
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        let info = (host.to_owned(), port)
            .into_connection_info()
            .map_err(failed)?
            .set_redis_settings(settings);
        let mut c = redis::Client::open(info)
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
