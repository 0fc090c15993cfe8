//! Where the database is and how to use it: [`PgOptions`], `postgres://` URL parsing, and the
//! translation of database errors into celeriac's.

use std::str::FromStr;
use std::time::Duration;

use celeriac_core::{Config, Error, ErrorKind, Result};
use sqlx::postgres::PgConnectOptions;

/// The schema the tables live in unless the URL names another (`?schema=`).
pub const DEFAULT_SCHEMA: &str = "celeriac";

/// Settings of a PostgreSQL broker, result backend or beat store.
///
/// Built from a URL and a [`Config`] by [`PgOptions::from_url`]: the connection comes from the
/// URL as libpq reads it (user, password, host, port, database, `sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`, `application_name`, …), plus two parameters of celeriac's own, taken
/// out before the URL reaches the driver:
///
/// - `schema=<name>`: the schema of the tables (default `celeriac`);
/// - `pool_size=<n>`: the most connections this handle opens (default: from the worker's
///   concurrency, see [`PgOptions::pool_size_for`]).
///
/// ```
/// use celeriac_postgres::PgOptions;
///
/// let config = celeriac_core::Config::default();
/// let o = PgOptions::from_url("postgres://app:pw@db:5433/jobs?schema=queue&pool_size=4", &config)
///     .unwrap();
/// assert_eq!(o.schema(), "queue");
/// assert_eq!(o.pool_size(), 4);
/// assert_eq!(o.identity(), "postgres://app@db:5433/jobs?schema=queue");
/// ```
#[derive(Debug, Clone)]
pub struct PgOptions {
    connect: PgConnectOptions,
    schema: String,
    pool_size: u32,
    visibility_timeout: Duration,
    result_expires: Option<Duration>,
    redacted: String,
}

impl PgOptions {
    /// Reads a `postgres://` or `postgresql://` URL; the lease and `result_expires` come from
    /// `config`, the pool size from `config.worker.concurrency` unless the URL sets it.
    pub fn from_url(url: &str, config: &Config) -> Result<Self> {
        let redacted = celeriac_core::url::redact(url);
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                Error::config(format!(
                    "not a postgres url: {redacted:?} (expected postgres://user:password@host:5432/database)"
                ))
            })?;
        let (base, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let mut schema = DEFAULT_SCHEMA.to_owned();
        let mut pool_size = None;
        let mut kept = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "schema" => schema = v.to_owned(),
                "pool_size" => {
                    let n: u32 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::config(format!(
                            "postgres url {redacted:?}: pool_size must be a positive integer"
                        ))
                    })?;
                    pool_size = Some(n);
                }
                _ => kept.push(pair),
            }
        }
        check_identifier(&schema)
            .map_err(|why| Error::config(format!("postgres url {redacted:?}: schema {why}")))?;
        let mut driver_url = format!("postgres://{base}");
        if !kept.is_empty() {
            driver_url.push('?');
            driver_url.push_str(&kept.join("&"));
        }
        let connect = PgConnectOptions::from_str(&driver_url).map_err(|e| {
            Error::config(format!("invalid postgres url {redacted:?}")).with_source(e)
        })?;
        let connect = connect.application_name("celeriac");
        let redacted_kept = {
            let mut u = celeriac_core::url::redact(&format!("postgres://{base}"));
            if let Some(q) = query {
                u.push('?');
                u.push_str(q);
            }
            u
        };
        Ok(PgOptions {
            connect,
            schema,
            pool_size: pool_size.unwrap_or_else(|| Self::pool_size_for(config.worker.concurrency)),
            visibility_timeout: config.visibility_timeout,
            result_expires: config.result_expires,
            redacted: redacted_kept,
        })
    }

    /// The pool size for a worker running `concurrency` tasks at once: one connection per
    /// four task slots (a task holds one only while its result is stored), plus four for the
    /// consumer, acks and the broadcast channels, between 5 and 16. Each handle has two pools
    /// of this size, opened on demand, and one listening connection (see docs/postgres.md).
    ///
    /// ```
    /// assert_eq!(celeriac_postgres::PgOptions::pool_size_for(1), 5);
    /// assert_eq!(celeriac_postgres::PgOptions::pool_size_for(16), 8);
    /// assert_eq!(celeriac_postgres::PgOptions::pool_size_for(1000), 16);
    /// ```
    pub fn pool_size_for(concurrency: usize) -> u32 {
        let n = u32::try_from(concurrency.div_ceil(4)).unwrap_or(u32::MAX);
        n.saturating_add(4).clamp(5, 16)
    }

    /// Sets the schema (see the type's docs).
    #[must_use]
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the pool size.
    #[must_use]
    pub fn with_pool_size(mut self, n: u32) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// Sets the default lease of a delivery.
    #[must_use]
    pub fn with_visibility_timeout(mut self, lease: Duration) -> Self {
        self.visibility_timeout = lease;
        self
    }

    /// Sets how long results are kept (`None`: for good).
    #[must_use]
    pub fn with_result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// The schema of the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The most connections a handle opens (the listener's not counted).
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }

    /// The default lease.
    pub fn visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// How long results are kept.
    pub fn result_expires(&self) -> Option<Duration> {
        self.result_expires
    }

    /// The URL with its password hidden, for messages.
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    /// The server, database and schema, without secrets: two handles with the same identity
    /// share their tables (the broker compares it with a result backend's to read task states
    /// with its fetch).
    pub fn identity(&self) -> String {
        let c = &self.connect;
        format!(
            "postgres://{}@{}:{}/{}?schema={}",
            c.get_username(),
            c.get_host(),
            c.get_port(),
            c.get_database().unwrap_or(c.get_username()),
            self.schema
        )
    }

    /// The driver's connection options.
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.connect
    }
}

