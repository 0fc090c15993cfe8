//! Where the server is and how to talk to it: [`RedisOptions`] and URL parsing.

use std::time::Duration;

use celeriac_core::url::redact;
use celeriac_core::{Config, Error, ErrorKind, Result};

/// Settings of a Redis broker or result backend.
///
/// Defaults: a one hour visibility timeout, results kept one day, no key prefix, and 20 s of
/// reconnect attempts before an operation fails. Build them from a [`Config`] with
/// [`RedisOptions::from_config`]; a `global_keyprefix` in the URL's query wins over the one set
/// here.
///
/// ```
/// use std::time::Duration;
/// use celeriac_redis::RedisOptions;
///
/// let options = RedisOptions::default()
///     .visibility_timeout(Duration::from_secs(300))
///     .global_keyprefix("tenant-a:");
/// assert_eq!(options.get_visibility_timeout(), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    visibility_timeout: Duration,
    result_expires: Option<Duration>,
    global_keyprefix: String,
    retry_for: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            visibility_timeout: Duration::from_secs(3600),
            result_expires: Some(Duration::from_secs(86_400)),
            global_keyprefix: String::new(),
            retry_for: Duration::from_secs(20),
        }
    }
}

impl RedisOptions {
    /// Defaults with the `visibility_timeout` and `result_expires` of `config`.
    pub fn from_config(config: &Config) -> Self {
        RedisOptions::default()
            .visibility_timeout(config.visibility_timeout)
            .result_expires(config.result_expires)
    }

    /// kombu's `visibility_timeout`: how long a delivery stays in the `unacked` hash before any
    /// consumer puts it back in its queue. Every consumer of one Redis, Python or Rust, must use
    /// the same value.
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// How long results, groups and counters are kept; `None` keeps them for good.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// kombu's and Celery's `global_keyprefix` transport option (see the crate docs for how
    /// each side applies it).
    #[must_use]
    pub fn global_keyprefix(mut self, prefix: impl Into<String>) -> Self {
        self.global_keyprefix = prefix.into();
        self
    }

    /// How long an operation keeps reconnecting after the connection dropped before it fails
    /// with a transient error.
    #[must_use]
    pub fn retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// The visibility timeout.
    pub fn get_visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// How long results are kept.
    pub fn get_result_expires(&self) -> Option<Duration> {
        self.result_expires
    }

    /// The global key prefix, as given (before Celery's `_` rule for result keys).
    pub fn get_global_keyprefix(&self) -> &str {
        &self.global_keyprefix
    }

    /// How long an operation retries a lost connection.
    pub fn get_retry_for(&self) -> Duration {
        self.retry_for
    }
}

/// A parsed `redis://` URL: what the client library connects to, plus our own parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The URL handed to the `redis` crate (our query parameters removed, kombu's forms
    /// rewritten to its own).
    pub(crate) client_url: String,
    /// The URL as given, password replaced, for logs and errors.
    pub(crate) redacted: String,
    /// `global_keyprefix` from the query, if any.
    pub(crate) keyprefix: Option<String>,
    /// The database number.
    pub(crate) db: i64,
}

