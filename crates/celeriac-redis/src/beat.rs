//! [`RedisBeatStore`]: beat's lease and entry state in Redis, usually the broker's own (its
//! docs list the keys and say how each step stays atomic).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState, Lease, Row};
use celeriac_core::{BoxFuture, Config, Error, ErrorKind, Result};
use chrono::{DateTime, Utc};
use redis::Script;
use serde_json::Value;

use crate::conn::Redis;
use crate::options::RedisOptions;

const KIND: ErrorKind = ErrorKind::Backend;

/// KEYS: lease, token. ARGV: holder, now (ms), lease (ms), expiry (ms).
/// Returns the token held, or false when another holder's lease is current.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local t, e, h = string.match(cur, '^(%d+):(%-?%d+):(.*)$')
  if t and tonumber(e) > tonumber(ARGV[2]) then
    if h ~= ARGV[1] then return false end
    redis.call('SET', KEYS[1], t .. ':' .. ARGV[4] .. ':' .. h, 'PX', ARGV[3])
    return tonumber(t)
  end
  redis.call('DEL', KEYS[1])
end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], t .. ':' .. ARGV[4] .. ':' .. ARGV[1], 'NX', 'PX', ARGV[3])
return t
"#,
    )
});

/// KEYS: lease, state. ARGV: token, holder, now (ms), name, state JSON. Returns 1 if written.
static SAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local t, e, h = string.match(cur, '^(%d+):(%-?%d+):(.*)$')
if t ~= ARGV[1] or h ~= ARGV[2] or tonumber(e) <= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return 1
"#,
    )
});

/// KEYS: lease. ARGV: token, holder. Deletes the lease if it is still this one.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local t, e, h = string.match(cur, '^(%d+):(%-?%d+):(.*)$')
if t == ARGV[1] and h == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// KEYS: spec, paused, triggers, state. ARGV: name. Removes a run-time entry (one with a
/// spec) and everything about it; returns 1 if it existed.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 1, #KEYS do redis.call('HDEL', KEYS[i], ARGV[1]) end
return 1
"#,
    )
});

#[derive(Debug)]
struct Keys {
    lease: String,
    token: String,
    state: String,
    spec: String,
    paused: String,
    triggers: String,
}

impl Keys {
    fn new(global_keyprefix: &str) -> Keys {
        let k = |name: &str| format!("{global_keyprefix}celeriac.beat.{name}");
        Keys {
            lease: k("lease"),
            token: k("token"),
            state: k("state"),
            spec: k("spec"),
            paused: k("paused"),
            triggers: k("triggers"),
        }
    }
}

/// A beat store in Redis, shared by every process that opens the same server and database
/// with the same `global_keyprefix`. Clones share one connection.
///
/// Keys, each under the URL's `global_keyprefix` (prepended verbatim, as kombu does):
///
/// | key | type | content |
/// |---|---|---|
/// | `celeriac.beat.lease` | string | `<token>:<expires, Unix ms>:<holder>`, set with `PX` = the lease |
/// | `celeriac.beat.token` | string | the last fencing token handed out (`INCR`, never expires) |
/// | `celeriac.beat.state` | hash | entry name → the leader's [`EntryState`] as JSON |
/// | `celeriac.beat.spec` | hash | entry name → the definition of an entry added at run time, as JSON |
/// | `celeriac.beat.paused` | hash | entry name → `1` (paused) or `0` |
/// | `celeriac.beat.triggers` | hash | entry name → manual triggers requested (`HINCRBY`) |
///
/// The lease and the leader's writes are Lua scripts, so each check and the write it guards
/// are one atomic step on the server. A lease is held while its key exists (Redis expires it
/// after the lease time, so a dead leader's key goes away on its own) *and* the expiry stored
/// in it is later than the caller's clock, the rule every store follows
/// ([`celeriac_core::beat::next_lease`]). Taking a free lease increments the token key and
/// writes the lease key with `SET NX PX`; renewing rewrites it with the same token. Saving an
/// entry's state compares the stored token, holder and expiry with the caller's lease first, so
/// a leader that lost its lease has its write refused.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::BeatStore;
/// use celeriac_redis::RedisBeatStore;
///
/// let config = celeriac_core::Config::default();
/// let store = RedisBeatStore::connect("redis://127.0.0.1:6379/0", &config).await?;
/// for (name, row) in store.load().await? {
///     println!("{name}: paused {}", row.paused);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBeatStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: Redis,
    keys: Keys,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, name: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::new(
            KIND,
            format!("beat store: the stored {what} of entry {name:?} is not valid JSON"),
        )
        .with_source(e)
    })
}

