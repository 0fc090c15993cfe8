//! Coordination across workers beside Celery's tables: cluster rate limits, unique-task locks
//! and concurrency slots ([`celeriac_core::coord`]) on PostgreSQL and MariaDB/MySQL.
//!
//! Celery's tables stay exactly as Celery makes them; coordination lives in two small tables
//! of celeriac's own in the task table's schema, like the chord counters
//! ([`COUNTERS_TABLE`](super::COUNTERS_TABLE)):
//!
//! - [`COORD_KEYS_TABLE`] `(key_hash, name, holder, until_us)`: one row per rate-limited key
//!   (`until_us` = its GCRA time), per lock (its holder and expiry) and per slot key (an
//!   anchor row that takers of the key's slots lock first);
//! - [`COORD_SLOTS_TABLE`] `(key_hash, holder_hash, name, holder, until_us)`: one row per
//!   leased slot.
//!
//! They are created on first use (under an advisory lock on PostgreSQL, where concurrent
//! `CREATE TABLE IF NOT EXISTS` can collide; MariaDB's metadata lock serializes creators), so
//! a database that never coordinates never gets them. Keys can be longer than an index allows
//! (a unique task's key holds its arguments): rows are keyed by the SHA-256 of the key's UTF-8
//! (and of the slot's holder), computed by the server, with the text beside it.
//!
//! Every method is one transaction, the same on both databases: it locks the key's row with
//! `SELECT … FOR UPDATE` (creating it first when missing), reads the server's clock in that
//! statement, decides in Rust with core's arithmetic ([`celeriac_core::coord::gcra`]), and
//! writes. Callers of one key queue on its row lock; a deadlock runs the transaction again.

use std::time::Duration;

use celeriac_core::coord::{Admission, Coordination};
use celeriac_core::{BoxFuture, Error, ErrorKind, RateLimit, Result};

use super::SqlaBackend;
use crate::db::{Pool, map_err, quote, retry_deadlocks};
use crate::schema::{Server, on_pool, sql};
use crate::url::Dialect;

const KIND: ErrorKind = ErrorKind::Backend;

/// The table of coordination keys (rate limits, locks, slot anchors), celeriac's own.
pub const COORD_KEYS_TABLE: &str = "celeriac_sqla_coord_keys";
/// The table of leased concurrency slots, celeriac's own.
pub const COORD_SLOTS_TABLE: &str = "celeriac_sqla_coord_slots";

/// The statements, built once from the dialect and the schema. Parameters are bound in the
/// same order on both databases (`$n` on PostgreSQL, `?` on MySQL).
#[derive(Debug)]
pub(super) struct CoordSql {
    keys: String,
    slots: String,
    ddl: [String; 2],
    /// `name` → the row's holder, time, and the server's time; locks the row.
    lock_key: String,
    /// `name, name` → creates the row (no holder, time 0) unless there, and locks it.
    create_key: String,
    /// `holder, until_us, name`.
    set_key: String,
    /// `name, holder` → deletes the lock row if `holder` holds it.
    unlock: String,
    /// `key, now`.
    expire_slots: String,
    /// `holder, key` → the slots held, and whether `holder` holds one.
    count_slots: String,
    /// `key, holder, key, holder, until_us`.
    take_slot: String,
    /// `key, holder`.
    release: String,
}