/// Schema names are spliced into SQL, quoted: allow the plain ones only.
fn check_identifier(name: &str) -> std::result::Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 50 lowercase letters, digits or underscores, not starting with a digit")
    }
}

/// Turns a database error into celeriac's: a message saying what failed and, for the errors a
/// person must fix, what to do; the database's error as the source; transient when retrying
/// may help (a lost connection, a server restarting, a serialization failure).
pub(crate) fn db_error(kind: ErrorKind, what: &str, e: sqlx::Error) -> Error {
    let (hint, transient) = match &e {
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("28P01") | Some("28000") => (
                Some("the server refused the user's credentials (wrong user or password?)"),
                false,
            ),
            Some("3D000") => (
                Some("the database does not exist (create it, or fix the url's path)"),
                false,
            ),
            Some("42501") => (
                Some(
                    "permission denied: grant the url's user USAGE and CREATE on the schema and \
                     SELECT, INSERT, UPDATE, DELETE on its tables (see docs/postgres.md)",
                ),
                false,
            ),
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                (None, true)
            }
            Some("40001") | Some("40P01") | Some("55P03") => (None, true),
            _ => (None, false),
        },
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => (None, true),
        sqlx::Error::PoolClosed => return Error::new(ErrorKind::Closed, format!("{what}: closed")),
        _ => (None, false),
    };
    let message = match hint {
        Some(h) => format!("{what}: {h}"),
        None => what.to_owned(),
    };
    let err = Error::new(kind, message).with_source(e);
    if transient { err.transient() } else { err }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let config = Config::default();
        let o = PgOptions::from_url(
            "postgresql://u:secret@h:6000/d?sslmode=disable&schema=s1",
            &config,
        )
        .unwrap();
        assert_eq!(o.schema(), "s1");
        assert_eq!(o.identity(), "postgres://u@h:6000/d?schema=s1");
        assert!(!o.redacted_url().contains("secret"));
        assert_eq!(o.connect_options().get_port(), 6000);
        let o = PgOptions::from_url("postgres://localhost/test", &config).unwrap();
        assert_eq!(o.schema(), DEFAULT_SCHEMA);
        for bad in [
            "redis://x",
            "postgres://h/d?schema=Bad-Name",
            "postgres://h/d?pool_size=0",
            "postgres://h/d?sslmode=sometimes",
        ] {
            let e = PgOptions::from_url(bad, &config).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn pool_follows_concurrency() {
        let mut config = Config::default();
        config.worker.concurrency = 8;
        let o = PgOptions::from_url("postgres://h/d", &config).unwrap();
        assert_eq!(o.pool_size(), 6);
        let o = PgOptions::from_url("postgres://h/d?pool_size=3", &config).unwrap();
        assert_eq!(o.pool_size(), 3);
    }
}
