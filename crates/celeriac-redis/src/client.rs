//! [`RedisConnection`]: the broker's connection handling, for other celeriac crates.

use std::future::Future;

use celeriac_core::{ErrorKind, Result};
use redis::aio::MultiplexedConnection;

use crate::conn::Redis;
use crate::options::RedisOptions;

/// A command connection to the Redis a URL names, opened as [`crate::RedisBroker`] opens its
/// own: the same URL forms, `global_keyprefix` from the query (else the options'), the password
/// redacted in every log line and error, and reconnect on demand. For code that keeps its own
/// keys next to the broker's. Errors are [`ErrorKind::Backend`].
#[derive(Debug)]
pub struct RedisConnection {
    redis: Redis,
    prefix: String,
}

impl RedisConnection {
    /// Parses `url`, connects and checks that the server answers.
    ///
    /// ```no_run
    /// # async fn demo() -> celeriac_core::Result<()> {
    /// use celeriac_redis::{RedisConnection, RedisOptions, redis};
    ///
    /// let conn = RedisConnection::open("redis://127.0.0.1:6379/0?global_keyprefix=app%3A", RedisOptions::default()).await?;
    /// let key = format!("{}my.key", conn.global_keyprefix());
    /// let n: i64 = conn
    ///     .run_once("count", |mut c| async move { redis::cmd("INCR").arg(&key).query_async(&mut c).await })
    ///     .await?;
    /// # let _ = n; Ok(()) }
    /// ```
    pub async fn open(url: &str, options: RedisOptions) -> Result<Self> {
        let opened = Redis::open(url, &options, ErrorKind::Backend).await?;
        Ok(RedisConnection {
            redis: opened.redis,
            prefix: opened.prefix,
        })
    }

    /// The key prefix to put before every key (kombu's `global_keyprefix`, verbatim).
    pub fn global_keyprefix(&self) -> &str {
        &self.prefix
    }

    /// The URL with its password replaced, for logs.
    pub fn redacted_url(&self) -> &str {
        &self.redis.url
    }

    /// Runs `f` once on the shared connection (for commands that must not run twice); a lost
    /// connection is dropped so that the next call reconnects. The error reads
    /// "cannot `what` (url)" and is transient when the connection failed.
    pub async fn run_once<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.redis.run_once(what, f).await
    }

    /// Runs `f`, reconnecting and retrying while the connection is lost (for idempotent
    /// commands), for up to [`RedisOptions::retry_for`].
    pub async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.redis.run(what, f).await
    }
}