impl CoordSql {
    pub(super) fn new(server: Server, schema: Option<&str>) -> Self {
        let d = server.dialect;
        let keys = quote(d, schema, COORD_KEYS_TABLE);
        let slots = quote(d, schema, COORD_SLOTS_TABLE);
        // The row key of parameter `n`: 32 bytes of SHA-256 over its UTF-8.
        let h = |n: usize| match d {
            Dialect::Postgres => format!("sha256(convert_to(${n}, 'UTF8'))"),
            Dialect::MySql => "UNHEX(SHA2(CONVERT(? USING utf8mb4), 256))".to_owned(),
        };
        let p = |n: usize| server.param(n);
        // Microseconds of the server's clock when evaluated (PostgreSQL's `now()` and MySQL's
        // `NOW()` are when the transaction or statement began).
        let now_us = match d {
            Dialect::Postgres => "(extract(epoch from clock_timestamp()) * 1000000)::bigint",
            Dialect::MySql => "CAST(UNIX_TIMESTAMP(SYSDATE(6)) * 1000000 AS SIGNED)",
        };
        let (bytes, text, suffix) = match d {
            Dialect::Postgres => ("BYTEA", "TEXT", ""),
            Dialect::MySql => (
                "BINARY(32)",
                "LONGTEXT",
                " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            ),
        };
        let ddl = [
            format!(
                "CREATE TABLE IF NOT EXISTS {keys} (key_hash {bytes} NOT NULL, \
                 name {text} NOT NULL, holder {text}, until_us BIGINT NOT NULL, \
                 PRIMARY KEY (key_hash)){suffix}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {slots} (key_hash {bytes} NOT NULL, \
                 holder_hash {bytes} NOT NULL, name {text} NOT NULL, holder {text} NOT NULL, \
                 until_us BIGINT NOT NULL, PRIMARY KEY (key_hash, holder_hash)){suffix}"
            ),
        ];
        let lock_key = format!(
            "SELECT holder, until_us, {now_us} FROM {keys} WHERE key_hash = {} FOR UPDATE",
            h(1)
        );
        let create_key = match d {
            Dialect::Postgres => format!(
                "INSERT INTO {keys} AS k (key_hash, name, holder, until_us) \
                 VALUES ({}, $2, NULL, 0) \
                 ON CONFLICT (key_hash) DO UPDATE SET until_us = k.until_us",
                h(1)
            ),
            Dialect::MySql => format!(
                "INSERT INTO {keys} (key_hash, name, holder, until_us) VALUES ({}, ?, NULL, 0) \
                 ON DUPLICATE KEY UPDATE until_us = until_us",
                h(1)
            ),
        };
        let set_key = format!(
            "UPDATE {keys} SET holder = {}, until_us = {} WHERE key_hash = {}",
            p(1),
            p(2),
            h(3)
        );
        let unlock = format!(
            "DELETE FROM {keys} WHERE key_hash = {} AND holder = {}",
            h(1),
            p(2)
        );
        let expire_slots = format!(
            "DELETE FROM {slots} WHERE key_hash = {} AND until_us <= {}",
            h(1),
            p(2)
        );
        let count_slots = format!(
            "SELECT COUNT(*), COUNT(CASE WHEN holder_hash = {} THEN 1 END) FROM {slots} \
             WHERE key_hash = {}",
            h(1),
            h(2)
        );
        let take_slot = match d {
            Dialect::Postgres => format!(
                "INSERT INTO {slots} (key_hash, holder_hash, name, holder, until_us) \
                 VALUES ({}, {}, $3, $4, $5) \
                 ON CONFLICT (key_hash, holder_hash) DO UPDATE SET until_us = EXCLUDED.until_us",
                h(1),
                h(2)
            ),
            Dialect::MySql => format!(
                "INSERT INTO {slots} (key_hash, holder_hash, name, holder, until_us) \
                 VALUES ({}, {}, ?, ?, ?) ON DUPLICATE KEY UPDATE until_us = VALUES(until_us)",
                h(1),
                h(2)
            ),
        };
        let release = format!(
            "DELETE FROM {slots} WHERE key_hash = {} AND holder_hash = {}",
            h(1),
            h(2)
        );
        CoordSql {
            keys,
            slots,
            ddl,
            lock_key,
            create_key,
            set_key,
            unlock,
            expire_slots,
            count_slots,
            take_slot,
            release,
        }
    }
}

/// A key's row, locked for the transaction.
struct Locked {
    holder: Option<String>,
    until: i64,
    now: i64,
}

/// Locks the row of `$name` in transaction `$tx` (creating it when missing): a [`Locked`].
macro_rules! lock_key {
    ($tx:expr, $sql:expr, $name:expr) => {
        async {
            use sqlx::Row as _;
            // Twice at most: a missing row is created (and locked) by the insert.
            for _ in 0..2 {
                let row = sqlx::query(sql(&$sql.lock_key))
                    .bind($name)
                    .fetch_optional(&mut *$tx)
                    .await?;
                if let Some(r) = row {
                    return Ok::<_, sqlx::Error>(Locked {
                        holder: r.try_get(0)?,
                        until: r.try_get(1)?,
                        now: r.try_get(2)?,
                    });
                }
                sqlx::query(sql(&$sql.create_key))
                    .bind($name)
                    .bind($name)
                    .execute(&mut *$tx)
                    .await?;
            }
            Err(sqlx::Error::RowNotFound)
        }
    };
}

/// `d` in microseconds, saturating.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

impl SqlaBackend {
    fn coord_sql(&self) -> &CoordSql {
        &self.inner.coord
    }

