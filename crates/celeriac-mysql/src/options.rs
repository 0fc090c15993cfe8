//! Where the database is and how to use it: [`MysqlOptions`] and `mysql://` / `mariadb://` URL
//! parsing.

use std::str::FromStr;
use std::time::Duration;

use celeriac_core::{Config, Error, Result};
use sqlx::mysql::MySqlConnectOptions;

/// The URL query parameters this crate reads itself; every other one goes to sqlx.
const OWN_PARAMS: [&str; 3] = ["max-connections", "poll-interval-ms", "beat-namespace"];

/// The default pool size for a worker of `concurrency`: one connection per task that may be
/// storing a result or acking at once, plus the consumer's and a spare, capped at
/// [`MAX_DEFAULT_POOL`].
fn pool_size(concurrency: usize) -> u32 {
    u32::try_from(concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(2)
        .min(MAX_DEFAULT_POOL)
}

/// The largest default pool. Statements take a millisecond or less, so a few connections
/// serve many tasks, and a server's `max_connections` (151 by default) is shared by every
/// process and pool (a worker has two: broker and backend). `max-connections` in the URL
/// sets any size.
pub const MAX_DEFAULT_POOL: u32 = 32;

/// Settings of a MariaDB/MySQL broker, result backend or beat store.
///
/// Build them from a URL and a [`Config`] with [`MysqlOptions::from_url`]. The URL is sqlx's
/// MySQL URL (`mysql://user:password@host:3306/database?ssl-mode=REQUIRED&ssl-ca=ca.pem`;
/// `mariadb://` is the same), plus three parameters of ours:
///
/// - `max-connections`: the pool size (default: the worker's concurrency + 2, at most
///   [`MAX_DEFAULT_POOL`]);
/// - `poll-interval-ms`: the longest sleep of an idle consumer, inbox or result waiter
///   between two polls (default 100);
/// - `beat-namespace`: which beat lease and entries a beat store uses (default `default`), so
///   several applications can share one database.
///
/// ```
/// use std::time::Duration;
/// use celeriac_mysql::MysqlOptions;
///
/// let config = celeriac_core::Config::default();
/// let options = MysqlOptions::from_url(
///     "mariadb://app:secret@db.example:3306/jobs?ssl-mode=REQUIRED&max-connections=5",
///     &config,
/// )
/// .unwrap();
/// assert_eq!(options.get_max_connections(), 5);
/// assert_eq!(options.get_poll_interval(), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct MysqlOptions {
    pub(crate) connect: MySqlConnectOptions,
    /// The URL with its password hidden, for messages and logs.
    pub(crate) display: String,
    max_connections: u32,
    poll_interval: Duration,
    visibility_timeout: Duration,
    result_expires: Option<Duration>,
    beat_namespace: String,
}

impl MysqlOptions {
    /// Reads a `mysql://` or `mariadb://` URL, with the pool size, lease and result expiry
    /// taken from `config` unless the URL says otherwise.
    ///
    /// Fails with [`ErrorKind::Config`](celeriac_core::ErrorKind::Config) for another scheme,
    /// a URL sqlx cannot read, or a bad value of one of our parameters.
    pub fn from_url(url: &str, config: &Config) -> Result<Self> {
        let display = celeriac_core::url::redact(url);
        let rest = url
            .strip_prefix("mysql://")
            .or_else(|| url.strip_prefix("mariadb://"))
            .ok_or_else(|| {
                Error::config(format!(
                    "not a mysql url: {display:?} (expected mysql://user:password@host:3306/database)"
                ))
            })?;
        let (base, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let path = base.split_once('/').map_or("", |(_, p)| p);
        if path.is_empty() {
            return Err(Error::config(format!(
                "mysql url {display:?} names no database (expected mysql://user:password@host:3306/database)"
            )));
        }
        let mut options = MysqlOptions {
            connect: MySqlConnectOptions::new(),
            display: display.clone(),
            max_connections: pool_size(config.worker.concurrency),
            poll_interval: Duration::from_millis(100),
            visibility_timeout: config.visibility_timeout,
            result_expires: config.result_expires,
            beat_namespace: "default".to_owned(),
        };
        let mut passed = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !OWN_PARAMS.contains(&key) {
                passed.push(pair);
                continue;
            }
            let bad = |e: std::num::ParseIntError| {
                Error::config(format!("mysql url {display:?}: bad {key} {value:?}")).with_source(e)
            };
            match key {
                "max-connections" => {
                    let n: u32 = value.parse().map_err(bad)?;
                    if n == 0 {
                        return Err(Error::config(format!(
                            "mysql url {display:?}: max-connections must be at least 1"
                        )));
                    }
                    options.max_connections = n;
                }
                "poll-interval-ms" => {
                    let ms: u64 = value.parse().map_err(bad)?;
                    options.poll_interval = Duration::from_millis(ms.max(1));
                }
                _ => options.beat_namespace = value.to_owned(),
            }
        }
        let mut sqlx_url = format!("mysql://{base}");
        if !passed.is_empty() {
            sqlx_url.push('?');
            sqlx_url.push_str(&passed.join("&"));
        }
        options.connect = MySqlConnectOptions::from_str(&sqlx_url).map_err(|e| {
            Error::config(format!("cannot read mysql url {display:?}")).with_source(e)
        })?;
        Ok(options)
    }

