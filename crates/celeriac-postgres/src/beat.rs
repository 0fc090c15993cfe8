//! [`PgBeatStore`]: beat's leader lease and entry state, next to the broker's tables.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState, Lease, Row, lease_holds, next_lease};
use celeriac_core::{BoxFuture, Config, Error, ErrorKind, Result};
use chrono::{DateTime, TimeZone as _, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::options::PgOptions;
use crate::store::Store;

const KIND: ErrorKind = ErrorKind::Backend;

/// A beat store in a PostgreSQL database (`postgres://…`), shared by every beat instance
/// that opens the same database and schema.
///
/// Tables: `beat_lease(id = 1, holder, token, expires_at)`, one row created with the schema
/// (holder empty, token 0, lapsed), and `beat_entries(name, spec, paused, triggers, state)`.
/// Taking the lease and every leader's write run in a transaction that first locks the lease
/// row (`SELECT … FOR UPDATE`), so the check of holder, token and expiry and the write it
/// guards are atomic, and two instances taking a lapsed lease at once get distinct tokens:
/// the second waits for the first's commit, then finds the lease held. Times are Unix
/// milliseconds, as the callers' clocks give them.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::BeatStore;
/// use celeriac_postgres::PgBeatStore;
///
/// let store = PgBeatStore::connect("postgres://postgres@localhost/app", &Default::default()).await?;
/// for (name, row) in store.load().await? {
///     println!("{name}: paused={}", row.paused);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgBeatStore {
    store: Arc<Store>,
}

/// A row of `beat_entries`: name, spec, paused, triggers, state.
type EntryRow = (String, Option<String>, bool, i64, Option<String>);

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
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

impl PgBeatStore {
    /// Opens the store for a `postgres://` URL.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(PgOptions::from_url(url, config)?.with_pool_size(2)).await
    }

    /// Opens the store with `options`; creates the tables if missing.
    pub async fn open(options: PgOptions) -> Result<Self> {
        Ok(PgBeatStore {
            store: Store::open(options, KIND, "beat store").await?,
        })
    }

    async fn locked_lease(
        &self,
        conn: &mut PgConnection,
    ) -> std::result::Result<Lease, sqlx::Error> {
        let (holder, token, expires_at): (String, i64, i64) = sqlx::query_as(AssertSqlSafe(
            self.store
                .sql("SELECT holder, token, expires_at FROM {s}beat_lease WHERE id = 1 FOR UPDATE"),
        ))
        .fetch_one(&mut *conn)
        .await?;
        Ok(Lease::new(
            holder,
            u64::try_from(token).unwrap_or(0),
            from_ms(expires_at),
        ))
    }

    async fn exec(&self, what: &str, sql: &str, name: &str, arg: Option<&str>) -> Result<u64> {
        let mut q = sqlx::query(AssertSqlSafe(self.store.sql(sql))).bind(name);
        if let Some(a) = arg {
            q = q.bind(a);
        }
        q.execute(&self.store.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| self.store.err(what, e))
    }
}

impl BeatStore for PgBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        Box::pin(async move {
            let what = "beat store: cannot take the lease";
            let run = async {
                let mut tx = self.store.pool.begin().await?;
                let current = self.locked_lease(&mut tx).await?;
                let Some(next) = next_lease(Some(&current), holder, now, ttl) else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                sqlx::query(AssertSqlSafe(self.store.sql(
                    "UPDATE {s}beat_lease SET holder = $1, token = $2, expires_at = $3 WHERE id = 1",
                )))
                .bind(&next.holder)
                .bind(i64::try_from(next.token).unwrap_or(i64::MAX))
                .bind(ms(next.expires_at))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(next))
            };
            run.await.map_err(|e| self.store.err(what, e))
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(self.store.sql(
                "UPDATE {s}beat_lease SET expires_at = 0 WHERE id = 1 AND holder = $1 AND token = $2",
            )))
            .bind(&lease.holder)
            .bind(i64::try_from(lease.token).unwrap_or(i64::MAX))
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("beat store: cannot release the lease", e))?;
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(async move {
            let rows: Vec<EntryRow> = sqlx::query_as(AssertSqlSafe(
                self.store
                    .sql("SELECT name, spec, paused, triggers, state FROM {s}beat_entries"),
            ))
            .fetch_all(&self.store.pool)
            .await
            .map_err(|e| self.store.err("beat store: cannot read the entries", e))?;
            let mut out = BTreeMap::new();
            for (name, spec, paused, triggers, state) in rows {
                let mut row = Row::default();
                row.spec = spec
                    .map(|s| decode::<Value>("spec", &name, &s))
                    .transpose()?;
                row.paused = paused;
                row.triggers = u64::try_from(triggers).unwrap_or(0);
                row.state = state
                    .map(|s| decode::<EntryState>("state", &name, &s))
                    .transpose()?;
                out.insert(name, row);
            }
            Ok(out)
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
            let text = serde_json::to_string(state)?;
            let run = async {
                let mut tx = self.store.pool.begin().await?;
                let current = self.locked_lease(&mut tx).await?;
                if !lease_holds(Some(&current), lease, now) {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query(AssertSqlSafe(self.store.sql(
                    "INSERT INTO {s}beat_entries (name, state) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET state = excluded.state",
                )))
                .bind(name)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            };
            run.await.map_err(|e| {
                self.store
                    .err("beat store: cannot save an entry's state", e)
            })
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let text = serde_json::to_string(spec)?;
            self.exec(
                "beat store: cannot add an entry",
                "INSERT INTO {s}beat_entries (name, spec) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, state = NULL",
                name,
                Some(&text),
            )
            .await?;
            Ok(())
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let n = self
                .exec(
                    "beat store: cannot remove an entry",
                    "DELETE FROM {s}beat_entries WHERE name = $1 AND spec IS NOT NULL",
                    name,
                    None,
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(self.store.sql(
                "INSERT INTO {s}beat_entries (name, paused) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
            )))
            .bind(name)
            .bind(paused)
            .execute(&self.store.pool)
            .await
            .map_err(|e| self.store.err("beat store: cannot pause an entry", e))?;
            Ok(())
        })
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.exec(
                "beat store: cannot trigger an entry",
                "INSERT INTO {s}beat_entries AS e (name, triggers) VALUES ($1, 1) \
                 ON CONFLICT (name) DO UPDATE SET triggers = e.triggers + 1",
                name,
                None,
            )
            .await?;
            Ok(())
        })
    }
}