/// Parses the URL forms kombu and Celery accept:
///
/// - `redis://[[user]:password@]host[:port][/db]` (db also as `?virtual_host=N`),
/// - `rediss://…` (TLS: refused with a clear error, this build has no TLS support),
/// - `unix:///path/redis.sock?db=N`, kombu's `redis+socket:///path?virtual_host=N` and
///   Celery's `socket:///path?db=N`.
///
/// `global_keyprefix=<text>` in the query sets the key prefix.
pub(crate) fn parse_url(url: &str, kind: ErrorKind) -> Result<Target> {
    let redacted = redact(url);
    let bad = |why: &str| Error::new(kind, format!("invalid redis url {redacted}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("no scheme (expected redis://host:port/db)"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let mut keyprefix = None;
    let mut db: Option<String> = None;
    let mut passthrough = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "global_keyprefix" => keyprefix = Some(percent_decode(v).map_err(|e| bad(&e))?),
            "virtual_host" | "db" => db = Some(v.to_owned()),
            _ => passthrough.push(pair.to_owned()),
        }
    }
    let (client_scheme, authority, path, unix) = match scheme {
        "redis" => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            ("redis", authority, path, false)
        }
        "rediss" => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot use {redacted}: TLS (rediss://) is not supported by this build of \
                     celeriac-redis; use a TLS tunnel (stunnel, spiped) to a redis:// address"
                ),
            ));
        }
        "unix" | "redis+socket" | "socket" | "redis+unix" => ("unix", "", rest, true),
        other => return Err(bad(&format!("unknown scheme {other:?}"))),
    };
    let db_text = if unix {
        db.unwrap_or_default()
    } else {
        // kombu: the path is the "virtual host"; `/` or nothing is db 0.
        let p = path.trim_matches('/');
        if p.is_empty() {
            db.unwrap_or_default()
        } else {
            p.to_owned()
        }
    };
    let db_num: i64 = if db_text.is_empty() {
        0
    } else {
        db_text
            .parse()
            .map_err(|_| bad(&format!("database must be a number, not {db_text:?}")))?
    };
    if db_num < 0 {
        return Err(bad("database must not be negative"));
    }
    let client_url = if unix {
        if path.is_empty() || !path.starts_with('/') {
            return Err(bad(
                "a unix socket url needs an absolute path, e.g. unix:///run/redis.sock",
            ));
        }
        let mut q = vec![format!("db={db_num}")];
        q.extend(passthrough);
        format!("unix://{path}?{}", q.join("&"))
    } else {
        if authority
            .rsplit_once('@')
            .map_or(authority, |(_, h)| h)
            .is_empty()
        {
            return Err(bad("no host"));
        }
        let mut u = format!("{client_scheme}://{authority}/{db_num}");
        if !passthrough.is_empty() {
            u.push('?');
            u.push_str(&passthrough.join("&"));
        }
        u
    };
    Ok(Target {
        client_url,
        redacted,
        keyprefix,
        db: db_num,
    })
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not utf-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Target {
        parse_url(url, ErrorKind::Broker).unwrap()
    }

    #[test]
    fn tcp_forms() {
        let t = parse("redis://localhost:6379/3");
        assert_eq!(t.client_url, "redis://localhost:6379/3");
        assert_eq!(t.db, 3);
        assert_eq!(parse("redis://h").client_url, "redis://h/0");
        assert_eq!(parse("redis://h:1/").client_url, "redis://h:1/0");
        assert_eq!(parse("redis://h?virtual_host=2").db, 2);
        let t = parse("redis://:s3cret@h:6380/1?global_keyprefix=app%3A1%3A&protocol=resp2");
        assert_eq!(t.client_url, "redis://:s3cret@h:6380/1?protocol=resp2");
        assert_eq!(t.keyprefix.as_deref(), Some("app:1:"));
        assert_eq!(
            t.redacted,
            "redis://:***@h:6380/1?global_keyprefix=app%3A1%3A&protocol=resp2"
        );
        assert_eq!(
            parse("redis://user:pw@h/0").client_url,
            "redis://user:pw@h/0"
        );
    }

    #[test]
    fn unix_forms() {
        for url in [
            "unix:///run/redis.sock?db=4",
            "redis+socket:///run/redis.sock?virtual_host=4",
            "socket:///run/redis.sock?db=4",
        ] {
            assert_eq!(
                parse(url).client_url,
                "unix:///run/redis.sock?db=4",
                "{url}"
            );
        }
        assert_eq!(parse("unix:///s.sock").db, 0);
    }

    #[test]
    fn clear_errors_without_secrets() {
        for (url, want) in [
            ("redis://:pw@h/x", "database must be a number"),
            ("redis://:pw@/0", "no host"),
            ("unix://rel.sock", "absolute path"),
            ("redis://:pw@h/0?global_keyprefix=%zz", "percent escape"),
            ("rediss://:pw@h/0", "tls"),
            ("memcache://:pw@h", "unknown scheme"),
        ] {
            let e = parse_url(url, ErrorKind::Broker).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(want), "{url}: {e}");
            assert!(!e.contains("pw@"), "{url} leaks the password: {e}");
        }
    }
}