    /// Options for sqlx connect options built by hand (no URL): the pool size, lease and result
    /// expiry from `config`.
    pub fn from_connect_options(connect: MySqlConnectOptions, config: &Config) -> Self {
        let display = format!(
            "mysql://{}@{}:{}/{}",
            connect.get_username(),
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or("")
        );
        MysqlOptions {
            connect,
            display,
            max_connections: pool_size(config.worker.concurrency),
            poll_interval: Duration::from_millis(100),
            visibility_timeout: config.visibility_timeout,
            result_expires: config.result_expires,
            beat_namespace: "default".to_owned(),
        }
    }

    /// The pool size.
    #[must_use]
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// The longest sleep of an idle consumer, inbox or result waiter between two polls.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The default lease of a delivery, when the consumer does not choose one.
    #[must_use]
    pub fn visibility_timeout(mut self, lease: Duration) -> Self {
        self.visibility_timeout = lease;
        self
    }

    /// How long results, groups and chord counters are kept; `None` keeps them for good.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// The beat namespace: which lease and entries a beat store uses.
    #[must_use]
    pub fn beat_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.beat_namespace = namespace.into();
        self
    }

    /// The pool size.
    pub fn get_max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The longest idle poll interval.
    pub fn get_poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// The default lease.
    pub fn get_visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// How long results are kept.
    pub fn get_result_expires(&self) -> Option<Duration> {
        self.result_expires
    }

    /// The beat namespace.
    pub fn get_beat_namespace(&self) -> &str {
        &self.beat_namespace
    }

    /// The database name.
    pub fn get_database(&self) -> Option<&str> {
        self.connect.get_database()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let mut config = Config::default();
        config.worker.concurrency = 6;
        let o = MysqlOptions::from_url("mysql://root@127.0.0.1:3306/test", &config).unwrap();
        assert_eq!(o.get_max_connections(), 8);
        config.worker.concurrency = 500;
        let o = MysqlOptions::from_url("mysql://root@127.0.0.1:3306/test", &config).unwrap();
        assert_eq!(o.get_max_connections(), MAX_DEFAULT_POOL);
        let o = MysqlOptions::from_url("mysql://h/test?max-connections=100", &config).unwrap();
        assert_eq!(o.get_max_connections(), 100);
        config.worker.concurrency = 6;
        assert_eq!(o.get_database(), Some("test"));
        assert_eq!(o.connect.get_port(), 3306);
        let o = MysqlOptions::from_url(
            "mariadb://u:p%40ss@h/db?ssl-mode=DISABLED&poll-interval-ms=20&beat-namespace=x",
            &config,
        )
        .unwrap();
        assert_eq!(o.connect.get_username(), "u");
        assert_eq!(o.connect.get_host(), "h");
        assert_eq!(o.get_poll_interval(), Duration::from_millis(20));
        assert_eq!(o.get_beat_namespace(), "x");
        assert_eq!(
            o.display,
            "mariadb://u:***@h/db?ssl-mode=DISABLED&poll-interval-ms=20&beat-namespace=x"
        );
        for bad in [
            "postgres://h/db",
            "mysql://h",
            "mysql://h/",
            "mysql://h/db?max-connections=0",
            "mysql://h/db?max-connections=x",
            "mysql://h/db?ssl-mode=sometimes",
        ] {
            let e = MysqlOptions::from_url(bad, &config).unwrap_err();
            assert_eq!(e.kind(), celeriac_core::ErrorKind::Config, "{bad}");
        }
        let e = MysqlOptions::from_url("mysql://u:hunter2@h/db?max-connections=x", &config)
            .unwrap_err();
        assert!(!format!("{e:#}").contains("hunter2"), "{e:#}");
    }
}