    /// Creates the coordination tables once per backend (when missing).
    async fn coord_tables(&self) -> Result<()> {
        self.check_open()?;
        self.inner
            .coord_ready
            .get_or_try_init(|| async {
                let c = self.coord_sql();
                let fail = |e| map_err(KIND, "cannot create the coordination tables", e);
                // Present (an administrator may have made them for a user who may not
                // create tables): nothing to do.
                let probe = format!("SELECT 1 FROM {}, {} WHERE 1 = 0", c.keys, c.slots);
                let present = on_pool!(&self.inner.pool, p =>
                    sqlx::query(sql(&probe)).execute(p).await.map(|_| ()));
                match present {
                    Ok(()) => return Ok(()),
                    Err(sqlx::Error::Database(db))
                        if matches!(db.code().as_deref(), Some("42P01" | "42S02")) => {}
                    Err(e) => return Err(fail(e)),
                }
                match &self.inner.pool {
                    #[cfg(feature = "postgres")]
                    Pool::Pg(p) => {
                        // Under an advisory lock: concurrent `CREATE TABLE IF NOT EXISTS` of
                        // one table can fail in PostgreSQL on the catalog's unique index.
                        let mut tx = p.begin().await.map_err(fail)?;
                        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                            .bind(format!("celeriac-sqla-coord-ddl:{}", c.keys))
                            .execute(&mut *tx)
                            .await
                            .map_err(fail)?;
                        for ddl in &c.ddl {
                            sqlx::query(sql(ddl))
                                .execute(&mut *tx)
                                .await
                                .map_err(fail)?;
                        }
                        tx.commit().await.map_err(fail)?;
                    }
                    #[cfg(feature = "mysql")]
                    Pool::My(p) => {
                        // The metadata lock serializes concurrent creators; the later ones
                        // find the table.
                        for ddl in &c.ddl {
                            sqlx::query(sql(ddl)).execute(p).await.map_err(fail)?;
                        }
                    }
                }
                tracing::debug!(keys = %c.keys, slots = %c.slots, "created the coordination tables");
                Ok::<_, Error>(())
            })
            .await
            .map(|_| ())
    }
}

/// Cluster rate limits, unique-task locks and concurrency slots beside Celery's tables (see
/// the module docs), each step one transaction on the server's clock.
impl Coordination for SqlaBackend {
    fn throttle<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Admission>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let c = self.coord_sql();
            let name = format!("rate:{key}");
            let name = name.as_str();
            let what = |e| map_err(KIND, "cannot throttle", e);
            retry_deadlocks(|| async move {
                on_pool!(&self.inner.pool, p => {
                    let mut tx = p.begin().await.map_err(what)?;
                    let row = lock_key!(tx, c, name).await.map_err(what)?;
                    let (tat, now) = (row.until.max(0) as u64, row.now.max(0) as u64);
                    let (admission, next) =
                        celeriac_core::coord::gcra_admission(tat, now, limit);
                    if let Some(next) = next {
                        sqlx::query(sql(&c.set_key))
                            .bind(None::<&str>)
                            .bind(i64::try_from(next).unwrap_or(i64::MAX))
                            .bind(name)
                            .execute(&mut *tx)
                            .await
                            .map_err(what)?;
                    }
                    tx.commit().await.map_err(what)?;
                    Ok(admission)
                })
            })
            .await
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let c = self.coord_sql();
            let name = format!("lock:{key}");
            let name = name.as_str();
            let what = |e| map_err(KIND, "cannot take a lock", e);
            retry_deadlocks(|| async move {
                on_pool!(&self.inner.pool, p => {
                    let mut tx = p.begin().await.map_err(what)?;
                    let row = lock_key!(tx, c, name).await.map_err(what)?;
                    let free = match &row.holder {
                        None => true,
                        Some(h) => h == holder || row.until <= row.now,
                    };
                    let after = if free {
                        sqlx::query(sql(&c.set_key))
                            .bind(holder)
                            .bind(row.now.saturating_add(micros(ttl)))
                            .bind(name)
                            .execute(&mut *tx)
                            .await
                            .map_err(what)?;
                        holder.to_owned()
                    } else {
                        row.holder.unwrap_or_default()
                    };
                    tx.commit().await.map_err(what)?;
                    Ok(after)
                })
            })
            .await
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let name = format!("lock:{key}");
            on_pool!(&self.inner.pool, p => sqlx::query(sql(&self.coord_sql().unlock))
                .bind(name)
                .bind(holder)
                .execute(p)
                .await
                .map(|r| r.rows_affected() == 1))
            .map_err(|e| map_err(KIND, "cannot release a lock", e))
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let c = self.coord_sql();
            let anchor = format!("slots:{key}");
            let anchor = anchor.as_str();
            let what = |e| map_err(KIND, "cannot take a slot", e);
            retry_deadlocks(|| async move {
                on_pool!(&self.inner.pool, p => {
                    use sqlx::Row as _;
                    let mut tx = p.begin().await.map_err(what)?;
                    // The key's anchor row serializes its takers, so that they count the
                    // same rows.
                    let now = lock_key!(tx, c, anchor).await.map_err(what)?.now;
                    sqlx::query(sql(&c.expire_slots))
                        .bind(key)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(what)?;
                    let row = sqlx::query(sql(&c.count_slots))
                        .bind(holder)
                        .bind(key)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(what)?;
                    let held: i64 = row.try_get(0).map_err(what)?;
                    let mine: i64 = row.try_get(1).map_err(what)?;
                    if mine == 0 && held >= i64::from(limit) {
                        tx.commit().await.map_err(what)?;
                        return Ok(false);
                    }
                    sqlx::query(sql(&c.take_slot))
                        .bind(key)
                        .bind(holder)
                        .bind(key)
                        .bind(holder)
                        .bind(now.saturating_add(micros(ttl)))
                        .execute(&mut *tx)
                        .await
                        .map_err(what)?;
                    tx.commit().await.map_err(what)?;
                    Ok(true)
                })
            })
            .await
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.coord_tables().await?;
            on_pool!(&self.inner.pool, p => sqlx::query(sql(&self.coord_sql().release))
                .bind(key)
                .bind(holder)
                .execute(p)
                .await
                .map(|_| ()))
            .map_err(|e| map_err(KIND, "cannot free a slot", e))
        })
    }
}