impl RedisBeatStore {
    /// Connects to the server of a `redis://`, `unix://` (or kombu's `redis+socket://`,
    /// Celery's `socket://`) URL with the settings of `config`; a `global_keyprefix` in its
    /// query is put before every key.
    ///
    /// Fails with [`ErrorKind::Backend`] when the server is unreachable (transient) or refuses
    /// the credentials; the password never appears in the error.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::connect_with(url, RedisOptions::from_config(config)).await
    }

    /// Connects with explicit options; a `global_keyprefix` in the URL wins over the options'.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        let opened = Redis::open(url, &options, KIND).await?;
        let keys = Keys::new(&opened.prefix);
        tracing::debug!(url = %opened.redis.url, "opened redis beat store");
        Ok(RedisBeatStore {
            inner: Arc::new(Inner {
                redis: opened.redis,
                keys,
            }),
        })
    }

    /// The key of the lease (the others share its prefix).
    pub fn lease_key(&self) -> &str {
        &self.inner.keys.lease
    }
}

impl BeatStore for RedisBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        Box::pin(async move {
            let ttl_ms = i64::try_from(ttl.as_millis())
                .unwrap_or(i64::MAX / 4)
                .clamp(1, i64::MAX / 4);
            let expires_at = now + chrono::Duration::milliseconds(ttl_ms);
            let k = &self.inner.keys;
            let token: Option<u64> = self
                .inner
                .redis
                .run_once("take the beat lease", |mut c| async move {
                    ACQUIRE
                        .key(&k.lease)
                        .key(&k.token)
                        .arg(holder)
                        .arg(ms(now))
                        .arg(ttl_ms)
                        .arg(ms(expires_at))
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(token.map(|t| Lease::new(holder, t, expires_at)))
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let k = &self.inner.keys;
            self.inner
                .redis
                .run_once("release the beat lease", |mut c| async move {
                    RELEASE
                        .key(&k.lease)
                        .arg(lease.token)
                        .arg(&lease.holder)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(async move {
            let k = &self.inner.keys;
            type Maps = (
                HashMap<String, String>,
                HashMap<String, String>,
                HashMap<String, String>,
                HashMap<String, String>,
            );
            let (specs, paused, triggers, states): Maps = self
                .inner
                .redis
                .run_once("read the beat entries", |mut c| async move {
                    redis::pipe()
                        .atomic()
                        .hgetall(&k.spec)
                        .hgetall(&k.paused)
                        .hgetall(&k.triggers)
                        .hgetall(&k.state)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let mut rows: BTreeMap<String, Row> = BTreeMap::new();
            for (name, text) in specs {
                let spec = decode::<Value>("spec", &name, &text)?;
                rows.entry(name).or_default().spec = Some(spec);
            }
            for (name, v) in paused {
                rows.entry(name).or_default().paused = v == "1";
            }
            for (name, v) in triggers {
                rows.entry(name).or_default().triggers = v.parse().unwrap_or(0);
            }
            for (name, text) in states {
                let state = decode::<EntryState>("state", &name, &text)?;
                rows.entry(name).or_default().state = Some(state);
            }
            Ok(rows)
        })
    }

    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: DateTime<Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let state = serde_json::to_string(state).map_err(Error::from)?;
            let k = &self.inner.keys;
            let state = &state;
            let written: i64 = self
                .inner
                .redis
                .run_once("save a beat entry's state", |mut c| async move {
                    SAVE.key(&k.lease)
                        .key(&k.state)
                        .arg(lease.token)
                        .arg(&lease.holder)
                        .arg(ms(now))
                        .arg(name)
                        .arg(state)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(written == 1)
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let spec = serde_json::to_string(spec).map_err(Error::from)?;
            let (k, spec) = (&self.inner.keys, &spec);
            self.inner
                .redis
                .run("add a beat entry", |mut c| async move {
                    redis::pipe()
                        .atomic()
                        .hset(&k.spec, name, spec)
                        .hdel(&k.state, name)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let k = &self.inner.keys;
            let n: i64 = self
                .inner
                .redis
                .run("remove a beat entry", |mut c| async move {
                    REMOVE
                        .key(&k.spec)
                        .key(&k.paused)
                        .key(&k.triggers)
                        .key(&k.state)
                        .arg(name)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(n == 1)
        })
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let k = &self.inner.keys;
            self.inner
                .redis
                .run("pause a beat entry", |mut c| async move {
                    redis::cmd("HSET")
                        .arg(&k.paused)
                        .arg(name)
                        .arg(if paused { "1" } else { "0" })
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
        })
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let k = &self.inner.keys;
            self.inner
                .redis
                .run_once("trigger a beat entry", |mut c| async move {
                    redis::cmd("HINCRBY")
                        .arg(&k.triggers)
                        .arg(name)
                        .arg(1)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
        })
    }
}
