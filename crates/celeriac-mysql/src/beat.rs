//! [`MysqlBeatStore`]: beat's lease and entry state in MariaDB/MySQL tables.
//!
//! `celeriac_beat_lease(namespace, holder, token, expires_at)` holds one lease per namespace;
//! `celeriac_beat_entries(namespace, name, spec, paused, triggers, state)` the entries. Taking
//! the lease and every leader's write run in a transaction that first locks the lease row
//! (`SELECT … FOR UPDATE`), so the fencing check ([`lease_holds`]) and the write cannot be
//! separated by another instance taking the lease.

use std::collections::BTreeMap;
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState, Lease, Row, lease_holds, next_lease};
use celeriac_core::{BoxFuture, Config, Error, ErrorKind, Result};
use chrono::{DateTime, TimeZone as _, Utc};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::mysql::{MySqlConnection, MySqlPool};

use crate::db::{self, map_err};
use crate::options::MysqlOptions;

const KIND: ErrorKind = ErrorKind::Backend;

/// The beat store of periodic tasks in a MariaDB or MySQL database.
///
/// Several applications may share a database: each uses the lease and entries of its
/// namespace (`?beat-namespace=` in the URL, `default` otherwise).
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// let config = celeriac_core::Config::default();
/// let store = celeriac_mysql::MysqlBeatStore::connect("mysql://root@127.0.0.1/test", &config).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MysqlBeatStore {
    pool: MySqlPool,
    namespace: String,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
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

/// Reads the lease of `namespace`, locking its row for the transaction.
async fn lock_lease(conn: &mut MySqlConnection, namespace: &str) -> sqlx::Result<Option<Lease>> {
    let row = sqlx::query(
        "SELECT holder, token, expires_at FROM celeriac_beat_lease WHERE namespace = ? FOR UPDATE",
    )
    .bind(namespace)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(Lease::new(
            r.try_get::<String, _>(0)?,
            u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
            from_ms(r.try_get(2)?),
        ))
    })
    .transpose()
}

impl MysqlBeatStore {
    /// Opens the store: connects, and creates the tables on first use.
    pub async fn open(options: MysqlOptions) -> Result<Self> {
        let pool = db::open(&options, KIND).await?;
        Ok(MysqlBeatStore {
            pool,
            namespace: options.get_beat_namespace().to_owned(),
        })
    }

    /// Opens the store for a `mysql://` or `mariadb://` URL.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        // Beat needs few connections whatever the worker's concurrency.
        let options = MysqlOptions::from_url(url, config)?;
        let n = options.get_max_connections().min(4);
        Self::open(options.max_connections(n)).await
    }

    /// The namespace this store reads and writes.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl BeatStore for MysqlBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        Box::pin(async move {
            let (pool, ns) = (&self.pool, self.namespace.as_str());
            let r = db::retry(KIND, "beat store: cannot take the lease", || async move {
                let mut tx = pool.begin().await?;
                let current = lock_lease(&mut tx, ns).await?;
                let next = next_lease(current.as_ref(), holder, now, ttl);
                if let Some(l) = &next {
                    // A first lease of the namespace is an insert; two instances racing make
                    // one fail on the key, which is then refused below.
                    sqlx::query(
                        "INSERT INTO celeriac_beat_lease (namespace, holder, token, expires_at) \
                         VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE holder = VALUES(holder), \
                         token = VALUES(token), expires_at = VALUES(expires_at)",
                    )
                    .bind(ns)
                    .bind(&l.holder)
                    .bind(i64::try_from(l.token).unwrap_or(i64::MAX))
                    .bind(ms(l.expires_at))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(next)
            })
            .await?;
            Ok(r)
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "UPDATE celeriac_beat_lease SET expires_at = 0 \
                 WHERE namespace = ? AND holder = ? AND token = ?",
            )
            .bind(&self.namespace)
            .bind(&lease.holder)
            .bind(i64::try_from(lease.token).unwrap_or(0))
            .execute(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot release the lease", e))?;
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(async move {
            let raw = sqlx::query(
                "SELECT name, spec, paused, triggers, state FROM celeriac_beat_entries \
                 WHERE namespace = ?",
            )
            .bind(&self.namespace)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot read the entries", e))?;
            let mut rows = BTreeMap::new();
            for r in raw {
                let get = |e| map_err(KIND, "beat store: cannot read the entries", e);
                let name: String = r.try_get(0).map_err(get)?;
                let spec: Option<String> = r.try_get(1).map_err(get)?;
                let paused: i8 = r.try_get(2).map_err(get)?;
                let triggers: i64 = r.try_get(3).map_err(get)?;
                let state: Option<String> = r.try_get(4).map_err(get)?;
                let mut row = Row::default();
                row.spec = spec
                    .map(|s| decode::<Value>("spec", &name, &s))
                    .transpose()?;
                row.paused = paused != 0;
                row.triggers = u64::try_from(triggers).unwrap_or(0);
                row.state = state
                    .map(|s| decode::<EntryState>("state", &name, &s))
                    .transpose()?;
                rows.insert(name, row);
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
            let state = serde_json::to_string(state)?;
            let (pool, ns, state) = (&self.pool, self.namespace.as_str(), &state);
            db::retry(
                KIND,
                "beat store: cannot save an entry's state",
                || async move {
                    let mut tx = pool.begin().await?;
                    if !lease_holds(lock_lease(&mut tx, ns).await?.as_ref(), lease, now) {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    sqlx::query(
                    "INSERT INTO celeriac_beat_entries (namespace, name, state) VALUES (?, ?, ?) \
                     ON DUPLICATE KEY UPDATE state = VALUES(state)",
                )
                .bind(ns)
                .bind(name)
                .bind(state)
                .execute(&mut *tx)
                .await?;
                    tx.commit().await?;
                    Ok(true)
                },
            )
            .await
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let spec = serde_json::to_string(spec)?;
            sqlx::query(
                "INSERT INTO celeriac_beat_entries (namespace, name, spec) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE spec = VALUES(spec), state = NULL",
            )
            .bind(&self.namespace)
            .bind(name)
            .bind(&spec)
            .execute(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot add an entry", e))?;
            Ok(())
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(
                "DELETE FROM celeriac_beat_entries \
                 WHERE namespace = ? AND name = ? AND spec IS NOT NULL",
            )
            .bind(&self.namespace)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot remove an entry", e))?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO celeriac_beat_entries (namespace, name, paused) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE paused = VALUES(paused)",
            )
            .bind(&self.namespace)
            .bind(name)
            .bind(i8::from(paused))
            .execute(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot pause an entry", e))?;
            Ok(())
        })
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO celeriac_beat_entries (namespace, name, triggers) VALUES (?, ?, 1) \
                 ON DUPLICATE KEY UPDATE triggers = triggers + 1",
            )
            .bind(&self.namespace)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| map_err(KIND, "beat store: cannot trigger an entry", e))?;
            Ok(())
        })
    }
}
